"""Grid math for the CUDA kernels: how many blocks of what shape, per layout. Pure Python; no
launches here. The thread-to-data mapping these plans feed is described in
:mod:`nbbn.cuda.kernels`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from numba import cuda

from ..spec import Geometry, Layout
from . import kernels as K
from .reduce import MAX_THREADS, SCRATCH_SHAPE, SIMULATOR

_MAX_GRID_Y = 65535
#: Blocks (partials) per channel or column group, at most: bounds the merge's reads, the
#: ticket increments per counter and the partials' memory whatever the shape (the grid-stride
#: loops give the extra work to the threads; one full wave needs far fewer).
MAX_PARTS = 1024


@dataclass(frozen=True)
class LaunchConfig:
    """Grid-shaping knobs (not the algorithm: that is the registry variant, v1 or v2)."""

    #: Threads per block: a multiple of 32, at most MAX_THREADS.
    block: int = 256
    #: NC kernels: threads along C per block (one warp-wide coalesced row segment).
    nc_width: int = 32
    #: Blocks to aim for per streaming kernel; 0 = one full wave (SMs × 2048 / threads per block).
    target_blocks: int = 0
    #: Split a channel no finer than this many values per thread.
    min_per_thread: int = 8

    def __post_init__(self):
        top = min(MAX_THREADS, K.LAUNCH_THREADS)  # the kernels' launch bounds
        if not (self.block % 32 == 0 and 32 <= self.block <= top):
            raise ValueError(f"block must be a multiple of 32 in [32, {top}], got {self.block}")
        if self.nc_width < 1 or self.nc_width & (self.nc_width - 1) or self.nc_width > self.block:
            raise ValueError(f"nc_width must be a power of two ≤ block, got {self.nc_width}")
        if self.min_per_thread < 1 or self.target_blocks < 0:
            raise ValueError("min_per_thread must be ≥ 1 and target_blocks ≥ 0")


#: The knobs every registered kernel launches with. Under the simulator every thread is a
#: Python thread: small blocks, and a few blocks per channel even on tiny inputs so that the
#: merges and tickets are exercised.
DEFAULT_LAUNCH = (LaunchConfig(block=32, target_blocks=8, min_per_thread=1) if SIMULATOR
                  else LaunchConfig())


@dataclass(frozen=True)
class SMLimits:
    """Per-SM resources that bound how many blocks are resident at once (CUDA C Programming
    Guide, "Compute capabilities" table; the same for cc 8.0 and 9.0 but for shared memory)."""

    regs: int = 65536
    threads: int = 2048
    blocks: int = 32
    #: Shared memory per SM usable by blocks, and the 1 KiB the driver reserves per block.
    smem: int = 228 * 1024
    smem_per_block_reserved: int = 1024
    #: Registers are allocated per warp in units of this many.
    reg_unit: int = 256


#: sm_90 (H100/H200); sm_80 differs only in shared memory (164 KiB), which never binds here.
SM90 = SMLimits()


def occupancy(regs: int, threads: int, smem: int = 0, sm: SMLimits = SM90) -> int:
    """Resident blocks per SM of a kernel using ``regs`` registers per thread, blocks of
    ``threads`` threads and ``smem`` bytes of static shared memory:

        min(⌊regs_SM / (warps·⌈32·regs/unit⌉·unit)⌋, ⌊threads_SM / threads⌋, blocks_SM,
            ⌊smem_SM / (smem + reserved)⌋)

    (register allocation is per warp, rounded up to the allocation unit). 0 if the block
    cannot launch at all (regs·threads beyond the SM)."""
    warps = _cdiv(threads, 32)
    per_warp = _cdiv(max(regs, 1) * 32, sm.reg_unit) * sm.reg_unit
    by_regs = (sm.regs // per_warp) // warps
    by_smem = sm.smem // (smem + sm.smem_per_block_reserved)
    return max(0, min(by_regs, sm.threads // threads, sm.blocks, by_smem))


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
    #: Distance between a channel's first value and the next channel's first value, x[c·shift]
    #: being channel c's first value (the statistics' shift K): S for NCHW, 1 for NC/NHWC.
    shift: int = 1

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


#: Bytes of static shared memory of the reduction kernels (their float64 scratch).
SCRATCH_BYTES = 8 * SCRATCH_SHAPE[0] * SCRATCH_SHAPE[1]


def resident_blocks(block: int) -> int:
    """Blocks of ``block`` threads one SM holds of every streaming kernel: the occupancy at
    the register bound the kernels are compiled under (:data:`nbbn.cuda.kernels.MAX_REGISTERS`,
    from their launch bounds; ptxas never exceeds it, ``ptxcheck --ptxas`` reports the actual
    counts) with the reduction kernels' shared scratch."""
    return max(1, occupancy(K.MAX_REGISTERS, block, SCRATCH_BYTES))


def _target_blocks(cfg: LaunchConfig) -> int:
    """One full wave: SMs × resident blocks per SM (not SMs × 2048/threads: at the registers
    the kernels use, fewer blocks fit, and a grid sized for 8 per SM runs in 1.3-2 waves)."""
    return cfg.target_blocks or _sm_count() * resident_blocks(cfg.block)


def plan_nchw(g: Geometry, cfg: LaunchConfig) -> Plan:
    """Grid (C, B) of 1-D blocks; dims (C, S, L) with L the kernels' run layout.

    Aim for ``target`` threads per channel (a full GPU), but no fewer than ``min_per_thread``
    values per thread. Row-strided runs (L ≥ 1) when there are enough rows: L = ⌊threads/S⌋
    rows per stride, between 1 and N (one slot per column at L = 1). Column-strided runs (L = 0)
    when there are fewer than ``min_per_thread`` rows and S exceeds the thread budget (batch-1
    inference on large images). Blocks shrink to the work when a channel has little (small S).
    """
    N, C, S, m = g.N, g.C, g.S, g.m
    threads = max(1, min(_cdiv(_target_blocks(cfg) * cfg.block, C), _cdiv(m, cfg.min_per_thread)))
    if N >= cfg.min_per_thread or S <= threads:
        L = max(1, min(N, threads // S))
        width = L * S  # slots
    else:
        L = 0
        width = threads
    T = min(cfg.block, 32 * _cdiv(width, 32))
    # No more blocks than the target asks for (L = 1 with S far above the budget would give
    # S/T blocks per channel: 16,384 for 8x3x2048x2048): threads then take several slots.
    B = max(1, min(_cdiv(width, T), _cdiv(threads, T), MAX_PARTS, _MAX_GRID_Y))
    return Plan((C, B), (T,), (C, S, L), *_merge_shape(C, B, cfg), shift=S)


def plan_nc(g: Geometry, cfg: LaunchConfig) -> Plan:
    """Grid (ceil(C/bx), G) of (bx, by) blocks over the (rows, C) view -- rows = N for NC,
    N·H·W for NHWC: bx channels side by side (bx < nc_width only when C is smaller), G row
    chunks so that the grid fills the GPU."""
    rows, C = g.kernel_shape
    bx = cfg.nc_width if C >= cfg.nc_width else _pow2_ceil(C)
    by = cfg.block // bx
    gx = _cdiv(C, bx)
    G = max(1, min(_cdiv(_target_blocks(cfg), gx), _cdiv(rows, by * cfg.min_per_thread),
                   MAX_PARTS, _MAX_GRID_Y))
    return Plan((gx, G), (bx, by), (C,), *_merge_shape(C, G, cfg), shift=1)


@dataclass(frozen=True)
class LayoutKernels:
    """The kernels and the planner of one memory layout."""

    plan: Callable[[Geometry, LaunchConfig], Plan]
    stats_partial: object  # v1
    stats_ticket: object  # v2
    normalize: object
    bwd_partial: object  # v1
    bwd_ticket: object  # v2
    bwd_dx: object


_NCHW = LayoutKernels(plan_nchw, K.nchw_stats_partial, K.nchw_stats_ticket, K.nchw_normalize,
                      K.nchw_bwd_partial, K.nchw_bwd_ticket, K.nchw_bwd_dx)
_NC = LayoutKernels(plan_nc, K.nc_stats_partial, K.nc_stats_ticket, K.nc_normalize,
                    K.nc_bwd_partial, K.nc_bwd_ticket, K.nc_bwd_dx)
#: NHWC is NC with N·H·W rows: the same kernels on the memory-order (N·S, C) buffer.
LAYOUTS = {Layout.NCHW: _NCHW, Layout.NC: _NC, Layout.NHWC: _NC}


def plan(g: Geometry, cfg: LaunchConfig | None = None) -> Plan:
    """The launch plan of ``g``'s layout."""
    return LAYOUTS[g.layout].plan(g, cfg or DEFAULT_LAUNCH)
