"""Part (c): population estimators fed by a stream of mini-batches, and the train–inference gap.

R independent streams run side by side as the R channels of one NC batch x of shape (m, R), so
one kernel call advances every stream. After k batches of m values each (batch mean μ_j, biased
variance σ²_j, unbiased s²_j = m/(m − 1)·σ²_j):

* ``ema`` (PyTorch convention, momentum a; running_mean starts at 0, running_var at 1, as
  PyTorch's buffers do), updated by the nbbn forward-train kernel itself:
      r_μ ← (1 − a)·r_μ + a·μ_j,     r_σ² ← (1 − a)·r_σ² + a·s²_j
  theory: E[r_μ] = (1 − (1 − a)^k)·μ, E[r_σ²] = (1 − a)^k + (1 − (1 − a)^k)·σ²,
          Var = a/(2 − a)·(1 − (1 − a)^{2k})·Var(batch statistic).
* ``cumulative-unbiased`` (Ioffe & Szegedy 2015, Algorithm 2): E[x] = mean of the μ_j,
  Var[x] = m/(m − 1)·mean of the σ²_j; unbiased, Var = Var(batch statistic)/k.
* ``cumulative-biased``: the mean of the σ²_j without the correction; bias −σ²/m at every k.

Var(μ_j) = σ²/m and Var(s²_j) = (μ4 − σ⁴(m − 3)/(m − 1))/m (see :mod:`nbbn.accuracy.sampling`).
``bias`` and ``rmse`` are over the R streams; ``bias_se`` is the standard error of the bias.
``ema_kernel_dev`` checks the kernel: the largest difference, over the stream, between its running
statistics and the same update done here in plain float64 (relative to σ and σ²). The kernels run
with one Numba thread in this part: thousands of calls on small batches, where waking threads
costs more than the work (the results do not depend on the thread count).

The train–inference gap of one batch x of m values,
    gap = ‖BN_train(x) − BN_infer(x)‖₂ / ‖BN_infer(x)‖₂,
BN_train normalizing by the batch's own μ_B, σ²_B and BN_infer by the exact population μ, σ²
(``inference_stats = "population"``) or by an estimator's values after the stream; both run
through the nbbn kernels (γ = 1, β = 0, ε = 1e-5). With z = (x − μ)/σ, δ = (μ_B − μ)/σ and
ρ = σ_B/σ (ε neglected) it is exactly gap² = ((1 − ρ)² + δ²)/(ρ² + δ²), whose mean is to first
order (1 + (μ4/σ⁴ − 1)/4)/m: √(3/(2m)) for normal data (``theory``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..seeds import rng_for
from .common import POPULATIONS
from .sampling import DEFAULT_SIZES as SAMPLING_SIZES
from .sampling import QUICK_SIZES as SAMPLING_QUICK_SIZES

MOMENTA = (0.01, 0.1, 0.5)
DEFAULT_SIZES = [2, 8, 32, 128, 512]
QUICK_SIZES = [4, 32]
DEFAULT_STREAMS, QUICK_STREAMS = 256, 128
DEFAULT_BATCHES, QUICK_BATCHES = 1000, 200
CHECKPOINTS = (1, 2, 3, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
#: Values drawn per (population, m) stream set at most (R·K·m).
WORK_LIMIT = 2**28
#: Test batches of m values per (population, m) for the train–inference gap.
GAP_LIMIT = 2**24
EPS = 1e-5
INIT_MEAN, INIT_VAR = 0.0, 1.0


@dataclass
class EstimatorConfig:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    gap_sizes: list[int] = field(default_factory=lambda: list(SAMPLING_SIZES))
    distributions: list[str] = field(default_factory=lambda: list(POPULATIONS))
    streams: int = DEFAULT_STREAMS
    batches: int = DEFAULT_BATCHES
    momenta: tuple[float, ...] = MOMENTA
    seed: int = 0

    @classmethod
    def quick(cls, **kw) -> EstimatorConfig:
        return cls(sizes=list(QUICK_SIZES), gap_sizes=list(SAMPLING_QUICK_SIZES),
                   streams=QUICK_STREAMS, batches=QUICK_BATCHES, **kw)

    def plan(self) -> tuple[list[tuple[str, int, bool, bool]], list[dict]]:
        """(distribution, m, run the stream, measure the gap) per configuration, and skips."""
        todo, skipped = [], []
        for name in self.distributions:
            for m in sorted(set(self.sizes) | set(self.gap_sizes)):
                stream = m in self.sizes
                gap = True
                if stream and self.streams * self.batches * m > WORK_LIMIT:
                    stream = False
                    skipped.append({"part": "estimators", "item": f"{name} m={m} streams",
                                    "reason": f"{self.streams} streams × {self.batches} batches × "
                                              f"m exceed the {WORK_LIMIT}-value budget"})
                if self.streams * m > GAP_LIMIT:
                    gap = False
                    skipped.append({"part": "estimators", "item": f"{name} m={m} gap",
                                    "reason": f"{self.streams} test batches × m exceed the "
                                              f"{GAP_LIMIT}-value budget"})
                if stream or gap:
                    todo.append((name, m, stream, gap))
        return todo, skipped


class Kernels:
    """Forward-train (with the running update) and inference through the public nbbn API, or
    through :mod:`nbbn.reference` when the default backend cannot run here (said in ``note``)."""

    def __init__(self):
        import nbbn

        self.note = None
        self._nbbn = nbbn
        try:
            x = np.arange(8.0).reshape(4, 2)
            rm, rv = np.zeros(2), np.ones(2)
            nbbn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.5, eps=EPS)
            nbbn.batch_norm_infer(x, rm, rv, eps=EPS)
            self.impl = "nbbn"
        except Exception as exc:
            self.impl = "reference"
            self.note = (f"nbbn's default backend failed ({type(exc).__name__}: {exc}); the EMA "
                         "and BN_train/BN_infer used nbbn.reference instead")

    def train(self, x, rm=None, rv=None, momentum=0.1) -> np.ndarray:
        """y of BN_train(x); updates rm, rv in place (PyTorch convention) when given."""
        if self.impl == "nbbn":
            return self._nbbn.batch_norm_train(x, running_mean=rm, running_var=rv,
                                               momentum=momentum, eps=EPS)[0]
        from .. import reference

        y, mean, _, var = reference.forward_train(x, eps=EPS)
        if rm is not None:
            rm[:], rv[:] = reference.running_update(rm, rv, mean, var, x.shape[0], momentum)
        return y

    def infer(self, x, rm, rv) -> np.ndarray:
        if self.impl == "nbbn":
            return self._nbbn.batch_norm_infer(x, rm, rv, eps=EPS)
        from .. import reference

        return reference.inference(x, rm, rv, eps=EPS)


def _var_s2(var: float, mu4: float, m: int) -> float:
    return (mu4 - var * var * (m - 3) / (m - 1)) / m


def theory(estimator: str, momentum: float, stat: str, pop, m: int, k: int
           ) -> tuple[float, float]:
    """(bias, rmse) of an estimator after k independent batches of m values (module docstring)."""
    if stat == "mean":
        target, init, v_batch = pop.mean, INIT_MEAN, pop.var / m
    else:
        target, init, v_batch = pop.var, INIT_VAR, _var_s2(pop.var, pop.mu4, m)
    if estimator == "ema":
        a = momentum
        decay = (1 - a) ** k
        bias = decay * (init - target)
        var = a / (2 - a) * (1 - decay * decay) * v_batch
    elif estimator == "cumulative-unbiased":
        bias, var = 0.0, v_batch / k
    elif estimator == "cumulative-biased":
        if stat == "mean":
            bias, var = 0.0, v_batch / k
        else:
            bias, var = -pop.var / m, ((m - 1) / m) ** 2 * v_batch / k
    else:
        raise ValueError(estimator)
    return bias, math.sqrt(bias * bias + var)


def _max_rel_dev(got, want, pop) -> float:
    """Largest |kernel − float64 update| over both running statistics, relative to σ and σ²."""
    return max(float(np.max(np.abs(got[0] - want[0]))) / pop.sd,
               float(np.max(np.abs(got[1] - want[1]))) / pop.var)


def _estimator_rows(name, pop, est, a, m, k, mu_hat, var_hat) -> list[dict]:
    rows = []
    for stat, values, target, scale in (("mean", mu_hat, pop.mean, pop.sd),
                                        ("var", var_hat, pop.var, pop.var)):
        err = values - target
        bias = float(err.mean())
        rmse = float(np.sqrt((err * err).mean()))
        t_bias, t_rmse = theory(est, a, stat, pop, m, k)
        rows.append({
            "distribution": name, "estimator": est, "momentum": a, "m": m, "batches": k,
            "stat": stat, "bias": bias, "rmse": rmse,
            "bias_se": float(err.std() / math.sqrt(len(err))),
            "rel_bias_se": float(err.std() / math.sqrt(len(err))) / scale,
            "theory_bias": t_bias, "theory_rmse": t_rmse,
            "rel_bias": bias / scale, "rel_rmse": rmse / scale, "streams": len(err),
        })
    return rows


def _gap(y_train: np.ndarray, y_infer: np.ndarray) -> np.ndarray:
    """Per channel ‖y_train − y_infer‖₂/‖y_infer‖₂ over the m values (axis 0)."""
    return (np.linalg.norm(y_train - y_infer, axis=0)
            / np.maximum(np.linalg.norm(y_infer, axis=0), np.finfo(float).tiny))


def gap_theory(pop, m: int) -> float:
    """√((1 + (μ4/σ⁴ − 1)/4)/m), the first-order RMS train–inference gap."""
    return math.sqrt((1 + (pop.kurtosis - 1) / 4) / m)


def run_estimators(cfg: EstimatorConfig, progress: Callable[[int], None] = lambda n: None,
                   kernels: Kernels | None = None
                   ) -> tuple[pd.DataFrame, pd.DataFrame, list[dict]]:
    """Estimator rows (estimator, momentum, m, batches, stat, bias, rmse, theory, ...), gap rows
    (distribution, m, inference_stats, gap_rms, ...), and skips."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)  # thousands of small calls: waking threads costs more than the work
    try:
        return _run(cfg, progress, kernels or Kernels())
    finally:
        numba.set_num_threads(threads)


def _run(cfg: EstimatorConfig, progress, kernels: Kernels):
    todo, skipped = cfg.plan()
    if kernels.note:
        skipped.append({"part": "estimators", "item": "nbbn kernels", "reason": kernels.note})
    est_rows, gap_rows = [], []
    R, K = cfg.streams, cfg.batches
    checkpoints = sorted({k for k in CHECKPOINTS if k <= K} | {K})
    for name, m, do_stream, do_gap in todo:
        pop = POPULATIONS[name]
        finals: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        if do_stream:
            rng = rng_for(cfg.seed, "estimators", name, m)
            ema = {a: (np.full(R, INIT_MEAN), np.full(R, INIT_VAR)) for a in cfg.momenta}
            ema_ref = {a: (np.full(R, INIT_MEAN), np.full(R, INIT_VAR)) for a in cfg.momenta}
            sum_mean, sum_var = np.zeros(R), np.zeros(R)
            ema_dev = 0.0
            for k in range(1, K + 1):
                x = pop.draw(rng, (m, R))
                for a in cfg.momenta:
                    kernels.train(x, ema[a][0], ema[a][1], a)
                bm = x.mean(axis=0)
                bv = ((x - bm) ** 2).mean(axis=0)
                sum_mean += bm
                sum_var += bv
                for a in cfg.momenta:  # the same update in plain float64, to check the kernel
                    rm, rv = ema_ref[a]
                    rm *= 1 - a
                    rm += a * bm
                    rv *= 1 - a
                    rv += a * bv * (m / (m - 1))
                if k in checkpoints:
                    estimates = {("cumulative-unbiased", math.nan):
                                 (sum_mean / k, sum_var / k * (m / (m - 1))),
                                 ("cumulative-biased", math.nan): (sum_mean / k, sum_var / k)}
                    for a in cfg.momenta:
                        estimates[("ema", a)] = (ema[a][0].copy(), ema[a][1].copy())
                        ema_dev = max(ema_dev, _max_rel_dev(ema[a], ema_ref[a], pop))
                    for (est, a), (mu_hat, var_hat) in estimates.items():
                        est_rows += _estimator_rows(name, pop, est, a, m, k, mu_hat, var_hat)
                        est_rows[-1]["ema_impl"] = est_rows[-2]["ema_impl"] = kernels.impl
                    if k == K:
                        finals = {f"{e}" if e != "ema" else f"ema-{a:g}": v
                                  for (e, a), v in estimates.items()}
            for r in est_rows:
                if r["distribution"] == name and r["m"] == m:
                    r["ema_kernel_dev"] = ema_dev
        if do_gap:
            rng = rng_for(cfg.seed, "gap", name, m)
            x = pop.draw(rng, (m, R))
            y_train = np.asarray(kernels.train(x), dtype=np.float64)
            stats = {"population": (np.full(R, pop.mean), np.full(R, pop.var))}
            stats |= {k: v for k, v in finals.items()
                      if k in ("cumulative-unbiased", "cumulative-biased") or k.startswith("ema")}
            for label, (rm, rv) in stats.items():
                g = _gap(y_train, np.asarray(kernels.infer(x, rm, rv), dtype=np.float64))
                gap_rows.append({
                    "distribution": name, "m": m, "inference_stats": label,
                    "stream_batches": 0 if label == "population" else K,
                    "gap_rms": float(np.sqrt((g * g).mean())), "gap_mean": float(g.mean()),
                    "gap_median": float(np.median(g)),
                    "theory": gap_theory(pop, m) if label == "population" else math.nan,
                    "test_batches": R,
                })
        progress(1)
    return pd.DataFrame(est_rows), pd.DataFrame(gap_rows), skipped
