"""Paired statistics of one point's round-robin samples: within one trial (below), over trials
(section "Trials": what the rows carry) and the variance components of the study.

The runner times the M callables of a point in rounds (each once, in a random order): sample
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


# ---------------------------------------------------------------------------------------------
# Trials: the interval built at the level that varies (Kalibera & Jones 2013; pyperf)
#
# A point is measured in n independent *trials* (fresh buffer sets, new random call orders, with
# ``--isolate process`` a fresh worker process). Trial t gives R_t paired rounds. For the ratio
# i over j:
#
#     z_{t,r} = log(T_t[r, i] / T_t[r, j])             (paired, per round)
#     m_t     = median over r of z_{t,r}                 (the trial's estimate)
#     ratio   = exp(mean over t of m_t)                  (geometric mean of the trial medians)
#
# Its 95% interval is a two-level (cluster) bootstrap: draw n trials with replacement, then
# within each drawn trial its R_t rounds with replacement, take the trial medians and their
# mean; the 2.5th and 97.5th percentiles of B such means, in log space. With few trials a
# percentile bootstrap is too narrow (it divides by n, not n − 1, and uses z, not t): the
# interval is widened about the estimate by Hesterberg's factor sqrt(n/(n − 1))·t_{n−1}/z
# ("expanded percentile"). tests/test_harness.py checks its coverage by simulation with a known
# between-trial variance. With one trial the interval is the rounds' bootstrap alone, which
# says nothing about the trial level: rows carry ``trials`` so a reader can tell.
#
# When the trials ran in several worker processes (``--isolate workers``/``process``), the
# process is the top level (results/reliability/variance: on this host the process carries more
# variance than the trial within it): a process's value is the mean of its trials' medians,
# the estimate is the mean over processes, and the bootstrap draws *processes* with
# replacement (each with its own rounds-resampled value), widened by the factor for n
# processes. Resampling only the top level is the cluster bootstrap's rule (Davison & Hinkley
# 1997, §3.8): the lower levels' variance is already inside each process's value.

#: Two-sided 97.5% quantiles of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
Z975 = 1.959964


def t975(df: int) -> float:
    """Student's t 97.5% quantile (1.96 beyond 30 degrees of freedom, where it is within 4%)."""
    return _T975[df - 1] if 1 <= df <= len(_T975) else Z975


def expansion(n: int) -> float:
    """Hesterberg's widening of a percentile bootstrap interval over n clusters."""
    if n < 2:
        return 1.0
    return float(np.sqrt(n / (n - 1)) * t975(n - 1) / Z975)


def _log_ratio_blocks(blocks, i: int, j: int, with_index: bool = False):
    out, kept = [], []
    for k, T in enumerate(blocks):
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.log(T[:, i] / T[:, j])
        z = z[np.isfinite(z)]
        if z.size:
            out.append(z)
            kept.append(k)
    return (out, kept) if with_index else out


def cluster_ci(groups: list[np.ndarray], rng: np.random.Generator, bootstrap: int = 1000,
               max_work: int = MAX_WORK, units=None) -> Interval:
    """Mean over groups of each group's median, with the expanded two-level bootstrap interval
    (module section "Trials"); ``groups`` are the trials' values (log ratios). ``units``, one
    label per group (the worker process it ran in), makes the process the top level: the
    estimate is the mean over units of the mean of their trials' medians and units are what
    the bootstrap draws. The interval is in the values' units (log): callers exponentiate."""
    keep = [k for k, g in enumerate(groups) if np.size(g)]
    groups = [np.asarray(groups[k], dtype=np.float64) for k in keep]
    n = len(groups)
    if n == 0:
        nan = float("nan")
        return Interval(nan, nan, nan)
    total = sum(g.size for g in groups)
    B = int(max(MIN_RESAMPLES, min(bootstrap, max_work // max(total, 1))))
    # Each trial's median's bootstrap distribution (rounds resampled within the trial) ...
    inner = np.empty((n, B))
    for t, g in enumerate(groups):
        idx = rng.integers(0, g.size, size=(B, g.size))
        inner[t] = np.median(g[idx], axis=1)
    meds = np.array([np.median(g) for g in groups])
    if units is not None:  # ... averaged over the trials of each unit (process)
        labels = [units[k] for k in keep]
        order = list(dict.fromkeys(labels))
        if len(order) > 1:
            member = np.array([[lab == u for lab in labels] for u in order], dtype=np.float64)
            member /= member.sum(axis=1, keepdims=True)
            inner, meds = member @ inner, member @ meds
            n = len(order)
    est = float(meds.mean())
    if n == 1:
        lo, hi = np.percentile(inner[0], [2.5, 97.5])
        return Interval(est, float(lo), float(hi))
    # ... then units drawn with replacement, each with one of its inner draws.
    pick = rng.integers(0, n, size=(B, n))
    draw = rng.integers(0, B, size=(B, n))
    means = inner[pick, draw].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    c = expansion(n)
    return Interval(est, float(est - c * (est - lo)), float(est + c * (hi - est)))


def trial_ratio(blocks, i: int, j: int, rng: np.random.Generator,
                bootstrap: int = 1000, units=None) -> Interval:
    """Ratio T[:, i]/T[:, j] over trials (``blocks``: one (rounds, callables) array per trial;
    ``units``: each trial's process, or None): exp of :func:`cluster_ci` of the per-round log
    ratios."""
    groups, kept = _log_ratio_blocks(blocks, i, j, with_index=True)
    iv = cluster_ci(groups, rng, bootstrap, units=_kept(units, kept))
    return Interval(*(float(np.exp(v)) for v in (iv.median, iv.lo, iv.hi)))


def trial_time(blocks, i: int, rng: np.random.Generator, bootstrap: int = 1000,
               units=None) -> Interval:
    """A callable's own time over trials: exp of :func:`cluster_ci` of log seconds."""
    groups, kept = [], []
    for k, T in enumerate(blocks):
        v = T[:, i]
        v = v[np.isfinite(v) & (v > 0)]
        if v.size:
            groups.append(np.log(v))
            kept.append(k)
    iv = cluster_ci(groups, rng, bootstrap, units=_kept(units, kept))
    return Interval(*(float(np.exp(v)) for v in (iv.median, iv.lo, iv.hi)))


def _kept(units, kept):
    return None if units is None else [units[k] for k in kept]


def trial_spread(blocks, i: int, j: int) -> tuple[float, float]:
    """(between-trial, within-trial) standard deviation of the log ratio i over j, both as %
    (100·sd of the natural log ≈ % spread): the sd of the trial medians, and the pooled
    robust sd of rounds within a trial (1.4826·MAD)."""
    z = _log_ratio_blocks(blocks, i, j)
    if not z:
        return float("nan"), float("nan")
    meds = np.array([np.median(g) for g in z])
    between = float(np.std(meds, ddof=1)) if len(meds) > 1 else float("nan")
    mads = [1.4826 * np.median(np.abs(g - np.median(g))) for g in z if g.size > 1]
    within = float(np.sqrt(np.mean(np.square(mads)))) if mads else float("nan")
    return 100.0 * between, 100.0 * within


def process_spread(blocks, i: int, j: int, units) -> float:
    """Standard deviation (%) of the per-process means of the trial medians of the log ratio
    i over j: the spread the process level adds (NaN with fewer than two processes)."""
    z, kept = _log_ratio_blocks(blocks, i, j, with_index=True)
    by: dict = {}
    for g, k in zip(z, kept, strict=True):
        by.setdefault(units[k], []).append(float(np.median(g)))
    means = [np.mean(v) for v in by.values()]
    return 100.0 * float(np.std(means, ddof=1)) if len(means) > 1 else float("nan")


def trials_converged(blocks, pairs, target: float, rng: np.random.Generator,
                     bootstrap: int = MIN_RESAMPLES, units=None) -> tuple[bool, float]:
    """Whether every ratio of ``pairs`` has a trial interval with relative half-width at most
    ``target``; also the widest seen."""
    worst = 0.0
    for i, j in pairs:
        w = trial_ratio(blocks, i, j, rng, bootstrap, units).half_width_rel
        worst = max(worst, w)
        if w > target:
            return False, worst
    return True, worst


# ---------------------------------------------------------------------------------------------
# Variance components (nested random effects, method of moments; Kalibera & Jones 2013, §4)


def variance_components(values: np.ndarray, ids: np.ndarray) -> list[dict]:
    """Variance of ``values`` (log ratios) split over nested levels.

    ``ids`` is (n, k): for each value its unit at every level from the top down (e.g. run,
    process, trial), the value itself being a round. Level L's units are the distinct id
    prefixes of length L. With ``S_L`` = the mean over level-(L−1) units of the sample variance
    of their children's means (``S_k`` for rounds: of the values within a trial), and ``n_L``
    the mean number of level-L+1 children per level-L unit, the components are

        σ²_round = S_round,    σ²_L = max(S_L − S_{L+1} / n_{L+1}, 0)  (down the levels)

    which is the ANOVA estimator for a balanced design and a moment estimate otherwise. Levels
    with a single unit per parent throughout contribute no information (``S_L`` NaN: reported
    NaN). Returns one dict per level, top first, then ``round``: ``level`` (index), ``units``,
    ``S`` (observed variance of means), ``children`` (n_L), ``variance`` (σ²).
    """
    v = np.asarray(values, dtype=np.float64)
    ids = np.asarray(ids)
    n, k = ids.shape
    keys = [tuple(map(tuple, ids[:, :L + 1])) for L in range(k)]  # unit of each value at L

    def unit_means(L):
        d: dict = {}
        for key, x in zip(keys[L], v, strict=True):
            d.setdefault(key, []).append(x)
        return {u: float(np.mean(xs)) for u, xs in d.items()}, d

    S = []
    children = []
    # rounds within the lowest level
    _, members = unit_means(k - 1)
    var_r = [np.var(xs, ddof=1) for xs in members.values() if len(xs) > 1]
    S_round = float(np.mean(var_r)) if var_r else float("nan")
    n_round = float(np.mean([len(xs) for xs in members.values()]))
    for L in range(k):
        means, _ = unit_means(L)
        parents: dict = {}
        for u, m in means.items():
            parents.setdefault(u[:-1], []).append(m)
        vs = [np.var(ms, ddof=1) for ms in parents.values() if len(ms) > 1]
        S.append(float(np.mean(vs)) if vs else float("nan"))
        children.append(float(np.mean([len(ms) for ms in parents.values()])))
    out = []
    below_S, below_n = S_round, n_round
    comps = [None] * k
    for L in range(k - 1, -1, -1):
        comps[L] = max(S[L] - below_S / below_n, 0.0) if np.isfinite(S[L]) else float("nan")
        below_S, below_n = S[L], children[L]
        if not np.isfinite(below_S):
            below_S = 0.0
    for L in range(k):
        out.append({"level": L, "units": len(set(keys[L])), "S": S[L],
                    "children": children[L + 1] if L + 1 < k else n_round,
                    "variance": comps[L]})
    out.append({"level": k, "units": n, "S": S_round, "children": 1.0, "variance": S_round})
    return out
