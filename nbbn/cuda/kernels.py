"""CUDA kernels (numba-cuda ``@cuda.jit``), their launchers, and the ``"cuda"`` backend's wrappers.

Formulas: :mod:`nbbn.reference`; reductions and the shifted-sum statistics: :mod:`nbbn.cuda.reduce`.
This module is about how the work is laid out on the GPU.

Versions (llm.c style; every version is tested against the reference)
    # v1: two-stage, deterministic -- the streaming kernel writes one partial (s1, s2) per block,
    #     a second, tiny kernel merges each channel's partials in a fixed order and writes μ,
    #     invstd, the running statistics and the per-channel coefficients.
    # v2: last-block ticket -- the same streaming kernel, but each block then takes a ticket
    #     (threadfence + atomic.inc); the last block of a channel (NCHW) or column group (NC)
    #     merges the partials itself, in the same fixed order as its threads' layout dictates.
    #     Still deterministic, one launch fewer per reduction.
    Elementwise passes (normalize, dx) are the same for both. ``LaunchConfig.variant`` picks one;
    v1 is the default until a GPU run says otherwise (benchmarks/gpu_bench.py times both).

Thread-to-data mapping
    NCHW (x viewed as (N, C, S), S = H·W): grid (C, B), 1-D blocks of T threads; thread
        q = b·T + t of block (c, b) is one of the P = B·T threads of channel c. Its values are
        strided *runs* (row-strided unless the batch is tiny):
        row-strided (L ≥ 1): the channel is cut into L·S slots r·S + s (0 ≤ r < L); slot q is
            column s at rows r, r + L, r + 2L, ... -- values a fixed L·C·S apart (one add per
            element, no division or wrap test in the loop). Consecutive threads take
            consecutive s (coalesced; a warp crosses at most one row boundary). Threads take
            slots q, q + P, ... if a huge S outgrows the grid.
        column-strided (L = 0; N < min_per_thread and S large): in every row, columns
            q, q + P, q + 2P, ...: long runs even at N = 1.
        The launcher picks L and B so that C·B blocks fill the GPU while each thread keeps at
        least ``min_per_thread`` values: small C is split across many blocks, small S packs L
        rows per stride.
    NC (x is (N, C), C contiguous): grid (ceil(C/bx), G), 2-D blocks (bx, by). Thread (tx, ty)
        of block (gx, g) owns channel c = gx·bx + tx (a warp reads bx consecutive channels of
        32/bx rows: coalesced) and rows n = g·by + ty + k·(G·by). Partials are per (row chunk g,
        channel); threads along y are combined by :func:`~nbbn.cuda.reduce.column_sum2`.
    Both layouts come down to per-thread strided *runs* x[off + i·step], processed four values
        at a time (four loads in flight before any is used).
    Merge kernels (v1): 2-D blocks, threads along x own channels, threads along y split the B
        partials of each channel, then column_sum2.

Arithmetic
    Every widening is an explicit ``float64(v)``: compiled numba promotes ``float32 * 1.0`` to
    float64, but the simulator runs NumPy scalars, where (NEP 50) it stays float32.
    Statistics: float64 shifted sums per thread (see reduce.py), so float32 and float64 inputs
    share one path. μ is split into μ_hi + μ_lo in x's dtype (μ_hi = μ rounded, μ_lo = the
    rest); elementwise passes form d = (x − μ_hi) − μ_lo in x's dtype -- x − μ_hi is exact when
    x is near μ (Sterbenz), so d is accurate even at |μ|/σ = 1e4 in float32, where x·α − μ·α
    would cancel catastrophically -- then y = d·α + β (one rounding per operation, float32
    stays at float32 speed). Backward: dx = k1·dy + k2·d + k3 with k1 = γ·invstd,
    k2 = −k1·invstd·dγ/m, k3 = −k1·dβ/m (float64 per channel, stored in x's dtype).
    Inference uses the same y = ((x − μ_hi) − μ_lo)·α + β with α = γ/√(σ²_pop + ε), folded per
    channel by a tiny kernel: one read and one write per element.

Bytes moved per element of S bytes (the benchmark's model): inference 2S (read x, write y);
    forward-train 3S (statistics read x; normalize reads x, writes y); backward 5S (sums read
    dy and x; dx pass reads dy and x, writes dx). Per-channel traffic is O(C·B), negligible.

Arrays
    Host (NumPy) inputs are made C-contiguous, copied to the device, computed, and the outputs
    copied back into new NumPy arrays (or ``out=``); host running statistics are updated on a
    device copy and written back in place. Device inputs -- numba device arrays or anything with
    ``__cuda_array_interface__`` (CuPy, PyTorch CUDA tensors) via ``cuda.as_cuda_array``, no
    copy -- stay on the device; outputs are numba device arrays (or the caller's ``out=``
    objects); device running statistics are updated in place, strided ones included.
    Host per-channel vectors are uploaded as float64 (C values); device ones are read in their
    own dtype. ``x`` and ``dy`` on the device must be C-contiguous: the kernels index them as
    one flat buffer, and a hidden device copy would double the traffic the caller asked for --
    a non-contiguous device ``x``/``dy`` raises ValueError saying so.

Internal scratch (partials, coefficients, tickets) is cached per (thread, CUDA context) and
reused, so steady-state calls allocate only their outputs (none with ``out=``).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from numba import cuda, float32, float64, int64, types, uint32, uint64
from numba.cuda.cudadrv import devicearray

from .. import registry, validate
from ..spec import BackwardArgs, Geometry, InferArgs, Layout, Op, TrainArgs
from .reduce import (
    MAX_THREADS,
    SCRATCH_SHAPE,
    SIMULATOR,
    block_sum2,
    column_sum2,
    last_block_arrives,
    load_l2,
)

# Bits of the ``flags`` kernel argument: which optional per-channel vectors were given.
HAS_GAMMA = 1
HAS_BETA = 2
HAS_RUNNING = 4

# ---------------------------------------------------------------------------------------------
# Kernel table: every kernel is declared with the signature builder the PTX check compiles it
# with (nbbn.cuda.ptxcheck), so a kernel cannot be added without being compiled there.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KernelEntry:
    name: str
    dispatcher: object
    #: t -> tuple of numba types, for the type namespace of :func:`signature_types`.
    signature: Callable[[SimpleNamespace], tuple]


KERNELS: dict[str, KernelEntry] = {}


def _kernel(signature):
    """``@cuda.jit`` plus an entry in :data:`KERNELS`."""

    def deco(pyfunc):
        disp = cuda.jit(pyfunc)
        KERNELS[pyfunc.__name__] = KernelEntry(pyfunc.__name__, disp, signature)
        return disp

    return deco


def signature_types(dtype) -> SimpleNamespace:
    """Numba types of kernel arguments when x has ``dtype`` (float32 or float64)."""
    dt = {np.dtype(np.float32): float32, np.dtype(np.float64): float64}[np.dtype(dtype)]
    return SimpleNamespace(
        x=types.Array(dt, 1, "C"),  # x, y, dy, dx: flat, contiguous
        vec=types.Array(dt, 1, "A"),  # per-channel vectors on the device, any stride
        out=types.Array(dt, 1, "C"),  # save_mean, save_invstd, dgamma, dbeta
        coef=types.Array(dt, 2, "C"),  # (rows, C) per-channel coefficients in x's dtype
        part=types.Array(float64, 3, "C"),  # (2, B, C) partial sums
        stats=types.Array(float64, 2, "C"),  # (2, C): μ and σ²_biased in float64
        tickets=types.Array(uint32, 1, "C"),
        i=int64,
        f=float64,
    )


# ---------------------------------------------------------------------------------------------
# Runs: one thread's strided run x[off + i·step], i = 0..cnt−1. Both layouts reduce to runs
# (NCHW: a column s of channel c, every L-th row; NC: channel c, every G·by-th row). Four values
# are loaded before any is used, so each thread keeps four loads in flight. Offsets are uint64:
# numba then emits no negative-index wraparound code, leaving ~1 integer add per element.
# ---------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _run_sums_x(x, off, step, cnt, K):
    """Σ(x − K) and Σ(x − K)² over the run, in float64."""
    o = uint64(off)
    st = uint64(step)
    a = 0.0
    b = 0.0
    i = 0
    while i + 4 <= cnt:
        o1 = o + st
        o2 = o1 + st
        o3 = o2 + st
        d0 = x[o] - K
        d1 = x[o1] - K
        d2 = x[o2] - K
        d3 = x[o3] - K
        a += (d0 + d1) + (d2 + d3)
        b += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        o = o3 + st
        i += 4
    while i < cnt:
        d = x[o] - K
        a += d
        b += d * d
        o += st
        i += 1
    return a, b


@cuda.jit(device=True)
def _run_sums_dy(dy, x, off, step, cnt, mu):
    """Σdy and Σdy·(x − μ) over the run, in float64."""
    o = uint64(off)
    st = uint64(step)
    a = 0.0
    b = 0.0
    i = 0
    while i + 4 <= cnt:
        o1 = o + st
        o2 = o1 + st
        o3 = o2 + st
        g0 = float64(dy[o])
        g1 = float64(dy[o1])
        g2 = float64(dy[o2])
        g3 = float64(dy[o3])
        d0 = x[o] - mu
        d1 = x[o1] - mu
        d2 = x[o2] - mu
        d3 = x[o3] - mu
        a += (g0 + g1) + (g2 + g3)
        b += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3)
        o = o3 + st
        i += 4
    while i < cnt:
        g = float64(dy[o])
        a += g
        b += g * (x[o] - mu)
        o += st
        i += 1
    return a, b


@cuda.jit(device=True)
def _run_normalize(x, y, off, step, cnt, mh, ml, al, be):
    """y = ((x − μ_hi) − μ_lo)·α + β over the run, in x's dtype."""
    o = uint64(off)
    st = uint64(step)
    i = 0
    while i + 4 <= cnt:
        o1 = o + st
        o2 = o1 + st
        o3 = o2 + st
        v0 = x[o]
        v1 = x[o1]
        v2 = x[o2]
        v3 = x[o3]
        y[o] = ((v0 - mh) - ml) * al + be
        y[o1] = ((v1 - mh) - ml) * al + be
        y[o2] = ((v2 - mh) - ml) * al + be
        y[o3] = ((v3 - mh) - ml) * al + be
        o = o3 + st
        i += 4
    while i < cnt:
        y[o] = ((x[o] - mh) - ml) * al + be
        o += st
        i += 1


@cuda.jit(device=True)
def _run_dx(dy, x, dx, off, step, cnt, mh, ml, k1, k2, k3):
    """dx = k1·dy + (k2·((x − μ_hi) − μ_lo) + k3) over the run, in x's dtype."""
    o = uint64(off)
    st = uint64(step)
    i = 0
    while i + 4 <= cnt:
        o1 = o + st
        o2 = o1 + st
        o3 = o2 + st
        g0 = dy[o]
        g1 = dy[o1]
        g2 = dy[o2]
        g3 = dy[o3]
        v0 = x[o]
        v1 = x[o1]
        v2 = x[o2]
        v3 = x[o3]
        dx[o] = k1 * g0 + (k2 * ((v0 - mh) - ml) + k3)
        dx[o1] = k1 * g1 + (k2 * ((v1 - mh) - ml) + k3)
        dx[o2] = k1 * g2 + (k2 * ((v2 - mh) - ml) + k3)
        dx[o3] = k1 * g3 + (k2 * ((v3 - mh) - ml) + k3)
        o = o3 + st
        i += 4
    while i < cnt:
        dx[o] = k1 * dy[o] + (k2 * ((x[o] - mh) - ml) + k3)
        o += st
        i += 1


# ---------------------------------------------------------------------------------------------
# Where a thread's runs are
# ---------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _nchw_runs(S, L, N):
    """NCHW: this thread's index q = b·T + t within its channel, the channel's thread count
    P = B·T, and how many runs the thread has (see :func:`_nchw_run`)."""
    T = cuda.blockDim.x
    q = int64(cuda.blockIdx.y) * T + cuda.threadIdx.x
    P = int64(cuda.gridDim.y) * T
    if L > 0:
        nruns = (L * S - q + P - 1) // P if q < L * S else 0
    else:
        nruns = N if q < S else 0
    return q, P, nruns


@cuda.jit(device=True)
def _nchw_run(k, q, P, c, C, S, L, N):
    """Run k of thread q of channel c as (offset, stride, count).

    L > 0 (row-strided): slot q + k·P = r·S + s (0 ≤ r < L) is column s at rows r, r + L, ...
    L = 0 (column-strided, few rows and long ones): row k at columns q, q + P, q + 2P, ...
    """
    if L > 0:
        slot = q + k * P
        r = slot // S
        s = slot - r * S
        return (r * C + c) * S + s, L * C * S, (N - r + L - 1) // L
    return (k * C + c) * S + q, P, (S - q + P - 1) // P


@cuda.jit(device=True)
def _nc_channel():
    return int64(cuda.blockIdx.x) * cuda.blockDim.x + cuda.threadIdx.x


@cuda.jit(device=True)
def _nc_run(c, C, N):
    """NC: thread (tx, ty) of block (gx, g) takes rows n0 = g·by + ty, n0 + G·by, ... of
    channel c (no rows when c ≥ C). Returns the run (offset, stride, count)."""
    n0 = int64(cuda.blockIdx.y) * cuda.blockDim.y + cuda.threadIdx.y
    rstep = int64(cuda.gridDim.y) * cuda.blockDim.y
    cnt = 0
    if c < C and n0 < N:
        cnt = (N - n0 + rstep - 1) // rstep
    return n0 * C + c, rstep * C, cnt


@cuda.jit(device=True)
def _nchw_thread_sums_x(x, c, C, S, L, K):
    """This thread's shifted sums over all its NCHW runs."""
    N = x.size // (C * S)
    q, P, nruns = _nchw_runs(S, L, N)
    a = 0.0
    b = 0.0
    for k in range(nruns):
        off, step, cnt = _nchw_run(k, q, P, c, C, S, L, N)
        da, db = _run_sums_x(x, off, step, cnt, K)
        a += da
        b += db
    return a, b


@cuda.jit(device=True)
def _nchw_thread_sums_dy(dy, x, c, C, S, L, mu):
    """This thread's Σdy, Σdy·(x − μ) over all its NCHW runs."""
    N = x.size // (C * S)
    q, P, nruns = _nchw_runs(S, L, N)
    a = 0.0
    b = 0.0
    for k in range(nruns):
        off, step, cnt = _nchw_run(k, q, P, c, C, S, L, N)
        da, db = _run_sums_dy(dy, x, off, step, cnt, mu)
        a += da
        b += db
    return a, b


# ---------------------------------------------------------------------------------------------
# Per-channel finishing (one thread per channel, after the merge)
# ---------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _finalize_train(c, s1, s2, K, m, eps, momentum, gamma, beta, rm, rv, flags, save_mean,
                    save_invstd, stats, coef):
    """Channel c's statistics from its merged shifted sums, and everything derived from them:

        μ = K + s1/m,   σ² = (s2 − s1·(s1/m))/m  (biased; clamped at 0),   invstd = 1/√(σ² + ε),
        coef[:, c] = (μ_hi, μ_lo, α = γ·invstd, β) in x's dtype,
        running: r ← (1 − momentum)·r + momentum·batch, the variance's batch value σ²·m/(m − 1).
    """
    mean = K + s1 / m
    var = (s2 - s1 * (s1 / m)) / m
    if var < 0.0:
        var = 0.0
    invstd = 1.0 / math.sqrt(var + eps)
    save_mean[c] = mean
    save_invstd[c] = invstd
    stats[0, c] = mean
    stats[1, c] = var
    g = 1.0
    if flags & HAS_GAMMA:
        g = float64(gamma[c])
    bt = 0.0
    if flags & HAS_BETA:
        bt = float64(beta[c])
    coef[0, c] = mean
    coef[1, c] = mean - coef[0, c]  # what rounding μ to x's dtype left out
    coef[2, c] = g * invstd
    coef[3, c] = bt
    if flags & HAS_RUNNING:
        rm[c] = (1.0 - momentum) * float64(rm[c]) + momentum * mean
        rv[c] = (1.0 - momentum) * float64(rv[c]) + momentum * (var * m / (m - 1.0))


@cuda.jit(device=True)
def _finalize_backward(c, sdy, sdyd, m, save_mean, save_invstd, gamma, flags, dgamma, dbeta,
                       coef):
    """dβ = Σdy, dγ = invstd·Σdy·(x − μ), and coef[:, c] = (μ_hi, μ_lo, k1, k2, k3) of
    dx = k1·dy + k2·(x − μ) + k3:  k1 = γ·invstd, k2 = −k1·invstd·dγ/m, k3 = −k1·dβ/m."""
    invstd = float64(save_invstd[c])
    mu = float64(save_mean[c])
    dg = sdyd * invstd
    dgamma[c] = dg
    dbeta[c] = sdy
    g = 1.0
    if flags & HAS_GAMMA:
        g = float64(gamma[c])
    k1 = g * invstd
    coef[0, c] = mu
    coef[1, c] = mu - coef[0, c]
    coef[2, c] = k1
    coef[3, c] = -k1 * invstd * dg / m
    coef[4, c] = -k1 * sdy / m


@cuda.jit(device=True)
def _merge_column(sh, part, c, C):
    """Partials part[:, p, c] summed over p: threads along y take p = ty, ty + by, ...; then a
    fixed-order tree over y (column_sum2). Every thread must call it (it syncs)."""
    B = part.shape[1]
    a = 0.0
    b = 0.0
    if c < C:
        p = int64(cuda.threadIdx.y)
        while p < B:
            a += load_l2(part, (int64(0), p, c))
            b += load_l2(part, (int64(1), p, c))
            p += cuda.blockDim.y
    return column_sum2(sh, a, b)


@cuda.jit(device=True)
def _merge_block(sh, part, c):
    """Partials part[:, p, c] summed over p by a 1-D block: thread t takes p = t, t + T, ...;
    then block_sum2. Every thread must call it."""
    B = part.shape[1]
    a = 0.0
    b = 0.0
    p = int64(cuda.threadIdx.x)
    while p < B:
        a += load_l2(part, (int64(0), p, c))
        b += load_l2(part, (int64(1), p, c))
        p += cuda.blockDim.x
    return block_sum2(sh, a, b)


# ---------------------------------------------------------------------------------------------
# Forward-train: statistics
# ---------------------------------------------------------------------------------------------


def _train_tail(t):
    """Types of (eps, momentum, gamma, beta, rm, rv, flags, save_mean, save_invstd, stats, coef)."""
    return (t.f, t.f, t.vec, t.vec, t.vec, t.vec, t.i, t.out, t.out, t.stats, t.coef)


@_kernel(lambda t: (t.x, t.i, t.i, t.i, t.part))
def nchw_stats_partial(x, C, S, L, part):
    """v1 NCHW: block (c, b) writes its shifted sums to part[:, b, c]."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = int64(cuda.blockIdx.x)
    a, b = _nchw_thread_sums_x(x, c, C, S, L, float64(x[c * S]))
    a, b = block_sum2(sh, a, b)
    if cuda.threadIdx.x == 0:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b


@_kernel(lambda t: (t.x, t.i, t.part))
def nc_stats_partial(x, C, part):
    """v1 NC: block (gx, g) writes the shifted sums of its row chunk g to part[:, g, c]."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = _nc_channel()
    K = 0.0
    if c < C:
        K = float64(x[c])
    off, step, cnt = _nc_run(c, C, x.size // C)
    a, b = _run_sums_x(x, off, step, cnt, K)
    a, b = column_sum2(sh, a, b)
    if cuda.threadIdx.y == 0 and c < C:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b


@_kernel(lambda t: (t.x, t.i, t.part) + _train_tail(t))
def train_merge(x, S, part, eps, momentum, gamma, beta, rm, rv, flags, save_mean, save_invstd,
                stats, coef):
    """v1 second stage: channel c = blockIdx.x·bx + tx merges part[:, :, c] and finishes."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    C = part.shape[2]
    c = _nc_channel()
    a, b = _merge_column(sh, part, c, C)
    if cuda.threadIdx.y == 0 and c < C:
        _finalize_train(c, a, b, float64(x[c * S]), x.size // C, eps, momentum, gamma, beta, rm,
                        rv, flags, save_mean, save_invstd, stats, coef)


@_kernel(lambda t: (t.x, t.i, t.i, t.i, t.part, t.tickets) + _train_tail(t))
def nchw_stats_ticket(x, C, S, L, part, tickets, eps, momentum, gamma, beta, rm, rv, flags,
                      save_mean, save_invstd, stats, coef):
    """v2 NCHW: as nchw_stats_partial, then the last of channel c's blocks merges and finishes."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = int64(cuda.blockIdx.x)
    K = float64(x[c * S])
    a, b = _nchw_thread_sums_x(x, c, C, S, L, K)
    a, b = block_sum2(sh, a, b)
    if cuda.threadIdx.x == 0:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
    if last_block_arrives(sh, tickets, c, cuda.gridDim.y):
        a, b = _merge_block(sh, part, c)
        if cuda.threadIdx.x == 0:
            _finalize_train(c, a, b, K, x.size // C, eps, momentum, gamma, beta, rm, rv, flags,
                            save_mean, save_invstd, stats, coef)


@_kernel(lambda t: (t.x, t.i, t.part, t.tickets) + _train_tail(t))
def nc_stats_ticket(x, C, part, tickets, eps, momentum, gamma, beta, rm, rv, flags, save_mean,
                    save_invstd, stats, coef):
    """v2 NC: as nc_stats_partial, then the last row-chunk block of each column group merges."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = _nc_channel()
    K = 0.0
    if c < C:
        K = float64(x[c])
    off, step, cnt = _nc_run(c, C, x.size // C)
    a, b = _run_sums_x(x, off, step, cnt, K)
    a, b = column_sum2(sh, a, b)
    if cuda.threadIdx.y == 0 and c < C:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
    if last_block_arrives(sh, tickets, cuda.blockIdx.x, cuda.gridDim.y):
        a, b = _merge_column(sh, part, c, C)
        if cuda.threadIdx.y == 0 and c < C:
            _finalize_train(c, a, b, K, x.size // C, eps, momentum, gamma, beta, rm, rv, flags,
                            save_mean, save_invstd, stats, coef)


# ---------------------------------------------------------------------------------------------
# Elementwise passes: y = ((x − μ_hi) − μ_lo)·α + β  and  dx = k1·dy + k2·((x − μ_hi) − μ_lo) + k3
# ---------------------------------------------------------------------------------------------


@_kernel(lambda t: (t.x, t.i, t.i, t.i, t.coef, t.x))
def nchw_normalize(x, C, S, L, coef, y):
    """Block (c, b): y over its threads' runs in channel c, coef rows (μ_hi, μ_lo, α, β)."""
    c = int64(cuda.blockIdx.x)
    mh = coef[0, c]
    ml = coef[1, c]
    al = coef[2, c]
    be = coef[3, c]
    N = x.size // (C * S)
    q, P, nruns = _nchw_runs(S, L, N)
    for k in range(nruns):
        off, step, cnt = _nchw_run(k, q, P, c, C, S, L, N)
        _run_normalize(x, y, off, step, cnt, mh, ml, al, be)


@_kernel(lambda t: (t.x, t.i, t.coef, t.x))
def nc_normalize(x, C, coef, y):
    """Thread (tx, ty): y over its rows of channel c, coef rows (μ_hi, μ_lo, α, β)."""
    c = _nc_channel()
    if c < C:
        off, step, cnt = _nc_run(c, C, x.size // C)
        _run_normalize(x, y, off, step, cnt, coef[0, c], coef[1, c], coef[2, c], coef[3, c])


@_kernel(lambda t: (t.vec, t.vec, t.vec, t.vec, t.i, t.f, t.coef))
def infer_fold(rm, rv, gamma, beta, flags, eps, coef):
    """Thread c: coef[:, c] = (μ_hi, μ_lo, α = γ/√(σ²_pop + ε), β) from the population stats."""
    c = cuda.grid(1)
    if c >= coef.shape[1]:
        return
    g = 1.0
    if flags & HAS_GAMMA:
        g = float64(gamma[c])
    bt = 0.0
    if flags & HAS_BETA:
        bt = float64(beta[c])
    mu = float64(rm[c])
    coef[0, c] = mu
    coef[1, c] = mu - coef[0, c]
    coef[2, c] = g / math.sqrt(float64(rv[c]) + eps)
    coef[3, c] = bt


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


def _bwd_tail(t):
    """Types of (save_mean, save_invstd, gamma, flags, dgamma, dbeta, coef)."""
    return (t.vec, t.vec, t.vec, t.i, t.out, t.out, t.coef)


@_kernel(lambda t: (t.x, t.x, t.i, t.i, t.i, t.vec, t.part))
def nchw_bwd_partial(dy, x, C, S, L, save_mean, part):
    """v1 NCHW: block (c, b) writes its Σdy, Σdy·(x − μ) to part[:, b, c]."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = int64(cuda.blockIdx.x)
    a, b = _nchw_thread_sums_dy(dy, x, c, C, S, L, float64(save_mean[c]))
    a, b = block_sum2(sh, a, b)
    if cuda.threadIdx.x == 0:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b


@_kernel(lambda t: (t.x, t.x, t.i, t.vec, t.part))
def nc_bwd_partial(dy, x, C, save_mean, part):
    """v1 NC: block (gx, g) writes the sums of its row chunk g to part[:, g, c]."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = _nc_channel()
    mu = 0.0
    if c < C:
        mu = float64(save_mean[c])
    off, step, cnt = _nc_run(c, C, x.size // C)
    a, b = _run_sums_dy(dy, x, off, step, cnt, mu)
    a, b = column_sum2(sh, a, b)
    if cuda.threadIdx.y == 0 and c < C:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b


@_kernel(lambda t: (t.i, t.part) + _bwd_tail(t))
def bwd_merge(m, part, save_mean, save_invstd, gamma, flags, dgamma, dbeta, coef):
    """v1 second stage: channel c merges part[:, :, c] and finishes dγ, dβ and the dx coef."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    C = part.shape[2]
    c = _nc_channel()
    a, b = _merge_column(sh, part, c, C)
    if cuda.threadIdx.y == 0 and c < C:
        _finalize_backward(c, a, b, m, save_mean, save_invstd, gamma, flags, dgamma, dbeta, coef)


@_kernel(lambda t: (t.x, t.x, t.i, t.i, t.i, t.part, t.tickets) + _bwd_tail(t))
def nchw_bwd_ticket(dy, x, C, S, L, part, tickets, save_mean, save_invstd, gamma, flags, dgamma,
                    dbeta, coef):
    """v2 NCHW: as nchw_bwd_partial, then the last of channel c's blocks merges and finishes."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = int64(cuda.blockIdx.x)
    a, b = _nchw_thread_sums_dy(dy, x, c, C, S, L, float64(save_mean[c]))
    a, b = block_sum2(sh, a, b)
    if cuda.threadIdx.x == 0:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
    if last_block_arrives(sh, tickets, c, cuda.gridDim.y):
        a, b = _merge_block(sh, part, c)
        if cuda.threadIdx.x == 0:
            _finalize_backward(c, a, b, x.size // C, save_mean, save_invstd, gamma, flags, dgamma,
                               dbeta, coef)


@_kernel(lambda t: (t.x, t.x, t.i, t.part, t.tickets) + _bwd_tail(t))
def nc_bwd_ticket(dy, x, C, part, tickets, save_mean, save_invstd, gamma, flags, dgamma, dbeta,
                  coef):
    """v2 NC: as nc_bwd_partial, then the last row-chunk block of each column group merges."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = _nc_channel()
    mu = 0.0
    if c < C:
        mu = float64(save_mean[c])
    off, step, cnt = _nc_run(c, C, x.size // C)
    a, b = _run_sums_dy(dy, x, off, step, cnt, mu)
    a, b = column_sum2(sh, a, b)
    if cuda.threadIdx.y == 0 and c < C:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
    if last_block_arrives(sh, tickets, cuda.blockIdx.x, cuda.gridDim.y):
        a, b = _merge_column(sh, part, c, C)
        if cuda.threadIdx.y == 0 and c < C:
            _finalize_backward(c, a, b, x.size // C, save_mean, save_invstd, gamma, flags,
                               dgamma, dbeta, coef)


@_kernel(lambda t: (t.x, t.x, t.i, t.i, t.i, t.coef, t.x))
def nchw_bwd_dx(dy, x, C, S, L, coef, dx):
    """Block (c, b): dx over its threads' runs in channel c, coef (μ_hi, μ_lo, k1, k2, k3)."""
    c = int64(cuda.blockIdx.x)
    mh = coef[0, c]
    ml = coef[1, c]
    k1 = coef[2, c]
    k2 = coef[3, c]
    k3 = coef[4, c]
    N = x.size // (C * S)
    q, P, nruns = _nchw_runs(S, L, N)
    for k in range(nruns):
        off, step, cnt = _nchw_run(k, q, P, c, C, S, L, N)
        _run_dx(dy, x, dx, off, step, cnt, mh, ml, k1, k2, k3)


@_kernel(lambda t: (t.x, t.x, t.i, t.coef, t.x))
def nc_bwd_dx(dy, x, C, coef, dx):
    """Thread (tx, ty): dx over its rows of channel c, coef (μ_hi, μ_lo, k1, k2, k3)."""
    c = _nc_channel()
    if c < C:
        off, step, cnt = _nc_run(c, C, x.size // C)
        _run_dx(dy, x, dx, off, step, cnt, coef[0, c], coef[1, c], coef[2, c], coef[3, c],
                coef[4, c])


# ---------------------------------------------------------------------------------------------
# Launchers: grid math
# ---------------------------------------------------------------------------------------------

_MAX_GRID_Y = 65535


@dataclass(frozen=True)
class LaunchConfig:
    """Grid-shaping knobs; the registered backend uses :data:`DEFAULT`."""

    #: Threads per block: a multiple of 32, at most MAX_THREADS.
    block: int = 256
    #: NC kernels: threads along C per block (one warp-wide coalesced row segment).
    nc_width: int = 32
    #: Blocks to aim for per streaming kernel; 0 = one full wave (SMs × 2048 / threads per block).
    target_blocks: int = 0
    #: Split a channel no finer than this many values per thread.
    min_per_thread: int = 8
    #: 1: partials + a merge kernel; 2: last-block ticket (see the module docstring).
    variant: int = 1

    def __post_init__(self):
        if not (self.block % 32 == 0 and 32 <= self.block <= MAX_THREADS):
            raise ValueError(f"block must be a multiple of 32 in [32, {MAX_THREADS}], "
                             f"got {self.block}")
        if self.nc_width < 1 or self.nc_width & (self.nc_width - 1) or self.nc_width > self.block:
            raise ValueError(f"nc_width must be a power of two ≤ block, got {self.nc_width}")
        if self.variant not in (1, 2):
            raise ValueError(f"variant must be 1 or 2, got {self.variant}")
        if self.min_per_thread < 1 or self.target_blocks < 0:
            raise ValueError("min_per_thread must be ≥ 1 and target_blocks ≥ 0")


#: Under the simulator every thread is a Python thread: small blocks, and a few blocks per
#: channel even on tiny inputs so that the merges are exercised.
DEFAULT = (LaunchConfig(block=32, target_blocks=8, min_per_thread=1) if SIMULATOR
           else LaunchConfig())


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2_ceil(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


_SM_COUNT: dict[int, int] = {}


def _sm_count() -> int:
    if SIMULATOR:
        return 1
    dev = cuda.get_current_device()
    if dev.id not in _SM_COUNT:
        _SM_COUNT[dev.id] = int(dev.MULTIPROCESSOR_COUNT)
    return _SM_COUNT[dev.id]


@dataclass(frozen=True)
class Plan:
    """Launch geometry of one call. Streaming kernels: ``grid``/``block``, with ``grid[1]``
    blocks (partials) per channel or column group and ``grid[0]`` channels or column groups
    (ticket slots). Merge kernels (v1): ``merge_grid``/``merge_block``."""

    grid: tuple[int, int]
    block: tuple[int, ...]
    dims: tuple[int, ...]  # size arguments of the layout's kernels: (C, S, L) or (C,)
    merge_grid: tuple[int]
    merge_block: tuple[int, int]

    @property
    def nparts(self) -> int:
        return self.grid[1]

    @property
    def slots(self) -> int:
        return self.grid[0]


def _merge_shape(C: int, nparts: int, cfg: LaunchConfig):
    """Merge kernels: bx channels per block (coalesced), by threads splitting the partials."""
    bx = min(32, _pow2_ceil(C))
    by = max(1, min(cfg.block // bx, _pow2_ceil(nparts)))
    return (_cdiv(C, bx),), (bx, by)


def plan_nchw(g: Geometry, cfg: LaunchConfig) -> Plan:
    """Grid (C, B) of 1-D blocks; dims (C, S, L) with L the kernels' run layout.

    Aim for ``target`` threads per channel (a full GPU), but no fewer than ``min_per_thread``
    values per thread. Row-strided runs (L ≥ 1) when there are enough rows: L = ⌊threads/S⌋
    rows per stride, between 1 and N (one slot per column at L = 1). Column-strided runs (L = 0)
    when there are fewer than ``min_per_thread`` rows and S exceeds the thread budget (batch-1
    inference on large images). Blocks shrink to the work when a channel has little (small S).
    """
    N, C, S, m = g.N, g.C, g.S, g.m
    target = cfg.target_blocks or _sm_count() * max(1, 2048 // cfg.block)
    threads = max(1, min(_cdiv(target * cfg.block, C), _cdiv(m, cfg.min_per_thread)))
    if N >= cfg.min_per_thread or S <= threads:
        L = max(1, min(N, threads // S))
        width = L * S  # slots
    else:
        L = 0
        width = threads
    T = min(cfg.block, 32 * _cdiv(width, 32))
    B = max(1, min(_cdiv(width, T), _MAX_GRID_Y))  # at the cap, threads take several slots
    return Plan((C, B), (T,), (C, S, L), *_merge_shape(C, B, cfg))


def plan_nc(g: Geometry, cfg: LaunchConfig) -> Plan:
    """Grid (ceil(C/bx), G) of (bx, by) blocks: bx channels side by side (bx < nc_width only
    when C is smaller), G row chunks so that the grid fills the GPU."""
    N, C = g.N, g.C
    bx = cfg.nc_width if C >= cfg.nc_width else _pow2_ceil(C)
    by = cfg.block // bx
    gx = _cdiv(C, bx)
    target = cfg.target_blocks or _sm_count() * max(1, 2048 // cfg.block)
    G = max(1, min(_cdiv(target, gx), _cdiv(N, by * cfg.min_per_thread), _MAX_GRID_Y))
    return Plan((gx, G), (bx, by), (C,), *_merge_shape(C, G, cfg))


@dataclass(frozen=True)
class _LayoutKernels:
    plan: Callable[[Geometry, LaunchConfig], Plan]
    stats_partial: object
    stats_ticket: object
    normalize: object
    bwd_partial: object
    bwd_ticket: object
    bwd_dx: object


_LAYOUTS = {
    Layout.NCHW: _LayoutKernels(plan_nchw, nchw_stats_partial, nchw_stats_ticket, nchw_normalize,
                                nchw_bwd_partial, nchw_bwd_ticket, nchw_bwd_dx),
    Layout.NC: _LayoutKernels(plan_nc, nc_stats_partial, nc_stats_ticket, nc_normalize,
                              nc_bwd_partial, nc_bwd_ticket, nc_bwd_dx),
}


# ---------------------------------------------------------------------------------------------
# Scratch buffers, cached per (thread, CUDA context)
# ---------------------------------------------------------------------------------------------

_TLS = threading.local()
_SCRATCH_LIMIT = 64


def _scratch(name: str, shape: tuple[int, ...], dtype) -> object:
    """A zero-initialised device array reused by later calls with the same (name, shape, dtype).

    Safe because every kernel of a call runs on the default stream in launch order, and each
    host thread has its own buffers. Ticket counters start at 0 and the kernels leave them at 0.
    """
    ctx = cuda.current_context()
    store = getattr(_TLS, "store", None)
    if store is None or store[0] is not ctx:
        store = _TLS.store = (ctx, {})
    bufs = store[1]
    key = (name, shape, np.dtype(dtype))
    buf = bufs.get(key)
    if buf is None:
        if len(bufs) >= _SCRATCH_LIMIT:
            bufs.clear()
        buf = bufs[key] = cuda.to_device(np.zeros(shape, dtype))
    return buf


def _dummy():
    """Stands in for an absent optional vector (the kernel's flags say not to read it)."""
    return _scratch("dummy", (1,), np.float64)


# ---------------------------------------------------------------------------------------------
# Array conversion
# ---------------------------------------------------------------------------------------------


def _on_device(a) -> bool:
    return not isinstance(a, np.ndarray)


def _device_view(a, name: str):
    """A numba device array over a CUDA array's memory (no copy)."""
    if devicearray.is_cuda_ndarray(a):
        return a
    if SIMULATOR:
        raise TypeError(f"{name}: the CUDA simulator takes numba device arrays (cuda.to_device), "
                        f"not {type(a).__name__}")
    return cuda.as_cuda_array(a)


def _flat_input(a, name: str):
    """x or dy as a flat contiguous device array: host arrays are copied in, device arrays viewed.
    """
    if not _on_device(a):
        return cuda.to_device(np.ascontiguousarray(a).reshape(-1))
    d = _device_view(a, name)
    if not d.is_c_contiguous():
        raise ValueError(
            f"{name} is a non-contiguous CUDA array (shape {tuple(d.shape)}, strides "
            f"{tuple(d.strides)}); backend 'cuda' reads {name} as one flat buffer and does not "
            f"copy device data behind your back: pass a contiguous array "
            f"(tensor.contiguous(), cupy.ascontiguousarray(...))")
    return d.reshape(d.size)


def _vector(v, name: str):
    """A per-channel input on the device: host vectors are uploaded as float64, device ones are
    read in place in their own dtype. None stays None."""
    if v is None:
        return None
    if not _on_device(v):
        return cuda.to_device(np.ascontiguousarray(v, dtype=np.float64))
    return _device_view(v, name)


class _RunningStat:
    """A running statistic updated in place: a device one directly, a host one through a
    float64 device copy written back (rounded to its dtype) by :meth:`write_back`."""

    def __init__(self, v, name: str):
        self.host = None if v is None or _on_device(v) else v
        self.dev = _vector(v, name)

    def write_back(self) -> None:
        if self.host is not None:
            self.host[...] = self.dev.copy_to_host()


class _Output:
    """One output: the (flat) device array the kernels write, and what the caller gets back."""

    def __init__(self, user, shape: tuple[int, ...], dtype, on_device: bool):
        self.user, self.shape, self.dtype, self.on_device = user, shape, np.dtype(dtype), on_device
        size = math.prod(shape)
        if user is not None and on_device:
            self.dev = _device_view(user, "out").reshape(size)
        else:
            self.dev = cuda.device_array(size, self.dtype)

    def result(self):
        if self.on_device:
            return self.user if self.user is not None else self.dev.reshape(self.shape)
        host = self.user if self.user is not None else np.empty(self.shape, self.dtype)
        self.dev.copy_to_host(host.reshape(-1))
        return host


def _outputs(out, g: Geometry, on_device: bool) -> tuple[_Output, _Output, _Output]:
    """(x-shaped, per-channel, per-channel) outputs of forward-train and backward."""
    user = out if out is not None else (None, None, None)
    return (_Output(user[0], g.shape, g.dtype, on_device),
            _Output(user[1], (g.C,), g.dtype, on_device),
            _Output(user[2], (g.C,), g.dtype, on_device))


def _flags(gamma=None, beta=None, running=None) -> int:
    return ((HAS_GAMMA if gamma is not None else 0) | (HAS_BETA if beta is not None else 0)
            | (HAS_RUNNING if running is not None else 0))


def _or_dummy(v):
    return _dummy() if v is None else v


# ---------------------------------------------------------------------------------------------
# Ops: launch sequences
# ---------------------------------------------------------------------------------------------


def _statistics(xd, g: Geometry, kern: _LayoutKernels, plan: Plan, cfg: LaunchConfig, eps,
                momentum, gamma, beta, rm, rv, save_mean, save_invstd):
    """Statistics stage of forward-train (v1: partials + merge; v2: ticket). Returns the
    (2, C) float64 scratch (μ, σ²_biased) and the (4, C) coefficients for the normalize pass."""
    part = _scratch("part", (2, plan.nparts, g.C), np.float64)
    stats = _scratch("stats", (2, g.C), np.float64)
    coef = _scratch("coef", (4, g.C), g.dtype)
    tail = (eps, momentum, _or_dummy(gamma), _or_dummy(beta), _or_dummy(rm), _or_dummy(rv),
            _flags(gamma, beta, rm), save_mean, save_invstd, stats, coef)
    if cfg.variant == 1:
        kern.stats_partial[plan.grid, plan.block](xd, *plan.dims, part)
        train_merge[plan.merge_grid, plan.merge_block](xd, g.S, part, *tail)
    else:
        tickets = _scratch("tickets", (plan.slots,), np.uint32)
        kern.stats_ticket[plan.grid, plan.block](xd, *plan.dims, part, tickets, *tail)
    return stats, coef


def train(args: TrainArgs, cfg: LaunchConfig | None = None):
    """Forward-train: statistics stage, then y = ((x − μ_hi) − μ_lo)·α + β."""
    cfg = cfg or DEFAULT
    g = args.geom
    kern = _LAYOUTS[g.layout]
    plan = kern.plan(g, cfg)
    on_dev = _on_device(args.x)
    xd = _flat_input(args.x, "x")
    y, save_mean, save_invstd = _outputs(args.out, g, on_dev)
    rm = _RunningStat(args.running_mean, "running_mean")
    rv = _RunningStat(args.running_var, "running_var")
    _, coef = _statistics(xd, g, kern, plan, cfg, args.eps, args.momentum,
                          _vector(args.gamma, "gamma"), _vector(args.beta, "beta"), rm.dev, rv.dev,
                          save_mean.dev, save_invstd.dev)
    kern.normalize[plan.grid, plan.block](xd, *plan.dims, coef, y.dev)
    rm.write_back()
    rv.write_back()
    return y.result(), save_mean.result(), save_invstd.result()


def backward(args: BackwardArgs, cfg: LaunchConfig | None = None):
    """Backward: Σdy and Σdy·(x − μ) per channel (v1 or v2), then the dx pass."""
    cfg = cfg or DEFAULT
    g = args.geom
    on_dev = _on_device(args.x)
    xd = _flat_input(args.x, "x")
    dyd = _flat_input(args.dy, "dy")
    dx, dgamma, dbeta = _outputs(args.out, g, on_dev)
    sm = _vector(args.save_mean, "save_mean")
    si = _vector(args.save_invstd, "save_invstd")
    gamma = _vector(args.gamma, "gamma")
    kern = _LAYOUTS[g.layout]
    plan = kern.plan(g, cfg)
    part = _scratch("part", (2, plan.nparts, g.C), np.float64)
    coef = _scratch("coef", (5, g.C), g.dtype)
    tail = (sm, si, _or_dummy(gamma), _flags(gamma), dgamma.dev, dbeta.dev, coef)
    if cfg.variant == 1:
        kern.bwd_partial[plan.grid, plan.block](dyd, xd, *plan.dims, sm, part)
        bwd_merge[plan.merge_grid, plan.merge_block](g.m, part, *tail)
    else:
        tickets = _scratch("tickets", (plan.slots,), np.uint32)
        kern.bwd_ticket[plan.grid, plan.block](dyd, xd, *plan.dims, part, tickets, *tail)
    kern.bwd_dx[plan.grid, plan.block](dyd, xd, *plan.dims, coef, dx.dev)
    return dx.result(), dgamma.result(), dbeta.result()


def infer(args: InferArgs, cfg: LaunchConfig | None = None):
    """Inference: fold (μ_hi, μ_lo, α, β) per channel, then one read and one write per element."""
    cfg = cfg or DEFAULT
    g = args.geom
    xd = _flat_input(args.x, "x")
    y = _Output(args.out, g.shape, g.dtype, _on_device(args.x))
    gamma = _vector(args.gamma, "gamma")
    beta = _vector(args.beta, "beta")
    coef = _scratch("coef", (4, g.C), g.dtype)
    fold_block = min(cfg.block, 32 * _cdiv(g.C, 32))
    infer_fold[_cdiv(g.C, fold_block), fold_block](
        _vector(args.running_mean, "running_mean"), _vector(args.running_var, "running_var"),
        _or_dummy(gamma), _or_dummy(beta), _flags(gamma, beta), args.eps, coef)
    kern = _LAYOUTS[g.layout]
    plan = kern.plan(g, cfg)
    kern.normalize[plan.grid, plan.block](xd, *plan.dims, coef, y.dev)
    return (y.result(),)


def batch_stats(x, cfg: LaunchConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ²_biased) per channel, float64 NumPy, by the forward-train statistics stage."""
    cfg = cfg or DEFAULT
    g = validate.geometry(x)
    xd = _flat_input(x, "x")
    save = cuda.device_array(g.C, g.dtype)
    kern = _LAYOUTS[g.layout]
    stats, _ = _statistics(xd, g, kern, kern.plan(g, cfg), cfg, 1e-5, 0.0, None, None, None,
                           None, save, save)
    s = stats.copy_to_host()
    return s[0].copy(), s[1].copy()


_DESCRIPTIONS = {
    Op.FORWARD_TRAIN: "float64 shifted sums per block, deterministic merge, (x − μ)·α + β pass",
    Op.BACKWARD: "float64 Σdy, Σdy·(x − μ) per block, deterministic merge, dx pass",
    Op.INFERENCE: "per-channel fold, then (x − μ)·α + β: one read, one write",
}
for _op, _fn in ((Op.FORWARD_TRAIN, train), (Op.BACKWARD, backward), (Op.INFERENCE, infer)):
    for _layout in Layout:
        registry.register(registry.KernelSpec("cuda", _op, _layout, _fn, _DESCRIPTIONS[_op]))
registry.register_stats("cuda", batch_stats)
