"""The ``nbbn`` command line: one click group; each command lives with the code it drives.

======================  ==================================================================
``nbbn bench``          sweep, check against the float64 reference, time, report (bench/)
``nbbn compare``        label two bench runs faster / slower / same (bench/)
``nbbn report ...``     reports from finished bench runs: targets, fusion, readme (bench/)
``nbbn accuracy``       the accuracy study (accuracy/)
``nbbn paper``          the paper's MNIST experiment reproduced (paper/)
``nbbn distributed ..`` synchronized BN over MPI: ``bench``, its cost (distributed/)
``nbbn ptxcheck``       compile every CUDA kernel to PTX and report registers (cuda/)
======================  ==================================================================

``python -m nbbn ...`` is the same. Sub-commands are imported when the group is built, but the
modules they drive (Numba kernels, torch, MPI) load only when a command runs.
"""

from __future__ import annotations

import sys

import click

from . import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="nbbn")
def main() -> None:
    """nbbn: batch-normalization kernels in Numba, their benchmark harness and accuracy study."""


@main.command("ptxcheck", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--cc", "ccs", multiple=True, metavar="MAJOR.MINOR",
              help="Compute capability, e.g. 9.0 (repeatable). [default: 8.0 and 9.0]")
@click.option("--dtype", "dtypes", multiple=True, metavar="DTYPE",
              help="x dtype (repeatable). [default: float32, float64, float16, bfloat16]")
@click.option("--kernel", "kernels", multiple=True, metavar="NAME",
              help="Kernel name (repeatable). [default: every kernel]")
@click.option("--ptxas", is_flag=True,
              help="Also assemble with ptxas -v: registers, spills, resident blocks per SM.")
@click.option("--table", is_flag=True, help="Print a table of the ptxas facts, not JSON.")
def ptxcheck(ccs, dtypes, kernels, ptxas, table) -> None:
    """Compile every CUDA kernel for real (no GPU needed) and report per kernel: PTX, compile
    time and, with --ptxas, registers, spills and occupancy. Needs NUMBA_ENABLE_CUDASIM unset."""
    import json
    import os

    from .cuda import ptxcheck as _ptx

    try:
        parsed = tuple(_ptx._cc(c) for c in ccs)
    except ValueError:
        raise click.BadParameter(f"{ccs!r}: write MAJOR.MINOR, e.g. 9.0",
                                 param_hint="--cc") from None
    bad = [d for d in dtypes if d not in _ptx.DTYPES]
    if bad:
        raise click.BadParameter(f"{bad}: choose from {', '.join(_ptx.DTYPES)}",
                                 param_hint="--dtype")
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        raise click.ClickException("NUMBA_ENABLE_CUDASIM=1: the simulator compiles nothing; "
                                   "unset it for the PTX check")
    assembler = None
    if ptxas or table:
        assembler = _ptx.find_ptxas()
        if assembler is None:
            raise click.ClickException("--ptxas: ptxas not found (PATH, CUDA_HOME, "
                                       "/usr/local/cuda/bin)")
    report = _ptx.run(parsed or _ptx.DEFAULT_CCS, tuple(dtypes or _ptx.DTYPES), set(kernels),
                      assembler)
    click.echo(_ptx.table(report) if table else json.dumps(report, indent=1))
    if not report["ok"]:
        sys.exit(1)


def _add_commands() -> None:
    from .accuracy.cli import accuracy
    from .bench.cli import bench, compare, report
    from .distributed.cost import cli as distributed
    from .paper.cli import paper

    for cmd in (bench, compare, report, accuracy, paper, distributed):
        main.add_command(cmd)


_add_commands()


def deprecated_alias(old: str, words: list[str]) -> None:
    """Run ``nbbn WORDS ARGS...`` for a deprecated ``python -m`` entry point, saying so once."""
    click.echo(f"{old} is deprecated and goes in nbbn 0.3: use `nbbn {' '.join(words)}`.",
               err=True)
    main.main(args=[*words, *sys.argv[1:]], prog_name="nbbn")


if __name__ == "__main__":
    main()
