"""The rounded-mean fold, host side (NumPy).

Backward receives ``save_mean`` rounded to its dtype: at |mean|/std = 1e3 a float32 save_mean is
off from the batch mean by up to half an ulp, 3e-5·σ, and x̂ = (x − save_mean)·invstd inherits
that. Backward also sums Σ(x − save_mean) in the pass that reads x; δ = Σ(x − save_mean)/m is
the rounding, and the gradient is taken at μ = save_mean + δ. A δ larger than ``FOLD_ULPS`` ulps
of save_mean is no rounding: the caller meant that mean (a global mean in synchronized BN, say),
and it is used as given (δ = 0).

The ulp is that of the precision save_mean was rounded to (:func:`fold_precision`): the coarser
of its own dtype and of the per-channel output dtype of x, since a save_mean handed over in
float64 may still hold a float32 forward's rounding. Every backend applies this one rule: the cpu
kernels per channel (``nbbn.cpu.kernels._fold``), the cuda kernels likewise
(``nbbn.cuda.kernels._finalize_backward``), both given :func:`fold_precision`, and host code (the
cuda backend's Parts, :mod:`nbbn.distributed`) through :func:`fold_delta`.
"""

from __future__ import annotations

import functools

import numpy as np

#: δ is a rounding correction when |δ| ≤ FOLD_ULPS·ulp(save_mean).
FOLD_ULPS = 2.0


@functools.cache
def fold_precision(save_mean_dtype, x_dtype) -> int:
    """Significand bits (24 for float32, 53 for float64) of the precision save_mean was rounded
    to: the coarser of its own dtype's and of x's per-channel output dtype (float32 for a half
    x, as :func:`nbbn.validate.channel_dtype` says). Cached: every backward call asks (np.finfo
    cost ~1 µs a call)."""
    x_dtype = np.dtype(x_dtype)
    channel = np.dtype(np.float32) if x_dtype.itemsize == 2 else x_dtype
    return min(np.finfo(save_mean_dtype).nmant, np.finfo(channel).nmant) + 1


def fold_delta(sum_xmu, m, save_mean, x_dtype=None) -> np.ndarray:
    """δ per channel (float64): Σ(x − save_mean)/m where it is within FOLD_ULPS ulps of
    save_mean in the precision of :func:`fold_precision` (x's dtype defaults to save_mean's),
    else 0."""
    mu = np.asarray(save_mean)
    delta = np.asarray(sum_xmu, dtype=np.float64) / float(m)
    precision = fold_precision(mu.dtype, mu.dtype if x_dtype is None else x_dtype)
    _, e = np.frexp(mu.astype(np.float64))
    ulp = np.ldexp(1.0, e - precision)
    return np.where(np.abs(delta) <= FOLD_ULPS * ulp, delta, 0.0)
