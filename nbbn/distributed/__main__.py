"""Deprecated alias: ``python -m nbbn.distributed bench ...`` is ``nbbn distributed bench ...``."""

from ..cli import deprecated_alias

deprecated_alias("python -m nbbn.distributed", ["distributed"])
