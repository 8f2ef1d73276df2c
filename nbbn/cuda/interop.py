"""Foreign CUDA arrays (PyTorch, CuPy, anything with ``__cuda_array_interface__``): which device
a call runs on, which stream it launches on, how their memory is viewed, where outputs come from.

One call, one :class:`CallContext`, built from every device array of the call:

Device
    The arrays' own device: ``a.device.index`` (PyTorch), ``a.device.id`` (CuPy), the pointer's
    device ordinal from the driver for other producers; numba device arrays belong to the
    current context. Arrays on two devices are refused (ValueError). The call runs inside that
    device's context (``with cuda.gpus[d]``) only when it is not the current one, so a tensor on
    ``cuda:1`` is launched on device 1 and its pointer is valid there.

Stream (the caller's, never a host synchronisation)
    1. a v3 interface's ``stream`` (CuPy exports its current stream): launched on it as
       ``cuda.external_stream(ptr)`` (1 and 2 are the legacy and per-thread default streams);
       arrays carrying other streams are waited for on the device (an event recorded on
       theirs, waited on ours), not on the host: ``as_cuda_array(sync=True)`` would block the
       host once per input.
    2. no stream in the interface and a PyTorch producer (PyTorch exports v2, without one):
       ``torch.cuda.current_stream(device)``, the stream PyTorch's own kernels run on.
    3. numba device arrays: their own stream if they have one, else the default stream.
    Stream objects are cached per (context, pointer); scratch buffers per (thread, context,
    stream), so calls on different streams never share partials.

Memory
    Views are made with ``cuda.from_cuda_array_interface(desc, owner=a, sync=False)`` in the
    array's context; bfloat16 (``<V2``) is viewed as its uint16 bits, as the kernels read it.
    Outputs (when ``out=`` is not given) come from the producer's allocator when there is one
    (:data:`ALLOCATORS`: PyTorch's caching allocator through ``torch.empty`` on the launch
    stream's device, returned as tensors), else from numba (``cuda.device_array``). With a
    framework's caching allocator no memory is held outside it and nothing is freed behind its
    back (numba's deferred frees synchronise the device); ``out=`` reuses the caller's
    buffers and allocates nothing. Numba's external-memory-manager plugin was not chosen: it
    is process-global and must be installed before the first context exists, which a library
    cannot promise its users.

Under the CUDA simulator there are no streams or devices to switch to: the context records
what it would do (:attr:`CallContext.stream_ptr`, :attr:`CallContext.device`) and foreign
arrays are viewed from their pointer as host memory (the simulator's "device" memory is the
host's), which lets stand-ins of PyTorch and CuPy arrays run the real code path.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable

import numpy as np
from numba import cuda
from numba.cuda.cudadrv import devicearray

from .. import validate
from .reduce import SIMULATOR

#: Producer name (the top-level module of the array's type) → ``fn(shape, dtype, device,
#: like)`` returning a new C-contiguous array with ``__cuda_array_interface__`` of that
#: producer, allocated by its own allocator on ``device`` (an ordinal; None = current).
ALLOCATORS: dict[str, Callable] = {}


def _torch_empty(shape, dtype, device, like):
    import torch

    names = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16,
             "bfloat16": torch.bfloat16, "uint16": torch.uint16, "uint32": torch.int32}
    dev = like.device if device is None else torch.device("cuda", device)
    return torch.empty(shape, dtype=names[np.dtype(dtype).name], device=dev)


ALLOCATORS["torch"] = _torch_empty


def producer(a) -> str:
    """"numba" for numba device arrays, else the top-level module of the array's type
    ("torch", "cupy", ...)."""
    if devicearray.is_cuda_ndarray(a):
        return "numba"
    return type(a).__module__.partition(".")[0]


def device_of(a, cai) -> int | None:
    """The device ordinal ``a`` lives on; None when it is the current context's (numba arrays)
    or cannot be told."""
    if devicearray.is_cuda_ndarray(a):
        return None
    dev = getattr(a, "device", None)
    for attr in ("index", "id"):
        v = getattr(dev, attr, None)
        if isinstance(v, int):
            return v
    if isinstance(dev, int) and not isinstance(dev, bool):
        return dev
    if SIMULATOR or not cai or not cai["data"][0]:
        return None
    try:  # any other producer: ask the driver which device the pointer belongs to
        from numba.cuda.cudadrv import driver

        attr = driver.binding.CUpointer_attribute.CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL
        return int(driver.driver.cuPointerGetAttribute(attr, cai["data"][0]))
    except Exception:  # noqa: BLE001 - an unknown device is the current one
        return None


def _torch_stream(a) -> int | None:
    import torch

    return int(torch.cuda.current_stream(a.device).cuda_stream)


def stream_of(a, cai, prod: str):
    """The stream ``a``'s producer works on: a pointer (int), a numba Stream, or None (the
    default stream)."""
    if prod == "numba":
        s = getattr(a, "stream", 0)
        return s if s else None
    if cai is not None and cai.get("stream") is not None:
        return int(cai["stream"])
    if prod == "torch" and not SIMULATOR:
        return _torch_stream(a)
    return None


_STREAMS: dict[tuple, object] = {}
_TLS = threading.local()


def _external_stream(ptr: int):
    key = (id(cuda.current_context()), ptr)
    s = _STREAMS.get(key)
    if s is None:
        s = _STREAMS[key] = cuda.default_stream() if ptr == 0 else cuda.external_stream(ptr)
    return s


class CallContext:
    """Device, stream and allocator of one call (see the module doc). Use as a context manager
    around everything that touches device memory."""

    def __init__(self, arrays):
        self.device = None
        self.stream_ptr = None  # the launch stream as the producer named it (int), or None
        self.producer = None  # whose allocator makes the outputs (None: numba's)
        self.waits = []  # other streams (pointers) the launch stream must wait for
        self._numba_stream = None
        self._stack = None
        self.like = None
        devs = {}
        for name, a in arrays:
            if a is None or isinstance(a, np.ndarray):
                continue
            cai, _ = (None, False) if devicearray.is_cuda_ndarray(a) else \
                validate.cuda_interface(a)
            prod = producer(a)
            dev = device_of(a, cai)
            if dev is not None:
                devs.setdefault(dev, name)
            s = stream_of(a, cai, prod)
            if self.producer is None and prod in ALLOCATORS:
                self.producer, self.like = prod, a
            if s is None:
                continue
            if self.stream_ptr is None and self._numba_stream is None:
                if isinstance(s, int):
                    self.stream_ptr = s
                else:
                    self._numba_stream = s
            elif isinstance(s, int) and s != self.stream_ptr and s not in self.waits:
                self.waits.append(s)
        if len(devs) > 1:
            where = ", ".join(f"{n} on device {d}" for d, n in devs.items())
            raise ValueError(f"backend 'cuda': the arrays of one call must be on one device; "
                             f"got {where}")
        if devs:
            self.device = next(iter(devs))

    def __enter__(self):
        self._stack = contextlib.ExitStack()
        if self.device is not None and not SIMULATOR:
            current = cuda.get_current_device().id
            if current != self.device:
                self._stack.enter_context(cuda.gpus[self.device])
        return self

    def __exit__(self, *exc):
        self._stack.close()
        return False

    @property
    def stream(self):
        """The numba stream to launch on (0, the default stream, under the simulator)."""
        if self._numba_stream is not None:
            return self._numba_stream
        if SIMULATOR or self.stream_ptr is None:
            return 0
        s = _external_stream(self.stream_ptr)
        for other in self.waits:  # device-side waits: no host synchronisation
            ev = cuda.event(timing=False)
            ev.record(_external_stream(other))
            ev.wait(s)
        self.waits = []
        self._numba_stream = s
        return s

    @property
    def key(self):
        """Scratch-cache key of the launch stream."""
        if self._numba_stream is not None:
            return ("numba", id(self._numba_stream))
        return self.stream_ptr

    def empty(self, shape, dtype):
        """A new producer-allocated array (see :data:`ALLOCATORS`), or None to let numba
        allocate."""
        if self.producer is None:
            return None
        return ALLOCATORS[self.producer](tuple(shape), np.dtype(dtype), self.device, self.like)


def current() -> CallContext | None:
    """The context of the call running on this thread (tests read its decisions)."""
    return getattr(_TLS, "ctx", None)


@contextlib.contextmanager
def call(arrays):
    """``with call([("x", x), ...]) as ctx``: the call's :class:`CallContext`, entered."""
    ctx = CallContext(arrays)
    prev = current()
    _TLS.ctx = ctx
    try:
        with ctx:
            yield ctx
    finally:
        _TLS.ctx = prev


def _host_memory_view(cai, dtype):
    """Simulator only: the host memory a stand-in's interface points at, as an ndarray."""
    shape = tuple(int(s) for s in cai["shape"])
    strides = cai.get("strides")
    if strides is None:
        strides = validate._c_strides(shape, dtype.itemsize)
    nbytes = 0 if 0 in shape else sum((n - 1) * s for n, s in zip(shape, strides, strict=True)) \
        + dtype.itemsize
    buf = (ctypes.c_char * max(nbytes, 1)).from_address(cai["data"][0])
    base = np.frombuffer(buf, np.uint8, nbytes)
    return np.lib.stride_tricks.as_strided(base.view(dtype) if nbytes else base[:0].view(dtype),
                                           shape, strides)


def device_view(a, name: str, storage=None):
    """A numba device array over ``a``'s memory (no copy, no host synchronisation): ``a``
    itself for numba arrays; for others their interface (read through ``detach()`` for a
    tensor that requires grad), bfloat16 as uint16 bits. Call inside the call's context."""
    if devicearray.is_cuda_ndarray(a):
        return a
    cai, _ = validate.cuda_interface(a)
    if cai is None:
        raise TypeError(f"{name} must be a NumPy array or a CUDA array "
                        f"(__cuda_array_interface__), got {type(a).__name__}")
    dtype = validate._interface_dtype(a, cai["typestr"])
    if dtype.itemsize == 2 and dtype.kind not in "f":  # bfloat16: the kernels read the bits
        dtype = np.dtype(np.uint16)
    if SIMULATOR:
        from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

        return FakeCUDAArray(_host_memory_view(cai, dtype))
    desc = {k: v for k, v in cai.items() if k != "stream"}
    desc["typestr"] = dtype.str
    desc["version"] = max(2, int(desc.get("version", 2)))
    return cuda.from_cuda_array_interface(desc, owner=a, sync=False)
