"""PyTorch baselines: ATen's own batch-norm kernels, the one PyTorch baseline of the harness.

``torch.ops.aten.native_batch_norm`` and ``native_batch_norm_backward`` are the ops that
``torch.nn.functional.batch_norm`` and autograd reach, minus the Python and autograd layers.
Arrays are wrapped without copying: ``torch.from_numpy`` on the host, ``torch.as_tensor`` through
``__cuda_array_interface__`` on a GPU. Channels-last data (nbbn's NHWC: an (N, H, W, C) array with
``channel_axis=-1``) becomes the ``channels_last`` NCHW tensor PyTorch users hold:
``torch.from_numpy(x_nhwc).permute(0, 3, 1, 2)``, on which ATen runs its channels-last kernels.

Two ways to call (the harness's ``--call``):

* ``kernel`` (:func:`register_kernels`): the ``.out`` overloads, writing into preallocated
  outputs -- what nbbn's ``out=`` path is compared with;
* ``api`` (:func:`api_call`): the allocating ops, as a user calls them.

Fusion as a PyTorch user writes it: the normalization, then ``y.add_(residual)`` and
``y.relu_()`` in place; backward with a ReLU computes dz = dy·[y > 0] (``torch.mul``) and then
the normalization's backward on dz. Per-channel vectors of another dtype than ATen's are cast
(C values; running statistics are cast back after the update).

Half x (float16, bfloat16) runs PyTorch's mixed-precision batch norm, the path that autocast and
a half ``nn.BatchNorm2d`` with float32 parameters reach: x, y, dy, dx in the half dtype; γ, β,
running and saved statistics, dγ, dβ float32 -- the per-channel dtype nbbn uses too
(:func:`nbbn.validate.channel_dtype`). PyTorch 2.13's CPU ops run it for every layout, op and
fusion here (channels_last included), so no configuration is skipped. ``torch.from_numpy``
knows no bfloat16: such an array is wrapped as its raw bits and viewed as ``torch.bfloat16``
(no copy), and bfloat16 results go back to NumPy widened to float32 (exact) for the check.
"""

from __future__ import annotations

import numpy as np
import torch

from .. import registry, validate
from ..registry import KernelSpec
from ..spec import BackwardArgs, InferArgs, Layout, Op, TrainArgs

aten = torch.ops.aten


_BF16 = validate.STORAGE_DTYPE_NAMES.get("bfloat16")


def _t(a):
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a
    if _BF16 is not None and a.dtype == _BF16:  # no bfloat16 in from_numpy / the interface
        return _t(a.view(np.uint16)).view(torch.bfloat16)
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    return torch.as_tensor(a, device="cuda")  # zero-copy through __cuda_array_interface__


def _x(a, channel_axis: int):
    """An x-shaped array as the (N, C, ...) tensor ATen takes: channels-last data becomes a
    channels_last tensor (a view)."""
    t = _t(a)
    if t is None or channel_axis == 1:
        return t
    return t.movedim(channel_axis, 1)


def _param_dtype(x):
    """ATen's dtype for the per-channel tensors of x: x's own, float32 for a half x (the
    mixed-precision path)."""
    return torch.float32 if x.element_size() == 2 else x.dtype


def _vec(v, like):
    t = _t(v)
    want = _param_dtype(like)
    return t if t is None or t.dtype == want else t.to(want)


def _empty_like(x):
    return torch.empty_like(x)  # keeps x's memory format (channels_last stays channels_last)


def _empty(like, shape):
    """A per-channel output for x = ``like``."""
    return torch.empty(shape, dtype=_param_dtype(like), device=like.device)


def _fuse(y, residual):
    if residual is not None:
        y.add_(residual)


def forward_train(args: TrainArgs):
    ca = args.geom.channel_axis
    x = _x(args.x, ca)
    C = args.geom.C
    if args.out is not None:
        outs = args.out
        y, sm, si = _x(outs[0], ca), _t(outs[1]), _t(outs[2])
    else:
        y, sm, si = _empty_like(x), _empty(x, (C,)), _empty(x, (C,))
        outs = (y.movedim(1, ca) if ca != 1 else y, sm, si)
    rm, rv = _t(args.running_mean), _t(args.running_var)
    rm_c, rv_c = _vec(args.running_mean, x), _vec(args.running_var, x)
    aten.native_batch_norm.out(
        x, _vec(args.gamma, x), _vec(args.beta, x), rm_c, rv_c, True, args.momentum, args.eps,
        out=y, save_mean=sm, save_invstd=si)
    _fuse(y, _x(args.residual, ca))
    if args.relu:
        y.relu_()
    if rm is not None and rm_c is not rm:
        rm.copy_(rm_c)
    if rv is not None and rv_c is not rv:
        rv.copy_(rv_c)
    return tuple(outs)


def backward(args: BackwardArgs):
    ca = args.geom.channel_axis
    x = _x(args.x, ca)
    C = args.geom.C
    dy = _x(args.dy, ca)
    if args.out is not None:
        outs = tuple(args.out)
        dx, dg, db = _x(outs[0], ca), _t(outs[1]), _t(outs[2])
        dz = _x(outs[3], ca) if args.relu else None
    else:
        dx, dg, db = _empty_like(x), _empty(x, (C,)), _empty(x, (C,))
        dz = _empty_like(x) if args.relu else None
        back = (lambda t: t.movedim(1, ca)) if ca != 1 else (lambda t: t)
        outs = (back(dx), dg, db) + ((back(dz),) if args.relu else ())
    if args.relu:
        torch.mul(dy, _x(args.y, ca) > 0, out=dz)
        dy = dz
    aten.native_batch_norm_backward.out(
        dy, x, _vec(args.gamma, x), None, None, _vec(args.save_mean, x),
        _vec(args.save_invstd, x), True, 1e-5, [True, True, True], out0=dx, out1=dg, out2=db)
    return outs


_SCRATCH: dict = {}


def inference(args: InferArgs):
    ca = args.geom.channel_axis
    x = _x(args.x, ca)
    if args.out is not None:
        out, y = args.out, _x(args.out, ca)
    else:
        y = _empty_like(x)
        out = y.movedim(1, ca) if ca != 1 else y
    key = (x.dtype, x.device)
    if key not in _SCRATCH:  # eval mode leaves save_mean/save_invstd empty
        _SCRATCH[key] = (_empty(x, (0,)), _empty(x, (0,)))
    s1, s2 = _SCRATCH[key]
    aten.native_batch_norm.out(
        x, _vec(args.gamma, x), _vec(args.beta, x), _vec(args.running_mean, x),
        _vec(args.running_var, x), False, 0.0, args.eps, out=y, save_mean=s1, save_invstd=s2)
    _fuse(y, _x(args.residual, ca))
    if args.relu:
        y.relu_()
    return (out,)


_FNS = {Op.FORWARD_TRAIN: forward_train, Op.BACKWARD: backward, Op.INFERENCE: inference}


def register_kernels(backend: str) -> None:
    for op, fn in _FNS.items():
        for layout in Layout:
            registry.register(KernelSpec(backend, op, layout, fn, "PyTorch ATen native_batch_norm",
                                         dtypes=validate.STORAGE_DTYPES))


def api_call(inputs):
    """The allocating ATen call of one case, as a PyTorch user makes it on tensors they hold:
    ``(call, convert)``.

    ``inputs`` (:class:`nbbn.bench.cases.CallInputs`) holds the op, fusion, channel axis,
    constants and arrays; they are wrapped as tensors here, once, outside the timed call.
    ``call()`` returns ATen's outputs as (N, C, ...) tensors; ``convert(result)``
    (:func:`to_user`) turns them back into the user's axes for the correctness check."""
    ca = inputs.channel_axis
    a = {k: (_x(v, ca) if k in ("x", "dy", "residual", "y") else _t(v))
         for k, v in inputs.arrays.items()}
    x = a["x"]
    w, b = _vec(a.get("gamma"), x), _vec(a.get("beta"), x)
    relu, res = inputs.relu, a.get("residual")
    eps, mo = inputs.eps, inputs.momentum
    if inputs.op is Op.FORWARD_TRAIN:
        rm, rv = a["running_mean"], a["running_var"]
        if rm.dtype != _param_dtype(x) or rv.dtype != _param_dtype(x):
            raise TypeError("torch baselines need running statistics in x's dtype (float32 "
                            "for a half x)")

        def call():
            y, sm, si = aten.native_batch_norm(x, w, b, rm, rv, True, mo, eps)
            if res is not None:
                y.add_(res)
            if relu:
                y.relu_()
            return y, sm, si
    elif inputs.op is Op.BACKWARD:
        dy, sm, si = a["dy"], _vec(a["save_mean"], x), _vec(a["save_invstd"], x)
        yf = a.get("y")

        def call():
            if relu:
                dz = torch.mul(dy, yf > 0)
                return aten.native_batch_norm_backward(dz, x, w, None, None, sm, si, True, eps,
                                                       [True, True, True]) + (dz,)
            return aten.native_batch_norm_backward(dy, x, w, None, None, sm, si, True, eps,
                                                   [True, True, True])
    else:
        rm, rv = _vec(a["running_mean"], x), _vec(a["running_var"], x)

        def call():
            y = aten.native_batch_norm(x, w, b, rm, rv, False, 0.0, eps)[0]
            if res is not None:
                y.add_(res)
            if relu:
                y.relu_()
            return (y,)

    return call, (lambda result: to_user(result, ca))


def to_user(result, channel_axis: int):
    """ATen's outputs (x-shaped ones as (N, C, ...) tensors) in the user's axes; bfloat16 ones
    widened to float32 (exact), which NumPy can take."""
    out = []
    for t in result:
        if isinstance(t, torch.Tensor):
            if t.dim() > 2 and channel_axis != 1:
                t = t.movedim(1, channel_axis)
            if t.dtype == torch.bfloat16:
                t = t.float()
        out.append(t)
    return tuple(out)
