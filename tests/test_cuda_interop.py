"""Foreign CUDA arrays with stand-ins (no PyTorch GPU needed): objects whose
``__cuda_array_interface__`` behaves like PyTorch's (raises for a tensor that requires grad,
exports bfloat16 as ``<V2``, v2 without a stream) or CuPy's (v3 with a stream), on a given
device. Under the simulator their pointer is host memory (the simulator's device memory), so
the backend runs its real path over them (:mod:`nbbn.cuda.interop`); what only a GPU can show
(the launch stream, the device switch) is checked as the decision the call context records,
and by the ``gpu`` tests at the end with PyTorch.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import pytest

import nbbn
from nbbn import reference as ref
from nbbn import registry, validate
from nbbn.spec import Op

from .helpers import assert_close, make_x

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
cudasim_only = pytest.mark.skipif(
    not SIMULATOR, reason="stand-ins point at host memory: only the simulator can read it")

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

_GRAD_MSG = ("Can't get __cuda_array_interface__ on Variable that requires grad. If gradients "
             "aren't required, use var.detach() to get Variable that doesn't require grad.")


class _TorchDtype:
    def __init__(self, name):
        self.name = name

    def __str__(self):
        return f"torch.{self.name}"


class StandIn:
    """A CUDA-array stand-in over a host array's memory. ``requires_grad`` makes the interface
    raise as PyTorch's does; ``stream`` (an int) makes it a v3 interface carrying that stream;
    ``device`` is the ordinal its ``.device.index`` reports; ``torch_dtype`` names a
    ``torch.<name>`` dtype (bfloat16 exports ``<V2``)."""

    def __init__(self, host, requires_grad=False, stream=None, device=0, torch_dtype=None):
        self.host = host
        self.requires_grad = requires_grad
        self.stream = stream
        self.device = SimpleNamespace(type="cuda", index=device)
        self.dtype = _TorchDtype(torch_dtype) if torch_dtype else host.dtype
        self.shape = host.shape

    @property
    def __cuda_array_interface__(self):
        if self.requires_grad:
            raise RuntimeError(_GRAD_MSG)
        h = self.host
        typestr = "<V2" if str(self.dtype) == "torch.bfloat16" else h.dtype.str
        cai = {"shape": h.shape, "typestr": typestr, "data": (h.ctypes.data, False),
               "strides": None if h.flags.c_contiguous else h.strides, "version": 2}
        if self.stream is not None:
            cai.update(version=3, stream=self.stream)
        return cai

    def detach(self):
        return StandIn(self.host, False, self.stream, self.device.index,
                       str(self.dtype)[6:] if str(self.dtype).startswith("torch.") else None)

    def permute(self, *axes):
        return StandIn(self.host.transpose(axes), self.requires_grad, self.stream,
                       self.device.index)


@pytest.fixture(scope="module")
def B():
    reason = registry.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend 'cuda' is unavailable here: {reason}")
    from nbbn.cuda import backend

    return backend


@pytest.fixture
def interop(B):
    from nbbn.cuda import interop

    return interop


def _host(a):
    if isinstance(a, StandIn):
        return a.host
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


# ---------------------------------------------------------------------------------------------
# Tensors that require grad
# ---------------------------------------------------------------------------------------------


def test_requires_grad_interface_is_read_through_detach():
    x = make_x((5, 3), np.float32, 2.0)
    meta = validate.array_meta(StandIn(x, requires_grad=True), "x")
    assert meta.on_device and meta.dtype == np.float32 and meta.shape == (5, 3)
    assert not meta.writeable and "requires grad" in meta.readonly_why


def test_other_interface_errors_are_a_type_error():
    class Broken:
        @property
        def __cuda_array_interface__(self):
            raise RuntimeError("device lost")

    with pytest.raises(TypeError, match="__cuda_array_interface__ raised: device lost"):
        validate.array_meta(Broken(), "x")


@cudasim_only
def test_requires_grad_inputs_compute_like_detached(B):
    """x and γ that require grad (an activation, a Parameter): same results as the reference,
    read in place; an output or running statistic that requires grad is refused."""
    x = make_x((9, 4), np.float32, 1e3)
    gamma = np.linspace(0.5, 2, 4).astype(np.float32)
    y, sm, si = nbbn.batch_norm_train(StandIn(x, requires_grad=True),
                                      StandIn(gamma, requires_grad=True), backend="cuda")
    ry, rmean, rinvstd, _ = ref.forward_train(x, gamma)
    assert_close(Op.FORWARD_TRAIN, (_host(y), _host(sm), _host(si)), (ry, rmean, rinvstd),
                 np.float32)
    out = (StandIn(np.empty_like(x), requires_grad=True), StandIn(np.empty(4, np.float32)),
           StandIn(np.empty(4, np.float32)))
    with pytest.raises(ValueError, match=r"out\[y\] must be writeable: it requires grad"):
        nbbn.batch_norm_train(StandIn(x), out=out, backend="cuda")
    rm = StandIn(np.zeros(4, np.float32), requires_grad=True)
    with pytest.raises(ValueError, match="running_mean is updated in place.*requires grad"):
        nbbn.batch_norm_train(StandIn(x), running_mean=rm,
                              running_var=StandIn(np.ones(4, np.float32)), backend="cuda")


# ---------------------------------------------------------------------------------------------
# bfloat16 from PyTorch
# ---------------------------------------------------------------------------------------------


@pytest.mark.skipif(BF16 is None, reason="bfloat16 needs ml_dtypes")
def test_v2_bfloat16_typestr_is_bfloat16_only_when_the_producer_says_so():
    x = make_x((6, 3), np.float32, 1.0).astype(BF16)
    assert validate.array_meta(StandIn(x, torch_dtype="bfloat16"), "x").dtype == BF16
    anonymous = StandIn(x.view(np.dtype("V2")))
    with pytest.raises(TypeError, match="x must be a floating dtype"):
        validate.geometry(anonymous)


@cudasim_only
@pytest.mark.skipif(BF16 is None, reason="bfloat16 needs ml_dtypes")
def test_torch_bfloat16_tensor_runs(B):
    x = make_x((7, 3), np.float64, 4.0).astype(BF16)
    y, sm, si = nbbn.batch_norm_train(StandIn(x, torch_dtype="bfloat16"), backend="cuda")
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    yh = _host(y)
    assert yh.dtype == BF16
    assert_close(Op.FORWARD_TRAIN, (yh, _host(sm), _host(si)), (ry, rmean, rinvstd), BF16)


# ---------------------------------------------------------------------------------------------
# Streams, devices, allocation: the call context's decisions
# ---------------------------------------------------------------------------------------------


def test_v3_stream_is_the_launch_stream_and_others_are_waited_for(interop):
    a = StandIn(np.zeros((4, 2), np.float32), stream=0x5000)
    b = StandIn(np.zeros((4, 2), np.float32), stream=0x7000)
    ctx = interop.CallContext([("x", a), ("dy", b), ("gamma", np.ones(2))])
    assert ctx.stream_ptr == 0x5000 and ctx.waits == [0x7000]
    ctx = interop.CallContext([("x", StandIn(np.zeros(3), stream=1))])
    assert ctx.stream_ptr == 1 and ctx.waits == []  # the legacy default stream, as named
    ctx = interop.CallContext([("x", np.zeros(3))])
    assert ctx.stream_ptr is None and ctx.device is None and ctx.producer is None


def test_torch_producer_without_stream_takes_torchs_current_stream(interop, monkeypatch):
    """PyTorch exports v2 (no stream): the launch stream is torch.cuda.current_stream()."""
    torch_like = type("Tensor", (StandIn,), {"__module__": "torch"})
    t = torch_like(np.zeros((4, 2), np.float32), device=0)
    assert interop.producer(t) == "torch"
    monkeypatch.setattr(interop, "SIMULATOR", False)
    monkeypatch.setattr(interop, "_torch_stream", lambda a: 0xBEEF)
    ctx = interop.CallContext([("x", t)])
    assert ctx.stream_ptr == 0xBEEF and ctx.producer == "torch" and ctx.device == 0


def test_foreign_device_is_the_call_device(interop):
    x = StandIn(np.zeros((4, 2), np.float32), device=1)
    ctx = interop.CallContext([("x", x), ("gamma", StandIn(np.ones(2), device=1))])
    assert ctx.device == 1
    with pytest.raises(ValueError, match="one device; got x on device 1, gamma on device 0"):
        interop.CallContext([("x", x), ("gamma", StandIn(np.ones(2), device=0))])


@cudasim_only
def test_backend_records_stream_and_keys_scratch_by_it(B, interop):
    """A call on a v3 stream runs in a context naming that stream, and its scratch buffers are
    not the ones a call on another stream uses."""
    x = make_x((9, 4), np.float32, 3.0)
    seen = []
    real_scratch = B._scratch

    def spy(name, shape, dtype):
        seen.append((interop.current().stream_ptr, id(B._TLS.store[1]) if hasattr(
            B._TLS, "store") else None))
        return real_scratch(name, shape, dtype)

    B._scratch = spy
    try:
        y1, _, _ = nbbn.batch_norm_train(StandIn(x, stream=0x11), backend="cuda")
        store1 = B._TLS.store
        y2, _, _ = nbbn.batch_norm_train(StandIn(x, stream=0x22), backend="cuda")
        store2 = B._TLS.store
    finally:
        B._scratch = real_scratch
    assert {s for s, _ in seen} == {0x11, 0x22}
    assert store1[0] != store2[0] and store1[1] is not store2[1]
    np.testing.assert_array_equal(_host(y1), _host(y2))


@cudasim_only
def test_outputs_come_from_the_producer_allocator(B, interop, monkeypatch):
    """With an allocator registered for the producer (PyTorch's caching allocator for
    tensors), outputs are that producer's arrays, laid out like x (channels-last here)."""
    made = []

    def alloc(shape, dtype, device, like):
        a = StandIn(np.empty(shape, dtype), device=device or 0)
        made.append(a)
        return a

    monkeypatch.setitem(interop.ALLOCATORS, "tests", alloc)
    host = np.ascontiguousarray(make_x((3, 4, 2, 5), np.float32, 10.0).transpose(0, 2, 3, 1))
    x_cl = StandIn(host).permute(0, 3, 1, 2)  # (N, C, H, W) with channels-last memory
    y, sm, si = nbbn.batch_norm_train(x_cl, backend="cuda")
    assert all(isinstance(a, StandIn) for a in (y, sm, si)) and len(made) == 3
    assert y.host.strides == x_cl.host.strides
    ry, rmean, rinvstd, _ = ref.forward_train(x_cl.host)
    assert_close(Op.FORWARD_TRAIN, (y.host, sm.host, si.host), (ry, rmean, rinvstd), np.float32)


# ---------------------------------------------------------------------------------------------
# Real GPU with PyTorch (NBBN_TEST_GPU=1)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def torch_cuda(B):
    if SIMULATOR:
        pytest.skip("needs a real GPU: running under the CUDA simulator (set NBBN_TEST_GPU=1)")
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    return torch


@pytest.mark.gpu
def test_gpu_torch_requires_grad_bfloat16_and_side_stream(torch_cuda):
    """A bfloat16 activation that requires grad, on a side stream: computed on that stream
    (no host sync in between), outputs are tensors from PyTorch's allocator."""
    torch = torch_cuda
    x64 = make_x((16, 8, 5, 5), np.float64, 4.0)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        xt = torch.from_numpy(x64).to("cuda", torch.bfloat16).requires_grad_()
        y, sm, si = nbbn.batch_norm_train(xt, backend="cuda")
        assert isinstance(y, torch.Tensor) and y.dtype == torch.bfloat16
        yh = y.float().cpu().numpy()  # on stream s: ordered after the kernels
    xh = xt.detach().float().cpu().numpy().astype(BF16)
    ry, rmean, rinvstd, _ = ref.forward_train(xh)
    assert_close(Op.FORWARD_TRAIN, (yh.astype(BF16), sm.cpu().numpy(), si.cpu().numpy()),
                 (ry, rmean, rinvstd), BF16)


@pytest.mark.gpu
def test_gpu_tensor_on_second_device(torch_cuda):
    torch = torch_cuda
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    x = make_x((8, 4, 3, 3), np.float32, 2.0)
    xt = torch.from_numpy(x).to("cuda:1")
    y, sm, si = nbbn.batch_norm_train(xt, backend="cuda")
    assert y.device.index == 1
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, (y.cpu().numpy(), sm.cpu().numpy(), si.cpu().numpy()),
                 (ry, rmean, rinvstd), np.float32)
