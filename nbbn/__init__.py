"""nbbn: batch-normalization kernels written with Numba (parallel CPU and CUDA)."""

from . import (
    _backends,  # noqa: F401  (registers the built-in backends; imports no kernels yet)
    pool,  # nbbn.pool: configure, clear, stats of the CPU backend's output pool
)
from .api import batch_norm_backward, batch_norm_infer, batch_norm_train, bind
from .layer import BatchNorm
from .registry import BackendUnavailable, availability
from .spec import Layout, Op

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailable",
    "BatchNorm",
    "Layout",
    "Op",
    "__version__",
    "availability",
    "batch_norm_backward",
    "batch_norm_infer",
    "batch_norm_train",
    "bind",
    "pool",
]
