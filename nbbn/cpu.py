"""Parallel CPU kernels (Numba ``@njit(parallel=True)``); registers the ``"cpu"`` backend.

Formulas: see :mod:`nbbn.reference`. This module is about how they are computed.

Statistics: chunked two-pass + Chan
    A channel's values are cut into blocks of at most ``BLOCK`` values (a few KiB: they stay in
    L1/L2 between the block's two passes). Each block gets an exact two-pass mean and M2 =
    Σ(x − mean_block)² in float64; blocks are merged with Chan et al.'s pairwise formula

        n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n.

    Memory sees one read of x for the statistics, and no E[x²] − E[x]² cancellation can occur, so
    float32 data with |mean|/std = 1e4 keeps its variance to float64 rounding.

Normalization: training applies y = (x − μ)·α + β with α = γ·invstd, in float64 per element,
    rounded once to x's dtype: subtracting μ first keeps large offsets exact. Inference folds the
    population statistics into y = x·α + β' (β' = β − μ·α), one multiply-add per element; in
    float64 that costs log2(|μ|/σ) bits, a float32 result does not see it.

Work split ("fused" vs "split" variants)
    fused  -- one task per channel (NCHW) or per tile of ``tile_width`` columns (NC). A task
              computes its channels' statistics and then normalizes them while the data are still
              in L2/L3: memory traffic approaches 2 passes (read + write) when a task's data fit
              in cache.
    split  -- when there are too few channels (or tiles) to keep every thread busy, each channel's
              rows are cut into ``K`` chunks: phase 1 computes per-chunk partials in parallel,
              phase 2 merges them per channel (Chan for the statistics, plain sums for backward),
              phase 3 normalizes the chunks in parallel. 3 passes (4–5 for backward) but all
              threads work.
    The variant is chosen by the wrapper from (C, threads); both are tested at every shape.

Threads: ``prange`` runs only over independent outputs (channels, tiles, chunks); partials are
written to distinct slots and merged by one thread per channel, so results do not depend on the
thread count or schedule.

NaN/Inf: a NaN or ±Inf in channel c makes μ_c, σ²_c (hence y, dx, ... of channel c) NaN; other
channels are untouched.
"""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import njit, prange

from . import registry
from .spec import Layout, Op

#: Values per two-pass block: 4096 float64 partial work, ≤ 32 KiB of data, stays in L1/L2.
BLOCK = 4096
#: Target bytes of one NC tile (all N rows × tile_width columns), to stay in L2 between passes.
NC_TILE_BYTES = 256 * 1024
#: Tasks per thread wanted before the fused variants are chosen.
TASKS_PER_THREAD = 4

# reassoc lets LLVM vectorize the float64 reductions; contract allows FMA. No nnan/ninf: NaN and
# Inf keep their IEEE meaning.
_FM = {"reassoc", "contract"}
_EMPTY = np.empty(0, dtype=np.float64)


# --------------------------------------------------------------------------------------------
# Device-independent scalar helpers
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _chan(n_a, mean_a, m2_a, n_b, mean_b, m2_b):
    """Merge (count, mean, M2) of two disjoint sets (Chan, Golub & LeVeque 1979)."""
    n = n_a + n_b
    if n == 0.0:
        return 0.0, 0.0, 0.0
    delta = mean_b - mean_a
    frac = n_b / n
    return n, mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac


@njit(inline="always")
def _scale_shift(var, eps, gamma, beta, has_gamma, has_beta, c):
    """invstd = 1/√(σ² + ε), α = γ·invstd and β of channel c, in float64."""
    invstd = 1.0 / math.sqrt(var + eps)
    g = np.float64(gamma[c]) if has_gamma else 1.0
    b = np.float64(beta[c]) if has_beta else 0.0
    return invstd, g * invstd, b


@njit(inline="always")
def _running_update(rmean, rvar, c, mean, var, m, momentum):
    """PyTorch convention; the running variance takes the unbiased σ²·m/(m−1)."""
    rmean[c] = (1.0 - momentum) * rmean[c] + momentum * mean
    rvar[c] = (1.0 - momentum) * rvar[c] + momentum * var * (m / (m - 1.0))


# --------------------------------------------------------------------------------------------
# NCHW family: x viewed as (N, C, S); channel c is N rows of S contiguous values.
# --------------------------------------------------------------------------------------------
@njit(fastmath=_FM, cache=True)
def _nchw_rows_stats(x, c, n0, n1):
    """(count, mean, M2) of channel c over rows [n0, n1), by two-pass blocks merged with Chan.

    A block is ``rows`` whole rows when S ≤ BLOCK, else one row cut into BLOCK-long pieces.
    """
    S = x.shape[2]
    rows = max(1, BLOCK // S)
    width = min(S, BLOCK)
    n_acc, mu_acc, m2_acc = 0.0, 0.0, 0.0
    for r0 in range(n0, n1, rows):
        r1 = min(n1, r0 + rows)
        for s0 in range(0, S, width):
            s1 = min(S, s0 + width)
            cnt = float((r1 - r0) * (s1 - s0))
            acc = 0.0
            for n in range(r0, r1):
                xr = x[n, c, s0:s1]
                for s in range(s1 - s0):
                    acc += xr[s]
            mu = acc / cnt
            m2 = 0.0
            for n in range(r0, r1):
                xr = x[n, c, s0:s1]
                for s in range(s1 - s0):
                    d = xr[s] - mu
                    m2 += d * d
            n_acc, mu_acc, m2_acc = _chan(n_acc, mu_acc, m2_acc, cnt, mu, m2)
    return n_acc, mu_acc, m2_acc


@njit(fastmath=_FM, cache=True)
def _nchw_normalize_rows(x, y, c, n0, n1, mean, alpha, beta):
    """y = (x − μ)·α + β over rows [n0, n1) of channel c. Subtracting μ first keeps float64
    data exact at large offsets (the folded x·α + β' would lose log2(|μ|/σ) bits)."""
    for n in range(n0, n1):
        xr = x[n, c]
        yr = y[n, c]
        for s in range(xr.size):
            yr[s] = (xr[s] - mean) * alpha + beta


@njit(parallel=True, fastmath=_FM, cache=True)
def fwd_nchw_fused(x, gamma, beta, has_gamma, has_beta, eps, rmean, rvar, has_running, momentum,
                   write_y, y, save_mean, save_invstd, mean64, var64):
    """Forward-train, one task per channel: statistics, then normalization from cache."""
    N, C, S = x.shape
    m = float(N * S)
    for c in prange(C):
        _, mean, m2 = _nchw_rows_stats(x, c, 0, N)
        var = m2 / m
        invstd, alpha, b = _scale_shift(var, eps, gamma, beta, has_gamma, has_beta, c)
        save_mean[c] = mean
        save_invstd[c] = invstd
        mean64[c] = mean
        var64[c] = var
        if has_running:
            _running_update(rmean, rvar, c, mean, var, m, momentum)
        if write_y:
            _nchw_normalize_rows(x, y, c, 0, N, mean, alpha, b)


@njit(parallel=True, fastmath=_FM, cache=True)
def fwd_nchw_split(x, gamma, beta, has_gamma, has_beta, eps, rmean, rvar, has_running, momentum,
                   write_y, y, save_mean, save_invstd, mean64, var64, part, ab):
    """Forward-train with each channel's N rows cut into K chunks (``part`` is (C, K, 3) scratch,
    ``ab`` is (C, 2) scratch for α, β). Task t ↦ (channel t // K, chunk t % K)."""
    N, C, S = x.shape
    K = part.shape[1]
    m = float(N * S)
    for t in prange(C * K):
        c, k = t // K, t % K
        cnt, mu, m2 = _nchw_rows_stats(x, c, (N * k) // K, (N * (k + 1)) // K)
        part[c, k, 0] = cnt
        part[c, k, 1] = mu
        part[c, k, 2] = m2
    for c in prange(C):
        n_acc, mean, m2_acc = 0.0, 0.0, 0.0
        for k in range(K):
            n_acc, mean, m2_acc = _chan(n_acc, mean, m2_acc, part[c, k, 0], part[c, k, 1],
                                        part[c, k, 2])
        var = m2_acc / m
        invstd, ab[c, 0], ab[c, 1] = _scale_shift(var, eps, gamma, beta, has_gamma, has_beta, c)
        save_mean[c] = mean
        save_invstd[c] = invstd
        mean64[c] = mean
        var64[c] = var
        if has_running:
            _running_update(rmean, rvar, c, mean, var, m, momentum)
    if write_y:
        for t in prange(C * K):
            c, k = t // K, t % K
            _nchw_normalize_rows(x, y, c, (N * k) // K, (N * (k + 1)) // K, mean64[c], ab[c, 0],
                                 ab[c, 1])


@njit(fastmath=_FM, cache=True)
def _nchw_rows_grad_sums(dy, x, c, n0, n1, mean):
    """Σ dy and Σ dy·(x − μ) of channel c over rows [n0, n1), in float64."""
    sdy, sdyx = 0.0, 0.0
    for n in range(n0, n1):
        xr = x[n, c]
        gr = dy[n, c]
        for s in range(xr.size):
            g = np.float64(gr[s])
            sdy += g
            sdyx += g * (xr[s] - mean)
    return sdy, sdyx


@njit(fastmath=_FM, cache=True)
def _nchw_rows_dx(dy, x, dx, c, n0, n1, mean, k_dy, k_x, k_0):
    """dx = k_dy·dy − k_x·(x − μ) + k_0 over rows [n0, n1) of channel c."""
    for n in range(n0, n1):
        xr = x[n, c]
        gr = dy[n, c]
        dr = dx[n, c]
        for s in range(xr.size):
            dr[s] = k_dy * gr[s] - k_x * (xr[s] - mean) + k_0


@njit(inline="always")
def _dx_coefficients(sdy, sdyx, mean, invstd, gamma, has_gamma, c, m):
    """From dβ = Σdy and Σdy·(x−μ): dγ and the coefficients of
    dx = γ·invstd·(dy − dβ/m − x̂·dγ/m) = k_dy·dy − k_x·(x − μ) + k_0."""
    g = np.float64(gamma[c]) if has_gamma else 1.0
    dgamma = sdyx * invstd
    k_dy = g * invstd
    k_x = k_dy * invstd * dgamma / m
    k_0 = -k_dy * sdy / m
    return dgamma, k_dy, k_x, k_0


@njit(parallel=True, fastmath=_FM, cache=True)
def bwd_nchw_fused(dy, x, save_mean, save_invstd, gamma, has_gamma, dx, dgamma, dbeta):
    """Backward, one task per channel: the two sums, then dx while dy and x are in cache."""
    N, C, S = x.shape
    m = float(N * S)
    for c in prange(C):
        mean = np.float64(save_mean[c])
        invstd = np.float64(save_invstd[c])
        sdy, sdyx = _nchw_rows_grad_sums(dy, x, c, 0, N, mean)
        dg, k_dy, k_x, k_0 = _dx_coefficients(sdy, sdyx, mean, invstd, gamma, has_gamma, c, m)
        dgamma[c] = dg
        dbeta[c] = sdy
        _nchw_rows_dx(dy, x, dx, c, 0, N, mean, k_dy, k_x, k_0)


@njit(parallel=True, fastmath=_FM, cache=True)
def bwd_nchw_split(dy, x, save_mean, save_invstd, gamma, has_gamma, dx, dgamma, dbeta, part,
                   coef):
    """Backward with channels' rows in K chunks: ``part`` (C, K, 2) sums, ``coef`` (C, 3)."""
    N, C, S = x.shape
    K = part.shape[1]
    m = float(N * S)
    for t in prange(C * K):
        c, k = t // K, t % K
        sdy, sdyx = _nchw_rows_grad_sums(dy, x, c, (N * k) // K, (N * (k + 1)) // K,
                                         np.float64(save_mean[c]))
        part[c, k, 0] = sdy
        part[c, k, 1] = sdyx
    for c in prange(C):
        sdy, sdyx = 0.0, 0.0
        for k in range(K):
            sdy += part[c, k, 0]
            sdyx += part[c, k, 1]
        dg, k_dy, k_x, k_0 = _dx_coefficients(sdy, sdyx, np.float64(save_mean[c]),
                                              np.float64(save_invstd[c]), gamma, has_gamma, c, m)
        dgamma[c] = dg
        dbeta[c] = sdy
        coef[c, 0] = k_dy
        coef[c, 1] = k_x
        coef[c, 2] = k_0
    for t in prange(C * K):
        c, k = t // K, t % K
        _nchw_rows_dx(dy, x, dx, c, (N * k) // K, (N * (k + 1)) // K, np.float64(save_mean[c]),
                      coef[c, 0], coef[c, 1], coef[c, 2])


@njit(parallel=True, fastmath=_FM, cache=True)
def infer_nchw(x, rmean, rvar, gamma, beta, has_gamma, has_beta, eps, y):
    """Inference: task r ↦ row (n, c) = (r // C, r % C); y = α_c·x + β'_c, one read, one write."""
    N, C, S = x.shape
    for r in prange(N * C):
        n, c = r // C, r % C
        _, alpha, b = _scale_shift(np.float64(rvar[c]), eps, gamma, beta, has_gamma, has_beta, c)
        shift = b - np.float64(rmean[c]) * alpha
        xr = x[n, c]
        yr = y[n, c]
        for s in range(S):
            yr[s] = xr[s] * alpha + shift


# --------------------------------------------------------------------------------------------
# NC: x is (N, C) with C contiguous. A tile is columns [c0, c1) over rows [r0, r1); inner loops
# run along C (unit stride, vectorized), per-column accumulators live in small float64 arrays.
# --------------------------------------------------------------------------------------------
@njit(fastmath=_FM, cache=True)
def _nc_tile_stats(x, r0, r1, c0, c1, mu, m2, bmu, bm2):
    """Per-column mean and M2 over rows [r0, r1), columns [c0, c1) into mu, m2 (indexed from 0).

    Rows are taken in blocks of ≤ NC_TILE_BYTES (L2-resident between the two passes); each block
    gets an exact two-pass mean/M2 per column, blocks are merged with Chan. Inner loops run over
    1-D row slices x[n, c0:c1] (unit stride), which LLVM vectorizes. Returns the count."""
    w = c1 - c0
    rows = max(1, NC_TILE_BYTES // (w * x.itemsize))
    n_acc = 0.0
    for b0 in range(r0, r1, rows):
        b1 = min(r1, b0 + rows)
        nb = float(b1 - b0)
        bmu[:w] = 0.0
        bm2[:w] = 0.0
        for n in range(b0, b1):
            xr = x[n, c0:c1]
            for j in range(w):
                bmu[j] += xr[j]
        for j in range(w):
            bmu[j] /= nb
        for n in range(b0, b1):
            xr = x[n, c0:c1]
            for j in range(w):
                d = xr[j] - bmu[j]
                bm2[j] += d * d
        if n_acc == 0.0:
            mu[:w] = bmu[:w]
            m2[:w] = bm2[:w]
        else:
            for j in range(w):
                _, mu[j], m2[j] = _chan(n_acc, mu[j], m2[j], nb, bmu[j], bm2[j])
        n_acc += nb
    return n_acc


@njit(fastmath=_FM, cache=True)
def _nc_normalize(x, y, r0, r1, c0, c1, mean, alpha, beta):
    """y = (x − μ)·α + β over rows [r0, r1), columns [c0, c1); μ, α, β indexed by column − c0.
    Inference passes μ = 0 and β = β' (the folded form)."""
    w = c1 - c0
    for n in range(r0, r1):
        xr = x[n, c0:c1]
        yr = y[n, c0:c1]
        for j in range(w):
            yr[j] = (xr[j] - mean[j]) * alpha[j] + beta[j]


@njit(parallel=True, fastmath=_FM, cache=True)
def fwd_nc_fused(x, gamma, beta, has_gamma, has_beta, eps, rmean, rvar, has_running, momentum,
                 write_y, y, save_mean, save_invstd, mean64, var64, tile_width):
    """Forward-train, one task per tile of ``tile_width`` columns over all N rows."""
    N, C = x.shape
    m = float(N)
    ntiles = (C + tile_width - 1) // tile_width
    for t in prange(ntiles):
        c0 = t * tile_width
        c1 = min(C, c0 + tile_width)
        w = c1 - c0
        mu = np.empty(w)
        m2 = np.empty(w)
        bsum = np.empty(w)
        bm2 = np.empty(w)
        _nc_tile_stats(x, 0, N, c0, c1, mu, m2, bsum, bm2)
        # reuse bsum/bm2 as α/β of the tile's columns
        for j in range(w):
            c = c0 + j
            var = m2[j] / m
            invstd, bsum[j], bm2[j] = _scale_shift(var, eps, gamma, beta, has_gamma, has_beta, c)
            save_mean[c] = mu[j]
            save_invstd[c] = invstd
            mean64[c] = mu[j]
            var64[c] = var
            if has_running:
                _running_update(rmean, rvar, c, mu[j], var, m, momentum)
        if write_y:
            _nc_normalize(x, y, 0, N, c0, c1, mu, bsum, bm2)


@njit(parallel=True, fastmath=_FM, cache=True)
def fwd_nc_split(x, gamma, beta, has_gamma, has_beta, eps, rmean, rvar, has_running, momentum,
                 write_y, y, save_mean, save_invstd, mean64, var64, part, ab):
    """Forward-train with N cut into K row chunks: ``part`` (K, 3, C) partials, ``ab`` (2, C)."""
    N, C = x.shape
    K = part.shape[0]
    m = float(N)
    for k in prange(K):
        bsum = np.empty(C)
        bm2 = np.empty(C)
        part[k, 0, :] = _nc_tile_stats(x, (N * k) // K, (N * (k + 1)) // K, 0, C, part[k, 1],
                                       part[k, 2], bsum, bm2)
    for c in prange(C):
        n_acc, mean, m2_acc = 0.0, 0.0, 0.0
        for k in range(K):
            n_acc, mean, m2_acc = _chan(n_acc, mean, m2_acc, part[k, 0, c], part[k, 1, c],
                                        part[k, 2, c])
        var = m2_acc / m
        invstd, ab[0, c], ab[1, c] = _scale_shift(var, eps, gamma, beta, has_gamma, has_beta, c)
        save_mean[c] = mean
        save_invstd[c] = invstd
        mean64[c] = mean
        var64[c] = var
        if has_running:
            _running_update(rmean, rvar, c, mean, var, m, momentum)
    if write_y:
        for k in prange(K):
            _nc_normalize(x, y, (N * k) // K, (N * (k + 1)) // K, 0, C, mean64, ab[0], ab[1])


@njit(fastmath=_FM, cache=True)
def _nc_grad_sums(dy, x, r0, r1, c0, c1, save_mean, sdy, sdyx):
    """Per-column Σ dy and Σ dy·(x − μ) over rows [r0, r1), columns [c0, c1) (from index 0)."""
    w = c1 - c0
    sdy[:w] = 0.0
    sdyx[:w] = 0.0
    mean = save_mean[c0:c1]
    for n in range(r0, r1):
        xr = x[n, c0:c1]
        gr = dy[n, c0:c1]
        for j in range(w):
            g = np.float64(gr[j])
            sdy[j] += g
            sdyx[j] += g * (xr[j] - np.float64(mean[j]))


@njit(fastmath=_FM, cache=True)
def _nc_dx(dy, x, dx, r0, r1, c0, c1, save_mean, k_dy, k_x, k_0):
    w = c1 - c0
    mean = save_mean[c0:c1]
    for n in range(r0, r1):
        xr = x[n, c0:c1]
        gr = dy[n, c0:c1]
        dr = dx[n, c0:c1]
        for j in range(w):
            dr[j] = k_dy[j] * gr[j] - k_x[j] * (xr[j] - np.float64(mean[j])) + k_0[j]


@njit(parallel=True, fastmath=_FM, cache=True)
def bwd_nc_fused(dy, x, save_mean, save_invstd, gamma, has_gamma, dx, dgamma, dbeta, tile_width):
    """Backward, one task per tile of columns over all N rows."""
    N, C = x.shape
    m = float(N)
    ntiles = (C + tile_width - 1) // tile_width
    for t in prange(ntiles):
        c0 = t * tile_width
        c1 = min(C, c0 + tile_width)
        w = c1 - c0
        sdy = np.empty(w)
        sdyx = np.empty(w)
        k_x = np.empty(w)
        k_0 = np.empty(w)
        _nc_grad_sums(dy, x, 0, N, c0, c1, save_mean, sdy, sdyx)
        for j in range(w):
            c = c0 + j
            dgamma[c], k_dy, k_x[j], k_0[j] = _dx_coefficients(
                sdy[j], sdyx[j], np.float64(save_mean[c]), np.float64(save_invstd[c]), gamma,
                has_gamma, c, m)
            dbeta[c] = sdy[j]
            sdyx[j] = k_dy  # sdyx is spent: hold k_dy there
        _nc_dx(dy, x, dx, 0, N, c0, c1, save_mean, sdyx, k_x, k_0)


@njit(parallel=True, fastmath=_FM, cache=True)
def bwd_nc_split(dy, x, save_mean, save_invstd, gamma, has_gamma, dx, dgamma, dbeta, part, coef):
    """Backward with N cut into K row chunks: ``part`` (K, 2, C) sums, ``coef`` (3, C)."""
    N, C = x.shape
    K = part.shape[0]
    m = float(N)
    for k in prange(K):
        _nc_grad_sums(dy, x, (N * k) // K, (N * (k + 1)) // K, 0, C, save_mean, part[k, 0],
                      part[k, 1])
    for c in prange(C):
        sdy, sdyx = 0.0, 0.0
        for k in range(K):
            sdy += part[k, 0, c]
            sdyx += part[k, 1, c]
        dgamma[c], coef[0, c], coef[1, c], coef[2, c] = _dx_coefficients(
            sdy, sdyx, np.float64(save_mean[c]), np.float64(save_invstd[c]), gamma, has_gamma,
            c, m)
        dbeta[c] = sdy
    for k in prange(K):
        _nc_dx(dy, x, dx, (N * k) // K, (N * (k + 1)) // K, 0, C, save_mean, coef[0], coef[1],
               coef[2])


@njit(parallel=True, fastmath=_FM, cache=True)
def infer_nc(x, rmean, rvar, gamma, beta, has_gamma, has_beta, eps, y, ab, rows_per_task):
    """Inference: fold α and β' = β − μ·α into ``ab`` (3, C) (row 0 stays 0 as the μ that
    _nc_normalize subtracts), then tasks of ``rows_per_task`` rows: y = x·α + β'."""
    N, C = x.shape
    for c in prange(C):
        _, alpha, b = _scale_shift(np.float64(rvar[c]), eps, gamma, beta, has_gamma, has_beta, c)
        ab[0, c] = 0.0
        ab[1, c] = alpha
        ab[2, c] = b - np.float64(rmean[c]) * alpha
    ntasks = (N + rows_per_task - 1) // rows_per_task
    for t in prange(ntasks):
        r0 = t * rows_per_task
        _nc_normalize(x, y, r0, min(N, r0 + rows_per_task), 0, C, ab[0], ab[1], ab[2])


# --------------------------------------------------------------------------------------------
# Wrappers: convert, allocate, choose the variant, call. Arguments were validated by the API.
# --------------------------------------------------------------------------------------------
from .spec import inverse_perm  # noqa: E402


def _host(a, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"backend 'cpu' takes NumPy arrays; {name} is {type(a).__name__} "
                        "(use backend='cuda' for device arrays)")
    return a


def _kview(a, geom, name: str) -> np.ndarray:
    """The kernels' C-contiguous view of an x-shaped array (one copy if it is laid out
    otherwise)."""
    a = _host(a, name)
    if not geom.identity_perm:
        a = a.transpose(geom.perm)
    return np.ascontiguousarray(a).reshape(geom.kernel_shape)


def _alloc(geom, out):
    """(user array, kernel view) of an x-shaped output, in x's memory layout."""
    if out is None:
        buf = np.empty(geom.memory_shape, dtype=geom.dtype)
        user = buf if geom.identity_perm else buf.transpose(inverse_perm(geom.perm))
    else:
        user = out
        buf = out if geom.identity_perm else out.transpose(geom.perm)
    return user, buf.reshape(geom.kernel_shape)


def _vector(v, name: str):
    """(array, present) for an optional per-channel vector; kernels read it in its own dtype."""
    if v is None:
        return _EMPTY, False
    return np.ascontiguousarray(_host(v, name)), True


def _chunks(rows: int, tasks_wanted: int) -> int:
    return max(1, min(rows, tasks_wanted))


def _tasks_wanted() -> int:
    return TASKS_PER_THREAD * numba.get_num_threads()


def nc_tile_width(N: int, C: int, itemsize: int) -> int:
    """Columns per NC tile: N rows × width fit in NC_TILE_BYTES; a multiple of 16 (whole cache
    lines of float32), between 16 and C."""
    w = NC_TILE_BYTES // max(1, N * itemsize)
    w = max(16, min(512, (w // 16) * 16))
    return min(w, C)


def use_fused(nc: bool, N: int, C: int, itemsize: int, force: str | None = None) -> bool:
    """Fused when it yields enough independent tasks to keep every thread busy."""
    if force is not None:
        return force == "fused"
    if nc:
        w = nc_tile_width(N, C, itemsize)
        return -(-C // w) >= _tasks_wanted()
    return C >= _tasks_wanted()


def _forward(x, gamma, beta, eps, running_mean, running_var, momentum, y, save_mean,
             save_invstd, write_y, force=None):
    """Run the forward-train kernel of x's layout (x is (N, C) or (N, C, S), C-contiguous)."""
    g, has_g = _vector(gamma, "gamma")
    b, has_b = _vector(beta, "beta")
    has_running = running_mean is not None
    rm = running_mean if has_running else _EMPTY
    rv = running_var if has_running else _EMPTY
    C = x.shape[1]
    mean64 = np.empty(C)
    var64 = np.empty(C)
    nc = x.ndim == 2
    N = x.shape[0]
    common = (g, b, has_g, has_b, eps, rm, rv, has_running, momentum, write_y, y, save_mean,
              save_invstd, mean64, var64)
    if use_fused(nc, N, C, x.itemsize, force):
        if nc:
            fwd_nc_fused(x, *common, nc_tile_width(N, C, x.itemsize))
        else:
            fwd_nchw_fused(x, *common)
    else:
        K = _chunks(N, -(-_tasks_wanted() // C))
        if nc:
            fwd_nc_split(x, *common, np.empty((K, 3, C)), np.empty((2, C)))
        else:
            fwd_nchw_split(x, *common, np.empty((C, K, 3)), np.empty((C, 2)))
    return mean64, var64


def _running(v, name):
    if v is None:
        return None
    v = _host(v, name)
    if not v.flags.c_contiguous:
        raise ValueError(f"{name} is updated in place and must be C-contiguous for backend 'cpu'")
    return v


def _no_fusion(args):
    if args.fusion != "none":
        raise NotImplementedError("relu/residual fusion is not implemented on backend 'cpu' yet")


def forward_train(args, force=None):
    _no_fusion(args)
    geom = args.geom
    x = _kview(args.x, geom, "x")
    rm = _running(args.running_mean, "running_mean")
    rv = _running(args.running_var, "running_var")
    if args.out is None:
        y_user, y = _alloc(geom, None)
        save_mean = np.empty(geom.C, dtype=geom.dtype)
        save_invstd = np.empty(geom.C, dtype=geom.dtype)
    else:
        y_user, y = _alloc(geom, args.out[0])
        save_mean, save_invstd = args.out[1], args.out[2]
    _forward(x, args.gamma, args.beta, args.eps, rm, rv, args.momentum, y, save_mean,
             save_invstd, True, force)
    return y_user, save_mean, save_invstd


def backward(args, force=None):
    _no_fusion(args)
    geom = args.geom
    x = _kview(args.x, geom, "x")
    dy = _kview(args.dy, geom, "dy")
    sm = np.ascontiguousarray(_host(args.save_mean, "save_mean"))
    si = np.ascontiguousarray(_host(args.save_invstd, "save_invstd"))
    g, has_g = _vector(args.gamma, "gamma")
    if args.out is None:
        dx_user, dx = _alloc(geom, None)
        dgamma = np.empty(geom.C, dtype=geom.dtype)
        dbeta = np.empty(geom.C, dtype=geom.dtype)
    else:
        dx_user, dx = _alloc(geom, args.out[0])
        dgamma, dbeta = args.out[1], args.out[2]
    N, C = x.shape[0], x.shape[1]
    nc = x.ndim == 2
    if use_fused(nc, N, C, x.itemsize, force):
        if nc:
            bwd_nc_fused(dy, x, sm, si, g, has_g, dx, dgamma, dbeta,
                         nc_tile_width(N, C, x.itemsize))
        else:
            bwd_nchw_fused(dy, x, sm, si, g, has_g, dx, dgamma, dbeta)
    else:
        K = _chunks(N, -(-_tasks_wanted() // C))
        if nc:
            bwd_nc_split(dy, x, sm, si, g, has_g, dx, dgamma, dbeta, np.empty((K, 2, C)),
                         np.empty((3, C)))
        else:
            bwd_nchw_split(dy, x, sm, si, g, has_g, dx, dgamma, dbeta, np.empty((C, K, 2)),
                           np.empty((C, 3)))
    return dx_user, dgamma, dbeta


def inference(args, force=None):
    _no_fusion(args)
    geom = args.geom
    x = _kview(args.x, geom, "x")
    rm = np.ascontiguousarray(_host(args.running_mean, "running_mean"))
    rv = np.ascontiguousarray(_host(args.running_var, "running_var"))
    g, has_g = _vector(args.gamma, "gamma")
    b, has_b = _vector(args.beta, "beta")
    y_user, y = _alloc(geom, args.out)
    if x.ndim == 2:
        N, C = x.shape
        rows = max(1, min(N, -(-N // _tasks_wanted()), max(1, 2 * BLOCK // C)))
        infer_nc(x, rm, rv, g, b, has_g, has_b, args.eps, y, np.empty((3, C)), rows)
    else:
        infer_nchw(x, rm, rv, g, b, has_g, has_b, args.eps, y)
    return (y_user,)


def batch_stats(x, channel_axis=1) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ²_biased) per channel in float64, by the forward kernel's own statistics code."""
    from .validate import geometry

    geom = geometry(x, channel_axis)
    xk = _kview(x, geom, "x")
    C = geom.C
    dummy = np.empty((0,) * xk.ndim, dtype=xk.dtype)
    return _forward(xk, None, None, 1e-5, None, None, 0.0, dummy, np.empty(C, xk.dtype),
                    np.empty(C, xk.dtype), False)


# --------------------------------------------------------------------------------------------
# Parts: forward and backward cut at their reductions (registry.Parts, nbbn.distributed)
# --------------------------------------------------------------------------------------------
@njit(parallel=True, fastmath=_FM, cache=True)
def _normalize_nc(x, mean, alpha, beta, y, rows_per_task):
    N = x.shape[0]
    C = x.shape[1]
    ntasks = (N + rows_per_task - 1) // rows_per_task
    for t in prange(ntasks):
        r0 = t * rows_per_task
        _nc_normalize(x, y, r0, min(N, r0 + rows_per_task), 0, C, mean, alpha, beta)


@njit(parallel=True, fastmath=_FM, cache=True)
def _normalize_nchw(x, mean, alpha, beta, y):
    N, C, S = x.shape
    for r in prange(N * C):
        n, c = r // C, r % C
        _nchw_normalize_rows(x, y, c, n, n + 1, mean[c], alpha[c], beta[c])


@njit(parallel=True, fastmath=_FM, cache=True)
def _grad_sums_nc(dy, x, save_mean, part):
    """part (K, 2, C): per row chunk Σdy and Σdy·(x − μ)."""
    N = x.shape[0]
    C = x.shape[1]
    K = part.shape[0]
    for k in prange(K):
        _nc_grad_sums(dy, x, (N * k) // K, (N * (k + 1)) // K, 0, C, save_mean, part[k, 0],
                      part[k, 1])


@njit(parallel=True, fastmath=_FM, cache=True)
def _grad_sums_nchw(dy, x, save_mean, out):
    N, C, S = x.shape
    for c in prange(C):
        out[0, c], out[1, c] = _nchw_rows_grad_sums(dy, x, c, 0, N, np.float64(save_mean[c]))


@njit(parallel=True, fastmath=_FM, cache=True)
def _apply_dx_nc(dy, x, dx, save_mean, coef, rows_per_task):
    N = x.shape[0]
    C = x.shape[1]
    ntasks = (N + rows_per_task - 1) // rows_per_task
    for t in prange(ntasks):
        r0 = t * rows_per_task
        _nc_dx(dy, x, dx, r0, min(N, r0 + rows_per_task), 0, C, save_mean, coef[0], coef[1],
               coef[2])


@njit(parallel=True, fastmath=_FM, cache=True)
def _apply_dx_nchw(dy, x, dx, save_mean, coef):
    N, C, S = x.shape
    for r in prange(N * C):
        n, c = r // C, r % C
        _nchw_rows_dx(dy, x, dx, c, n, n + 1, np.float64(save_mean[c]), coef[0, c], coef[1, c],
                      coef[2, c])


def _rows_per_task(N: int, C: int) -> int:
    return max(1, min(N, -(-N // _tasks_wanted()), max(1, 2 * BLOCK // C)))


def part_stats(args):
    """(mean, M2) of this x in float64, by the forward-train statistics code."""
    geom = args.geom
    xk = _kview(args.x, geom, "x")
    C = geom.C
    dummy = np.empty((0,) * xk.ndim, dtype=xk.dtype)
    mean, var = _forward(xk, None, None, 1e-5, None, None, 0.0, dummy, np.empty(C, xk.dtype),
                         np.empty(C, xk.dtype), False)
    return mean, var * geom.m


def part_normalize(args, mean, var, m_total):
    """y = (x − μ)·α + β with α = γ/√(var + ε) from given statistics; running update with the
    unbiased var·m_total/(m_total − 1)."""
    _no_fusion(args)
    geom = args.geom
    x = _kview(args.x, geom, "x")
    mean = np.ascontiguousarray(mean, dtype=np.float64)
    var = np.ascontiguousarray(var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + args.eps)
    gamma = 1.0 if args.gamma is None else np.asarray(args.gamma, dtype=np.float64)
    beta = np.zeros(geom.C) if args.beta is None else np.asarray(args.beta, dtype=np.float64)
    alpha = np.ascontiguousarray(gamma * invstd, dtype=np.float64)
    if args.out is None:
        y_user, y = _alloc(geom, None)
        save_mean = np.empty(geom.C, dtype=geom.dtype)
        save_invstd = np.empty(geom.C, dtype=geom.dtype)
    else:
        y_user, y = _alloc(geom, args.out[0])
        save_mean, save_invstd = args.out[1], args.out[2]
    if x.ndim == 2:
        _normalize_nc(x, mean, alpha, np.ascontiguousarray(beta), y,
                      _rows_per_task(x.shape[0], geom.C))
    else:
        _normalize_nchw(x, mean, alpha, np.ascontiguousarray(beta), y)
    save_mean[...] = mean
    save_invstd[...] = invstd
    if args.running_mean is not None:
        mo = args.momentum
        rm, rv = args.running_mean, args.running_var
        rm[...] = (1.0 - mo) * rm.astype(np.float64) + mo * mean
        rv[...] = (1.0 - mo) * rv.astype(np.float64) + mo * var * (m_total / (m_total - 1.0))
    return y_user, save_mean, save_invstd


def part_grad_sums(args):
    """(Σdy, Σdy·(x − save_mean)) of this x in float64."""
    _no_fusion(args)
    geom = args.geom
    x = _kview(args.x, geom, "x")
    dy = _kview(args.dy, geom, "dy")
    sm = np.ascontiguousarray(_host(args.save_mean, "save_mean"))
    if x.ndim == 2:
        K = _chunks(x.shape[0], _tasks_wanted())
        part = np.empty((K, 2, geom.C))
        _grad_sums_nc(dy, x, sm, part)
        sums = part.sum(axis=0)
    else:
        sums = np.empty((2, geom.C))
        _grad_sums_nchw(dy, x, sm, sums)
    return sums[0].copy(), sums[1].copy()


def part_grad_apply(args, sum_dy, sum_dy_xmu, m_total):
    """dx = k_dy·dy − k_x·(x − μ) + k_0 from given sums (see _dx_coefficients)."""
    _no_fusion(args)
    geom = args.geom
    x = _kview(args.x, geom, "x")
    dy = _kview(args.dy, geom, "dy")
    sm = np.ascontiguousarray(_host(args.save_mean, "save_mean"))
    invstd = np.asarray(args.save_invstd, dtype=np.float64)
    gamma = 1.0 if args.gamma is None else np.asarray(args.gamma, dtype=np.float64)
    sdy = np.asarray(sum_dy, dtype=np.float64)
    sdyx = np.asarray(sum_dy_xmu, dtype=np.float64)
    dg = sdyx * invstd
    k_dy = gamma * invstd * np.ones(geom.C)
    coef = np.ascontiguousarray(np.stack([k_dy, k_dy * invstd * dg / m_total,
                                          -k_dy * sdy / m_total]))
    if args.out is None:
        dx_user, dx = _alloc(geom, None)
        dgamma = np.empty(geom.C, dtype=geom.dtype)
        dbeta = np.empty(geom.C, dtype=geom.dtype)
    else:
        dx_user, dx = _alloc(geom, args.out[0])
        dgamma, dbeta = args.out[1], args.out[2]
    if x.ndim == 2:
        _apply_dx_nc(dy, x, dx, sm, coef, _rows_per_task(x.shape[0], geom.C))
    else:
        _apply_dx_nchw(dy, x, dx, sm, coef)
    dgamma[...] = dg
    dbeta[...] = sdy
    return dx_user, dgamma, dbeta


_DESCRIPTIONS = {
    Op.FORWARD_TRAIN: "chunked two-pass statistics + Chan merge (float64), fused normalize",
    Op.BACKWARD: "float64 sums of dy and dy·(x−μ), fused dx",
    Op.INFERENCE: "folded y = α·x + β' (float64 per element)",
}
for _op, _fn in ((Op.FORWARD_TRAIN, forward_train), (Op.BACKWARD, backward),
                 (Op.INFERENCE, inference)):
    for _layout in Layout:
        registry.register(registry.KernelSpec("cpu", _op, _layout, _fn, _DESCRIPTIONS[_op],
                                              variant="auto"))
        for _v in ("fused", "split"):
            registry.register(registry.KernelSpec(
                "cpu", _op, _layout, lambda a, _f=_fn, _v=_v: _f(a, _v),
                _DESCRIPTIONS[_op] + f" ({_v} work split)", variant=_v))
registry.register_stats("cpu", batch_stats)
registry.register_parts("cpu", registry.Parts(part_stats, part_normalize, part_grad_sums,
                                              part_grad_apply))
