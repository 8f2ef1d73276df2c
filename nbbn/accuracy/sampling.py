"""Part (b): sampling error of the batch statistics against the population.

B mini-batches of m values each are drawn from a population with known moments (μ, σ², μ4);
each batch's mean μ_B and biased variance σ²_B are computed exactly enough (float64 two-pass:
the sampling error is the object here, not rounding), and their RMSE against the population is
set beside the theory for i.i.d. draws:

    RMSE(μ_B)  = σ/√m
    RMSE(σ²_B)² = bias² + Var(σ²_B),   bias = −σ²/m,   Var(σ²_B) = ((m − 1)/m)²·Var(s²),
    Var(s²)    = (μ4 − σ⁴·(m − 3)/(m − 1))/m          (s² = m/(m − 1)·σ²_B, unbiased)

For NCHW, m = N·H·W; for i.i.d. values only m matters (how it splits into N and H·W does not),
so the synthetic populations are indexed by m alone. Real activations are not i.i.d. within an
image: given a 4-D (N, C, H, W) or 3-D (N, C, L) array, batches are drawn both as m i.i.d. values
of a channel (``sampling = "iid"``) and as n whole images (``sampling = "images"``, m = n·H·W);
the ratio (rmse/theory)² of the latter is the design effect, the factor by which spatial
correlation shrinks the effective m. A population given as an array takes the array's own
per-channel moments and is sampled with replacement, so the i.i.d. theory holds for it exactly.

The estimated RMSE has a relative standard error ``rmse_rel_se`` = ½·sd(e²)/(√B·mean(e²)) (from
the batches themselves; ≈ 1/√(2B) for normal errors).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..seeds import rng_for
from .common import POPULATIONS, StudyError

DEFAULT_SIZES = [2, 3, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384]
QUICK_SIZES = [2, 4, 16, 64, 256, 1024]
DEFAULT_BATCHES = 2000
QUICK_BATCHES = 400
#: Values drawn per (population, m) at most; B shrinks (not below MIN_BATCHES) to fit it.
WORK_LIMIT = 2**27
MIN_BATCHES = 100
#: Values held in memory at once while drawing batches.
CHUNK = 2**21
#: Channels of an activations array studied (the first ones).
MAX_CHANNELS = 16


def mean_rmse_theory(sd: float, m: int) -> float:
    """σ/√m."""
    return sd / math.sqrt(m)


def var_rmse_theory(var: float, mu4: float, m: int) -> float:
    """RMSE of the biased batch variance: √(σ⁴/m² + ((m−1)/m)²·(μ4 − σ⁴(m−3)/(m−1))/m)."""
    var_s2 = (mu4 - var * var * (m - 3) / (m - 1)) / m
    return math.sqrt((var / m) ** 2 + ((m - 1) / m) ** 2 * var_s2)


@dataclass
class Activations:
    """A real activations array as (N, C, S) float64 with its per-channel population moments."""

    name: str
    data: np.ndarray  # (N, C, S)
    channels: list[int]
    mean: np.ndarray
    var: np.ndarray
    mu4: np.ndarray
    skipped: list[dict] = field(default_factory=list)

    @property
    def N(self) -> int:
        return self.data.shape[0]

    @property
    def S(self) -> int:
        return self.data.shape[2]


def load_activations(path: str | Path) -> Activations:
    """Read a .npy array of activations: 1-D (one channel), (N, C), (N, C, L) or (N, C, H, W)."""
    p = Path(path)
    try:
        a = np.load(p, allow_pickle=False)
    except Exception as exc:
        raise StudyError(f"cannot read activations {str(p)!r}: {type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'unreadable'}") from None
    if not isinstance(a, np.ndarray) or a.dtype.kind not in "fiu" or a.dtype == np.bool_:
        raise StudyError(f"activations {str(p)!r} must hold a real numeric array, got "
                         f"{getattr(a, 'dtype', type(a).__name__)}")
    if a.ndim == 1:
        a = a.reshape(-1, 1)
    if not 2 <= a.ndim <= 4:
        raise StudyError(f"activations {str(p)!r} must be 1-D, (N, C), (N, C, L) or "
                         f"(N, C, H, W); got shape {a.shape}")
    N, C = a.shape[:2]
    a = np.ascontiguousarray(a, dtype=np.float64).reshape(N, C, -1)
    if a.shape[0] * a.shape[2] < 2:
        raise StudyError(f"activations {str(p)!r} have {a.shape[0] * a.shape[2]} value(s) per "
                         "channel; at least 2 are needed")
    if not np.isfinite(a).all():
        raise StudyError(f"activations {str(p)!r} contain NaN or Inf")
    skipped = []
    channels = []
    for c in range(C):
        if len(channels) == MAX_CHANNELS:
            skipped.append({"part": "sampling", "item": f"activations channels {c}..{C - 1}",
                            "reason": f"only the first {MAX_CHANNELS} usable channels are "
                                      "studied"})
            break
        if np.ptp(a[:, c, :]) == 0:
            skipped.append({"part": "sampling", "item": f"activations channel {c}",
                            "reason": "constant channel (σ = 0): relative errors undefined"})
            continue
        channels.append(c)
    if not channels:
        raise StudyError(f"activations {str(p)!r}: every channel is constant")
    v = a[:, channels, :].transpose(1, 0, 2).reshape(len(channels), -1)
    mean = v.mean(axis=1)
    d = v - mean[:, None]
    var = (d * d).mean(axis=1)
    mu4 = (d**4).mean(axis=1)
    return Activations(f"activations:{p.stem}", a, channels, mean, var, mu4, skipped)


@dataclass
class SamplingConfig:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    distributions: list[str] = field(default_factory=lambda: list(POPULATIONS))
    batches: int = DEFAULT_BATCHES
    activations: Activations | None = None
    seed: int = 0

    def plan(self) -> tuple[list[tuple], list[dict]]:
        """The configurations (kind, name, sampling, m, n_images, B) and the skipped ones."""
        todo, skipped = [], []
        for name in self.distributions:
            for m in self.sizes:
                b = _batches_for(self.batches, m, 1)
                if b is None:
                    skipped.append(_too_big("sampling", f"{name} m={m}", m, 1))
                else:
                    todo.append(("population", name, "iid", m, 0, b))
        a = self.activations
        if a is not None:
            P = a.N * a.S
            C = len(a.channels)
            for m in self.sizes:
                b = _batches_for(self.batches, m, C)
                if m > P:
                    skipped.append({"part": "sampling", "item": f"{a.name} iid m={m}",
                                    "reason": f"m exceeds the {P} values per channel"})
                elif b is None:
                    skipped.append(_too_big("sampling", f"{a.name} iid m={m}", m, C))
                else:
                    todo.append(("activations", a.name, "iid", m, 0, b))
            if a.S > 1:
                n = 1
                while n <= a.N and n * a.S <= max(self.sizes):
                    b = _batches_for(self.batches, n * a.S, C)
                    if b is None:
                        skipped.append(_too_big("sampling", f"{a.name} images n={n}", n * a.S, C))
                    else:
                        todo.append(("activations", a.name, "images", n * a.S, n, b))
                    n *= 2
        return todo, skipped


def _batches_for(batches: int, m: int, channels: int) -> int | None:
    """B, shrunk to keep B·m·channels ≤ WORK_LIMIT; None when even MIN_BATCHES would not fit."""
    b = min(batches, WORK_LIMIT // (m * channels))
    return b if b >= min(MIN_BATCHES, batches) else None


def _too_big(part: str, item: str, m: int, channels: int) -> dict:
    return {"part": part, "item": item,
            "reason": f"{MIN_BATCHES} batches × m = {m} × {channels} channel(s) exceed the "
                      f"{WORK_LIMIT}-value budget"}


def _stats_rows(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and biased variance along the last axis, float64 two-pass."""
    mean = values.mean(axis=-1)
    d = values - mean[..., None]
    return mean, np.einsum("...i,...i->...", d, d) / values.shape[-1]


def _summary(err: np.ndarray) -> tuple[float, float]:
    """RMSE of the errors and its relative standard error ½·sd(e²)/(√B·mean(e²))."""
    e2 = err * err
    mse = float(e2.mean())
    se = float(e2.std() / math.sqrt(len(e2)) / mse / 2) if mse > 0 else math.nan
    return math.sqrt(mse), se


def _draw_population(pop, rng, m: int, B: int) -> tuple[np.ndarray, np.ndarray]:
    means, vars_ = np.empty(B), np.empty(B)
    per = max(1, CHUNK // m)
    for b0 in range(0, B, per):
        b1 = min(B, b0 + per)
        means[b0:b1], vars_[b0:b1] = _stats_rows(pop.draw(rng, (b1 - b0, m)))
    return means, vars_


def _draw_activations(a: Activations, rng, sampling: str, m: int, n: int, B: int):
    """(C, B) batch means and variances of the studied channels."""
    C = len(a.channels)
    flat = a.data[:, a.channels, :].transpose(1, 0, 2)  # (C, N, S)
    pool = flat.reshape(C, -1)
    means, vars_ = np.empty((C, B)), np.empty((C, B))
    per = max(1, CHUNK // (m * C))
    for b0 in range(0, B, per):
        b1 = min(B, b0 + per)
        if sampling == "iid":
            idx = rng.integers(0, pool.shape[1], size=(b1 - b0, m))
            vals = pool[:, idx]  # (C, b, m)
        else:
            idx = rng.integers(0, a.N, size=(b1 - b0, n))
            vals = flat[:, idx, :].reshape(C, b1 - b0, m)  # whole images
        means[:, b0:b1], vars_[:, b0:b1] = _stats_rows(vals)
    return means, vars_


def run_sampling(cfg: SamplingConfig, progress: Callable[[int], None] = lambda n: None
                 ) -> tuple[pd.DataFrame, list[dict]]:
    """The sampling sweep: one row per (distribution, sampling, channel, m, stat), and skips."""
    todo, skipped = cfg.plan()
    if cfg.activations is not None:
        skipped = cfg.activations.skipped + skipped
    rows = []
    for kind, name, sampling, m, n, B in todo:
        rng = rng_for(cfg.seed, "sampling", name, sampling, m)
        if kind == "population":
            pop = POPULATIONS[name]
            means, vars_ = _draw_population(pop, rng, m, B)
            channels = [(0, pop.mean, pop.var, pop.mu4, means, vars_)]
            hw = 1
        else:
            a = cfg.activations
            means, vars_ = _draw_activations(a, rng, sampling, m, n, B)
            channels = [(c, a.mean[i], a.var[i], a.mu4[i], means[i], vars_[i])
                        for i, c in enumerate(a.channels)]
            hw = a.S if sampling == "images" else 1
        for c, mu, var, mu4, bm, bv in channels:
            sd = math.sqrt(var)
            for stat, err, theory, scale in (
                ("mean", bm - mu, mean_rmse_theory(sd, m), sd),
                ("var", bv - var, var_rmse_theory(var, mu4, m), var),
            ):
                rmse, rel_se = _summary(err)
                rows.append({
                    "distribution": name, "sampling": sampling, "channel": c, "hw": hw,
                    "images": n if sampling == "images" else None,
                    "m": m, "stat": stat, "rmse": rmse, "theory": theory,
                    "ratio": rmse / theory, "rel_rmse": rmse / scale,
                    "rel_theory": theory / scale, "rmse_rel_se": rel_se,
                    "bias": float(err.mean()), "batches": B,
                    "pop_mean": mu, "pop_var": var, "pop_kurtosis": mu4 / var**2,
                })
        progress(1)
    df = pd.DataFrame(rows)
    if "images" in df:
        df["images"] = df["images"].astype("Int64")
    return df, skipped
