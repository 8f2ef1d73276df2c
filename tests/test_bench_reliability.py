"""The bench's reliability machinery: trials and their intervals, variance components, compare's
rule, the limit, the A/B backend and the peers (ONNX Runtime, JAX). Machinery only: tiny shapes,
tiny budgets, and synthetic data where a statistical property is checked; no wall-clock
assertion anywhere."""

from __future__ import annotations

import importlib.util
import json
import time

import numpy as np
import pandas as pd
import pytest

from nbbn.bench import baselines, limits, roofline, stats
from nbbn.bench.compare import compare, label_change
from nbbn.bench.report import tidy
from nbbn.bench.run import FULL, QUICK, RunBudget, estimate_seconds, make_sweep, run
from nbbn.bench.runner import SCHEMA
from nbbn.bench.sweep import make_plan
from nbbn.spec import Fusion, Op

FAST = {"isolate": "none", "warmup": 0, "min_rounds": 3, "max_time": 0.01, "trial_time": 0.0,
        "bootstrap": 200, "plots": False, "progress": False, "echo": lambda s: None}


# --------------------------------------------------------------------------------- synthetic


def _trials(rng, mu, n_trials, rounds, sd_trial, sd_round):
    """Blocks of (rounds, 2) times whose per-round log ratio is mu + trial + round noise."""
    out = []
    for _ in range(n_trials):
        b = mu + rng.normal(0, sd_trial)
        T = np.ones((rounds, 2))
        T[:, 0] = np.exp(b + rng.normal(0, sd_round, rounds))
        out.append(T)
    return out


def test_trial_interval_covers_with_a_known_between_trial_variance():
    """The expanded two-level bootstrap holds ~95% where the trials vary (sd 5%, rounds 2%);
    the round-only bootstrap of round 2 does not (it only sees the rounds)."""
    rng = np.random.default_rng(21)
    hits = old = 0
    n = 300
    for _ in range(n):
        blocks = _trials(rng, 0.0, 5, 20, 0.05, 0.02)
        iv = stats.trial_ratio(blocks, 0, 1, rng, 300)
        hits += iv.lo <= 1.0 <= iv.hi
        pooled = stats.paired_ratio(np.vstack(blocks), 0, 1, rng, 300)
        old += pooled.lo <= 1.0 <= pooled.hi
    assert 0.90 <= hits / n <= 0.995
    assert old / n < 0.6


def _process_trials(rng, mu, n_procs, per_proc, rounds, sd_proc, sd_trial, sd_round):
    """Blocks and their process labels: log ratio = mu + process + trial + round noise."""
    blocks, units = [], []
    for p in range(n_procs):
        a = mu + rng.normal(0, sd_proc)
        blocks += _trials(rng, a, per_proc, rounds, sd_trial, sd_round)
        units += [p] * per_proc
    return blocks, units


def test_process_level_interval_covers_where_processes_vary():
    """Trials in 4 worker processes that each shift the ratio (sd 4%, trials 2%, rounds 10%,
    roughly this host's study): with the process as the top level the interval holds ~95%;
    treating the 8 trials as independent (the in-process design) does not."""
    rng = np.random.default_rng(2013)
    hits = flat = 0
    n = 300
    widths = []
    for _ in range(n):
        blocks, units = _process_trials(rng, 0.0, 4, 2, 30, 0.04, 0.02, 0.10)
        iv = stats.trial_ratio(blocks, 0, 1, rng, 300, units=units)
        hits += iv.lo <= 1.0 <= iv.hi
        widths.append(iv.half_width_rel)
        naive = stats.trial_ratio(blocks, 0, 1, rng, 300)
        flat += naive.lo <= 1.0 <= naive.hi
    assert 0.90 <= hits / n <= 0.995
    assert flat / n < hits / n - 0.05
    assert np.median(widths) < 0.10  # and not useless: ±10% at most for sd 4% over 4 processes


def test_process_units_with_one_process_fall_back_to_the_trials():
    blocks, units = _process_trials(np.random.default_rng(5), 0.1, 1, 4, 10, 0.05, 0.03, 0.02)
    a = stats.trial_ratio(blocks, 0, 1, np.random.default_rng(7), 300)
    b = stats.trial_ratio(blocks, 0, 1, np.random.default_rng(7), 300, units=units)
    assert a == b
    assert np.isnan(stats.process_spread(blocks, 0, 1, units))
    blocks, units = _process_trials(np.random.default_rng(5), 0.1, 3, 2, 10, 0.05, 0.01, 0.02)
    assert stats.process_spread(blocks, 0, 1, units) > 0


def test_trial_interval_is_seeded_and_deterministic():
    blocks = _trials(np.random.default_rng(1), 0.1, 4, 10, 0.03, 0.02)
    a = stats.trial_ratio(blocks, 0, 1, np.random.default_rng(7), 300)
    b = stats.trial_ratio(blocks, 0, 1, np.random.default_rng(7), 300)
    assert a == b and a.lo < a.median < a.hi
    between, within = stats.trial_spread(blocks, 0, 1)
    assert between > 0 and within > 0
    assert stats.expansion(1) == 1.0 and stats.expansion(2) > stats.expansion(10) > 1.0


def test_variance_components_recover_known_levels():
    rng = np.random.default_rng(3)
    vals, ids = [], []
    for r in range(10):
        a = rng.normal(0, 0.03)
        for p in range(4):
            b = rng.normal(0, 0.04)
            for t in range(3):
                c = rng.normal(0, 0.02)
                for _ in range(25):
                    vals.append(a + b + c + rng.normal(0, 0.01))
                    ids.append((r, p, t))
    comps = stats.variance_components(np.array(vals), np.array(ids))
    sd = [np.sqrt(c["variance"]) for c in comps]
    assert [c["level"] for c in comps] == [0, 1, 2, 3]
    assert sd[0] == pytest.approx(0.03, rel=0.5)
    assert sd[1] == pytest.approx(0.04, rel=0.3)
    assert sd[2] == pytest.approx(0.02, rel=0.3)
    assert sd[3] == pytest.approx(0.01, rel=0.1)


def _rows(est, backend="cpu"):
    return tidy([{"schema": SCHEMA, "status": "ok", "backend": backend, "variant": "auto",
                  "kind": "kernel", "op": "inference", "layout": "NC", "fusion": "none",
                  "call": "kernel", "cache": "cold", "dtype": "float32", "N": n, "C": 8,
                  "H": 1, "W": 1, "speedup": 1 / v.median, "speedup_ci_lo": 1 / v.hi,
                  "speedup_ci_hi": 1 / v.lo, "time_over_copy": v.median,
                  "time_over_copy_ci_lo": v.lo, "time_over_copy_ci_hi": v.hi}
                 for n, v in enumerate(est, start=1)])


def _simulated_run(rng, mus, shift=0.0, sd_run=0.01):
    """One run: per configuration a run effect (sd_run), 8 trials (sd 3%) of 15 rounds (3%)."""
    out = []
    for mu in mus:
        blocks = _trials(rng, mu + shift + rng.normal(0, sd_run), 8, 15, 0.03, 0.03)
        out.append(stats.trial_ratio(blocks, 0, 1, rng, 200))
    return out


def test_coverage_report_expects_83pct_inside_and_95pct_agreement(tmp_path):
    """Two simulated A/A runs with correct intervals (every level inside them): the observed
    share of run 2 inside run 1's interval is near the *expected* one (~83% for equal widths,
    not 95%; the expanded two-level bootstrap errs wide, so a little more), and the runs'
    intervals agree on at least ~95% of points."""
    from nbbn.bench.variance import coverage

    rng = np.random.default_rng(83)
    mus = rng.normal(0, 0.3, 300)
    for k in (1, 2):
        d = tmp_path / f"run{k}"
        d.mkdir()
        _rows(_simulated_run(rng, mus, sd_run=0.0)).to_csv(d / "bench.csv", index=False)
    table, summ = coverage(tmp_path / "run1", tmp_path / "run2")
    assert summ["points"] == 300 and len(table) == 300
    assert 0.78 <= summ["expected_coverage"] <= 0.88
    assert summ["expected_coverage"] - 0.05 <= summ["coverage"] <= 0.97
    assert summ["agreement"] >= 0.92


def test_compare_simulated_aa_calls_nothing_and_a_15pct_slowdown_is_slower():
    rng = np.random.default_rng(2013)
    mus = rng.normal(0, 0.3, 150)  # 150 configurations, each its own true ratio
    a = _rows(_simulated_run(rng, mus))
    b = _rows(_simulated_run(rng, mus))
    slow = _rows(_simulated_run(rng, mus, shift=np.log(1.15)))
    for metric in ("copy", "baseline"):
        aa = compare(a, b, metric, margin=0.05, run_sd=0.01)["label"].value_counts()
        assert aa.get("faster", 0) == 0 and aa.get("slower", 0) == 0
        assert aa.get("same", 0) + aa.get("ambiguous", 0) == 150
        ab = compare(a, slow, metric, margin=0.05, run_sd=0.01)["label"]
        assert (ab == "slower").mean() >= 0.90
        assert (ab == "faster").sum() == 0
    # without the run-level term the same A/A pair cries wolf more often than with it
    loose = compare(a, b, "copy", margin=0.0, run_sd=0.0)["label"]
    strict = compare(a, b, "copy", margin=0.05, run_sd=0.01)["label"]
    assert loose.isin(["faster", "slower"]).sum() >= strict.isin(["faster", "slower"]).sum()


def test_label_change_rule_edges():
    # a change whose interval lies beyond the margin band
    assert label_change(1.0, 0.99, 1.01, 1.3, 1.29, 1.31, 0.05, 0.0)[0] == "slower"
    assert label_change(1.0, 0.99, 1.01, 0.7, 0.69, 0.71, 0.05, 0.0)[0] == "faster"
    # certain but smaller than the margin: same; straddling the band's edge: ambiguous
    assert label_change(1.0, 0.995, 1.005, 1.02, 1.015, 1.025, 0.05, 0.0)[0] == "same"
    assert label_change(1.0, 0.99, 1.01, 1.05, 1.04, 1.06, 0.05, 0.0)[0] == "ambiguous"
    assert label_change(1.0, 0.99, 1.01, 1.3, 1.29, 1.31, 0.05, 0.2)[0] == "ambiguous"
    assert label_change(1.0, np.nan, 1.01, 1.3, 1.29, 1.31)[0] == "no interval"


def test_compare_rename_maps_the_ab_backend_onto_the_old_one():
    base = _simulated_run(np.random.default_rng(5), np.zeros(3))
    old = _rows(base)
    new = pd.concat([_rows(base), _rows(base, backend="cpu-slowed")])
    out = compare(old, new, "copy", rename={"cpu-slowed": "cpu"})
    assert len(out) == 3 and set(out["backend"]) == {"cpu"}


# --------------------------------------------------------------------------------- the limit


def test_limit_from_reads_and_writes():
    assert roofline.read_write_bytes(Op.INFERENCE, 100, 2, 4) == (4 * (100 + 8), 400)
    assert roofline.read_write_bytes(Op.BACKWARD, 100, 2, 4) == (4 * (200 + 10), 400)
    r, w = roofline.read_write_bytes(Op.BACKWARD, 100, 2, 4, Fusion.RELU)
    assert (r, w) == (4 * (300 + 10), 800)
    copy = np.array([10.0, 12.0])
    read = np.array([6.0, 20.0])  # round 2: the read is all fork-join cost, capped at the copy
    X = 100
    inf = limits.limit_per_round(copy, read, X, X, X)
    assert inf == pytest.approx(copy)  # read x, write y: the copy
    bwd = limits.limit_per_round(copy, read, 2 * X, X, X)
    assert bwd == pytest.approx([2 * 6 + 4, 2 * 12 + 0])  # copy + read
    assert limits.limit_per_round(copy, None, 2 * X, X, X) == pytest.approx(1.5 * copy)


def test_limit_kernels_copy_and_read():
    a = np.arange(200_003, dtype=np.float32)
    b = np.empty_like(a)
    limits.prange_copy(a, b)
    assert np.array_equal(a, b)
    assert limits.prange_sum(a) == pytest.approx(float(a.astype(np.float64).sum()), rel=1e-6)
    calls = limits.host_limit_calls(a[:30].reshape(3, 10).copy(), np.empty((3, 10), a.dtype))
    assert {"copy:numpy", "copy:numba", "read:numba"} <= set(calls)


# --------------------------------------------------------------------------------- trials


def test_trials_rows_and_samples(tmp_path):
    df = run(backends="cpu,numpy", ops="inference", shapes="NC:6", batch_sizes="4",
             min_trials=3, max_trials=3, out=tmp_path, **FAST)
    assert (df["status"] == "ok").all(), df[["backend", "error"]]
    assert (df["trials"] == 3).all() and (df["processes"] == 1).all()
    assert df["limit"].str.startswith("copy:").all()
    recs = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["trial"] for r in recs] == [0, 1, 2]
    assert recs[0]["labels"][:2] == ["cpu:auto", "numpy:default"]
    assert all(len(r["times_us"][0]) == len(r["labels"]) for r in recs)
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["estimated_s"] > 0


def test_run_budget_shares_the_time_left_among_the_points_left():
    """The budget's arithmetic on a clock of our own: a roomy budget leaves --max-time alone;
    a tight one splits what is left after the remaining points' set-up; set-up measured above
    the estimate is charged to every point still to run; a spent budget gives 0 (the stopping
    rule then takes --min-trials only)."""
    plan = make_plan(make_sweep(backends="cpu,numpy", ops="inference", shapes="NC:6",
                                batch_sizes="4,8,16,32"))
    groups = [g for g in plan.groups if g.run]
    assert len(groups) == 4
    roomy = RunBudget(1000.0, FULL, plan.groups, start=0.0)
    assert roomy.point_budget(groups[0], now=0.0) == FULL.max_time
    b = RunBudget(10.0, FULL, plan.groups, start=0.0)
    setup = sum(b.setup_est.values())
    first = b.point_budget(groups[0], now=0.0)
    assert first == pytest.approx((10.0 - RunBudget.REPORT_S - setup) / 4)
    assert 0 < first < FULL.max_time
    b.done(groups[0], wall_s=first + b.setup_est[id(groups[0])] + 0.2, sampling_s=first)
    assert b.extra == [pytest.approx(0.2)]
    left = sum(b.setup_est.values()) + 3 * 0.2
    second = b.point_budget(groups[1], now=first + 1.0)
    assert second == pytest.approx((10.0 - RunBudget.REPORT_S - first - 1.0 - left) / 3)
    assert b.point_budget(groups[2], now=100.0) == 0.0


def test_budget_caps_each_points_sampling_and_is_recorded(tmp_path):
    df = run(backends="cpu,numpy", ops="inference", shapes="NC:6", batch_sizes="4,8",
             min_trials=2, max_trials=50, out=tmp_path, budget=0.001,
             **{**FAST, "max_time": 5.0})
    assert (df["status"] == "ok").all(), df[["backend", "error"]]
    assert (df["sampling_budget_s"] == 0.0).all() and (df["trials"] == 2).all()
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["budget_s"] == 0.001 and meta["wall_s"] > 0
    free = run(backends="cpu", ops="inference", shapes="NC:6", batch_sizes="4", min_trials=2,
               max_trials=2, budget=0, **FAST)
    assert (free["sampling_budget_s"] == FAST["max_time"]).all()


def test_budget_defaults_to_the_default_sweep_only():
    """No axes and no --max-time is the default sweep: 165 s; a sweep the user shaped: none."""
    from nbbn.bench.run import DEFAULT_BUDGET_S, HarnessError, run_budget

    plain = {"quick": False, "sweep": None, "shapes": None, "batch_sizes": None,
             "max_time": None}
    assert run_budget(None, **plain) == DEFAULT_BUDGET_S
    for k, v in (("quick", True), ("sweep", "cpu-targets"), ("shapes", "NC:6"),
                 ("batch_sizes", "1"), ("max_time", 1.0)):
        assert run_budget(None, **{**plain, k: v}) is None, k
    assert run_budget(0, **plain) is None and run_budget(30, **plain) == 30.0
    for bad in (float("nan"), float("inf"), -1, "x"):
        with pytest.raises(HarnessError, match="--budget"):
            run_budget(bad, **plain)


@pytest.mark.slow  # starts worker processes (~2.5 s each)
def test_isolate_process_runs_each_trial_group_in_a_new_worker(tmp_path):
    df = run(backends="numpy", ops="inference", shapes="NC:5", batch_sizes="3",
             min_trials=2, max_trials=2, out=tmp_path, **{**FAST, "isolate": "process"})
    assert (df["status"] == "ok").all(), df[["backend", "error"]]
    assert (df["trials"] == 2).all() and (df["processes"] == 2).all()
    recs = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len({r["process"] for r in recs}) == 2


@pytest.mark.slow  # two worker processes start and load the kernels (~5 s)
def test_isolate_workers_spreads_trials_over_long_lived_workers(tmp_path):
    """Trial k runs in worker k mod W; the rows say how many processes, the interval has the
    process as its top level, and two points reuse the same W workers (no start per point)."""
    df = run(backends="cpu,numpy", ops="inference", layouts="NC", shapes="NC:5",
             batch_sizes="3,4", min_trials=4, max_trials=4, workers=2, out=tmp_path,
             **{**FAST, "isolate": "workers"})
    assert (df["status"] == "ok").all(), df[["backend", "error"]]
    assert (df["trials"] == 4).all() and (df["processes"] == 2).all()
    assert df["between_process_sd_pct"].notna().all()
    recs = [json.loads(x) for x in (tmp_path / "samples.jsonl").read_text().splitlines()]
    pids = {r["process"] for r in recs}
    assert len(pids) == 2 and 0 not in pids
    by_point = {}
    for r in recs:
        by_point.setdefault(r["N"], []).append(r["process"])
    assert all(v[0] != v[1] and v[0] == v[2] for v in by_point.values())
    meta = json.loads((tmp_path / "run.json").read_text())
    assert meta["timing"]["isolate"] == "workers" and meta["timing"]["workers"] == 2


def test_default_and_quick_designs_fit_their_budgets():
    """The defaults are chosen from the plan: the default sweep's estimate stays under 3
    minutes and --quick's under 30 s (a model of the run, not a timing)."""
    full = estimate_seconds(make_plan(make_sweep()), FULL)
    quick = estimate_seconds(make_plan(make_sweep(quick=True)), QUICK)
    assert 0 < full <= 180 and 0 < quick <= 30
    assert FULL.min_trials >= 3 and FULL.max_trials > FULL.min_trials
    assert FULL.isolate == "workers" and FULL.min_trials >= FULL.workers >= 3
    assert QUICK.isolate == "none"
    quick_backends = make_sweep(quick=True).backends
    assert "onnxruntime" not in quick_backends and "jax" not in quick_backends
    assert "onnxruntime" in make_sweep().backends and "cpu" in quick_backends
    assert "jax" in make_sweep(quick=True, backends="cpu,jax").backends


# --------------------------------------------------------------------------------- backends


def test_cpu_slowed_waits_its_share_of_the_call(monkeypatch):
    clock = {"t": 0}

    def fake_ns():
        clock["t"] += 10
        return clock["t"]

    monkeypatch.setattr(time, "perf_counter_ns", fake_ns)

    def kernel(args):
        clock["t"] += 10_000
        return "out"

    call = baselines._slowed(kernel)
    assert call(None) == "out"
    # t0 = 10, t1 = 10_020: the wait ends at t1 + 0.15·10_010 (within one clock step)
    assert 10_020 + 1501 <= clock["t"] <= 10_020 + 1501 + 20


def test_cpu_slowed_is_opt_in_and_checked_like_a_backend():
    assert "cpu-slowed" not in make_sweep().backends
    df = run(backends="cpu,cpu-slowed", ops="inference,backward", shapes="NC:6",
             batch_sizes="4", min_trials=2, max_trials=2, **FAST)
    assert (df["status"] == "ok").all() and df["passed"].all()
    assert set(df["variant"]) == {"auto"}


@pytest.mark.slow  # importing onnxruntime + onnx or jax + jaxlib: 5-15 s of the fast tier
@pytest.mark.parametrize("peer,mods", [("onnxruntime", ("onnxruntime", "onnx")),
                                       ("jax", ("jax", "jaxlib"))])
def test_peer_baselines_on_tiny_shapes(peer, mods):
    missing = [m for m in mods if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed (pip install 'nbbn[peers]')")
    assert peer in make_sweep().backends  # in the default sweep when installed
    df = run(backends=f"numpy,{peer}", shapes="NC:5;NCHW:3,2,3;NHWC:3,2,3",
             batch_sizes="4", dtypes="float32,float64", min_trials=2, max_trials=2, **FAST)
    rows = df[df["backend"] == peer]
    ran = rows[rows["status"] != "skipped"]
    # JAX's float32 backward on m = 4 (dx a difference of near-equal float32 terms) may miss
    # even the baseline slack: then it is "failed" (not timed), its error reported; all else
    # must pass and be timed.
    f32_bwd = (ran["dtype"] == "float32") & (ran["op"] == "backward")
    assert (ran.loc[~f32_bwd, "status"] == "ok").all(), ran[["op", "layout", "dtype", "errors"]]
    assert ran.loc[f32_bwd, "status"].isin(["ok", "failed"]).all()
    assert (pd.to_numeric(ran.loc[f32_bwd, "rel_err"]) < 1e-3).all()
    assert set(ran["layout"]) == {"NC", "NCHW", "NHWC"}
    if peer == "onnxruntime":  # inference only: training ops skipped with their reason
        assert set(ran["op"]) == {"inference"}
        assert rows.loc[rows["status"] == "skipped", "skip_reason"].notna().all()
    else:
        assert set(ran["op"]) == {"inference", "forward-train", "backward"}
    f64 = ran[ran["dtype"] == "float64"]
    assert f64["passed"].all()


def test_rounds_call_each_callable_once_in_random_orders():
    """Every round holds each callable once; the orders vary, so every callable follows every
    other (no fixed neighbour as in a rotation); the same offset gives the same orders."""
    from nbbn.bench.devices import TimingConfig
    from nbbn.bench.runner import Runner

    class Recorder:
        def __init__(self):
            self.seen = []

        def time_sequence(self, fns):
            self.seen += [fn() for fn in fns]
            return np.ones(len(fns)) * 1e-6, []

    M, K = 4, 3
    calls = [[(lambda m=m, k=k: (m, k)) for k in range(K)] for m in range(M)]
    timing = TimingConfig(warmup=0, min_rounds=60, trial_time=0.0, min_trials=1)
    orders = []
    for _ in range(2):
        dev = Recorder()
        T, _ = Runner(timing, lambda r: None, env={})._sample(dev, calls, K, 60, offset=11)
        assert T.shape == (60, M)
        rounds = [dev.seen[r * M:(r + 1) * M] for r in range(60)]
        assert all(sorted(m for m, _ in rnd) == list(range(M)) for rnd in rounds)
        ks = [k for _, k in dev.seen]
        assert ks == [(11 + j) % K for j in range(len(ks))]  # buffer sets taken in turn
        orders.append([tuple(m for m, _ in rnd) for rnd in rounds])
        follows = {(a[0], b[0]) for rnd in rounds for a, b in zip(rnd, rnd[1:], strict=False)}
        assert follows == {(a, b) for a in range(M) for b in range(M) if a != b}
    assert orders[0] == orders[1] and len(set(orders[0])) > 5


def test_a_workers_point_data_has_the_parents_inputs():
    """A worker builds its point without the reference outputs, from the same seed: the inputs
    it times are the ones the parent checked, for every op and fusion."""
    from nbbn.bench.cases import point_data

    plan = make_plan(make_sweep(quick=True, fusions="none,relu,add-relu"))
    groups = {(g.point.op, g.point.fusion, g.point.layout): g for g in plan.groups}
    assert len(groups) >= 9
    for g in groups.values():
        a, b = point_data(g.point), point_data(g.point, reference_outputs=False)
        assert a.inputs.keys() == b.inputs.keys()
        for k in a.inputs:
            assert np.array_equal(a.inputs[k], b.inputs[k]), (g.point, k)
