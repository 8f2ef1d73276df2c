"""The ``nbbn`` command line: a click group; each sub-command lives with the code it drives."""

from __future__ import annotations

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nbbn")
def main() -> None:
    """nbbn: batch-normalization kernels in Numba, their benchmark harness and accuracy study."""


def _add_commands() -> None:
    from .harness.commands import bench, compare
    from .paper.commands import paper
    from .study.commands import accuracy

    for cmd in (bench, compare, accuracy, paper):
        main.add_command(cmd)


_add_commands()


if __name__ == "__main__":
    main()
