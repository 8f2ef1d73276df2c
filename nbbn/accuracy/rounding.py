"""Part (a): rounding error of the batch statistics against an exact reference.

For each m, one draw z ~ N(0, 1)^m (seeded by m alone) is shifted to x = κ + z, so |mean|/std = κ
and every κ and dtype sees the same noise; float32 data are the float64 values rounded once.
Half dtypes (float16, bfloat16) are storage only: the data are rounded once to them, and the
study's algorithms then run in float32 on those (exactly widened) values -- rows with backend
``study-f32`` -- as every half-precision batch norm computes (its sums in float32 or wider);
kernel backends run them if they register the dtype (``cpu`` and ``cuda``: raw half bits,
float32 arithmetic, float64 sums on the cpu), except under ``--quick``, where each half dtype's
kernels would be compiled for a handful of rows (``RoundingConfig.half_backends``; a skip row
says so). What half storage costs is therefore not in these errors,
which are against the exact statistics of the *stored* values: rounding to float16 moves each
value by up to 2^-11 relative (an ulp of 8 at 1e4, where σ = 1: the stored batch is a handful
of distinct values), bfloat16 by 2^-8.
Each statistics algorithm runs on x in x's dtype (:mod:`nbbn.accuracy.algorithms`), and so does each
usable nbbn kernel backend (its registered statistics function, plus its forward-train kernel
for invstd and y). Errors are against the double-double reference of the same (rounded) data:

    rel_err(mean)       = |μ̂ − μ| / |μ|
    rel_err(mean_in_sd) = |μ̂ − μ| / σ          (the mean's error as y sees it; defined at κ = 0)
    rel_err(var)        = |σ̂² − σ²| / σ²        (biased variance)
    rel_err(invstd)     = |î − i| / i,   i = 1/√(σ² + ε)
    rel_err(y)          = ‖ŷ − y‖₂ / ‖y‖₂,  y = (x − μ)·i over the m values

NaN or Inf where the reference is finite (the naive variance can come out negative) is
reported as rel_err = inf.

Peers (:mod:`nbbn.accuracy.peers`: PyTorch, Flax/XLA, NumPy, and on a GPU PyTorch CUDA and CuPy)
run on the same data, each on the layouts it is used with, and report the statistics they return
in the data's dtype; their rows have ``algorithm = "peer"`` and ``backend`` = the peer's name.
A mean returned in float32 is off by up to half a unit in its last place, 2^(e − 24) for
|μ| in [2^e, 2^(e+1)): up to 4.9e-4·σ at κ = 1e4 (σ = 1) whatever the algorithm. nbbn's rows
report its registered statistics function, which returns float64 (its ``save_mean`` output is
rounded to x's dtype like everyone's).

Each row also carries the *sampling* error the same statistic has anyway for normal data of that
m (theory; part (b) checks it): 1/√m for ``mean_in_sd``, √(2m − 1)/m for the biased variance,
half that for invstd (first order), √(3/(2m)) for y (the train–inference gap, first order), and
1/(κ√m) for ``mean``. ``rounding_to_sampling`` is their ratio; rounding error is called
negligible where it is below :data:`NEGLIGIBLE` of the sampling error.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..seeds import rng_for
from ..validate import STORAGE_DTYPES
from .algorithms import (
    ALGORITHMS,
    dd_rel_err,
    exact_invstd,
    exact_stats,
    y_array_rel_err,
    y_rel_err,
)
from .peers import Peer, load_peers, nchw_shape

DEFAULT_SIZES = [2, 8, 32, 128, 512, 2**11, 2**13, 2**15, 2**17, 2**19, 2**21, 2**23,
                 2**24 + 1, 2**25]
QUICK_SIZES = [2, 16, 128, 1024, 2**13, 2**16, 2**20 + 1]
PEER_MAX_M = 2**24 + 1
KAPPAS = (0.0, 1.0, 1e2, 1e3, 1e4)
DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: Half storage dtypes of part (a) (bfloat16 when ml_dtypes is installed): the data are stored
#: in them, and every computation (the study's algorithms, every kernel) runs in float32 or
#: wider, as half-precision batch norms do (cuDNN, PyTorch, nbbn's cuda backend).
HALF_DTYPES = tuple(d for d in STORAGE_DTYPES if d.itemsize == 2)
STATS = ("mean", "mean_in_sd", "var", "invstd", "y")
EPS = 1e-5
#: Rounding error below this fraction of the sampling error counts as negligible.
NEGLIGIBLE = 0.1


@dataclass
class RoundingConfig:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    kappas: tuple[float, ...] = KAPPAS
    dtypes: tuple[np.dtype, ...] = DTYPES + HALF_DTYPES
    algorithms: tuple[str, ...] = tuple(ALGORITHMS)
    backends: bool = True
    #: run the kernel backends on the half dtypes too (each half dtype is a kernel
    #: specialization set of its own: seconds of compilation per kernel; --quick turns it off)
    half_backends: bool = True
    peers: bool = True
    #: peers run only up to this m (None: every size); the default run stops them at 2^24 + 1
    #: to stay within a few minutes (their largest arrays cost seconds each)
    peer_max_m: int | None = None
    eps: float = EPS
    seed: int = 0

    def n_configs(self) -> int:
        return len(self.sizes) * len(self.kappas) * len(self.dtypes)


def sampling_rel_rmse(stat: str, m: int, kappa: float) -> float:
    """Sampling error of a statistic of m i.i.d. normal values, in rel_err's units (theory)."""
    if stat == "mean":
        return 1.0 / (kappa * math.sqrt(m)) if kappa > 0 else math.nan
    if stat == "mean_in_sd":
        return 1.0 / math.sqrt(m)
    if stat == "var":
        return math.sqrt(2 * m - 1) / m
    if stat == "invstd":
        return math.sqrt(2 * m - 1) / (2 * m)
    if stat == "y":
        return math.sqrt(1.5 / m)
    raise ValueError(stat)


_nchw_shape = nchw_shape


@dataclass
class StatsBackend:
    name: str
    device: str
    stats: Callable
    #: dtypes of x the backend runs (registry.BackendInfo.dtypes)
    dtypes: tuple = DTYPES


def usable_backends(simulator_ok: bool = False, part: str = "rounding"
                    ) -> tuple[list[StatsBackend], list[dict]]:
    """Kernel backends whose statistics can be studied here, and a skip row for each other one.
    A CUDA backend under the simulator is skipped unless ``simulator_ok`` (tests, tiny m)."""
    import numba

    from .. import registry

    usable, skipped = [], []
    for name in registry.backend_names("kernel"):
        info = registry.backend_info(name)
        reason = registry.unavailable_reason(name)
        if (reason is None and info.device != "cpu" and numba.config.ENABLE_CUDASIM
                and not simulator_ok):
            reason = ("runs under the CUDA simulator (NUMBA_ENABLE_CUDASIM=1), far too slow for "
                      "m up to 2^25; run the study on a GPU to include it")
        fn = None
        if reason is None:
            try:
                fn = registry.stats_function(name)
            except Exception as exc:  # a backend that cannot load must not stop the study
                reason = f"{type(exc).__name__}: {exc}"
        if reason is None:
            usable.append(StatsBackend(name, info.device, fn,
                                       tuple(np.dtype(d) for d in info.dtypes)))
        else:
            skipped.append({"part": part, "item": f"backend {name}", "reason": reason})
    return usable, skipped


def _rel(value: float, hi: float, lo: float) -> float:
    return float(dd_rel_err(value, hi, lo)) if math.isfinite(value) else math.inf


def _finite(e: float) -> float:
    return math.inf if not math.isfinite(e) else float(e)


def _invstd(var, dtype: np.dtype, eps: float):
    """1/√(σ² + ε) in the data's dtype, as a kernel computes it (NaN for σ² + ε < 0)."""
    t = dtype.type
    with np.errstate(invalid="ignore", divide="ignore"):
        return t(1) / np.sqrt(t(var) + t(eps))


@dataclass(frozen=True)
class _Point:
    """One (m, κ, dtype) point and its double-double reference."""

    m: int
    kappa: float
    dtype: np.dtype
    mh: float
    ml: float
    vh: float
    vl: float
    ih: float
    il: float


def _rows(p: _Point, algorithm: str, backend: str, layout: str, mean, var,
          invstd=None, y_err=None) -> list[dict]:
    """The tidy rows of one algorithm at one point (invstd/y rows only when given)."""
    mean_f, var_f = float(mean), float(var)
    sd = math.sqrt(p.vh)
    errs = {
        "mean": (mean_f, p.mh, _rel(mean_f, p.mh, p.ml)),
        "mean_in_sd": (mean_f, p.mh,
                       _finite(abs((mean_f - p.mh) - p.ml) / sd) if sd > 0 else math.inf),
        "var": (var_f, p.vh, _rel(var_f, p.vh, p.vl)),
    }
    if invstd is not None:
        errs["invstd"] = (float(invstd), p.ih, _rel(float(invstd), p.ih, p.il))
    if y_err is not None:
        errs["y"] = (math.nan, math.nan, y_err)
    rows = []
    for stat, (value, ref, err) in errs.items():
        samp = sampling_rel_rmse(stat, p.m, p.kappa)
        rows.append({
            "algorithm": algorithm, "backend": backend, "layout": layout,
            "dtype": p.dtype.name, "kappa": p.kappa, "m": p.m, "stat": stat,
            "rel_err": err, "value": value, "reference": ref,
            "sampling_rel_rmse": samp,
            "rounding_to_sampling": err / samp if samp == samp else math.nan,
        })
    return rows


def _backend_rows(b: StatsBackend, p: _Point, x: np.ndarray, eps: float, bad: set,
                  skipped: list[dict], xc: np.ndarray | None = None) -> list[dict]:
    """A backend's statistics function (mean, var) and its forward-train kernel (invstd, y),
    on x viewed as NC (m, 1) and as NCHW (N, 1, 1, S). ``xc``: x in float32 (half x), for the
    error of y, whose output is widened to float32 (exactly) to be compared."""
    import nbbn

    xc = x if xc is None else xc
    rows = []
    for layout, shape in (("NC", (p.m, 1)), ("NCHW", _nchw_shape(p.m))):
        if (b.name, layout, "stats") in bad:
            continue
        xs = x.reshape(shape)
        try:
            mean, var = b.stats(xs)
        except Exception as exc:
            bad.add((b.name, layout, "stats"))
            skipped.append({"part": "rounding", "item": f"backend {b.name} {layout}",
                            "reason": f"statistics failed: {type(exc).__name__}: {exc}"})
            continue
        invstd = y_err = None
        if (b.name, layout, "kernel") not in bad:
            try:
                y, _, save_invstd = nbbn.batch_norm_train(xs, eps=eps, backend=b.name)
                invstd = float(np.asarray(save_invstd)[0])
                y = np.asarray(y).reshape(-1)
                y_err = _finite(y_array_rel_err(xc, y.astype(xc.dtype) if y.itemsize == 2 else y,
                                                p.mh, p.ml, p.ih, p.il))
            except Exception as exc:
                bad.add((b.name, layout, "kernel"))
                skipped.append({"part": "rounding", "item": f"{b.name} {layout} invstd and y",
                                "reason": f"forward-train failed: {type(exc).__name__}: {exc}"})
        rows += _rows(p, "nbbn", b.name, layout, mean[0], var[0], invstd, y_err)
    return rows


def _peer_rows(peer: Peer, p: _Point, x: np.ndarray, eps: float, bad: set,
               skipped: list[dict]) -> list[dict]:
    """A peer's mean, var, invstd and y on each of its layouts."""
    rows = []
    if p.dtype.name not in peer.dtypes:
        return rows
    for layout in peer.layouts:
        if (peer.name, layout) in bad:
            continue
        try:
            f = peer.forward(x, layout, eps)
        except Exception as exc:  # report it once and go on without this peer × layout
            bad.add((peer.name, layout))
            skipped.append({"part": "rounding", "item": f"peer {peer.name} {layout}",
                            "reason": f"forward failed: {type(exc).__name__}: {exc}"})
            continue
        y_err = _finite(y_array_rel_err(x, f.y, p.mh, p.ml, p.ih, p.il))
        rows += _rows(p, "peer", peer.name, layout, f.mean, f.var, f.invstd, y_err)
    return rows


def run_rounding(cfg: RoundingConfig, progress: Callable[[int], None] = lambda n: None,
                 backends: list[StatsBackend] | None = None, peers: list[Peer] | None = None
                 ) -> tuple[pd.DataFrame, list[dict]]:
    """The rounding sweep: a tidy DataFrame (one row per algorithm × point × stat) and skips.
    ``backends``/``peers`` None: every usable one (unless ``cfg.backends``/``cfg.peers`` is
    False)."""
    skipped: list[dict] = []
    if backends is None:
        backends, sk = usable_backends() if cfg.backends else ([], [])
        skipped += sk
    if peers is None:
        peers, sk = load_peers(part="rounding") if cfg.peers else ([], [])
        skipped += sk
    above = [m for m in cfg.sizes if cfg.peer_max_m is not None and m > cfg.peer_max_m]
    if peers and above:
        skipped.append({"part": "rounding", "item": "peers at m = " + ", ".join(map(str, above)),
                        "reason": f"peers run up to m = {cfg.peer_max_m} in the default grid "
                                  "(time); --sizes runs them at any m"})
    halves = [d.name for d in cfg.dtypes if d.itemsize == 2]
    if peers and halves:
        skipped.append({"part": "rounding", "item": "peers at " + ", ".join(halves),
                        "reason": "the peers run float32 and float64 data only"})
    if halves and backends and not cfg.half_backends:
        skipped.append({"part": "rounding",
                        "item": "backends " + ", ".join(b.name for b in backends) + " at "
                                + ", ".join(halves),
                        "reason": "half_backends off (--quick): each half dtype would "
                                  "compile its own kernels for a handful of rows; the full "
                                  "study runs them"})
    bad: set[tuple] = set()
    rows: list[dict] = []
    for m in cfg.sizes:
        z = rng_for(cfg.seed, "rounding", m).standard_normal(m)
        for kappa in cfg.kappas:
            x64 = z + kappa
            for dtype in cfg.dtypes:
                x = x64 if dtype == np.float64 else x64.astype(dtype)
                half = dtype.itemsize == 2
                xc = x.astype(np.float32) if half else x  # half data, float32 math (exact)
                mh, ml, vh, vl = exact_stats(xc)
                ih, il = exact_invstd(vh, vl, cfg.eps)
                p = _Point(m, kappa, dtype, mh, ml, vh, vl, ih, il)
                for name in cfg.algorithms:
                    mean, var = ALGORITHMS[name](xc)
                    invstd = _invstd(var, xc.dtype, cfg.eps)
                    y_err = _finite(y_rel_err(xc, mean, invstd, mh, ml, ih, il))
                    rows += _rows(p, name, "study-f32" if half else "study", "1-D", mean, var,
                                  invstd, y_err)
                for b in backends if cfg.half_backends or not half else ():
                    if half and dtype not in b.dtypes:
                        if (b.name, dtype.name) not in bad:
                            bad.add((b.name, dtype.name))
                            skipped.append({"part": "rounding",
                                            "item": f"backend {b.name} {dtype.name}",
                                            "reason": f"backend {b.name!r} does not run "
                                                      f"{dtype.name} (registry dtypes)"})
                        continue
                    rows += _backend_rows(b, p, x, cfg.eps, bad, skipped, xc)
                if cfg.peer_max_m is None or m <= cfg.peer_max_m:
                    for peer in peers:
                        rows += _peer_rows(peer, p, x, cfg.eps, bad, skipped)
                progress(1)
    return pd.DataFrame(rows), skipped


def crossover(df: pd.DataFrame, stats=("mean_in_sd", "var", "y")) -> pd.DataFrame:
    """Per (algorithm, backend, layout, dtype, κ, stat): up to which m rounding stays negligible.

    ``negligible_up_to_m``: the largest m of the grid such that rounding_to_sampling ≤
    NEGLIGIBLE at that m and every smaller one (empty: not even at the smallest m);
    ``first_m_not_negligible``: the first m where it is not (empty: never, within the grid);
    ``max_rounding_to_sampling``: the worst ratio over the grid.
    """
    keys = ["algorithm", "backend", "layout", "dtype", "kappa", "stat"]
    out = []
    sub = df[df["stat"].isin(stats)]
    for key, g in sub.groupby(keys, sort=False):
        g = g.sort_values("m")
        ratio = g["rounding_to_sampling"].to_numpy()
        ms = g["m"].to_numpy()
        bad = ~(ratio <= NEGLIGIBLE)
        first = int(ms[bad.argmax()]) if bad.any() else None
        ok = ms[: bad.argmax()] if bad.any() else ms
        out.append(dict(zip(keys, key, strict=True)) | {
            "negligible_up_to_m": int(ok[-1]) if len(ok) else None,
            "first_m_not_negligible": first,
            "max_rounding_to_sampling": float(np.nanmax(np.where(np.isfinite(ratio), ratio,
                                                                 np.inf))),
            "m_max": int(ms[-1]),
        })
    res = pd.DataFrame(out)
    for c in ("negligible_up_to_m", "first_m_not_negligible"):
        if c in res:
            res[c] = res[c].astype("Int64")
    return res
