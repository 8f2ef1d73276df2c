"""Argument checks shared by every backend: one place for every error message.

The checks read only shapes, dtypes, strides and flags, so they apply alike to NumPy arrays and
to device arrays (anything with ``__cuda_array_interface__``: numba device arrays, CuPy, PyTorch
CUDA tensors; the CUDA simulator's arrays too). Nothing here copies, converts or modifies an
array. They run on every call, so each array's metadata is read once and the common case (NumPy,
C-contiguous) takes the shortest path.

Dtype rules
-----------
* ``x`` (and ``dy``, ``residual``, ``y``) must be a floating storage dtype (float32, float64;
  float16 and bfloat16 where a backend supports them -- the registry says which, and the API
  raises TypeError naming the backends that do); ``dy``, ``residual`` and ``y`` must have x's.
* Per-channel vectors (``gamma``, ``beta``, ``running_mean``, ``running_var``, ``save_mean``,
  ``save_invstd``) are float32 or float64 independently of ``x``: they are read in their own
  precision, and running statistics are updated in place in their own dtype.
* Preallocated outputs must have exactly the dtype and shape the op returns and be writeable
  (per-channel outputs of a half x are float32: :func:`channel_dtype`);
  x-shaped outputs must have the memory layout the kernels use for x (see :mod:`nbbn.spec`),
  per-channel ones must be contiguous.

Overlap rule
------------
No array the call writes (its outputs; the running statistics, updated in place) may share
memory with another array of the call, except the exact aliases in :data:`SAFE_ALIASES` --
the very same elements, same start and same strides (``out=x``, ``dx`` over ``dy``), which the
kernels support because each element is read, by the thread that writes it, before it is
written, and is not read again. Anything else -- a partial overlap (``x = buf[:-1]``,
``out = buf[1:]``), an output over an input that is not a safe alias, two outputs in one
buffer -- raises ValueError naming both arguments (:func:`check_overlap`). It is refused rather
than computed into a temporary and copied: an overlap is almost always a bug (the caller's input
would be overwritten, which the API promises never to do), and a hidden temporary would double
the traffic and allocate on every call of a loop that passed ``out=`` to allocate nothing.
"""

from __future__ import annotations

import functools
import math
import numbers

import numpy as np

from .spec import (
    FLOAT_DTYPES,
    BackwardArgs,
    Geometry,
    InferArgs,
    Layout,
    TrainArgs,
    op_outputs,
)
from .spec import Op as _Op

_F16 = np.dtype(np.float16)


def _bfloat16():
    try:
        import ml_dtypes
    except ImportError:
        return None
    return np.dtype(ml_dtypes.bfloat16)


#: dtypes x may have; a backend's kernels declare which of them they run (KernelSpec.dtypes).
STORAGE_DTYPES = tuple(d for d in (*FLOAT_DTYPES, _F16, _bfloat16()) if d is not None)
HALF_DTYPES = tuple(d for d in STORAGE_DTYPES if d.itemsize == 2)
#: The storage dtypes by name ("float32", ..., "bfloat16"): what command lines and result rows
#: call them.
STORAGE_DTYPE_NAMES = {d.name: d for d in STORAGE_DTYPES}


def storage_dtype(dtype) -> np.dtype:
    """The storage dtype ``dtype`` names (a name such as "bfloat16", a dtype or a scalar type;
    importing this module registers ml_dtypes' names with NumPy); ValueError naming the
    choices for anything else."""
    try:
        dt = np.dtype(dtype) if dtype is not None else None
    except TypeError:
        dt = None
    if dt is None or dt not in STORAGE_DTYPES:  # (a dtype == None is float64's test)
        raise ValueError(f"unknown dtype {dtype!r}; choose from "
                         f"{', '.join(STORAGE_DTYPE_NAMES)}")
    return dt


@functools.cache
def channel_dtype(dtype) -> np.dtype:
    """dtype of the per-channel outputs (save_mean, save_invstd, dgamma, dbeta) for x of
    ``dtype``: x's own for float32/float64, float32 for a half x (as PyTorch returns). Cached:
    every cpu call asks (np.dtype costs ~0.2 µs a call)."""
    dtype = np.dtype(dtype)
    return np.dtype(np.float32) if dtype.itemsize == 2 else dtype


class _Meta:
    """Shape, dtype, strides (bytes) and flags of a host or device array. ``readonly_why``
    says why a device array may be read but not written (a tensor that requires grad)."""

    __slots__ = ("shape", "dtype", "strides", "writeable", "on_device", "readonly_why")

    def __init__(self, shape, dtype, strides, writeable, on_device, readonly_why=None):
        self.shape = shape
        self.dtype = dtype
        self.strides = strides
        self.writeable = writeable
        self.on_device = on_device
        self.readonly_why = readonly_why


def _c_strides(shape, itemsize):
    out, step = [], itemsize
    for s in reversed(shape):
        out.append(step)
        step *= s
    return tuple(reversed(out))


def array_meta(a, name: str) -> _Meta:
    """Metadata of a host or device array; TypeError for anything else."""
    if isinstance(a, np.ndarray):
        return _Meta(a.shape, a.dtype, a.strides, a.flags.writeable, False)
    return _device_meta(a, name)


#: What a tensor that requires grad may be used for (see :func:`cuda_interface`).
REQUIRES_GRAD_READONLY = (
    "it requires grad: nbbn reads such a tensor through .detach() (no copy; nbbn's ops are not "
    "recorded by autograd) but never writes into it")


def cuda_interface(a):
    """``(interface, detached)`` of a CUDA array: its ``__cuda_array_interface__`` dict, or None
    when it has none. A PyTorch tensor that requires grad raises RuntimeError from the
    interface; it is read through ``a.detach()`` -- the same memory, which is what an
    ``autograd.Function`` hands its ``forward`` -- and ``detached`` is True (outputs and
    running statistics must not be such tensors: :func:`_outputs` says so). Anything else that
    raises is a TypeError that names the original error."""
    try:
        return getattr(a, "__cuda_array_interface__", None), False
    except RuntimeError as exc:
        detach = getattr(a, "detach", None)
        if "requires grad" in str(exc) and callable(detach):
            return detach().__cuda_array_interface__, True
        raise TypeError(f"{type(a).__name__}.__cuda_array_interface__ raised: {exc}") from exc


def _interface_dtype(a, typestr) -> np.dtype:
    """The dtype of an interface's ``typestr``. bfloat16 has no typestr: PyTorch (and
    ml_dtypes) export it as a 2-byte void ``<V2``, taken as bfloat16 only when the producer
    says so (``a.dtype`` is torch.bfloat16 or ml_dtypes' bfloat16)."""
    dtype = np.dtype(typestr)
    if dtype.kind == "V" and dtype.itemsize == 2:
        bf16 = _bfloat16()
        own = getattr(a, "dtype", None)
        if bf16 is not None and (str(own) == "torch.bfloat16" or own == bf16):
            return bf16
    return dtype


def _device_meta(a, name: str) -> _Meta:
    cai, detached = cuda_interface(a)
    if cai is None:
        cai = _simulator_interface(a)
    if cai is not None:
        shape = tuple(int(s) for s in cai["shape"])
        dtype = _interface_dtype(a, cai["typestr"])
        strides = cai.get("strides")
        strides = _c_strides(shape, dtype.itemsize) if strides is None else tuple(strides)
        why = REQUIRES_GRAD_READONLY if detached else None
        return _Meta(shape, dtype, strides, not (bool(cai["data"][1]) or detached), True, why)
    raise TypeError(
        f"{name} must be a NumPy array or a CUDA array (__cuda_array_interface__), "
        f"got {type(a).__name__}"
    )


def _simulator_interface(a):
    """The CUDA simulator's device arrays wrap a NumPy array and carry no
    ``__cuda_array_interface__``; describe them as a real device array would be."""
    if type(a).__name__ != "FakeCUDAArray":
        return None
    host = a._ary
    return {"shape": host.shape, "typestr": host.dtype.str, "strides": host.strides,
            "data": (0, not host.flags.writeable)}


def contiguous_in(meta: _Meta, perm) -> bool:
    """True when the array's axes taken in the order ``perm`` are C-contiguous (size-1 axes,
    whose strides never matter, are ignored): a kernel can view it without a copy."""
    expected = meta.dtype.itemsize
    shape, strides = meta.shape, meta.strides
    for ax in reversed(perm):
        n = shape[ax]
        if n != 1:
            if strides[ax] != expected:
                return False
            expected *= n
    return True


def _check_storage(meta: _Meta, name: str) -> None:
    if meta.dtype not in STORAGE_DTYPES:
        names = ", ".join(str(d) for d in STORAGE_DTYPES)
        raise TypeError(f"{name} must be a floating dtype ({names}), got {meta.dtype}")


def _check_float(meta: _Meta, name: str) -> None:
    if meta.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {meta.dtype}")


def channel_axis_value(channel_axis, ndim: int) -> int:
    """1 (channels first) or ``ndim − 1`` (channels last) from 1, −1 or their ±ndim equivalents."""
    if isinstance(channel_axis, bool) or not isinstance(channel_axis, int | np.integer):
        raise TypeError(f"channel_axis must be an integer (1 or -1), got {channel_axis!r}")
    ax = int(channel_axis)
    if ax in (1, 1 - ndim):
        return 1
    if ax in (-1, ndim - 1):
        return ndim - 1
    raise ValueError(
        f"channel_axis must be 1 (channels first) or -1 (channels last) for a {ndim}-D x "
        f"(or their equivalents {1 - ndim} and {ndim - 1}), got {channel_axis!r}"
    )


def _geometry(meta: _Meta, channel_axis, name: str) -> Geometry:
    shape = meta.shape
    ndim = len(shape)
    if not 2 <= ndim <= 4:
        raise ValueError(
            f"{name} must be 2-D (N, C), 3-D (N, C, L) / (N, L, C) or 4-D (N, C, H, W) / "
            f"(N, H, W, C); got {ndim}-D shape {shape}"
        )
    ax = channel_axis_value(channel_axis, ndim)
    if 0 in shape:
        raise ValueError(f"{name} is empty (shape {shape}): batch norm needs N, C and H·W > 0")
    N, C = shape[0], shape[ax]
    if ndim == 2:
        return Geometry(Layout.NC, shape, ax, N, C, 1, meta.dtype, (0, 1), True)
    spatial = tuple(a for a in range(1, ndim) if a != ax)
    S = math.prod(shape[a] for a in spatial)
    first = (0, ax) + spatial  # memory order of channels-first
    last = (0,) + spatial + (ax,)  # memory order of channels-last
    if S == 1:  # (N, C, 1, 1) and (N, 1, 1, C) are the same memory as (N, C)
        layout, perm = Layout.NC, (first if ax == 1 else last)
    elif C == 1:  # one channel: both orders coincide; NCHW keeps the long runs
        layout, perm = Layout.NCHW, first
    else:
        options = ((Layout.NCHW, first), (Layout.NHWC, last))
        if ax != 1:
            options = options[::-1]
        # The layout the axes name, unless the memory says otherwise; a copy of a strided x
        # (made by the backend) takes the named one.
        layout, perm = options[0]
        if not contiguous_in(meta, perm) and contiguous_in(meta, options[1][1]):
            layout, perm = options[1]
    return Geometry(layout, shape, ax, N, C, S, meta.dtype, perm,
                    perm == tuple(range(ndim)))


def geometry(x, channel_axis=1, name: str = "x") -> Geometry:
    """Memory layout and sizes of ``x`` (see :mod:`nbbn.spec`)."""
    meta = array_meta(x, name)
    _check_storage(meta, name)
    return _geometry(meta, channel_axis, name)


def channel_vector(v, name: str, C: int, required: bool = False):
    """A per-channel vector of shape (C,), float32 or float64; None allowed unless required."""
    if v is None:
        if required:
            raise ValueError(f"{name} is required")
        return None
    if type(v) is np.ndarray and v.shape == (C,) and v.dtype.char in "fd":
        return v  # the common case: nothing more to check (writeable is asked by callers)
    meta = array_meta(v, name)
    if meta.dtype not in FLOAT_DTYPES:
        _check_float(meta, name)
    if meta.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match C = {C}, got {meta.shape}")
    return meta


def channel_vectors(C: int, vectors: tuple, names: tuple, required: int = 0) -> None:
    """:func:`channel_vector` of each of ``vectors`` (called ``names``; the first ``required``
    are required), the usual case -- every one a float32/float64 NumPy array of shape (C,) --
    tested in one loop (a function call per vector was a visible part of a small call)."""
    shape = (C,)
    for v in vectors:
        if type(v) is not np.ndarray or v.shape != shape or v.dtype.char not in "fd":
            break
    else:
        return
    for i, (v, name) in enumerate(zip(vectors, names, strict=True)):
        channel_vector(v, name, C, required=i < required)


def real_number(value, name: str) -> float:
    """The rule for the scalar arguments ``eps`` and ``momentum``, of the three functions and of
    :class:`nbbn.BatchNorm` alike: a real number (``numbers.Real``: int, float, NumPy integers
    and floats), never a bool (``eps=True`` is a slip, not 1.0) nor a string (``float("0.1")``
    would parse one): TypeError naming the argument."""
    if type(value) is float:  # the common case, first
        return value
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def eps_value(eps) -> float:
    e = real_number(eps, "eps")
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    return e


def momentum_value(momentum) -> float:
    mo = real_number(momentum, "momentum")
    if not 0.0 <= mo <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
    return mo


def _relu_value(relu) -> bool:
    if relu is False or relu is True:
        return relu
    if not isinstance(relu, bool | np.bool_):
        raise TypeError(f"relu must be True or False, got {relu!r}")
    return bool(relu)


def _like_x(a, name: str, g: Geometry, on_device: bool) -> None:
    """An input with x's shape, dtype and place (dy, residual, y). Its memory layout may differ
    from x's: the backend then makes one copy in x's layout."""
    if type(a) is np.ndarray and a.shape == g.shape and a.dtype is g.dtype and not on_device:
        return
    meta = array_meta(a, name)
    if meta.shape != g.shape:
        raise ValueError(f"{name} must have x's shape {g.shape}, got {meta.shape}")
    if meta.dtype != g.dtype:
        raise TypeError(f"{name} must have x's dtype {g.dtype}, got {meta.dtype}")
    if meta.on_device != on_device:
        raise TypeError(f"{name} must be a {'device' if on_device else 'host'} array like x")


def _layout_words(g: Geometry) -> str:
    if g.layout is Layout.NHWC:
        return "channels-last"
    if g.layout is Layout.NCHW:
        return "channels-first"
    return "C-contiguous"


_FULL = frozenset(("y", "dx", "dz"))


def _numpy_output_ok(o: np.ndarray, full: bool, g: Geometry) -> bool:
    """True when a NumPy output certainly passes :func:`_outputs`' checks: its shape, x's dtype
    (float32/float64: the per-channel outputs' too), writeable, and C-contiguous where that is
    the layout asked for (x-shaped outputs of an x whose axes are in memory order; per-channel
    ones). NumPy's contiguity flags ignore the strides of length-1 axes, as
    :func:`contiguous_in` does. False sends the output through the full checks, which say
    what is wrong."""
    if o.dtype is not g.dtype or g.dtype.itemsize == 2:
        return False
    if full:
        if o.shape != g.shape or not g.identity_perm:
            return False
    elif o.shape != (g.C,):
        return False
    f = o.flags
    return f.writeable and f.c_contiguous


def _outputs(out, names: tuple[str, ...], g: Geometry, on_device: bool):
    """Check preallocated outputs: a tuple of len(names) arrays (or one array for one output).
    x-shaped outputs must be laid out in memory as the kernels see x (``g.perm``)."""
    if out is None:
        return None
    single = len(names) == 1
    if isinstance(out, tuple | list):
        outs = tuple(out)
    elif single:
        outs = (out,)
    else:  # tuple() of one array would count its first axis
        got = "one array" if hasattr(out, "shape") else f"a {type(out).__name__}"
        raise ValueError(f"out must hold {len(names)} arrays {names} (a tuple or list), "
                         f"got {got}")
    if len(outs) != len(names):
        raise ValueError(f"out must hold {len(names)} arrays {names}, got {len(outs)}")
    for o, name in zip(outs, names, strict=True):
        full = name in _FULL
        if type(o) is np.ndarray and not on_device and _numpy_output_ok(o, full, g):
            continue  # the common case, decided from a few attributes
        label = f"out[{name}]"
        meta = array_meta(o, label)
        shape = g.shape if full else (g.C,)
        if meta.shape != shape:
            raise ValueError(f"{label} must have shape {shape}, got {meta.shape}")
        want = g.dtype if full else channel_dtype(g.dtype)
        if meta.dtype != want:
            raise TypeError(f"{label} must have dtype {want}, got {meta.dtype}")
        if not meta.writeable:
            why = f": {meta.readonly_why}" if meta.readonly_why else ""
            raise ValueError(f"{label} must be writeable{why}")
        if meta.on_device != on_device:
            raise TypeError(f"{label} must be a {'device' if on_device else 'host'} array like x")
        if full and not contiguous_in(meta, g.perm):
            axis = "last" if g.perm[-1] == g.channel_axis and g.layout is not Layout.NC else None
            raise ValueError(
                f"{label} must have the memory layout the kernels use for x "
                f"({_layout_words(g)}, axes {g.perm} in memory order"
                + (f", channel axis {g.channel_axis} {axis}" if axis else "")
                + f"); got strides {meta.strides}: allocate it like x, e.g. np.empty_like(x)")
        if not full and not contiguous_in(meta, (0,)):
            raise ValueError(f"{label} must be contiguous")
    return outs[0] if single else outs


#: (written, read) pairs that may be the very same memory (see "Overlap rule" above): y over x
#: or over the residual (forward-train and inference), dx over dy, and with a ReLU dz over dy
#: (backward). In every kernel, CPU and CUDA, the thread that writes element i of the first reads
#: element i of the second just before, and no pass reads it after.
SAFE_ALIASES = frozenset({("y", "x"), ("y", "residual"), ("dx", "dy"), ("dz", "dy")})
#: np.shares_memory's bound on the work of deciding an overlap that the arrays' bounds leave
#: open (an interleaved pair of 4-D views is decided in far fewer steps); undecided = refused.
OVERLAP_MAX_WORK = 1 << 16


class _Iface:
    """A NumPy view of a device array's addresses (never read): what np.shares_memory needs."""

    __slots__ = ("__array_interface__",)

    def __init__(self, cai):
        self.__array_interface__ = {"shape": tuple(cai["shape"]), "typestr": cai["typestr"],
                                    "strides": cai.get("strides"),
                                    "data": (int(cai["data"][0]), False), "version": 3}


def _addresses(a):
    """``a`` as a NumPy array over the same addresses: itself, the CUDA simulator's host
    array, or a never-read view of a device pointer (under CUDA's unified addressing a device
    pointer is unique in the process, so host and device arrays compare correctly)."""
    if isinstance(a, np.ndarray):
        return a
    if type(a).__name__ == "FakeCUDAArray":
        return a._ary
    return np.asarray(_Iface(a.__cuda_array_interface__))


def _same_elements(a: np.ndarray, b: np.ndarray) -> bool:
    """The same start, shape and strides (those of length-1 axes do not matter)."""
    if a.shape != b.shape or a.dtype.itemsize != b.dtype.itemsize or \
            a.__array_interface__["data"][0] != b.__array_interface__["data"][0]:
        return False
    return all(n == 1 or sa == sb for n, sa, sb in zip(a.shape, a.strides, b.strides,
                                                        strict=True))


def _label(name: str, outputs: tuple) -> str:
    return f"out[{name}]" if name in outputs else name


def _owner(a):
    """The ndarray that owns ``a``'s memory -- NumPy allocated it, so two different owners never
    overlap -- or None where the object alone cannot tell (device arrays; arrays over a foreign
    buffer: bytes, mmap, a tensor's memory)."""
    if not isinstance(a, np.ndarray):
        return None
    b = a.base
    while b is not None:
        if not isinstance(b, np.ndarray):
            return None
        a, b = b, b.base
    return a if a.flags.owndata else None


def check_overlap(written, read, outputs=()) -> None:
    """ValueError unless every array in ``written`` shares no memory with any other array of
    the call (``written`` before it, and ``read``), or is one of its :data:`SAFE_ALIASES`.
    ``written`` and ``read`` are (name, array or None) pairs; names in ``outputs`` are reported
    as ``out[name]``.

    Cost (this runs on every call with ``out=`` or running statistics): arrays of different
    NumPy owners are disjoint without a test -- the common case, a few attribute reads per
    array; the other pairs get a bounds test (np.may_share_memory), and only those whose bounds
    meet are decided exactly (np.shares_memory, at most OVERLAP_MAX_WORK steps)."""
    seen = set()
    count = 0
    for group in (written, read):
        for _, a in group:
            if a is None:
                continue
            count += 1
            if type(a) is np.ndarray and a.base is None and a.flags.owndata:
                seen.add(id(a))  # the common case: an array that owns its memory
            else:
                o = _owner(a)
                seen.add(id(a) if o is None else id(o))
                if o is None:
                    count = -1  # unknown owner: test every pair
    if len(seen) == count:
        return
    entries = [(n, a) for n, a in written if a is not None]
    nw = len(entries)
    entries += [(n, a) for n, a in read if a is not None]
    owners = [_owner(a) for _, a in entries]
    for i in range(nw):
        wname, w = entries[i]
        wo = owners[i]
        wv = None
        for j in (*range(i), *range(nw, len(entries))):
            ro = owners[j]
            if wo is not None and ro is not None and wo is not ro:
                continue
            rname, r = entries[j]
            if wv is None:
                wv = _addresses(w)
            rv = _addresses(r)
            if not np.may_share_memory(wv, rv):
                continue
            if _same_elements(wv, rv):
                if (wname, rname) in SAFE_ALIASES and rname not in outputs:
                    continue
                how = "is the same memory as"
            else:
                try:
                    if not np.shares_memory(wv, rv, max_work=OVERLAP_MAX_WORK):
                        continue
                    how = "overlaps"
                except np.exceptions.TooHardError:
                    how = "may overlap (undecided in bounded time)"
            safe = ", ".join(f"out[{o}] over {s}" for o, s in sorted(SAFE_ALIASES)
                             if o == wname)
            raise ValueError(
                f"{_label(wname, outputs)} {how} {_label(rname, outputs)}: an array the call "
                f"writes must not share memory with another argument"
                + (f" (allowed: {safe}, as the very same elements)" if safe else "")
                + "; pass a separate array")


_NC_PERM = (0, 1)
_TRAIN_OUT = ("y", "save_mean", "save_invstd")
#: Backward's output names without and with a ReLU (op_outputs, looked up once: its Enum
#: conversions cost a microsecond per call).
_BACKWARD_OUT = {False: op_outputs(_Op.BACKWARD, "none"), True: op_outputs(_Op.BACKWARD, "relu")}
_IDENTITY = {3: (0, 1, 2), 4: (0, 1, 2, 3)}


def _x(x, channel_axis):
    """(Geometry, on_device) of x. The common cases -- a float32/float64 NumPy array, 2-D or
    C-contiguous in the layout its channel axis names -- take a short path (this runs on every
    call); the rest are :func:`_geometry`'s, which agrees with it on these. The short path's
    geometry depends on (shape, dtype, channel_axis) alone, given that contiguity: it is
    cached by them (:data:`_SHORT`), which saves building it again on every call."""
    if type(x) is np.ndarray and type(channel_axis) is int:
        shape = x.shape
        key = (shape, x.dtype, channel_axis)
        g = _SHORT.get(key)
        if g is not None and (len(shape) == 2 or x.flags.c_contiguous):
            return g, False
        g = _short(x, shape, channel_axis)
        if g is not None:
            if len(_SHORT) >= _SHORT_MAX:
                _SHORT.clear()
            _SHORT[key] = g
            return g, False
    meta = array_meta(x, "x")
    _check_storage(meta, "x")
    return _geometry(meta, channel_axis, "x"), meta.on_device


#: Short-path geometries by (shape, dtype, channel_axis); cleared when it reaches _SHORT_MAX
#: (a program calls batch norm on few shapes).
_SHORT: dict[tuple, Geometry] = {}
_SHORT_MAX = 512


def _short(x: np.ndarray, shape: tuple, channel_axis: int) -> Geometry | None:
    """:func:`_x`'s short path: the geometry of a float32/float64 NumPy array that is 2-D, or
    3-D/4-D and C-contiguous in the layout its channel axis (1 or -1) names; None otherwise."""
    if x.dtype.char in "fd" and x.dtype.isnative and (channel_axis == 1 or channel_axis == -1) \
            and 0 not in shape:
        nd = len(shape)
        if nd == 2:
            return Geometry(Layout.NC, shape, 1, shape[0], shape[1], 1, x.dtype, _NC_PERM, True)
        if (nd == 3 or nd == 4) and x.flags.c_contiguous:  # laid out as its axes name
            if channel_axis == 1:
                C, S, layout, ax = shape[1], math.prod(shape[2:]), Layout.NCHW, 1
            else:
                C, S, layout, ax = shape[-1], math.prod(shape[1:-1]), Layout.NHWC, nd - 1
            if C > 1 and S > 1:
                return Geometry(layout, shape, ax, shape[0], C, S, x.dtype, _IDENTITY[nd], True)
    return None


def train_args(x, gamma, beta, eps, running_mean, running_var, momentum, out,
               channel_axis=1, relu=False, residual=None, *, min_m=2) -> TrainArgs:
    """``min_m=1`` admits one value per channel: a process's slice of a larger batch."""
    g, on_dev = _x(x, channel_axis)
    if g.m < min_m:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input shape {g.shape} "
            f"(m = {g.m})"
        )
    C = g.C
    channel_vectors(C, (gamma, beta), ("gamma", "beta"))
    if running_mean is not None or running_var is not None:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var must be given together")
        for v, name in ((running_mean, "running_mean"), (running_var, "running_var")):
            channel_vector(v, name, C)
            if type(v) is np.ndarray and v.flags.writeable:
                continue  # the common case
            meta = array_meta(v, name)
            if not meta.writeable:
                why = f" ({meta.readonly_why})" if meta.readonly_why else ""
                raise ValueError(f"{name} is updated in place and must be writeable{why}")
    relu = _relu_value(relu)
    if residual is not None:
        _like_x(residual, "residual", g, on_dev)
    outs = _outputs(out, ("y", "save_mean", "save_invstd"), g, on_dev)
    if outs is not None or running_mean is not None:
        o = (None, None, None) if outs is None else outs
        check_overlap((("y", o[0]), ("save_mean", o[1]), ("save_invstd", o[2]),
                       ("running_mean", running_mean), ("running_var", running_var)),
                      (("x", x), ("residual", residual), ("gamma", gamma), ("beta", beta)),
                      _TRAIN_OUT)
    return TrainArgs(g, x, gamma, beta, eps_value(eps), running_mean, running_var,
                     momentum_value(momentum), outs, relu, residual)


def backward_args(dy, x, save_mean, save_invstd, gamma, out, channel_axis=1, relu=False,
                  y=None) -> BackwardArgs:
    g, on_dev = _x(x, channel_axis)
    _like_x(dy, "dy", g, on_dev)
    C = g.C
    channel_vectors(C, (save_mean, save_invstd, gamma), ("save_mean", "save_invstd", "gamma"),
                    required=2)
    relu = _relu_value(relu)
    if relu:
        if y is None:
            raise ValueError("y (the forward's output) is required with relu=True: its sign is "
                             "the ReLU mask")
        _like_x(y, "y", g, on_dev)
    outs = None
    if out is not None:
        names = _BACKWARD_OUT[relu]
        outs = _outputs(out, names, g, on_dev)
        check_overlap(tuple(zip(names, outs, strict=True)),
                      (("dy", dy), ("x", x), ("y", y if relu else None), ("save_mean", save_mean),
                       ("save_invstd", save_invstd), ("gamma", gamma)), names)
    return BackwardArgs(g, dy, x, save_mean, save_invstd, gamma, outs, relu,
                        y if relu else None)


def infer_args(x, running_mean, running_var, gamma, beta, eps, out, channel_axis=1, relu=False,
               residual=None) -> InferArgs:
    g, on_dev = _x(x, channel_axis)
    C = g.C
    channel_vectors(C, (running_mean, running_var, gamma, beta),
                    ("running_mean", "running_var", "gamma", "beta"), required=2)
    relu = _relu_value(relu)
    if residual is not None:
        _like_x(residual, "residual", g, on_dev)
    outs = _outputs(out, ("y",), g, on_dev)
    if outs is not None:
        check_overlap((("y", outs),),
                      (("x", x), ("residual", residual), ("running_mean", running_mean),
                       ("running_var", running_var), ("gamma", gamma), ("beta", beta)), ("y",))
    return InferArgs(g, x, running_mean, running_var, gamma, beta, eps_value(eps), outs, relu,
                     residual)
