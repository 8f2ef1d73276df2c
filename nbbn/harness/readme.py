"""Deprecated: ``python -m nbbn.harness.readme`` is ``nbbn report readme``."""

from ..cli import deprecated_alias

if __name__ == "__main__":
    deprecated_alias("python -m nbbn.harness.readme", ["report", "readme"])
