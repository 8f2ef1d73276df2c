"""Synchronized batch norm (nbbn.distributed) on real MPI processes.

The MPI tests start ``mpiexec -n K python -m tests.mpi_worker SCENARIO`` (K = 1, 2, 3 on this
machine, oversubscribed) and read what rank 0 prints; each launch has a timeout, so a hang fails
the test instead of stalling the run. They skip, saying why, when mpi4py or mpiexec is missing
(``pip install 'nbbn[mpi]'``). The merge itself is tested in-process, without MPI.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nbbn import registry, validate
from nbbn.distributed import merge_stats, mpiexec_command, rank_environment
from nbbn.tolerances import tolerance

ROOT = Path(__file__).resolve().parent.parent
#: Seconds one mpiexec launch may take (kernels are compiled before, by the warm fixture).
LAUNCH_TIMEOUT = 240

#: How close the synchronized outputs must be to single-process nbbn on the concatenated batch.
#: float32 outputs: the same up to a rounding flip (a few ulps in the norm). float64 outputs show
#: the float64 rounding of the statistics themselves, ε·κ ≈ 2e-12 at κ = 1e4 on y (both runs
#: carry it: the single process is as far from the reference), amplified in dγ = Σdy·x̂, a sum
#: that cancels.
SAME_AS_SINGLE = {"float32": 4 * float(np.finfo(np.float32).eps), "float64": 1e-10}


def _mpi_missing() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'nbbn[mpi]')"
    try:
        mpiexec_command(1)
    except FileNotFoundError as exc:
        return str(exc)
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


# ----------------------------------------------------------------------------- the merge alone


def _split_stats(x, counts):
    """Per-rank (count, mean, M2) of x's row slices, by the cpu backend's statistics code."""
    parts = registry.parts("cpu")
    means, m2s, lo = [], [], 0
    C = x.shape[1]
    for n in counts:
        if n == 0:
            means.append(np.zeros(C))
            m2s.append(np.zeros(C))
        else:
            a = validate.train_args(x[lo:lo + n], None, None, 1e-5, None, None, 0.1, None,
                                    min_m=1)
            mean, m2 = parts.stats(a)
            means.append(mean)
            m2s.append(m2)
        lo += n
    return np.array(counts, float), np.array(means), np.array(m2s)


@pytest.mark.parametrize("counts", [(5, 0, 17), (1, 1), (0, 0, 9, 0), (1, 2, 3, 4, 5, 6, 7),
                                    (300,)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_equals_the_concatenated_batch(counts, dtype):
    rng = np.random.default_rng(sum(counts))
    x = (1e4 + rng.standard_normal((sum(counts), 6))).astype(dtype)  # κ = 1e4
    n, mean, m2 = merge_stats(*_split_stats(x, counts))
    x64 = x.astype(np.float64)
    ref_mean = x64.mean(axis=0)
    ref_var = ((x64 - ref_mean) ** 2).mean(axis=0)
    assert n == sum(counts)
    # float64 rounding of data at κ = 1e4: the mean to ε·|μ|, the variance to a few ε·κ.
    assert np.max(np.abs(mean - ref_mean) / np.sqrt(ref_var)) < 1e4 * 16 * np.finfo(float).eps
    assert np.max(np.abs(m2 / n - ref_var) / ref_var) < 1e-10


def test_merge_is_deterministic_and_skips_empty_ranks():
    rng = np.random.default_rng(3)
    counts, means, m2s = np.array([3.0, 0.0, 4.0]), rng.random((3, 5)), rng.random((3, 5))
    means[1] = np.nan  # an empty rank's values are never read
    m2s[1] = np.nan
    a = merge_stats(counts, means, m2s)
    b = merge_stats(counts, means, m2s)
    assert a[0] == 7 and np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    assert np.isfinite(a[1]).all() and np.isfinite(a[2]).all()
    n, mean, m2 = merge_stats([0, 0], np.zeros((2, 3)), np.zeros((2, 3)))
    assert n == 0 and not mean.any() and not m2.any()


def test_merge_of_known_values():
    # Ranks {1, 2, 3} and {10}: union mean 4, M2 = 9 + 4 + 1 + 36 = 50.
    n, mean, m2 = merge_stats([3, 1], [[2.0], [10.0]], [[2.0], [0.0]])
    assert (n, mean[0], m2[0]) == (4.0, 4.0, 50.0)


def test_device_staging_helpers_under_the_simulator():
    """The host staging of per-channel vectors for device arrays (the CUDA simulator's arrays
    here; tests/conftest.py selects it): copy out, write back in the vector's dtype, place like
    x. No GPU path of nbbn.distributed runs on a real device yet."""
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    from numba import cuda

    from nbbn.distributed.sync import _empty_like, _like, _to_host, _write

    d = cuda.to_device(np.arange(4, dtype=np.float32))
    assert np.array_equal(_to_host(d), np.arange(4))
    _write(d, np.array([0.5, 1.5, 2.5, 3.5]))
    assert _to_host(d).dtype == np.float32 and np.array_equal(_to_host(d), [0.5, 1.5, 2.5, 3.5])
    placed = _like(np.ones(3, np.float64), on_device=True)
    assert not isinstance(placed, np.ndarray) and np.array_equal(_to_host(placed), np.ones(3))
    h = np.ones(3)
    assert _like(h, on_device=False) is h
    e = _empty_like((0, 3, 2), np.float32, None, on_device=True)
    assert tuple(e.shape) == (0, 3, 2)


# ---------------------------------------------------------------------------- real processes


@pytest.fixture(scope="module")
def warm_kernels():
    """Compile the cpu kernels the workers use once, here (Numba caches them on disk), so the
    ranks load them instead of all compiling at once."""
    from tests import mpi_worker

    mpi_worker.warm()


def _launch(n: int, scenario: str, env: dict | None = None) -> list[dict]:
    cmd = mpiexec_command(n) + [sys.executable, "-m", "tests.mpi_worker", scenario]
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**rank_environment(1), **(env or {})},
                            stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish in {LAUNCH_TIMEOUT} s (a hang?); "
                    f"output:\n{out[-3000:]}")
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-3000:]}"
    return [json.loads(line[len("RESULT "):]) for line in out.splitlines()
            if line.startswith("RESULT ")]


def _check_agree(ranks, results):
    from tests.mpi_worker import COUNTS, LAYOUTS

    # Every (counts, layout) in float32 and two layouts in float64.
    assert len(results) == len(COUNTS[ranks]) * len(LAYOUTS) + 2
    problems = []
    for r in results:
        where = f"{r['layout']} counts {r['counts']} {r['dtype']}"
        if not r["identical"]:
            problems.append(f"{where}: per-channel outputs differ between ranks")
        if not r["shapes_ok"] or not r["layout_kept"]:
            problems.append(f"{where}: y/dx shape or memory layout differs from x's")
        for name, err in r["vs_single"].items():
            if not err <= SAME_AS_SINGLE[r["dtype"]]:
                problems.append(f"{where}: {name} differs from single-process nbbn by {err:.3g}")
        for name, err in r["vs_reference"].items():
            # running statistics are float32 (updated in their own dtype), whatever x's is
            if not err <= tolerance(name, "float32" if name.startswith("running") else r["dtype"]):
                problems.append(f"{where}: {name} rel_err {err:.3g} against the reference")
    assert not problems, "\n".join(problems)
    assert {tuple(r["counts"]) for r in results} == set(COUNTS[ranks])


#: The fast tier's MPI tests share one launch at this many ranks, running every scenario they
#: check (each rank process costs seconds: imports, loading the kernels); the exhaustive tier
#: launches 1-4 ranks per scenario.
FAST_RANKS = 3


@pytest.fixture(scope="module")
def fast_launch(warm_kernels) -> dict[str, list[dict]]:
    """The results of one ``mpiexec -n FAST_RANKS`` run of the agree, errors and traffic
    scenarios, by scenario."""
    by: dict[str, list[dict]] = {}
    for r in _launch(FAST_RANKS, "agree,errors,traffic"):
        by.setdefault(r["scenario"], []).append(r)
    return by


@needs_mpi
def test_synchronized_equals_single_process(fast_launch):
    """The default method (one exact Allreduce) at FAST_RANKS ranks."""
    _check_agree(FAST_RANKS, fast_launch["agree"])


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("scenario", ["agree", "agree-allgather"])
@pytest.mark.parametrize("ranks", [1, 2, 3, 4])
def test_synchronized_equals_single_process_every_count(ranks, scenario, warm_kernels):
    """Both methods at 1-4 ranks: uneven and empty slices, every layout, float32 at κ = 1e4 and
    float64."""
    _check_agree(ranks, _launch(ranks, scenario))


#: Open MPI's tuned allreduce algorithms forced for the tree-independence test (ompi_info:
#: 1 basic linear, 2 nonoverlapping, 3 recursive doubling, 4 ring, 5 segmented ring,
#: 6 rabenseifner).
ALGORITHMS = (1, 3, 4)


@needs_mpi
@pytest.mark.slow
@pytest.mark.parametrize("ranks", [3, 4])
def test_bit_identical_under_different_reduction_algorithms(ranks, warm_kernels):
    """The same ranks and data split, each Open MPI allreduce algorithm forced through the MCA
    parameters: every per-channel output (save_mean, save_invstd, running statistics, dγ, dβ)
    has the same bits, and each run still agrees with single-process nbbn."""
    bits = {}
    for alg in ALGORITHMS:
        env = {"OMPI_MCA_coll_tuned_use_dynamic_rules": "1",
               "OMPI_MCA_coll_tuned_allreduce_algorithm": str(alg)}
        results = _launch(ranks, "agree", env)
        _check_agree(ranks, results)
        bits[alg] = {(r["layout"], tuple(r["counts"]), r["dtype"]): r["bits"] for r in results}
    first = bits[ALGORITHMS[0]]
    for alg in ALGORITHMS[1:]:
        differ = [k for k in first if bits[alg][k] != first[k]]
        assert not differ, f"algorithm {alg} gave other bits than {ALGORITHMS[0]}: {differ}"


@needs_mpi
def test_bytes_per_rank_follow_the_design(fast_launch):
    """The traffic scenario at FAST_RANKS ranks: each collective's bytes as the formulas of
    :func:`_check_traffic` say (P appears only in the Allgather's)."""
    _check_traffic({(r["method"], FAST_RANKS): r["per_rank"] for r in fast_launch["traffic"]},
                   (FAST_RANKS,))


@needs_mpi
@pytest.mark.slow
def test_bytes_per_rank_do_not_grow_with_the_ranks(warm_kernels):
    """The traffic scenario at 1, 2 and 4 ranks: the exact Allreduce's bytes per rank stay the
    same as P grows, the Allgather design's grow."""
    seen = {}
    for ranks in (1, 2, 4):
        for r in _launch(ranks, "traffic"):
            seen[(r["method"], ranks)] = r["per_rank"]
    _check_traffic(seen, (1, 2, 4))


def _check_traffic(seen: dict, counts: tuple[int, ...]) -> None:
    """Counts the bytes each collective moves on each rank (nbbn.distributed.wire.TRAFFIC) for
    one forward and one backward, C = 64: the exact Allreduce moves the same bytes whatever P
    (one collective per call); the Allgather design receives P times its partials (two
    collectives per call)."""
    from nbbn.distributed import exact, wire

    C = 64
    for ranks in counts:
        new = seen[("allreduce", ranks)]
        old = seen[("allgather", ranks)]
        assert len(new) == ranks and len(old) == ranks
        for mine in new:
            for call in ("forward", "backward"):
                assert [c[0] for c in mine[call]] == ["Allreduce"]  # one collective per call
            # capacity = 3·C rows (the backward's), shared by both calls, + the header rows
            rows = wire.NH + 3 * C
            assert mine["forward"][0][1:] == mine["backward"][0][1:] == [rows * exact.ROW * 8] * 2
        for mine in old:
            assert [c[0] for c in mine["forward"]] == ["Allgather", "Allgather"]
            assert [c[0] for c in mine["backward"]] == ["Allgather", "Allreduce"]
            header = len(wire.FIELDS) * 8
            assert mine["forward"][0][1:] == [header, ranks * header]
            assert mine["forward"][1][1:] == [2 * C * 8, ranks * 2 * C * 8]
            assert mine["backward"][1][1:] == [3 * C * 8, 3 * C * 8]
    per_rank_new = [seen[("allreduce", p)][0]["forward"][0][2] for p in counts]
    per_rank_old = [sum(c[2] for c in seen[("allgather", p)][0]["forward"]) for p in counts]
    assert len(set(per_rank_new)) == 1
    assert per_rank_old == sorted(set(per_rank_old))  # strictly growing with P


@needs_mpi
def test_errors_raise_the_same_exception_on_every_rank(fast_launch):
    by_case = {r["case"]: r for r in fast_launch["errors"]}
    from tests.mpi_worker import _error_cases

    assert set(by_case) == set(_error_cases(0)) | {"good call afterwards"}
    problems = []
    for name, r in by_case.items():
        if name == "good call afterwards":
            if not r["identical"]:
                problems.append("a good call after the errors gave different results per rank")
            continue
        raised = r["raised"]
        if any(got is None for got in raised):
            problems.append(f"{name}: ranks {[i for i, g in enumerate(raised) if g is None]} "
                            "did not raise")
            continue
        if any(got != raised[0] for got in raised):
            problems.append(f"{name}: the ranks raised different exceptions: {raised}")
        kind, message = raised[0]
        if kind != r["expect"]:
            problems.append(f"{name}: raised {kind}, expected {r['expect']}: {message}")
        missing = [w for w in r["words"] if w not in message]
        if missing:
            problems.append(f"{name}: message lacks {missing}: {message}")
    assert not problems, "\n".join(problems)


@pytest.mark.slow  # a subprocess CLI that starts mpiexec twice
@needs_mpi
def test_bench_quick_runs(tmp_path, warm_kernels):
    """The benchmark entry point end to end (tiny shapes; its figures here mean nothing)."""
    out = tmp_path / "d.md"
    proc = subprocess.run([sys.executable, "-m", "nbbn", "distributed", "bench", "--quick",
                           "--ranks", "2", "--out", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import pandas as pd

    df = pd.read_csv(tmp_path / "d.csv")
    assert not (tmp_path / "d.rows.jsonl").exists()  # the row log is gone once the report is
    assert len(df) == 2 * 2  # shapes × ops
    assert set(df["ranks"]) == {2} and set(df["op"]) == {"forward-train", "backward"}
    assert (df["sync_us_p50"] > 0).all() and (df["exchange_us_p50"] > 0).all()
    assert "overhead" in out.read_text()


# ------------------------------------------------------------------ accuracy study, part (d)


def test_study_part_d_small_run():
    from nbbn.accuracy.across_ranks import DistributedConfig, findings, run_part

    cfg = DistributedConfig(ranks=[1, 4], per_rank=[2, 16], replicates=256, channels=16,
                            variances=[1.0, 1e-10, 1e-14])
    steps = []
    t = run_part(cfg, steps.append)
    assert sum(steps) == cfg.n_configs()
    rk = t["distributed_ranks"]
    # K = 1: synchronized is local; K = 4: the mean's RMSE is about half the local one.
    one, four = rk[rk["ranks"] == 1], rk[rk["ranks"] == 4]
    assert np.allclose(one["mean_rmse_local"], one["mean_rmse_sync"])
    assert (one["y_rms_local_vs_sync"] == 0).all()
    ratio = four["mean_rmse_sync"] / four["mean_rmse_local"]
    assert ratio.between(0.35, 0.65).all(), ratio
    pm = t["distributed_pmean"]
    nb = pm[pm["method"].str.startswith("nbbn")]
    assert nb["var_rel_err_max"].max() < 1e-10 and nb["mean_err_in_sd_max"].max() < 1e-10
    skewed = pm[pm["pattern"].str.startswith("skewed") & (pm["kappa"] == 1)
                & pm["method"].str.startswith("pmean two-pass")]
    assert (skewed["var_rel_err_median"] > 1e-3).all()  # equal weights: a real error
    empty = pm[pm["pattern"].str.startswith("one empty") & pm["method"].str.contains("equal")]
    assert np.isinf(empty["var_rel_err_max"]).all()
    iv = t["distributed_invstd"].set_index(["var", "method"])
    torch_like = "(mean, invstd, count), float32 (PyTorch SyncBatchNorm)"
    nbbn_m = "nbbn (count, mean, M2), float64"
    assert iv.loc[(1e-10, torch_like), "var_rel_err_median"] > 1e-4
    assert iv.loc[(1e-14, torch_like), "var_nonpositive_frac"] > 0.5
    assert iv.xs(nbbn_m, level="method")["var_rel_err_max"].max() < 1e-13
    assert len(findings(t)) >= 5


# ------------------------------------------------------- the exact rows (nbbn.distributed.exact)


def _tree(rows, rng):
    """Combine a list of row arrays in a random order and a random grouping."""
    from nbbn.distributed import exact

    items = [r.copy() for r in rows]
    while len(items) > 1:
        i, j = sorted(rng.choice(len(items), 2, replace=False))
        b = items.pop(j)
        a = items.pop(i)
        out = b.copy()
        exact.combine_rows(a, b, out)
        items.append(out)
    return items[0]


def test_exact_rows_are_tree_independent_and_exact():
    from fractions import Fraction

    from nbbn.distributed import exact

    rng = np.random.default_rng(7)
    P, R = 9, 40
    # magnitudes over 60 decades, signs mixed, zeros, subnormals: every rank's partials
    v = rng.standard_normal((P, R)) * 10.0 ** rng.integers(-30, 30, (P, R))
    v[:, 0] = 0.0
    v[3, 1] = 5e-320
    v[:, 2] = [1e16, 1.0, -1e16, 3.0, 0.0, 0.0, 0.0, 0.0, 0.0]  # cancels to 4 exactly
    rows = [exact.deposit(v[p:p + 1]) for p in range(P)]
    results = [_tree(rows, np.random.default_rng(s)) for s in range(6)]
    assert all(np.array_equal(r, results[0]) for r in results)
    # segments: MPI may apply the op to any run of whole rows
    seg = rows[0].copy()
    for p in range(1, P):
        for lo in range(0, R, 7):
            exact.combine_rows(rows[p][lo:lo + 7], seg[lo:lo + 7], seg[lo:lo + 7])
    assert np.array_equal(seg, results[0])
    got = exact.to_float(results[0])
    want = np.array([float(sum(Fraction(float(a)) for a in v[:, r])) for r in range(R)])
    assert got[2] == 4.0
    # Exact within the window: |error| ≤ P·3·2^(-32·(K−1)) of the largest partial, so the
    # result is the correctly rounded sum up to that (far below one ulp here).
    big = np.abs(v).max(axis=0)
    assert (np.abs(got - want) <= np.abs(want) * np.finfo(float).eps / 2
            + P * 3 * 2.0 ** (-32 * (exact.K - 1)) * big).all()


def test_exact_rows_non_finite_and_empty():
    from nbbn.distributed import exact

    a = exact.deposit(np.array([[1.0, np.nan, 0.0]]))
    b = exact.deposit(np.array([[2.0, 5.0, 0.0]]))
    out = b.copy()
    exact.combine_rows(a, b, out)
    got = exact.to_float(out)
    assert got[0] == 3.0 and np.isnan(got[1]) and got[2] == 0.0


def _awkward_floats(rng, shape):
    """float64 over the whole range: 60% random magnitudes 1e-320 … 1e308 (subnormals
    included), the rest ±0, the extreme normals and subnormals, powers of two, NaN, ±inf."""
    v = rng.standard_normal(shape) * 10.0 ** rng.integers(-320, 308, shape)
    special = np.array([0.0, -0.0, 5e-324, -5e-324, 2.2250738585072014e-308,
                        2.225073858507201e-308, -1.7976931348623157e308, 1.7976931348623157e308,
                        1.0, -2.0 ** 1023, 2.0 ** -1022, 3.0, np.nan, np.inf, -np.inf])
    pick = rng.random(shape) < 0.4
    v[pick] = rng.choice(special, pick.sum())
    return v


def _rows_from_ints(items, rng):
    """Rows [idx, limbs] holding I·2^(32·(idx − K + 1) − BIAS) for (idx, I) pairs, |I| < 2^158,
    with the limbs left unnormalized (a random carry moved between each pair of limbs)."""
    from nbbn.distributed import exact

    rows = np.zeros((len(items), exact.ROW), np.int64)
    for r, (idx, i) in enumerate(items):
        mag = abs(i)
        limbs = [mag >> 96] + [(mag >> (32 * k)) & 0xFFFFFFFF for k in (2, 1, 0)]
        for k in range(3, 0, -1):
            t = int(rng.integers(-2 ** 20, 2 ** 20))
            limbs[k] += t << 32
            limbs[k - 1] -= t
        rows[r] = [idx] + [-limb if i < 0 else limb for limb in limbs]
    return rows


def _same_bits(a, b) -> bool:
    return np.array_equal(np.asarray(a, np.float64).view(np.int64),
                          np.asarray(b, np.float64).view(np.int64))


def test_compiled_exact_rows_match_the_reference():
    """The Numba kernels (deposit, forward_rows, combine_rows, to_float, mean_var) give the bits
    of the NumPy / Python-integer references on awkward inputs: subnormals, ±0, 600 decades,
    NaN/±inf, header rows (idx = any int64), exact ties, overflow to ±inf, sums that cancel to
    zero or below it, counts on both sides of 2^16 and 2^32."""
    from nbbn.distributed import exact

    rng = np.random.default_rng(2025)
    for T in (1, 2, 5):
        v = _awkward_floats(rng, (T, 500))
        assert np.array_equal(exact.deposit(v), exact.deposit_reference(v)), T
    for count in (0, 1, 7, 3 ** 30):
        mean, m2 = _awkward_floats(rng, (2, 300))
        with np.errstate(all="ignore"):
            s1, s2 = exact.forward_terms(count, mean, m2)
        ref = np.concatenate([exact.deposit_reference(s1), exact.deposit_reference(s2)])
        assert np.array_equal(exact.forward_rows(count, mean, m2), ref), count

    # raw rows: idx over the grid and past it (overflow), limbs up to ±2^62, header rows
    R = 600
    raw = np.zeros((R, exact.ROW), np.int64)
    raw[:, 0] = rng.integers(-1, 80, R)
    raw[:, 1:] = (rng.integers(-2 ** 31, 2 ** 31, (R, exact.K))
                  << rng.integers(0, 32, (R, exact.K)))
    raw[::9, 1:] = 0
    raw[5::17, 0] = exact.NONFINITE
    header = np.zeros((40, exact.ROW), np.int64)
    header[:, 0] = np.concatenate([rng.integers(-2 ** 63, 2 ** 63 - 1, 20, dtype=np.int64),
                                   rng.normal(size=20).view(np.int64)])
    header[::4, 1] = rng.integers(0, 1000, 10)
    deposited = exact.deposit(_awkward_floats(rng, (3, R + 40)))
    a = np.concatenate([raw, header])
    b = np.concatenate([deposited[:R], header[::-1]])
    for out_is in ("new", "a", "b"):
        want = np.empty_like(a)
        exact.combine_rows_reference(a, b, want)
        x, y = a.copy(), b.copy()
        out = {"new": np.empty_like(a), "a": x, "b": y}[out_is]
        exact.combine_rows(x, y, out)
        assert np.array_equal(out, want), out_is

    # ties (54 significant bits ending in 1), normal and subnormal, both signs
    ties = []
    for _ in range(200):
        idx = int(rng.integers(1, 70))
        top = int(rng.integers(54, 150))
        i = ((1 << 53) + 2 * int(rng.integers(0, 2 ** 52)) + 1) << (top - 54)
        ties.append((idx, -i if rng.random() < 0.5 else i))
    for idx in (2, 3, 4):  # subnormal results, ties at odd multiples of 2^−1075
        for _ in range(20):
            e = 32 * (idx - exact.K + 1) - exact.BIAS
            i = (2 * int(rng.integers(0, 2 ** 40)) + 1) << (-1075 - e)
            ties.append((idx, i))
    ties = _rows_from_ints(ties, rng)
    for rows in (raw, deposited, ties):
        got, want = exact.to_float(rows), exact.to_float_reference(rows)
        assert _same_bits(got, want)
    assert np.isinf(exact.to_float(raw)).any()  # the overflow path ran

    # (S1, S2) pairs: random rows, ranks' real terms, exact cancellation, tiny negatives
    s1_rows, s2_rows = raw[:300], raw[300:600]
    rank_rows = [exact.forward_rows(n_r, 1e4 + rng.standard_normal(8), rng.random(8))
                 for n_r in (5, 17, 1, 300)]
    real = _tree(rank_rows, rng)
    # S2 = S1²/n exactly, n = 3: S1 = 21·2^e1, S2 = 147·2^(2·e1) as I2·2^e2, e2 ≤ 2·e1
    e1 = 32 * (40 - exact.K + 1) - exact.BIAS
    idx2 = (2 * e1 + exact.BIAS) // 32 + exact.K - 1
    e2 = 32 * (idx2 - exact.K + 1) - exact.BIAS
    zero_var = _rows_from_ints([(40, 21), (idx2, 147 << (2 * e1 - e2))], rng)
    # S1 tiny, S2 = 0, and S1 = 0, S2 tiny negative: a negative numerator whose quotient
    # underflows
    tiny_neg = _rows_from_ints([(0, 12345), (-1, 0), (-1, 0), (0, -(1 << 90))], rng)
    cases = [(s1_rows, s2_rows), (real[:8], real[8:]), (zero_var[:1], zero_var[1:]),
             (tiny_neg[:2], tiny_neg[2:])]
    assert exact.mean_var(zero_var[:1], zero_var[1:], 3)[1][0] == 0.0
    for n in (1, 2, 3, 255, 65535, 65536, 2 ** 31 + 1, 2 ** 32 - 1, 2 ** 32 + 3):
        for r1, r2 in cases:
            got, want = exact.mean_var(r1, r2, n), exact.mean_var_reference(r1, r2, n)
            assert _same_bits(got[0], want[0]) and _same_bits(got[1], want[1]), n
    mean, var = exact.mean_var(tiny_neg[:2], tiny_neg[2:], 3)
    assert (var == 0.0).all() and np.signbit(var).all()  # max(−0.0, 0.0) is −0.0 in Python


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_exact_statistics_against_chan_merge(dtype):
    """The exact combine's (μ, σ²) against the rational truth of the ranks' rounded partials
    and against the float64 Chan merge, at κ = 1e4, uneven and empty slices: the exact combine
    is the correctly rounded value of the merged statistics (≤ ½ ulp); Chan's differs by its own
    float64 rounding."""
    from fractions import Fraction

    from nbbn.distributed import exact

    counts = (5, 0, 17, 1, 300)
    rng = np.random.default_rng(11)
    x = (1e4 + rng.standard_normal((sum(counts), 6))).astype(dtype)
    cnt, means, m2s = _split_stats(x, counts)
    rows1, rows2 = [], []
    for n_r, mu, m2 in zip(cnt, means, m2s, strict=True):
        s1, s2 = exact.forward_terms(int(n_r), mu, m2)
        rows1.append(exact.deposit(s1))
        rows2.append(exact.deposit(s2))
    r = np.random.default_rng(0)
    n = int(sum(counts))
    mean, var = exact.mean_var(_tree(rows1, r), _tree(rows2, r), n)
    for c in range(6):
        s1 = sum(Fraction(int(k)) * Fraction(float(m)) for k, m in zip(cnt, means[:, c],
                                                                        strict=True))
        s2 = sum(Fraction(float(m2)) + Fraction(int(k)) * Fraction(float(m)) ** 2
                 for k, m, m2 in zip(cnt, means[:, c], m2s[:, c], strict=True))
        true_mean = s1 / n
        true_var = (s2 - s1 * s1 / n) / n
        assert mean[c] == float(true_mean)
        assert abs(Fraction(var[c]) - true_var) <= abs(true_var) * Fraction(2) ** -53
    n_c, mean_c, m2_c = merge_stats(cnt, means, m2s)
    # both are the statistics of the concatenated batch to float64 rounding
    assert np.max(np.abs(mean - mean_c) / np.sqrt(var)) < 1e-10
    assert np.max(np.abs(var - m2_c / n_c) / var) < 1e-10


# ------------------------------------------------------------------------ the cost model


def test_costmodel_fit_recovers_synthetic_parameters():
    """Times made by the model itself (known t0, α, β per family, 3% multiplicative noise) at
    1-8 ranks and five sizes: the NNLS fit gives the parameters back."""
    import pandas as pd

    from nbbn.distributed import costmodel as cm

    rng = np.random.default_rng(5)
    truth = {"allgather": {"t0": 4e-6, "alpha": 3e-6, "beta": 2e-10},
             "allreduce": {"t0": 5e-6, "alpha": 6e-6, "beta": 5e-10},
             "allreduce_exact": {"t0": 9e-6, "alpha": 8e-6, "beta": 1e-9}}
    rows = []
    for family, p in truth.items():
        for P in range(1, 9):
            for m in cm.DEFAULT_SIZES:
                t = float(cm.model_time(family, p, P, m)) * (1 + 0.03 * rng.standard_normal())
                rows.append({"family": family, "ranks": P, "bytes": m, "time_s": t})
    fits = cm.fit(pd.DataFrame(rows))
    for family, p in truth.items():
        for k in ("t0", "alpha", "beta"):
            assert abs(fits[family][k] - p[k]) <= 0.15 * p[k], (family, k, fits[family], p)
        assert fits[family]["rms_rel"] < 0.06


def test_costmodel_extrapolation():
    from nbbn.distributed import costmodel as cm
    from nbbn.distributed import exact, wire

    assert len(cm.RESNET50_BN) == 53 and sum(cm.RESNET50_BN) == 26560
    ext = cm.extrapolate(cm.INTERCONNECTS, gamma=0.0)
    assert len(ext) == len(cm.INTERCONNECTS) * len(cm.P_EXTRAPOLATE) * len(cm.DESIGNS)
    by = {(r["interconnect"], r["ranks"], r["design"]): r for r in ext}
    net = "InfiniBand NDR 400 Gb/s"
    old, new = "nbbn allgather (first design)", "nbbn exact allreduce"
    # bytes per rank: the allgather designs grow ~P, the exact allreduce is bounded
    assert by[(net, 4096, old)]["mib_per_rank_per_step"] > 400 * by[(net, 8, old)][
        "mib_per_rank_per_step"]
    assert by[(net, 4096, new)]["mib_per_rank_per_step"] < 2 * by[(net, 8, new)][
        "mib_per_rank_per_step"]
    # the old design's bytes at P = 1024: (P − 1)·16·ΣC received in the forward
    fwd = 1023 * 16 * sum(cm.RESNET50_BN)
    assert by[(net, 1024, old)]["mib_per_rank_per_step"] * 2 ** 20 > fwd
    # collectives per step: 53 layers × (2 + 2) for the first design, 53 × 2 for the exact
    assert by[(net, 8, old)]["collectives_per_step"] == 4 * 53
    assert by[(net, 8, new)]["collectives_per_step"] == 2 * 53
    # one exact call's bytes by hand: (NH + 3C) rows of ROW int64
    assert cm.design_collectives(new, 64, "forward") == [
        ("allreduce_exact", (wire.NH + 192) * exact.ROW * 8)]
    # with α, β alone the exact allreduce beats the first design at 4096 ranks
    assert by[(net, 4096, new)]["step_ms"] < by[(net, 4096, old)]["step_ms"]


@needs_mpi
@pytest.mark.slow
def test_costmodel_quick_runs(tmp_path, warm_kernels):
    proc = subprocess.run([sys.executable, "-m", "nbbn", "distributed", "costmodel", "--quick",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in ("measured.csv", "fit.csv", "extrapolation.csv", "costmodel.md",
                 "costmodel.png"):
        assert (tmp_path / name).exists(), name
    assert "shared cores" in (tmp_path / "costmodel.md").read_text()
