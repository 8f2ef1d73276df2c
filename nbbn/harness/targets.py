"""Deprecated: ``python -m nbbn.harness.targets`` is ``nbbn report targets``."""

from ..cli import deprecated_alias

if __name__ == "__main__":
    deprecated_alias("python -m nbbn.harness.targets", ["report", "targets"])
