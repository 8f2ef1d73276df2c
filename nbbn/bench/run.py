"""The Python entry point of ``nbbn bench``: :func:`run` plans, checks, times and reports a sweep
and returns its tidy rows as a DataFrame (usable from a notebook; the click command only parses
options and calls it).
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

import pandas as pd

from .. import output, registry
from ..spec import Fusion, Layout, Op
from ..validate import STORAGE_DTYPE_NAMES
from . import baselines  # noqa: F401  (registers the baselines)
from .devices import TimingConfig
from .report import RATIOS_FILE, ROWS_FILE, RUN_FILE, tidy, tidy_ratios, write_report
from .runner import SCHEMA, Runner
from .sweep import (
    CACHES,
    CALLS,
    DEFAULT_BATCH_SIZES,
    DEFAULT_SHAPES,
    KEY_COLUMNS,
    NAMED_SWEEPS,
    QUICK_BATCH_SIZES,
    QUICK_SHAPES,
    Sweep,
    SweepError,
    backend_reason,
    check_variants,
    config_key,
    make_plan,
    parse_int_list,
    parse_shapes,
    points_from,
)

#: Timing of a full run and of --quick (explicit options win over both).
#: A full run spreads each point's trials over 4 worker processes: on this project's 2-core
#: host the process carried more of the variance than the trial within it
#: (results/reliability/variance), so intervals built in one process did not hold from one run
#: to the next. --quick stays in-process (its intervals cover the trials of one process only;
#: its rows say processes = 1).
FULL = TimingConfig(isolate="workers", workers=4)
QUICK = TimingConfig(warmup=1, min_rounds=3, max_time=0.05, ci_rel=0.05, bootstrap=300,
                     min_trials=3, max_trials=3, trial_time=0.01, isolate="none")
#: Per-point costs of the run-time estimate (seconds): data and reference, each
#: configuration's check, a worker process's start (imports, JIT cache loads), a worker's
#: set-up of a point (data, first calls).
EST_POINT_S, EST_CONFIG_S, EST_PROCESS_S, EST_WORKER_POINT_S = 0.15, 0.1, 2.5, 0.1
#: The default sweep's wall-time budget (s): it promises <= 3 minutes on 2 cores with a warm
#: JIT cache, and a run's set-up costs vary by more than the estimate's margin (189 s once
#: against an estimate of 176 s: results/reliability). With 170 s, run() took 173.6 s and the
#: command 176 s (round 6), so 165 s leaves a margin. --budget 0 turns the budget off.
DEFAULT_BUDGET_S = 165.0
SAMPLES_FILE = "samples.jsonl"
ISOLATE = ("workers", "none", "process")


def estimate_seconds(plan, timing: TimingConfig) -> float:
    """Upper estimate of a run's wall time from the plan and the timing: per point that runs,
    its sampling budget (``max_time`` plus one more trial and the warm-ups) and its set-up
    (:data:`EST_POINT_S`, :data:`EST_CONFIG_S` per configuration, :data:`EST_PROCESS_S` per
    worker process with ``--isolate process``; with ``--isolate workers`` their starts once and
    :data:`EST_WORKER_POINT_S` per worker and point)."""
    total = 0.0
    if timing.isolate == "workers":
        total += EST_PROCESS_S * timing.workers
    for g in plan.groups:
        if not g.run:
            continue
        per_trial = max(timing.trial_time, 0.0) * (1 + timing.warmup)
        sampling = max(timing.max_time, timing.min_trials * per_trial) + per_trial
        total += EST_POINT_S + EST_CONFIG_S * len(g.run) + sampling
        if timing.isolate == "process":
            procs = -(-timing.max_trials // max(1, timing.sets_per_process))
            total += EST_PROCESS_S * procs
        elif timing.isolate == "workers":
            total += EST_WORKER_POINT_S * min(timing.workers, timing.max_trials)
    return total


class RunBudget:
    """Shares a run's wall-time budget among its points: before each point, its sampling budget
    is what the run has left, less the set-up the remaining points will need, divided among
    them, and never more than ``max_time``. The set-up of a point (data, checks, workers'
    buffers: everything but sampling) is the mean measured so far, and the estimate's
    per-point constants until one is measured. Sampling still takes ``min_trials`` trials, so
    a budget too small for the plan overruns by those, and says so."""

    #: Seconds kept for the reports after the last point (tables, plots).
    REPORT_S = 5.0

    def __init__(self, seconds: float, timing: TimingConfig, groups, start: float):
        self.deadline = start + seconds - self.REPORT_S
        self.timing = timing
        workers = min(timing.workers, timing.max_trials) if timing.isolate == "workers" else 0
        self.setup_est = {id(g): EST_POINT_S + EST_CONFIG_S * len(g.run)
                          + EST_WORKER_POINT_S * workers for g in groups if g.run}
        self.extra: list[float] = []  # measured set-up over the estimate, per point

    def point_budget(self, group, now: float) -> float:
        """``group``'s sampling budget at time ``now`` (``group`` is among those left)."""
        n = len(self.setup_est)  # the points left, this one included
        bias = sum(self.extra) / len(self.extra) if self.extra else 0.0
        setup = sum(self.setup_est.values()) + bias * n
        share = (self.deadline - now - setup) / max(1, n)
        return float(min(self.timing.max_time, max(0.0, share)))

    def done(self, group, wall_s: float, sampling_s: float) -> None:
        est = self.setup_est.pop(id(group), None)
        if est is not None:
            self.extra.append(max(0.0, wall_s - sampling_s) - est)


class HarnessError(ValueError):
    """Bad input; the message is one line (the CLI prints it as such, exit status 2)."""


class RunRefused(HarnessError):
    """Good input, but the run cannot go ahead here: output folder not writable, a resume file
    that is not ours, a host that is not quiet (exit status 1)."""


def run_budget(budget: float | None, *, quick: bool, sweep, shapes, batch_sizes,
               max_time) -> float | None:
    """The run's wall-time budget in seconds, or None: ``budget`` as given (0: none), else
    :data:`DEFAULT_BUDGET_S` for the default sweep -- no ``sweep``, ``shapes``,
    ``batch_sizes`` or ``max_time`` given, not ``quick`` -- whose 3-minute promise it keeps,
    and none for a sweep the user shaped (its per-point settings are theirs)."""
    if budget is None:
        default = not quick and sweep is None and shapes is None and batch_sizes is None \
            and max_time is None
        return DEFAULT_BUDGET_S if default else None
    try:
        value = float(budget)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise HarnessError(f"--budget must be a finite number of seconds >= 0, got {budget}")
    return value or None


def _names(value, what: str, allowed: Iterable[str] | None = None) -> tuple[str, ...] | None:
    """None, "a,b", or a sequence of names -> a tuple (order kept, duplicates dropped)."""
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    names = tuple(dict.fromkeys(s.strip() for s in items if str(s).strip()))
    if not names:
        raise HarnessError(f"empty {what} list")
    if allowed is not None:
        allowed = list(allowed)
        for n in names:
            if n not in allowed:
                raise HarnessError(f"unknown {what} {n!r}; choose from {', '.join(allowed)}")
    return names


def _variants(value) -> str | tuple[str, ...]:
    if value is None:
        return "default"
    if isinstance(value, str) and value.strip() in ("default", "all"):
        return value.strip()
    names = _names(value, "variant")
    if len(names) == 1 and names[0] in ("default", "all"):
        return names[0]
    return names


def _set_threads(n: int) -> Callable[[], None]:
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


def _check_out(out: Path) -> None:
    """The output folder exists (created if needed) and is writable, or a one-line error."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".nbbn-write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise RunRefused(
            f"cannot write to output folder {str(out)!r}: {exc.strerror or exc}") from None


def _row_key(row: dict):
    try:
        return config_key(*(row[c] for c in KEY_COLUMNS))
    except (KeyError, TypeError, ValueError):
        return None


def _previous(rows_path: Path) -> tuple[set, dict]:
    done: set = set()
    skips: dict = {}
    try:
        old = output.read_rows(rows_path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RunRefused(f"cannot resume from {rows_path}: {exc}") from None
    for r in old:
        key = _row_key(r)
        if key is None or r.get("schema") != SCHEMA:
            raise RunRefused(f"cannot resume: {rows_path} holds rows that are not "
                               f"{SCHEMA} bench rows")
        if r.get("status") in ("ok", "failed"):
            done.add(key)
        elif r.get("status") == "skipped":
            skips[key] = r.get("skip_reason")
    return done, skips


def _busy_warning(load: float | None) -> str | None:
    """A warning when other work already loads the host: parallel kernels then wait for a core
    at every fork-join, and their times say more about the machine than the kernel."""
    if load is not None and load >= 0.5:
        return (f"Warning: the host is not quiet (1-minute load {load:.2f}); the paired ratios "
                "hold up better than the times, but see load_avg_1m (--require-quiet waits).")
    return None


def make_sweep(*, backends=None, ops=None, layouts=None, dtypes=None, shapes=None,
               batch_sizes=None, sweep: str | None = None, variants=None, fusions=None,
               calls=None, caches=None, quick: bool = False) -> Sweep:
    """The :class:`~nbbn.bench.sweep.Sweep` that :func:`run` takes these arguments to (the
    same defaults); HarnessError on bad input. The pytest-benchmark suite plans from it too."""
    try:
        layouts_t = tuple(Layout(x) for x in (_names(layouts, "layout", [x.value for x in Layout])
                                              or [x.value for x in Layout]))
        named = None
        if sweep is not None:
            if sweep not in NAMED_SWEEPS:
                raise HarnessError(f"unknown sweep {sweep!r}; choose from "
                                   f"{', '.join(NAMED_SWEEPS)}")
            if shapes or batch_sizes:
                raise HarnessError(f"--sweep {sweep} fixes its shapes and batch sizes: drop "
                                   "--shapes and --batch-sizes")
            named = NAMED_SWEEPS[sweep]
        d = named.defaults if named else {}
        # --quick leaves out the peers (ONNX Runtime, JAX): their imports and per-shape
        # compilation cost more than the whole smoke run's timing; name them to include them.
        skip = baselines.opt_in() | (baselines.peer_names() if quick else frozenset())
        backends_t = _names(backends, "backend", registry.backend_names()) \
            or d.get("backends") or tuple(b for b in registry.backend_names() if b not in skip)
        ops_t = tuple(Op(o) for o in (_names(ops, "op", [o.value for o in Op])
                                      or [o.value for o in Op]))
        dtypes_t = _names(dtypes, "dtype", STORAGE_DTYPE_NAMES) or d.get("dtypes") \
            or ("float32",)
        fusions_t = tuple(Fusion(f) for f in (_names(fusions, "fusion", [f.value for f in Fusion])
                                              or ("none",)))
        calls_t = _names(calls, "call", CALLS) or d.get("calls") or ("kernel",)
        caches_t = _names(caches, "cache", CACHES) or d.get("caches") or ("cold",)
        variants_v = _variants(variants) if variants is not None else d.get("variants",
                                                                            "default")
        if named:
            points = tuple(p for p in named.points if p.layout in layouts_t)
            if not points:
                raise HarnessError(f"--sweep {sweep} has no points in the layouts "
                                   f"{', '.join(map(str, layouts_t))}")
        else:
            shape_items = shapes if shapes else (QUICK_SHAPES if quick else DEFAULT_SHAPES)
            if isinstance(shape_items, str):
                shape_items = (shape_items,)
            bs = None
            if batch_sizes is not None:
                bs = parse_int_list(batch_sizes if isinstance(batch_sizes, str)
                                    else ",".join(map(str, batch_sizes)))
            points = points_from(parse_shapes(shape_items, layouts_t), bs,
                                 QUICK_BATCH_SIZES if quick else DEFAULT_BATCH_SIZES)
        the_sweep = Sweep(backends=backends_t, points=points, ops=ops_t, dtypes=dtypes_t,
                          fusions=fusions_t, calls=calls_t, caches=caches_t,
                          variants=variants_v)
    except SweepError as exc:
        raise HarnessError(str(exc)) from None
    return the_sweep


def run(*, backends=None, ops=None, layouts=None, dtypes=None, shapes=None, batch_sizes=None,
        sweep: str | None = None, variants=None, fusions=None, calls=None, caches=None,
        baseline: str | None = None, quick: bool = False, warmup: int | None = None,
        min_rounds: int | None = None, max_rounds: int | None = None,
        max_time: float | None = None, ci: float | None = None, bootstrap: int | None = None,
        min_trials: int | None = None, max_trials: int | None = None,
        trial_time: float | None = None, isolate: str | None = None,
        sets_per_process: int = 1, workers: int | None = None, budget: float | None = None,
        seed: int = 0, threads: int | None = None, out=None, resume: bool = False,
        plots: bool = True, require_quiet: bool = False, quiet_timeout: float = 120.0,
        quiet_load: float = 0.5, allow_simulator: bool = False, progress: bool | None = None,
        echo: Callable[[str], None] | None = None, command: str | None = None,
        against=None) -> pd.DataFrame:
    """Plan, check, time and report a sweep; return its tidy rows (one per configuration).

    Lists may be given as sequences or comma-separated strings. ``sweep`` names a target sweep
    (:data:`nbbn.bench.sweep.NAMED_SWEEPS`: ``cpu-targets``, ``cuda-targets``) whose points
    and default axes are used (``shapes``/``batch_sizes`` may then not be given); otherwise
    ``shapes`` (presets and LAYOUT:dims, :func:`~nbbn.bench.sweep.parse_shapes`) ×
    ``batch_sizes``. ``variants``: "default", "all" or names. ``calls``: kernel and/or api;
    ``caches``: cold and/or warm. Timing options override :data:`FULL` (or :data:`QUICK` with
    ``quick``). With ``out`` the rows are logged and the reports written there; ``resume`` runs
    only the points not already done in ``out``. ``require_quiet`` waits up to
    ``quiet_timeout`` seconds for a 1-minute load below ``quiet_load``, else raises
    :class:`HarnessError`. ``budget``: the run's wall-time budget in seconds
    (:class:`RunBudget`; 0: none); by default :data:`DEFAULT_BUDGET_S` for the default sweep
    (no ``sweep``, ``shapes``, ``batch_sizes`` or ``max_time`` given, not ``quick``) and none
    otherwise.
    ``allow_simulator`` times CUDA backends under the simulator (tests).
    ``against``: ``[NAME=]PATH`` items (a string or a sequence), each another checkout whose
    CPU kernels become the backend ``cpu@NAME`` (:mod:`.against`), timed with the others.

    The returned DataFrame carries ``attrs["ratios"]`` (every pair's paired speed-up, tidy),
    ``attrs["meta"]`` (command, loads before and after, timing). Bad input raises
    :class:`HarnessError` with a one-line message; KeyboardInterrupt is re-raised after the
    finished rows and the reports are written.
    """
    echo = echo or (lambda s: print(s, file=sys.stderr))
    started = time.monotonic()
    budget = run_budget(budget, quick=quick, sweep=sweep, shapes=shapes,
                        batch_sizes=batch_sizes, max_time=max_time)
    if against:
        from .against import AgainstError, register_all

        try:
            register_all([against] if isinstance(against, str) else against)
        except AgainstError as exc:
            raise HarnessError(str(exc)) from None
    the_sweep = make_sweep(backends=backends, ops=ops, layouts=layouts, dtypes=dtypes,
                           shapes=shapes, batch_sizes=batch_sizes, sweep=sweep,
                           variants=variants, fusions=fusions, calls=calls, caches=caches,
                           quick=quick)
    if baseline is not None and baseline.split(":")[0] not in registry.backend_names("baseline"):
        raise HarnessError(f"unknown baseline {baseline!r}; choose from "
                           f"{', '.join(registry.backend_names('baseline'))}")
    base = QUICK if quick else FULL
    timing = TimingConfig(
        warmup=base.warmup if warmup is None else int(warmup),
        min_rounds=base.min_rounds if min_rounds is None else int(min_rounds),
        max_rounds=base.max_rounds if max_rounds is None else int(max_rounds),
        max_time=base.max_time if max_time is None else float(max_time),
        ci_rel=base.ci_rel if ci is None else float(ci),
        bootstrap=base.bootstrap if bootstrap is None else int(bootstrap),
        min_trials=base.min_trials if min_trials is None else int(min_trials),
        max_trials=base.max_trials if max_trials is None else int(max_trials),
        trial_time=base.trial_time if trial_time is None else float(trial_time),
        isolate=base.isolate if isolate is None else str(isolate),
        sets_per_process=int(sets_per_process),
        workers=base.workers if workers is None else int(workers), seed=int(seed))
    vals = (timing.max_time, timing.ci_rel, timing.trial_time)
    if not all(isinstance(v, float) and math.isfinite(v) for v in vals):
        raise HarnessError("bad timing: max_time, ci and trial_time must be finite numbers")
    if timing.min_rounds < 1 or timing.max_rounds < timing.min_rounds or timing.max_time < 0 \
            or not 0 < timing.ci_rel < 1 or timing.warmup < 0 or timing.min_trials < 1 \
            or timing.max_trials < timing.min_trials or timing.trial_time < 0 \
            or timing.sets_per_process < 1 or timing.workers < 1:
        raise HarnessError("bad timing: need min_rounds >= 1, max_rounds >= min_rounds, "
                           "max_time >= 0, 0 < ci < 1, warmup >= 0, min_trials >= 1, "
                           "max_trials >= min_trials, trial_time >= 0, sets_per_process >= 1, "
                           "workers >= 1")
    if timing.isolate not in ISOLATE:
        raise HarnessError(f"unknown isolate {timing.isolate!r}; choose from "
                           f"{', '.join(ISOLATE)}")
    if threads is not None:
        import numba

        if threads < 1 or threads > numba.config.NUMBA_NUM_THREADS:
            raise HarnessError(
                f"--threads {threads} is more than Numba's {numba.config.NUMBA_NUM_THREADS} "
                "(set NUMBA_NUM_THREADS to raise the limit)" if threads >= 1
                else f"--threads must be >= 1, got {threads}")
    try:  # unknown variants are bad input: refused before anything is written
        check_variants(the_sweep.variants, the_sweep.backends,
                       {b: backend_reason(b, allow_simulator) for b in the_sweep.backends})
    except SweepError as exc:
        raise HarnessError(str(exc)) from None
    out = Path(out) if out is not None else None
    command = command or f"nbbn.bench.run(sweep={sweep!r}, quick={quick})"

    quiet_wait = 0.0
    if require_quiet:
        quiet, load = output.wait_for_quiet(quiet_load, quiet_timeout, echo=echo)
        if not quiet:
            raise RunRefused(f"host not quiet: 1-minute load {load:.2f} >= {quiet_load:g} "
                               f"after waiting {quiet_timeout:g} s (--quiet-timeout); stop other "
                               "work or drop --require-quiet")
        # The budget and wall_s count the run, not the wait for a quiet host.
        quiet_wait = time.monotonic() - started
        started = time.monotonic()
    done, skips = set(), {}
    if out is not None:
        _check_out(out)
        if resume and (out / ROWS_FILE).exists():
            done, skips = _previous(out / ROWS_FILE)
    try:
        plan = make_plan(the_sweep, frozenset(done), skips, allow_simulator)
    except SweepError as exc:
        raise HarnessError(str(exc)) from None
    if not plan.groups:
        raise HarnessError("the sweep has no valid configuration (backward takes no residual; "
                           "nbbn-unfused runs only fused configurations)")

    restore = _set_threads(threads) if threads is not None else (lambda: None)
    load_before = output.load_average()
    other_cpu = output.OtherCpu()
    other_cpu.start()
    env = output.environment()
    run_id = uuid.uuid4().hex[:12]
    n_points = len({g.point for g in plan.groups})
    n_run = len({g.point for g in plan.groups if g.run})
    echo(f"{plan.total} configurations in {n_points} points: {len(plan.run)} to run "
         f"({n_run} points), {len(plan.skipped)} skipped"
         + (f", {len(plan.done)} already done (--resume)" if resume else ""))
    for reason, n in plan.skip_counts().items():
        echo(f"  skipped {n:>4}: {reason}")
    echo(f"Timing: {timing.min_trials}-{timing.max_trials} trials per point (fresh buffer sets"
         + (f", a fresh process per {timing.sets_per_process} trial(s)"
            if timing.isolate == "process" else "")
         + (f", taken in turn by {timing.workers} worker processes"
            if timing.isolate == "workers" else ", all in this process"
            if timing.isolate == "none" else "")
         + f"), each >= {timing.min_rounds} rounds and {timing.trial_time:g} s after "
         f"{timing.warmup} warm-up round(s); trials added until every ratio's 95% interval is "
         f"within ±{100 * timing.ci_rel:g}% or {timing.max_time:g} s per point; cache "
         f"{', '.join(the_sweep.caches)}; call {', '.join(the_sweep.calls)}"
         + (f"; writing to {out}/" if out is not None else ""))
    est = estimate_seconds(plan, timing)
    echo(f"Estimated run time: about {est:.0f} s ({est / 60:.1f} min) at most for the "
         "sampling and checks (compilation not included; a warm JIT cache loads in seconds)")
    if budget is not None:
        echo(f"Budget: {budget:g} s for the whole run (--budget): each point samples for at "
             f"most {timing.max_time:g} s, less where the run's remaining time is short "
             "(rows: sampling_budget_s)")
    busy = _busy_warning(load_before)
    if busy:
        echo(busy)

    rows: list[dict] = []
    ratios: list[dict] = []
    logs = []
    if out is not None:
        logs = [output.RowLog(out / ROWS_FILE, resume=resume),
                output.RowLog(out / RATIOS_FILE, resume=resume),
                output.RowLog(out / SAMPLES_FILE, resume=resume)]

    def emit(row):
        rows.append(row)
        if logs:
            logs[0].write(row)

    def emit_sample(rec):
        if logs:
            logs[2].write(rec)

    def emit_ratio(rec):
        ratios.append(rec)
        if logs:
            logs[1].write(rec)

    runner = Runner(timing, emit, emit_ratio, env, run_id, load_before, baseline, emit_sample)
    show = sys.stderr.isatty() if progress is None else progress
    interrupted = False
    meta = {"command": command, "run_id": run_id, "schema": SCHEMA,
            "load_before_1m": load_before, "timing": dataclasses.asdict(timing), "sweep": sweep,
            "quiet_required": require_quiet, "quiet_wait_s": round(quiet_wait, 1),
            "estimated_s": est, "budget_s": budget}
    try:
        if timing.isolate == "workers" and plan.run:
            from . import worker

            counts = worker.threads()
            if threads is not None:  # PyTorch's pool too, even if torch is not loaded here yet
                counts = (counts[0], int(threads))
            from .against import registered

            runner.pool = worker.WorkerPool(min(timing.workers, timing.max_trials), counts,
                                            registered())
        shares = RunBudget(budget, timing, plan.groups, started) if budget else None

        def run_group(group):
            t0 = time.monotonic()
            if shares is not None and group.run:
                runner.point_max_time = shares.point_budget(group, t0)
            runner.last_sampling_s = 0.0
            runner.run_group(group)
            if shares is not None and group.run:
                shares.done(group, time.monotonic() - t0, runner.last_sampling_s)

        if show:
            import click

            with click.progressbar(length=len(plan.run), label="bench", show_eta=True,
                                   show_pos=True, file=sys.stderr,
                                   item_show_func=lambda _: None) as bar:
                for group in plan.groups:
                    run_group(group)
                    bar.update(len(group.run))
        else:
            for group in plan.groups:
                run_group(group)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        if runner.pool is not None:
            runner.pool.close()
        for log in logs:
            log.close()
        restore()
        meta.update(other_cpu.stop())  # after the pool's workers were waited for
        meta["load_after_1m"] = output.load_average()
        meta["wall_s"] = round(time.monotonic() - started, 1)
        meta["interrupted"] = interrupted
        if out is not None:
            files, message, df, rdf = write_report(out, command, meta, make_plots=plots)
            meta["files"] = [str(f) for f in files]
            output.write_text(out / RUN_FILE, json.dumps(
                {k: output.plain(v) if not isinstance(v, dict | list) else v
                 for k, v in meta.items()}, indent=1, default=str) + "\n")
            if message:
                echo(message)
        else:
            df, rdf = tidy(rows), tidy_ratios(ratios)
    if interrupted:
        raise KeyboardInterrupt
    df.attrs["ratios"] = rdf
    df.attrs["meta"] = meta
    return df
