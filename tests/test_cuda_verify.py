"""scripts/gpu_verify.sh rehearsed without a GPU: the plan and its budget (--dry-run), and a tiny
plan run for real under the simulator (argument handling, step selection, per-step logs, the
summary with PASS and SKIP lines)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_verify.sh"
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"


def _run(*args, env=None, timeout=60):
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def test_dry_run_plan_fits_eight_minutes():
    proc = _run("--dry-run")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for step in ("env", "pytest_gpu", "sanitize_driver", "sanitize_memcheck",
                 "sanitize_racecheck", "sanitize_synccheck", "bench"):
        assert step in out
    total = int(out.split("total budget: ")[1].split()[0])
    assert total <= 480


def test_dry_run_step_selection_and_bad_arguments():
    proc = _run("--dry-run", "--steps", "tests,bench")
    assert proc.returncode == 0 and "pytest_gpu" in proc.stdout and "sanitize" not in proc.stdout
    assert _run("--bogus").returncode == 2


def test_bench_and_sanitize_drivers_list_their_plans():
    bench = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_bench.py"), "--dry-run"],
                           capture_output=True, text=True, timeout=60)
    assert bench.returncode == 0 and "points" in bench.stdout
    assert "bfloat16" in bench.stdout and "r50-stage1" in bench.stdout
    san = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_sanitize.py"), "--list"],
                         capture_output=True, text=True, timeout=60)
    assert san.returncode == 0 and "nc-two-groups" in san.stdout


@pytest.mark.slow
@pytest.mark.skipif(not SIMULATOR, reason="rehearsal under the CUDA simulator only")
def test_tiny_plan_runs_under_the_simulator(tmp_path):
    """The sanitize steps with the driver's --quick configuration: the driver runs (PASS), the
    compute-sanitizer passes SKIP with the reason (none here) or run; logs and summary under
    OUT. The budgets are scaled 20× (BUDGET_SCALE): the simulator on a shared CI host took 20 s
    for what a GPU does in under one."""
    proc = _run("--steps", "sanitize", timeout=600,
                env={"OUT": str(tmp_path), "PYTHON": sys.executable, "SANITIZE_ARGS": "--quick",
                     "NBBN_VERIFY_SIMULATOR": "1", "NUMBA_ENABLE_CUDASIM": "1",
                     "BUDGET_SCALE": "20",
                     "PATH": "/usr/bin:/bin"})
    summary = (tmp_path / "summary.txt").read_text()
    assert "sanitize_driver" in summary and "PASS" in summary.splitlines()[0], proc.stdout
    assert (tmp_path / "sanitize_driver.log").exists() and (tmp_path / "verify.log").exists()
    assert "0 failure(s)" in (tmp_path / "sanitize_driver.log").read_text()
    assert summary.count("SKIP") == 3 and "compute-sanitizer not found" in summary
    assert proc.returncode == 0
