"""Check, then time, then one tidy row per configuration.

For each configuration that runs:

1. the point's inputs and float64 reference are built (once per point, shared by its backends);
2. the first call runs alone and its wall time is ``compile_s`` (JIT compilation or cache load,
   plus one run) -- it never counts as a sample;
3. its outputs are compared with the reference (rel_err per output, :mod:`nbbn.tolerances`); a
   row outside tolerance is marked ``failed`` and is NOT timed;
4. warm-up calls, then samples (:func:`nbbn.harness.devices.measure`), into preallocated outputs;
5. bandwidth on the minimal bytes model, and the copy of x's bytes timed the same way on the
   same device in the same run (measured once per size and device).

Row ``status``: ``ok`` (checked and timed), ``failed`` (outside tolerance, not timed),
``error`` (the kernel raised; the message is in ``error``), ``skipped`` (``skip_reason``).
"""

from __future__ import annotations

import datetime as _dt
import os
import time
import traceback
import uuid
from collections.abc import Callable

import numpy as np

from .. import registry
from . import devices, roofline
from .cases import make_case, point_data
from .env import environment
from .sweep import Config, Plan

SCHEMA = "nbbn-bench/1"

COLUMNS = (
    "schema", "run_id", "timestamp",
    "backend", "kind", "device", "op", "layout", "dtype", "N", "C", "H", "W", "shape", "m",
    "status", "skip_reason", "passed", "rel_err", "worst_output", "tolerance", "errors",
    "compile_s", "samples", "time_ms_p50", "time_ms_p20", "time_ms_p80", "time_ms_min",
    "noise_pct", "bytes", "bytes_2pass", "gbps", "gbps_2pass", "copy_gbps", "pct_of_copy",
    "notes", "error",
    "nbbn_version", "numba_version", "numpy_version", "torch_version", "python_version",
    "threads", "torch_threads", "cpu_count", "platform", "device_name", "load_avg_1m",
)


def _load_average() -> float | None:
    """The host's 1-minute load average when the row is made: a busy machine shows here."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


class Runner:
    """Runs a :class:`~nbbn.harness.sweep.Plan`, handing each finished row to ``emit``."""

    def __init__(self, timing: devices.TimingConfig, emit: Callable[[dict], None]):
        self.timing = timing
        self.emit = emit
        self.run_id = uuid.uuid4().hex[:12]
        self.env: dict | None = None
        self._copy_gbps: dict[tuple[str, int], float] = {}
        self._point = None

    def _env(self) -> dict:
        if self.env is None:  # after the plan: loading a backend may import torch
            self.env = environment()
        return self.env

    def _row(self, cfg: Config) -> dict:
        info = registry.backend_info(cfg.backend)
        row = dict.fromkeys(COLUMNS)
        row.update(schema=SCHEMA, run_id=self.run_id,
                   timestamp=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                   kind=info.kind, device=info.device, **cfg.columns(), **self._env(),
                   load_avg_1m=_load_average())
        return row

    def skipped(self, cfg: Config, reason: str) -> dict:
        row = self._row(cfg)
        row.update(status="skipped", skip_reason=reason)
        self.emit(row)
        return row

    def run_one(self, cfg: Config) -> dict:
        row = self._row(cfg)
        try:
            dev = devices.device(registry.backend_info(cfg.backend).device)
            row["device_name"] = dev.name()
            self._measure(cfg, dev, row)
        except Exception as exc:  # a kernel that raises must not end the sweep
            last = traceback.extract_tb(exc.__traceback__)[-1]
            row.update(status="error", passed=None,
                       error=f"{type(exc).__name__}: {exc} ({last.filename}:{last.lineno})")
        self.emit(row)
        return row

    def _measure(self, cfg: Config, dev, row: dict) -> None:
        key = cfg.key[1:]
        if self._point is None or self._point.key != key:
            self._point = None  # free the previous point's arrays first
            self._point = point_data(cfg)
        case = make_case(cfg, self._point, dev)

        dev.sync()
        t0 = time.perf_counter()
        result = case.call()
        dev.sync()
        row["compile_s"] = time.perf_counter() - t0

        errors, tols, notes = case.check(result)
        ratio = {n: errors[n] / tols[n] for n in errors}
        worst = max(ratio, key=lambda n: ratio[n] if np.isfinite(ratio[n]) else np.inf)
        passed = bool(all(r <= 1.0 for r in ratio.values()))
        row.update(passed=passed, rel_err=errors[worst], worst_output=worst,
                   tolerance=tols[worst], notes="; ".join(notes) or None,
                   errors="; ".join(f"{n}={e:.2e}" for n, e in errors.items()))
        if not passed:
            row["status"] = "failed"
            return

        samples = devices.measure(dev.time_once, case.call, self.timing)
        p50 = samples.ms(50)
        itemsize = np.dtype(cfg.dtype).itemsize
        nbytes = roofline.bytes_moved(cfg.op, cfg.numel, cfg.C, itemsize)
        nbytes2 = roofline.bytes_moved(cfg.op, cfg.numel, cfg.C, itemsize, two_pass=True)
        copy = self.copy_gbps(dev, case.nbytes_x)
        gbps = roofline.gbps(nbytes, p50 * 1e-3)
        row.update(status="ok", samples=samples.n, time_ms_p50=p50, time_ms_p20=samples.ms(20),
                   time_ms_p80=samples.ms(80), time_ms_min=float(samples.seconds.min()) * 1e3,
                   noise_pct=samples.noise_pct(), bytes=nbytes, bytes_2pass=nbytes2, gbps=gbps,
                   gbps_2pass=roofline.gbps(nbytes2, p50 * 1e-3), copy_gbps=copy,
                   pct_of_copy=100.0 * gbps / copy if copy > 0 else None)

    def copy_gbps(self, dev, nbytes: int) -> float:
        """GB/s of copying nbytes (read + write = 2·nbytes) on dev, measured once per size."""
        key = (dev.kind, nbytes)
        if key not in self._copy_gbps:
            fn = dev.copy_callable(nbytes)
            samples = devices.measure(dev.time_once, fn, self.timing)
            self._copy_gbps[key] = roofline.gbps(2 * nbytes, samples.ms(50) * 1e-3)
        return self._copy_gbps[key]


def run_plan(plan: Plan, runner: Runner, progress=None) -> None:
    """Emit every skipped row, then run the rest; ``progress.update(1)`` after each run."""
    for cfg, reason in plan.skipped:
        runner.skipped(cfg, reason)
    for cfg in plan.run:
        runner.run_one(cfg)
        if progress is not None:
            progress.update(1)
