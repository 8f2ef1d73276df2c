"""``python -m nbbn ...`` is ``nbbn ...``."""

from .cli import main

main(prog_name="nbbn")
