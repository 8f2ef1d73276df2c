"""Deprecated: ``python -m nbbn.harness.fusion`` is ``nbbn report fusion``."""

from ..cli import deprecated_alias

if __name__ == "__main__":
    deprecated_alias("python -m nbbn.harness.fusion", ["report", "fusion"])
