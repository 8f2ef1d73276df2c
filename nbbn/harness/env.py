"""The environment columns written into every row: versions, threads, machine, device name."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def environment() -> dict:
    """Columns shared by every row of a run (the device name is added per backend device)."""
    import numba

    from .. import __version__

    env = {
        "nbbn_version": __version__,
        "numba_version": numba.__version__,
        "numpy_version": _version("numpy"),
        "torch_version": _version("torch"),
        "python_version": platform.python_version(),
        "threads": numba.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
    }
    torch = sys.modules.get("torch")
    env["torch_threads"] = torch.get_num_threads() if torch is not None else None
    return env
