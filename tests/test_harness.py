"""The benchmark harness below the CLI: sweep parsing and plan, baselines, the correctness gate,
timing rule, bytes model, the append-only row log, reports and compare."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from nbbn import registry
from nbbn.harness import baselines, devices, roofline
from nbbn.harness.compare import NotOurs, compare, load_results
from nbbn.harness.report import plots, summary_markdown, tidy
from nbbn.harness.runner import COLUMNS, SCHEMA, Runner, run_plan
from nbbn.harness.sweep import (
    PRESETS,
    RESNET50,
    Config,
    Sweep,
    SweepError,
    make_plan,
    parse_int_list,
    parse_shapes,
)
from nbbn.registry import BackendInfo, KernelSpec
from nbbn.report import RowLog, read_rows
from nbbn.spec import Layout, Op

FAST = devices.TimingConfig(warmup=0, min_repeats=2, min_time=0.0, max_time=0.01)
NUMPY_FNS = {Op.FORWARD_TRAIN: baselines.np_forward_train, Op.BACKWARD: baselines.np_backward,
             Op.INFERENCE: baselines.np_inference}


def register_throwaway(name, fns, availability=None, device="cpu", kind="kernel"):
    """A test backend: ``fns`` maps each op to a kernel fn (used for both layouts)."""
    registry.register_backend(BackendInfo(name=name, description="test backend",
                                          availability=lambda: availability, kind=kind,
                                          device=device))
    for op, fn in fns.items():
        for layout in Layout:
            registry.register(KernelSpec(name, op, layout, fn))


def perturbed(fn, delta=0.05):
    """A deliberately wrong kernel: the right outputs, then the first output nudged."""
    def wrong(args):
        outs = fn(args)
        outs[0].reshape(-1)[::7] += delta
        return outs
    return wrong


@pytest.fixture
def wrong_backend():
    register_throwaway("wrong", {op: perturbed(fn) for op, fn in NUMPY_FNS.items()})
    yield "wrong"
    registry.unregister_backend("wrong")


@pytest.fixture
def raising_backend():
    def boom(args):
        raise RuntimeError("kernel exploded")
    register_throwaway("raises", dict.fromkeys(Op, boom))
    yield "raises"
    registry.unregister_backend("raises")


def run_rows(sweep, timing=FAST):
    rows = []
    runner = Runner(timing, rows.append)
    run_plan(make_plan(sweep), runner)
    return rows


# --------------------------------------------------------------------------------- sweep


def test_parse_shapes_presets_custom_and_dedup():
    assert parse_shapes(["resnet50"]) == RESNET50
    assert (64, 112, 112) in RESNET50 and (2048, 7, 7) in RESNET50
    assert parse_shapes(["64,56,56; 512", "7x3x3 512"]) == ((64, 56, 56), (512,), (7, 3, 3))
    assert parse_shapes(["mlp-small", "256"]) == PRESETS["mlp-small"]


@pytest.mark.parametrize("bad", ["resnet51", "64,56", "a,b,c", "0", "1,2,3,4", ";"])
def test_parse_shapes_rejects(bad):
    with pytest.raises(SweepError):
        parse_shapes([bad])


def test_parse_int_list():
    assert parse_int_list("1, 2,8,8,32") == (1, 2, 8, 32)
    for bad in ("", "1,x", "0,2", "-1", "1.5"):
        with pytest.raises(SweepError):
            parse_int_list(bad)


def test_plan_skip_reasons():
    register_throwaway("offline", NUMPY_FNS, availability="no such device here")
    register_throwaway("simdev", NUMPY_FNS, device="cuda")
    try:
        sweep = Sweep(backends=("numpy", "offline", "simdev"), ops=tuple(Op),
                      layouts=(Layout.NC, Layout.NCHW), batch_sizes=(1, 4),
                      shapes=((3,), (2, 1, 1)))
        plan = make_plan(sweep)
        assert plan.total == 3 * 3 * 2 * 2 * 2
        reasons = {r for _, r in plan.skipped}
        assert any(r.startswith("layout/shape mismatch: NC") for r in reasons)
        assert any(r.startswith("layout/shape mismatch: NCHW") for r in reasons)
        assert any(r.startswith("m = 1 in training") for r in reasons)
        assert "backend unavailable: no such device here" in reasons
        # A device "cuda" backend under the simulator (conftest turns it on) is never timed.
        assert "CUDA simulator: not timed" in reasons
        ran = {(c.backend, c.op, c.layout, c.N) for c in plan.run}
        assert ran == {("numpy", op, lay, n) for op in Op for lay in (Layout.NC, Layout.NCHW)
                       for n in (1, 4)
                       if op is Op.INFERENCE or n == 4}
        for cfg, reason in plan.skipped:  # m = 1: NCHW (2,1,1) with N = 1 in training
            if cfg.backend == "numpy" and cfg.N == 1 and cfg.op is not Op.INFERENCE:
                assert reason.startswith(("m = 1", "layout/shape"))
    finally:
        registry.unregister_backend("offline")
        registry.unregister_backend("simdev")


def test_baselines_registered_as_baselines():
    for name in ("numpy", "torch-cpu", "torch-cuda"):
        assert registry.backend_info(name).kind == "baseline"
    assert registry.backend_info("torch-cuda").device == "cuda"
    import nbbn

    with pytest.raises(ValueError, match="baseline"):
        nbbn.batch_norm_infer(np.ones((2, 3)), np.zeros(3), np.ones(3), backend="numpy")


# --------------------------------------------------------------------------------- runner


@pytest.mark.parametrize("backend", ["numpy", "torch-cpu", "cpu"])
def test_backends_pass_the_gate_and_are_timed(backend):
    rows = run_rows(Sweep(backends=(backend,), batch_sizes=(3,),
                          shapes=((5,), (4, 3, 5))))
    assert len(rows) == 3 * 2 * 2
    ran = [r for r in rows if r["status"] != "skipped"]
    assert len(ran) == 6
    for r in ran:
        assert r["status"] == "ok", (r["op"], r["layout"], r["errors"], r["error"])
        assert r["passed"] is True and r["rel_err"] <= r["tolerance"]
        assert r["samples"] >= 2 and r["time_ms_p20"] <= r["time_ms_p50"] <= r["time_ms_p80"]
        assert r["compile_s"] > 0 and r["gbps"] > 0 and r["copy_gbps"] > 0
        assert r["pct_of_copy"] == pytest.approx(100 * r["gbps"] / r["copy_gbps"])
        assert r["notes"] is None  # the kernel wrote into (and returned) its out= arrays
    assert set(rows[0]) == set(COLUMNS)


def test_wrong_kernel_fails_and_is_not_timed(wrong_backend):
    rows = run_rows(Sweep(backends=(wrong_backend, "numpy"), batch_sizes=(4,),
                          shapes=((6,), (3, 2, 5))))
    ran = [r for r in rows if r["status"] != "skipped"]
    wrong = [r for r in ran if r["backend"] == wrong_backend]
    assert len(wrong) == 6
    for r in wrong:
        assert r["status"] == "failed" and r["passed"] is False
        assert r["rel_err"] > r["tolerance"]
        assert r["worst_output"] in ("y", "dx")
        for col in ("samples", "time_ms_p50", "time_ms_p20", "time_ms_p80", "gbps",
                    "pct_of_copy"):
            assert r[col] is None
    assert all(r["status"] == "ok" for r in ran if r["backend"] == "numpy")


def test_raising_kernel_is_an_error_row_and_the_sweep_goes_on(raising_backend):
    rows = run_rows(Sweep(backends=(raising_backend, "numpy"), ops=(Op.INFERENCE,),
                          layouts=(Layout.NC,), batch_sizes=(2,), shapes=((3,),)))
    by = {r["backend"]: r for r in rows}
    assert by["raises"]["status"] == "error"
    assert "RuntimeError: kernel exploded" in by["raises"]["error"]
    assert by["numpy"]["status"] == "ok"


def test_data_is_awkward_and_seeded_per_point():
    from nbbn.harness.cases import point_data

    cfg = Config("numpy", Op.FORWARD_TRAIN, Layout.NCHW, "float32", 8, (3, 4, 5))
    a, b = point_data(cfg), point_data(Config("cpu", *list(vars(cfg).values())[1:]))
    np.testing.assert_array_equal(a.inputs["x"], b.inputs["x"])
    assert a.inputs["x"].dtype == np.float32
    assert -2.4 < a.inputs["x"].mean() < -2.2 and 0.4 < a.inputs["x"].std() < 0.6


def test_measure_stopping_rule():
    ticks = iter(range(1000))

    def fake(fn):
        next(ticks)
        return 0.25

    s = devices.measure(fake, None, devices.TimingConfig(warmup=3, min_repeats=2,
                                                         min_time=1.0, max_time=10))
    assert s.n == 4  # min_time 1 s of 0.25 s samples, more than min_repeats
    assert next(ticks) == 7  # 3 warm-up calls were made and not kept
    assert s.ms(50) == pytest.approx(250.0) and s.noise_pct() == 0.0
    s = devices.measure(fake, None, devices.TimingConfig(warmup=0, min_repeats=6,
                                                         min_time=0.0, max_time=10))
    assert s.n == 6  # min_repeats wins when min_time is reached first


def test_bytes_model():
    assert roofline.bytes_moved(Op.INFERENCE, 100, 2, 4) == 4 * (2 * 100 + 4 * 2)
    assert roofline.bytes_moved(Op.FORWARD_TRAIN, 100, 2, 4) == 4 * (2 * 100 + 8 * 2)
    assert roofline.bytes_moved(Op.BACKWARD, 100, 2, 8) == 8 * (3 * 100 + 5 * 2)
    assert roofline.bytes_moved(Op.FORWARD_TRAIN, 100, 2, 4, two_pass=True) == 4 * (300 + 16)
    assert roofline.bytes_moved(Op.BACKWARD, 100, 2, 4, two_pass=True) == 4 * (500 + 10)


# --------------------------------------------------------------------------------- row log


def test_row_log_is_append_only_and_survives_a_torn_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    with RowLog(path) as log:
        log.write({"a": 1, "b": float("nan")})
        log.write({"a": 2, "b": np.float32(0.5)})
    with open(path, "a") as f:
        f.write('{"a": 3, "b"')  # killed mid-write
    assert read_rows(path) == [{"a": 1}, {"a": 2, "b": 0.5}]  # empty cells are left out
    with RowLog(path, resume=True) as log:
        log.write({"a": 4})
    assert [r["a"] for r in read_rows(path)] == [1, 2, 4]
    with RowLog(path) as log:  # without resume: a fresh file
        log.write({"a": 5})
    assert read_rows(path) == [{"a": 5}]


def test_tidy_keeps_the_latest_row_per_configuration():
    row = {"backend": "numpy", "op": "inference", "layout": "NC", "dtype": "float32", "N": 2,
           "C": 3, "H": 1, "W": 1}
    df = tidy([{**row, "status": "error"}, {**row, "status": "ok"}, {**row, "N": 4}])
    assert list(df["status"].fillna("-")) == ["ok", "-"]
    assert list(df.columns[:len(COLUMNS)]) == list(COLUMNS)


def test_summary_and_plots(tmp_path, monkeypatch):
    rows = run_rows(Sweep(backends=("cpu", "numpy"), ops=(Op.INFERENCE,),
                          layouts=(Layout.NCHW,), batch_sizes=(2, 4), shapes=((3, 4, 4),)))
    rows.append({**rows[0], "backend": "offline", "status": "skipped",
                 "skip_reason": "backend unavailable: test"})
    df = tidy(rows)
    md = summary_markdown(df, "nbbn bench --test")
    assert "`nbbn bench --test`" in md and "## Headline" in md
    assert "cpu vs numpy" in md and "backend unavailable: test" in md
    files, message = plots(df, tmp_path)
    assert message is None and [f.name for f in files] == ["gbps-inference-NCHW-float32.png"]
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    files, message = plots(df, tmp_path)
    assert files == [] and "matplotlib is not installed" in message


# --------------------------------------------------------------------------------- compare


def result_rows(times, backend="cpu"):
    """Hand-made result rows: N -> (p20, p50, p80) in ms."""
    return [{"schema": SCHEMA, "status": "ok", "backend": backend, "op": "inference",
             "layout": "NC", "dtype": "float32", "N": n, "C": 8, "H": 1, "W": 1,
             "time_ms_p20": t[0], "time_ms_p50": t[1], "time_ms_p80": t[2]}
            for n, t in times.items()]


def test_compare_labels_from_the_spread():
    old = tidy(result_rows({1: (1.0, 1.1, 1.2), 2: (1.0, 1.1, 1.2), 4: (1.0, 1.1, 1.2),
                            8: (1.0, 1.1, 1.2)}))
    new = tidy(result_rows({1: (0.5, 0.55, 0.6), 2: (1.5, 1.65, 1.8), 4: (1.15, 1.3, 1.4),
                            16: (1.0, 1.0, 1.0)}))
    out = compare(old, new).set_index("N")
    assert out.loc[1, "label"] == "faster" and out.loc[1, "ratio"] == pytest.approx(2.0)
    assert out.loc[2, "label"] == "slower" and out.loc[2, "ratio"] == pytest.approx(2 / 3)
    assert out.loc[4, "label"] == "same"  # intervals overlap although the median moved
    assert out.loc[8, "label"] == "only in old" and out.loc[16, "label"] == "only in new"


def test_load_results_accepts_our_formats_and_rejects_others(tmp_path):
    rows = result_rows({1: (1.0, 1.1, 1.2)})
    pd.DataFrame(rows).to_csv(tmp_path / "bench.csv", index=False)
    (tmp_path / "bench.json").write_text(json.dumps(rows))
    with RowLog(tmp_path / "rows.jsonl") as log:
        log.write(rows[0])
    for p in ("bench.csv", "bench.json", "rows.jsonl", "."):
        assert len(load_results(tmp_path / p)) == 1
    skipped_only = [{k: v for k, v in rows[0].items() if not k.startswith("time_")}
                    | {"status": "skipped"}]  # nothing timed: no time columns at all
    (tmp_path / "skipped.json").write_text(json.dumps(skipped_only))
    labels = compare(load_results(tmp_path / "skipped.json"), load_results(tmp_path / "bench.csv"))
    assert labels["label"].tolist() == ["not compared (skipped → ok)"]
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "other.csv").write_text("a,b\n1,2\n")
    (bad / "list.json").write_text('{"a": 1}')
    (bad / "junk.jsonl").write_text("not json\nat all\n")
    (bad / "schema.csv").write_text(pd.DataFrame(rows).assign(schema="other/1").to_csv())
    for name in ("other.csv", "list.json", "junk.jsonl", "schema.csv", "missing.csv", "."):
        with pytest.raises(NotOurs):
            load_results(bad / name)


def test_cuda_timer_path_under_the_simulator(monkeypatch):
    """The CUDA device path (events around each call, device-to-device copy, device name) runs
    end to end under the simulator; its times are meaningless there (events record nothing),
    which is why sweeps skip simulated CUDA backends. validate.py does not take the simulator's
    fake device arrays, so this test hands the kernels host arrays."""
    monkeypatch.setattr(devices.CudaDevice, "put", lambda self, a: a)
    monkeypatch.setattr(devices.CudaDevice, "empty", lambda self, s, d: np.empty(s, d))
    register_throwaway("simgpu", NUMPY_FNS, device="cuda")
    try:
        rows = []
        runner = Runner(FAST, rows.append)
        row = runner.run_one(Config("simgpu", Op.BACKWARD, Layout.NCHW, "float32", 4, (3, 2, 3)))
        assert row["status"] == "ok", row["error"]
        assert row["device"] == "cuda" and row["device_name"] == "CUDA simulator"
        assert row["samples"] >= 2 and row["passed"] is True
    finally:
        registry.unregister_backend("simgpu")
