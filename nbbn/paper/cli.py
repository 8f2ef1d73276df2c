"""``nbbn paper``: the command line of the paper's experiment."""

from __future__ import annotations

import os
import sys
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import click

from ..output import command_line


def _load() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


@click.command("paper", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True,
              help="600 steps, 2 seeds, a 3-point learning-rate grid: about 10 s on digits.")
@click.option("--data", "data_dir", default=None, metavar="DIR",
              help="A folder of MNIST-format IDX files (train-images-idx3-ubyte[.gz], "
                   "train-labels-idx1-ubyte, t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte): "
                   "MNIST, or Fashion-MNIST (Debian: /usr/share/datasets/fashion-mnist) "
                   "[default: scikit-learn's 8×8 digits].")
@click.option("--steps", type=click.IntRange(min=10), default=None, metavar="N",
              help="SGD steps per run [default: 5000; --quick 600].")
@click.option("--seeds", type=click.IntRange(min=1), default=None, metavar="K",
              help="Seeds 0…K−1 per configuration [default: 3; --quick 2].")
@click.option("--backend", default="cpu", show_default=True, metavar="B",
              help="nbbn backend of every batch norm (cpu, cuda).")
@click.option("--out", "out", default=None, metavar="DIR",
              help="Folder for report.md, the tables and figures [default: results/paper/NAME, "
                   "NAME = digits or the --data folder's name].")
@click.option("--no-plots", is_flag=True, help="Do not draw the PNG figures.")
@click.option("--study-gap", "study_gap", default="results/accuracy/gap.csv", show_default=True,
              metavar="CSV", help="The accuracy study's gap table (nbbn accuracy), shown beside "
                                  "the measured train–inference gap when the file exists.")
@click.pass_context
def paper(ctx, quick, data_dir, steps, seeds, backend, out, no_plots, study_gap):
    """Ioffe & Szegedy (2015) §4.1 / Figure 1 on a NumPy MLP whose batch norms run on nbbn.

    \b
    A 3×100 sigmoid MLP, softmax, SGD on mini-batches of 60, with and without BN:
    (a) test accuracy vs steps; (b, c) 15/50/85th percentiles of a last-layer sigmoid's
    input; (d) learning rates ×1, ×5, ×30 of the baseline's best (from a sweep), steps to
    the baseline's accuracy, saturated sigmoids; (e) inference with EMA / Algorithm 2
    population statistics vs training-mode statistics and the test batch size.
    """
    from .. import registry
    from ..output import short_environment
    from .data import DataError, check, load
    from .experiment import Config, run_all, single_threaded, total_units
    from .report import TABLES, write, write_plots
    from .report import markdown as report_markdown

    t_start = time.perf_counter()
    load_start = _load()
    try:
        info = registry.backend_info(backend)
        if info.kind != "kernel":
            raise ValueError(f"backend {backend!r} is a benchmark baseline; choose from "
                             f"{', '.join(registry.backend_names('kernel'))}")
        why = registry.unavailable_reason(backend)
        if why:
            raise ValueError(f"backend {backend!r} is not usable here: {why}")
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--backend") from None
    try:
        ds = load(data_dir)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    cfg = Config.quick_config() if quick else Config()
    cfg = replace(cfg, backend=backend, steps=steps or cfg.steps, seeds=seeds or cfg.seeds)
    try:
        check(ds, cfg.batch)
    except DataError as exc:
        raise click.ClickException(str(exc)) from None
    name = ds.name
    out_dir = Path(out) if out else Path("results") / "paper" / name
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise click.ClickException(f"cannot create --out {str(out_dir)!r}: "
                                   f"{exc.strerror or exc}") from None
    click.echo(ds.describe(), err=True)
    click.echo(f"{cfg.n_runs()} training runs of {cfg.steps} steps ({cfg.seeds} seeds; lr grid "
               f"{', '.join(f'{v:g}' for v in cfg.lr_grid)}; multipliers "
               f"{', '.join(f'x{m}' for m in cfg.multipliers)}), then inference on "
               f"{cfg.seeds} BN networks", err=True)
    with single_threaded(), click.progressbar(
            length=total_units(cfg), label="nbbn paper", file=sys.stderr, show_eta=True,
            show_pos=True) as bar:
        res = run_all(ds, cfg, progress=bar.update)
    env = short_environment()
    env.update({"data": name, "backend": backend, "dtype": cfg.dtype, "threads": 1})
    write(out_dir, res, env)
    figures, note = [], None
    if no_plots:
        note = "plots skipped: --no-plots"
    else:
        paths, note = write_plots(out_dir, res, name, Path(study_gap))
        figures = [p.name for p in paths]
    if note:
        click.echo(note, err=True)
    wall = time.perf_counter() - t_start
    meta = {"command": command_line(ctx), "data_name": name, "data": ds.describe(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "machine": f"{env['cpu']} ({env['cpus']} CPUs; 1 Numba and 1 BLAS thread)",
            "wall_s": wall, "load": f"{load_start} at the start, {_load()} at the end",
            "test_rows": len(ds.y_test), "study_gap": Path(study_gap),
            "env": {k: env[k] for k in ("nbbn_version", "numba_version", "numpy_version",
                                        "python_version", "cudasim")}}
    (out_dir / "report.md").write_text(report_markdown(meta, res, figures, note),
                                       encoding="utf-8")
    lt = res.lr_table.set_index(["net", "lr_mult"])
    click.echo(f"lr {res.lr_best:g}: final test accuracy BN "
               f"{lt.loc[('BN', 1), 'final_acc_mean']:.3f}, no BN "
               f"{lt.loc[('no BN', 1), 'final_acc_mean']:.3f}", err=True)
    click.echo(f"wrote {out_dir}/report.md, {len(TABLES)} tables"
               + (f", {len(figures)} figures" if figures else "") + f" in {wall:.0f} s", err=True)
