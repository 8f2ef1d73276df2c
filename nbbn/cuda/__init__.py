"""The CUDA backend (numba-cuda). Importing this package is cheap: kernels live in
:mod:`nbbn.cuda.kernels`, which the registry imports on first use once :func:`availability`
says the backend can run."""

from __future__ import annotations

import os


def availability() -> str | None:
    """None when a CUDA GPU (or the simulator) can run our kernels, else the reason."""
    try:
        from numba import cuda
    except Exception as exc:  # pragma: no cover - numba itself is a hard dependency
        return f"numba.cuda cannot be imported: {exc}"
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        return None
    try:
        import numba_cuda  # noqa: F401
    except ImportError:
        return "numba-cuda is not installed (pip install 'nbbn[cuda]')"
    try:
        if not cuda.is_available():
            return "no usable CUDA driver or GPU found (numba.cuda.is_available() is False)"
    except Exception as exc:
        return f"CUDA initialisation failed: {exc}"
    return None
