"""Registers the built-in backends by name only; their kernel modules load on first use."""

from __future__ import annotations

import importlib

from .registry import BackendInfo, register_backend
from .validate import STORAGE_DTYPES


def _load(module: str):
    return lambda: importlib.import_module(module)


def _cuda_availability() -> str | None:
    from .cuda import availability

    return availability()


register_backend(BackendInfo(
    name="cpu",
    description="Numba @njit(parallel=True) kernels on the host",
    availability=lambda: None,
    load=_load("nbbn.cpu"),
    default_variant="auto",
    # float64, float32, and float16/bfloat16 storage (raw bits, float32 arithmetic).
    dtypes=STORAGE_DTYPES,
))

register_backend(BackendInfo(
    name="cuda",
    description="numba-cuda @cuda.jit kernels on an NVIDIA GPU",
    availability=_cuda_availability,
    load=_load("nbbn.cuda.backend"),
    device="cuda",
    # v1 (merge kernel) until a GPU run says the v2 ticket merge is faster: both deterministic.
    default_variant="v1",
    # float64, float32, float16, and bfloat16 where ml_dtypes gives NumPy the dtype.
    dtypes=STORAGE_DTYPES,
))
