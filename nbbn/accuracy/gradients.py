"""Part (e): rounding error of the gradients dx, dγ, dβ against an exact reference.

For each m, C = min(64, 2^14/m) channels (at least 1) of m values each: z, dy ~ N(0, 1)^(m×C)
(seeded by m alone) give x = κ + z; float32 data are the float64 values rounded once (x and dy
alike); γ = 1, β = 0. Several channels make a small m more than one lucky draw: at m = 2 the
float32 mean of two values near κ is exact for about half of all pairs.
The reference is the exact gradient of y = γ·(x − μ)·invstd + β with the batch statistics of x,
carried in double-double (:func:`nbbn.accuracy.algorithms.exact_grad_sums`, :func:`dx_errors`):

    dβ = Σ dy,   dγ = Σ dy·x̂,   dx = γ·invstd·(dy − dβ/m − x̂·dγ/m),   x̂ = (x − μ)·invstd

with μ, σ² and invstd = 1/√(σ² + ε) themselves exact. Implementations:

* every usable nbbn kernel backend: its forward-train kernel's ``save_mean``/``save_invstd``
  (rounded to x's dtype, as they are returned), then its backward kernel, on x viewed as NC
  (m, 1) and NCHW (N, 1, 1, S);
* ``old-nbbn (emulated)``: backward in float64 NumPy from ``save_mean``/``save_invstd`` rounded
  to x's dtype — x̂ = (x − save_mean)·save_invstd, exactly what nbbn's kernels computed before
  backward folded the residual Σ(x − save_mean)/m into its mean. The rounded mean is off by up
  to half an ulp of |μ| (κ·2^-24·σ-ish in float32), and x̂, dγ and dx inherit it;
* peers with autograd (:mod:`nbbn.accuracy.peers`): PyTorch (``y.backward(dy)``) and Flax
  (``jax.vjp``), fast and two-pass variance.

Errors (one row per implementation × point × output), norms over all C channels at once as
:mod:`nbbn.tolerances` takes them:

    err            ‖out − ref‖₂
    rel_err        err / ‖ref‖
    rel_err_scale  err / scale; scale = ‖γ·invstd·dy‖₂ for dx (dx itself nearly vanishes at
                   small m: at m = 2 it is γ·invstd·ε/(σ² + ε)·(dy − dȳ)), ‖(Σ|dy·x̂|)_c‖₂ for
                   dγ, ‖(Σ|dy|)_c‖₂ for dβ (the size of the terms each sum adds up)
    tol_err        the error as :mod:`nbbn.tolerances` measures it: err / max(‖ref‖, scale) for
                   dx, err / ‖ref‖ for dγ and dβ; ``within_tolerance`` compares it with
                   ``tolerance(output, dtype)`` (float32: 1e-4, float64: 1e-10)

NaN/Inf in an output is reported as inf.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..seeds import rng_for
from ..tolerances import tolerance
from .algorithms import dx_errors, exact_grad_sums, exact_invstd, exact_stats
from .peers import Peer, from_layout, load_peers, to_layout
from .rounding import DTYPES, EPS, KAPPAS, StatsBackend, usable_backends

DEFAULT_SIZES = [2, 3, 8, 32, 128, 512, 2**11, 2**13, 2**15, 2**17, 2**19, 2**21, 2**23]
QUICK_SIZES = [2, 16, 256, 4096, 2**16]
OUTPUTS = ("dx", "dgamma", "dbeta")
#: channels per point: min(MAX_CHANNELS, WORK // m), at least 1
MAX_CHANNELS = 64
WORK = 2**14
#: display name and family of the emulated pre-fold backward
OLD_NBBN = "old-nbbn (emulated)"


@dataclass
class GradientConfig:
    sizes: list[int] = field(default_factory=lambda: list(DEFAULT_SIZES))
    kappas: tuple[float, ...] = KAPPAS
    dtypes: tuple[np.dtype, ...] = DTYPES
    backends: bool = True
    peers: bool = True
    emulate_old: bool = True
    eps: float = EPS
    gamma: float = 1.0
    seed: int = 0

    def n_configs(self) -> int:
        return len(self.sizes) * len(self.kappas) * len(self.dtypes)


def channels_for(m: int) -> int:
    """Channels per point: enough independent draws that a small m is not one lucky draw
    (at m = 2 the rounded mean is exact for about half of all pairs), few at large m."""
    return max(1, min(MAX_CHANNELS, WORK // m))


@dataclass(frozen=True)
class _Point:
    """One (m, κ, dtype) point: C channels of data (x, dy as (m, C) arrays, column c = channel
    c) and each channel's double-double reference."""

    m: int
    kappa: float
    dtype: np.dtype
    x: np.ndarray
    dy: np.ndarray
    gamma: float
    refs: list  # per channel: (mh, ml, ih, il, bh, bl, gh, gl, Σ|dy|, Σ|dy·x̂|)

    @property
    def channels(self) -> int:
        return self.x.shape[1]

    def column(self, a: np.ndarray, c: int) -> np.ndarray:
        return np.ascontiguousarray(a[:, c])


def reference_point(m: int, kappa: float, dtype, seed: int = 0, eps: float = EPS,
                    gamma: float = 1.0, channels: int | None = None) -> _Point:
    """The data of one point (x = κ + z and dy, (m, C), rounded to ``dtype``) and the
    reference of each channel."""
    dtype = np.dtype(dtype)
    C = channels_for(m) if channels is None else channels
    g = rng_for(seed, "gradients", m, C)
    z = g.standard_normal((m, C))
    dy64 = g.standard_normal((m, C))
    x = (z + kappa).astype(dtype)
    dy = dy64.astype(dtype)
    refs = []
    for c in range(C):
        xc, dc = np.ascontiguousarray(x[:, c]), np.ascontiguousarray(dy[:, c])
        mh, ml, vh, vl = exact_stats(xc)
        ih, il = exact_invstd(vh, vl, eps)
        refs.append((mh, ml, ih, il) + tuple(exact_grad_sums(xc, dc, mh, ml, ih, il)))
    return _Point(m, float(kappa), dtype, x, dy, float(gamma), refs)


def _rows(p: _Point, impl: str, family: str, backend: str, layout: str, dx, dgamma, dbeta
          ) -> list[dict]:
    """Error rows of one implementation's (dx (m, C), dγ (C,), dβ (C,)) at one point; norms
    over every channel at once, as nbbn.tolerances measures them."""
    dx = np.asarray(dx, dtype=np.float64).reshape(p.m, p.channels)
    dgamma = np.asarray(dgamma, dtype=np.float64).reshape(-1)
    dbeta = np.asarray(dbeta, dtype=np.float64).reshape(-1)
    acc = {o: np.zeros(3) for o in OUTPUTS}  # squared err, ref, scale per output
    finite = {o: True for o in OUTPUTS}
    for c, (mh, ml, ih, il, bh, bl, gh, gl, sb, sg) in enumerate(p.refs):
        dxc = p.column(dx, c)
        if not np.isfinite(dxc).all():
            finite["dx"] = False
            dxc = np.zeros(p.m)
        e, r, s = dx_errors(p.column(p.x, c), p.column(p.dy, c), dxc, p.gamma, mh, ml, ih, il,
                            bh, bl, gh, gl)
        acc["dx"] += (e * e, r * r, s * s)
        for out, value, hi, lo, scale in (("dgamma", dgamma[c], gh, gl, sg),
                                          ("dbeta", dbeta[c], bh, bl, sb)):
            if not math.isfinite(value):
                finite[out] = False
                value = 0.0
            e = (value - hi) - lo
            acc[out] += (e * e, (hi + lo) ** 2, scale * scale)
    rows = []
    for out in OUTPUTS:
        err, ref, scale = np.sqrt(acc[out])
        if not finite[out]:
            err = math.inf
        tol_den = max(ref, scale) if out == "dx" else ref
        tol_err = err / tol_den if tol_den > 0 else (0.0 if err == 0 else math.inf)
        tol = tolerance(out, p.dtype)
        rows.append({
            "impl": impl, "family": family, "backend": backend, "layout": layout,
            "dtype": p.dtype.name, "kappa": p.kappa, "m": p.m, "channels": p.channels,
            "output": out, "err": float(err), "ref_norm": float(ref), "scale": float(scale),
            "rel_err": float(err / ref) if ref > 0 else math.inf,
            "rel_err_scale": float(err / scale) if scale > 0 else math.inf,
            "tol_err": float(tol_err), "tolerance": tol, "within_tolerance": bool(tol_err <= tol),
        })
    return rows


def old_nbbn_backward(x: np.ndarray, dy: np.ndarray, save_mean, save_invstd, gamma: float):
    """Backward as nbbn's kernels computed it before the fold, for (m, C) data: float64
    arithmetic from the saved statistics rounded to x's dtype, x̂ = (x − save_mean)·save_invstd;
    outputs rounded to x's dtype."""
    mu = np.asarray(save_mean).astype(x.dtype).astype(np.float64)
    inv = np.asarray(save_invstd).astype(x.dtype).astype(np.float64)
    x64 = x.astype(np.float64)
    d64 = dy.astype(np.float64)
    xhat = (x64 - mu) * inv
    db = d64.sum(axis=0)
    dg = (d64 * xhat).sum(axis=0)
    m = x.shape[0]
    dx = gamma * inv * (d64 - db / m - xhat * (dg / m))
    return dx.astype(x.dtype), dg.astype(x.dtype), db.astype(x.dtype)


def _old_rows(p: _Point) -> list[dict]:
    mean = np.array([r[0] for r in p.refs])
    invstd = np.array([r[2] for r in p.refs])
    dx, dg, db = old_nbbn_backward(p.x, p.dy, mean, invstd, p.gamma)
    return _rows(p, OLD_NBBN, "emulation", "emulation", "-", dx, dg, db)


def _backend_rows(b: StatsBackend, p: _Point, eps: float, bad: set, skipped: list[dict]
                  ) -> list[dict]:
    import nbbn

    rows = []
    gamma = np.full(p.channels, p.gamma, dtype=p.dtype)
    for layout in ("NC", "NCHW"):
        if (b.name, layout) in bad:
            continue
        xs, dys = to_layout(p.x, layout), to_layout(p.dy, layout)
        try:
            _, sm, si = nbbn.batch_norm_train(xs, gamma, eps=eps, backend=b.name)
            dx, dg, db = nbbn.batch_norm_backward(dys, xs, sm, si, gamma, backend=b.name)
        except Exception as exc:
            bad.add((b.name, layout))
            skipped.append({"part": "gradients", "item": f"backend {b.name} {layout}",
                            "reason": f"forward/backward failed: {type(exc).__name__}: {exc}"})
            continue
        rows += _rows(p, f"{b.name} {layout}", "nbbn", b.name, layout,
                      from_layout(np.asarray(dx), layout), dg, db)
    return rows


def _peer_rows(peer: Peer, p: _Point, eps: float, bad: set, skipped: list[dict]) -> list[dict]:
    rows = []
    if peer.backward is None or p.dtype.name not in peer.dtypes:
        return rows
    for layout in peer.layouts:
        if (peer.name, layout) in bad:
            continue
        try:
            g = peer.backward(p.x, p.dy, layout, eps)
        except Exception as exc:
            bad.add((peer.name, layout))
            skipped.append({"part": "gradients", "item": f"peer {peer.name} {layout}",
                            "reason": f"backward failed: {type(exc).__name__}: {exc}"})
            continue
        rows += _rows(p, f"{peer.name} {layout}", "peer", peer.name, layout, g.dx, g.dgamma,
                      g.dbeta)
    return rows


def gradient_peers(peers: list[Peer]) -> tuple[list[Peer], list[dict]]:
    """The peers with a backward, and a skip row for each forward-only one."""
    keep = [p for p in peers if p.backward is not None]
    skipped = [{"part": "gradients", "item": f"peer {p.name}",
                "reason": "forward only: no autograd to measure"}
               for p in peers if p.backward is None]
    return keep, skipped


def run_gradients(cfg: GradientConfig, progress: Callable[[int], None] = lambda n: None,
                  backends: list[StatsBackend] | None = None, peers: list[Peer] | None = None
                  ) -> tuple[pd.DataFrame, list[dict]]:
    """The gradients sweep: a tidy DataFrame (one row per implementation × point × output) and
    skips. ``backends``/``peers`` None: every usable one (unless switched off in ``cfg``)."""
    skipped: list[dict] = []
    if backends is None:
        backends, sk = usable_backends(part="gradients") if cfg.backends else ([], [])
        skipped += sk
    if peers is None:
        peers, sk = load_peers(part="gradients") if cfg.peers else ([], [])
        skipped += sk
    peers, sk = gradient_peers(peers)
    skipped += sk
    bad: set[tuple[str, str]] = set()
    rows: list[dict] = []
    for m in cfg.sizes:
        for kappa in cfg.kappas:
            for dtype in cfg.dtypes:
                p = reference_point(m, kappa, dtype, cfg.seed, cfg.eps, cfg.gamma)
                if cfg.emulate_old:
                    rows += _old_rows(p)
                for b in backends:
                    rows += _backend_rows(b, p, cfg.eps, bad, skipped)
                for peer in peers:
                    rows += _peer_rows(peer, p, cfg.eps, bad, skipped)
                progress(1)
    return pd.DataFrame(rows), skipped


def breakdown(df: pd.DataFrame, value: str = "tol_err") -> pd.DataFrame:
    """Per (impl, dtype, output, κ): the first m where ``value`` exceeds the tolerance, the
    worst value over m and the m where it occurs."""
    out = []
    for (impl, dtype, output, kappa), g in df.groupby(["impl", "dtype", "output", "kappa"],
                                                      sort=False):
        g = g.sort_values("m")
        v = g[value].to_numpy(dtype=float)
        ms = g["m"].to_numpy()
        tol = float(g["tolerance"].iloc[0])
        over = ~(v <= tol)
        worst = int(np.argmax(np.where(np.isnan(v), np.inf, v)))
        out.append({"impl": impl, "family": g["family"].iloc[0], "dtype": dtype,
                    "output": output, "kappa": kappa, "tolerance": tol,
                    "first_m_over_tolerance": int(ms[over.argmax()]) if over.any() else None,
                    f"worst_{value}": float(v[worst]), "worst_at_m": int(ms[worst])})
    res = pd.DataFrame(out)
    if "first_m_over_tolerance" in res:
        res["first_m_over_tolerance"] = res["first_m_over_tolerance"].astype("Int64")
    return res
