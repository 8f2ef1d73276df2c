"""The rounded-mean fold, host side (NumPy).

Backward receives ``save_mean`` rounded to its dtype: at |mean|/std = 1e3 a float32 save_mean is
off from the batch mean by up to half an ulp, 3e-5·σ, and x̂ = (x − save_mean)·invstd inherits
that. Backward also sums Σ(x − save_mean) in the pass that reads x; δ = Σ(x − save_mean)/m is
the rounding, and the gradient is taken at μ = save_mean + δ. A δ larger than ``FOLD_ULPS`` ulps
of save_mean is no rounding: the caller meant that mean (a global mean in synchronized BN, say),
and it is used as given (δ = 0).

The cpu kernels apply the same rule per channel (:func:`nbbn.cpu.kernels._fold`); host code
(the cuda backend's coefficients, :mod:`nbbn.distributed`) calls :func:`fold_delta`.
"""

from __future__ import annotations

import numpy as np

#: δ is a rounding correction when |δ| ≤ FOLD_ULPS·ulp(save_mean).
FOLD_ULPS = 2.0


def fold_delta(sum_xmu, m, save_mean) -> np.ndarray:
    """δ per channel (float64): Σ(x − save_mean)/m where it is within FOLD_ULPS ulps of
    save_mean in save_mean's own dtype, else 0."""
    mu = np.asarray(save_mean)
    delta = np.asarray(sum_xmu, dtype=np.float64) / float(m)
    precision = np.finfo(mu.dtype).nmant + 1  # significand bits: 24 (float32), 53 (float64)
    _, e = np.frexp(mu.astype(np.float64))
    ulp = np.ldexp(1.0, e - precision)
    return np.where(np.abs(delta) <= FOLD_ULPS * ulp, delta, 0.0)
