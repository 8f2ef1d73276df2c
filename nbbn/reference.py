"""The float64 oracle: plain NumPy, two-pass, no Numba.

Every kernel and every baseline is checked against these functions. They accept any float input
(2-, 3- or 4-D, channel axis 1 or -1 as the public API), compute in float64 and return float64 in
the input's shape.

Notation (per channel c, over the m = N·H·W values x_i of that channel):

    μ      = (1/m) Σ x_i                              (batch mean)
    σ²     = (1/m) Σ (x_i − μ)²                       (biased batch variance; normalizes)
    s²     = m/(m−1) · σ²                             (unbiased; feeds the running variance)
    invstd = 1/√(σ² + ε)
    x̂_i    = (x_i − μ)·invstd
    y_i    = γ·x̂_i + β

Backward, for upstream gradient dy and saved (μ, invstd):

    dβ   = Σ dy_i
    dγ   = Σ dy_i·x̂_i
    dx_i = γ·invstd·(dy_i − dβ/m − x̂_i·dγ/m)

Inference with population estimates (μ_pop, σ²_pop) folds into one multiply-add:

    α = γ/√(σ²_pop + ε),   β' = β − μ_pop·α,   y = α·x + β'

Fusion (forward-train and inference): with a residual r and/or a ReLU,

    y = max(BN(x) + r, 0)        (relu=True;  without relu: y = BN(x) + r)

and backward with relu=True takes the forward's y: dz = dy·[y > 0] is the gradient of the
pre-activation BN(x) + r (hence of r too), and dx, dγ, dβ are the formulas above applied to dz.
"""

from __future__ import annotations

import numpy as np


def _axes(x: np.ndarray) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.ndim))


def _first(a, channel_axis: int):
    """``a`` as float64 with its channel axis moved to 1 (the layout the formulas below use)."""
    a = np.asarray(a, dtype=np.float64)
    ax = channel_axis % a.ndim
    return a if ax == 1 else np.moveaxis(a, ax, 1)


def _back(a, like_ndim: int, channel_axis: int):
    """Undo :func:`_first`."""
    ax = channel_axis % like_ndim
    return a if ax == 1 else np.moveaxis(a, 1, ax)


def _per_channel(v, x: np.ndarray, default: float) -> np.ndarray:
    """A (C,) vector as float64, broadcastable against x (channel axis 1)."""
    C = x.shape[1]
    v = np.full(C, default) if v is None else np.asarray(v, dtype=np.float64)
    return v.reshape((1, C) + (1,) * (x.ndim - 2))


def batch_stats(x, channel_axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Two-pass batch mean μ and biased variance σ² per channel, in float64.

    The mean gets one refinement, μ ← μ + mean(x − μ): a float64 sum of values near a large
    offset carries an error of ~u·|μ| (u·κ·σ); the refinement brings it to ~u·σ, so the oracle
    stays well ahead of kernels at |mean|/std = 1e4."""
    x = _first(x, channel_axis)
    ax = _axes(x)
    shape = (1, -1) + (1,) * (x.ndim - 2)
    mean = x.mean(axis=ax)
    mean = mean + (x - mean.reshape(shape)).mean(axis=ax)
    d = x - mean.reshape(shape)
    var = np.mean(d * d, axis=ax)
    return mean, var


def count_per_channel(x, channel_axis: int = 1) -> int:
    """m: values per channel (N for NC, N·H·W for NCHW)."""
    shape = np.shape(x)
    return int(np.prod(shape)) // shape[channel_axis % len(shape)]


def _fuse(y, relu: bool, residual, channel_axis: int):
    if residual is not None:
        y = y + _first(residual, channel_axis)
    return np.maximum(y, 0.0) if relu else y


def forward_train(x, gamma=None, beta=None, eps=1e-5, *, channel_axis=1, relu=False,
                  residual=None):
    """Training forward: returns (y, μ, invstd, σ²_biased), all float64."""
    x64 = _first(x, channel_axis)
    mean, var = batch_stats(x64)
    invstd = 1.0 / np.sqrt(var + eps)
    shape = (1, -1) + (1,) * (x64.ndim - 2)
    xhat = (x64 - mean.reshape(shape)) * invstd.reshape(shape)
    y = xhat * _per_channel(gamma, x64, 1.0) + _per_channel(beta, x64, 0.0)
    y = _fuse(y, relu, residual, channel_axis)
    return _back(y, x64.ndim, channel_axis), mean, invstd, var


def running_update(running_mean, running_var, mean, var_biased, m: int, momentum: float):
    """PyTorch's convention, returned as new float64 arrays (the inputs are not touched):

        running_mean ← (1 − momentum)·running_mean + momentum·μ
        running_var  ← (1 − momentum)·running_var  + momentum·σ²·m/(m−1)
    """
    rm = np.asarray(running_mean, dtype=np.float64)
    rv = np.asarray(running_var, dtype=np.float64)
    unbiased = np.asarray(var_biased, dtype=np.float64) * (m / (m - 1))
    return ((1.0 - momentum) * rm + momentum * np.asarray(mean, dtype=np.float64),
            (1.0 - momentum) * rv + momentum * unbiased)


def relu_grad(dy, y):
    """dz = dy·[y > 0]: the gradient through y = max(z, 0), given the forward's output y."""
    return np.where(np.asarray(y) > 0, np.asarray(dy, dtype=np.float64), 0.0)


def backward(dy, x, save_mean, save_invstd, gamma=None, *, channel_axis=1, relu=False, y=None):
    """Gradients (dx, dγ, dβ) in float64 for the given saved statistics; with ``relu`` (y
    required) also dz = dy·[y > 0], the pre-activation's gradient: (dx, dγ, dβ, dz)."""
    if relu:
        if y is None:
            raise ValueError("relu=True needs the forward's output y")
        dz = relu_grad(dy, y)
        dx, dg, db = backward(dz, x, save_mean, save_invstd, gamma, channel_axis=channel_axis)
        return dx, dg, db, dz
    x64 = _first(x, channel_axis)
    dy64 = _first(dy, channel_axis)
    ax = _axes(x64)
    m = count_per_channel(x64)
    shape = (1, -1) + (1,) * (x64.ndim - 2)
    mean = np.asarray(save_mean, dtype=np.float64).reshape(shape)
    invstd = np.asarray(save_invstd, dtype=np.float64).reshape(shape)
    xhat = (x64 - mean) * invstd
    dbeta = dy64.sum(axis=ax)
    dgamma = (dy64 * xhat).sum(axis=ax)
    g = _per_channel(gamma, x64, 1.0)
    dx = g * invstd * (dy64 - dbeta.reshape(shape) / m - xhat * dgamma.reshape(shape) / m)
    return _back(dx, x64.ndim, channel_axis), dgamma, dbeta


def dx_scale(dy, save_invstd, gamma=None, *, channel_axis=1, relu=False, y=None) -> float:
    """‖γ·invstd·dy‖₂ (dz for dy with ``relu``): the size of the terms dx is formed from (dx
    itself can cancel to 0, e.g. exactly when m = 2); the error scale of dx in
    :mod:`nbbn.tolerances`."""
    dy64 = _first(relu_grad(dy, y) if relu else dy, channel_axis)
    shape = (1, -1) + (1,) * (dy64.ndim - 2)
    k = _per_channel(gamma, dy64, 1.0) * np.asarray(save_invstd, dtype=np.float64).reshape(shape)
    return float(np.linalg.norm(k * dy64))


def inference(x, running_mean, running_var, gamma=None, beta=None, eps=1e-5, *, channel_axis=1,
              relu=False, residual=None):
    """Inference with population statistics, folded: y = α·x + β' (float64), then fusion."""
    x64 = _first(x, channel_axis)
    alpha = _per_channel(gamma, x64, 1.0) / np.sqrt(_per_channel(running_var, x64, 0.0) + eps)
    shift = _per_channel(beta, x64, 0.0) - _per_channel(running_mean, x64, 0.0) * alpha
    y = _fuse(x64 * alpha + shift, relu, residual, channel_axis)
    return _back(y, x64.ndim, channel_axis)
