"""Check, then time every configuration of a point together, then one tidy row per
configuration (and one ratio record per pair).

For each point (:class:`~nbbn.bench.sweep.PointPlan`: the configurations of one point on one
device):

1. the point's inputs and float64 reference are built (:func:`~nbbn.bench.cases.point_data`,
   once per point, shared by its call and cache modes) and put in K buffer sets (cold: enough to
   exceed twice the last-level cache; warm: one);
2. each configuration's first call runs alone: its wall time is ``compile_s`` (JIT compilation
   or cache load, plus one run) and its outputs are compared with the reference; a kernel
   outside tolerance is ``failed`` and not timed, one that raises is ``error``; a baseline
   outside nbbn's tolerance but within :data:`BASELINE_SLACK` of it is timed with a note
   (``passed`` False: its accuracy is its own);
3. the passing configurations and a copy of x's bytes are timed **round-robin in one loop**:
   every round calls each of them once, in a fresh random order (seeded; not a rotation A B C,
   B C A, ..., where each callable keeps its neighbour: :meth:`Runner._sample`), each call
   on the next buffer set; ``warmup`` untimed rounds first;
4. rounds are added in growing batches until every paired ratio (each configuration over the
   copy; each kernel over each baseline) has a 95% interval of half-width <= ``ci_rel`` of
   itself, or ``max_time`` has passed, after at least ``min_rounds`` (:mod:`.stats`);
5. rows: the configuration's own times, its ratio to the copy and its speed-up over the point's
   reference baseline, each with its interval; every other pair goes to the ratio records.

Row ``status``: ``ok`` (checked and timed), ``failed`` (outside tolerance, not timed),
``error`` (raised; the message is in ``error``), ``skipped`` (``skip_reason``).
"""

from __future__ import annotations

import datetime as _dt
import time
import traceback
from collections.abc import Callable

import numpy as np

from .. import output, registry, validate
from ..seeds import rng_for
from ..spec import Op
from . import devices, roofline, stats
from .cases import BufferSets, buffer_sets, copy_case, make_case, point_data
from .sweep import Config, PointPlan

SCHEMA = "nbbn-bench/2"
#: A baseline (PyTorch, NumPy) within this factor of nbbn's tolerance is timed anyway, with a
#: note: its accuracy is its own (PyTorch's channels-last float32 statistics, for one, drift past
#: 1e-5 at m ~ 1e5). Beyond it the baseline is set up wrong, and fails like a kernel.
BASELINE_SLACK = 100.0

#: Every column of a bench row, in order. Units are in the names; see the README's harness
#: section (and :data:`COLUMN_DOCS`) for each one's meaning.
COLUMNS = (
    "schema", "run_id", "timestamp",
    "backend", "variant", "kind", "device", "op", "layout", "fusion", "call", "cache", "dtype",
    "N", "C", "H", "W", "shape", "x_shape", "m", "tag",
    "status", "skip_reason", "error", "passed", "rel_err", "worst_output", "tolerance", "errors",
    "notes",
    "compile_s", "timer", "trials", "processes", "rounds", "converged", "sampling_budget_s",
    "ci_halfwidth_pct_max",
    "between_process_sd_pct", "between_trial_sd_pct", "within_trial_sd_pct",
    "time_ms_p50", "time_ms_ci_lo", "time_ms_ci_hi", "time_ms_p20", "time_ms_p80", "time_ms_min",
    "noise_pct",
    "copy_ms_p50", "time_over_copy", "time_over_copy_ci_lo", "time_over_copy_ci_hi",
    "baseline", "speedup", "speedup_ci_lo", "speedup_ci_hi",
    "limit_copy",
    "bytes", "bytes_2pass", "read_bytes", "write_bytes", "x_bytes", "gbps", "gbps_2pass",
    "copy_gbps", "read_gbps", "limit", "limit_ms", "limit_gbps", "pct_of_limit",
    "pct_of_limit_ci_lo", "pct_of_limit_ci_hi",
    "buffer_sets", "working_set_bytes", "llc_bytes",
    "load_before_1m", "load_avg_1m",
    "nbbn_version", "numba_version", "numpy_version", "torch_version", "python_version",
    "threads", "torch_threads", "cpu", "cpu_count", "platform", "cache_l1d_bytes",
    "cache_l2_bytes", "cache_l3_bytes", "cudasim", "output_pool", "device_name",
)

COLUMN_DOCS = {
    "schema": "row format: nbbn-bench/2",
    "run_id": "one id per nbbn bench run",
    "timestamp": "UTC time the row was written",
    "backend": "registry backend (kernel or baseline)",
    "variant": "registered variant of the backend's kernel (its default unless --variant)",
    "kind": "kernel (nbbn) or baseline",
    "device": "cpu or cuda: where the arrays live and which timer ran",
    "op": "forward-train, backward or inference",
    "layout": "memory layout: NC, NCHW or NHWC (x is (N,H,W,C), channel_axis=-1)",
    "fusion": "none, relu, add or add-relu (what follows the normalization in the same call)",
    "call": "kernel: registered kernel, preallocated outputs, arguments validated once; "
            "api: the whole allocating public call",
    "cache": "cold: calls rotate through buffer sets >= 2x the last-level cache; warm: the "
             "same buffers every call",
    "dtype": "dtype of x",
    "N": "batch size", "C": "channels", "H": "height (1 for NC)", "W": "width (1 for NC)",
    "shape": "C or CxHxW", "x_shape": "the array passed (NHWC: NxHxWxC)",
    "m": "values per channel: N·H·W",
    "tag": "point marked for reports (tiny: a per-call cost, >= 2000 rounds)",
    "status": "ok, failed (outside tolerance, not timed), error (raised), skipped",
    "skip_reason": "why a configuration was skipped",
    "error": "the exception of an error row",
    "passed": "all outputs within tolerance of the float64 reference (a baseline a little "
              "outside is timed anyway, with a note)",
    "rel_err": "worst output's ‖out − ref‖/‖ref‖", "worst_output": "that output's name",
    "tolerance": "that output's bound", "errors": "rel_err of every output",
    "notes": "remarks (outputs not returned in place, blocking kernel expired, working set "
             "below 2x LLC)",
    "compile_s": "wall time of the first call alone: JIT compile or cache load plus one run",
    "timer": "perf_counter_ns (host), cuda-events-blocking (GPU time, launch gaps excluded), "
             "cuda-events (--call api: gaps included), wall-simulator",
    "trials": "independent trials (fresh buffer sets, new random call orders; with --isolate "
              "process a fresh worker process per --sets-per-process trials)",
    "processes": "worker processes the trials ran in (1: the bench's own)",
    "rounds": "round-robin rounds timed over all trials (one call of each configuration and "
              "each limit callable per round)",
    "between_process_sd_pct": "sd over worker processes of their mean trial median of "
                              "log(speed-up) (else log time/copy), ×100 (≈ %); empty with one "
                              "process",
    "between_trial_sd_pct": "sd of the trial medians of log(speed-up) (else log time/copy), "
                            "×100 (≈ %)",
    "within_trial_sd_pct": "pooled robust sd (1.4826·MAD) of the per-round log ratio within a "
                           "trial, ×100 (≈ %)",
    "converged": "every ratio of the point reached the --ci target before its sampling budget",
    "sampling_budget_s": "the point's sampling budget (s): --max-time, or less where the run's "
                         "--budget left less (run.py, RunBudget); --min-trials run regardless",
    "ci_halfwidth_pct_max": "widest half-width of this row's ratio intervals, % of the ratio",
    "time_ms_p50": "time of one call (ms): geometric mean over trials of the trial medians",
    "time_ms_ci_lo": "its 95% trial interval (two-level bootstrap, stats.py)",
    "time_ms_ci_hi": "",
    "time_ms_p20": "20th percentile (ms)", "time_ms_p80": "80th percentile (ms)",
    "time_ms_min": "fastest call (ms)",
    "noise_pct": "100·(p80 − p20)/p50",
    "copy_ms_p50": "time of the fastest copy of x timed in the same loop (ms)",
    "limit_copy": "which copy was fastest (copy:numpy, copy:numba, copy:torch; limits.py)",
    "time_over_copy": "time over that copy's time (paired per round, over trials)",
    "time_over_copy_ci_lo": "its 95% trial interval", "time_over_copy_ci_hi": "",
    "baseline": "the point's reference baseline (backend:variant)",
    "speedup": "baseline time/this time (paired per round; geometric mean of the trial "
               "medians; > 1: this is faster)",
    "speedup_ci_lo": "its 95% trial interval (two-level bootstrap)", "speedup_ci_hi": "",
    "bytes": "minimal bytes model (roofline.py)", "bytes_2pass": "two-pass bytes model",
    "x_bytes": "bytes of x",
    "gbps": "bytes / time_ms_p50, GB/s", "gbps_2pass": "bytes_2pass / time_ms_p50, GB/s",
    "read_bytes": "bytes read in the minimal model", "write_bytes": "bytes written",
    "copy_gbps": "2·x_bytes / copy_ms_p50, GB/s (the fastest copy)",
    "read_gbps": "x_bytes / time of the read-only stream (read:numba), GB/s",
    "limit": "what the row is measured against: the fastest copy (+ the read stream for "
             "backward's extra read); limits.py",
    "limit_ms": "the op's limit time: reads at the read stream's rate, writes at the copy's "
                "write share (ms)",
    "limit_gbps": "bytes / limit_ms, GB/s",
    "pct_of_limit": "100·limit time/this time (paired): % of the machine's limit",
    "pct_of_limit_ci_lo": "its 95% trial interval", "pct_of_limit_ci_hi": "",
    "buffer_sets": "buffer sets rotated through (1 when warm)",
    "working_set_bytes": "buffer_sets × bytes one call touches",
    "llc_bytes": "last-level cache of the device (host L3, GPU L2)",
    "load_before_1m": "1-minute load average when the run started",
    "load_avg_1m": "1-minute load average when the point was measured",
    "device_name": "CPU model or GPU name",
    **dict.fromkeys(("nbbn_version", "numba_version", "numpy_version", "torch_version",
                     "python_version"), "versions (torch: installed distribution, else empty)"),
    "threads": "Numba threads", "torch_threads": "PyTorch CPU threads (if torch was loaded)",
    "cpu": "CPU model", "cpu_count": "logical CPUs", "platform": "OS and machine",
    "cache_l1d_bytes": "L1 data cache per core", "cache_l2_bytes": "L2 cache per core",
    "cache_l3_bytes": "shared L3 cache", "cudasim": "Numba's CUDA simulator was on",
    "output_pool": "nbbn's CPU output pool (nbbn.pool) as the run met it: off, or on with its "
                   "threshold and cap (--call api outputs at least that big are reused)",
}


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


class Runner:
    """Runs the points of a plan, handing each finished row to ``emit`` and each ratio record
    to ``emit_ratio``."""

    def __init__(self, timing: devices.TimingConfig, emit: Callable[[dict], None],
                 emit_ratio: Callable[[dict], None] | None = None, env: dict | None = None,
                 run_id: str = "", load_before: float | None = None,
                 baseline: str | None = None,
                 emit_sample: Callable[[dict], None] | None = None, pool=None):
        self.timing = timing
        #: The worker processes of ``--isolate workers`` (:class:`.worker.WorkerPool`).
        self.pool = pool
        self.emit_sample = emit_sample or (lambda r: None)
        self.emit = emit
        self.emit_ratio = emit_ratio or (lambda r: None)
        self.env = env if env is not None else output.environment()
        self.run_id = run_id
        self.load_before = load_before
        self.baseline = baseline
        self._data = None
        #: This point's sampling budget in seconds (None: ``timing.max_time``); set by the
        #: run's wall-time budget (:class:`nbbn.bench.run.RunBudget`) before each point.
        self.point_max_time: float | None = None
        #: Seconds the last point spent taking trials (the budget's measure of set-up costs).
        self.last_sampling_s = 0.0

    # ----------------------------------------------------------------------------- rows

    def _row(self, cfg: Config) -> dict:
        info = registry.backend_info(cfg.backend)
        row = dict.fromkeys(COLUMNS)
        row.update(schema=SCHEMA, run_id=self.run_id, timestamp=_now(), kind=info.kind,
                   device=info.device, **cfg.columns(), **self.env,
                   load_before_1m=self.load_before, load_avg_1m=output.load_average())
        return row

    def skipped(self, cfg: Config, reason: str) -> dict:
        row = self._row(cfg)
        row.update(status="skipped", skip_reason=reason)
        self.emit(row)
        return row

    @staticmethod
    def _error(row: dict, exc: BaseException) -> None:
        tb = traceback.extract_tb(exc.__traceback__)
        where = f" ({tb[-1].filename}:{tb[-1].lineno})" if tb else ""
        row.update(status="error", passed=None, error=f"{type(exc).__name__}: {exc}{where}")

    # ----------------------------------------------------------------------------- a point

    def run_group(self, group: PointPlan) -> list[dict]:
        """Check and time the configurations of one point; emit and return their rows."""
        for cfg, reason in group.skipped:
            self.skipped(cfg, reason)
        if not group.run:
            return []
        p = group.point
        rows = {cfg: self._row(cfg) for cfg in group.run}
        try:
            dev = devices.device(group.device)
            if self._data is None or self._data.key != p.data_key:
                self._data = None  # free the previous point's arrays first
                self._data = point_data(p)
            data = self._data
            K = buffer_sets(p, data.x_bytes, dev.llc_bytes())
            sets = BufferSets(data, dev, K)
        except Exception as exc:  # the point itself could not be set up
            for row in rows.values():
                self._error(row, exc)
                self.emit(row)
            return list(rows.values())
        if hasattr(dev, "blocking"):
            dev.blocking = p.call == "kernel"
        timer = dev.timer if p.call == "kernel" or dev.timer != "cuda-events-blocking" \
            else "cuda-events"
        name = dev.name()
        cases, order = [], []
        for cfg in group.run:
            row = rows[cfg]
            row.update(device_name=name, timer=timer, buffer_sets=K, llc_bytes=dev.llc_bytes(),
                       x_bytes=data.x_bytes)
            try:
                case = make_case(cfg, data, sets, dev)
                dev.sync()
                t0 = time.perf_counter()
                result = case.calls[0]()
                dev.sync()
                row["compile_s"] = time.perf_counter() - t0
                errors, tols, notes = case.check(result)
                del result
            except Exception as exc:  # a kernel that raises must not end the sweep
                self._error(row, exc)
                continue
            ratio = {n: errors[n] / tols[n] for n in errors}
            worst = max(ratio, key=lambda n: ratio[n] if np.isfinite(ratio[n]) else np.inf)
            passed = bool(all(r <= 1.0 for r in ratio.values()))
            if not passed and row["kind"] != "kernel" and ratio[worst] <= BASELINE_SLACK:
                notes.append(f"baseline outside nbbn's tolerance ({worst} {errors[worst]:.2e} > "
                             f"{tols[worst]:.0e}): its accuracy is its own, timed anyway")
            elif not passed:
                row["status"] = "failed"
            row.update(passed=passed, rel_err=errors[worst], worst_output=worst,
                       tolerance=tols[worst], notes="; ".join(notes) or None,
                       errors="; ".join(f"{n}={e:.2e}" for n, e in errors.items()))
            row["working_set_bytes"] = K * case.set_bytes
            if row["status"] == "failed":
                continue
            cases.append(case)
            order.append(cfg)
        if cases:
            state = {"sets": sets, "cases": cases}
            del sets, cases, case  # the first trial owns them; later trials allocate anew
            self._time(group, dev, data, state, order, rows)
        for cfg in group.run:
            self.emit(rows[cfg])
        return [rows[c] for c in group.run]

    def _pairs(self, order: list[Config]) -> list[tuple[int, int]]:
        """Ratios the stopping rule watches: each configuration over the copy (last index),
        each kernel over each baseline."""
        M = len(order)
        kinds = [registry.backend_info(c.backend).kind for c in order]
        pairs = [(i, M) for i in range(M)]
        pairs += [(b, k) for k in range(M) for b in range(M)
                  if kinds[k] == "kernel" and kinds[b] != "kernel"]
        return pairs

    def _reference_baseline(self, order: list[Config]) -> int | None:
        """Index of the point's reference baseline: --baseline if it ran, else the first
        baseline in registry order (torch-cpu / torch-cuda first)."""
        names = registry.backend_names()
        cands = [i for i, c in enumerate(order)
                 if registry.backend_info(c.backend).kind != "kernel"]
        if self.baseline is not None:
            cands = [i for i in cands if order[i].backend == self.baseline
                     or f"{order[i].backend}:{order[i].variant}" == self.baseline]
        if not cands:
            return None
        return min(cands, key=lambda i: (names.index(order[i].backend)
                                         if order[i].backend in names else len(names), i))

    def _sample(self, dev, calls: list[list], K: int, min_rounds: int, offset: int = 0):
        """One trial's round-robin samples: T[r, i] seconds, and notes. Every round calls the
        M callables once each in a fresh random order (a generator seeded by ``offset``); the
        buffer sets are taken in turn from set ``offset mod K``. Rounds are added until
        ``min_rounds`` are in and ``trial_time`` has passed (or ``max_rounds`` / ``min_trials``
        rounds).

        Why random and not a rotation (A B C, B C A, ...): a rotation keeps the cyclic order, so
        a callable nearly always follows the same neighbour and inherits its after-effects --
        a thread pool still spinning or gone to sleep, the caches it left. Round 3's A/B run
        measured cpu-slowed (cpu + a busy-wait of 15% of each call) at only 1.076x cpu, and in
        the rotation it always ran right after cpu: the suspected cause (results/reliability
        has the calibration measured with random orders). A random order turns carry-over into
        noise shared by every pair instead of a bias of one."""
        t = self.timing
        M = len(calls)
        g = offset
        order_rng = np.random.default_rng(offset)

        def schedule(n_rounds: int):
            nonlocal g
            fns, idx = [], []
            for _ in range(n_rounds):
                for m in order_rng.permutation(M):
                    fns.append(calls[m][g % K])
                    idx.append(m)
                    g += 1
            return fns, np.asarray(idx)

        def timed(fns, idx):
            try:
                return dev.time_sequence(fns)
            except devices.CallFailed as exc:
                exc.callable_index = int(idx[exc.index])
                raise

        notes: list[str] = []
        for _ in range(t.warmup):
            timed(*schedule(1))
        blocks = []
        R = 0
        cap = max(min_rounds, t.max_rounds // max(1, t.min_trials))
        batch = max(1, min_rounds)
        start = time.monotonic()
        while True:
            fns, idx = schedule(batch)
            secs, n = timed(fns, idx)
            notes += [x for x in n if x not in notes]
            block = np.empty((batch, M))
            block[np.repeat(np.arange(batch), M), idx] = secs
            blocks.append(block)
            R += batch
            elapsed = time.monotonic() - start
            if R >= min_rounds and (elapsed >= t.trial_time or R >= cap):
                break
            per_round = elapsed / R
            left = max(t.trial_time - elapsed, 0.0)
            batch = int(max(1, min(R, left / max(per_round, 1e-9) + 1, cap - R)))
        return np.vstack(blocks), notes

    def _limit_calls(self, p, sets, dev) -> tuple[list[str], list[list]]:
        """The limit callables on every buffer set (:mod:`.limits`): names and calls."""
        if dev.kind != "cpu":
            copy = copy_case(p, sets, dev)
            return ["copy:device"], [copy.calls]
        from . import limits

        dt = validate.storage_dtype(p.dtype)
        limits.warm(dt)
        dsts = sets.empty(p.x_shape, dt)
        per_set = [limits.host_limit_calls(s["x"], d) for s, d in zip(sets.sets, dsts,
                                                                        strict=True)]
        names = list(per_set[0])
        return names, [[c[n] for c in per_set] for n in names]

    def trials_here(self, group, dev, data, sets, cases, order, n_trials: int, first: int,
                    seed_key) -> tuple[list[np.ndarray], list[str], list[str]]:
        """``n_trials`` trials in this process, each on fresh buffer sets (the first on
        ``sets``/``cases`` when given): (blocks, limit names, notes)."""
        p = group.point
        rng = rng_for(self.timing.seed, *seed_key, "rotation", first)
        min_rounds = max(self.timing.min_rounds,
                         -(-(p.min_rounds or 0) // max(1, self.timing.min_trials)))
        blocks, notes, names = [], [], None
        K = sets.K if sets is not None else None
        for _ in range(n_trials):
            if sets is None:
                K = buffer_sets(p, data.x_bytes, dev.llc_bytes()) if K is None else K
                sets = BufferSets(data, dev, K)
                cases = [make_case(cfg, data, sets, dev) for cfg in order]
            names, lcalls = self._limit_calls(p, sets, dev)
            calls = [c.calls for c in cases] + lcalls
            offset = int(rng.integers(0, 1 << 30))
            T, n = self._sample(dev, calls, sets.K, min_rounds, offset)
            blocks.append(T)
            notes += [x for x in n if x not in notes]
            sets = cases = None  # free this trial's buffers before the next allocates its own
            del lcalls, calls
        return blocks, names, notes

    def _trials(self, group, dev, data, state, order, rng, seed_key):
        """Trials until the stopping rule holds: (blocks, limit names, notes, process ids)."""
        t = self.timing
        pairs = self._pairs(order)
        blocks: list[np.ndarray] = []
        procs: list[int] = []
        notes: list[str] = []
        names = None
        workers = t.isolate == "workers" and self.pool is not None
        units = None
        if t.isolate == "process" or workers:
            state.clear()  # the workers allocate their own: free the checked buffers here
        max_time = t.max_time if self.point_max_time is None else self.point_max_time
        start = time.monotonic()
        while True:
            first = len(blocks)
            if workers:  # trial k in worker k mod W
                b, names, n, pid = self.pool.run(first, pool_trial, group, list(order), t, first,
                                                 seed_key)
            elif t.isolate == "process":
                from . import worker
                from .against import registered

                b, names, n, pid = worker.in_new_process(
                    worker_trials, group, list(order), t, t.sets_per_process, first, seed_key,
                    worker.threads(), registered())
            else:
                b, names, n = self.trials_here(group, dev, data, state.pop("sets", None),
                                               state.pop("cases", None), order, 1, first,
                                               seed_key)
                pid = 0
            blocks += b
            procs += [pid] * len(b)
            notes += [x for x in n if x not in notes]
            elapsed = time.monotonic() - start
            self.last_sampling_s = elapsed
            if len(set(procs)) > 1:
                units = procs
            if len(blocks) >= t.min_trials:
                done, _ = stats.trials_converged(blocks, pairs, t.ci_rel, rng, units=units)
                if done or elapsed >= max_time or len(blocks) >= t.max_trials:
                    return blocks, names, notes, procs, done

    def _time(self, group, dev, data, state, order, rows) -> None:
        from . import limits

        p = group.point
        point_key = (*p.columns().items(), group.device)
        rng = rng_for(self.timing.seed, *point_key, "stopping-rule")

        def seeded(*names):
            """Each final interval from its own generator, keyed by the point and the callables
            it is about: the same samples always give the same interval."""
            return rng_for(self.timing.seed, *point_key, *names)

        while True:
            try:
                blocks, lnames, notes, procs, done = self._trials(group, dev, data, state, order,
                                                                  rng, point_key)
                break
            except devices.CallFailed as exc:  # drop the callable that raised, start again
                bad = exc.callable_index
                state.clear()
                if bad >= len(order):  # a limit callable failed
                    for cfg in order:
                        self._error(rows[cfg], exc.exc)
                    return
                self._error(rows[order[bad]], exc.exc)
                del order[bad]
                if not order:
                    return
        M = len(order)
        boot = self.timing.bootstrap
        # The process is the interval's top level when the trials ran in several (stats.py).
        U = procs if len(set(procs)) > 1 else None
        labels = [f"{c.backend}:{c.variant}" for c in order] + lnames
        copies = [M + k for k, n in enumerate(lnames) if n.startswith("copy:")]
        reads = [M + k for k, n in enumerate(lnames) if n.startswith("read:")]
        copy_ivs = {k: stats.trial_time(blocks, k, seeded(labels[k]), boot, U) for k in copies}
        best = min(copies, key=lambda k: copy_ivs[k].median)
        copy_iv = copy_ivs[best]
        read = reads[0] if reads else None
        read_iv = stats.trial_time(blocks, read, seeded(labels[read]), boot, U) if read else None
        sizes = dict(roofline.itemsizes(p.dtype), fusion=p.fusion)
        nbytes = roofline.bytes_moved(p.op, p.numel, p.C, **sizes)
        nbytes2 = roofline.bytes_moved(p.op, p.numel, p.C, two_pass=True, **sizes)
        rb, wb = roofline.read_write_bytes(p.op, p.numel, p.C, **sizes)
        xb = data.x_bytes
        cbytes = roofline.copy_bytes(xb)
        L = len(labels)  # the limit's column in the augmented blocks
        aug = [np.column_stack([T, limits.limit_per_round(
            T[:, best], None if read is None else T[:, read], rb, wb, xb)]) for T in blocks]
        lim_iv = stats.trial_time(aug, L, seeded("limit"), boot, U)
        limit_name = labels[best] + (f" + {labels[read]}" if read is not None
                                     and p.op is Op.BACKWARD else "")
        ref = self._reference_baseline(order)
        llc = dev.llc_bytes()
        rounds = int(sum(T.shape[0] for T in blocks))
        for i, cfg in enumerate(order):
            row = rows[cfg]
            s = np.concatenate([T[:, i] for T in blocks])
            t_iv = stats.trial_time(blocks, i, seeded(labels[i]), boot, U)
            oc = stats.trial_ratio(blocks, i, best, seeded(labels[i], "copy"), boot, U)
            pl = stats.trial_ratio(aug, L, i, seeded("limit", labels[i]), boot, U)
            widths = [oc.half_width_rel]
            p20, p80 = np.percentile(s, [20, 80])
            row.update(status="ok", rounds=rounds, trials=len(blocks),
                       processes=len(set(procs)),
                       converged=bool(done),
                       sampling_budget_s=(self.timing.max_time if self.point_max_time is None
                                          else self.point_max_time),
                       time_ms_p50=t_iv.median * 1e3, time_ms_ci_lo=t_iv.lo * 1e3,
                       time_ms_ci_hi=t_iv.hi * 1e3, time_ms_p20=p20 * 1e3,
                       time_ms_p80=p80 * 1e3, time_ms_min=float(s.min()) * 1e3,
                       noise_pct=100.0 * (p80 - p20) / t_iv.median if t_iv.median > 0 else None,
                       copy_ms_p50=copy_iv.median * 1e3, limit_copy=labels[best],
                       time_over_copy=oc.median,
                       time_over_copy_ci_lo=oc.lo, time_over_copy_ci_hi=oc.hi,
                       bytes=nbytes, bytes_2pass=nbytes2, read_bytes=rb, write_bytes=wb,
                       gbps=roofline.gbps(nbytes, t_iv.median),
                       gbps_2pass=roofline.gbps(nbytes2, t_iv.median),
                       copy_gbps=roofline.gbps(cbytes, copy_iv.median),
                       read_gbps=roofline.gbps(xb, read_iv.median) if read_iv else None,
                       limit=limit_name, limit_ms=lim_iv.median * 1e3,
                       limit_gbps=roofline.gbps(nbytes, lim_iv.median),
                       pct_of_limit=100.0 * pl.median, pct_of_limit_ci_lo=100.0 * pl.lo,
                       pct_of_limit_ci_hi=100.0 * pl.hi)
            extra = list(notes)
            if p.cache == "cold" and row["working_set_bytes"] < 2 * llc:
                extra.append(f"cold working set {row['working_set_bytes']} B < 2x LLC "
                             f"({2 * llc} B): capped at {row['buffer_sets']} buffer sets")
            if extra:
                row["notes"] = "; ".join(filter(None, [row["notes"], *extra]))
            spread_pair = (best, i)
            if ref is not None and ref != i:
                sp = stats.trial_ratio(blocks, ref, i, seeded(labels[ref], labels[i]), boot, U)
                row.update(baseline=labels[ref], speedup=sp.median,
                           speedup_ci_lo=sp.lo, speedup_ci_hi=sp.hi)
                widths.append(sp.half_width_rel)
                spread_pair = (ref, i)
            row["between_trial_sd_pct"], row["within_trial_sd_pct"] = \
                stats.trial_spread(blocks, *spread_pair)
            row["between_process_sd_pct"] = (stats.process_spread(blocks, *spread_pair, U)
                                              if U is not None else None)
            row["ci_halfwidth_pct_max"] = 100.0 * max(widths)
            row["load_avg_1m"] = output.load_average()
        for i in range(M):
            for j in range(len(labels)):
                if i == j:
                    continue
                iv = stats.trial_ratio(blocks, j, i, seeded(labels[j], labels[i]), boot, U)
                vb, _, vv = labels[j].partition(":")
                self.emit_ratio({
                    "schema": SCHEMA, "run_id": self.run_id, "backend": order[i].backend,
                    "variant": order[i].variant, **p.columns(), "device": group.device,
                    "vs_backend": vb, "vs_variant": vv,
                    "speedup": iv.median, "speedup_ci_lo": iv.lo, "speedup_ci_hi": iv.hi,
                    "rounds": rounds, "trials": len(blocks)})
        for k, (T, pid) in enumerate(zip(blocks, procs, strict=True)):
            self.emit_sample({"schema": SCHEMA, "run_id": self.run_id, **p.columns(),
                              "device": group.device, "trial": k, "process": pid,
                              "labels": labels, "times_us": np.round(T * 1e6, 3).tolist()})


def worker_trials(group, order, timing, n, first, seed_key, threads, against=()):
    """A worker process's part of ``--isolate process`` (:mod:`.worker`): register the parent's
    ``--against`` copies, set its thread counts, build the point's data, run ``n`` trials on
    fresh buffer sets (warm-up rounds load the JIT cache untimed); (blocks, names, notes, pid),
    or ("failed", index, message)."""
    import os

    from . import (
        baselines,  # noqa: F401  (registers the baselines)
        worker,
    )
    from .against import register_all

    register_all(against)
    worker.set_threads(threads)
    dev = devices.device(group.device)
    data = point_data(group.point)
    runner = Runner(timing, lambda r: None, env={})
    try:
        blocks, names, notes = runner.trials_here(group, dev, data, None, None, order, n, first,
                                                  seed_key)
    except devices.CallFailed as exc:  # not picklable as is: sent back as its parts
        return ("failed", exc.callable_index, f"{type(exc.exc).__name__}: {exc.exc}")
    return blocks, names, notes, os.getpid()


#: The point a ``--isolate workers`` worker holds: (data key, device name) -> (device, data).
_HELD: dict = {}


def pool_trial(group, order, timing, first, seed_key):
    """One trial of ``group`` in a ``--isolate workers`` worker (:class:`.worker.WorkerPool`):
    the point's data built once per point and worker, fresh buffer sets, warm-up rounds untimed
    (they load the JIT cache on a worker's first call); (blocks, names, notes, pid), or
    ("failed", index, message)."""
    import os

    key = (group.point.data_key, group.device)
    if key not in _HELD:
        _HELD.clear()  # free the previous point's arrays first
        _HELD[key] = (devices.device(group.device),
                      point_data(group.point, reference_outputs=False))
    dev, data = _HELD[key]
    runner = Runner(timing, lambda r: None, env={})
    try:
        blocks, names, notes = runner.trials_here(group, dev, data, None, None, order, 1, first,
                                                  seed_key)
    except devices.CallFailed as exc:  # not picklable as is: sent back as its parts
        return ("failed", exc.callable_index, f"{type(exc.exc).__name__}: {exc.exc}")
    return blocks, names, notes, os.getpid()
