"""Test-session set-up.

CUDA kernels are tested under Numba's CUDA simulator unless NBBN_TEST_GPU=1 asks for the real
GPU. The simulator must be chosen before Numba is first imported, hence here, at the very top.

Tiers: ``python -m pytest`` runs the fast tier (``-m "not slow"`` in pyproject's addopts);
``python -m pytest -m slow`` the exhaustive one. Both start compiling the CPU kernels -- the
suite's largest cost from a cold Numba cache -- in two background processes, one per x dtype
(:func:`nbbn.cpu.precompile`), while the tests that need no CPU kernel (the CUDA simulator's,
pure-Python ones) run first; the first test that needs them waits, and every test after that
loads machine code from the on-disk cache (a warm cache makes the warm-up a two-second load).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

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
#: Test modules that never call a CPU kernel. They run first, while the warm-up compiles.
NO_CPU_KERNELS = {"test_architecture", "test_reference", "test_cuda", "test_cuda_interop",
                  "test_cuda_verify", "test_cuda_ptx"}
_WARMUP: dict = {}


def _needs_cpu_kernels(item) -> bool:
    """Whether a test calls the CPU kernels: every test but the CUDA-simulator ones (their
    modules, and the ``cuda`` cases of the registry-driven suites) and the pure-Python ones."""
    if Path(str(item.fspath)).stem in NO_CPU_KERNELS:
        return False
    callspec = getattr(item, "callspec", None)
    if callspec is not None and callspec.id.startswith("cuda"):
        return False
    return not item.name.endswith("_cuda")


#: Modules that run in both tiers: the exhaustive tier (``-m slow``) selects them too, with
#: Hypothesis's larger profile (NBBN_HYPOTHESIS_PROFILE=full, as .ci/run sets it).
BOTH_TIERS = {"test_properties"}


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(session, config, items):
    """Tests that need no CPU kernel first (stable: the order within each group is kept), so
    they run while the warm-up compiles; in the exhaustive tier, the both-tier modules too."""
    if (config.option.markexpr or "").strip() == "slow":
        for item in items:
            if Path(str(item.fspath)).stem in BOTH_TIERS:
                item.add_marker(pytest.mark.slow)
    items.sort(key=_needs_cpu_kernels)


def pytest_collection_finish(session):
    """Start compiling the CPU kernels, one process per x dtype, without waiting: the first
    test that needs them waits (:func:`pytest_runtest_setup`)."""
    needs = [i for i in session.items if _needs_cpu_kernels(i)]
    if not needs or session.config.option.collectonly or os.environ.get("NBBN_NO_WARMUP") == "1":
        return
    # Vectors in x's dtype only: the few tests that mix vector dtypes compile their
    # specializations themselves (the summary lists them), and the two processes stay even.
    code = ("import sys, numpy as np; from nbbn.cpu import precompile; "
            "precompile([np.dtype(sys.argv[1])], mixed=False)")
    _WARMUP["t0"] = time.perf_counter()
    _WARMUP["procs"] = {dt: subprocess.Popen([sys.executable, "-c", code, dt], cwd=ROOT)
                        for dt in ("float32", "float64")}


def pytest_runtest_setup(item):
    procs = _WARMUP.pop("procs", None)
    if procs is None or not _needs_cpu_kernels(item):
        if procs is not None:
            _WARMUP["procs"] = procs
        return
    waited = time.perf_counter()
    for dt, p in procs.items():
        if p.wait() != 0:
            raise RuntimeError(f"compiling the {dt} CPU kernels failed (exit {p.returncode})")
        _WARMUP[dt] = time.perf_counter() - _WARMUP["t0"]
    _WARMUP["waited"] = time.perf_counter() - waited


def pytest_terminal_summary(terminalreporter):
    """The warm-up's times, and any CPU kernel the tests still compiled themselves (a cache miss
    in this process: a specialization :func:`nbbn.cpu.precompile` does not cover)."""
    done = {k: v for k, v in _WARMUP.items() if k.startswith("float")}
    if done:
        terminalreporter.write_line(
            "Numba warm-up of the CPU kernels, two processes beside the first tests: "
            + ", ".join(f"{dt} done at {s:.1f} s" for dt, s in done.items())
            + f"; the first CPU test waited {_WARMUP.get('waited', 0.0):.1f} s")
    kernels = sys.modules.get("nbbn.cpu.kernels")
    if kernels is not None:
        # Kernels only: the private helpers (``_name``) have no cache of their own and compile
        # with whichever kernel specialization needs them.
        missed = {name: sum(d.stats.cache_misses.values()) for name, d in vars(kernels).items()
                  if hasattr(d, "stats") and hasattr(d, "signatures")
                  and not name.startswith("_") and sum(d.stats.cache_misses.values())}
        if missed:
            terminalreporter.write_line(
                "CPU kernels compiled by the tests themselves (not by the warm-up): "
                + ", ".join(f"{k} ×{n}" for k, n in sorted(missed.items())))
