"""Paired statistics of one point's round-robin samples.

The runner times the M callables of a point in rounds (A B C, B C A, C A B, ...): sample
``T[r, i]`` is callable i's time in round r. Every ratio is taken per round, so the drift and the
neighbours' load that a round met hit both sides of it alike:

    ratio_r(i over j) = T[r, i] / T[r, j]          (one value per round: paired)
    ratio(i over j)   = median over rounds of ratio_r

and its 95% confidence interval is the percentile bootstrap of that median: ``B`` resamples of
the R rounds drawn with replacement, the median of each, and the 2.5th and 97.5th percentiles of
those medians. The generator is seeded from the harness's ``--seed`` and the point, so the same
samples always give the same interval. A time's own interval (``time_ms_ci_lo``/``_hi``) is the
same bootstrap of the median of its samples.

``B`` is ``bootstrap`` but at most ``max_work / R`` (at least 200), so a point with thousands of
rounds does not spend longer on its interval than on its timing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

#: Bound on resampled values per interval (B·R): about 20 ms of work.
MAX_WORK = 2_000_000
MIN_RESAMPLES = 200


@dataclass(frozen=True)
class Interval:
    """A median and its bootstrap 95% confidence interval."""

    median: float
    lo: float
    hi: float

    @property
    def half_width_rel(self) -> float:
        """(hi − lo)/2 relative to the median (inf when the median is not positive)."""
        if not (self.median > 0) or not np.isfinite(self.lo + self.hi):
            return float("inf")
        return (self.hi - self.lo) / 2.0 / self.median




def median_ci(values: np.ndarray, rng: np.random.Generator, bootstrap: int = 1000,
              max_work: int = MAX_WORK) -> Interval:
    """Median of ``values`` with its percentile-bootstrap 95% interval (see the module)."""
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    R = v.size
    if R == 0:
        nan = float("nan")
        return Interval(nan, nan, nan)
    med = float(np.median(v))
    if R == 1:
        return Interval(med, float("-inf"), float("inf"))
    B = int(max(MIN_RESAMPLES, min(bootstrap, max_work // R)))
    meds = np.empty(B)
    step = max(1, max_work // (4 * R))  # resamples drawn at once, bounding memory
    for s in range(0, B, step):
        n = min(step, B - s)
        idx = rng.integers(0, R, size=(n, R))
        meds[s:s + n] = np.median(v[idx], axis=1)
    lo, hi = np.percentile(meds, [2.5, 97.5])
    return Interval(med, float(lo), float(hi))


def paired_ratio(T: np.ndarray, i: int, j: int, rng: np.random.Generator,
                 bootstrap: int = 1000) -> Interval:
    """Median over rounds of T[:, i] / T[:, j], with its interval."""
    with np.errstate(divide="ignore", invalid="ignore"):
        r = T[:, i] / T[:, j]
    return median_ci(r, rng, bootstrap)


def converged(T: np.ndarray, pairs, target: float, rng: np.random.Generator,
              bootstrap: int = MIN_RESAMPLES) -> tuple[bool, float]:
    """Whether every ratio of ``pairs`` has a 95% interval whose half-width is at most
    ``target`` times the ratio; also the widest relative half-width seen."""
    worst = 0.0
    for i, j in pairs:
        w = paired_ratio(T, i, j, rng, bootstrap).half_width_rel
        worst = max(worst, w)
        if w > target:
            return False, worst
    return True, worst
