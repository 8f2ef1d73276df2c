"""Argument checks shared by every backend: one place for every error message.

The checks read only shapes, dtypes and flags, so they apply alike to NumPy arrays and to device
arrays (anything with ``__cuda_array_interface__``: numba device arrays, CuPy, PyTorch CUDA
tensors).
Nothing here copies, converts or modifies an array.

Dtype rules
-----------
* ``x`` (and ``dy``) must be float32 or float64; ``dy`` must have ``x``'s dtype.
* Per-channel vectors (``gamma``, ``beta``, ``running_mean``, ``running_var``, ``save_mean``,
  ``save_invstd``) may be float32 or float64 independently of ``x``: they are read in their own
  precision (a documented cast, C values per call), and running statistics are updated in place in
  their own dtype.
* Preallocated outputs must have exactly the dtype and shape the op returns, be C-contiguous and
  writeable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .spec import FLOAT_DTYPES, BackwardArgs, Geometry, InferArgs, Layout, TrainArgs


@dataclass(frozen=True)
class ArrayMeta:
    shape: tuple[int, ...]
    dtype: np.dtype
    c_contiguous: bool
    writeable: bool
    on_device: bool


def array_meta(a, name: str) -> ArrayMeta:
    """Shape, dtype and layout facts of a host or device array; TypeError for anything else."""
    if isinstance(a, np.ndarray):
        return ArrayMeta(a.shape, a.dtype, a.flags.c_contiguous, a.flags.writeable, False)
    cai = getattr(a, "__cuda_array_interface__", None)
    if cai is not None:
        shape = tuple(int(s) for s in cai["shape"])
        dtype = np.dtype(cai["typestr"])
        strides = cai.get("strides")
        if strides is None:
            contiguous = True
        else:
            expected, step = [], dtype.itemsize
            for s in reversed(shape):
                expected.append(step)
                step *= s
            contiguous = tuple(strides) == tuple(reversed(expected)) or 0 in shape
        readonly = bool(cai["data"][1])
        return ArrayMeta(shape, dtype, contiguous, not readonly, True)
    raise TypeError(
        f"{name} must be a NumPy array or a CUDA array (__cuda_array_interface__), "
        f"got {type(a).__name__}"
    )


def _check_float(meta: ArrayMeta, name: str) -> None:
    if meta.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {meta.dtype}")


def geometry(x, name: str = "x") -> Geometry:
    """Layout and sizes from ``x``: 2-D is NC, 3-D (NCL) and 4-D (NCHW) are the NCHW family."""
    meta = array_meta(x, name)
    _check_float(meta, name)
    shape = meta.shape
    if not 2 <= len(shape) <= 4:
        raise ValueError(
            f"{name} must be 2-D (N, C), 3-D (N, C, L) or 4-D (N, C, H, W); got {len(shape)}-D "
            f"shape {shape}"
        )
    if any(s == 0 for s in shape):
        raise ValueError(f"{name} is empty (shape {shape}): batch norm needs N, C and H·W > 0")
    N, C = shape[0], shape[1]
    S = math.prod(shape[2:])
    layout = Layout.NC if len(shape) == 2 else Layout.NCHW
    return Geometry(layout, tuple(shape), N, C, S, meta.dtype)


def channel_vector(v, name: str, C: int, required: bool = False) -> None:
    """A per-channel vector of shape (C,), float32 or float64; None allowed unless required."""
    if v is None:
        if required:
            raise ValueError(f"{name} is required")
        return
    meta = array_meta(v, name)
    _check_float(meta, name)
    if meta.shape != (C,):
        raise ValueError(f"{name} must have shape ({C},) to match C = {C}, got {meta.shape}")


def eps_value(eps) -> float:
    try:
        e = float(eps)
    except (TypeError, ValueError):
        raise TypeError(f"eps must be a real number, got {eps!r}") from None
    if not (math.isfinite(e) and e > 0):
        raise ValueError(f"eps must be finite and > 0, got {eps!r}")
    return e


def momentum_value(momentum) -> float:
    try:
        mo = float(momentum)
    except (TypeError, ValueError):
        raise TypeError(f"momentum must be a real number, got {momentum!r}") from None
    if not 0.0 <= mo <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must lie in [0, 1], got {momentum!r}")
    return mo


def _outputs(out, names: tuple[str, ...], shapes, dtype: np.dtype, on_device: bool):
    """Check preallocated outputs: a tuple of len(names) arrays (or one array for one output)."""
    if out is None:
        return None
    single = len(names) == 1
    outs = (out,) if single and not isinstance(out, tuple | list) else tuple(out)
    if len(outs) != len(names):
        raise ValueError(f"out must hold {len(names)} arrays {names}, got {len(outs)}")
    for o, name, shape in zip(outs, names, shapes, strict=True):
        label = f"out[{name}]"
        meta = array_meta(o, label)
        if meta.shape != tuple(shape):
            raise ValueError(f"{label} must have shape {tuple(shape)}, got {meta.shape}")
        if meta.dtype != dtype:
            raise TypeError(f"{label} must have dtype {dtype}, got {meta.dtype}")
        if not (meta.c_contiguous and meta.writeable):
            raise ValueError(f"{label} must be C-contiguous and writeable")
        if meta.on_device != on_device:
            where = "device" if on_device else "host"
            raise TypeError(f"{label} must be a {where} array like x")
    return outs[0] if single else outs


def train_args(x, gamma, beta, eps, running_mean, running_var, momentum, out) -> TrainArgs:
    g = geometry(x)
    if g.m < 2:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input shape {g.shape} "
            f"(m = N·H·W = {g.m})"
        )
    for v, name in ((gamma, "gamma"), (beta, "beta"), (running_mean, "running_mean"),
                    (running_var, "running_var")):
        channel_vector(v, name, g.C)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together")
    for v, name in ((running_mean, "running_mean"), (running_var, "running_var")):
        if v is not None and not array_meta(v, name).writeable:
            raise ValueError(f"{name} is updated in place and must be writeable")
    on_dev = array_meta(x, "x").on_device
    outs = _outputs(out, ("y", "save_mean", "save_invstd"), (g.shape, (g.C,), (g.C,)), g.dtype,
                    on_dev)
    return TrainArgs(g, x, gamma, beta, eps_value(eps), running_mean, running_var,
                     momentum_value(momentum), outs)


def backward_args(dy, x, save_mean, save_invstd, gamma, out) -> BackwardArgs:
    g = geometry(x)
    dmeta = array_meta(dy, "dy")
    _check_float(dmeta, "dy")
    if dmeta.shape != g.shape:
        raise ValueError(f"dy must have x's shape {g.shape}, got {dmeta.shape}")
    if dmeta.dtype != g.dtype:
        raise TypeError(f"dy must have x's dtype {g.dtype}, got {dmeta.dtype}")
    channel_vector(save_mean, "save_mean", g.C, required=True)
    channel_vector(save_invstd, "save_invstd", g.C, required=True)
    channel_vector(gamma, "gamma", g.C)
    on_dev = array_meta(x, "x").on_device
    outs = _outputs(out, ("dx", "dgamma", "dbeta"), (g.shape, (g.C,), (g.C,)), g.dtype, on_dev)
    return BackwardArgs(g, dy, x, save_mean, save_invstd, gamma, outs)


def infer_args(x, running_mean, running_var, gamma, beta, eps, out) -> InferArgs:
    g = geometry(x)
    channel_vector(running_mean, "running_mean", g.C, required=True)
    channel_vector(running_var, "running_var", g.C, required=True)
    channel_vector(gamma, "gamma", g.C)
    channel_vector(beta, "beta", g.C)
    on_dev = array_meta(x, "x").on_device
    outs = _outputs(out, ("y",), (g.shape,), g.dtype, on_dev)
    return InferArgs(g, x, running_mean, running_var, gamma, beta, eps_value(eps), outs)
