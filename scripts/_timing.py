"""The timing loops of the per-call scripts: the median of single calls, each timed on its own,
after a warm-up (call_costs, channel_costs, prep_costs), and the median over passes of the mean
per call of one pass through a list of calls, e.g. one per buffer set of a cold rotation
(cold_costs, nchw_grad_costs). Imported by name: ``python scripts/NAME.py`` puts this folder
first on sys.path."""

from __future__ import annotations

import time

import numpy as np


def median_us(fn, rounds: int, warmup: int) -> float:
    """Median µs of ``rounds`` calls of ``fn()`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        fn()
        ts.append(time.perf_counter_ns() - t0)
    return float(np.median(ts)) / 1e3


def pass_median_us(fns, passes: int = 7) -> float:
    """Median over ``passes`` of the mean µs per call of one pass through ``fns``."""
    out = []
    for _ in range(passes):
        t0 = time.perf_counter_ns()
        for f in fns:
            f()
        out.append((time.perf_counter_ns() - t0) / len(fns) / 1e3)
    return float(np.median(out))
