"""Device functions for block-level reductions, shared by every kernel in :mod:`nbbn.cuda.kernels`.

Three sums per thread
    Every reduction here carries three float64 sums: forward-train's statistics use two of them
    (s1, s2 below; the third is 0), backward uses all three (Σdy, Σdy·(x − μ), Σ(x − μ): the last
    one feeds the save_mean residual fold, see :mod:`nbbn.cuda.kernels`). One width keeps one set
    of reduction code; the third lane costs a few shuffles per block, nothing per element.

Statistics by shifted sums, merged with Chan's formula
    Every thread that works on channel c accumulates, in float64,

        s1 = Σ (x − K),   s2 = Σ (x − K)²,   K = x[0, c, 0] (the channel's first value),

    over its share of the channel. Chan et al.'s merge of two disjoint sets A, B,

        M2 = M2_A + M2_B + δ²·n_A·n_B/n,   δ = mean_B − mean_A,

    is exact algebra on (n, s1, s2) when both sets use the same shift K: with
    M2 = s2 − s1²/n the δ² term is already inside s2 − s1²/n of the union, so merging reduces to
    adding s1 and s2. That is the merge used everywhere here (thread → warp → block → grid).
    The final M2 = s2 − s1·(s1/m) cancels only by a factor 1 + (K − μ)²/σ², which is small
    because K is a value of the channel; in float64 this keeps float32 data at |μ|/σ = 1e4 far
    inside the 1e-5 variance bound (E[x²] − E[x]² in float32 would lose every digit there).

Determinism
    Every reduction here combines values in an order fixed by the block shape alone (shuffle
    trees or shared-memory trees), never by timing: a kernel gives bit-identical results run to run.

Real GPU vs simulator (chosen once, at import)
    On a GPU, :func:`block_sum3` reduces each warp with ``shfl_down_sync`` and then the per-warp
    totals in the first warp. Numba's CUDA simulator has no warp shuffles and runs one block at a
    time, so under ``NUMBA_ENABLE_CUDASIM=1`` the same name is bound to a shared-memory tree. The
    kernels call ``block_sum3`` and never see the difference. :func:`column_sum3` (2-D blocks,
    across warps) is a shared-memory tree on both.

Shared memory: every function here works in a scratch array the *kernel* allocates,
``cuda.shared.array(SCRATCH_SHAPE, float64)``, and passes down. (numba-cuda names a shared array
declared inside a device function ``_cudapy_smem_<n>`` per function, so two such device functions
in one kernel fail to link: "Linking globals named '_cudapy_smem_1': symbol multiply defined".)

Limits: blocks of at most :data:`MAX_THREADS` threads; 1-D blocks for :func:`block_sum3` must be a
multiple of 32 threads on a GPU (launchers guarantee both).
"""

from __future__ import annotations

from numba import cuda, uint32
from numba.cuda import config as _cuda_config

#: True when Numba's CUDA simulator is active (decided once, at import).
SIMULATOR = bool(_cuda_config.ENABLE_CUDASIM)
if SIMULATOR:  # the simulator's shared arrays are racy without it (nbbn.cuda.simulator)
    from .simulator import install as _install_simulator_fix

    _install_simulator_fix()

#: Largest block the kernels accept; shared scratch arrays are sized by it (3·512 float64 = 12 KiB).
MAX_THREADS = 512
#: Shape of the float64 shared scratch each kernel allocates for these functions (12 KiB).
SCRATCH_SHAPE = (3, MAX_THREADS)
_FULL_MASK = 0xFFFFFFFF


@cuda.jit(device=True)
def _tree_sum3(sh, a, b, c, k, n, base, stride):
    """Sum (a, b, c) over the n threads k = 0..n−1 that own slots base + k·stride of ``sh``.

    A shared-memory tree: at each level thread k < half adds slot k + half (levels halve a
    power of two ≥ n, so any n works). Every thread of the block must call it (it syncs);
    all threads get the totals of their own group (same ``base``).
    """
    i = base + k * stride
    sh[0, i] = a
    sh[1, i] = b
    sh[2, i] = c
    cuda.syncthreads()
    half = 1
    while half < n:
        half *= 2
    half //= 2
    while half > 0:
        if k < half and k + half < n:
            j = i + half * stride
            sh[0, i] += sh[0, j]
            sh[1, i] += sh[1, j]
            sh[2, i] += sh[2, j]
        cuda.syncthreads()
        half //= 2
    a = sh[0, base]
    b = sh[1, base]
    c = sh[2, base]
    cuda.syncthreads()  # the slots may be rewritten by the caller's next reduction
    return a, b, c


@cuda.jit(device=True)
def _warp_sum(v):
    """Sum over the 32 lanes of a warp, shfl_down tree; lane 0 holds the total."""
    v += cuda.shfl_down_sync(_FULL_MASK, v, 16)
    v += cuda.shfl_down_sync(_FULL_MASK, v, 8)
    v += cuda.shfl_down_sync(_FULL_MASK, v, 4)
    v += cuda.shfl_down_sync(_FULL_MASK, v, 2)
    v += cuda.shfl_down_sync(_FULL_MASK, v, 1)
    return v


@cuda.jit(device=True)
def _block_sum3_shfl(sh, a, b, c):
    """(Σa, Σb, Σc) over a 1-D block (a multiple of 32 threads), returned to every thread.

    Level 1: each warp reduces by shuffles; lane 0 parks its warp's total in ``sh``.
    Level 2: warp 0 reduces the ≤ 16 warp totals by shuffles and parks the block total.
    """
    t = cuda.threadIdx.x
    lane = t % 32
    warp = t // 32
    a = _warp_sum(a)
    b = _warp_sum(b)
    c = _warp_sum(c)
    if lane == 0:
        sh[0, warp] = a
        sh[1, warp] = b
        sh[2, warp] = c
    cuda.syncthreads()
    if warp == 0:
        nwarps = cuda.blockDim.x // 32
        a = sh[0, lane] if lane < nwarps else 0.0
        b = sh[1, lane] if lane < nwarps else 0.0
        c = sh[2, lane] if lane < nwarps else 0.0
        a = _warp_sum(a)
        b = _warp_sum(b)
        c = _warp_sum(c)
        if lane == 0:  # every lane has read its slot: the shuffles above synchronized the warp
            sh[0, 0] = a
            sh[1, 0] = b
            sh[2, 0] = c
    cuda.syncthreads()
    a = sh[0, 0]
    b = sh[1, 0]
    c = sh[2, 0]
    cuda.syncthreads()
    return a, b, c


@cuda.jit(device=True)
def _block_sum3_tree(sh, a, b, c):
    """(Σa, Σb, Σc) over a 1-D block, returned to every thread: shared-memory tree (simulator)."""
    return _tree_sum3(sh, a, b, c, cuda.threadIdx.x, cuda.blockDim.x, 0, 1)


@cuda.jit(device=True)
def column_sum3(sh, a, b, c):
    """(Σa, Σb, Σc) over threadIdx.y for each threadIdx.x of a 2-D block, returned to every thread.

    Used where threads along x own different channels (NC layout) and threads along y split
    the rows: the sum runs across warps, so it is a shared-memory tree on GPU and simulator alike.
    """
    return _tree_sum3(sh, a, b, c, cuda.threadIdx.y, cuda.blockDim.y, cuda.threadIdx.x,
                      cuda.blockDim.x)


@cuda.jit(device=True)
def last_block_arrives(sh, tickets, slot, nblocks):
    """True, in every thread, for the last of ``nblocks`` blocks to call this on ``tickets[slot]``.

    Call after the block has written its partial results. Each thread fences its own writes, the
    block syncs, and one thread takes a ticket with ``atomic.inc(…, nblocks − 1)``, which wraps the
    counter back to 0 on the last arrival: the counters are ready for the next launch with no reset.
    The last block may then read every block's partials (through :func:`load_l2`).
    """
    cuda.threadfence()
    cuda.syncthreads()
    if cuda.threadIdx.x == 0 and cuda.threadIdx.y == 0:
        old = cuda.atomic.inc(tickets, slot, uint32(nblocks - 1))
        sh[0, 0] = 1.0 if old == nblocks - 1 else 0.0
    cuda.syncthreads()
    last = sh[0, 0] == 1.0
    cuda.syncthreads()  # everyone has read the flag before ``sh`` is reused
    return last


@cuda.jit(device=True)
def _load_l2_gpu(a, i):
    """``a[i]`` with ``ld.global.cg``: served by L2, so another SM's fenced writes are seen (an
    ordinary load may hit a stale L1 line holding a neighbouring channel's partials)."""
    return cuda.ldcg(a, i)


@cuda.jit(device=True)
def _load_plain(a, i):
    return a[i]


if SIMULATOR:
    block_sum3 = _block_sum3_tree
    load_l2 = _load_plain
else:
    block_sum3 = _block_sum3_shfl
    load_l2 = _load_l2_gpu
