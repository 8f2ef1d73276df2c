"""Test-session set-up.

CUDA kernels are tested under Numba's CUDA simulator unless NBBN_TEST_GPU=1 asks for the real
GPU. The simulator must be chosen before Numba is first imported, hence here, at the very top.

Tiers: ``python -m pytest`` runs the fast tier (``-m "not slow"`` in pyproject's addopts);
``python -m pytest -m slow`` the exhaustive one, both on pytest-xdist workers (``-n auto``).
Both start compiling the CPU kernels -- the suite's largest cost from a cold Numba cache -- in
background processes that compile disjoint kernel functions (:data:`_WARMUP_PARTS`,
:func:`nbbn.cpu.precompile`), once per session (the xdist controller starts them), while
the tests that need no CPU kernel (the CUDA simulator's, pure-Python ones) run first; the
first test that needs them waits, and every test after that loads machine code from the
on-disk cache (a warm cache makes the warm-up a two-second load).
"""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------------------------
# The warm-up. Without pytest-xdist (``-n 0``) this process starts it after collection and keeps
# the Popen handles. With xdist (pyproject's addopts: ``-n auto``) the controller starts it at
# session start -- once for all workers -- and each warm-up process writes a status file when
# done; the workers get the folder through ``workerinput`` and wait on the files.

#: How long a test waits for the warm-up before failing (a compile of every kernel is ~1 min).
WARMUP_TIMEOUT_S = 900.0
#: The warm-up's processes, one per kernel family (NC forward's parallel kernel and its serial
#: twin, NC inference, NC backward, NCHW forward and inference, NCHW backward).
#: Each compiles a disjoint set of kernel *functions*, together they cover what the fast tier
#: calls, and six uneven parts on two cores finish together where two did not (measured: two
#: parts split NC forward+inference / the rest finished 23 s apart). Splitting by x dtype
#: instead, as rounds 3-4 did, had two processes save the same functions' cache indexes at
#: the same time. Numba updates an index by an unlocked read-modify-write, so one process's
#: entries were lost, and the next session compiled them again (a "warm" run took 191 s
#: instead of 127 s).
#:
#: Together the parts compile three sets:
#:   - float32 with vectors of x's dtype, every variant;
#:   - float64 and float32 x with float64 vectors (the tests' make_params default;
#:     :func:`_vector_dtype`): the serial twins only. The float64 parallel kernels (~48 CPU-s of
#:     compilation) are the same code under ``prange`` as their float32 specializations; the
#:     tests that call them are in the exhaustive tier (tests/test_conformance.py's
#:     FAST_F64_VARIANTS, tests/test_accuracy.py's large-m gradients);
#:   - the one half-format specialization the fast tier calls (float16 NC inference, serial);
#:     the layer's, the bench's and the CLI's half tests are in the exhaustive tier (round 6:
#:     their four extra specializations took the cold fast tier from 171 s to 200 s).
#: The session summary names any kernel a test still compiled itself.
_WARMUP_PARTS = {
    "nc-forward-parallel": [
        dict(dtypes=("float32",), mixed=False, layouts=("NC",), ops=("forward-train",),
             variants=("rows",)),
    ],
    "nc-forward-serial": [
        dict(dtypes=("float32",), mixed=True, layouts=("NC",), ops=("forward-train",),
             variants=("serial",)),
        dict(dtypes=("float64",), mixed=False, layouts=("NC",), ops=("forward-train",),
             variants=("serial",)),
    ],
    "nc-inference": [
        dict(dtypes=("float32",), mixed=False, layouts=("NC",), ops=("inference",)),
        dict(dtypes=("float64", "float16"), mixed=False, layouts=("NC",), ops=("inference",),
             variants=("serial",)),
        dict(dtypes=("float32",), mixed=True, layouts=("NC",), ops=("inference",),
             variants=("serial",)),
    ],
    "nc-backward": [
        dict(dtypes=("float32",), mixed=False, layouts=("NC",), ops=("backward",)),
        dict(dtypes=("float64",), mixed=False, layouts=("NC",), ops=("backward",),
             variants=("serial",)),
        dict(dtypes=("float32",), mixed=True, layouts=("NC",), ops=("backward",),
             variants=("serial",)),
    ],
    # NCHW in two parts by kernel family (forward and inference; backward): one part was the
    # warm-up's last by ~14 s, with one core idle (round 6).
    "nchw-forward": [
        dict(dtypes=("float32",), mixed=False, layouts=("NCHW",),
             ops=("forward-train", "inference")),
        dict(dtypes=("float64",), mixed=False, layouts=("NCHW",),
             ops=("forward-train", "inference"), variants=("serial",)),
        dict(dtypes=("float32",), mixed=True, layouts=("NCHW",),
             ops=("forward-train", "inference"), variants=("serial",)),
    ],
    "nchw-backward": [
        dict(dtypes=("float32",), mixed=False, layouts=("NCHW",), ops=("backward",)),
        dict(dtypes=("float64",), mixed=False, layouts=("NCHW",), ops=("backward",),
             variants=("serial",)),
        dict(dtypes=("float32",), mixed=True, layouts=("NCHW",), ops=("backward",),
             variants=("serial",)),
    ],
}
_WARMUP_CODE = """\
import json, sys, traceback
status = "failed"
try:
    import numpy as np
    from nbbn.cpu import precompile
    from nbbn.spec import Layout, Op
    for spec in json.loads(sys.argv[1]):
        precompile([np.dtype(d) for d in spec["dtypes"]], mixed=spec["mixed"],
                   layouts=[Layout(v) for v in spec["layouts"]],
                   ops=[Op(v) for v in spec["ops"]], variants=spec.get("variants"))
    status = "ok"
except BaseException:
    traceback.print_exc()
finally:
    if len(sys.argv) > 2:
        with open(sys.argv[2], "w") as f:
            f.write(status)
"""


def _xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


def _xdist_controller(config) -> bool:
    return not _xdist_worker(config) and bool(getattr(config.option, "numprocesses", None))


def _warmup_wanted(config) -> bool:
    return not config.option.collectonly and os.environ.get("NBBN_NO_WARMUP") != "1"


def _start_warmup(status_dir: Path | None = None) -> None:
    _WARMUP["t0"], _WARMUP["wall0"] = time.perf_counter(), time.time()
    _WARMUP["procs"] = {
        part: subprocess.Popen([sys.executable, "-c", _WARMUP_CODE, json.dumps(specs),
                                *([str(status_dir / f"{part}.status")] if status_dir else [])],
                               cwd=ROOT)
        for part, specs in _WARMUP_PARTS.items()}




def pytest_collection_finish(session):
    """Without xdist: start compiling the CPU kernels, one process per x dtype, without
    waiting: the first test that needs them waits (:func:`pytest_runtest_setup`)."""
    config = session.config
    if _xdist_worker(config):
        d = config.workerinput.get("nbbn_warmup_dir")
        if d is not None:
            _WARMUP["wait_dir"] = Path(d)
        return
    if _xdist_controller(config):
        return
    needs = [i for i in session.items if _needs_cpu_kernels(i)]
    if needs and _warmup_wanted(config):
        _start_warmup()


def _wait_files(folder: Path) -> None:
    deadline = time.monotonic() + WARMUP_TIMEOUT_S
    for part in _WARMUP_PARTS:
        f = folder / f"{part}.status"
        while not f.exists() or not f.read_text():
            if time.monotonic() > deadline:
                raise RuntimeError(f"the CPU kernels' warm-up ({part}) did not finish in "
                                   f"{WARMUP_TIMEOUT_S:g} s ({f} missing)")
            time.sleep(0.1)
        if f.read_text() != "ok":
            raise RuntimeError(f"compiling the CPU kernels ({part}) failed (see the log above)")


def pytest_runtest_setup(item):
    if not _needs_cpu_kernels(item):
        return
    waited = time.perf_counter()
    folder = _WARMUP.pop("wait_dir", None)
    if folder is not None:  # an xdist worker
        _wait_files(folder)
        _WARMUP["waited"] = time.perf_counter() - waited
        return
    procs = _WARMUP.pop("procs", None)
    if procs is None:
        return
    for part, p in procs.items():
        if p.wait() != 0:
            raise RuntimeError(f"compiling the CPU kernels ({part}) failed (exit {p.returncode})")
        _WARMUP.setdefault("done", {})[part] = time.perf_counter() - _WARMUP["t0"]
    _WARMUP["waited"] = time.perf_counter() - waited


def _missed_kernels() -> dict:
    """CPU kernels this process compiled itself (a cache miss: a specialization
    :func:`nbbn.cpu.precompile` does not cover). Kernels only: the private helpers (``_name``)
    have no cache of their own and compile with whichever kernel specialization needs them."""
    kernels = sys.modules.get("nbbn.cpu.kernels")
    if kernels is None:
        return {}
    found = {}
    for name, obj in vars(kernels).items():
        # the kernels are (parallel, serial) pairs (kernels.twin); the codecs plain dispatchers
        for d in obj if isinstance(obj, tuple) else (obj,):
            if hasattr(d, "stats") and hasattr(d, "signatures") and not name.startswith("_"):
                for sig, n in d.stats.cache_misses.items():
                    if n:  # name(dtypes of its array arguments), so the summary says which
                        dts = dict.fromkeys(str(t.dtype) for t in sig if hasattr(t, "dtype"))
                        key = f"{d.py_func.__name__}({','.join(dts)})"
                        found[key] = found.get(key, 0) + n
    return found


@pytest.hookimpl(tryfirst=True)  # before xdist's, which sends workeroutput to the controller
def pytest_sessionfinish(session):
    config = session.config
    if _xdist_worker(config):
        config.workeroutput["nbbn_missed"] = _missed_kernels()
        config.workeroutput["nbbn_waited"] = _WARMUP.get("waited", 0.0)
    elif "dir" in _WARMUP:  # the controller: when each warm-up finished (its status file)
        for part, p in _WARMUP.pop("procs", {}).items():
            p.wait()
            f = _WARMUP["dir"] / f"{part}.status"
            if f.exists():  # seconds from the warm-up's start to its status file's write
                _WARMUP.setdefault("done", {})[part] = f.stat().st_mtime - _WARMUP["wall0"]


_MISSED: dict = {}

class _XdistHooks:
    """xdist's own hooks, registered only when the xdist plugin is active (pytest refuses a
    hook it has no specification for: ``-p no:xdist``, or xdist not installed)."""

    @staticmethod
    def pytest_configure_node(node):
        """Controller: tell each worker where the warm-up writes its status."""
        if "dir" in _WARMUP:
            node.workerinput["nbbn_warmup_dir"] = str(_WARMUP["dir"])

    @staticmethod
    def pytest_testnodedown(node, error):
        """Controller: gather what each worker compiled itself and how long it waited."""
        out = getattr(node, "workeroutput", {})
        for k, n in out.get("nbbn_missed", {}).items():
            _MISSED[k] = _MISSED.get(k, 0) + n
        _WARMUP["waited"] = max(_WARMUP.get("waited", 0.0), out.get("nbbn_waited", 0.0))


def pytest_configure(config):
    """xdist controller: start the warm-up now, before xdist starts the workers (its
    ``pytest_sessionstart``) and hands them its status folder (:class:`_XdistHooks`)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    config.pluginmanager.register(_XdistHooks(), "nbbn-xdist-hooks")
    if _xdist_controller(config) and _warmup_wanted(config):
        import tempfile

        _WARMUP["dir"] = Path(tempfile.mkdtemp(prefix="nbbn-warmup-"))
        _start_warmup(_WARMUP["dir"])


def pytest_terminal_summary(terminalreporter):
    """The warm-up's times, and any CPU kernel the tests still compiled themselves."""
    if _xdist_worker(terminalreporter.config):
        return
    done = _WARMUP.get("done", {})
    if done:
        where = "the xdist workers" if "dir" in _WARMUP else "the first tests"
        terminalreporter.write_line(
            f"Numba warm-up of the CPU kernels, {len(done)} processes beside {where}: "
            + ", ".join(f"{part} done at {s:.1f} s" for part, s in done.items())
            + f"; the first CPU test waited {_WARMUP.get('waited', 0.0):.1f} s")
    missed = _MISSED or _missed_kernels()
    if missed:
        terminalreporter.write_line(
            "CPU kernels compiled by the tests themselves (not by the warm-up): "
            + ", ".join(f"{k} ×{n}" for k, n in sorted(missed.items())))
