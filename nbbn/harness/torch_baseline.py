"""PyTorch baselines: ATen's own batch-norm kernels, called with preallocated outputs.

``torch.ops.aten.native_batch_norm.out`` and ``native_batch_norm_backward.out`` are the ops that
``torch.nn.functional.batch_norm`` and autograd reach, minus the Python and autograd layers.
Arrays are wrapped without copying: ``torch.from_numpy`` on the host, ``torch.as_tensor`` through
``__cuda_array_interface__`` on a GPU. Per-channel vectors of another dtype than x are cast (C
values; running statistics are cast back after the update).
"""

from __future__ import annotations

import numpy as np
import torch

from .. import registry
from ..registry import KernelSpec
from ..spec import BackwardArgs, InferArgs, Layout, Op, TrainArgs


def _t(a):
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return torch.from_numpy(a)
    if isinstance(a, torch.Tensor):
        return a
    return torch.as_tensor(a, device="cuda")  # zero-copy through __cuda_array_interface__


def _vec(v, like):
    t = _t(v)
    return t if t is None or t.dtype == like.dtype else t.to(like.dtype)


def _empty(like, shape):
    return torch.empty(shape, dtype=like.dtype, device=like.device)


def forward_train(args: TrainArgs):
    x = _t(args.x)
    C = args.geom.C
    outs = args.out or (_empty(x, x.shape), _empty(x, (C,)), _empty(x, (C,)))
    rm, rv = _t(args.running_mean), _t(args.running_var)
    rm_c, rv_c = _vec(args.running_mean, x), _vec(args.running_var, x)
    torch.ops.aten.native_batch_norm.out(
        x, _vec(args.gamma, x), _vec(args.beta, x), rm_c, rv_c, True, args.momentum, args.eps,
        out=_t(outs[0]), save_mean=_t(outs[1]), save_invstd=_t(outs[2]))
    if rm is not None and rm_c is not rm:
        rm.copy_(rm_c)
    if rv is not None and rv_c is not rv:
        rv.copy_(rv_c)
    return tuple(outs)


def backward(args: BackwardArgs):
    x = _t(args.x)
    C = args.geom.C
    outs = args.out or (_empty(x, x.shape), _empty(x, (C,)), _empty(x, (C,)))
    torch.ops.aten.native_batch_norm_backward.out(
        _t(args.dy), x, _vec(args.gamma, x), None, None, _vec(args.save_mean, x),
        _vec(args.save_invstd, x), True, 1e-5, [True, True, True],
        out0=_t(outs[0]), out1=_t(outs[1]), out2=_t(outs[2]))
    return tuple(outs)


_SCRATCH: dict = {}


def inference(args: InferArgs):
    x = _t(args.x)
    y = args.out if args.out is not None else _empty(x, x.shape)
    key = (x.dtype, x.device)
    if key not in _SCRATCH:  # eval mode leaves save_mean/save_invstd empty
        _SCRATCH[key] = (_empty(x, (0,)), _empty(x, (0,)))
    s1, s2 = _SCRATCH[key]
    torch.ops.aten.native_batch_norm.out(
        x, _vec(args.gamma, x), _vec(args.beta, x), _vec(args.running_mean, x),
        _vec(args.running_var, x), False, 0.0, args.eps, out=_t(y), save_mean=s1, save_invstd=s2)
    return (y,)


_FNS = {Op.FORWARD_TRAIN: forward_train, Op.BACKWARD: backward, Op.INFERENCE: inference}


def register_kernels(backend: str) -> None:
    for op, fn in _FNS.items():
        for layout in Layout:
            registry.register(KernelSpec(backend, op, layout, fn, "PyTorch ATen native_batch_norm"))
