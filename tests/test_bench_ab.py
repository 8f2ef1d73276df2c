"""A/B in one run: ``nbbn compare RUN --pair NEW=OLD`` (the in-run ratio's label, its direction,
its errors) and ``nbbn bench --against PATH`` (another checkout's cpu kernels as ``cpu@NAME``).
"""

from __future__ import annotations

import dataclasses
import shutil
import types
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from nbbn import registry, validate
from nbbn.bench import against
from nbbn.bench.cli import bench, compare
from nbbn.bench.compare import (
    PairError,
    Side,
    compare_in_run,
    label_change,
    label_ratio,
    load_ratios,
    load_results,
    parse_pair,
)
from nbbn.bench.runner import SCHEMA
from nbbn.spec import Layout, Op

from .test_cli_bench import invoke, one_line_error

ROOT = Path(__file__).resolve().parents[1]
#: A frozen copy of round 4's results/reliability/ab-run (cpu-slowed, 1.15x cpu by construction,
#: timed beside cpu): the fixed input of the labelling tests below.
AB_RUN = ROOT / "tests" / "data" / "ab-run-round4"
POINT = {"op": "inference", "layout": "NC", "fusion": "none", "call": "kernel", "cache": "cold",
         "dtype": "float32", "C": 8, "H": 1, "W": 1}


def _ratio(backend, vs, N, s, lo, hi, variant="auto", vs_variant="auto"):
    return {"schema": SCHEMA, "run_id": "r", "backend": backend, "variant": variant,
            "device": "cpu", **POINT, "N": N, "vs_backend": vs, "vs_variant": vs_variant,
            "speedup": s, "speedup_ci_lo": lo, "speedup_ci_hi": hi, "rounds": 30, "trials": 4}


def test_label_ratio_by_the_one_rule():
    assert label_ratio(1.15, 1.12, 1.18)[0] == "slower"
    assert label_ratio(0.80, 0.78, 0.82)[0] == "faster"
    assert label_ratio(1.01, 0.99, 1.03)[0] == "same"
    assert label_ratio(1.05, 0.95, 1.16)[0] == "ambiguous"
    assert label_ratio(1.15, 1.12, 1.18, run_sd=0.05)[0] == "ambiguous"  # a run level added
    assert label_ratio(1.15, np.nan, 1.18)[0] == "no interval"
    # The in-run rule is the cross-run one with an exact OLD (zero width) and no run term.
    for r, lo, hi in [(1.15, 1.12, 1.18), (1.05, 0.95, 1.16), (0.9, 0.85, 0.97)]:
        assert label_ratio(r, lo, hi, 0.05, 0.0) == label_change(1, 1, 1, r, lo, hi, 0.05, 0.0)


def test_in_run_pair_reads_the_ratio_in_the_right_direction():
    # A row (backend B, vs_backend A) has speedup = time(A)/time(B).
    recs = [_ratio("old", "new", 1, 1.15, 1.12, 1.18),  # time(new)/time(old) = 1.15: slower
            _ratio("new", "old", 1, 0.87, 0.85, 0.89),
            _ratio("new", "old", 2, 0.8, 0.78, 0.82),  # only the reverse: 1.25, slower
            _ratio("old", "new", 4, 1.0, 0.99, 1.01),  # same
            _ratio("old", "new", 8, 0.8, 0.79, 0.81),  # faster
            _ratio("old", "new", 16, 1.04, 0.9, 1.2)]  # ambiguous
    ratios = pd.DataFrame(recs)
    t = compare_in_run(ratios, Side("new"), Side("old")).set_index("N")
    assert list(t.loc[[1, 2, 4, 8, 16], "label"]) == ["slower", "slower", "same", "faster",
                                                      "ambiguous"]
    assert t.loc[1, "change"] == pytest.approx(1.15)
    assert t.loc[2, "change"] == pytest.approx(1.25)
    assert t.loc[2, "ratio_lo"] == pytest.approx(1 / 0.82)
    back = compare_in_run(ratios, Side("old"), Side("new")).set_index("N")
    assert back.loc[1, "label"] == "faster" and back.loc[8, "label"] == "slower"


def test_pairs_match_variants_by_name_unless_one_is_named():
    ratios = pd.DataFrame([
        _ratio("old", "new", 1, 1.2, 1.19, 1.21, "rows", "rows"),
        _ratio("old", "new", 1, 1.0, 0.99, 1.01, "serial", "serial"),
        _ratio("old", "new", 1, 0.5, 0.49, 0.51, "rows", "serial")])
    t = compare_in_run(ratios, Side("new"), Side("old"))
    assert sorted(zip(t["variant"], t["label"], strict=True)) == [("rows", "slower"),
                                                                  ("serial", "same")]
    t = compare_in_run(ratios, Side("new", "serial"), Side("old", "rows"))
    assert list(t["label"]) == ["faster"]
    with pytest.raises(PairError, match="no variant 'nope'"):
        compare_in_run(ratios, Side("new", "nope"), Side("old"))


def test_pair_errors_are_one_line():
    ratios = pd.DataFrame([_ratio("a", "copy:numba", 1, 1, 0.9, 1.1),
                           _ratio("b", "copy:numba", 2, 1, 0.9, 1.1)])
    for bad in ("cpu", "=cpu", "cpu=", "a:=b", "a=b=c"):
        with pytest.raises(PairError, match="use NEW=OLD"):
            parse_pair(bad)
    assert parse_pair("cpu@main:rows=cpu") == (Side("cpu@main", "rows"), Side("cpu"))
    with pytest.raises(PairError, match="'gpu' was not timed in this run; its backends: a, b"):
        compare_in_run(ratios, Side("gpu"), Side("a"))
    with pytest.raises(PairError, match="never timed at the same point"):
        compare_in_run(ratios, Side("a"), Side("b"))
    with pytest.raises(PairError, match="with itself"):
        compare_in_run(ratios, Side("a"), Side("a"))


def test_ab_run_calls_cpu_slowed_slower_in_run():
    """Round 4's A/B run timed cpu-slowed (1.15x cpu by construction) beside cpu."""
    ratios, rows = load_ratios(AB_RUN), load_results(AB_RUN)
    t = compare_in_run(ratios, *parse_pair("cpu-slowed=cpu"), rows=rows)
    counts = t["label"].value_counts()
    assert len(t) == 72 and counts.get("slower", 0) >= 60 and counts.get("faster", 0) == 0
    assert t["change"].median() == pytest.approx(1.153, abs=0.005)
    rev = compare_in_run(ratios, *parse_pair("cpu=cpu-slowed"), rows=rows)["label"]
    assert (rev == "faster").sum() == counts["slower"]


def test_compare_pair_cli(tmp_path):
    result = invoke(compare, [AB_RUN, "--pair", "cpu-slowed=cpu", "--csv", tmp_path / "p.csv"])
    assert result.exit_code == 0, result.output
    assert "0 faster, 65 slower, 0 same, 7 ambiguous" in result.output
    assert len(pd.read_csv(tmp_path / "p.csv")) == 72
    assert invoke(compare, [AB_RUN, "--pair", "cpu-slowed=cpu", "--fail-on-slower"]
                  ).exit_code == 1
    assert invoke(compare, [AB_RUN, "--pair", "cpu=cpu-slowed", "--fail-on-slower"]
                  ).exit_code == 0
    wide = invoke(compare, [AB_RUN, "--pair", "cpu-slowed=cpu", "--run-sd", "0.0488"])
    assert wide.exit_code == 0 and "65 slower" not in wide.output
    for args, message in [
            (["--pair", "cpu-slowed"], "bad --pair 'cpu-slowed': use NEW=OLD"),
            (["--pair", "gpu=cpu"], "backend 'gpu' was not timed in this run"),
            (["--pair", "cpu-slowed:nope=cpu"], "no variant 'nope'"),
            (["--pair", "cpu=cpu"], "with itself"),
            ([AB_RUN, "--pair", "cpu-slowed=cpu"], "--pair compares two backends of one run"),
            (["--pair", "cpu-slowed=cpu", "--metric", "time"], "--metric compares two runs"),
            ([], "missing NEW")]:
        one_line_error(invoke(compare, [AB_RUN, *args]), 2, message)
    one_line_error(invoke(compare, [tmp_path, "--pair", "a=b"]), 1, "no ratios.jsonl")


def test_compare_pair_without_rows_file(tmp_path):
    shutil.copy(AB_RUN / "ratios.csv", tmp_path / "ratios.csv")
    result = invoke(compare, [tmp_path / "ratios.csv", "--pair", "cpu-slowed=cpu"])
    assert result.exit_code == 0 and "65 slower" in result.output, result.output


def test_against_bad_paths_are_one_line(tmp_path):
    one_line_error(invoke(bench, ["--against", tmp_path / "nowhere", "--list"]), 2,
                   "is not a directory")
    one_line_error(invoke(bench, ["--against", tmp_path, "--list"]), 2, "no nbbn package in")
    (tmp_path / "x" / "nbbn").mkdir(parents=True)
    (tmp_path / "x" / "nbbn" / "__init__.py").write_text("raise ImportError('broken copy')\n")
    one_line_error(invoke(bench, ["--against", f"bad name={tmp_path / 'x'}", "--list"]), 2,
                   "not a plain name")
    one_line_error(invoke(bench, ["--against", tmp_path / "x", "--list"]), 2,
                   "importing its nbbn failed: ImportError: broken copy")


def test_convert_refuses_a_field_the_copy_lacks():
    @dataclasses.dataclass
    class InferArgs:  # a copy from before fusion: no relu, no residual
        geom: object
        x: object
        running_mean: object
        running_var: object
        gamma: object
        beta: object
        eps: float
        out: object

    import nbbn.spec as ours

    theirs = types.SimpleNamespace(InferArgs=InferArgs, Geometry=ours.Geometry,
                                   Layout=ours.Layout)
    x = np.ones((4, 3), np.float32)
    args = validate.infer_args(x, np.zeros(3), np.ones(3), None, None, 1e-5, None, 1, False,
                               None)
    assert isinstance(against.convert(args, theirs), InferArgs)
    fused = validate.infer_args(x, np.zeros(3), np.ones(3), None, None, 1e-5, None, 1, True,
                                None)
    with pytest.raises(ValueError, match="no field 'relu'"):
        against.convert(fused, theirs)


@pytest.fixture
def package_copy(tmp_path):
    """A copy of this checkout's nbbn package (no caches) in tmp_path/copy; cpu@copy is
    unregistered afterwards."""
    dst = tmp_path / "copy" / "nbbn"
    shutil.copytree(ROOT / "nbbn", dst, ignore=shutil.ignore_patterns("__pycache__"))
    yield dst.parent
    if "cpu@copy" in registry.backend_names():
        against.unregister("cpu@copy")


@pytest.mark.slow  # a fresh copy compiles its kernel (~5 s of the fast tier's budget)
def test_against_runs_the_copys_own_kernel(package_copy):
    """One small kernel (NC inference, float32, serial): a fresh copy compiles it (~5 s)."""
    backend = against.register(str(package_copy))
    assert backend == "cpu@copy" and registry.backend_info(backend).kind == "kernel"
    assert against.register(f"copy={package_copy}") == backend  # the same again: a no-op
    spec = registry.select(backend, Op.INFERENCE, Layout.NC, "serial")
    # Its spec.py is ours byte for byte, so it takes our bundles: its kernel, unwrapped.
    assert not hasattr(spec.fn, "__wrapped__")
    assert Path(spec.fn.__code__.co_filename).is_relative_to(package_copy)
    rng = np.random.default_rng(0)
    x = (-2.3 + 0.5 * rng.standard_normal((6, 5))).astype(np.float32)
    rm, rv = rng.standard_normal(5), rng.uniform(0.5, 2, 5)
    args = validate.infer_args(x, rm, rv, None, None, 1e-5, None, 1, False, None)
    (y,) = spec.fn(args)
    (ref,) = registry.select("cpu", Op.INFERENCE, Layout.NC, "serial").fn(args)
    np.testing.assert_array_equal(y, ref)
    # The copy's kernels cache apart from what the copy imported as nbbn would load.
    cache = package_copy / "nbbn" / "cpu" / "__pycache__"
    assert list((cache / "nbbn-against").glob("*.nbi"))
    assert not list(cache.glob("*.nbi"))
    with pytest.raises(against.AgainstError, match="already names"):
        against.register(f"copy={ROOT}")


@pytest.mark.slow  # compiles a fresh copy's kernels for three ops and two layouts (~1 min)
def test_bench_against_a_copy_then_compare_pairs(package_copy, tmp_path):
    from .test_cli_bench import FAST

    out = tmp_path / "run"
    result = invoke(bench, ["--against", package_copy, "--backend", "cpu,cpu@copy,cpu-slowed",
                            "--shapes", "NC:5;NCHW:3,2,3", "--batch-sizes", "4",
                            "--layout", "NC,NCHW", *FAST, "--out", out])
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "bench.csv")
    assert set(rows["backend"]) == {"cpu", "cpu@copy", "cpu-slowed"}
    assert (rows["status"] == "ok").all() and rows["passed"].all()
    for pair in ("cpu@copy=cpu", "cpu-slowed=cpu"):
        res = invoke(compare, [out, "--pair", pair, "--csv", tmp_path / "p.csv"])
        assert res.exit_code == 0, res.output
        t = pd.read_csv(tmp_path / "p.csv")
        assert len(t) == 6 and t["label"].isin(["faster", "slower", "same", "ambiguous"]).all()


@pytest.mark.slow  # a second fresh copy compiles its kernel again (~5 s)
def test_against_converts_bundles_when_the_copys_spec_differs(package_copy):
    """A copy whose spec.py is not ours byte for byte gets our bundles converted to its classes
    (the wrapped path), and still computes what ours does."""
    spec_py = package_copy / "nbbn" / "spec.py"
    spec_py.write_text(spec_py.read_text() + "\n# a different spec.py\n")
    with pytest.warns(UserWarning, match="biased slower"):
        backend = against.register(str(package_copy))
    spec = registry.select(backend, Op.INFERENCE, Layout.NC, "serial")
    assert hasattr(spec.fn, "__wrapped__")
    assert spec.fn.bias_note == against.BIAS_NOTE  # into every row's notes (bench.cases)
    x = np.arange(30, dtype=np.float32).reshape(6, 5)
    args = validate.infer_args(x, np.zeros(5), np.ones(5), None, None, 1e-5, None, 1, False,
                               None)
    (y,) = spec.fn(args)
    (ref,) = registry.select("cpu", Op.INFERENCE, Layout.NC, "serial").fn(args)
    np.testing.assert_array_equal(y, ref)
