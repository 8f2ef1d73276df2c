"""One comparison table for the CPU benchmark suite (numbagg style).

Each entry is (op, shape) × an implementation; ``make(impl, op, shape)`` does all set-up (data,
statistics, warm-up/JIT) and returns a zero-argument callable: only that call is timed.

Implementations:
    nbbn       -- the public API with backend="cpu", allocating its outputs
    nbbn-out   -- the same with preallocated outputs (out=), so allocation is not timed
    torch      -- torch.ops.aten.native_batch_norm / native_batch_norm_backward (PyTorch CPU)
    copy       -- np.copy of the op's main input: 1 read + 1 write of the same bytes, the roofline
"""

from __future__ import annotations

import numpy as np

import nbbn

SHAPES = [(64, 64, 56, 56), (32, 256, 56, 56), (32, 2048, 7, 7), (256, 4096), (4096, 1024)]
OPS = ["forward-train", "backward", "inference"]
IMPLS = ["nbbn", "nbbn-out", "torch", "copy"]


def torch_or_none():
    try:
        import torch
    except ImportError:
        return None
    return torch


def _data(shape, dtype=np.float32, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    x = (-2.3 + 0.5 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype)
    gamma = (1 + 0.1 * rng.standard_normal(C)).astype(dtype)
    beta = (0.1 * rng.standard_normal(C)).astype(dtype)
    return x, dy, gamma, beta


def make(impl: str, op: str, shape, dtype=np.float32):
    x, dy, gamma, beta = _data(shape, dtype)
    _, sm, si = nbbn.batch_norm_train(x, gamma, beta)  # also compiles the forward kernels
    rm, rv = sm.copy(), (1 / si.astype(np.float64) ** 2).astype(dtype)

    if impl == "copy":
        src = dy if op == "backward" else x
        return lambda: np.copy(src)

    if impl in ("nbbn", "nbbn-out"):
        if op == "forward-train":
            out = (np.empty_like(x), np.empty_like(sm), np.empty_like(si))

            def fn(out=out if impl == "nbbn-out" else None):
                return nbbn.batch_norm_train(x, gamma, beta, out=out)
        elif op == "backward":
            out = (np.empty_like(x), np.empty_like(sm), np.empty_like(si))

            def fn(out=out if impl == "nbbn-out" else None):
                return nbbn.batch_norm_backward(dy, x, sm, si, gamma, out=out)
        else:
            out = np.empty_like(x)

            def fn(out=out if impl == "nbbn-out" else None):
                return nbbn.batch_norm_infer(x, rm, rv, gamma, beta, out=out)
        fn()  # JIT compile and first-touch outside the timed region
        return fn

    if impl == "torch":
        torch = torch_or_none()
        if torch is None:
            return None
        tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
        tg, tb = torch.from_numpy(gamma), torch.from_numpy(beta)
        trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
        tsm, tsi = torch.from_numpy(sm), torch.from_numpy(si)
        aten = torch.ops.aten
        if op == "forward-train":
            def fn():
                return aten.native_batch_norm(tx, tg, tb, None, None, True, 0.1, 1e-5)
        elif op == "backward":
            def fn():
                return aten.native_batch_norm_backward(tdy, tx, tg, None, None, tsm, tsi, True,
                                                       1e-5, [True, True, True])
        else:
            def fn():
                return aten.native_batch_norm(tx, tg, tb, trm, trv, False, 0.1, 1e-5)
        fn()
        return fn
    raise ValueError(impl)
