"""``nbbn accuracy``: the accuracy study's command line."""

from __future__ import annotations

import os
import shlex
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import pandas as pd

from .common import StudyError, environment, parse_distributions, parse_sizes

PARTS = {"a": "rounding", "b": "sampling", "c": "estimators", "d": "distributed"}
_ALIASES = {**PARTS, **{v: v for v in PARTS.values()}}


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
    """Comma-separated parts: a/rounding, b/sampling, c/estimators, d/distributed (None: all)."""
    if text is None:
        return list(PARTS.values())
    names = [t.strip().lower() for t in text.split(",") if t.strip()]
    if not names:
        raise StudyError("--parts is empty; choose from a/rounding, b/sampling, c/estimators, "
                         "d/distributed")
    for n in names:
        if n not in _ALIASES:
            raise StudyError(f"unknown part {n!r}; choose from a/rounding, b/sampling, "
                             "c/estimators, d/distributed")
    chosen = {_ALIASES[n] for n in names}
    return [p for p in PARTS.values() if p in chosen]


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


def _command_line(ctx: click.Context) -> str:
    words = ["nbbn", "accuracy"]
    for param in ctx.command.params:
        if not isinstance(param, click.Option) or param.name is None:
            continue
        src = ctx.get_parameter_source(param.name)
        if src is None or src.name == "DEFAULT":
            continue
        value = ctx.params[param.name]
        if param.is_flag:
            if value:
                words.append(param.opts[-1])
        else:
            words += [param.opts[-1], shlex.quote(str(value))]
    return " ".join(words)


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
              help="Small grids (m up to 2^20+1 in part a, fewer batches and streams): ~30 s.")
@click.option("--out", "out", default="results/accuracy", show_default=True, metavar="DIR",
              help="Folder for the tables (CSV, JSON), report.md and the PNG figures.")
@click.option("--parts", default=None, metavar="LIST",
              help="Comma-separated parts to run: a/rounding, b/sampling, c/estimators, "
                   "d/distributed [default: all].")
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
@click.pass_context
def accuracy(ctx, quick, out, parts, distributions, sizes, seed, activations, no_plots):
    """How accurate are batch-estimated statistics?

    \b
    (a) rounding: naive E[x²]−E[x]², two-pass (plain, corrected), Welford (integer and
        float count), Chan, and each nbbn backend's statistics, in float32 and float64,
        κ = |mean|/std in {0, 1, 1e2, 1e3, 1e4}, m from 2 to 2^25, against a
        double-double reference;
    (b) sampling: RMSE of batch mean and variance against the population, beside theory;
    (c) estimators: EMA (momentum 0.01, 0.1, 0.5), Algorithm 2, biased average; bias and
        RMSE vs batches and m; the train–inference gap;
    (d) distributed: per-rank vs synchronized statistics (nbbn.distributed), count-weighted
        merge vs equal-weight pmean, (mean, invstd) vs (count, mean, M2) exchange.
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

    meta = {"command": _command_line(ctx), **environment(seed_value),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    env = environment(seed_value)
    tables: dict[str, pd.DataFrame] = {}
    skipped: list[dict] = []
    timings = {}
    t_start = time.perf_counter()

    def save(name: str, df: pd.DataFrame) -> None:
        df = df.assign(**env) if len(df) else df
        tables[name] = df
        from .report import write_table

        write_table(df, out_dir, name)

    if "rounding" in part_list:
        from .rounding import QUICK_SIZES, RoundingConfig, crossover, run_rounding, usable_backends

        t0 = time.perf_counter()
        cfg = RoundingConfig(sizes=size_list or (QUICK_SIZES if quick else
                                                 RoundingConfig().sizes), seed=seed_value)
        backends, sk = usable_backends()
        skipped += sk
        click.echo("(a) statistics backends: " + (", ".join(b.name for b in backends) or "none")
                   + "".join(f"; skipped {s['item']}: {s['reason']}" for s in sk), err=True)
        with _Progress("(a) rounding", cfg.n_configs(), "m × κ × dtype") as step:
            df, sk = run_rounding(cfg, step, backends=backends)
        skipped += sk
        save("rounding", df)
        save("rounding_crossover", crossover(df))
        timings["a"] = time.perf_counter() - t0

    if "sampling" in part_list:
        from .sampling import QUICK_BATCHES, QUICK_SIZES, SamplingConfig, run_sampling

        t0 = time.perf_counter()
        cfg = SamplingConfig(distributions=dists, activations=acts, seed=seed_value)
        if quick:
            cfg.sizes, cfg.batches = list(QUICK_SIZES), QUICK_BATCHES
        if size_list:
            cfg.sizes = size_list
        todo, _ = cfg.plan()
        with _Progress("(b) sampling", len(todo), "population × m") as step:
            df, sk = run_sampling(cfg, step)
        skipped += sk
        save("sampling", df)
        timings["b"] = time.perf_counter() - t0

    if "estimators" in part_list:
        from .estimators import EstimatorConfig, run_estimators

        t0 = time.perf_counter()
        cfg = (EstimatorConfig.quick if quick else EstimatorConfig)(distributions=dists,
                                                                    seed=seed_value)
        if size_list:
            cfg.sizes = cfg.gap_sizes = size_list
        todo, _ = cfg.plan()
        with _Progress("(c) estimators", len(todo),
                       f"population × m; {cfg.streams} streams × {cfg.batches} batches") as step:
            est, gap, sk = run_estimators(cfg, step)
        skipped += sk
        save("estimators", est)
        save("gap", gap)
        timings["c"] = time.perf_counter() - t0

    if "distributed" in part_list:
        from .distributed import DistributedConfig, run_part, write_outputs

        t0 = time.perf_counter()
        cfg = (DistributedConfig.quick if quick else DistributedConfig)(seed=seed_value)
        with _Progress("(d) distributed", cfg.n_configs(), "ranks × m, counts, σ²") as step:
            part_tables = run_part(cfg, step)
        for name, df in part_tables.items():
            save(name, df)
        timings["d"] = time.perf_counter() - t0
        write_outputs(out_dir, {**meta, "wall_s": timings["d"]}, part_tables, not no_plots)

    skipped_df = pd.DataFrame(skipped, columns=["part", "item", "reason"])
    from .report import write_table

    write_table(skipped_df, out_dir, "skipped")
    figures, note = [], None
    if no_plots:
        note = "plots skipped: --no-plots"
    else:
        from .report import write_plots

        paths, note = write_plots(out_dir, tables)
        figures = [p.name for p in paths]
    if note:
        click.echo(note, err=True)
    meta["wall_s"] = time.perf_counter() - t_start
    meta["timings"] = ", ".join(f"part {k} {v:.0f} s" for k, v in timings.items())
    from .summary import markdown

    (out_dir / "report.md").write_text(markdown(meta, tables, skipped_df, figures, note),
                                       encoding="utf-8")
    click.echo(f"wrote {out_dir}/report.md and {len(tables) + 1} tables"
               + (f", {len(figures)} figures" if figures else "")
               + f" in {meta['wall_s']:.0f} s", err=True)
