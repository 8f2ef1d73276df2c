"""The timing loop of the per-call scripts (call_costs, channel_costs, prep_costs): the median
of single calls, each timed on its own, after a warm-up. Imported by name: ``python
scripts/NAME.py`` puts this folder first on sys.path."""

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
