"""Deprecated: ``python -m nbbn.study.distributed`` is ``nbbn accuracy --parts d``."""

from ..cli import deprecated_alias

if __name__ == "__main__":
    deprecated_alias("python -m nbbn.study.distributed", ["accuracy", "--parts", "d"])
