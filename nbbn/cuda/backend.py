"""The ``"cuda"`` backend: array handling, the launch sequence of each op, the registry entries
(variants "v1" and "v2", see :mod:`nbbn.cuda.kernels`) and the Parts for cross-process statistics.

Arrays
    Host (NumPy) inputs are copied to the device in the kernels' memory order (one copy, made
    C-contiguous in ``geom.perm`` order), computed, and the outputs copied back into new NumPy
    arrays laid out like x (or into ``out=``); host running statistics are updated on a device
    copy and written back in place.

    Device inputs -- numba device arrays, or anything with ``__cuda_array_interface__`` (CuPy,
    PyTorch CUDA tensors) through ``cuda.as_cuda_array`` -- are never copied: x (and dy,
    residual, y) must be dense in x's memory order, i.e. C-contiguous in ``geom.perm`` order:
    a C-contiguous array, or a channels-last one such as a PyTorch ``channels_last`` tensor
    ((N, C, H, W) with C the smallest stride) or an (N, H, W, C) array. The kernels index that
    memory as one flat buffer. A device array dense in neither order (a strided slice, a
    transpose of the spatial axes) raises ValueError: a hidden device copy would double the
    traffic the caller asked for. Outputs are numba device arrays in the same memory layout as
    x: for a channels-last x with ``channel_axis=1`` a view with the user's axis order (N, C, H, W)
    and channels-last strides (built with the DeviceNDArray constructor -- numba's ``transpose``
    copies, and only 2-D arrays), or the caller's ``out=`` objects. Device running statistics
    are updated in place, strided ones included.

    Per-channel inputs: host vectors are uploaded as float64 (C values); device ones are read in
    their own dtype. Per-channel outputs (save_mean, save_invstd, dgamma, dbeta) are in x's
    dtype for float32/float64 x and float32 for float16/bfloat16 x
    (:func:`nbbn.validate.channel_dtype`, as PyTorch).

    bfloat16 (ml_dtypes' dtype): the kernels read and write its raw bits through a uint16 view
    (:func:`nbbn.cuda.kernels.ld`), so any GPU runs it. Host bfloat16 arrays work through the
    copy path. A bfloat16 CUDA array describes its dtype as ``<V2`` in
    ``__cuda_array_interface__`` (there is no bfloat16 typestr); :mod:`nbbn.validate` takes it as
    bfloat16 when the producer says so (a ``torch.bfloat16`` tensor).

Device, stream, allocation (:mod:`nbbn.cuda.interop`): every call runs on its arrays' device, on
the caller's stream (a v3 interface's stream, PyTorch's current stream), without host
synchronisation; outputs of PyTorch inputs are allocated by PyTorch's caching allocator and
returned as tensors. A tensor that requires grad is read through ``.detach()``.

Internal scratch (partials, coefficients, tickets) is cached per (thread, CUDA context, stream)
and reused, so steady-state calls allocate only their outputs (none with ``out=``).
"""

from __future__ import annotations

import threading

import numpy as np
from numba import cuda
from numba.cuda.cudadrv import devicearray

from .. import registry, validate
from ..fold import fold_delta, fold_precision
from ..spec import (
    BackwardArgs,
    Fusion,
    Geometry,
    InferArgs,
    Layout,
    Op,
    TrainArgs,
    inverse_perm,
)
from . import interop
from . import kernels as K
from .launch import DEFAULT_LAUNCH, LAYOUTS, LaunchConfig, LayoutKernels, Plan
from .reduce import SIMULATOR

#: Registry variants (see :mod:`nbbn.cuda.kernels`); the backend's default is "v1".
VARIANTS = ("v1", "v2")
#: Storage dtypes of x the kernels run (bfloat16 when ml_dtypes is installed).
DTYPES = validate.STORAGE_DTYPES

_F64 = np.dtype(np.float64)

# ---------------------------------------------------------------------------------------------
# Scratch buffers, cached per (thread, CUDA context)
# ---------------------------------------------------------------------------------------------

_TLS = threading.local()
_SCRATCH_LIMIT = 64


def _scratch(name: str, shape: tuple[int, ...], dtype) -> object:
    """A zero-initialised device array reused by later calls with the same (name, shape, dtype).

    Safe because every kernel of a call runs on one stream in launch order, buffers are kept
    per (thread, context, stream), and each host thread has its own. Ticket counters start at
    0 and the kernels leave them at 0.
    """
    call = interop.current()
    ctx = (cuda.current_context(), call.key if call is not None else None)
    store = getattr(_TLS, "store", None)
    if store is None or store[0] != ctx:
        store = _TLS.store = (ctx, {})
    bufs = store[1]
    key = (name, shape, np.dtype(dtype))
    buf = bufs.get(key)
    if buf is None:
        if len(bufs) >= _SCRATCH_LIMIT:
            bufs.clear()
        buf = bufs[key] = cuda.to_device(np.zeros(shape, dtype))
    return buf


def _dummy_vec():
    """Stands in for an absent optional per-channel vector (the kernel's flags say not to read
    it)."""
    return _scratch("dummy", (1,), _F64)


def _dummy_x(dtype):
    """Stands in for an absent x-shaped array (residual, y, dz) of x's dtype."""
    return _scratch("dummy_x", (1,), K.storage_dtype(dtype))


def _as_storage(d, dtype):
    """A device array of x's ``dtype`` as the kernels index it (bfloat16: its uint16 bits)."""
    sd = K.storage_dtype(dtype)
    return d if d.dtype == sd else d.view(sd)


# ---------------------------------------------------------------------------------------------
# Array conversion
# ---------------------------------------------------------------------------------------------


def _on_device(a) -> bool:
    return not isinstance(a, np.ndarray)


def _device_view(a, name: str):
    """A numba device array over a CUDA array's memory (no copy, no host synchronisation; see
    :func:`nbbn.cuda.interop.device_view`)."""
    return interop.device_view(a, name)


def _copy_to_host(d):
    """``d`` on the host, after the call's stream has finished writing it."""
    stream = _stream()
    host = d.copy_to_host(stream=stream)
    if stream:
        stream.synchronize()
    return host


def _stream():
    call = interop.current()
    return call.stream if call is not None else 0


def _to_device(host):
    return cuda.to_device(host, stream=_stream())


def _c_strides(shape, itemsize: int) -> tuple[int, ...]:
    out, step = [], itemsize
    for s in reversed(shape):
        out.append(step)
        step *= s
    return tuple(reversed(out))


def _flat_view(d, perm):
    """1-D view of a device array that is dense in axis order ``perm`` (checked by the caller):
    the memory-order buffer the kernels index, no copy."""
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        flat = d._ary.transpose(perm).reshape(-1)
        assert np.shares_memory(flat, d._ary) or d.size <= 1
        return FakeCUDAArray(flat)
    if d.is_c_contiguous():
        return d.reshape(d.size)
    # Dense in another axis order: the lowest address is element [0, ..., 0], where gpu_data
    # starts.
    return devicearray.DeviceNDArray((d.size,), (d.dtype.itemsize,), d.dtype, stream=d.stream,
                                     gpu_data=d.gpu_data)


def _user_view(flat, g: Geometry):
    """The flat memory-order result seen with the user's axes: shape ``g.shape``, strides of
    x's memory layout (a view; numba's own ``transpose`` would copy)."""
    if g.identity_perm:
        return flat.reshape(g.shape)
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(flat._ary.reshape(g.memory_shape).transpose(inverse_perm(g.perm)))
    mem = _c_strides(g.memory_shape, flat.dtype.itemsize)
    strides = [0] * g.ndim
    for i, ax in enumerate(g.perm):
        strides[ax] = mem[i]
    return devicearray.DeviceNDArray(g.shape, tuple(strides), flat.dtype, stream=flat.stream,
                                     gpu_data=flat.gpu_data)


def _layout_words(g: Geometry) -> str:
    if g.identity_perm:
        return "C-contiguous"
    return f"dense with axes {g.perm} in memory order (channels-last)"


def _x_like(a, name: str, g: Geometry):
    """x, dy, residual or y as the flat memory-order device buffer the kernels index: host
    arrays are copied in (in x's memory order), device arrays viewed (no copy)."""
    if not _on_device(a):
        if not g.identity_perm:
            a = a.transpose(g.perm)
        return _to_device(np.ascontiguousarray(a).reshape(-1).view(K.storage_dtype(g.dtype)))
    meta = validate.array_meta(a, name)
    if not validate.contiguous_in(meta, g.perm):
        if name == "x":
            why = ("its memory is dense neither channels-first nor channels-last "
                   f"(shape {meta.shape}, strides {meta.strides})")
        else:
            why = (f"its memory layout (strides {meta.strides}) differs from x's, which is "
                   f"{_layout_words(g)}")
        raise ValueError(
            f"{name} is a non-contiguous CUDA array for backend 'cuda': {why}. The kernels read "
            f"{name} as one dense buffer in x's memory order and do not copy device data behind "
            f"your back: pass a contiguous array (tensor.contiguous() or "
            f".contiguous(memory_format=torch.channels_last), cupy.ascontiguousarray(...))")
    return _as_storage(_flat_view(_device_view(a, name), g.perm), g.dtype)


def _vector(v, name: str):
    """A per-channel input on the device: host vectors are uploaded as float64, device ones are
    read in place in their own dtype. None stays None."""
    if v is None:
        return None
    if not _on_device(v):
        return _to_device(np.ascontiguousarray(v, dtype=np.float64))
    return _device_view(v, name)


def _host_vector(v, default: float, C: int) -> np.ndarray:
    """A per-channel input as a float64 host array (Parts work on host vectors)."""
    if v is None:
        return np.full(C, default)
    if _on_device(v):
        v = _copy_to_host(_device_view(v, "vector"))
    return np.asarray(v, dtype=np.float64)


def _dtype_of(v) -> np.dtype:
    return v.dtype if isinstance(v, np.ndarray) else validate.array_meta(v, "vector").dtype


class _RunningStat:
    """A running statistic updated in place: a device one directly, a host one through a
    float64 device copy written back (rounded to its dtype) by :meth:`write_back`."""

    def __init__(self, v, name: str):
        self.host = None if v is None or _on_device(v) else v
        self.dev = _vector(v, name)

    def write_back(self) -> None:
        if self.host is not None:
            stream = _stream()
            self.host[...] = self.dev.copy_to_host(stream=stream)
            if stream:
                stream.synchronize()


class _XOut:
    """An x-shaped output: the flat memory-order device buffer the kernels write, and what the
    caller gets back (laid out like x)."""

    def __init__(self, user, g: Geometry, on_device: bool):
        if user is None and on_device:  # the producer's allocator, if it has one (interop)
            user = _producer_empty(g.memory_shape, g.dtype, inverse_perm(g.perm))
        self.user, self.g, self.on_device = user, g, on_device
        if user is not None and on_device:  # validated (or made): dense in perm order
            self.dev = _as_storage(_flat_view(_device_view(user, "out"), g.perm), g.dtype)
        else:
            self.dev = cuda.device_array(g.numel, K.storage_dtype(g.dtype), stream=_stream())

    def result(self):
        g = self.g
        if self.on_device:
            if self.user is not None:
                return self.user
            dev = self.dev if self.dev.dtype == g.dtype else self.dev.view(g.dtype)
            return _user_view(dev, g)
        if self.user is None:
            buf = np.empty(g.memory_shape, g.dtype)
            user = buf if g.identity_perm else buf.transpose(inverse_perm(g.perm))
        else:
            user = self.user
            buf = user if g.identity_perm else user.transpose(g.perm)
        if buf.flags.c_contiguous:
            self.dev.copy_to_host(buf.reshape(-1).view(self.dev.dtype))
        else:  # dense but for the strides of size-1 axes
            buf[...] = self.dev.copy_to_host().view(g.dtype).reshape(buf.shape)
        return user


class _VecOut:
    """A per-channel output (C,) of a given dtype, on the device or copied back."""

    def __init__(self, user, C: int, dtype, on_device: bool):
        if user is None and on_device:
            user = _producer_empty((C,), dtype, None)
        self.user, self.on_device = user, on_device
        if user is not None and on_device:
            self.dev = _device_view(user, "out")
        else:
            self.dev = cuda.device_array(C, dtype, stream=_stream())
        self.C, self.dtype = C, np.dtype(dtype)

    def result(self):
        if self.on_device:
            return self.user if self.user is not None else self.dev
        host = self.user if self.user is not None else np.empty(self.C, self.dtype)
        self.dev.copy_to_host(host)
        return host


def _producer_empty(shape, dtype, axes):
    """A new array from the call's producer allocator (PyTorch's caching allocator for tensor
    inputs), seen with the user's axes (``axes``: the permutation, None for none), or None."""
    call = interop.current()
    new = call.empty(shape, dtype) if call is not None else None
    if new is None or axes is None or tuple(axes) == tuple(range(len(axes))):
        return new
    return new.permute(*axes) if hasattr(new, "permute") else new.transpose(axes)


def _flags(gamma=None, beta=None, running=None, residual=None, relu=False) -> int:
    return ((K.HAS_GAMMA if gamma is not None else 0) | (K.HAS_BETA if beta is not None else 0)
            | (K.HAS_RUNNING if running is not None else 0)
            | (K.HAS_RESIDUAL if residual is not None else 0) | (K.RELU if relu else 0))


def _or_dummy(v):
    return _dummy_vec() if v is None else v


def _setup(g: Geometry, cfg: LaunchConfig | None) -> tuple[LayoutKernels, Plan]:
    lk = LAYOUTS[g.layout]
    return lk, lk.plan(g, cfg or DEFAULT_LAUNCH)


# ---------------------------------------------------------------------------------------------
# Ops: launch sequences
# ---------------------------------------------------------------------------------------------

#: The array fields of the argument bundles, x first (it names the device and stream).
_ARRAY_FIELDS = ("x", "dy", "residual", "y", "gamma", "beta", "running_mean", "running_var",
                 "save_mean", "save_invstd")


def _in_call(fn):
    """Run ``fn(args, ...)`` inside the call context of its arrays (:mod:`.interop`): their
    device, the caller's stream, the producer's allocator."""
    import functools

    @functools.wraps(fn)
    def wrapper(args, *a, **kw):
        arrays = [(f, getattr(args, f, None)) for f in _ARRAY_FIELDS]
        out = getattr(args, "out", None)
        if out is not None:
            arrays += [("out", o) for o in (out if isinstance(out, tuple | list) else (out,))]
        with interop.call(arrays):
            return fn(args, *a, **kw)

    return wrapper



def _statistics(xd, g: Geometry, lk: LayoutKernels, plan: Plan, variant: str, eps, momentum,
                gamma, beta, rm, rv, save_mean, save_invstd):
    """Statistics stage of forward-train (v1: partials + merge; v2: ticket). Returns the
    (2, C) float64 scratch (μ, σ²_biased) and the (4, C) coefficients for the normalize pass."""
    st = _stream()
    part = _scratch("part", (3, plan.nparts, g.C), _F64)
    stats = _scratch("stats", (2, g.C), _F64)
    coef = _scratch("coef", (4, g.C), K.compute_dtype(g.dtype))
    tail = (eps, momentum, _or_dummy(gamma), _or_dummy(beta), _or_dummy(rm), _or_dummy(rv),
            _flags(gamma, beta, rm), save_mean, save_invstd, stats, coef)
    if variant == "v1":
        lk.stats_partial[plan.grid, plan.block, st](xd, *plan.dims, part)
        K.train_merge[plan.merge_grid, plan.merge_block, st](xd, plan.shift, part, *tail)
    else:
        tickets = _scratch("tickets", (plan.slots,), np.uint32)
        lk.stats_ticket[plan.grid, plan.block, st](xd, *plan.dims, part, tickets, *tail)
    return stats, coef


def _residual(args, g: Geometry):
    if args.residual is None:
        return _dummy_x(g.dtype)
    return _x_like(args.residual, "residual", g)


@_in_call
def train(args: TrainArgs, variant: str = "v1", cfg: LaunchConfig | None = None):
    """Forward-train: statistics stage, then y = max(((x − μ_hi) − μ_lo)·α + β + residual, 0)
    (residual and max with the fusion asked for) in one pass."""
    g = args.geom
    lk, plan = _setup(g, cfg)
    st = _stream()
    on_dev = _on_device(args.x)
    xd = _x_like(args.x, "x", g)
    res = _residual(args, g)
    out = args.out if args.out is not None else (None, None, None)
    cdt = validate.channel_dtype(g.dtype)
    y = _XOut(out[0], g, on_dev)
    save_mean = _VecOut(out[1], g.C, cdt, on_dev)
    save_invstd = _VecOut(out[2], g.C, cdt, on_dev)
    rm = _RunningStat(args.running_mean, "running_mean")
    rv = _RunningStat(args.running_var, "running_var")
    _, coef = _statistics(xd, g, lk, plan, variant, args.eps, args.momentum,
                          _vector(args.gamma, "gamma"), _vector(args.beta, "beta"), rm.dev, rv.dev,
                          save_mean.dev, save_invstd.dev)
    lk.normalize[plan.grid, plan.block, st](xd, *plan.dims, coef, res,
                                        _flags(residual=args.residual, relu=args.relu), y.dev)
    rm.write_back()
    rv.write_back()
    return y.result(), save_mean.result(), save_invstd.result()


def _fold_bits(save_mean, g: Geometry) -> float:
    """The kernels' fold argument: save_mean's precision in significand bits
    (:func:`nbbn.fold.fold_precision`, the one rule), as a float; −1 turns the fold off."""
    return float(fold_precision(_dtype_of(save_mean), g.dtype))


@_in_call
def backward(args: BackwardArgs, variant: str = "v1", cfg: LaunchConfig | None = None,
             fold: bool = True):
    """Backward: Σg, Σg·(x − save_mean), Σ(x − save_mean) per channel (v1 or v2; g = dy, or dz
    = dy·[y > 0] with relu, written by this pass), the fold, then the dx pass (reading dz in
    place of dy with relu). ``fold=False`` uses save_mean as given (the accuracy study's
    before/after)."""
    g = args.geom
    lk, plan = _setup(g, cfg)
    st = _stream()
    on_dev = _on_device(args.x)
    xd = _x_like(args.x, "x", g)
    dyd = _x_like(args.dy, "dy", g)
    relu = args.relu
    out = args.out if args.out is not None else (None,) * (4 if relu else 3)
    cdt = validate.channel_dtype(g.dtype)
    dx = _XOut(out[0], g, on_dev)
    dgamma = _VecOut(out[1], g.C, cdt, on_dev)
    dbeta = _VecOut(out[2], g.C, cdt, on_dev)
    if relu:
        yd = _x_like(args.y, "y", g)
        dz = _XOut(out[3], g, on_dev)
        dzd = dz.dev
    else:
        yd = dzd = _dummy_x(g.dtype)
    sm = _vector(args.save_mean, "save_mean")
    si = _vector(args.save_invstd, "save_invstd")
    gamma = _vector(args.gamma, "gamma")
    fold_tol = _fold_bits(args.save_mean, g) if fold else -1.0
    flags = _flags(gamma, relu=relu)
    part = _scratch("part", (3, plan.nparts, g.C), _F64)
    coef = _scratch("coef", (5, g.C), K.compute_dtype(g.dtype))
    sums = _scratch("sums", (3, g.C), _F64)
    tail = (sm, si, _or_dummy(gamma), flags, fold_tol, dgamma.dev, dbeta.dev, coef, sums)
    if variant == "v1":
        lk.bwd_partial[plan.grid, plan.block, st](dyd, yd, dzd, xd, *plan.dims, sm, flags, part)
        K.bwd_merge[plan.merge_grid, plan.merge_block, st](g.m, part, *tail)
    else:
        tickets = _scratch("tickets", (plan.slots,), np.uint32)
        lk.bwd_ticket[plan.grid, plan.block, st](dyd, yd, dzd, xd, *plan.dims, part, tickets, *tail)
    lk.bwd_dx[plan.grid, plan.block, st](dzd if relu else dyd, xd, *plan.dims, coef, dx.dev)
    outs = (dx.result(), dgamma.result(), dbeta.result())
    return outs + (dz.result(),) if relu else outs


@_in_call
def infer(args: InferArgs, variant: str = "v1", cfg: LaunchConfig | None = None):
    """Inference: fold (μ_hi, μ_lo, α, β) per channel, then one read of x (and of the residual)
    and one write of y per element. ``variant`` is accepted for uniformity: both run this."""
    g = args.geom
    lk, plan = _setup(g, cfg)
    st = _stream()
    xd = _x_like(args.x, "x", g)
    res = _residual(args, g)
    y = _XOut(args.out, g, _on_device(args.x))
    gamma = _vector(args.gamma, "gamma")
    beta = _vector(args.beta, "beta")
    coef = _scratch("coef", (4, g.C), K.compute_dtype(g.dtype))
    block = (cfg or DEFAULT_LAUNCH).block
    fold_block = min(block, 32 * -(-g.C // 32))
    K.infer_fold[-(-g.C // fold_block), fold_block, st](
        _vector(args.running_mean, "running_mean"), _vector(args.running_var, "running_var"),
        _or_dummy(gamma), _or_dummy(beta), _flags(gamma, beta), args.eps, coef)
    lk.normalize[plan.grid, plan.block, st](xd, *plan.dims, coef, res,
                                        _flags(residual=args.residual, relu=args.relu), y.dev)
    return (y.result(),)


def batch_stats(x, channel_axis=1, variant: str = "v1") -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ²_biased) per channel, float64 NumPy, by the forward-train statistics stage."""
    g = validate.geometry(x, channel_axis)
    lk, plan = _setup(g, None)
    with interop.call([("x", x)]):
        xd = _x_like(x, "x", g)
        save = cuda.device_array(g.C, validate.channel_dtype(g.dtype), stream=_stream())
        stats, _ = _statistics(xd, g, lk, plan, variant, 1e-5, 0.0, None, None, None, None,
                               save, save)
        s = _copy_to_host(stats)
    return s[0].copy(), s[1].copy()


# ---------------------------------------------------------------------------------------------
# Parts: forward and backward cut at their reductions (registry.Parts, nbbn.distributed).
# Per-channel arrays at the boundary are host float64 (C,) arrays; the per-channel arithmetic
# between the halves (C values) runs on the host in float64, the passes over the data on the GPU.
# ---------------------------------------------------------------------------------------------


def part_stats(args: TrainArgs):
    """(mean, M2 = σ²·m) of this x in float64, by the forward-train statistics code (v1)."""
    mean, var = batch_stats(args.x, args.geom.channel_axis)
    return mean, var * args.geom.m


def _split(v: np.ndarray, ct: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    hi = v.astype(ct)
    return hi, (v - hi.astype(np.float64)).astype(ct)


def _upload_new(host: np.ndarray):
    new = _producer_empty(host.shape, host.dtype, None)
    _device_view(new, "out").copy_to_device(host, stream=_stream())
    return new


def _upload_out(host: np.ndarray, user, dtype, on_device: bool):
    """A per-channel result computed on the host, delivered where the caller wants it."""
    host = host.astype(dtype)
    if on_device:
        if user is None:
            return _to_device(host) if interop.current() is None or \
                interop.current().producer is None else _upload_new(host)
        _device_view(user, "out").copy_to_device(host, stream=_stream())
        return user
    if user is None:
        return host
    user[...] = host
    return user


@_in_call
def part_normalize(args: TrainArgs, mean, var, m_total: int):
    """y = max(((x − μ_hi) − μ_lo)·α + β + residual, 0) with α = γ/√(var + ε) from given
    statistics (fusion as asked); running update with the unbiased var·m_total/(m_total − 1)."""
    g = args.geom
    lk, plan = _setup(g, None)
    st = _stream()
    on_dev = _on_device(args.x)
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + args.eps)
    ct = K.compute_dtype(g.dtype)
    hi, lo = _split(mean, ct)
    alpha = _host_vector(args.gamma, 1.0, g.C) * invstd
    beta = _host_vector(args.beta, 0.0, g.C)
    coef = _to_device(np.ascontiguousarray(np.stack([hi, lo, alpha.astype(ct),
                                                         beta.astype(ct)])))
    xd = _x_like(args.x, "x", g)
    out = args.out if args.out is not None else (None, None, None)
    y = _XOut(out[0], g, on_dev)
    lk.normalize[plan.grid, plan.block, st](xd, *plan.dims, coef, _residual(args, g),
                                        _flags(residual=args.residual, relu=args.relu), y.dev)
    cdt = validate.channel_dtype(g.dtype)
    save_mean = _upload_out(mean, out[1], cdt, on_dev)
    save_invstd = _upload_out(invstd, out[2], cdt, on_dev)
    if args.running_mean is not None:
        mo = args.momentum
        unbiased = var * (m_total / (m_total - 1.0))
        for v, batch in ((args.running_mean, mean), (args.running_var, unbiased)):
            new = (1.0 - mo) * _host_vector(v, 0.0, g.C) + mo * batch
            if _on_device(v):
                dv = _device_view(v, "running")
                dv[:] = new.astype(dv.dtype)  # numba's assignment kernel: strided views too
            else:
                v[...] = new
    return y.result(), save_mean, save_invstd


def _no_relu(args: BackwardArgs) -> None:
    if args.relu:
        raise NotImplementedError("backend 'cuda': the backward Parts (grad_sums/grad_apply) do "
                                  "not take relu; apply dz = dy·[y > 0] first and pass dz as dy")


@_in_call
def part_grad_sums(args: BackwardArgs):
    """(Σdy, Σdy·(x − save_mean)) of this x in float64 (v1 sums pass; save_mean as given: the
    fold is for a save_mean that is this x's own rounded mean, not a global one)."""
    _no_relu(args)
    g = args.geom
    lk, plan = _setup(g, None)
    st = _stream()
    xd = _x_like(args.x, "x", g)
    dyd = _x_like(args.dy, "dy", g)
    sm = _vector(args.save_mean, "save_mean")
    si = _vector(args.save_invstd, "save_invstd")
    cdt = validate.channel_dtype(g.dtype)
    part = _scratch("part", (3, plan.nparts, g.C), _F64)
    coef = _scratch("coef", (5, g.C), K.compute_dtype(g.dtype))
    sums = _scratch("sums", (3, g.C), _F64)
    scratch_out = _scratch("part_out", (2, g.C), cdt)
    dummy = _dummy_x(g.dtype)
    lk.bwd_partial[plan.grid, plan.block, st](dyd, dummy, dummy, xd, *plan.dims, sm, 0, part)
    K.bwd_merge[plan.merge_grid, plan.merge_block, st](g.m, part, sm, si, _dummy_vec(), 0,
                                                       -1.0, scratch_out[0], scratch_out[1],
                                                       coef, sums)
    s = _copy_to_host(sums)
    return s[0].copy(), s[1].copy(), s[2].copy()


@_in_call
def part_grad_apply(args: BackwardArgs, sum_dy, sum_dy_xmu, m_total: int, sum_xmu=None):
    """dx = k1·dy + k2·(x − save_mean) + k3 from given (global) sums: dβ = sum_dy,
    dγ = invstd·sum_dy_xmu, k1 = γ·invstd, k2 = −k1·invstd·dγ/m_total, k3 = −k1·dβ/m_total;
    with ``sum_xmu`` the rounded-mean fold (registry.Parts) moves μ to μ̃ + δ."""
    _no_relu(args)
    g = args.geom
    lk, plan = _setup(g, None)
    st = _stream()
    on_dev = _on_device(args.x)
    ct = K.compute_dtype(g.dtype)
    invstd = _host_vector(args.save_invstd, 1.0, g.C)
    sdy = np.asarray(sum_dy, dtype=np.float64)
    mean = _host_vector(args.save_mean, 0.0, g.C)
    delta = np.zeros(g.C)
    if sum_xmu is not None:
        delta = fold_delta(sum_xmu, m_total, _host_vector(args.save_mean, 0.0, g.C).astype(
            _dtype_of(args.save_mean)), g.dtype)
    dg = (np.asarray(sum_dy_xmu, dtype=np.float64) - delta * sdy) * invstd
    k1 = _host_vector(args.gamma, 1.0, g.C) * invstd
    k2 = -k1 * invstd * dg / m_total
    hi, lo = _split(mean, ct)
    coef = _to_device(np.ascontiguousarray(np.stack(
        [hi, lo, k1.astype(ct), k2.astype(ct), (-k1 * sdy / m_total - k2 * delta).astype(ct)])))
    xd = _x_like(args.x, "x", g)
    dyd = _x_like(args.dy, "dy", g)
    out = args.out if args.out is not None else (None, None, None)
    dx = _XOut(out[0], g, on_dev)
    lk.bwd_dx[plan.grid, plan.block, st](dyd, xd, *plan.dims, coef, dx.dev)
    cdt = validate.channel_dtype(g.dtype)
    return (dx.result(), _upload_out(dg, out[1], cdt, on_dev),
            _upload_out(sdy, out[2], cdt, on_dev))


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------

_DESCRIPTIONS = {
    (Op.FORWARD_TRAIN, "v1"): "float64 shifted sums per block + merge kernel, then one "
                              "(x − μ)·α + β (+ residual, ReLU) pass",
    (Op.FORWARD_TRAIN, "v2"): "float64 shifted sums per block merged by the last block (ticket, "
                              "one launch fewer), then one (x − μ)·α + β (+ residual, ReLU) pass",
    (Op.BACKWARD, "v1"): "float64 Σdy, Σdy·(x − μ), Σ(x − μ) per block + merge kernel "
                         "(save_mean fold), then the dx pass (ReLU: dz in the sums pass)",
    (Op.BACKWARD, "v2"): "as v1 with the last-block ticket merge (one launch fewer)",
    (Op.INFERENCE, "v1"): "per-channel fold, then (x − μ)·α + β (+ residual, ReLU): one read, "
                          "one write",
    (Op.INFERENCE, "v2"): "the v1 kernels (inference has no reduction to merge)",
}
_OPS = {Op.FORWARD_TRAIN: train, Op.BACKWARD: backward, Op.INFERENCE: infer}


def _bind(fn, variant: str):
    def run(args):
        return fn(args, variant)

    run.__name__ = f"{fn.__name__}_{variant}"
    return run


#: Fusions each op computes in its own passes (backward: the ReLU only; a residual's gradient is
#: dz itself).
FUSIONS = {
    Op.FORWARD_TRAIN: frozenset(Fusion),
    Op.INFERENCE: frozenset(Fusion),
    Op.BACKWARD: frozenset({Fusion.NONE, Fusion.RELU}),
}
for _op, _fn in _OPS.items():
    for _layout in Layout:
        for _v in VARIANTS:
            registry.register(registry.KernelSpec("cuda", _op, _layout, _bind(_fn, _v),
                                                  _DESCRIPTIONS[(_op, _v)], variant=_v,
                                                  dtypes=DTYPES, fusions=FUSIONS[_op]))
registry.register_stats("cuda", batch_stats)
registry.register_parts("cuda", registry.Parts(part_stats, part_normalize, part_grad_sums,
                                               part_grad_apply))
