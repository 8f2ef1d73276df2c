"""The ``"cpu"`` backend: convert, allocate, choose the variant, call the kernels, register.

Arguments arrive validated (:mod:`nbbn.validate`). Here they become what the kernels index
(:mod:`nbbn.cpu.kernels`): C-contiguous views of x-shaped arrays in x's memory layout -- (M, C)
for NC and NHWC, (N, C, S) for NCHW -- made without a copy when the memory allows it (one copy
otherwise), float64 per-channel inputs, and outputs allocated in x's memory layout, so a
channels-last x gets a channels-last y.

Variants (registry key ``variant``; ``auto`` is the default):

* NC, NHWC: ``rows`` (K row chunks stream their rows, see the kernels), ``serial``.
* NCHW: ``grouped`` (a task per group of channels, one parallel region), ``split`` (a task per
  (channel, chunk of positions); for few channels), ``serial``.
* ``auto`` picks by shape alone -- never by the thread count, so a result does not change with
  the number of threads: ``serial`` up to ``SERIAL_MAX`` elements (a parallel region's wake-up
  costs more than such a call), ``split`` for NCHW with fewer than ``SPLIT_BELOW_C`` channels,
  else ``rows`` / ``grouped``.

Scratch (partial sums, coefficients) is cached per thread and reused, so a steady-state call
allocates only its outputs (none with ``out=``).
"""

from __future__ import annotations

import math
import threading

import numpy as np

from .. import registry
from ..spec import Fusion, Layout, Op, inverse_perm
from . import kernels as K

# ---------------------------------------------------------------------------------------------
# Shape-only tuning constants (see the module docstring; measured in results/cpu-kernels.md)
# ---------------------------------------------------------------------------------------------
#: Calls with at most this many elements run the serial kernels.
SERIAL_MAX = 1 << 15
#: NC: rows are widened to at least this many values (L = ⌈WIDE/C⌉ rows per wide row).
WIDE = 64
#: NC: bytes of x per row chunk (at least), and the most chunks (the partials' count).
CHUNK_BYTES = 64 * 1024
MAX_CHUNKS = 64
#: NCHW: a channel group's data (N·G·S values) fit in this many bytes, to be normalized from L2.
GROUP_BYTES = 256 * 1024
#: NCHW: at least this many channel groups (load balance), when there are channels enough.
MIN_GROUPS = 16
#: NCHW: fewer channels than this use the ``split`` variant.
SPLIT_BELOW_C = 16
#: NCHW split: chunks per channel so that C·K ≥ this, each of at least SPLIT_CHUNK values.
SPLIT_TASKS = 64
SPLIT_CHUNK = 4096
#: NCHW inference: bytes of x per task.
INFER_TASK_BYTES = 64 * 1024

_EMPTY = np.empty(0)
_LOCAL = threading.local()


def _scratch(n: int) -> np.ndarray:
    """A float64 buffer of at least n values, owned by this thread and reused across calls."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 2 * (0 if buf is None else buf.size)))
        _LOCAL.buf = buf
    return buf


def _carve(*shapes):
    """Disjoint float64 scratch arrays of the given shapes, from the thread's buffer."""
    sizes = [math.prod(s) for s in shapes]
    buf = _scratch(sum(sizes))
    out, o = [], 0
    for shape, n in zip(shapes, sizes, strict=True):
        out.append(buf[o:o + n].reshape(shape))
        o += n
    return out


# ---------------------------------------------------------------------------------------------
# Arrays in, arrays out
# ---------------------------------------------------------------------------------------------
def _host(a, name: str) -> np.ndarray:
    if type(a) is not np.ndarray and not isinstance(a, np.ndarray):
        raise TypeError(f"backend 'cpu' takes NumPy arrays; {name} is {type(a).__name__} "
                        "(use backend='cuda' for device arrays)")
    return a


def _kview(a, geom, name: str) -> np.ndarray:
    """The kernels' C-contiguous view of an x-shaped array: no copy when it is laid out as the
    kernels need (x's memory layout), one copy otherwise."""
    a = _host(a, name)
    if not geom.identity_perm:
        a = a.transpose(geom.perm)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(geom.kernel_shape)


def _alloc(geom, out):
    """(array returned to the caller, kernel view) of an x-shaped output in x's memory layout;
    ``out`` is a validated preallocated array or None."""
    if out is None:
        if geom.identity_perm:
            buf = np.empty(geom.shape, dtype=geom.dtype)
            return buf, buf.reshape(geom.kernel_shape)
        buf = np.empty(geom.memory_shape, dtype=geom.dtype)
        return buf.transpose(inverse_perm(geom.perm)), buf.reshape(geom.kernel_shape)
    buf = out if geom.identity_perm else out.transpose(geom.perm)
    view = buf.reshape(geom.kernel_shape)
    if not np.shares_memory(view, out):  # validation guarantees a view; never write a copy
        raise AssertionError("out= array could not be viewed without a copy")
    return out, view


def _f64(v, name: str) -> np.ndarray:
    """A per-channel vector as contiguous float64 (C values: the conversion is negligible)."""
    if v is None:
        return _EMPTY
    v = _host(v, name)
    if v.dtype == np.float64 and v.flags.c_contiguous:
        return v
    return np.ascontiguousarray(v, dtype=np.float64)


def _vectors(geom, out, names=("save_mean", "save_invstd")):
    """The two per-channel outputs (x's dtype), preallocated or new."""
    if out is None:
        return np.empty(geom.C, geom.dtype), np.empty(geom.C, geom.dtype)
    return out[1], out[2]


class _Running:
    """Running statistics updated in place by the kernel; a strided one goes through a
    contiguous copy that is written back."""

    def __init__(self, args, placeholder):
        rm, rv = args.running_mean, args.running_var
        self.given = rm is not None
        if not self.given:
            self.rm = self.rv = placeholder
            return
        self.user = (_host(rm, "running_mean"), _host(rv, "running_var"))
        self.rm = rm if rm.flags.c_contiguous else np.ascontiguousarray(rm)
        self.rv = rv if rv.flags.c_contiguous else np.ascontiguousarray(rv)

    def write_back(self):
        if self.given:
            for dst, src in zip(self.user, (self.rm, self.rv), strict=True):
                if dst is not src:
                    dst[...] = src


def _flags(args) -> int:
    f = 0
    if args.gamma is not None:
        f |= K.HAS_GAMMA
    if getattr(args, "beta", None) is not None:
        f |= K.HAS_BETA
    if args.relu:
        f |= K.RELU
    if getattr(args, "residual", None) is not None:
        f |= K.RESIDUAL
    return f


def _precision(dtype) -> int:
    """Significand bits of a float dtype (24 for float32, 53 for float64)."""
    return int(np.finfo(dtype).nmant) + 1


# ---------------------------------------------------------------------------------------------
# Shape-only choices
# ---------------------------------------------------------------------------------------------
def nc_plan(M: int, C: int, itemsize: int) -> tuple[int, int]:
    """(K row chunks, L rows per wide row) of an (M, C) array."""
    L = -(-WIDE // C) if C < WIDE else 1
    K_ = max(1, min(MAX_CHUNKS, M // L if M >= L else 1, (M * C * itemsize) // CHUNK_BYTES))
    return K_, L


def nchw_group(N: int, C: int, S: int, itemsize: int) -> int:
    """Channels per group: the group's data fit in GROUP_BYTES, and there are ≥ MIN_GROUPS
    groups when C allows."""
    fit = max(1, GROUP_BYTES // max(1, N * S * itemsize))
    return max(1, min(fit, C // MIN_GROUPS if C >= MIN_GROUPS else 1))


def nchw_split_chunks(N: int, C: int, S: int) -> int:
    m = N * S
    return max(1, min(-(-SPLIT_TASKS // C), m // SPLIT_CHUNK if m >= SPLIT_CHUNK else 1))


def _twin(pair, numel: int, variant: str):
    """The parallel or the serial dispatcher of a kernel pair."""
    if variant == "serial" or (variant == "auto" and numel <= SERIAL_MAX):
        return pair[1]
    return pair[0]


def _nchw_algorithm(geom, variant: str) -> str:
    if variant in ("grouped", "split"):
        return variant
    return "split" if geom.C < SPLIT_BELOW_C else "grouped"


# ---------------------------------------------------------------------------------------------
# The three ops
# ---------------------------------------------------------------------------------------------
def _forward(args, variant: str, *, stats_only=False, out_y=True):
    """Run forward-train; returns (y_user, save_mean, save_invstd, mean64, var64)."""
    geom = args.geom
    x = _kview(args.x, geom, "x")
    flags = _flags(args)
    if stats_only:  # y is never written: an untouched allocation keeps the kernel's types
        flags = (flags | K.STATS_ONLY) & ~(K.RELU | K.RESIDUAL)
        y_user, y = None, np.empty(x.shape, x.dtype)
        save_mean = save_invstd = np.empty(geom.C, geom.dtype)
    else:
        y_user, y = _alloc(geom, None if args.out is None else args.out[0])
        save_mean, save_invstd = _vectors(geom, args.out)
    res = y
    if flags & K.RESIDUAL:
        res = _kview(args.residual, geom, "residual")
    running = _Running(args, save_mean)
    if running.given and not stats_only:
        flags |= K.HAS_RUNNING
    gamma = _f64(args.gamma, "gamma")
    beta = _f64(args.beta, "beta")
    mean64 = np.empty(geom.C)
    var64 = np.empty(geom.C)
    numel = x.size
    if x.ndim == 2:
        M, C = x.shape
        K_, L = nc_plan(M, C, x.itemsize)
        part, coef = _carve((K_, 2, L * C), (4, L * C))
        _twin(K.NC_FORWARD, numel, variant)(
            x, y, res, gamma, beta, running.rm, running.rv, save_mean, save_invstd, mean64,
            var64, flags, args.eps, args.momentum, K_, L, part, coef)
    else:
        N, C, S = x.shape
        if _nchw_algorithm(geom, variant) == "split":
            K_ = nchw_split_chunks(N, C, S)
            part, coef = _carve((C, K_, 2), (3, C))
            _twin(K.NCHW_FORWARD_SPLIT, numel, variant)(
                x, y, res, gamma, beta, running.rm, running.rv, save_mean, save_invstd, mean64,
                var64, flags, args.eps, args.momentum, K_, part, coef)
        else:
            _twin(K.NCHW_FORWARD_GROUPED, numel, variant)(
                x, y, res, gamma, beta, running.rm, running.rv, save_mean, save_invstd, mean64,
                var64, flags, args.eps, args.momentum, nchw_group(N, C, S, x.itemsize))
    if not stats_only:
        running.write_back()
    return y_user, save_mean, save_invstd, mean64, var64


def forward_train(args, variant: str = "auto"):
    y, save_mean, save_invstd, _, _ = _forward(args, variant)
    return y, save_mean, save_invstd


def _apply(args, variant: str, coef_given=None):
    """y = (x − c0)·c1 + c2 (+ residual, ReLU): inference with the population statistics, or
    with ``coef_given`` (3, C) float64."""
    geom = args.geom
    x = _kview(args.x, geom, "x")
    flags = _flags(args)
    y_user, y = _alloc(geom, args.out if not isinstance(args.out, tuple) else args.out[0])
    res = _kview(args.residual, geom, "residual") if flags & K.RESIDUAL else y
    numel = x.size
    if coef_given is not None:
        flags |= K.COEF_GIVEN
        rm = rv = gamma = beta = _EMPTY
    else:
        rm = _host(args.running_mean, "running_mean")
        rv = _host(args.running_var, "running_var")
        gamma = _f64(args.gamma, "gamma")
        beta = _f64(args.beta, "beta")
    if x.ndim == 2:
        M, C = x.shape
        K_, L = nc_plan(M, C, x.itemsize)
        (coef,) = _carve((3, L * C))
        if coef_given is not None:
            coef[:, :C] = coef_given
        _twin(K.NC_INFER, numel, variant)(x, y, res, rm, rv, gamma, beta, coef, flags, args.eps,
                                          K_, L)
    else:
        N, C, S = x.shape
        (coef,) = _carve((3, C))
        if coef_given is not None:
            coef[...] = coef_given
        R = max(1, INFER_TASK_BYTES // (S * x.itemsize))
        _twin(K.NCHW_INFER, numel, variant)(x, y, res, rm, rv, gamma, beta, coef, flags,
                                            args.eps, R)
    return y_user


def inference(args, variant: str = "auto"):
    return (_apply(args, variant),)


def _backward(args, variant: str, *, sums=None, sums_only=False, m_total=None, fold=True):
    """Run backward; returns (dx_user, dgamma, dbeta, dz_user or None, sums (3, C))."""
    geom = args.geom
    x = _kview(args.x, geom, "x")
    dy = _kview(args.dy, geom, "dy")
    flags = _flags(args)
    relu = bool(flags & K.RELU)
    yv = _kview(args.y, geom, "y") if relu else x
    out = args.out
    if sums_only:  # dx is never written (untouched allocation, see _forward)
        dx_user, dx = None, np.empty(x.shape, x.dtype)
    else:
        dx_user, dx = _alloc(geom, None if out is None else out[0])
    dz_user, dz = (None, dx)
    if relu:
        dz_user, dz = _alloc(geom, None if out is None else out[3])
    if out is None:
        dgamma, dbeta = np.empty(geom.C, geom.dtype), np.empty(geom.C, geom.dtype)
    else:
        dgamma, dbeta = out[1], out[2]
    sm_user = _host(args.save_mean, "save_mean")
    save_mean = _f64(sm_user, "save_mean")
    save_invstd = _f64(args.save_invstd, "save_invstd")
    gamma = _f64(args.gamma, "gamma")
    if sums is None:
        sums = np.empty((3, geom.C))
    else:
        flags |= K.COEF_GIVEN
    if sums_only:
        flags |= K.SUMS_ONLY
    if fold:
        flags |= K.FOLD
    m = float(geom.m if m_total is None else m_total)
    prec = _precision(sm_user.dtype)
    numel = x.size
    if x.ndim == 2:
        M, C = x.shape
        K_, L = nc_plan(M, C, x.itemsize)
        part, coef = _carve((K_, 3, L * C), (4, L * C))
        _twin(K.NC_BACKWARD, numel, variant)(
            dy, x, yv, dx, dz, save_mean, save_invstd, gamma, dgamma, dbeta, sums, flags, m, prec,
            K_, L, part, coef)
    else:
        N, C, S = x.shape
        if _nchw_algorithm(geom, variant) == "split":
            K_ = nchw_split_chunks(N, C, S)
            part, coef = _carve((C, K_, 3), (3, C))
            _twin(K.NCHW_BACKWARD_SPLIT, numel, variant)(
                dy, x, yv, dx, dz, save_mean, save_invstd, gamma, dgamma, dbeta, sums, flags, m,
                prec, K_, part, coef)
        else:
            _twin(K.NCHW_BACKWARD_GROUPED, numel, variant)(
                dy, x, yv, dx, dz, save_mean, save_invstd, gamma, dgamma, dbeta, sums, flags, m,
                prec, nchw_group(N, C, S, x.itemsize))
    return dx_user, dgamma, dbeta, dz_user, sums


def backward(args, variant: str = "auto"):
    dx, dgamma, dbeta, dz, _ = _backward(args, variant)
    return (dx, dgamma, dbeta, dz) if args.relu else (dx, dgamma, dbeta)


# ---------------------------------------------------------------------------------------------
# Statistics and parts (nbbn.distributed, the accuracy study)
# ---------------------------------------------------------------------------------------------
def batch_stats(x, channel_axis=1) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ²_biased) per channel in float64, by the forward kernel's own statistics code."""
    from ..validate import train_args

    args = train_args(x, None, None, 1e-5, None, None, 0.0, None, channel_axis, min_m=1)
    _, _, _, mean, var = _forward(args, "auto", stats_only=True)
    return mean, var


def part_stats(args):
    _, _, _, mean, var = _forward(args, "auto", stats_only=True)
    return mean, var * args.geom.m


def part_normalize(args, mean, var, m_total):
    """The forward's normalization with given (global) statistics; running update with the
    unbiased var·m_total/(m_total − 1)."""
    geom = args.geom
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + args.eps)
    gamma = 1.0 if args.gamma is None else np.asarray(args.gamma, dtype=np.float64)
    beta = 0.0 if args.beta is None else np.asarray(args.beta, dtype=np.float64)
    coef = np.empty((3, geom.C))
    coef[0] = mean
    coef[1] = gamma * invstd
    coef[2] = beta
    y = _apply(args, "auto", coef_given=coef)
    save_mean, save_invstd = _vectors(geom, args.out)
    save_mean[...] = mean
    save_invstd[...] = invstd
    if args.running_mean is not None:
        mo = args.momentum
        rm, rv = args.running_mean, args.running_var
        rm[...] = (1.0 - mo) * rm.astype(np.float64) + mo * mean
        rv[...] = (1.0 - mo) * rv.astype(np.float64) + mo * var * (m_total / (m_total - 1.0))
    return y, save_mean, save_invstd


def part_grad_sums(args):
    *_, sums = _backward(args, "auto", sums_only=True, fold=False)
    return sums[0].copy(), sums[1].copy(), sums[2].copy()


def part_grad_apply(args, sum_dy, sum_dy_xmu, m_total, sum_xmu=None):
    sums = np.zeros((3, args.geom.C))
    sums[0] = sum_dy
    sums[1] = sum_dy_xmu
    if sum_xmu is not None:
        sums[2] = sum_xmu
    dx, dgamma, dbeta, _, _ = _backward(args, "auto", sums=sums, m_total=m_total,
                                        fold=sum_xmu is not None)
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
_DESCRIPTIONS = {
    Op.FORWARD_TRAIN: "float64 shifted-sum statistics in fixed chunks, then y = (x − μ)·α + β",
    Op.BACKWARD: "float64 sums of g, g·(x − μ̃), x − μ̃ (rounded-mean fold), then dx",
    Op.INFERENCE: "folded y = α·x + β' in float64",
}
_FUNCTIONS = {Op.FORWARD_TRAIN: forward_train, Op.BACKWARD: backward, Op.INFERENCE: inference}
_VARIANTS = {
    Layout.NC: {"auto": "shape picks serial or rows", "rows": "K row chunks, 2 regions",
                "serial": "one thread, no parallel region"},
    Layout.NHWC: {"auto": "shape picks serial or rows", "rows": "K row chunks, 2 regions",
                  "serial": "one thread, no parallel region"},
    Layout.NCHW: {"auto": "shape picks serial, split or grouped",
                  "grouped": "a task per channel group, 1 region",
                  "split": "tasks (channel, chunk of positions), 2 regions",
                  "serial": "one thread, no parallel region"},
}


def _bind(fn, variant):
    if variant == "auto":
        return fn
    return lambda args: fn(args, variant)


for _op, _fn in _FUNCTIONS.items():
    for _layout, _names in _VARIANTS.items():
        for _variant, _how in _names.items():
            registry.register(registry.KernelSpec(
                "cpu", _op, _layout, _bind(_fn, _variant), f"{_DESCRIPTIONS[_op]} ({_how})",
                variant=_variant,
                fusions=(Fusion.NONE, Fusion.RELU) if _op is Op.BACKWARD else tuple(Fusion)))
registry.register_stats("cpu", batch_stats)
registry.register_parts("cpu", registry.Parts(part_stats, part_normalize, part_grad_sums,
                                              part_grad_apply))
