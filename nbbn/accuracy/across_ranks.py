"""Part (d): batch statistics across processes -- what synchronizing buys, and how to merge.

Each simulated rank computes exactly what it computes under :mod:`nbbn.distributed`: its slice's
(count, mean, M2) by the cpu backend's statistics code (``registry.parts("cpu").stats``), merged
by :func:`nbbn.distributed.merge_stats`, the function every rank runs after the ``Allgather``.
MPI only moves those float64 bytes, so one process reproduces the ranks' arithmetic exactly (the
MPI tests check that the real processes agree with single-process nbbn bit for bit in float32).
The alternatives are emulated from their published formulas.

(d1) ``distributed_ranks`` -- per-rank vs synchronized statistics. K ranks hold n values of a
channel each, i.i.d. from a population (normal N(1, 2²)). Without synchronization each rank
normalizes with its own (μ_r, σ²_r) over n values; synchronized, all use the statistics of
m = K·n values. Measured: RMSE of the mean (in σ) and relative RMSE of the biased variance against
the population, beside the i.i.d. theory σ/√m and √(σ⁴/m² + ((m−1)/m)²·Var(s²)) (part b), and
the RMS distance of each rank's output y = (x − μ)/√(σ² + ε) from the synchronized y and from the
population-normalized (x − μ_pop)/σ_pop.

(d2) ``distributed_pmean`` -- merging with uneven counts. K = 4 ranks with count patterns from
even to skewed (and one rank empty), float32 data at κ = |mean|/std of 1 and 1e4, shards i.i.d.
or shifted (rank r's mean moved by (r − 1.5)·σ/2, as when data are not shuffled across ranks).
Merges: nbbn's count-weighted (count, mean, M2) Chan merge; Flax's ``pmean`` of E[x], E[x²] with
equal weights and var = max(E[x²] − E[x]², 0) (``use_fast_variance=True``; float32 as its
reductions, and float64); the same with count weights (float32); and the equal-weight two-pass
pmean (μ̄ = pmean E[x], then pmean E[(x − μ̄)²]; ``use_fast_variance=False``), float64. Errors
against a double-double reference of the concatenated batch: |μ̂ − μ|/σ and |σ̂² − σ²|/σ².

(d3) ``distributed_invstd`` -- what is exchanged. PyTorch's SyncBatchNorm sends each rank's
(mean, invstd = 1/√(σ²_r + ε), count) and rebuilds σ²_r = 1/invstd² − ε before merging
(``batch_norm_gather_stats_with_counts``, accscalar float32 for float32 input). When σ² ≪ ε the
subtraction cancels: σ²_r carries an absolute error of about u·ε, a relative one of u·ε/σ²
(u = 2⁻²⁴), and can come out ≤ 0. Emulated here in float32 (as PyTorch) and float64, from the
best local statistics a float32 kernel could return (the exact ones rounded once to float32),
against nbbn's (count, mean, M2) in float64; ε = 1e-5, zero-mean data, uneven counts. The merged
σ² feeds the running variance; the invstd that normalizes y is barely touched (σ² + ε ≈ ε).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..output import pyplot, save_figure
from ..seeds import rng_for
from .common import POPULATIONS
from .report import kappa_name
from .sampling import var_rmse_theory

EPS = 1e-5
U32 = 2.0**-24


@dataclass
class DistributedConfig:
    seed: int = 0
    ranks: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16, 32, 64])
    per_rank: list[int] = field(default_factory=lambda: [2, 4, 8, 16, 32, 64, 128, 256])
    #: (channel, batch) replicates per (K, n) in d1, per configuration in d2 and d3.
    replicates: int = 4096
    channels: int = 64
    population: str = "normal"
    patterns: dict[str, tuple[int, ...]] = field(default_factory=lambda: {
        "even 64,64,64,64": (64, 64, 64, 64),
        "uneven 32,48,64,112": (32, 48, 64, 112),
        "skewed 8,16,32,200": (8, 16, 32, 200),
        "one empty 0,64,96,96": (0, 64, 96, 96),
    })
    kappas: list[float] = field(default_factory=lambda: [1.0, 1e4])
    shards: list[str] = field(default_factory=lambda: ["iid", "shifted"])
    invstd_counts: tuple[int, ...] = (16, 32, 64, 144)
    variances: list[float] = field(default_factory=lambda: [
        1.0, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8, 1e-9, 1e-10, 1e-11, 1e-12, 1e-13,
        1e-14])

    @classmethod
    def quick(cls, seed: int = 0) -> DistributedConfig:
        return cls(seed=seed, ranks=[1, 2, 8, 32], per_rank=[2, 8, 32, 128], replicates=1024,
                   variances=[1.0, 1e-4, 1e-6, 1e-8, 1e-10, 1e-12, 1e-14])

    def n_configs(self) -> int:
        return (len(self.ranks) * len(self.per_rank)
                + len(self.patterns) * len(self.kappas) * len(self.shards)
                + len(self.variances))


# ---------------------------------------------------------------------------- building blocks


def rank_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, M2) of one rank's (n, C) slice by the cpu backend's statistics code, as
    :func:`nbbn.distributed.batch_norm_train` computes them before the Allgather."""
    from .. import registry, validate

    a = validate.train_args(x, None, None, EPS, None, None, 0.1, None, min_m=1)
    return registry.parts("cpu").stats(a)


def synchronized(slices: list[np.ndarray]):
    """(n, mean, biased var) of the union of the slices, as every rank merges them."""
    from ..distributed import merge_stats

    C = slices[0].shape[1]
    counts = np.array([s.shape[0] for s in slices], dtype=np.float64)
    means, m2s = np.zeros((len(slices), C)), np.zeros((len(slices), C))
    for r, s in enumerate(slices):
        if s.shape[0]:
            means[r], m2s[r] = rank_stats(s)
    n, mean, m2 = merge_stats(counts, means, m2s)
    return n, mean, m2 / n


def pmean_fast(slices, dtype, weights: str = "equal"):
    """Flax's ``pmean`` of (E[x], E[x²]) with var = max(E[x²] − E[x]², 0), all in ``dtype``;
    ``weights="count"`` weights each rank by its count instead. An empty rank's E[x] is 0/0."""
    dt = np.dtype(dtype)
    with np.errstate(invalid="ignore", divide="ignore"):
        m1 = np.stack([s.astype(dt).mean(axis=0, dtype=dt) if s.shape[0] else
                       np.full(s.shape[1], np.nan, dt) for s in slices])
        m2 = np.stack([(s.astype(dt) * s.astype(dt)).mean(axis=0, dtype=dt) if s.shape[0] else
                       np.full(s.shape[1], np.nan, dt) for s in slices])
        if weights == "equal":
            mean = m1.mean(axis=0, dtype=dt)
            ex2 = m2.mean(axis=0, dtype=dt)
        else:
            w = np.array([s.shape[0] for s in slices], dtype=dt)[:, None]
            w = w / w.sum(dtype=dt)
            mean = np.where(w > 0, w * m1, 0).sum(axis=0, dtype=dt)
            ex2 = np.where(w > 0, w * m2, 0).sum(axis=0, dtype=dt)
        var = np.maximum(ex2 - mean * mean, dt.type(0))
    return mean.astype(np.float64), var.astype(np.float64)


def pmean_two_pass(slices):
    """Equal-weight two-pass pmean in float64: μ̄ = pmean E[x], σ² = pmean E[(x − μ̄)²]."""
    with np.errstate(invalid="ignore"):
        m1 = np.stack([s.astype(np.float64).mean(axis=0) if s.shape[0] else
                       np.full(s.shape[1], np.nan) for s in slices])
        mean = m1.mean(axis=0)
        d2 = np.stack([((s.astype(np.float64) - mean) ** 2).mean(axis=0) if s.shape[0] else
                       np.full(s.shape[1], np.nan) for s in slices])
    return mean, d2.mean(axis=0)


def invstd_exchange(slices, dtype, eps: float = EPS):
    """PyTorch SyncBatchNorm's merge, in ``dtype``: each rank sends (μ_r, invstd_r, n_r) with
    invstd_r = 1/√(σ²_r + ε) from its statistics (here the exact ones, rounded once to
    ``dtype``); every rank rebuilds σ²_r = 1/invstd_r² − ε and merges
    (``batch_norm_reduce_statistics_kernel``):

        v = ((1/invstd_r)² − ε)·n_r;  f = 1/(n + n_r);
        var_n += v + (μ − μ_r)²·n·n_r·f;  μ = n·f·μ + n_r·f·μ_r;  n += n_r

    Returns (mean, biased var = var_n/n, invstd = 1/√(var_n/n + ε)) as float64."""
    from .algorithms import exact_stats

    dt = np.dtype(dtype)
    T = dt.type
    C = slices[0].shape[1]
    avg = np.zeros(C, dt)
    var_n = np.zeros(C, dt)
    n = T(0)
    e = T(eps)
    for s in slices:
        if s.shape[0] == 0:
            continue  # a count of 0 adds nothing (f·0 terms)
        mu = np.empty(C)
        vr = np.empty(C)
        for c in range(C):
            mh, ml, vh, vl = exact_stats(np.ascontiguousarray(s[:, c]))
            mu[c], vr[c] = mh + ml, vh + vl
        mu_r = mu.astype(dt)
        inv_r = (T(1) / np.sqrt(vr.astype(dt) + e)).astype(dt)
        cnt = T(s.shape[0])
        v = T(1) / inv_r
        v = (v * v - e) * cnt
        f = T(1) / (n + cnt)
        var_n = var_n + v + (avg - mu_r) * (avg - mu_r) * n * cnt * f
        avg = n * f * avg + cnt * f * mu_r
        n = n + cnt
    var = var_n / n
    invstd = T(1) / np.sqrt(var + e)
    return avg.astype(np.float64), var.astype(np.float64), invstd.astype(np.float64)


def _exact(slices):
    """Double-double (mean, var) per channel of the concatenated batch, as float64 pairs."""
    from .algorithms import exact_stats

    x = np.concatenate([s for s in slices if s.shape[0]])
    out = np.empty((4, x.shape[1]))
    for c in range(x.shape[1]):
        out[:, c] = exact_stats(np.ascontiguousarray(x[:, c]))
    return out  # rows: mean_hi, mean_lo, var_hi, var_lo


def _rel(value, hi, lo):
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs((value - hi) - lo) / np.abs(hi)


# ------------------------------------------------------------------------------------- (d1)


def run_ranks(cfg: DistributedConfig, step: Callable[[int], None]) -> pd.DataFrame:
    pop = POPULATIONS[cfg.population]
    mu, sd, var = pop.mean, pop.sd, pop.var
    C = cfg.channels
    batches = max(1, cfg.replicates // C)
    rows = []
    for K in cfg.ranks:
        for n in cfg.per_rank:
            rng = rng_for(cfg.seed, "distributed", "ranks", K, n)
            e_mean_l, e_var_l, e_mean_s, e_var_s = [], [], [], []
            y_ls, y_lp, y_sp, count = 0.0, 0.0, 0.0, 0
            for _ in range(batches):
                x = pop.draw(rng, (K, n, C))
                loc_mean = np.empty((K, C))
                loc_var = np.empty((K, C))
                for r in range(K):
                    mean_r, m2_r = rank_stats(x[r])
                    loc_mean[r], loc_var[r] = mean_r, m2_r / n
                _, s_mean, s_var = synchronized(list(x))
                e_mean_l.append((loc_mean - mu) / sd)
                e_var_l.append((loc_var - var) / var)
                e_mean_s.append((s_mean - mu) / sd)
                e_var_s.append((s_var - var) / var)
                y_loc = (x - loc_mean[:, None, :]) / np.sqrt(loc_var[:, None, :] + EPS)
                y_syn = (x - s_mean) / np.sqrt(s_var + EPS)
                y_pop = (x - mu) / sd
                y_ls += float(np.sum((y_loc - y_syn) ** 2))
                y_lp += float(np.sum((y_loc - y_pop) ** 2))
                y_sp += float(np.sum((y_syn - y_pop) ** 2))
                count += x.size
            m = K * n

            def rms(parts):
                return float(np.sqrt(np.mean(np.concatenate([p.ravel() for p in parts]) ** 2)))

            rows.append({
                "ranks": K, "per_rank_m": n, "global_m": m, "population": cfg.population,
                "replicates": batches * C,
                "mean_rmse_local": rms(e_mean_l), "mean_rmse_sync": rms(e_mean_s),
                "mean_theory_local": 1 / math.sqrt(n), "mean_theory_sync": 1 / math.sqrt(m),
                "var_rel_rmse_local": rms(e_var_l), "var_rel_rmse_sync": rms(e_var_s),
                "var_theory_local": var_rmse_theory(var, pop.mu4, n) / var,
                "var_theory_sync": var_rmse_theory(var, pop.mu4, m) / var,
                "y_rms_local_vs_sync": math.sqrt(y_ls / count),
                "y_rms_local_vs_population": math.sqrt(y_lp / count),
                "y_rms_sync_vs_population": math.sqrt(y_sp / count),
            })
            step(1)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- (d2)

#: d2's merges: name -> function of the rank slices returning (mean, biased var) in float64.
PMEAN_METHODS: dict[str, Callable] = {
    "nbbn (count, mean, M2), Chan, float64": lambda sl: synchronized(sl)[1:],
    "pmean E[x], E[x²], equal weights, float32": lambda sl: pmean_fast(sl, np.float32),
    "pmean E[x], E[x²], equal weights, float64": lambda sl: pmean_fast(sl, np.float64),
    "E[x], E[x²], count weights, float32": lambda sl: pmean_fast(sl, np.float32, "count"),
    "pmean two-pass, equal weights, float64": pmean_two_pass,
}


def run_pmean(cfg: DistributedConfig, step: Callable[[int], None]) -> pd.DataFrame:
    C = cfg.channels
    batches = max(1, cfg.replicates // C)
    rows = []
    for pattern, counts in cfg.patterns.items():
        K = len(counts)
        for kappa in cfg.kappas:
            for shard in cfg.shards:
                rng = rng_for(cfg.seed, "distributed", "pmean", pattern, kappa, shard)
                errs = {name: ([], []) for name in PMEAN_METHODS}
                for _ in range(batches):
                    slices = []
                    for r, n in enumerate(counts):
                        shift = (r - (K - 1) / 2) * 0.5 if shard == "shifted" else 0.0
                        slices.append((kappa + shift + rng.standard_normal((n, C)))
                                      .astype(np.float32))
                    ref = _exact(slices)
                    sd = np.sqrt(ref[2])
                    for name, fn in PMEAN_METHODS.items():
                        mean, v = fn(slices)
                        with np.errstate(invalid="ignore"):
                            errs[name][0].append(np.abs((mean - ref[0]) - ref[1]) / sd)
                        errs[name][1].append(_rel(v, ref[2], ref[3]))
                for name, (em, ev) in errs.items():
                    em, ev = np.concatenate(em), np.concatenate(ev)
                    em = np.where(np.isnan(em), np.inf, em)
                    ev = np.where(np.isnan(ev), np.inf, ev)
                    rows.append({
                        "pattern": pattern, "counts": ",".join(map(str, counts)),
                        "kappa": kappa, "shard": shard, "method": name,
                        "replicates": len(em),
                        "mean_err_in_sd_median": float(np.median(em)),
                        "mean_err_in_sd_max": float(np.max(em)),
                        "var_rel_err_median": float(np.median(ev)),
                        "var_rel_err_max": float(np.max(ev)),
                    })
                step(1)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------------- (d3)

INVSTD_METHODS: dict[str, Callable] = {
    "nbbn (count, mean, M2), float64": None,
    "(mean, invstd, count), float32 (PyTorch SyncBatchNorm)":
        lambda sl: invstd_exchange(sl, np.float32),
    "(mean, invstd, count), float64": lambda sl: invstd_exchange(sl, np.float64),
}


def run_invstd(cfg: DistributedConfig, step: Callable[[int], None]) -> pd.DataFrame:
    from .algorithms import exact_invstd

    C = cfg.channels
    batches = max(1, cfg.replicates // C // 4)  # the emulation is per channel: fewer batches
    counts = cfg.invstd_counts
    rows = []
    for var in cfg.variances:
        rng = rng_for(cfg.seed, "distributed", "invstd", var)
        errs = {name: ([], [], []) for name in INVSTD_METHODS}
        for _ in range(batches):
            slices = [(math.sqrt(var) * rng.standard_normal((n, C))).astype(np.float32)
                      for n in counts]
            ref = _exact(slices)
            inv_ref = np.array([sum(exact_invstd(ref[2, c], ref[3, c], EPS)) for c in range(C)])
            for name, fn in INVSTD_METHODS.items():
                if fn is None:
                    _, mean, v = synchronized(slices)
                    inv = 1.0 / np.sqrt(v + EPS)
                else:
                    mean, v, inv = fn(slices)
                errs[name][0].append(_rel(v, ref[2], ref[3]))
                errs[name][1].append(np.abs(inv - inv_ref) / inv_ref)
                errs[name][2].append(v <= 0)
        for name, (ev, ei, nonpos) in errs.items():
            ev, ei, nonpos = np.concatenate(ev), np.concatenate(ei), np.concatenate(nonpos)
            rows.append({
                "var": var, "eps": EPS, "var_over_eps": var / EPS,
                "counts": ",".join(map(str, counts)), "method": name, "replicates": len(ev),
                "var_rel_err_median": float(np.median(ev)),
                "var_rel_err_max": float(np.max(ev)),
                "var_nonpositive_frac": float(np.mean(nonpos)),
                "invstd_rel_err_max": float(np.max(ei)),
                "theory_u32_eps_over_var": U32 * (var + EPS) / var,
            })
        step(1)
    return pd.DataFrame(rows)


# ------------------------------------------------------------------------------- reporting


def run_part(cfg: DistributedConfig, step: Callable[[int], None]) -> dict[str, pd.DataFrame]:
    """The three tables of part (d), by name. Numba runs one thread meanwhile, as each rank does
    under mpiexec (the slices are small; a parallel region per slice only adds waiting)."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        return {"distributed_ranks": run_ranks(cfg, step),
                "distributed_pmean": run_pmean(cfg, step),
                "distributed_invstd": run_invstd(cfg, step)}
    finally:
        numba.set_num_threads(threads)


def _g(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if math.isinf(v):
        return "NaN/inf"
    return f"{v:.2g}"


def findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    """Key findings, read off the tables."""
    out = []
    rk = tables.get("distributed_ranks")
    if rk is not None and len(rk):
        many = rk[rk["ranks"] == rk["ranks"].max()]
        small = many[many["per_rank_m"] == many["per_rank_m"].min()].iloc[0]
        out.append(
            f"**Per-rank vs synchronized statistics** (normal data): the per-rank batch mean "
            f"is off by {_g(small['mean_rmse_local'])} σ (RMS) at n = {small['per_rank_m']} "
            f"values per rank, whatever the number of ranks; synchronized over "
            f"{small['ranks']} ranks it is {_g(small['mean_rmse_sync'])} σ (theory "
            f"1/√(K·n) = {_g(small['mean_theory_sync'])}). The variance: "
            f"{_g(small['var_rel_rmse_local'])} vs {_g(small['var_rel_rmse_sync'])} (relative "
            "RMSE). Measured/theory over the whole grid: mean "
            f"{_g((rk['mean_rmse_sync'] / rk['mean_theory_sync']).min())}–"
            f"{_g((rk['mean_rmse_sync'] / rk['mean_theory_sync']).max())}, variance "
            f"{_g((rk['var_rel_rmse_sync'] / rk['var_theory_sync']).min())}–"
            f"{_g((rk['var_rel_rmse_sync'] / rk['var_theory_sync']).max())}: synchronizing K "
            "ranks of n is exactly one batch of K·n.")
        two = rk[(rk["ranks"] > 1)]
        if len(two):
            worst = two.sort_values("y_rms_local_vs_sync").iloc[-1]
            big = two[two["per_rank_m"] == two["per_rank_m"].max()]
            out.append(
                "**Outputs**: each rank's locally normalized y differs from the synchronized y "
                f"by {_g(worst['y_rms_local_vs_sync'])} (RMS, y in units of σ) at n = "
                f"{worst['per_rank_m']} per rank and {worst['ranks']} ranks, and still by "
                f"{_g(big['y_rms_local_vs_sync'].max())} at n = {big['per_rank_m'].iloc[0]}. "
                "Against the population-normalized output, local y is off by "
                f"{_g(worst['y_rms_local_vs_population'])} where synchronized y is off by "
                f"{_g(worst['y_rms_sync_vs_population'])}.")
    pm = tables.get("distributed_pmean")
    if pm is not None and len(pm):
        nb = pm[pm["method"].str.startswith("nbbn")]
        out.append(
            "**Count-weighted (count, mean, M2) merge** (nbbn): worst error over every count "
            f"pattern, κ and shard: mean {_g(nb['mean_err_in_sd_max'].max())} σ, variance "
            f"{_g(nb['var_rel_err_max'].max())} (float32 data; float64 statistics), including a "
            "rank with no rows.")
        uneven = pm[~pm["pattern"].str.startswith(("even", "one empty"))]
        for shard in ("iid", "shifted"):
            sub = uneven[(uneven["shard"] == shard) & (uneven["kappa"] == uneven["kappa"].min())]
            tp = sub[sub["method"].str.startswith("pmean two-pass")]
            if len(tp):
                out.append(
                    f"**Equal-weight pmean with uneven counts, {shard} shards** (κ = "
                    f"{kappa_name(sub['kappa'].iloc[0])}; the two-pass float64 variant isolates "
                    f"the weighting): median mean error {_g(tp['mean_err_in_sd_median'].min())}–"
                    f"{_g(tp['mean_err_in_sd_median'].max())} σ and variance "
                    f"{_g(tp['var_rel_err_median'].min())}–{_g(tp['var_rel_err_median'].max())} "
                    "over the uneven patterns"
                    + (": an extra sampling error, as if the batch were smaller" if shard == "iid"
                       else ": a bias, from weighting small shards up") + ".")
        hi = pm[(pm["kappa"] == pm["kappa"].max()) & (pm["pattern"].str.startswith("even"))]
        f32 = hi[hi["method"] == "pmean E[x], E[x²], equal weights, float32"]
        cw = hi[hi["method"] == "E[x], E[x²], count weights, float32"]
        if len(f32):
            out.append(
                f"**E[x²] − E[x]² in float32 at κ = {kappa_name(hi['kappa'].iloc[0])}** (Flax's "
                "default "
                "fast variance), even counts: variance error median "
                f"{_g(f32['var_rel_err_median'].min())}, worst {_g(f32['var_rel_err_max'].max())}"
                f"; count weights do not help ({_g(cw['var_rel_err_median'].min())}): the "
                "cancellation, not the weighting, is the fault there.")
        empty = pm[pm["pattern"].str.startswith("one empty")
                   & pm["method"].str.contains("equal weights")]
        if len(empty) and np.isinf(empty["var_rel_err_max"]).all():
            out.append("**An empty rank** makes every equal-weight pmean NaN (its E[x] is 0/0); "
                       "the count-weighted merge skips it.")
    iv = tables.get("distributed_invstd")
    if iv is not None and len(iv):
        pt = iv[iv["method"].str.contains("PyTorch")].sort_values("var")
        nb = iv[iv["method"].str.startswith("nbbn")]
        bad = pt[pt["var_rel_err_median"] > 1e-3]
        first_bad = bad["var"].max() if len(bad) else None
        nonpos = pt[pt["var_nonpositive_frac"] > 0]
        out.append(
            "**(mean, invstd) exchange** (PyTorch SyncBatchNorm, float32, ε = 1e-5): the "
            "rebuilt variance 1/invstd² − ε loses u·ε/σ²: median relative error "
            + ", ".join(f"{_g(r['var_rel_err_median'])} at σ² = {r['var']:g}"
                        for _, r in pt.iterrows() if r["var"] in (1.0, 1e-4, 1e-6, 1e-8))
            + (f"; above 1e-3 from σ² = {first_bad:g} down" if first_bad is not None else "")
            + (f"; from σ² = {nonpos['var'].max():g} (below u·ε) the merged σ² is ≤ 0 in "
               f"{100 * nonpos.sort_values('var').iloc[-1]['var_nonpositive_frac']:.0f}% of the "
               "channels" if len(nonpos) else "")
            + f". (count, mean, M2) in float64: ≤ {_g(nb['var_rel_err_max'].max())} at every "
            f"σ². The normalizing invstd is hardly affected (worst "
            f"{_g(pt['invstd_rel_err_max'].max())}: σ² + ε ≈ ε), so the damage lands in the "
            "running variance, the statistic inference uses.")
    return out


def markdown(meta: dict, tables: dict[str, pd.DataFrame], figures: list[str],
             note: str | None) -> str:
    from .report import markdown_table

    lines = ["# nbbn accuracy study, part (d): statistics across processes", "",
             f"Command: `{meta['command']}`", "",
             f"Run {meta['date']} on {meta['cpu']} ({meta['cpus']} CPUs, {meta['threads']} Numba "
             f"threads), Python {meta['python_version']}, NumPy {meta['numpy_version']}, Numba "
             f"{meta['numba_version']}, nbbn {meta['nbbn_version']}; seed {meta['seed']}; wall "
             f"time {meta['wall_s']:.0f} s.", "",
             "Tables beside this file (CSV, one row per point): "
             + ", ".join(f"`{k}.csv`" for k in tables)
             + ". Method and formulas: the docstring of `nbbn/accuracy/across_ranks.py`. The "
             "ranks' arithmetic is nbbn.distributed's own (cpu statistics per slice, "
             "`merge_stats`); MPI only carries its float64 bytes.", "",
             "## Key findings", ""]
    lines += [f"- {f}" for f in findings(tables)]
    rk = tables.get("distributed_ranks")
    if rk is not None and len(rk):
        lines += ["", "## (d1) Per-rank vs synchronized statistics", "",
                  "RMSE of the batch mean in units of σ, local (each rank alone, n values) and "
                  "synchronized (K ranks, K·n values); normal N(1, 2²).", ""]
        piv = rk.pivot(index="per_rank_m", columns="ranks", values="mean_rmse_sync")
        piv.insert(0, "local (any K)", rk.groupby("per_rank_m")["mean_rmse_local"].mean())
        piv.columns = [c if isinstance(c, str) else f"sync K={c}" for c in piv.columns]
        lines.append(markdown_table(piv.rename_axis("n per rank"), ".2g"))
        lines += ["", "RMS of y_local − y_sync (y in units of σ):", ""]
        piv = rk.pivot(index="per_rank_m", columns="ranks", values="y_rms_local_vs_sync")
        piv.columns = [f"K={c}" for c in piv.columns]
        lines.append(markdown_table(piv.rename_axis("n per rank"), ".2g"))
    pm = tables.get("distributed_pmean")
    if pm is not None and len(pm):
        lines += ["", "## (d2) Count-weighted merge vs equal-weight pmean", "",
                  "Median relative error of the merged biased variance (inf = NaN result), "
                  "K = 4 ranks, float32 data.", ""]
        for kappa in sorted(pm["kappa"].unique()):
            for shard in pm["shard"].unique():
                sub = pm[(pm["kappa"] == kappa) & (pm["shard"] == shard)]
                piv = sub.pivot(index="method", columns="pattern", values="var_rel_err_median")
                piv = piv[list(dict.fromkeys(sub["pattern"]))].loc[list(PMEAN_METHODS)]
                lines += [f"κ = {kappa_name(kappa)}, {shard} shards:", "",
                          markdown_table(piv, ".2g"), ""]
        lines += ["Median error of the merged mean in units of σ, κ = 1:", ""]
        sub = pm[pm["kappa"] == pm["kappa"].min()]
        piv = sub.pivot_table(index="method", columns=["shard", "pattern"],
                              values="mean_err_in_sd_median", sort=False)
        lines.append(markdown_table(piv.loc[list(PMEAN_METHODS)], ".2g"))
    iv = tables.get("distributed_invstd")
    if iv is not None and len(iv):
        lines += ["", "## (d3) (mean, invstd) vs (count, mean, M2) when σ² ≪ ε", "",
                  f"ε = {EPS:g}, zero-mean float32 data, counts {iv['counts'].iloc[0]}. Median "
                  "relative error of the merged σ² (feeds the running variance); last column: "
                  "fraction of channels whose merged σ² ≤ 0 (PyTorch float32).", ""]
        piv = iv.pivot(index="var", columns="method", values="var_rel_err_median")
        piv = piv[list(INVSTD_METHODS)].sort_index(ascending=False)
        pt = iv[iv["method"].str.contains("PyTorch")].set_index("var")
        piv["u·(σ²+ε)/σ²"] = pt["theory_u32_eps_over_var"]
        piv["σ² ≤ 0 (PyTorch)"] = pt["var_nonpositive_frac"]
        lines.append(markdown_table(piv.rename_axis("σ²"), ".2g"))
    if figures:
        lines += ["", "## Figures", ""] + [f"![{f}]({f})" for f in figures]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def write_plots(out: Path, tables: dict[str, pd.DataFrame]) -> tuple[list[Path], str | None]:
    plt, why = pyplot()
    if plt is None:
        return [], why
    paths = []
    rk = tables.get("distributed_ranks")
    if rk is not None and len(rk):
        fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
        loc = rk.groupby("per_rank_m", as_index=False).mean(numeric_only=True)
        for ax, col, theory, title in (
                (axes[0], "mean_rmse", "mean_theory", "batch mean: RMSE / σ"),
                (axes[1], "var_rel_rmse", "var_theory", "batch variance: RMSE / σ²")):
            ax.loglog(loc["per_rank_m"], loc[f"{col}_local"], "k-o", lw=2, label="local (any K)")
            for K, g in rk[rk["ranks"] > 1].groupby("ranks"):
                line, = ax.loglog(g["per_rank_m"], g[f"{col}_sync"], "-o", ms=3,
                                  label=f"sync K = {K}")
                ax.loglog(g["per_rank_m"], g[f"{theory}_sync"], ":", color=line.get_color())
            ax.set_xlabel("n = values per channel per rank")
            ax.set_title(title + " (dotted: theory)", fontsize=9)
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=7)
        ax = axes[2]
        for K, g in rk[rk["ranks"] > 1].groupby("ranks"):
            ax.loglog(g["per_rank_m"], g["y_rms_local_vs_sync"], "-o", ms=3, label=f"K = {K}")
        ax.set_xlabel("n = values per channel per rank")
        ax.set_title("RMS(y_local − y_sync)", fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        fig.suptitle("(d1) per-rank vs synchronized batch statistics, normal data")
        paths.append(_save(fig, plt, out / "distributed_ranks.png"))
    pm = tables.get("distributed_pmean")
    if pm is not None and len(pm):
        shards = list(dict.fromkeys(pm["shard"]))
        kappas = sorted(pm["kappa"].unique())
        fig, axes = plt.subplots(len(kappas), len(shards), figsize=(6.5 * len(shards),
                                 3.6 * len(kappas)), squeeze=False)
        pats = list(dict.fromkeys(pm["pattern"]))
        for i, kappa in enumerate(kappas):
            for j, shard in enumerate(shards):
                ax = axes[i][j]
                sub = pm[(pm["kappa"] == kappa) & (pm["shard"] == shard)]
                for k, name in enumerate(PMEAN_METHODS):
                    g = sub[sub["method"] == name].set_index("pattern").loc[pats]
                    v = np.clip(np.where(np.isinf(g["var_rel_err_median"]), 1e2,
                                         g["var_rel_err_median"]), 1e-17, 1e2)
                    ax.semilogy(np.arange(len(pats)) + 0.08 * (k - 2), v, "o", label=name)
                ax.set_xticks(range(len(pats)), [p.rsplit(" ", 1)[0] for p in pats])
                ax.set_title(f"κ = {kappa_name(kappa)}, {shard} shards (NaN drawn at 1e2)",
                             fontsize=9)
                ax.set_ylabel("median rel. error of σ²")
                ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=6)
        fig.suptitle("(d2) merging per-rank statistics with uneven counts (K = 4)")
        paths.append(_save(fig, plt, out / "distributed_pmean.png"))
    iv = tables.get("distributed_invstd")
    if iv is not None and len(iv):
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        for name in INVSTD_METHODS:
            g = iv[iv["method"] == name].sort_values("var")
            ax.loglog(g["var_over_eps"], np.clip(g["var_rel_err_median"], 1e-17, None), "-o",
                      ms=4, label=name)
        g = iv.drop_duplicates("var").sort_values("var")
        ax.loglog(g["var_over_eps"], g["theory_u32_eps_over_var"], "k:", label="u·(σ²+ε)/σ²")
        ax.set_xlabel("σ² / ε  (ε = 1e-5)")
        ax.set_ylabel("median rel. error of merged σ²")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        ax.set_title("(d3) what the ranks exchange", fontsize=10)
        paths.append(_save(fig, plt, out / "distributed_invstd.png"))
    return paths, None


def _save(fig, plt, path: Path) -> Path:
    return save_figure(fig, path)


def write_outputs(out: Path, meta: dict, tables: dict[str, pd.DataFrame], plots: bool) -> list:
    """distributed.md and the figures (the tables are written by the caller)."""
    figures, note = [], "plots skipped: --no-plots"
    if plots:
        paths, note = write_plots(out, tables)
        figures = [p.name for p in paths]
    (out / "distributed.md").write_text(markdown(meta, tables, figures, note), encoding="utf-8")
    return figures
