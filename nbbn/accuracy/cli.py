"""``nbbn accuracy``: the accuracy study's command line."""

from __future__ import annotations

import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import pandas as pd

from ..output import command_line
from . import parts as _parts
from .common import RunContext, StudyError, environment, parse_distributions, parse_sizes


class _OneLineError(click.ClickException):
    """Printed as one line ``Error: …``; exit status 2 (as click's usage errors)."""

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class _Command(click.Command):
    """A click command whose usage errors (bad option values, unknown options) print one line."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _OneLineError(exc.format_message()) from None


def parse_parts(text: str | None) -> list[str]:
    """Comma-separated parts, by letter or name (None: every part); returns names in the
    report's order (:data:`nbbn.accuracy.parts.PARTS`)."""
    registered = _parts.PARTS
    if text is None:
        return [p.NAME for p in registered]
    aliases = {k: p.NAME for p in registered for k in (p.LETTER, p.NAME)}
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise StudyError(f"--parts is empty; choose from {_parts.choices()}")
    for n in names:
        if n not in aliases:
            raise StudyError(f"unknown part {n!r}; choose from {_parts.choices()}")
    chosen = {aliases[n] for n in names}
    return [p.NAME for p in registered if p.NAME in chosen]


def _writable_dir(out: str) -> Path:
    p = Path(out)
    if p.exists() and not p.is_dir():
        raise StudyError(f"--out {out!r} exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".nbbn-write-test-{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as exc:
        raise StudyError(f"cannot write to --out {out!r}: {exc.strerror or exc}") from None
    return p


class _Progress:
    """A click progress bar on stderr for one part, after saying how many configurations."""

    def __init__(self, title: str, n: int, what: str):
        click.echo(f"{title}: {n} configurations ({what})", err=True)
        self._bar = click.progressbar(length=n, label=title, file=sys.stderr,
                                      show_eta=True, show_pos=True)

    def __enter__(self):
        self._bar.__enter__()
        return self._bar.update

    def __exit__(self, *exc):
        self._bar.__exit__(*exc)


@click.command("accuracy", cls=_Command, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--quick", is_flag=True,
              help="Small grids (m up to 2^20+1 in part a, 2^16 in part e, fewer batches and "
                   "streams): a minute or two.")
@click.option("--out", "out", default="results/accuracy", show_default=True, metavar="DIR",
              help="Folder for the tables (CSV, JSON), report.md and the PNG figures.")
@click.option("--parts", default=None, metavar="LIST",
              help=f"Comma-separated parts to run, by letter or name: {_parts.choices()} "
                   "[default: all].")
@click.option("--distributions", default=None, metavar="LIST",
              help="Populations for parts b and c: normal, uniform, t5, lognormal "
                   "[default: all].")
@click.option("--sizes", default=None, metavar="LIST",
              help="Batch sizes m for every part run, e.g. 2,64,4096,2^24+1 (2 ≤ m ≤ 2^26) "
                   "[default: each part's grid].")
@click.option("--seed", default="0", show_default=True, metavar="INT",
              help="Seed; each configuration gets its own SeedSequence child, so results do not "
                   "depend on which parts or sizes run.")
@click.option("--activations", default=None, metavar="PATH.npy",
              help="A .npy array of real activations, 1-D, (N, C), (N, C, L) or (N, C, H, W), "
                   "studied in part b with its own moments as the population.")
@click.option("--no-plots", is_flag=True, help="Do not draw the PNG figures.")
@click.option("--no-peers", is_flag=True,
              help="Leave out the peer implementations (PyTorch, Flax/XLA, NumPy, CuPy) in "
                   "parts a and e; they run by default where installed.")
@click.pass_context
def accuracy(ctx, quick, out, parts, distributions, sizes, seed, activations, no_plots,
             no_peers):
    """How accurate are batch-estimated statistics?

    \b
    (a) rounding: naive E[x²]−E[x]², two-pass (plain, corrected), Welford (integer and
        float count), Chan, each nbbn backend, and the peers people run (PyTorch
        F.batch_norm, Flax BatchNorm with fast and two-pass variance, NumPy; PyTorch CUDA
        and CuPy on a GPU): mean, var, invstd and y in float32 and float64,
        κ = |mean|/std in {0, 1, 1e2, 1e3, 1e4}, m from 2 to 2^25, against a
        double-double reference;
    (b) sampling: RMSE of batch mean and variance against the population, beside theory;
    (c) estimators: EMA (momentum 0.01, 0.1, 0.5), Algorithm 2, biased average; bias and
        RMSE vs batches and m; the train–inference gap;
    (d) distributed: per-rank vs synchronized statistics (nbbn.distributed), count-weighted
        merge vs equal-weight pmean, (mean, invstd) vs (count, mean, M2) exchange;
    (e) gradients: dx, dγ, dβ of nbbn, old nbbn (emulated), PyTorch autograd and Flax
        jax.vjp against a double-double reference, over κ and m, dy ~ N(0, 1).
    """
    try:
        part_list = parse_parts(parts)
        dists = parse_distributions(distributions)
        size_list = parse_sizes(sizes)
        try:
            seed_value = int(seed)
        except ValueError:
            raise StudyError(f"--seed must be a non-negative integer, got {seed!r}") from None
        if seed_value < 0:
            raise StudyError(f"--seed must be a non-negative integer, got {seed!r}")
        acts = None
        if activations is not None:
            from .sampling import load_activations

            acts = load_activations(activations)
        out_dir = _writable_dir(out)
    except StudyError as exc:
        raise _OneLineError(str(exc)) from None
    if acts is not None and "sampling" not in part_list:
        click.echo("note: --activations feeds part b (sampling), which is not selected", err=True)

    meta = {"command": command_line(ctx), **environment(seed_value),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    env = environment(seed_value)
    tables: dict[str, pd.DataFrame] = {}
    skipped: list[dict] = []
    timings = {}
    t_start = time.perf_counter()
    from .report import write_table

    def save(name: str, df: pd.DataFrame) -> None:
        df = df.assign(**env) if len(df) else df
        tables[name] = df
        write_table(df, out_dir, name)

    run_ctx = RunContext(
        quick=quick, sizes=size_list, seed=seed_value, distributions=dists, activations=acts,
        peers=not no_peers, save=save, skip=skipped.extend, progress=_Progress,
        echo=lambda text: click.echo(text, err=True), meta=meta, out=out_dir,
        plots=not no_plots)
    chosen = [p for p in _parts.PARTS if p.NAME in part_list]
    for part in chosen:
        t0 = time.perf_counter()
        part.run(run_ctx)
        timings[part.LETTER] = time.perf_counter() - t0

    skipped_df = pd.DataFrame(skipped, columns=["part", "item", "reason"])
    write_table(skipped_df, out_dir, "skipped")
    figures, note = [], None
    if no_plots:
        note = "plots skipped: --no-plots"
    else:
        from ..output import pyplot

        plt, note = pyplot()
        if plt is not None:  # each part draws its own figures (part d: with distributed.md)
            paths = [p for part in chosen for p in part.plots(tables, out_dir)]
            figures = [p.name for p in paths if p is not None]
    if note:
        click.echo(note, err=True)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["timings"] = ", ".join(f"part {k} {v:.0f} s" for k, v in timings.items())
    from .summary import markdown

    (out_dir / "report.md").write_text(markdown(meta, tables, skipped_df, figures, note, chosen),
                                       encoding="utf-8")
    click.echo(f"wrote {out_dir}/report.md and {len(tables) + 1} tables"
               + (f", {len(figures)} figures" if figures else "")
               + f" in {meta['wall_s']:.0f} s", err=True)
