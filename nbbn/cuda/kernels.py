"""CUDA kernels (numba-cuda ``@cuda.jit``): device code only. Grid math lives in
:mod:`nbbn.cuda.launch`, array handling and the registered ops in :mod:`nbbn.cuda.backend`;
formulas in :mod:`nbbn.reference`, reductions and the shifted-sum statistics in
:mod:`nbbn.cuda.reduce`.

Versions (llm.c style: side by side below, every one tested against the reference; registered
as the registry variants "v1" and "v2" of forward-train and backward)
    # v1: two-stage, deterministic -- the streaming kernel writes one partial (3 sums) per block,
    #     a second, tiny kernel merges each channel's partials in a fixed order and finishes the
    #     channel (μ, invstd, running statistics, coefficients of the elementwise pass).
    # v2: last-block ticket -- the same streaming kernel, but each block then takes a ticket
    #     (threadfence + atomic.inc); the last block of a channel (NCHW) or column group (NC)
    #     merges the partials itself, in the same fixed order. Still deterministic, one launch
    #     fewer per reduction.
    The elementwise passes (normalize, dx) are shared by both; inference has no reduction and
    runs the same kernels under either name.

Layouts (:mod:`nbbn.spec`)
    NCHW kernels index x as (N, C, S); NC kernels as (rows, C) with C contiguous. NHWC is NC with
    rows = N·H·W: the NC kernels run it unchanged on the memory-order buffer.

Thread-to-data mapping
    NCHW (x viewed as (N, C, S), S = H·W): grid (C, B), 1-D blocks of T threads; thread
        q = b·T + t of block (c, b) is one of the P = B·T threads of channel c. Its values are
        strided *runs* (row-strided unless the batch is tiny):
        row-strided (L ≥ 1): the channel is cut into L·S slots r·S + s (0 ≤ r < L); slot q is
            column s at rows r, r + L, r + 2L, ... -- values a fixed L·C·S apart (one add per
            element, no division or wrap test in the loop). Consecutive threads take
            consecutive s (coalesced; a warp crosses at most one row boundary). Threads take
            slots q, q + P, ... if a huge S outgrows the grid.
        column-strided (L = 0; few rows and S large): in every row, columns q, q + P, q + 2P, ...
        The launcher picks L and B (:func:`nbbn.cuda.launch.plan_nchw`).
    NC / NHWC (x is (rows, C), C contiguous): grid (ceil(C/bx), G), 2-D blocks (bx, by). Thread
        (tx, ty) of block (gx, g) owns channel c = gx·bx + tx (a warp reads bx consecutive
        channels of 32/bx rows: coalesced) and rows n = g·by + ty + k·(G·by). Partials are per
        (row chunk g, channel); threads along y are combined by
        :func:`~nbbn.cuda.reduce.column_sum3`.
    Both layouts come down to per-thread strided *runs* x[off + i·step], processed four values
        at a time (four loads in flight before any is used).
    Merge kernels (v1): 2-D blocks, threads along x own channels, threads along y split the B
        partials of each channel, then column_sum3.

Storage and compute dtypes
    x, y, dy, dx, residual, dz share one storage dtype: float64, float32, float16 or bfloat16
    (the kernels see bfloat16 as its raw uint16 bits, read and written by :func:`ld` and
    :func:`st`). Statistics and every per-channel quantity are float64. The elementwise passes
    compute in the *compute dtype* -- float64 for float64 x, float32 otherwise -- with
    per-channel coefficients stored in it (``coef``); a half value is widened exactly to float32
    on the load, and the result is rounded once (to nearest even) to the storage dtype on the
    store. Every widening to float64 is an explicit
    ``float64(v)``: compiled numba promotes ``float32 * 1.0`` to float64, but the simulator runs
    NumPy scalars, where (NEP 50) it stays float32. Literal zeros are float32 (:data:`ZERO`), so
    no comparison drags a float32 pass into float64.

Arithmetic
    μ is split into μ_hi + μ_lo in the compute dtype (μ_hi = μ rounded, μ_lo = the rest);
    elementwise passes form d = (x − μ_hi) − μ_lo -- x − μ_hi is exact when x is near μ
    (Sterbenz), so d is accurate even at |μ|/σ = 1e4 in float32, where x·α − μ·α would cancel
    catastrophically -- then t = d·α + β (one rounding per operation).
    Fusion: y = max(t + residual, 0) with ``RELU`` and ``HAS_RESIDUAL`` (residual added in the
    compute dtype; NaN passes the ReLU as NaN).
    Backward: dx = k1·g + k2·d + k3 with k1 = γ·invstd, k2 = −k1·invstd·dγ/m, k3 = −k1·dβ/m,
    g = dy, or with ``RELU`` g = dz = dy·[y > 0] (the sums pass writes dz, the dx pass reads it
    in place of dy).
    Backward's save_mean residual fold: the sums pass also accumulates r = Σ(x − save_mean). If
    |r/m| ≤ FOLD_ULPS ulps of save_mean in its precision (:mod:`nbbn.fold` states the rule for
    every backend; the kernels get the precision's significand bits in ``fold_tol``), backward
    uses μ = save_mean + r/m, the batch mean to float64 accuracy, in dγ
    (Σg·(x − μ) = Σg·(x − save_mean) − (r/m)·Σg) and in dx. Otherwise
    (an intentionally different mean, e.g. a global mean in synchronized BN) save_mean is used
    as given. Without the fold, a float32 save_mean at |μ|/σ = 1e3 is off by ~3e-5·σ and dx
    inherits that relative to ‖γ·invstd·dy‖ (1.9e-4 at N = 2).

Bytes moved per element of S bytes (the benchmark's model): inference 2S (read x, write y);
    forward-train 3S (statistics read x; normalize reads x, writes y); backward 5S (sums read
    dy and x; dx pass reads dy and x, writes dx). Fusion adds one read (residual; backward's y)
    and backward's relu one write (dz): forward-train 4S, inference 3S, backward 7S. Per-channel
    traffic is O(C·B), negligible.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
from numba import cuda, float32, float64, int32, int64, types, uint16, uint32, uint64

from ..fold import FOLD_ULPS
from .reduce import (
    SCRATCH_SHAPE,
    SIMULATOR,
    block_sum3,
    column_sum3,
    last_block_arrives,
    load_l2,
)

# Bits of the ``flags`` kernel argument: which optional inputs were given, which fusion runs.
HAS_GAMMA = 1
HAS_BETA = 2
HAS_RUNNING = 4
HAS_RESIDUAL = 8
RELU = 16

#: A float32 zero: comparisons and ReLU clamps stay in the compute dtype.
ZERO = float32(0.0)

# ---------------------------------------------------------------------------------------------
# Storage access: ld(a, i) reads element i in a dtype arithmetic can use, st(a, i, v) rounds v
# to a's storage and writes it. float64/32/16 arrays are read and written as they are (a float16
# meeting a float32 coefficient is widened exactly by the arithmetic; the store rounds to
# nearest). bfloat16 arrays reach the kernels as their raw uint16 bits:
#     load:  float32 with bits (b << 16)                      -- exact
#     store: the float32's top 16 bits, rounded to nearest even: (u + 0x7FFF + bit16) >> 16,
#            NaN kept a (quiet) NaN
# a shift and a move in PTX. (numba-cuda 0.30's own __nv_bfloat16 conversions compile to
# out-of-line calls to an external shim with arguments passed through local memory, once per
# element.) Chosen at import like the reductions: compiled, an ``overload`` per array dtype;
# under the simulator, the same arithmetic on NumPy scalars.
# ---------------------------------------------------------------------------------------------

if SIMULATOR:

    def ld(a, i):
        v = a[i]
        if a.dtype == np.uint16:
            return np.uint32(int(v) << 16).view(np.float32)
        return v

    def cvt(a, v):
        return np.float64(v) if a.dtype == np.float64 else np.float32(v)

    def st(a, i, v):
        if a.dtype == np.uint16:
            u = int(np.float32(v).view(np.uint32))
            if (u & 0x7FFFFFFF) > 0x7F800000:
                a[i] = (u >> 16) | 0x40
            else:
                a[i] = (u + 0x7FFF + ((u >> 16) & 1)) >> 16
        else:
            a[i] = v

else:
    from numba.cuda import libdevice
    from numba.cuda.extending import overload

    def ld(a, i):  # typed and lowered by the overload below
        raise NotImplementedError

    def st(a, i, v):  # typed and lowered by the overload below
        raise NotImplementedError

    def cvt(a, v):  # typed and lowered by the overload below
        raise NotImplementedError

    @overload(cvt, target="cuda", inline="always")
    def _cvt(a, v):
        if a.dtype == float64:
            return lambda a, v: float64(v)
        return lambda a, v: float32(v)

    @overload(ld, target="cuda", inline="always")
    def _ld(a, i):
        if a.dtype == types.uint16:
            return lambda a, i: libdevice.int_as_float(int32(uint32(a[i]) << uint32(16)))
        return lambda a, i: a[i]

    @overload(st, target="cuda", inline="always")
    def _st(a, i, v):
        if a.dtype == types.uint16:
            def st_bf16(a, i, v):
                u = uint32(libdevice.float_as_int(float32(v)))
                if (u & uint32(0x7FFFFFFF)) > uint32(0x7F800000):
                    a[i] = uint16((u >> uint32(16)) | uint32(0x40))
                else:
                    a[i] = uint16((u + uint32(0x7FFF) + ((u >> uint32(16)) & uint32(1)))
                                  >> uint32(16))
            return st_bf16

        def st_float(a, i, v):
            a[i] = v
        return st_float

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
    #: (max threads per block, min resident blocks per SM), as compiled.
    launch_bounds: tuple[int, int] | None = None


KERNELS: dict[str, KernelEntry] = {}

#: Launch bounds of every kernel: blocks of up to LAUNCH_THREADS (256) threads, at least
#: MIN_BLOCKS of them resident per SM, so ptxas keeps each kernel within
#: MAX_REGISTERS = 65536 / (MIN_BLOCKS·256) = 64 registers, and the planner sizes "one wave" by
#: the four blocks of 256 per SM this guarantees (:func:`nbbn.cuda.launch.resident_blocks`),
#: not by the 8 that 2048 threads per SM would suggest. Tighter caps were measured with
#: ``ptxcheck --ptxas`` (sm_90) and rejected: at 48 registers (5 blocks) the NCHW reduction
#: kernels spill 32-164 bytes per thread, at 40 (6 blocks) 60-290 bytes; local-memory traffic
#: in the streaming loop costs more than the occupancy buys. The PTX check asserts no spills.
LAUNCH_THREADS = 256
MIN_BLOCKS = 4
MAX_REGISTERS = (65536 // (MIN_BLOCKS * LAUNCH_THREADS)) // 8 * 8
LAUNCH_BOUNDS = (LAUNCH_THREADS, MIN_BLOCKS)


#: NBBN_CUDA_CACHE=1 keeps compiled kernels in Numba's on-disk cache (NUMBA_CACHE_DIR), so the
#: processes of one verification run (tests, sanitizer passes, bench) compile each once. Off by
#: default: Numba keys the cache on kernels.py alone, and would not see an edit of reduce.py.
_DISK_CACHE = os.environ.get("NBBN_CUDA_CACHE") == "1"


def _kernel(signature):
    """``@cuda.jit`` with :data:`LAUNCH_BOUNDS`, plus an entry in :data:`KERNELS`."""

    def deco(pyfunc):
        disp = cuda.jit(pyfunc) if SIMULATOR else cuda.jit(
            pyfunc, launch_bounds=LAUNCH_BOUNDS, cache=_DISK_CACHE)
        KERNELS[pyfunc.__name__] = KernelEntry(pyfunc.__name__, disp, signature, LAUNCH_BOUNDS)
        return disp

    return deco


def _dtype_name(dtype) -> str:
    """"float32", ..., "bfloat16" (a name is accepted too: bfloat16 has a NumPy dtype only when
    ml_dtypes is installed, and the PTX check compiles it without)."""
    return dtype if isinstance(dtype, str) else np.dtype(dtype).name


def compute_dtype(dtype) -> np.dtype:
    """Dtype of the elementwise arithmetic and its coefficients, and of the per-channel outputs:
    float64 for float64 x, else float32."""
    return np.dtype(np.float64 if _dtype_name(dtype) == "float64" else np.float32)


def storage_dtype(dtype) -> np.dtype:
    """The dtype of the arrays the kernels index for x of ``dtype``: raw uint16 bits for
    bfloat16 (see :func:`ld`), else x's own."""
    name = _dtype_name(dtype)
    return np.dtype(np.uint16) if name == "bfloat16" else np.dtype(name)


def _numba_storage_type(dtype):
    return {"float16": types.float16, "float32": float32, "float64": float64,
            "uint16": uint16}[storage_dtype(dtype).name]


def signature_types(dtype) -> SimpleNamespace:
    """Numba types of kernel arguments when x has ``dtype`` (float64, float32, float16 or
    bfloat16): storage arrays in :func:`storage_dtype`, coefficients in the compute dtype,
    per-channel vectors and outputs in float64 for float64 x and float32 otherwise."""
    sty = _numba_storage_type(dtype)
    ct = float64 if compute_dtype(dtype) == np.float64 else float32
    return SimpleNamespace(
        x=types.Array(sty, 1, "C"),  # x, y, dy, dx, residual, dz: flat, contiguous (bf16: bits)
        vec=types.Array(ct, 1, "A"),  # per-channel vectors on the device, any stride
        out=types.Array(ct, 1, "C"),  # save_mean, save_invstd, dgamma, dbeta
        coef=types.Array(ct, 2, "C"),  # (rows, C) per-channel coefficients, compute dtype
        part=types.Array(float64, 3, "C"),  # (3, B, C) partial sums
        stats=types.Array(float64, 2, "C"),  # (2, C): μ and σ²_biased; (3, C) backward sums
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
    """Σ(x − K) and Σ(x − K)² over the run, accumulated in float64.

    Each group of four values is summed in the compute dtype (:func:`cvt`: float32 for every
    x but float64) and widened once: two conversions per four values instead of four. K is a
    value of x, so K's compute-dtype copy is exact and d = x − K is exact when x is within a
    factor 2 of K (Sterbenz) and within half an ulp of d otherwise; d² and the four-term sums
    add ~3 float32 roundings of σ-sized terms (≤ 2e-7 relative), far below the float32 1e-5
    variance bound even at |μ|/σ = 1e4 (d stays σ-sized: K is a value of the channel).
    """
    o = uint64(off)
    stp = uint64(step)
    Kc = cvt(x, K)
    a = 0.0
    b = 0.0
    i = 0
    while i + 4 <= cnt:
        o1 = o + stp
        o2 = o1 + stp
        o3 = o2 + stp
        d0 = ld(x, o) - Kc
        d1 = ld(x, o1) - Kc
        d2 = ld(x, o2) - Kc
        d3 = ld(x, o3) - Kc
        a += float64((d0 + d1) + (d2 + d3))
        b += float64((d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3))
        o = o3 + stp
        i += 4
    while i < cnt:
        d = float64(ld(x, o)) - K
        a += d
        b += d * d
        o += stp
        i += 1
    return a, b


@cuda.jit(device=True)
def _grad(dy, y, dz, o, relu):
    """g = dy[o] in the compute dtype; with ``relu`` g = dy·[y > 0], also stored to dz[o]
    (exact: g is dy's own value or 0). ``+ ZERO`` widens a float16 to float32 before g may
    become ZERO (one type for the variable)."""
    g = ld(dy, o) + ZERO
    if relu:
        if not ld(y, o) > ZERO:
            g = ZERO
        st(dz, o, g)
    return g


@cuda.jit(device=True)
def _run_sums_dy(dy, y, dz, x, off, step, cnt, mu, relu):
    """Σg, Σg·(x − μ) and Σ(x − μ) over the run, accumulated in float64 (g: see :func:`_grad`).

    As in :func:`_run_sums_x`, each group of four is formed in the compute dtype and widened
    once (three conversions per four values instead of eight): x − μ is
    (x − μ_hi) − μ_lo with μ = μ_hi + μ_lo split in the compute dtype, as the elementwise
    passes form it, so Σ(x − μ) keeps the accuracy the save_mean fold needs (its error is a few
    float32 roundings of σ-sized terms; the fold corrects μ by ~half an ulp of μ).
    """
    o = uint64(off)
    stp = uint64(step)
    mh = cvt(x, mu)
    ml = cvt(x, mu - float64(mh))
    a = 0.0
    b = 0.0
    r = 0.0
    i = 0
    while i + 4 <= cnt:
        o1 = o + stp
        o2 = o1 + stp
        o3 = o2 + stp
        g0 = _grad(dy, y, dz, o, relu)
        g1 = _grad(dy, y, dz, o1, relu)
        g2 = _grad(dy, y, dz, o2, relu)
        g3 = _grad(dy, y, dz, o3, relu)
        d0 = (ld(x, o) - mh) - ml
        d1 = (ld(x, o1) - mh) - ml
        d2 = (ld(x, o2) - mh) - ml
        d3 = (ld(x, o3) - mh) - ml
        a += float64((g0 + g1) + (g2 + g3))
        b += float64((g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3))
        r += float64((d0 + d1) + (d2 + d3))
        o = o3 + stp
        i += 4
    while i < cnt:
        g = float64(_grad(dy, y, dz, o, relu))
        d = float64(ld(x, o)) - mu
        a += g
        b += g * d
        r += d
        o += stp
        i += 1
    return a, b, r


@cuda.jit(device=True)
def _bn_out(v, r, mh, ml, al, be, relu):
    """t = ((v − μ_hi) − μ_lo)·α + β + r in the compute dtype, then max(t, 0) with ``relu``
    (NaN stays NaN)."""
    t = ((v - mh) - ml) * al + be + r
    if relu and t < ZERO:
        t = ZERO
    return t


@cuda.jit(device=True)
def _run_normalize(x, res, y, off, step, cnt, mh, ml, al, be, flags):
    """y = max(((x − μ_hi) − μ_lo)·α + β + residual, 0) over the run (residual and max by
    ``flags``), computed in the compute dtype, rounded once to y's."""
    o = uint64(off)
    stp = uint64(step)
    has_res = (flags & HAS_RESIDUAL) != 0
    relu = (flags & RELU) != 0
    i = 0
    while i + 4 <= cnt:
        o1 = o + stp
        o2 = o1 + stp
        o3 = o2 + stp
        v0 = ld(x, o)
        v1 = ld(x, o1)
        v2 = ld(x, o2)
        v3 = ld(x, o3)
        r0 = ZERO
        r1 = ZERO
        r2 = ZERO
        r3 = ZERO
        if has_res:  # + ZERO: widened to the compute dtype, the type r0 has without residual
            r0 = ld(res, o) + ZERO
            r1 = ld(res, o1) + ZERO
            r2 = ld(res, o2) + ZERO
            r3 = ld(res, o3) + ZERO
        st(y, o, _bn_out(v0, r0, mh, ml, al, be, relu))
        st(y, o1, _bn_out(v1, r1, mh, ml, al, be, relu))
        st(y, o2, _bn_out(v2, r2, mh, ml, al, be, relu))
        st(y, o3, _bn_out(v3, r3, mh, ml, al, be, relu))
        o = o3 + stp
        i += 4
    while i < cnt:
        r = ZERO
        if has_res:
            r = ld(res, o) + ZERO
        st(y, o, _bn_out(ld(x, o), r, mh, ml, al, be, relu))
        o += stp
        i += 1


@cuda.jit(device=True)
def _run_dx(g, x, dx, off, step, cnt, mh, ml, k1, k2, k3):
    """dx = k1·g + (k2·((x − μ_hi) − μ_lo) + k3) over the run, in the compute dtype
    (g = dy, or dz with a ReLU)."""
    o = uint64(off)
    stp = uint64(step)
    i = 0
    while i + 4 <= cnt:
        o1 = o + stp
        o2 = o1 + stp
        o3 = o2 + stp
        g0 = ld(g, o)
        g1 = ld(g, o1)
        g2 = ld(g, o2)
        g3 = ld(g, o3)
        v0 = ld(x, o)
        v1 = ld(x, o1)
        v2 = ld(x, o2)
        v3 = ld(x, o3)
        st(dx, o, k1 * g0 + (k2 * ((v0 - mh) - ml) + k3))
        st(dx, o1, k1 * g1 + (k2 * ((v1 - mh) - ml) + k3))
        st(dx, o2, k1 * g2 + (k2 * ((v2 - mh) - ml) + k3))
        st(dx, o3, k1 * g3 + (k2 * ((v3 - mh) - ml) + k3))
        o = o3 + stp
        i += 4
    while i < cnt:
        st(dx, o, k1 * ld(g, o) + (k2 * ((ld(x, o) - mh) - ml) + k3))
        o += stp
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
def _nchw_thread_sums_dy(dy, y, dz, x, c, C, S, L, mu, relu):
    """This thread's Σg, Σg·(x − μ), Σ(x − μ) over all its NCHW runs."""
    N = x.size // (C * S)
    q, P, nruns = _nchw_runs(S, L, N)
    a = 0.0
    b = 0.0
    r = 0.0
    for k in range(nruns):
        off, step, cnt = _nchw_run(k, q, P, c, C, S, L, N)
        da, db, dr = _run_sums_dy(dy, y, dz, x, off, step, cnt, mu, relu)
        a += da
        b += db
        r += dr
    return a, b, r


# ---------------------------------------------------------------------------------------------
# Per-channel finishing (one thread per channel, after the merge)
# ---------------------------------------------------------------------------------------------


@cuda.jit(device=True)
def _finalize_train(c, s1, s2, K, m, eps, momentum, gamma, beta, rm, rv, flags, save_mean,
                    save_invstd, stats, coef):
    """Channel c's statistics from its merged shifted sums, and everything derived from them:

        μ = K + s1/m,   σ² = (s2 − s1·(s1/m))/m  (biased; clamped at 0),   invstd = 1/√(σ² + ε),
        coef[:, c] = (μ_hi, μ_lo, α = γ·invstd, β) in the compute dtype,
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
    coef[1, c] = mean - float64(coef[0, c])  # what rounding μ to the compute dtype left out
    coef[2, c] = g * invstd
    coef[3, c] = bt
    if flags & HAS_RUNNING:
        rm[c] = (1.0 - momentum) * float64(rm[c]) + momentum * mean
        rv[c] = (1.0 - momentum) * float64(rv[c]) + momentum * (var * m / (m - 1.0))


@cuda.jit(device=True)
def _finalize_backward(c, sg, sgd, sd, m, save_mean, save_invstd, gamma, flags, fold_tol,
                       dgamma, dbeta, coef, sums):
    """From Σg, Σg·(x − save_mean) and Σ(x − save_mean) of channel c:

        fold: δ = Σ(x − save_mean)/m; if |δ| ≤ FOLD_ULPS·ulp(save_mean) in a precision of
              ``fold_tol`` significand bits (nbbn.fold; fold_tol < 0: no fold),
              μ = save_mean + δ and
              Σg·(x − μ) = Σg·(x − save_mean) − δ·Σg; else μ = save_mean (see the module doc);
        dβ = Σg, dγ = invstd·Σg·(x − μ), and coef[:, c] = (μ_hi, μ_lo, k1, k2, k3) of
        dx = k1·g + k2·(x − μ) + k3:  k1 = γ·invstd, k2 = −k1·invstd·dγ/m, k3 = −k1·dβ/m.

    ``sums[:, c]`` keeps the three raw sums (the backend's Parts read them).
    """
    sums[0, c] = sg
    sums[1, c] = sgd
    sums[2, c] = sd
    invstd = float64(save_invstd[c])
    mu = float64(save_mean[c])
    delta = sd / m
    _, e = math.frexp(mu)
    if fold_tol > 0 and abs(delta) <= FOLD_ULPS * math.ldexp(1.0, e - int(fold_tol)):
        mu += delta
        sgd -= delta * sg
    dg = sgd * invstd
    dgamma[c] = dg
    dbeta[c] = sg
    g = 1.0
    if flags & HAS_GAMMA:
        g = float64(gamma[c])
    k1 = g * invstd
    coef[0, c] = mu
    coef[1, c] = mu - float64(coef[0, c])
    coef[2, c] = k1
    coef[3, c] = -k1 * invstd * dg / m
    coef[4, c] = -k1 * sg / m


@cuda.jit(device=True)
def _merge_column(sh, part, c, C):
    """Partials part[:, p, c] summed over p: threads along y take p = ty, ty + by, ...; then a
    fixed-order tree over y (column_sum3). Every thread must call it (it syncs)."""
    B = part.shape[1]
    a = 0.0
    b = 0.0
    r = 0.0
    if c < C:
        p = int64(cuda.threadIdx.y)
        while p < B:
            a += load_l2(part, (int64(0), p, c))
            b += load_l2(part, (int64(1), p, c))
            r += load_l2(part, (int64(2), p, c))
            p += cuda.blockDim.y
    return column_sum3(sh, a, b, r)


@cuda.jit(device=True)
def _merge_block(sh, part, c):
    """Partials part[:, p, c] summed over p by a 1-D block: thread t takes p = t, t + T, ...;
    then block_sum3. Every thread must call it."""
    B = part.shape[1]
    a = 0.0
    b = 0.0
    r = 0.0
    p = int64(cuda.threadIdx.x)
    while p < B:
        a += load_l2(part, (int64(0), p, c))
        b += load_l2(part, (int64(1), p, c))
        r += load_l2(part, (int64(2), p, c))
        p += cuda.blockDim.x
    return block_sum3(sh, a, b, r)


# =============================================================================================
# Forward-train: statistics
# =============================================================================================


def _train_tail(t):
    """Types of (eps, momentum, gamma, beta, rm, rv, flags, save_mean, save_invstd, stats, coef)."""
    return (t.f, t.f, t.vec, t.vec, t.vec, t.vec, t.i, t.out, t.out, t.stats, t.coef)


# ---- v1: partials, then train_merge ------------------------------------------------------------


@_kernel(lambda t: (t.x, t.i, t.i, t.i, t.part))
def nchw_stats_partial(x, C, S, L, part):
    """v1 NCHW: block (c, b) writes its shifted sums to part[:, b, c]."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = int64(cuda.blockIdx.x)
    a, b = _nchw_thread_sums_x(x, c, C, S, L, float64(ld(x, c * S)))
    a, b, _ = block_sum3(sh, a, b, 0.0)
    if cuda.threadIdx.x == 0:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
        part[2, cuda.blockIdx.y, c] = 0.0


@_kernel(lambda t: (t.x, t.i, t.part))
def nc_stats_partial(x, C, part):
    """v1 NC/NHWC: block (gx, g) writes the shifted sums of its row chunk g to part[:, g, c]."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = _nc_channel()
    K = 0.0
    if c < C:
        K = float64(ld(x, c))
    off, step, cnt = _nc_run(c, C, x.size // C)
    a, b = _run_sums_x(x, off, step, cnt, K)
    a, b, _ = column_sum3(sh, a, b, 0.0)
    if cuda.threadIdx.y == 0 and c < C:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
        part[2, cuda.blockIdx.y, c] = 0.0


@_kernel(lambda t: (t.x, t.i, t.part) + _train_tail(t))
def train_merge(x, S, part, eps, momentum, gamma, beta, rm, rv, flags, save_mean, save_invstd,
                stats, coef):
    """v1 second stage: channel c = blockIdx.x·bx + tx merges part[:, :, c] and finishes.
    ``S`` locates the shift K = x[c·S] (the channel's first value; S = 1 for NC/NHWC)."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    C = part.shape[2]
    c = _nc_channel()
    a, b, _ = _merge_column(sh, part, c, C)
    if cuda.threadIdx.y == 0 and c < C:
        _finalize_train(c, a, b, float64(ld(x, c * S)), x.size // C, eps, momentum, gamma, beta, rm,
                        rv, flags, save_mean, save_invstd, stats, coef)


# ---- v2: last-block ticket ---------------------------------------------------------------------


@_kernel(lambda t: (t.x, t.i, t.i, t.i, t.part, t.tickets) + _train_tail(t))
def nchw_stats_ticket(x, C, S, L, part, tickets, eps, momentum, gamma, beta, rm, rv, flags,
                      save_mean, save_invstd, stats, coef):
    """v2 NCHW: as nchw_stats_partial, then the last of channel c's blocks merges and finishes."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = int64(cuda.blockIdx.x)
    K = float64(ld(x, c * S))
    a, b = _nchw_thread_sums_x(x, c, C, S, L, K)
    a, b, _ = block_sum3(sh, a, b, 0.0)
    if cuda.threadIdx.x == 0:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
        part[2, cuda.blockIdx.y, c] = 0.0
    if last_block_arrives(sh, tickets, c, cuda.gridDim.y):
        a, b, _ = _merge_block(sh, part, c)
        if cuda.threadIdx.x == 0:
            _finalize_train(c, a, b, K, x.size // C, eps, momentum, gamma, beta, rm, rv, flags,
                            save_mean, save_invstd, stats, coef)


@_kernel(lambda t: (t.x, t.i, t.part, t.tickets) + _train_tail(t))
def nc_stats_ticket(x, C, part, tickets, eps, momentum, gamma, beta, rm, rv, flags, save_mean,
                    save_invstd, stats, coef):
    """v2 NC/NHWC: as nc_stats_partial, then the last row-chunk block of each column group
    merges."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = _nc_channel()
    K = 0.0
    if c < C:
        K = float64(ld(x, c))
    off, step, cnt = _nc_run(c, C, x.size // C)
    a, b = _run_sums_x(x, off, step, cnt, K)
    a, b, _ = column_sum3(sh, a, b, 0.0)
    if cuda.threadIdx.y == 0 and c < C:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
        part[2, cuda.blockIdx.y, c] = 0.0
    if last_block_arrives(sh, tickets, cuda.blockIdx.x, cuda.gridDim.y):
        a, b, _ = _merge_column(sh, part, c, C)
        if cuda.threadIdx.y == 0 and c < C:
            _finalize_train(c, a, b, K, x.size // C, eps, momentum, gamma, beta, rm, rv, flags,
                            save_mean, save_invstd, stats, coef)


# =============================================================================================
# Elementwise passes (both versions):
#   y = max(((x − μ_hi) − μ_lo)·α + β + residual, 0)   and   dx = k1·g + k2·((x − μ_hi) − μ_lo) + k3
# =============================================================================================


@_kernel(lambda t: (t.x, t.i, t.i, t.i, t.coef, t.x, t.i, t.x))
def nchw_normalize(x, C, S, L, coef, res, flags, y):
    """Block (c, b): y over its threads' runs in channel c, coef rows (μ_hi, μ_lo, α, β);
    ``res`` is read only with HAS_RESIDUAL."""
    c = int64(cuda.blockIdx.x)
    mh = coef[0, c]
    ml = coef[1, c]
    al = coef[2, c]
    be = coef[3, c]
    N = x.size // (C * S)
    q, P, nruns = _nchw_runs(S, L, N)
    for k in range(nruns):
        off, step, cnt = _nchw_run(k, q, P, c, C, S, L, N)
        _run_normalize(x, res, y, off, step, cnt, mh, ml, al, be, flags)


@_kernel(lambda t: (t.x, t.i, t.coef, t.x, t.i, t.x))
def nc_normalize(x, C, coef, res, flags, y):
    """Thread (tx, ty): y over its rows of channel c, coef rows (μ_hi, μ_lo, α, β)."""
    c = _nc_channel()
    if c < C:
        off, step, cnt = _nc_run(c, C, x.size // C)
        _run_normalize(x, res, y, off, step, cnt, coef[0, c], coef[1, c], coef[2, c], coef[3, c],
                       flags)


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
    coef[1, c] = mu - float64(coef[0, c])
    coef[2, c] = g / math.sqrt(float64(rv[c]) + eps)
    coef[3, c] = bt


# =============================================================================================
# Backward
# =============================================================================================


def _bwd_tail(t):
    """Types of (save_mean, save_invstd, gamma, flags, fold_tol, dgamma, dbeta, coef, sums)."""
    return (t.vec, t.vec, t.vec, t.i, t.f, t.out, t.out, t.coef, t.stats)


# ---- v1: partials, then bwd_merge --------------------------------------------------------------


@_kernel(lambda t: (t.x, t.x, t.x, t.x, t.i, t.i, t.i, t.vec, t.i, t.part))
def nchw_bwd_partial(dy, y, dz, x, C, S, L, save_mean, flags, part):
    """v1 NCHW: block (c, b) writes its Σg, Σg·(x − save_mean), Σ(x − save_mean) to
    part[:, b, c] (with RELU, g = dz = dy·[y > 0], written to dz)."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = int64(cuda.blockIdx.x)
    a, b, r = _nchw_thread_sums_dy(dy, y, dz, x, c, C, S, L, float64(save_mean[c]),
                                   (flags & RELU) != 0)
    a, b, r = block_sum3(sh, a, b, r)
    if cuda.threadIdx.x == 0:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
        part[2, cuda.blockIdx.y, c] = r


@_kernel(lambda t: (t.x, t.x, t.x, t.x, t.i, t.vec, t.i, t.part))
def nc_bwd_partial(dy, y, dz, x, C, save_mean, flags, part):
    """v1 NC/NHWC: block (gx, g) writes the sums of its row chunk g to part[:, g, c]."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = _nc_channel()
    mu = 0.0
    if c < C:
        mu = float64(save_mean[c])
    off, step, cnt = _nc_run(c, C, x.size // C)
    a, b, r = _run_sums_dy(dy, y, dz, x, off, step, cnt, mu, (flags & RELU) != 0)
    a, b, r = column_sum3(sh, a, b, r)
    if cuda.threadIdx.y == 0 and c < C:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
        part[2, cuda.blockIdx.y, c] = r


@_kernel(lambda t: (t.i, t.part) + _bwd_tail(t))
def bwd_merge(m, part, save_mean, save_invstd, gamma, flags, fold_tol, dgamma, dbeta, coef,
              sums):
    """v1 second stage: channel c merges part[:, :, c] and finishes dγ, dβ and the dx coef."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    C = part.shape[2]
    c = _nc_channel()
    a, b, r = _merge_column(sh, part, c, C)
    if cuda.threadIdx.y == 0 and c < C:
        _finalize_backward(c, a, b, r, m, save_mean, save_invstd, gamma, flags, fold_tol,
                           dgamma, dbeta, coef, sums)


# ---- v2: last-block ticket ---------------------------------------------------------------------


@_kernel(lambda t: (t.x, t.x, t.x, t.x, t.i, t.i, t.i, t.part, t.tickets) + _bwd_tail(t))
def nchw_bwd_ticket(dy, y, dz, x, C, S, L, part, tickets, save_mean, save_invstd, gamma, flags,
                    fold_tol, dgamma, dbeta, coef, sums):
    """v2 NCHW: as nchw_bwd_partial, then the last of channel c's blocks merges and finishes."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = int64(cuda.blockIdx.x)
    a, b, r = _nchw_thread_sums_dy(dy, y, dz, x, c, C, S, L, float64(save_mean[c]),
                                   (flags & RELU) != 0)
    a, b, r = block_sum3(sh, a, b, r)
    if cuda.threadIdx.x == 0:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
        part[2, cuda.blockIdx.y, c] = r
    if last_block_arrives(sh, tickets, c, cuda.gridDim.y):
        a, b, r = _merge_block(sh, part, c)
        if cuda.threadIdx.x == 0:
            _finalize_backward(c, a, b, r, x.size // C, save_mean, save_invstd, gamma, flags,
                               fold_tol, dgamma, dbeta, coef, sums)


@_kernel(lambda t: (t.x, t.x, t.x, t.x, t.i, t.part, t.tickets) + _bwd_tail(t))
def nc_bwd_ticket(dy, y, dz, x, C, part, tickets, save_mean, save_invstd, gamma, flags, fold_tol,
                  dgamma, dbeta, coef, sums):
    """v2 NC/NHWC: as nc_bwd_partial, then the last row-chunk block of each column group
    merges."""
    sh = cuda.shared.array(SCRATCH_SHAPE, float64)
    c = _nc_channel()
    mu = 0.0
    if c < C:
        mu = float64(save_mean[c])
    off, step, cnt = _nc_run(c, C, x.size // C)
    a, b, r = _run_sums_dy(dy, y, dz, x, off, step, cnt, mu, (flags & RELU) != 0)
    a, b, r = column_sum3(sh, a, b, r)
    if cuda.threadIdx.y == 0 and c < C:
        part[0, cuda.blockIdx.y, c] = a
        part[1, cuda.blockIdx.y, c] = b
        part[2, cuda.blockIdx.y, c] = r
    if last_block_arrives(sh, tickets, cuda.blockIdx.x, cuda.gridDim.y):
        a, b, r = _merge_column(sh, part, c, C)
        if cuda.threadIdx.y == 0 and c < C:
            _finalize_backward(c, a, b, r, x.size // C, save_mean, save_invstd, gamma, flags,
                               fold_tol, dgamma, dbeta, coef, sums)


# ---- the dx pass (both versions) ---------------------------------------------------------------


@_kernel(lambda t: (t.x, t.x, t.i, t.i, t.i, t.coef, t.x))
def nchw_bwd_dx(g, x, C, S, L, coef, dx):
    """Block (c, b): dx over its threads' runs in channel c, coef (μ_hi, μ_lo, k1, k2, k3);
    g is dy, or dz with a ReLU."""
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
        _run_dx(g, x, dx, off, step, cnt, mh, ml, k1, k2, k3)


@_kernel(lambda t: (t.x, t.x, t.i, t.coef, t.x))
def nc_bwd_dx(g, x, C, coef, dx):
    """Thread (tx, ty): dx over its rows of channel c, coef (μ_hi, μ_lo, k1, k2, k3)."""
    c = _nc_channel()
    if c < C:
        off, step, cnt = _nc_run(c, C, x.size // C)
        _run_dx(g, x, dx, off, step, cnt, coef[0, c], coef[1, c], coef[2, c], coef[3, c],
                coef[4, c])


__all__ = ["KERNELS", "SIMULATOR", "compute_dtype", "signature_types"]
