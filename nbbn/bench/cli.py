"""``nbbn bench`` and ``nbbn compare``: click commands that parse options and call the harness
(:func:`nbbn.bench.run.run`, :func:`nbbn.bench.compare.compare`)."""

from __future__ import annotations

import math
from pathlib import Path

import click

from .. import registry
from ..output import command_line, markdown_table
from ..spec import Fusion, Layout, Op
from ..validate import STORAGE_DTYPE_NAMES
from . import baselines  # noqa: F401  (registers the baselines: --backend choices include them)
from .compare import DEFAULT_MARGIN, DEFAULT_RUN_SD, METRICS
from .run import FULL, QUICK, HarnessError, RunRefused
from .sweep import (
    CACHES,
    CALLS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_SHAPES,
    NAMED_SWEEPS,
    PRESETS,
    QUICK_BATCH_SIZES,
    QUICK_SHAPES,
    backend_reason,
)

DEFAULT_OUT = "results/bench"


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses NaN and ±inf (``--max-time nan`` would disable the cap:
    every comparison with NaN is false)."""

    def convert(self, value, param, ctx):
        v = super().convert(value, param, ctx)
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return v


class OneLineCommand(click.Command):
    """A click command whose usage errors print as one line ``Error: ...`` (exit status 2)."""

    def parse_args(self, ctx, args):
        try:
            return super().parse_args(ctx, args)
        except click.UsageError as exc:
            raise _usage(exc.format_message()) from None


def _usage(message: str) -> click.ClickException:
    err = click.ClickException(" ".join(str(message).split()))
    err.exit_code = 2
    return err


class ListChoice(click.ParamType):
    """A comma-separated list (the option may also be repeated) of names from ``choices()``,
    which is read when the command runs, so backends registered late are accepted."""

    name = "list"

    def __init__(self, choices, what: str):
        self.choices = choices
        self.what = what

    def get_metavar(self, param, ctx=None):
        return "A,B,..."

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        names = [v.strip() for v in str(value).split(",") if v.strip()]
        allowed = list(self.choices())
        if not names:
            self.fail(f"empty {self.what} list", param, ctx)
        for n in names:
            if n not in allowed:
                self.fail(f"unknown {self.what} {n!r}; choose from {', '.join(allowed)}",
                          param, ctx)
        return tuple(names)


def _flatten(values) -> tuple | None:
    out = tuple(dict.fromkeys(v for group in values for v in group))
    return out or None


def _list_backends() -> None:
    click.echo("Backends (kind, device): status; variants (* = default)")
    for name in registry.backend_names():
        info = registry.backend_info(name)
        reason = backend_reason(name)  # the simulator is reported before anything loads
        variants = ""
        if reason is None:
            variants = "; variants " + ", ".join(
                v + ("*" if v == info.default_variant else "") for v in registry.variants(name))
        click.echo(f"  {name:<13} {info.kind:<8} {info.device:<5} "
                   f"{'ready' if reason is None else reason}{variants}")
    click.echo("Shape presets (C: NC; C,H,W: NCHW and NHWC):")
    for name, shapes in PRESETS.items():
        click.echo(f"  {name:<15} " + " ".join(",".join(map(str, s)) for s in shapes))
    click.echo("Named sweeps (--sweep):")
    for s in NAMED_SWEEPS.values():
        click.echo(f"  {s.name:<13} {len(s.points)} points: {s.description}")


_BACKEND_HELP = ", ".join(registry.backend_names())


def _register_against(ctx, param, value):
    """--against is eager: its cpu@NAME backends are registered before --backend is checked."""
    if not value:
        return ()
    from .against import AgainstError, register_all

    try:
        register_all(value)
    except AgainstError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None
    return tuple(value)


def _sizes(d):
    return f"NC {','.join(map(str, d['NC']))}, NCHW/NHWC {','.join(map(str, d['spatial']))}"


@click.command("bench", cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--sweep", "sweep", default=None,
              type=click.Choice(list(NAMED_SWEEPS)),
              help="A named target sweep with its own points and default axes: cpu-targets "
                   "(issue #9's shape set, cpu vs torch-cpu, --call api) or cuda-targets "
                   "(issue #11's, cuda vs torch-cuda, --variant all). Other options still win.")
@click.option("--op", "op", multiple=True, type=ListChoice(lambda: [o.value for o in Op], "op"),
              help="Ops, comma-separated: forward-train, backward, inference. [default: all]")
@click.option("--layout", multiple=True, type=ListChoice(lambda: [x.value for x in Layout],
                                                         "layout"),
              help="Memory layouts: NC (shapes C), NCHW and NHWC (shapes C,H,W; NHWC's x is "
                   "(N,H,W,C) with channel_axis=-1). Filters presets and bare shapes. "
                   "[default: all three]")
@click.option("--backend", multiple=True, type=ListChoice(registry.backend_names, "backend"),
              help=f"Kernel backends and baselines from the registry ({_BACKEND_HELP}). "
                   "Unavailable ones are reported as skipped, with the reason. [default: all]")
@click.option("--variant", default=None, metavar="default|all|NAME,...",
              help="Kernel variants: each backend's default, all it registers for the op and "
                   "layout, or these names (a backend with none of them runs its default). "
                   "[default: default]")
@click.option("--dtype", multiple=True,
              type=ListChoice(lambda: list(STORAGE_DTYPE_NAMES), "dtype"),
              help="dtypes of x: float32, float64, float16, bfloat16 (bfloat16 needs ml_dtypes). "
                   "Half dtypes are storage: per-channel inputs and outputs are float32 (as "
                   "PyTorch's mixed-precision batch norm), bytes and GB/s count 2 bytes per "
                   "element, the check uses the half tolerances; a backend that does not run a "
                   "dtype is skipped with the reason. [default: float32]")
@click.option("--fusion", multiple=True, type=ListChoice(lambda: [f.value for f in Fusion],
                                                         "fusion"),
              help="What follows the normalization: none, relu, add, add-relu (backward: none, "
                   "relu). [default: none]")
@click.option("--call", "call", multiple=True, type=ListChoice(lambda: CALLS, "call"),
              help="kernel: the registered kernel with preallocated outputs and arguments "
                   "validated once; api: the whole allocating public call "
                   "(nbbn.batch_norm_train(...); torch: allocating ATen ops). [default: kernel]")
@click.option("--cache", "cache", multiple=True, type=ListChoice(lambda: CACHES, "cache"),
              help="cold: every call on the next of enough buffer sets to exceed twice the "
                   "last-level cache, so each starts from DRAM; warm: the same buffers each "
                   "call. [default: cold]")
@click.option("--batch-sizes", "-N", default=None, metavar="N1,N2,...",
              help="Batch sizes N, e.g. 1,8,32,256. "
                   f"[default: {_sizes(DEFAULT_BATCH_SIZES)}; --quick: "
                   f"{_sizes(QUICK_BATCH_SIZES)}]")
@click.option("--shapes", "-s", multiple=True, metavar="SHAPES",
              help="Presets and custom shapes, separated by ';' or spaces, or repeat the option: "
                   f"presets {', '.join(PRESETS)}; custom LAYOUT:dims (NC:512, NCHW:64,56,56, "
                   "NHWC:256,14,14) or bare C (NC) / C,H,W (NCHW and NHWC). "
                   f"[default: {' '.join(DEFAULT_SHAPES)}; --quick: {' '.join(QUICK_SHAPES)}]")
@click.option("--baseline", default=None, metavar="NAME",
              help="The baseline each kernel's speed-up is taken over. [default: the first "
                   "baseline that ran at the point: torch-cpu / torch-cuda, else numpy]")
@click.option("--min-rounds", type=click.IntRange(1), default=None,
              help=f"Round-robin rounds taken at least. [default: {FULL.min_rounds}; --quick: "
                   f"{QUICK.min_rounds}]")
@click.option("--max-rounds", type=click.IntRange(1), default=None,
              help=f"Rounds taken at most. [default: {FULL.max_rounds}]")
@click.option("--max-time", type=FiniteFloat(0), default=None, metavar="SECONDS",
              help="Stop sampling a point after this wall time (once --min-rounds are in). "
                   f"[default: {FULL.max_time}; --quick: {QUICK.max_time}]")
@click.option("--ci", type=click.FloatRange(0, 1, min_open=True, max_open=True), default=None,
              help="Stop a point when every paired ratio's 95% interval has a half-width at "
                   f"most this fraction of it. [default: {FULL.ci_rel}]")
@click.option("--min-trials", type=click.IntRange(1), default=None,
              help="Independent trials per point at least (fresh buffer sets, new random "
                   f"call orders). [default: {FULL.min_trials}; --quick: {QUICK.min_trials}]")
@click.option("--max-trials", type=click.IntRange(1), default=None,
              help=f"Trials per point at most. [default: {FULL.max_trials}; --quick: "
                   f"{QUICK.max_trials}]")
@click.option("--trial-time", type=FiniteFloat(0), default=None, metavar="SECONDS",
              help="Sampling time of one trial (after --min-rounds). "
                   f"[default: {FULL.trial_time}; --quick: {QUICK.trial_time}]")
@click.option("--isolate", type=click.Choice(["workers", "none", "process"]), default=None,
              help="Where trials run. workers: in turn in --workers long-lived worker "
                   "processes, so each interval includes the variance between processes; none: "
                   "all in this process (intervals then miss that level); process: every "
                   "--sets-per-process trials in a fresh process (pyperf's way; a process "
                   "start per trial group). [default: workers; --quick: none]")
@click.option("--workers", type=click.IntRange(1), default=None,
              help=f"Worker processes with --isolate workers. [default: {FULL.workers}]")
@click.option("--budget", type=FiniteFloat(0), default=None, metavar="SECONDS",
              help="Wall-time budget of the whole run: each point's sampling (--max-time) "
                   "shrinks where the run's remaining time is short (--min-trials still run); "
                   "0: none. [default: 165 for the default sweep (no --sweep, --shapes, "
                   "--batch-sizes, --max-time or --quick), else none]")
@click.option("--sets-per-process", type=click.IntRange(1), default=1, show_default=True,
              help="Trials (buffer sets) per worker process with --isolate process.")
@click.option("--warmup", type=click.IntRange(0), default=None,
              help=f"Untimed rounds after the first (compiling, checked) call. "
                   f"[default: {FULL.warmup}]")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of the bootstrap intervals (the same samples give the same intervals).")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Threads for Numba's parallel kernels and PyTorch's CPU pool alike. "
                   "[default: Numba's default, the number of cores]")
@click.option("--quick", is_flag=True,
              help="Smoke run: tiny shapes, small batches, light timing. Explicit options win.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_OUT, show_default=True,
              help="Output folder: rows.jsonl and ratios.jsonl (written as points finish), "
                   "bench.csv/json, ratios.csv/json, summary.md, run.json, PNG plots.")
@click.option("--resume", is_flag=True,
              help="Keep the rows already in OUT and run only the points not done there. "
                   "Without it, OUT's results are replaced.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Write PNG plots (needs matplotlib).")
@click.option("--require-quiet", is_flag=True,
              help="Wait (at most --quiet-timeout) for a 1-minute load average below "
                   "--quiet-load before starting, else refuse to run.")
@click.option("--quiet-timeout", type=FiniteFloat(0), default=120.0, show_default=True,
              metavar="SECONDS", help="How long --require-quiet waits.")
@click.option("--quiet-load", type=FiniteFloat(0), default=0.5, show_default=True,
              help="The 1-minute load average --require-quiet waits for.")
@click.option("--against", multiple=True, metavar="[NAME=]PATH", is_eager=True,
              callback=_register_against, expose_value=True,
              help="A/B of two code versions in one run: load the CPU kernels of another "
                   "checkout (PATH holds an nbbn/ package, e.g. a git worktree of main) as the "
                   "backend cpu@NAME (NAME: PATH's basename unless given), timed in the same "
                   "rounds as cpu; then nbbn compare OUT --pair cpu@NAME=cpu. Repeatable.")
@click.option("--list", "list_only", is_flag=True,
              help="List backends (availability, variants), shape presets and named sweeps.")
@click.pass_context
def bench(ctx, sweep, op, layout, backend, variant, dtype, fusion, call, cache, batch_sizes,
          shapes, baseline, min_rounds, max_rounds, max_time, ci, min_trials, max_trials,
          trial_time, isolate, workers, budget, sets_per_process, warmup, seed, threads, quick,
          out, resume, plots, require_quiet, quiet_timeout, quiet_load, against, list_only):
    """Sweep, check, time and report kernels against the baselines and a copy.

    The configurations of a point (every backend and variant, and a copy of x) are checked
    against the float64 reference, then timed round-robin in one loop; speed-ups and
    time-over-copy are medians of per-round ratios with 95% bootstrap intervals. Rows are
    appended to OUT/rows.jsonl as points finish, so an interrupted run goes on with --resume.
    """
    if list_only:
        _list_backends()
        return
    from .run import run

    try:
        df = run(backends=_flatten(backend), ops=_flatten(op), layouts=_flatten(layout),
                 dtypes=_flatten(dtype), shapes=shapes or None, batch_sizes=batch_sizes,
                 sweep=sweep, variants=variant, fusions=_flatten(fusion), calls=_flatten(call),
                 caches=_flatten(cache), baseline=baseline, quick=quick, warmup=warmup,
                 min_rounds=min_rounds, max_rounds=max_rounds, max_time=max_time, ci=ci,
                 min_trials=min_trials, max_trials=max_trials, trial_time=trial_time,
                 isolate=isolate, workers=workers, sets_per_process=sets_per_process,
                 budget=budget,
                 seed=seed, threads=threads, out=out, resume=resume, plots=plots,
                 require_quiet=require_quiet, quiet_timeout=quiet_timeout,
                 quiet_load=quiet_load, echo=click.echo, command=command_line(ctx),
                 against=against or None)
    except RunRefused as exc:
        raise click.ClickException(str(exc)) from None
    except HarnessError as exc:
        raise _usage(str(exc)) from None
    except KeyboardInterrupt:
        click.echo("Interrupted: every finished point is kept in "
                   f"{out / 'rows.jsonl'}; add --resume to the same command to go on.", err=True)
        ctx.exit(130)
    status = df["status"].value_counts().to_dict() if len(df) else {}
    click.echo("Rows: " + ", ".join(f"{n} {s}" for s, n in status.items()))
    click.echo(f"Wrote {out}/ (summary.md, bench.csv, ratios.csv, run.json)")
    bad = status.get("failed", 0) + status.get("error", 0)
    if bad:
        click.echo(f"{bad} configuration(s) failed the correctness check or raised: see "
                   f"{out / 'summary.md'}", err=True)
        ctx.exit(1)


@click.command("compare", cls=OneLineCommand,
               context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("old", metavar="OLD|RUN", type=click.Path(path_type=Path))
@click.argument("new", required=False, type=click.Path(path_type=Path))
@click.option("--pair", "pairs", multiple=True, metavar="NEW=OLD",
              help="A/B in one run: label time(NEW)/time(OLD) at each point of RUN, both timed "
                   "in the same rounds, processes and buffer sets (its ratios.jsonl), e.g. "
                   "--pair cpu-slowed=cpu or --pair cpu@main=cpu. Each side is BACKEND or "
                   "BACKEND:VARIANT (without variants, each variant is paired with its "
                   "namesake). Repeatable.")
@click.option("--metric", type=click.Choice(METRICS), default="copy", show_default=True,
              help="Across runs: copy: time over the copy timed in the same loop; baseline: "
                   "time over the reference baseline's; time: the median time itself. (--pair "
                   "compares the paired time ratio.)")
@click.option("--margin", "--threshold", "margin", type=click.FloatRange(0, min_open=True),
              default=DEFAULT_MARGIN, show_default=True,
              help="Equivalence margin: changes within ±margin count as the same; faster and "
                   "slower need the change's whole interval beyond it.")
@click.option("--run-sd", type=FiniteFloat(0), default=None,
              help="Between-run sd of log(metric) that no run's trials see (the run level of "
                   "`nbbn report variance`), added to the change's interval: twice across runs "
                   f"(se² += 2·run_sd²), once with --pair (se² += run_sd²). [default: "
                   f"{DEFAULT_RUN_SD} across runs; 0 with --pair, whose sides share the run]")
@click.option("--rename", "rename", multiple=True, metavar="NEW=OLD",
              help="Across runs: compare NEW's backend NEW with OLD's backend OLD (--rename "
                   "cpu-slowed=cpu). One run per side cannot resolve 15% on a noisy host: "
                   "prefer --pair.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full comparison as CSV here.")
@click.option("--fail-on-slower", is_flag=True,
              help="Exit with status 1 if any is slower (by the same rule).")
@click.pass_context
def compare(ctx, old, new, pairs, metric, margin, run_sd, rename, csv_path, fail_on_slower):
    """Label each configuration faster, slower, same or ambiguous: of two bench results
    (nbbn compare OLD NEW), or of two backends timed in one run (nbbn compare RUN --pair
    NEW=OLD, the A/B design: the between-run variance cancels in the paired ratio).

    OLD, NEW and RUN are bench output folders (or their rows.jsonl / bench.csv / bench.json;
    RUN: its ratios.jsonl / ratios.csv). Across runs, with the metric's values a (OLD), b (NEW)
    and their 95% trial intervals, the change d = log(b/a) has the interval d ± 1.96·se,
    se² = se_a² + se_b² + 2·run_sd² (se from each interval's width). With --pair, d = log of the
    paired ratio time(NEW)/time(OLD) and se² = se_ratio² + run_sd² (run_sd 0 unless given).
    Either way: slower when that interval lies above log(1 + margin), faster when it lies below
    −log(1 + margin), same when it lies within ±log(1 + margin), ambiguous otherwise.
    """
    from click.core import ParameterSource

    from .compare import NotOurs, counts_line, load_results

    if pairs:
        if new is not None:
            raise _usage(f"--pair compares two backends of one run: nbbn compare RUN --pair "
                         f"NEW=OLD (got a second run, {new})")
        for opt in ("metric", "rename"):
            if ctx.get_parameter_source(opt) is ParameterSource.COMMANDLINE:
                raise _usage(f"--{opt} compares two runs; --pair compares the paired time "
                             "ratio of one run: drop one of them")
        table = _compare_in_run(old, pairs, margin, 0.0 if run_sd is None else run_sd)
        what = ", ".join(pairs)
        click.echo(f"in-run pairs {what}: change = time(NEW)/time(OLD), paired in the same "
                   f"rounds, with its 95% interval (run_sd {0.0 if run_sd is None else run_sd:g})")
        cols = ["backend", "variant", "vs_backend", "vs_variant", "op", "layout", "fusion",
                "call", "cache", "dtype", "N", "C", "H", "W", "change", "change_lo",
                "change_hi", "label"]
        old_name, new_name = str(old), str(old)
    else:
        if new is None:
            raise _usage("missing NEW: nbbn compare OLD NEW (two runs), or nbbn compare RUN "
                         "--pair NEW=OLD (two backends of one run)")
        try:
            a, b = load_results(old), load_results(new)
        except NotOurs as exc:
            raise click.ClickException(str(exc)) from None
        mapping = {}
        for item in rename:
            new_name, sep, old_name = item.partition("=")
            if not sep or not new_name or not old_name:
                raise _usage(f"bad --rename {item!r}: use NEW=OLD, e.g. cpu-slowed=cpu")
            mapping[new_name] = old_name
        from .compare import compare as compare_frames

        table = compare_frames(a, b, metric, margin,
                               DEFAULT_RUN_SD if run_sd is None else run_sd, mapping)
        click.echo(f"metric: {metric} (time-like; change = new/old with its interval)")
        cols = ["backend", "variant", "op", "layout", "fusion", "call", "cache", "dtype",
                "N", "C", "H", "W", "value_old", "value_new", "change", "change_lo",
                "change_hi", "label"]
        old_name, new_name = str(old), str(new)
    shown = table.loc[~table["label"].isin(["not timed"]), cols]
    click.echo(markdown_table(shown, ".4g", index=False))
    click.echo("\n" + counts_line(table))
    if csv_path is not None:
        try:
            table.to_csv(csv_path, index=False)
        except OSError as exc:
            raise click.ClickException(f"cannot write {csv_path}: {exc.strerror or exc}") \
                from None
    if fail_on_slower:
        if not table["label"].isin(["same", "faster", "slower", "ambiguous"]).any():
            where = f"{old_name} and {new_name} have" if old_name != new_name \
                else f"{old_name} has"
            raise click.ClickException(
                f"--fail-on-slower: {where} no timed configuration in common "
                f"({counts_line(table)}); nothing was compared")
        if (table["label"] == "slower").any():
            ctx.exit(1)


def _compare_in_run(run, pairs, margin, run_sd):
    """The in-run table of every --pair (``nbbn.bench.compare.compare_in_run``); one-line
    errors: exit 1 for a file that is not a run, 2 for a bad pair."""
    import pandas as pd

    from .compare import NotOurs, PairError, compare_in_run, load_ratios, load_results, parse_pair

    try:
        ratios = load_ratios(run)
    except NotOurs as exc:
        raise click.ClickException(str(exc)) from None
    try:
        rows = load_results(run)
    except NotOurs:  # a bare ratio file: no statuses for the points not timed together
        rows = None
    tables = []
    for item in pairs:
        try:
            new, old = parse_pair(item)
            tables.append(compare_in_run(ratios, new, old, margin, run_sd, rows))
        except PairError as exc:
            raise _usage(str(exc)) from None
    return pd.concat(tables, ignore_index=True)


@click.group("report", context_settings={"help_option_names": ["-h", "--help"]})
def report():
    """Reports made from finished bench runs (no timing): targets, fusion, the README headline,
    the variance study and the A/A coverage."""


@report.command("targets", cls=OneLineCommand)
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", default="results/cpu-kernels.md", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="The Markdown report.")
@click.option("--notes", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A Markdown file appended as ## Notes.")
@click.option("--per-call", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Output folder of a warm run of the (8, 16) calls, e.g. nbbn bench --backend "
                   "cpu,torch-cpu --call api --cache warm -s NC:16 -N 8 --min-rounds 2000 "
                   "--threads 2.")
def report_targets(run_dir, out, notes, per_call):
    """The CPU targets report (results/cpu-kernels.md) from a ``--sweep cpu-targets`` run."""
    from ..output import write_text
    from .targets import load_run, markdown

    try:
        df, meta = load_run(run_dir)
        pc = load_run(per_call) if per_call else None
        text = notes.read_text(encoding="utf-8") if notes else None
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    write_text(out, markdown(df, meta, text, pc))
    click.echo(f"wrote {out}")


@report.command("fusion", cls=OneLineCommand)
@click.argument("run_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The Markdown report.")
@click.option("--notes", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="A Markdown file appended as ## Notes.")
def report_fusion(run_dir, out, notes):
    """The fused-op report (fused/plain and speed-ups) from a ``--fusion`` bench run."""
    from ..output import write_text
    from .fusion import markdown

    try:
        text = markdown(run_dir, notes.read_text(encoding="utf-8") if notes else None)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    write_text(out, text)
    click.echo(f"wrote {out}")


@report.command("readme", cls=OneLineCommand)
@click.option("--readme", default="README.md", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--check", is_flag=True, help="Exit 1 if the headline block is out of date.")
def report_readme(readme, check):
    """Rewrite README's generated headline block from the committed results."""
    from ..output import write_text
    from .readme import rewrite

    try:
        text = readme.read_text(encoding="utf-8")
        new = rewrite(text, readme.parent)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    if check:
        if new != text:
            raise click.ClickException(f"{readme}: the headline block is out of date (run nbbn "
                                       "report readme)")
        return
    write_text(readme, new)
    click.echo(f"rewrote the headline block of {readme}")


@report.command("variance", cls=OneLineCommand)
@click.argument("run_dirs", nargs=-1, required=True,
                type=click.Path(file_okay=False, path_type=Path))
@click.option("--ratio", default="cpu/torch-cpu", show_default=True,
              help="KERNEL/BASELINE: the paired time ratio whose variance is split.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for variance.csv, variance-summary.csv and variance.md.")
def report_variance(run_dirs, ratio, out):
    """Variance components (run > process > trial > round) of a ratio from runs made with
    trials (their samples.jsonl); prints the between-run sd for nbbn compare --run-sd."""
    from ..output import write_text
    from .variance import components, log_ratios, markdown, run_sd, summary

    try:
        z = log_ratios(run_dirs, ratio)
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None
    comp = components(z)
    summ = summary(comp)
    out.mkdir(parents=True, exist_ok=True)
    comp.to_csv(out / "variance.csv", index=False)
    summ.to_csv(out / "variance-summary.csv", index=False)
    write_text(out / "variance.md", markdown(list(map(str, run_dirs)), ratio, comp, summ))
    click.echo(markdown_table(summ, ".3g", index=False))
    click.echo(f"run_sd {run_sd(summ):.4f}")
    click.echo(f"wrote {out}/variance.md, variance.csv, variance-summary.csv")


@report.command("coverage", cls=OneLineCommand)
@click.argument("run1", type=click.Path(path_type=Path))
@click.argument("run2", type=click.Path(path_type=Path))
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Per point: both speed-ups, run 1's interval, inside or not.")
def report_coverage(run1, run2, csv_path):
    """A/A check: the share of points whose speed-up in RUN2 lies inside RUN1's 95% interval
    (and what correct intervals would give), the share whose two intervals agree (target 95%),
    and RUN1's median half-width."""
    from .compare import NotOurs
    from .variance import coverage

    try:
        table, summ = coverage(run1, run2)
    except NotOurs as exc:
        raise click.ClickException(str(exc)) from None
    if csv_path is not None:
        table.to_csv(csv_path, index=False)
    click.echo(f"coverage {summ['inside']}/{summ['points']} = {summ['coverage']:.1%} "
               f"(expected {summ['expected_coverage']:.1%} if the intervals are right); runs "
               f"agree {summ['agree']}/{summ['points']} = {summ['agreement']:.1%} (expected "
               f"95%); median half-width {summ['median_half_width_pct']:.2f}%; sd of the "
               f"change {summ['sd_change_pct']:.2f}%")
