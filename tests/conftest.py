"""Test-session set-up.

CUDA kernels are tested under Numba's CUDA simulator unless NBBN_TEST_GPU=1 asks for the real
GPU. The simulator must be chosen before Numba is first imported, hence here, at the very top.

Tiers: ``python -m pytest`` runs the fast tier (``-m "not slow"`` in pyproject's addopts);
``python -m pytest -m slow`` the exhaustive one. Both start by compiling the CPU kernels -- the
suite's largest cost from a cold Numba cache -- in two processes at once, one per x dtype, so
that both cores compile and every test after that loads machine code from the on-disk cache
(:func:`nbbn.cpu.precompile`; a warm cache makes this a two-second load).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

if os.environ.get("NBBN_TEST_GPU") != "1":
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")

# Hypothesis (tests/test_properties.py): derandomized -- a fixed seed per test -- and bounded.
# ``fast`` (the default) keeps the file inside the fast tier; NBBN_HYPOTHESIS_PROFILE=full runs
# ten times the examples (CI's full tier). The CUDA-simulator tests run a tenth of the count.
try:
    from hypothesis import HealthCheck, settings
except ImportError:  # hypothesis is in the `test` extra; test_properties.py then fails to import
    pass
else:
    _COMMON = dict(derandomize=True, database=None, deadline=None, print_blob=False,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    settings.register_profile("fast", max_examples=100, **_COMMON)
    settings.register_profile("full", max_examples=1000, **_COMMON)
    settings.load_profile(os.environ.get("NBBN_HYPOTHESIS_PROFILE", "fast"))

ROOT = Path(__file__).resolve().parents[1]
#: Test modules that never call a kernel: a session of only these skips the warm-up.
NO_KERNELS = {"test_architecture", "test_reference"}
_WARMUP: dict[str, float] = {}


def pytest_collection_finish(session):
    modules = {Path(str(item.fspath)).stem for item in session.items}
    if (not session.items or modules <= NO_KERNELS or session.config.option.collectonly
            or os.environ.get("NBBN_NO_WARMUP") == "1"):
        return
    code = ("import sys, numpy as np; from nbbn.cpu import precompile; "
            "precompile([np.dtype(sys.argv[1])])")
    t0 = time.perf_counter()
    procs = {dt: subprocess.Popen([sys.executable, "-c", code, dt], cwd=ROOT)
             for dt in ("float32", "float64")}
    for dt, p in procs.items():
        if p.wait() != 0:
            raise RuntimeError(f"compiling the {dt} CPU kernels failed (exit {p.returncode})")
        _WARMUP[dt] = time.perf_counter() - t0


def pytest_terminal_summary(terminalreporter):
    if _WARMUP:
        terminalreporter.write_line(
            "Numba warm-up of the CPU kernels (two processes at once): "
            + ", ".join(f"{dt} {s:.1f} s" for dt, s in _WARMUP.items()))
