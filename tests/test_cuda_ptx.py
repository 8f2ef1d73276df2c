"""Every CUDA kernel compiles with the real compiler (NVVM) for cc 8.0 and 9.0, for x of float32,
float64, float16 and bfloat16 -- no GPU needed.

The tests run under the CUDA simulator, which compiles nothing, so the check runs in a
subprocess without NUMBA_ENABLE_CUDASIM: ``nbbn ptxcheck``. The kernel list and
signatures come from ``nbbn.cuda.kernels.KERNELS`` (declared with each kernel), and kernels left
out of it are reported as unlisted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

#: Compiling every kernel for every dtype and capability takes minutes: the full tier.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report():
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed (pip install 'nbbn[cuda]')")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "nbbn", "ptxcheck"], env=env,
                          capture_output=True, text=True, timeout=900)
    try:
        rep = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"ptxcheck printed no JSON (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    rep["rc"] = proc.returncode
    return rep


def _rows(report, **match):
    return [r for r in report["results"] if all(r[k] == v for k, v in match.items())]


def test_every_kernel_compiles_for_cc80_and_cc90(report):
    failures = [f"{r['kernel']} {r['dtype']} cc{r['cc']}: {r['error']}"
                for r in report["results"] if not r["ok"]]
    assert not failures, "\n".join(failures)
    assert not report["unlisted"], f"@cuda.jit kernels missing from KERNELS: {report['unlisted']}"
    # {float32, float64, float16, bfloat16} × {8.0, 9.0} each
    assert len(report["results"]) == 8 * report["kernels"]
    assert {r["dtype"] for r in report["results"]} == {"float32", "float64", "float16",
                                                       "bfloat16"}
    assert report["ok"] and report["rc"] == 0


def test_ptx_has_the_intended_instructions(report):
    """1-D block reductions use warp shuffles, the v2 kernels take tickets and read partials
    through L2, the elementwise passes of float32 and half x do no float64 arithmetic, and no
    kernel calls out of line or touches local memory (bfloat16 included: its conversions are
    integer shifts, not numba-cuda's shim calls)."""
    by_kernel = {r["kernel"] for r in report["results"]}
    for name in by_kernel:
        for dtype in ("float32", "float64", "float16", "bfloat16"):
            rows = _rows(report, kernel=name, dtype=dtype, cc="9.0")
            assert rows and rows[0]["ok"], (name, dtype)
            facts = rows[0]
            if name.startswith("nchw_") and ("partial" in name or "ticket" in name):
                assert facts["shfl"], name
            if "ticket" in name:
                assert facts["atomics"] and facts["ld_global_cg"], name
            if name.endswith(("normalize", "_dx")):
                assert not facts["atomics"], name
                if dtype != "float64":
                    assert facts["fp64_ops"] == facts["fp64_compares"] == 0, (name, dtype)
            assert not facts["local_memory"] and not facts["calls"], (name, dtype)


@pytest.fixture(scope="module")
def ptxas_report():
    """Registers and spills from ptxas for sm_90 (float32, float64, bfloat16)."""
    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed (pip install 'nbbn[cuda]')")
    from nbbn.cuda.ptxcheck import find_ptxas

    if find_ptxas() is None:
        pytest.skip("ptxas not found (PATH, CUDA_HOME, /usr/local/cuda/bin)")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    proc = subprocess.run([sys.executable, "-m", "nbbn", "ptxcheck", "--ptxas", "--cc", "9.0",
                           "--dtype", "float32", "--dtype", "float64", "--dtype", "bfloat16"],
                          env=env, capture_output=True, text=True, timeout=900)
    return json.loads(proc.stdout)


def test_registers_within_launch_bounds_and_no_spills(ptxas_report):
    """Every kernel fits the 64-register bound its launch bounds promise (four blocks of 256 per
    SM, what the planner sizes one wave by) with no spills to local memory."""
    from nbbn.cuda import kernels, launch

    rows = ptxas_report["results"]
    assert rows and all(r["ok"] for r in rows), [r.get("ptxas_error") for r in rows]
    for r in rows:
        assert r["registers"] <= kernels.MAX_REGISTERS, r
        assert r["spill_stores"] == r["spill_loads"] == r["stack"] == 0, r
        assert r["blocks_per_sm_256"] >= launch.resident_blocks(256), r
