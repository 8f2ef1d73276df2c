"""Baselines, registered in the same registry as the kernels (kind ``"baseline"``).

Each baseline's kernel functions take the validated bundles of :mod:`nbbn.spec` and return the
op's outputs in :data:`nbbn.spec.OP_OUTPUTS` order, writing into ``args.out`` when it is given,
exactly like a kernel backend; so the runner calls ``registry.select(...).fn(args)`` for every
backend alike. The public API refuses them (:func:`nbbn.api._kernel_backend`).

* ``numpy``      -- vectorized NumPy, statistics accumulated in float64 (the two-pass formulas
                    of :mod:`nbbn.reference`, written as a NumPy user would, with ``out=``).
* ``torch-cpu``  -- ``torch.ops.aten.native_batch_norm[_backward].out`` on ``torch.from_numpy``
                    views (zero-copy), with PyTorch's own CPU thread pool.
* ``torch-cuda`` -- the same ATen ops on CUDA arrays, wrapped zero-copy through
                    ``__cuda_array_interface__``; available when ``torch.cuda.is_available()``.
"""

from __future__ import annotations

import importlib.util

import numpy as np

from .. import registry
from ..registry import BackendInfo, KernelSpec
from ..spec import BackwardArgs, InferArgs, Layout, Op, TrainArgs

# ---------------------------------------------------------------------------------------------
# NumPy


def _view(args) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Reduction axes and the (1, C[, 1]) broadcast shape of a per-channel vector."""
    g = args.geom
    if g.layout is Layout.NC:
        return (0,), (1, g.C)
    return (0, 2), (1, g.C, 1)


def _vec(v, C: int, default: float) -> np.ndarray:
    return np.full(C, default) if v is None else np.asarray(v, dtype=np.float64)


def np_forward_train(args: TrainArgs):
    """μ = mean(x), σ² = mean((x − μ)²) in float64; y = (x − μ)·(γ·invstd) + β in x's dtype."""
    g = args.geom
    dt = g.dtype
    axes, bshape = _view(args)
    x = args.x.reshape(g.kernel_shape)
    if args.out is None:
        y, save_mean, save_invstd = np.empty(g.shape, dt), np.empty(g.C, dt), np.empty(g.C, dt)
    else:
        y, save_mean, save_invstd = args.out
    yk = y.reshape(g.kernel_shape)
    mean = x.mean(axis=axes, dtype=np.float64)
    np.subtract(x, mean.astype(dt).reshape(bshape), out=yk)  # d = x − μ, kept in y
    var = np.einsum("ncs,ncs->c" if len(axes) == 2 else "nc,nc->c", yk, yk,
                    dtype=np.float64) / g.m
    invstd = 1.0 / np.sqrt(var + args.eps)
    scale = _vec(args.gamma, g.C, 1.0) * invstd
    np.multiply(yk, scale.astype(dt).reshape(bshape), out=yk)
    if args.beta is not None:
        np.add(yk, np.asarray(args.beta, dtype=dt).reshape(bshape), out=yk)
    save_mean[...] = mean
    save_invstd[...] = invstd
    if args.running_mean is not None:
        mo = args.momentum
        rm, rv = args.running_mean, args.running_var
        rm[...] = (1.0 - mo) * rm + mo * mean
        rv[...] = (1.0 - mo) * rv + mo * var * (g.m / (g.m - 1))
    return y, save_mean, save_invstd


def np_backward(args: BackwardArgs):
    """dβ = Σ dy, dγ = Σ dy·x̂ (float64 sums); dx = a·dy + b·x̂ + c with a = γ·invstd,
    b = −a·dγ/m, c = −a·dβ/m."""
    g = args.geom
    dt = g.dtype
    axes, bshape = _view(args)
    x = args.x.reshape(g.kernel_shape)
    dy = args.dy.reshape(g.kernel_shape)
    if args.out is None:
        dx, dgamma, dbeta = np.empty(g.shape, dt), np.empty(g.C, dt), np.empty(g.C, dt)
    else:
        dx, dgamma, dbeta = args.out
    dxk = dx.reshape(g.kernel_shape)
    mean = np.asarray(args.save_mean, dtype=np.float64)
    invstd = np.asarray(args.save_invstd, dtype=np.float64)
    np.subtract(x, mean.astype(dt).reshape(bshape), out=dxk)
    np.multiply(dxk, invstd.astype(dt).reshape(bshape), out=dxk)  # x̂, kept in dx
    sub = "ncs,ncs->c" if len(axes) == 2 else "nc,nc->c"
    db = dy.sum(axis=axes, dtype=np.float64)
    dg = np.einsum(sub, dy, dxk, dtype=np.float64)
    a = _vec(args.gamma, g.C, 1.0) * invstd
    b = -a * dg / g.m
    c = -a * db / g.m
    np.multiply(dxk, b.astype(dt).reshape(bshape), out=dxk)
    dxk += c.astype(dt).reshape(bshape)
    dxk += dy * a.astype(dt).reshape(bshape)
    dgamma[...] = dg
    dbeta[...] = db
    return dx, dgamma, dbeta


def np_inference(args: InferArgs):
    """α = γ/√(σ²_pop + ε), β' = β − μ_pop·α (float64, C values); y = α·x + β'."""
    g = args.geom
    dt = g.dtype
    _, bshape = _view(args)
    x = args.x.reshape(g.kernel_shape)
    y = np.empty(g.shape, dt) if args.out is None else args.out
    alpha = _vec(args.gamma, g.C, 1.0) / np.sqrt(_vec(args.running_var, g.C, 0.0) + args.eps)
    shift = _vec(args.beta, g.C, 0.0) - _vec(args.running_mean, g.C, 0.0) * alpha
    yk = y.reshape(g.kernel_shape)
    np.multiply(x, alpha.astype(dt).reshape(bshape), out=yk)
    np.add(yk, shift.astype(dt).reshape(bshape), out=yk)
    return (y,)


_NUMPY_FNS = {Op.FORWARD_TRAIN: np_forward_train, Op.BACKWARD: np_backward,
              Op.INFERENCE: np_inference}


def _register_numpy() -> None:
    for op, fn in _NUMPY_FNS.items():
        for layout in Layout:
            registry.register(KernelSpec("numpy", op, layout, fn, "vectorized NumPy"))


# ---------------------------------------------------------------------------------------------
# PyTorch (the module that imports torch is loaded only when a torch baseline is selected)


def _torch_missing() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'nbbn[torch]')"
    return None


def _torch_cuda_availability() -> str | None:
    reason = _torch_missing()
    if reason is not None:
        return reason
    import torch

    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA build of torch, or no GPU)"
    return None


def _load_torch(name: str):
    def load() -> None:
        from . import torch_baseline

        torch_baseline.register_kernels(name)

    return load


BASELINES = (
    BackendInfo(name="numpy", description="vectorized NumPy (float64 statistics)",
                availability=lambda: None, load=_register_numpy, kind="baseline", device="cpu"),
    BackendInfo(name="torch-cpu", description="PyTorch ATen native_batch_norm on the CPU",
                availability=_torch_missing, load=_load_torch("torch-cpu"), kind="baseline",
                device="cpu"),
    BackendInfo(name="torch-cuda", description="PyTorch ATen native_batch_norm on a CUDA GPU",
                availability=_torch_cuda_availability, load=_load_torch("torch-cuda"),
                kind="baseline", device="cuda"),
)

for _info in BASELINES:
    if _info.name not in registry.backend_names():
        registry.register_backend(_info)
