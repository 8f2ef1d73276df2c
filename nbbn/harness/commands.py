"""``nbbn bench`` and ``nbbn compare``: click commands over the harness."""

from __future__ import annotations

import json
import os
import shlex
import sys
from pathlib import Path

import click

from .. import registry
from ..spec import FLOAT_DTYPES, Layout, Op
from . import baselines  # noqa: F401  (registers the baselines: --backend choices include them)
from .devices import TimingConfig
from .sweep import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_SHAPES,
    PRESETS,
    QUICK_BATCH_SIZES,
    QUICK_SHAPES,
    Sweep,
    SweepError,
    backend_reason,
    make_plan,
    parse_int_list,
    parse_shapes,
)

DEFAULT_OUT = "results/bench"
FULL = TimingConfig()
QUICK = TimingConfig(warmup=1, min_repeats=5, min_time=0.0, max_time=0.05)


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


def _flatten(values) -> tuple:
    return tuple(dict.fromkeys(v for group in values for v in group))


def _dtype_names():
    return [d.name for d in FLOAT_DTYPES]


def _check_out(out: Path) -> None:
    """The output folder exists (created if needed) and is writable, or a one-line error."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".nbbn-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise click.ClickException(
            f"cannot write to output folder {str(out)!r}: {exc.strerror or exc}") from None


def _command_line(params: dict) -> str:
    """The command that reproduces this run (non-default options only)."""
    parts = ["nbbn", "bench"]
    for name in ("op", "layout", "backend", "dtype"):
        if params[name]:
            parts += [f"--{name}", ",".join(_flatten(params[name]))]
    if params["batch_sizes"]:
        parts += ["--batch-sizes", params["batch_sizes"]]
    for s in params["shapes"]:
        parts += ["--shapes", s]
    for name in ("warmup", "min_repeats", "min_time", "max_time"):
        if params[name] is not None:
            parts += [f"--{name.replace('_', '-')}", str(params[name])]
    if params["threads"] is not None:
        parts += ["--threads", str(params["threads"])]
    if params["quick"]:
        parts.append("--quick")
    if not params["plots"]:
        parts.append("--no-plots")
    parts += ["--out", str(params["out"])]
    return shlex.join(parts)


def _set_threads(n: int):
    """Numba's and torch's thread counts set to n; returns a function that restores them."""
    import numba

    torch = sys.modules.get("torch")
    before = numba.get_num_threads(), torch.get_num_threads() if torch is not None else None
    numba.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)

    def restore() -> None:
        numba.set_num_threads(before[0])
        if torch is not None:
            torch.set_num_threads(before[1])

    return restore


def _busy_warning() -> str | None:
    """A warning when other work already loads the host's cores: parallel kernels then wait for
    a core at every fork-join, and their times say more about the machine than the kernel."""
    try:
        load, cpus = os.getloadavg()[0], os.cpu_count() or 1
    except (AttributeError, OSError):
        return None
    if load > 0.5 * cpus:
        return (f"Warning: the host is busy (1-minute load {load:.1f} on {cpus} CPUs); times of "
                "multi-threaded kernels will include waits for a free core (see load_avg_1m).")
    return None


def _list_backends() -> None:
    click.echo("Backends (kind, device): status")
    for name in registry.backend_names():
        info = registry.backend_info(name)
        reason = backend_reason(name)
        click.echo(f"  {name:<12} {info.kind:<8} {info.device:<5} "
                   f"{'ready' if reason is None else reason}")
    click.echo("Shape presets:")
    for name, shapes in PRESETS.items():
        click.echo(f"  {name:<15} " + " ".join(",".join(map(str, s)) for s in shapes))


_BACKEND_HELP = ", ".join(registry.backend_names())


@click.command("bench", context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--op", "op", multiple=True, type=ListChoice(lambda: [o.value for o in Op], "op"),
              help="Ops to time, comma-separated: forward-train, backward, inference. "
                   "[default: all]")
@click.option("--layout", multiple=True,
              type=ListChoice(lambda: ["NC", "NCHW"], "layout"),
              help="Layouts: NC (shapes given as C) and/or NCHW (shapes given as C,H,W). "
                   "[default: both]")
@click.option("--backend", multiple=True, type=ListChoice(registry.backend_names, "backend"),
              help=f"Kernel backends and baselines from the registry ({_BACKEND_HELP}). "
                   "Unavailable ones are reported as skipped, with the reason. [default: all]")
@click.option("--dtype", multiple=True, type=ListChoice(_dtype_names, "dtype"),
              help="float32 and/or float64. [default: float32]")
@click.option("--batch-sizes", "-N", default=None, metavar="N1,N2,...",
              help="Batch sizes N, e.g. 1,2,8,32,128,256. "
                   f"[default: {','.join(map(str, DEFAULT_BATCH_SIZES))}; "
                   f"--quick: {','.join(map(str, QUICK_BATCH_SIZES))}]")
@click.option("--shapes", "-s", multiple=True, metavar="SHAPES",
              help="Shape presets and custom shapes, separated by ';' or spaces, or repeat the "
                   f"option: presets {', '.join(PRESETS)}; custom C (NC) or C,H,W (NCHW). "
                   f"[default: {' '.join(DEFAULT_SHAPES)}; --quick: {' '.join(QUICK_SHAPES)}]")
@click.option("--warmup", type=click.IntRange(0), default=None,
              help=f"Untimed calls after the first (compiling) call. [default: {FULL.warmup}]")
@click.option("--min-repeats", type=click.IntRange(1), default=None,
              help=f"Samples taken at least. [default: {FULL.min_repeats}]")
@click.option("--min-time", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help=f"Sum of sample times reached at least. [default: {FULL.min_time}]")
@click.option("--max-time", type=click.FloatRange(0), default=None, metavar="SECONDS",
              help="Stop sampling a configuration after this wall time (>= 3 samples). "
                   f"[default: {FULL.max_time}]")
@click.option("--threads", type=click.IntRange(1), default=None,
              help="Threads for Numba's parallel kernels and PyTorch's CPU pool alike. "
                   "[default: Numba's default, the number of cores]")
@click.option("--quick", is_flag=True,
              help="Smoke run: the tiny shape preset, N = 2,8, and light timing "
                   f"(warmup {QUICK.warmup}, {QUICK.min_repeats} samples). Explicit options "
                   "still win.")
@click.option("--out", "-o", type=click.Path(file_okay=False, path_type=Path),
              default=DEFAULT_OUT, show_default=True,
              help="Output folder: rows.jsonl (written row by row), bench.csv, bench.json, "
                   "summary.md and PNG plots.")
@click.option("--resume", is_flag=True,
              help="Keep the rows already in OUT/rows.jsonl and run only the configurations "
                   "missing there (or that raised). Without it, OUT's results are replaced.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Write PNG plots (needs matplotlib).")
@click.option("--list", "list_only", is_flag=True,
              help="List backends with their availability and the shape presets, then exit.")
@click.pass_context
def bench(ctx, op, layout, backend, dtype, batch_sizes, shapes, warmup, min_repeats, min_time,
          max_time, threads, quick, out, resume, plots, list_only):
    """Sweep, check, time and report every kernel against the baselines and a copy.

    Every configuration of op × layout × backend × dtype × batch size × shape is checked against
    the float64 reference first (a failure is reported and not timed), then timed into
    preallocated outputs. Invalid combinations are skipped with their reason. Rows are appended
    to OUT/rows.jsonl as they finish, so an interrupted run can go on with --resume.
    """
    if list_only:
        _list_backends()
        return
    from ..report import read_rows
    from .report import ROWS_FILE, write_report
    from .runner import SCHEMA, Runner, run_plan

    try:
        sweep = Sweep(
            backends=_flatten(backend) or tuple(registry.backend_names()),
            ops=tuple(Op(o) for o in _flatten(op)) or tuple(Op),
            layouts=tuple(Layout(x) for x in _flatten(layout)) or (Layout.NC, Layout.NCHW),
            dtypes=_flatten(dtype) or ("float32",),
            batch_sizes=parse_int_list(batch_sizes) if batch_sizes is not None
            else (QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES),
            shapes=parse_shapes(shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES)),
        )
    except SweepError as exc:
        raise click.UsageError(str(exc), ctx) from None
    base = QUICK if quick else FULL
    timing = TimingConfig(
        warmup=base.warmup if warmup is None else warmup,
        min_repeats=base.min_repeats if min_repeats is None else min_repeats,
        min_time=base.min_time if min_time is None else min_time,
        max_time=base.max_time if max_time is None else max_time,
    )
    if threads is not None:
        import numba

        if threads > numba.config.NUMBA_NUM_THREADS:
            raise click.UsageError(
                f"--threads {threads} is more than Numba's {numba.config.NUMBA_NUM_THREADS} "
                "(set NUMBA_NUM_THREADS to raise the limit)", ctx)
    _check_out(out)
    command = _command_line(ctx.params)
    rows_path = out / ROWS_FILE

    done: set = set()
    previous_skips: dict = {}
    if resume and rows_path.exists():
        try:
            old = read_rows(rows_path)
        except (ValueError, UnicodeDecodeError) as exc:
            raise click.ClickException(f"cannot resume from {rows_path}: {exc}") from None
        for r in old:
            key = _key(r)
            if key is None or r.get("schema") != SCHEMA:
                raise click.ClickException(
                    f"cannot resume: {rows_path} holds rows that are not nbbn bench rows")
            if r.get("status") in ("ok", "failed"):
                done.add(key)
            elif r.get("status") == "skipped":
                previous_skips[key] = r.get("skip_reason")
    plan = make_plan(sweep, frozenset(done), previous_skips)  # loads the backends
    restore = _set_threads(threads) if threads is not None else (lambda: None)

    click.echo(f"{plan.total} configurations: {len(plan.run)} to run, {len(plan.skipped)} "
               f"skipped" + (f", {len(plan.done)} already done (--resume)" if resume else ""))
    for reason, n in plan.skip_counts().items():
        click.echo(f"  skipped {n:>4}: {reason}")
    click.echo(f"Timing: warm-up {timing.warmup}, >= {timing.min_repeats} samples and "
               f">= {timing.min_time:g} s each (at most {timing.max_time:g} s); writing to {out}/")

    busy = _busy_warning()
    if busy:
        click.echo(busy, err=True)

    from ..report import RowLog

    log = RowLog(rows_path, resume=resume)
    runner = Runner(timing, log.write)
    interrupted = False
    try:
        with click.progressbar(length=len(plan.run), label="bench", show_eta=True,
                               show_pos=True, file=sys.stderr,
                               item_show_func=lambda _: None) as bar:
            run_plan(plan, runner, bar)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        log.close()
        restore()

    files, message = write_report(out, command, make_plots=plots)
    (out / "run.json").write_text(json.dumps({"command": command, "run_id": runner.run_id,
                                              "interrupted": interrupted}, indent=1) + "\n")
    if message:
        click.echo(message)
    rows = read_rows(rows_path)
    status = {}
    for r in rows:
        status[r.get("status")] = status.get(r.get("status"), 0) + 1
    click.echo("Rows: " + ", ".join(f"{n} {s}" for s, n in status.items()))
    click.echo("Wrote " + ", ".join(str(f) for f in files))
    if interrupted:
        click.echo("Interrupted: every finished row is kept in "
                   f"{rows_path}; add --resume to the same command to go on.", err=True)
        ctx.exit(130)
    bad = status.get("failed", 0) + status.get("error", 0)
    if bad:
        click.echo(f"{bad} configuration(s) failed the correctness check or raised: see "
                   f"{out / 'summary.md'}", err=True)
        ctx.exit(1)


def _key(row: dict):
    from .sweep import KEY_COLUMNS, config_key

    try:
        return config_key(*(row[c] for c in KEY_COLUMNS))
    except (KeyError, TypeError, ValueError):
        return None


@click.command("compare", context_settings={"help_option_names": ["-h", "--help"]})
@click.argument("old", type=click.Path(path_type=Path))
@click.argument("new", type=click.Path(path_type=Path))
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the full comparison as CSV here.")
@click.option("--fail-on-slower", is_flag=True, help="Exit with status 1 if any is slower.")
@click.pass_context
def compare(ctx, old, new, csv_path, fail_on_slower):
    """Label each configuration of two bench results faster, slower or same.

    OLD and NEW are bench output folders or their rows.jsonl / bench.csv / bench.json. A
    configuration is "same" when the p20–p80 intervals of its times overlap; otherwise faster or
    slower. ratio = old median ÷ new median (> 1: NEW is faster).
    """
    from ..report import markdown_table
    from .compare import NotOurs, load_results
    from .compare import compare as compare_frames

    try:
        a, b = load_results(old), load_results(new)
    except NotOurs as exc:
        raise click.ClickException(str(exc)) from None
    table = compare_frames(a, b)
    shown = table.loc[table["label"] != "not timed",
                      ["backend", "op", "layout", "dtype", "N", "C", "H", "W",
                       "time_ms_p50_old", "time_ms_p50_new", "ratio", "label"]]
    click.echo(markdown_table(shown, ".4g", index=False))
    counts = table["label"].value_counts()
    order = ["faster", "slower", "same"]
    labels = order + [lb for lb in counts.index if lb not in order]
    click.echo("\n" + ", ".join(f"{counts.get(lb, 0)} {lb}" for lb in labels))
    if csv_path is not None:
        try:
            table.to_csv(csv_path, index=False)
        except OSError as exc:
            raise click.ClickException(f"cannot write {csv_path}: {exc.strerror or exc}") \
                from None
    if fail_on_slower and counts.get("slower", 0):
        ctx.exit(1)
