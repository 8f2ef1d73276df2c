"""The benchmark harness below the CLI, driven through its Python entry point on tiny sweeps:
shapes and the plan, the variant axis, the case table (data, chunked reference, buffer sets),
the paired statistics, the bytes model, rows and their intervals, compare's labels, reports."""

from __future__ import annotations

import importlib.util
import os
import time

import numpy as np
import pandas as pd
import pytest

from nbbn import output, reference, registry, validate
from nbbn.bench import HarnessError, baselines, cases, devices, roofline, run, stats
from nbbn.bench.compare import compare, label_change, load_results
from nbbn.bench.report import summary_markdown, tidy
from nbbn.bench.runner import COLUMN_DOCS, COLUMNS, SCHEMA
from nbbn.bench.sweep import (
    NAMED_SWEEPS,
    PRESETS,
    RESNET50,
    Point,
    ShapeSpec,
    Sweep,
    SweepError,
    make_plan,
    parse_int_list,
    parse_shapes,
    points_from,
)
from nbbn.output import RowLog, read_rows
from nbbn.registry import BackendInfo, KernelSpec
from nbbn.seeds import rng_for
from nbbn.spec import Fusion, Layout, Op
from nbbn.tolerances import tolerance

NUMPY_FNS = {Op.FORWARD_TRAIN: baselines.np_forward_train, Op.BACKWARD: baselines.np_backward,
             Op.INFERENCE: baselines.np_inference}
#: Light timing for tests: never a wall-clock assertion on these.
FAST = {"isolate": "none", "warmup": 0, "min_rounds": 3, "max_time": 0.01, "min_trials": 2,
        "max_trials": 2, "trial_time": 0.0, "bootstrap": 200, "plots": False, "progress": False,
        "echo": lambda s: None}
NC, NCHW, NHWC = Layout.NC, Layout.NCHW, Layout.NHWC


def register_throwaway(name, fns, availability=None, device="cpu", kind="kernel",
                       variants=("default",)):
    """A test backend: ``fns`` maps each op to a kernel fn (used for every layout and
    variant)."""
    registry.register_backend(BackendInfo(name=name, description="test backend",
                                          availability=lambda: availability, kind=kind,
                                          device=device, default_variant=variants[0]))
    for op, fn in fns.items():
        for layout in Layout:
            for v in variants:
                registry.register(KernelSpec(name, op, layout, fn, variant=v))


def perturbed(fn, delta=0.05):
    """A deliberately wrong kernel: the right outputs, then the first output nudged."""
    def wrong(args):
        outs = fn(args)
        outs[0].reshape(-1)[::7] += delta
        return outs
    return wrong


def slowed(fn, seconds=5e-3):
    """numpy's kernel plus a sleep: thousands of times slower than a microsecond kernel."""
    def slow(args):
        time.sleep(seconds)
        return fn(args)
    return slow


@pytest.fixture
def throwaway():
    names = []

    def make(name, fns, **kw):
        register_throwaway(name, fns, **kw)
        names.append(name)
        return name

    yield make
    for n in names:
        registry.unregister_backend(n)


# --------------------------------------------------------------------------------- shapes


def test_shapes_carry_their_layout():
    assert parse_shapes(["resnet50"], [NCHW]) == tuple(ShapeSpec(NCHW, d) for d in RESNET50)
    both = parse_shapes(["64,56,56; 512"])
    assert both == (ShapeSpec(NCHW, (64, 56, 56)), ShapeSpec(NHWC, (64, 56, 56)),
                    ShapeSpec(NC, (512,)))
    assert parse_shapes(["NHWC:256x14x14", "nc:8"], [NCHW]) == (ShapeSpec(NHWC, (256, 14, 14)),
                                                                ShapeSpec(NC, (8,)))
    assert parse_shapes(["NHWC:resnet50-small"]) == tuple(
        ShapeSpec(NHWC, d) for d in PRESETS["resnet50-small"])
    assert parse_shapes(["mlp-small"], [NCHW, NHWC, NC]) == tuple(
        ShapeSpec(NC, d) for d in PRESETS["mlp-small"])


@pytest.mark.parametrize("bad,message", [
    ("resnet51", "bad shape"), ("64,56", "bad shape"), ("a,b,c", "bad shape"),
    ("0", "sizes must be >= 1"), ("NC:3,4,5", "NC takes C"), ("NHWC:512", "NHWC takes C,H,W"),
    ("NWHC:3", "unknown layout"), (";", "no shapes")])
def test_parse_shapes_rejects(bad, message):
    with pytest.raises(SweepError, match=message):
        parse_shapes([bad])


def test_no_shape_for_the_selected_layouts():
    with pytest.raises(SweepError, match="no shapes for the selected layouts"):
        parse_shapes(["mlp"], [NCHW])


def test_parse_int_list():
    assert parse_int_list("1, 2,8,8,32") == (1, 2, 8, 32)
    for bad in ("", "1,x", "0,2", "-1", "1.5"):
        with pytest.raises(SweepError):
            parse_int_list(bad)


def test_named_target_sweeps_hold_the_issues_shape_sets():
    cpu = NAMED_SWEEPS["cpu-targets"].points
    assert sum(p.layout is NCHW and p.N == 32 for p in cpu) == 12
    assert sum(p.layout is NHWC and p.N == 32 for p in cpu) == 12
    nc = {(p.dims[0], p.N) for p in cpu if p.layout is NC}
    assert nc == {(c, n) for c in (256, 1024, 4096) for n in (256, 4096, 32768)} | {(16, 8)}
    tiny = {(p.dims[0], p.N): p.min_rounds for p in cpu if p.tag == "tiny"}
    assert tiny == {(16, 8): 2000, (256, 256): 2000}
    gpu = NAMED_SWEEPS["cuda-targets"].points
    assert {p.N for p in gpu if p.layout is NCHW} == {32, 256} and len(gpu) == 24 + 9
    assert NAMED_SWEEPS["cuda-targets"].defaults["variants"] == "all"


# --------------------------------------------------------------------------------- the plan


def test_plan_holds_only_valid_configurations_and_real_skips(throwaway):
    throwaway("offline", NUMPY_FNS, availability="no such device here")
    throwaway("simdev", NUMPY_FNS, device="cuda")
    points = points_from(parse_shapes(["3", "2,1,1"]), (1, 4))
    sweep = Sweep(backends=("numpy", "offline", "simdev", "nbbn-unfused"), points=points,
                  fusions=(Fusion.NONE, Fusion.ADD))
    plan = make_plan(sweep)
    # shapes: NC (3,), NCHW and NHWC (2,1,1); N = 1, 4; ops × fusion minus backward × add.
    n_points = 3 * 2 * (3 + 2)
    # numpy, offline, simdev every time; nbbn-unfused only in the fused (add) points.
    assert plan.total == n_points * 3 + 3 * 2 * 2
    reasons = {r for _, r in plan.skipped}
    assert not any("mismatch" in r for r in reasons)
    assert any(r.startswith("m = 1 in training") for r in reasons)
    assert "backend unavailable: no such device here" in reasons
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":  # conftest's default; not on a GPU
        assert "CUDA simulator: not timed" in reasons
    for cfg in plan.run + [c for c, _ in plan.skipped]:
        p = cfg.point
        assert not (p.op is Op.BACKWARD and p.fusion.residual)
        assert cfg.backend != "nbbn-unfused" or p.fusion is not Fusion.NONE
    groups = {(g.point, g.device) for g in plan.groups}
    assert len(groups) == len(plan.groups)  # one group per point and device


def test_variant_axis(throwaway):
    throwaway("multi", NUMPY_FNS, variants=("v1", "v2", "v3"))
    pts = points_from(parse_shapes(["NC:5"]), (4,))

    def planned(variants):
        plan = make_plan(Sweep(backends=("multi", "numpy"), points=pts, ops=(Op.INFERENCE,),
                               variants=variants))
        return [(c.backend, c.variant) for c in plan.run]

    assert planned("default") == [("multi", "v1"), ("numpy", "default")]
    assert planned("all") == [("multi", "v1"), ("multi", "v2"), ("multi", "v3"),
                              ("numpy", "default")]
    assert planned(("v3", "v2")) == [("multi", "v3"), ("multi", "v2"), ("numpy", "default")]
    with pytest.raises(SweepError, match="unknown variant 'v9'.*multi: v1, v2, v3"):
        planned(("v9",))


def test_cpu_variants_come_from_the_registry():
    pts = points_from(parse_shapes(["NCHW:3,2,2"]), (2,))
    plan = make_plan(Sweep(backends=("cpu",), points=pts, ops=(Op.INFERENCE,), variants="all"))
    assert [c.variant for c in plan.run] == registry.variants("cpu", Op.INFERENCE, NCHW)
    assert len(plan.run) >= 2


# --------------------------------------------------------------------------------- cases


def test_point_data_is_awkward_seeded_and_nhwc_is_channels_last():
    p = Point(Op.FORWARD_TRAIN, NHWC, Fusion.NONE, "kernel", "cold", "float32", 8, (3, 4, 5))
    a, b = cases.point_data(p), cases.point_data(p)
    x = a.inputs["x"]
    assert x.shape == (8, 4, 5, 3) and p.channel_axis == -1 and p.x_shape == x.shape
    np.testing.assert_array_equal(x, b.inputs["x"])
    assert x.dtype == np.float32 and -2.4 < x.mean() < -2.2 and 0.4 < x.std() < 0.6


@pytest.mark.parametrize("op", list(Op))
@pytest.mark.parametrize("layout,fusion", [(NCHW, Fusion.ADD_RELU), (NHWC, Fusion.RELU),
                                           (NC, Fusion.NONE)])
def test_chunked_reference_equals_the_whole_one(op, layout, fusion, monkeypatch):
    """The reference over blocks of channels is the reference (channels are independent)."""
    if op is Op.BACKWARD and fusion.residual:
        fusion = Fusion.RELU
    dims = (5,) if layout is NC else (5, 3, 2)
    p = Point(op, layout, fusion, "kernel", "warm", "float64", 4, dims)
    whole = cases.point_data(p)
    monkeypatch.setattr(cases, "CHUNK", 7)  # blocks of one or two channels
    parts = cases.point_data(p)
    for a, b in zip(whole.refs, parts.refs, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-13)
    ca = p.channel_axis
    x = whole.inputs["x"]
    if op is Op.INFERENCE:
        i = whole.inputs
        direct = reference.inference(x, i["running_mean"], i["running_var"], i["gamma"],
                                     i["beta"], cases.EPS, channel_axis=ca, relu=fusion.relu,
                                     residual=i.get("residual"))
        np.testing.assert_allclose(parts.refs[0], direct, rtol=1e-13, atol=1e-13)
    if op is Op.BACKWARD:
        assert parts.scales["dx"] == pytest.approx(whole.scales["dx"], rel=1e-12)


def test_buffer_sets_exceed_twice_the_last_level_cache():
    cold = Point(Op.INFERENCE, NC, Fusion.NONE, "kernel", "cold", "float32", 64, (128,))
    warm = Point(Op.INFERENCE, NC, Fusion.NONE, "kernel", "warm", "float32", 64, (128,))
    xb = 64 * 128 * 4
    K = cases.buffer_sets(cold, xb, 1 << 20)
    assert K * 2 * xb >= 2 * (1 << 20) > (K - 1) * 2 * xb
    assert cases.buffer_sets(warm, xb, 1 << 20) == 1
    assert cases.buffer_sets(cold, 1 << 30, 32 << 20) == 1  # x alone exceeds the cache
    assert cases.buffer_sets(cold, 16, 32 << 20) == cases.MAX_SETS


def test_environment_reads_the_cache_sizes():
    from nbbn.output import cache_sizes, environment, last_level_cache_bytes

    sizes = cache_sizes()
    env = environment()
    assert {"cache_l1d_bytes", "cache_l2_bytes", "cache_l3_bytes"} <= set(env)
    assert last_level_cache_bytes(sizes) >= max(v or 0 for v in sizes.values())
    assert last_level_cache_bytes({}) == 32 << 20


# --------------------------------------------------------------------------------- stats


def test_bootstrap_intervals_are_seeded_and_cover_the_ratio():
    rng = np.random.default_rng(1)
    base = rng.lognormal(0, 0.3, 400)  # a noisy machine: both sides of a round share it
    T = np.column_stack([base * 2.0 * rng.lognormal(0, 0.02, 400), base])
    a = stats.paired_ratio(T, 0, 1, rng_for(0, "p"), 1000)
    b = stats.paired_ratio(T, 0, 1, rng_for(0, "p"), 1000)
    assert a == b  # the same seed and samples give the same interval
    assert a.lo < 2.0 < a.hi and a.half_width_rel < 0.01
    unpaired = stats.median_ci(T[:, 0], rng_for(0, "q")).half_width_rel
    assert unpaired > 5 * a.half_width_rel  # pairing is what makes the interval narrow
    ok, worst = stats.converged(T, [(0, 1)], 0.03, rng_for(0, "r"))
    assert ok and worst < 0.03
    one = stats.median_ci(np.array([3.0]), rng_for(0))
    assert one.median == 3.0 and one.half_width_rel == float("inf")


def test_bytes_model():
    assert roofline.bytes_moved(Op.INFERENCE, 100, 2, 4) == 4 * (2 * 100 + 4 * 2)
    assert roofline.bytes_moved(Op.FORWARD_TRAIN, 100, 2, 4) == 4 * (2 * 100 + 8 * 2)
    assert roofline.bytes_moved(Op.BACKWARD, 100, 2, 8) == 8 * (3 * 100 + 5 * 2)
    assert roofline.bytes_moved(Op.FORWARD_TRAIN, 100, 2, 4, two_pass=True) == 4 * (300 + 16)
    assert roofline.bytes_moved(Op.BACKWARD, 100, 2, 4, two_pass=True) == 4 * (500 + 10)
    # fusion: a residual read (+S), backward's y read and dz write (+2S)
    assert roofline.bytes_moved(Op.INFERENCE, 100, 2, 4, fusion=Fusion.ADD_RELU) == \
        4 * (3 * 100 + 8)
    assert roofline.bytes_moved(Op.INFERENCE, 100, 2, 4, fusion=Fusion.RELU) == 4 * (200 + 8)
    assert roofline.bytes_moved(Op.BACKWARD, 100, 2, 4, fusion=Fusion.RELU) == 4 * (500 + 10)
    assert roofline.copy_bytes(400) == 800
    # half x: 2-byte elements, float32 (4-byte) per-channel vectors
    assert roofline.itemsizes("bfloat16") == {"itemsize": 2, "vector_itemsize": 4}
    assert roofline.itemsizes("float64") == {"itemsize": 8, "vector_itemsize": 8}
    assert roofline.bytes_moved(Op.BACKWARD, 100, 2, **roofline.itemsizes("float16")) == \
        2 * 3 * 100 + 4 * 5 * 2
    assert roofline.read_write_bytes(Op.BACKWARD, 100, 2, 2, vector_itemsize=4) == \
        (2 * 2 * 100 + 4 * 5 * 2, 2 * 100)


# --------------------------------------------------------------------------------- runs


def test_rows_carry_paired_ratios_and_their_intervals():
    df = run(backends="cpu,numpy,torch-cpu", ops="inference,backward", shapes="NC:6;NHWC:3,2,3",
             batch_sizes="4", caches="warm", **FAST)
    assert list(df.columns[:len(COLUMNS)]) == list(COLUMNS)
    assert set(COLUMNS) <= set(COLUMN_DOCS)  # every column documented
    assert (df["status"] == "ok").all(), df[["backend", "op", "layout", "error"]]
    for _, r in df.iterrows():
        assert r["rounds"] >= 3 and r["timer"] == "perf_counter_ns"
        assert r["time_ms_ci_lo"] <= r["time_ms_p50"] <= r["time_ms_ci_hi"]
        assert r["time_over_copy_ci_lo"] <= r["time_over_copy"] <= r["time_over_copy_ci_hi"]
        assert r["pct_of_limit_ci_lo"] <= r["pct_of_limit"] <= r["pct_of_limit_ci_hi"]
        assert r["limit_copy"] in ("copy:numpy", "copy:numba", "copy:torch")
        assert r["limit"].startswith(r["limit_copy"])
        assert r["read_bytes"] + r["write_bytes"] == r["bytes"]
        assert r["trials"] >= 2 and r["processes"] == 1
        assert r["between_trial_sd_pct"] >= 0 and r["within_trial_sd_pct"] >= 0
        if r["backend"] == "torch-cpu":
            assert pd.isna(r["speedup"])  # the reference baseline itself
        else:
            assert r["baseline"] == "torch-cpu:default"
            assert r["speedup_ci_lo"] <= r["speedup"] <= r["speedup_ci_hi"]
        assert r["cache"] == "warm" and r["buffer_sets"] == 1 and r["call"] == "kernel"
        assert "cache_l3_bytes" in r and r["llc_bytes"] > 0  # L3 read where the OS says it
        assert r["load_avg_1m"] is not None and r["load_before_1m"] is not None
    ratios = df.attrs["ratios"]
    # every ordered pair of the 3 backends and the copy, per point (4 points)
    n_limits = 4 if importlib.util.find_spec("torch") else 3
    assert len(ratios) == 4 * 3 * (2 + n_limits)
    assert set(ratios["vs_backend"]) == {"cpu", "numpy", "torch-cpu", "copy", "read"}
    nhwc = df[df["layout"] == "NHWC"]
    assert set(nhwc["x_shape"]) == {"4x2x3x3"}  # (N, H, W, C)


@pytest.mark.slow  # half kernels the fast tier's warm-up does not compile
def test_half_dtypes_run_on_cpu_and_torch_with_two_byte_bytes():
    """--dtype float16,bfloat16: cpu and torch-cpu (PyTorch's mixed-precision batch norm) are
    checked against the float64 reference with the half tolerances and timed, kernel and api
    calls; bytes, GB/s and the copy count 2 bytes per element (per-channel vectors float32);
    numpy, which runs float32 and float64 only, is a skipped row with its reason."""
    half = [d.name for d in validate.HALF_DTYPES]
    df = run(backends="cpu,torch-cpu,numpy", ops="inference", dtypes=",".join(half),
             shapes="NC:5", batch_sizes="4", calls="kernel,api", caches="warm", **FAST)
    ok = df[df["status"] == "ok"]
    assert set(ok["backend"]) == {"cpu", "torch-cpu"} and ok["passed"].all()
    assert len(ok) == 2 * 2 * len(half)  # backends × calls × dtypes
    assert set(ok["dtype"]) == set(half)
    for _, r in ok.iterrows():
        assert r["tolerance"] == tolerance(r["worst_output"], r["dtype"])
        assert r["x_bytes"] == 2 * r["m"] * r["C"]  # itemsize 2
        assert r["bytes"] == 2 * 2 * r["m"] * r["C"] + 4 * 4 * r["C"]  # x, y; 4 float32 vectors
        assert r["bytes"] == roofline.bytes_moved(Op.INFERENCE, r["m"] * r["C"], r["C"], 2,
                                                  vector_itemsize=4)
        assert r["gbps"] == pytest.approx(r["bytes"] / (r["time_ms_p50"] * 1e-3) / 1e9)
        assert r["copy_gbps"] == pytest.approx(2 * r["x_bytes"] / (r["copy_ms_p50"] * 1e-3)
                                               / 1e9)
    skipped = df[df["status"] == "skipped"]
    assert set(skipped["backend"]) == {"numpy"} and len(skipped) == 2 * len(half)
    for _, r in skipped.iterrows():
        assert r["skip_reason"] == (f"numpy default does not run {r['dtype']} "
                                    "(it runs float32, float64)")


def test_a_slowed_backend_comes_out_slower(throwaway):
    """A fake kernel backend 5 ms slower than numpy's microsecond kernels: its speed-up over
    the baseline has an interval below 1, and compare labels it slower (no wall-clock
    assertion: the slow-down is a thousand times the kernel)."""
    # 15 rounds: an interval is then set by the middle of the rounds, not by one round that
    # a loaded host preempted; 4 trials: with 2, the trial interval's t factor (12.7) makes
    # even a 1000× slow-down "ambiguous".
    args = dict(backends="fake,numpy", ops="inference", shapes="NC:6", batch_sizes="4",
                baseline="numpy", **{**FAST, "min_rounds": 15, "min_trials": 4, "max_trials": 4})
    throwaway("fake", NUMPY_FNS)
    before = run(**args)
    registry.unregister_backend("fake")
    throwaway("fake", {op: slowed(fn) for op, fn in NUMPY_FNS.items()})
    after = run(**args)
    slow = after[after["backend"] == "fake"].iloc[0]
    assert slow["status"] == "ok" and slow["speedup_ci_hi"] < 1
    table = compare(before, after).set_index("backend")
    assert table.loc["fake", "label"] == "slower"
    assert table.loc["fake", "change_lo"] > 1
    by_time = compare(before, after, metric="time").set_index("backend")
    assert by_time.loc["fake", "label"] == "slower"


def test_cold_and_warm_are_labelled(monkeypatch):
    monkeypatch.setattr(devices.HostDevice, "llc_bytes", lambda self: 1 << 20)
    df = run(backends="numpy", ops="inference", shapes="NC:64", batch_sizes="16",
             caches="cold,warm", **FAST)
    by = df.set_index("cache")
    xb = 16 * 64 * 4
    assert by.loc["warm", "buffer_sets"] == 1
    assert by.loc["cold", "buffer_sets"] == cases.buffer_sets(
        Point(Op.INFERENCE, NC, Fusion.NONE, "kernel", "cold", "float32", 16, (64,)), xb,
        1 << 20) > 1
    assert by.loc["cold", "working_set_bytes"] >= 2 << 20
    assert pd.isna(by.loc["cold", "notes"]) or "2x LLC" not in by.loc["cold", "notes"]
    monkeypatch.setattr(devices.HostDevice, "llc_bytes", lambda self: 1 << 40)
    capped = run(backends="numpy", ops="inference", shapes="NC:64", batch_sizes="16", **FAST)
    assert capped["buffer_sets"].iloc[0] == cases.MAX_SETS
    assert "< 2x LLC" in capped["notes"].iloc[0]


def test_api_calls_and_fusion(throwaway):
    """--call api times the allocating calls (nbbn's public API, PyTorch's allocating ATen ops,
    np.copy); the fusion axis runs relu/add on the baselines (torch: bn then relu_/add_;
    nbbn-unfused: nbbn then np.add/np.maximum) and on the fused CPU kernels, all checked."""
    df = run(backends="cpu,numpy,torch-cpu,nbbn-unfused", shapes="NC:5;NHWC:3,2,3",
             batch_sizes="4", fusions="none,relu,add-relu", calls="api", caches="warm", **FAST)
    assert set(df["call"]) == {"api"}
    base = df[df["kind"] == "baseline"]
    assert (base["status"] == "ok").all(), base[["backend", "op", "fusion", "error"]]
    assert set(base[base["backend"] == "nbbn-unfused"]["fusion"]) == {"relu", "add-relu"}
    assert not ((df["op"] == "backward") & (df["fusion"] == "add-relu")).any()
    cpu = df[df["backend"] == "cpu"]
    assert (cpu["status"] == "ok").all(), cpu[["op", "fusion", "error"]]
    assert set(cpu["fusion"]) == {"none", "relu", "add-relu"}


def test_fusion_report(tmp_path):
    """nbbn.bench.fusion: per fused cpu configuration, its time over the plain point's and the
    paired speed-ups over nbbn-unfused and torch-cpu from ratios.csv; every target has a line."""
    from nbbn.bench import fusion

    run(backends="cpu,numpy,nbbn-unfused", shapes="NCHW:3,2,3", batch_sizes="4",
        fusions="none,relu,add-relu", out=tmp_path, **FAST)
    t = fusion.table(*(pd.read_csv(tmp_path / f) for f in ("bench.csv", "ratios.csv")))
    assert set(zip(t["op"], t["fusion"], strict=True)) == {
        ("forward-train", "relu"), ("forward-train", "add-relu"), ("inference", "relu"),
        ("inference", "add-relu"), ("backward", "relu")}
    assert (t["fused/plain"] > 0).all() and np.isfinite(t["fused/plain"]).all()
    unfused = np.array([v[0] for v in t["vs unfused"]])
    assert (unfused > 0).all() and np.isfinite(unfused).all()
    assert all(np.isnan(v[0]) for v in t["vs torch"])  # torch-cpu was not in this run
    md = fusion.markdown(tmp_path)
    for op, f in fusion.TARGETS:
        assert f"{op} + {f}" in md
    header = next(line for line in md.splitlines() if line.startswith("| op"))
    assert "fused/plain" in header and "vs unfused" in header


def test_wrong_kernel_fails_and_is_not_timed(throwaway):
    throwaway("wrong", {op: perturbed(fn) for op, fn in NUMPY_FNS.items()})
    df = run(backends="wrong,numpy", shapes="NC:6;NCHW:3,2,5", batch_sizes="4", **FAST)
    wrong = df[df["backend"] == "wrong"]
    assert len(wrong) == 6 and (wrong["status"] == "failed").all()
    assert (wrong["rel_err"] > wrong["tolerance"]).all()
    assert wrong[["time_ms_p50", "rounds", "gbps", "speedup"]].isna().all().all()
    assert (df[df["backend"] == "numpy"]["status"] == "ok").all()


def test_a_baseline_a_little_outside_tolerance_is_timed_with_a_note(throwaway):
    """PyTorch's own float32 statistics drift past nbbn's 1e-5 at m ~ 1e5: a baseline within
    100× the tolerance is timed (its accuracy is its own); further out it is set up wrong."""
    throwaway("blurry", {op: perturbed(fn, 1e-4) for op, fn in NUMPY_FNS.items()},
              kind="baseline")
    throwaway("broken", {op: perturbed(fn, 0.05) for op, fn in NUMPY_FNS.items()},
              kind="baseline")
    df = run(backends="numpy,blurry,broken", ops="inference", shapes="NC:64", batch_sizes="32",
             **FAST).set_index("backend")
    assert df.loc["blurry", "status"] == "ok" and not df.loc["blurry", "passed"]
    assert df.loc["blurry", "rel_err"] > df.loc["blurry", "tolerance"]
    assert "timed anyway" in df.loc["blurry", "notes"]
    assert df.loc["broken", "status"] == "failed"


def test_raising_kernels_are_error_rows_and_the_sweep_goes_on(throwaway):
    def boom(args):
        raise RuntimeError("kernel exploded")

    calls = {"n": 0}

    def later(args):  # passes its check, then raises while being timed
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("exploded in round 2")
        return baselines.np_inference(args)

    throwaway("raises", dict.fromkeys(Op, boom))
    throwaway("flaky", {Op.INFERENCE: later})
    df = run(backends="raises,flaky,numpy", ops="inference", shapes="NC:3", batch_sizes="2",
             **FAST).set_index("backend")
    assert df.loc["raises", "status"] == "error"
    assert "RuntimeError: kernel exploded" in df.loc["raises", "error"]
    assert df.loc["flaky", "status"] == "error" and "round 2" in df.loc["flaky", "error"]
    assert df.loc["numpy", "status"] == "ok" and df.loc["numpy", "rounds"] >= 3


def test_cuda_timer_path_under_the_simulator():
    """The CUDA device path (simulator device arrays, wall timer after synchronize, device
    copy) runs end to end on the real cuda backend; times mean nothing there, which is why
    sweeps skip simulated CUDA backends unless asked (allow_simulator, tests only)."""
    df = run(backends="cuda", ops="inference", shapes="NC:3", batch_sizes="4", caches="warm",
             allow_simulator=True, **FAST)
    r = df.iloc[0]
    assert r["status"] == "ok", r["error"]
    assert r["device"] == "cuda" and r["device_name"] == "CUDA simulator"
    assert r["timer"] == "wall-simulator" and r["rounds"] >= 3 and r["passed"]


def test_half_dtypes_on_the_cuda_device_path():
    """float16 and bfloat16 through the CUDA device path (the simulator's device arrays): the
    cuda backend is checked with the half tolerances and the device copy moves the half
    array's bytes (its bits: the simulator cannot copy a bfloat16 array as such)."""
    half = [d.name for d in validate.HALF_DTYPES]
    df = run(backends="cuda", ops="inference", dtypes=",".join(half), shapes="NC:3",
             batch_sizes="4", calls="kernel,api", caches="warm", allow_simulator=True, **FAST)
    assert (df["status"] == "ok").all(), df[["dtype", "call", "error"]]
    assert df["passed"].all() and sorted(set(df["dtype"])) == sorted(half)
    assert (df["x_bytes"] == 2 * 4 * 3).all() and (df["limit"] == "copy:device").all()


def test_bad_input_raises_one_line_errors():
    for kw, msg in [({"caches": "hot"}, "unknown cache 'hot'"),
                    ({"calls": "kernels"}, "unknown call"),
                    ({"variants": "v9", "backends": "numpy"}, "unknown variant 'v9'"),
                    ({"sweep": "cpu-targets", "shapes": "NC:3"}, "fixes its shapes"),
                    ({"sweep": "nope"}, "unknown sweep"),
                    ({"baseline": "cpu"}, "unknown baseline"),
                    ({"fusions": "add", "ops": "backward"}, "no valid configuration")]:
        with pytest.raises(HarnessError, match=msg) as info:
            run(shapes=kw.pop("shapes", "NC:3"), batch_sizes="2", **kw, **FAST)
        assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------- compare


def result_rows(values, backend="cpu"):
    """Hand-made rows: N -> (time_over_copy, lo, hi); times follow the same interval."""
    return [{"schema": SCHEMA, "status": "ok", "backend": backend, "variant": "auto",
             "op": "inference", "layout": "NC", "fusion": "none", "call": "kernel",
             "cache": "cold", "dtype": "float32", "N": n, "C": 8, "H": 1, "W": 1,
             "time_over_copy": v[0], "time_over_copy_ci_lo": v[1], "time_over_copy_ci_hi": v[2],
             "time_ms_p50": v[0], "time_ms_ci_lo": v[1], "time_ms_ci_hi": v[2]}
            for n, v in values.items()]


def test_compare_four_labels_from_the_intervals():
    old = tidy(result_rows({1: (1.0, 0.98, 1.02), 2: (1.0, 0.98, 1.02), 4: (1.0, 0.98, 1.02),
                            8: (1.0, 0.98, 1.02), 16: (1.0, 0.98, 1.02)}))
    new = tidy(result_rows({1: (0.5, 0.49, 0.51),   # far below: faster
                            2: (1.5, 1.45, 1.55),   # far above: slower
                            4: (1.01, 0.99, 1.03),  # within ±10% whatever the truth: same
                            8: (1.1, 0.8, 1.4),     # too wide to tell: ambiguous
                            32: (1.0, 0.9, 1.1)}))
    out = compare(old, new, margin=0.10, run_sd=0.0).set_index("N")
    assert list(out.loc[[1, 2, 4, 8], "label"]) == ["faster", "slower", "same", "ambiguous"]
    assert out.loc[1, "change"] == pytest.approx(0.5)
    assert out.loc[16, "label"] == "only in old" and out.loc[32, "label"] == "only in new"
    # disjoint intervals but a small change that is not clearly within the threshold
    assert label_change(1.0, 0.99, 1.01, 1.06, 1.05, 1.12, 0.05, 0.0)[0] == "ambiguous"
    assert label_change(1.0, 0.99, 1.01, 1.02, 1.015, 1.025, 0.05, 0.0)[0] == "same"
    # the between-run sd widens the change's interval: same becomes ambiguous
    assert label_change(1.0, 0.99, 1.01, 1.02, 1.015, 1.025, 0.05, 0.03)[0] == "ambiguous"


def test_load_results_accepts_our_formats_and_rejects_others(tmp_path):
    rows = result_rows({1: (1.0, 0.9, 1.1)})
    pd.DataFrame(rows).to_csv(tmp_path / "bench.csv", index=False)
    with RowLog(tmp_path / "rows.jsonl") as log:
        log.write(rows[0])
    for p in ("bench.csv", "rows.jsonl", "."):
        assert len(load_results(tmp_path / p)) == 1
    from nbbn.bench.compare import NotOurs

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "other.csv").write_text("a,b\n1,2\n")
    (bad / "list.json").write_text('{"a": 1}')
    (bad / "junk.jsonl").write_text("not json\nat all\n")
    (bad / "old.csv").write_text(pd.DataFrame(rows).assign(schema="nbbn-bench/1").to_csv())
    for name, msg in [("other.csv", "not an nbbn bench result"), ("list.json", "JSON list"),
                      ("junk.jsonl", "cannot be read"), ("old.csv", "carry no intervals"),
                      ("missing.csv", "no such file"), (".", "no rows.jsonl")]:
        with pytest.raises(NotOurs, match=msg):
            load_results(bad / name)


# --------------------------------------------------------------------------------- reports


def test_run_writes_logs_tables_and_a_summary(tmp_path):
    df = run(backends="cpu,numpy", ops="inference", shapes="NC:5;NCHW:3,2,2", batch_sizes="2,4",
             out=tmp_path, **{**FAST, "plots": True})
    for name in ("rows.jsonl", "ratios.jsonl", "bench.csv", "ratios.csv", "summary.md",
                 "run.json"):
        assert (tmp_path / name).is_file(), name
    assert not (tmp_path / "bench.json").exists() and not (tmp_path / "ratios.json").exists()
    assert len(read_rows(tmp_path / "rows.jsonl")) == len(df) == 4 * 2
    md = (tmp_path / "summary.md").read_text()
    assert "## Headline" in md and "1-minute load average before" in md
    assert "cpu vs numpy" in md and "Time over the copy" in md
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "gbps-inference-NC-none-kernel-cold-float32.png",
        "gbps-inference-NCHW-none-kernel-cold-float32.png"]
    assert df.attrs["meta"]["load_after_1m"] is not None
    if os.path.exists("/proc/stat"):  # Linux: other processes' CPU during the run, in cores
        assert 0.0 <= df.attrs["meta"]["other_cpu_cores"] <= os.cpu_count()


def test_quiet_rule_judges_the_load_before_and_other_processes_cpu_not_the_runs_own():
    """During a run the 1-minute load counts the run's own threads (~threads): the rule reads
    the load before the run and what other processes used during it."""
    verdict = output.quiet_verdict
    assert verdict({"load_before_1m": 0.3, "other_cpu_cores": 0.1, "steal_cores": 0.0})[1]
    assert not verdict({"load_before_1m": 0.3, "other_cpu_cores": 0.9})[1]
    assert not verdict({"load_before_1m": 0.7, "other_cpu_cores": 0.0})[1]
    text, quiet = verdict({"load_before_1m": 0.3})  # a run.json from before the measure
    assert quiet and "not measured" in text
    assert not verdict({})[1]


def test_other_cpu_is_the_hosts_busy_time_less_this_process_trees(monkeypatch):
    host = iter([(100.0, 1.0), (104.0, 1.5)])  # (busy, steal) CPU seconds since boot
    own = iter([10.0, 12.5])
    clock = iter([50.0, 52.0])
    monkeypatch.setattr(output, "_host_cpu_seconds", lambda: next(host))
    monkeypatch.setattr(output, "_own_cpu_seconds", lambda: next(own))
    monkeypatch.setattr(output.time, "monotonic", lambda: next(clock))
    meter = output.OtherCpu()
    meter.start()
    # 4 s busy in 2 s of wall time, 2.5 of them this process tree's: 0.75 cores for the others
    assert meter.stop() == {"other_cpu_cores": 0.75, "steal_cores": 0.25}


@pytest.mark.skipif(not os.path.exists("/proc/stat"), reason="reads Linux's /proc/stat")
def test_cpu_seconds_of_the_host_and_of_this_process_grow_with_work():
    host0, own0 = output._host_cpu_seconds(), output._own_cpu_seconds()
    end = time.process_time() + 0.2
    while time.process_time() < end:
        pass
    host1, own1 = output._host_cpu_seconds(), output._own_cpu_seconds()
    assert own1 - own0 >= 0.19
    assert host1[0] - host0[0] >= 0.15  # the host's clock ticks (100 Hz) saw the same work


def test_summary_of_failed_and_skipped_rows():
    rows = [{**r, "kind": "kernel", "run_id": "x", "timestamp": "t"} for r in
            result_rows({1: (1, 1, 1)})]
    rows.append({**rows[0], "N": 2, "status": "skipped", "skip_reason": "backend unavailable: x"})
    rows.append({**rows[0], "N": 3, "status": "failed", "errors": "y=1"})
    md = summary_markdown(tidy(rows), "nbbn bench --test", {"load_before_1m": 3.0})
    assert "`nbbn bench --test`" in md and "NOT quiet" in md
    assert "backend unavailable: x" in md and "## Failed or raised" in md


def test_the_blocking_kernel_compiles_for_the_gpu():
    """The CUDA timer's spin kernel compiles with the real compiler (no GPU needed; outside the
    simulator, hence a subprocess)."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("numba_cuda") is None:
        pytest.skip("numba-cuda is not installed (pip install 'nbbn[cuda]')")
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    code = ("from numba import cuda; from nbbn.bench.spin import spin; "
            "ptx, _ = cuda.compile_ptx(spin, '(int64,)', cc=(9, 0)); "
            "print('nanosleep' in ptx)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "True", proc.stderr[-2000:]
