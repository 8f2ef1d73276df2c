"""``nbbn bench`` and ``nbbn compare`` driven through click's CliRunner on tiny sweeps."""

from __future__ import annotations

import importlib.util
import json
import re

import pandas as pd
import pytest
from click.testing import CliRunner

from nbbn import registry
from nbbn.harness.commands import bench, compare
from nbbn.report import RowLog, read_rows
from nbbn.spec import Op

from .test_harness import NUMPY_FNS, perturbed, register_throwaway, result_rows

FAST = ["--warmup", "0", "--min-repeats", "2", "--min-time", "0", "--max-time", "0.01",
        "--no-plots"]
TINY = ["--batch-sizes", "1,4", "--shapes", "5;3,2,3"]
MINIMAL_COLUMNS = {
    "backend", "op", "layout", "dtype", "N", "C", "H", "W", "time_ms_p50", "time_ms_p20",
    "time_ms_p80", "compile_s", "gbps", "copy_gbps", "pct_of_copy", "rel_err", "passed",
    "status", "skip_reason", "samples", "noise_pct", "bytes", "nbbn_version", "numba_version",
    "numpy_version", "torch_version", "threads", "device_name",
}


def invoke(cmd, args):
    return CliRunner().invoke(cmd, [str(a) for a in args])


def n_configurations(output: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) configurations: (\d+) to run, (\d+) skipped", output)
    assert m, output
    return int(m[1]), int(m[2]), int(m[3])


def test_help_explains_every_option():
    result = invoke(bench, ["--help"])
    assert result.exit_code == 0
    for opt in ("--op", "--layout", "--backend", "--dtype", "--batch-sizes", "--shapes",
                "--warmup", "--min-repeats", "--min-time", "--max-time", "--threads", "--quick",
                "--out",
                "--resume", "--plots", "--list"):
        assert opt in result.output
    for name in ("forward-train", "NCHW", "numpy", "torch-cpu", "resnet50", "mlp"):
        assert name in result.output
    assert invoke(compare, ["--help"]).exit_code == 0


def test_list_shows_backends_with_reasons():
    result = invoke(bench, ["--list"])
    assert result.exit_code == 0
    assert re.search(r"numpy\s+baseline\s+cpu\s+ready", result.output)
    assert re.search(r"torch-cuda\s+baseline\s+cuda\s+backend unavailable: ", result.output)


def test_tiny_sweep_writes_every_report(tmp_path):
    out = tmp_path / "run"
    result = invoke(bench, ["--backend", "cpu,numpy,torch-cpu,cuda,torch-cuda", *TINY,
                            *FAST, "--out", out])
    assert result.exit_code == 0, result.output
    total, to_run, skipped = n_configurations(result.output)
    assert total == 5 * 3 * 2 * 2 * 2  # backends × ops × layouts × N × shapes
    for name in ("rows.jsonl", "bench.csv", "bench.json", "summary.md", "run.json"):
        assert (out / name).is_file(), name
    df = pd.read_csv(out / "bench.csv")
    assert len(df) == total == len(read_rows(out / "rows.jsonl"))
    assert MINIMAL_COLUMNS <= set(df.columns)
    assert (df["status"] == "ok").sum() == to_run and (df["status"] == "skipped").sum() == skipped
    ok = df[df["status"] == "ok"]
    assert set(ok["backend"]) == {"cpu", "numpy", "torch-cpu"} and ok["passed"].all()
    assert (ok["time_ms_p50"] > 0).all() and (ok["pct_of_copy"] > 0).all()
    assert (ok["threads"] >= 1).all() and ok["numba_version"].notna().all()
    reasons = set(df["skip_reason"].dropna())
    assert any(r.startswith("m = 1 in training") for r in reasons)
    assert any(r.startswith("layout/shape mismatch") for r in reasons)
    assert "CUDA simulator: not timed" in reasons  # conftest turns the simulator on
    assert any(r.startswith("backend unavailable: torch.cuda") for r in reasons)
    assert (df[df["status"] == "skipped"]["time_ms_p50"].isna()).all()
    assert len(json.loads((out / "bench.json").read_text())) == total
    md = (out / "summary.md").read_text()
    assert "Command: `nbbn bench --backend cpu,numpy,torch-cpu,cuda,torch-cuda" in md
    assert "## Headline" in md and "cpu vs torch-cpu" in md and "## Skipped" in md


def test_quick_default_sweep_with_plots(tmp_path):
    result = invoke(bench, ["--quick", "--backend", "numpy", "--op", "inference",
                            "--min-repeats", "2", "--out", tmp_path])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.glob("*.png")) == [
        "gbps-inference-NC-float32.png", "gbps-inference-NCHW-float32.png"]


@pytest.fixture
def wrong_backend():
    register_throwaway("wrong", {op: perturbed(fn) for op, fn in NUMPY_FNS.items()})
    yield "wrong"
    registry.unregister_backend("wrong")


def test_correctness_gate_marks_failed_and_does_not_time(tmp_path, wrong_backend):
    result = invoke(bench, ["--backend", "wrong,numpy", "--batch-sizes", "4", "--shapes",
                            "6;3,2,3", *FAST, "--out", tmp_path])
    assert result.exit_code == 1
    assert "failed the correctness check" in result.output
    df = pd.read_csv(tmp_path / "bench.csv")
    wrong = df[df["backend"] == "wrong"]
    assert len(wrong) == 12 and (wrong["status"].isin(["failed", "skipped"])).all()
    failed = wrong[wrong["status"] == "failed"]
    assert len(failed) == 6 and (~failed["passed"].astype(bool)).all()
    assert (failed["rel_err"] > failed["tolerance"]).all()
    assert failed[["time_ms_p50", "samples", "gbps"]].isna().all().all()
    assert (df[df["backend"] == "numpy"]["status"].isin(["ok", "skipped"])).all()
    assert "## Failed or raised (not timed)" in (tmp_path / "summary.md").read_text()


@pytest.fixture
def interrupting_backend():
    """numpy kernels that raise KeyboardInterrupt on the 6th call while ``state["armed"]``:
    with one sample per configuration (first call + 1 sample), inside the 3rd flaky one."""
    state = {"calls": 0, "armed": True}

    def wrap(fn):
        def kernel(args):
            state["calls"] += 1
            if state["armed"] and state["calls"] == 6:
                raise KeyboardInterrupt
            return fn(args)
        return kernel

    register_throwaway("flaky", {op: wrap(fn) for op, fn in NUMPY_FNS.items()})
    yield state
    registry.unregister_backend("flaky")


def test_interrupt_keeps_rows_and_resume_finishes(tmp_path, interrupting_backend):
    args = ["--backend", "flaky,numpy", "--op", "inference,forward-train", "--layout", "NC",
            "--batch-sizes", "2,3,4", "--shapes", "5", "--warmup", "0", "--min-repeats", "1",
            "--min-time", "0", "--no-plots", "--out", tmp_path]
    first = invoke(bench, args)
    assert first.exit_code == 130, first.output
    assert "add --resume" in first.output
    kept = read_rows(tmp_path / "rows.jsonl")
    # Order: backend fastest, so flaky/numpy at N = 2, 3, then flaky N = 4 is interrupted.
    assert [(r["backend"], r["N"]) for r in kept] == [("flaky", 2), ("numpy", 2),
                                                      ("flaky", 3), ("numpy", 3)]
    assert len(pd.read_csv(tmp_path / "bench.csv")) == 4  # reports written from them

    # A torn last line (a kill mid-write) is dropped, not an error.
    with open(tmp_path / "rows.jsonl", "a") as f:
        f.write('{"schema": "nbbn-be')
    interrupting_backend["armed"] = False
    second = invoke(bench, [*args, "--resume"])
    assert second.exit_code == 0, second.output
    total, to_run, skipped = n_configurations(second.output)
    assert (total, to_run, skipped) == (12, 8, 0) and "4 already done" in second.output
    rows = read_rows(tmp_path / "rows.jsonl")
    keys = [(r["backend"], r["op"], r["N"]) for r in rows]
    assert len(rows) == 12 and len(set(keys)) == 12
    assert all(r["status"] == "ok" for r in rows)

    third = invoke(bench, [*args, "--resume"])  # nothing left to do
    assert n_configurations(third.output)[1] == 0 and len(read_rows(tmp_path / "rows.jsonl")) == 12


def test_compare_labels_hand_made_files(tmp_path):
    old = result_rows({1: (1.0, 1.1, 1.2), 2: (1.0, 1.1, 1.2), 4: (1.0, 1.1, 1.2)})
    new = result_rows({1: (0.5, 0.55, 0.6), 2: (1.5, 1.65, 1.8), 4: (1.1, 1.15, 1.3)})
    pd.DataFrame(old).to_csv(tmp_path / "old.csv", index=False)
    with RowLog(tmp_path / "new.jsonl") as log:
        for r in new:
            log.write(r)
    result = invoke(compare, [tmp_path / "old.csv", tmp_path / "new.jsonl", "--csv",
                              tmp_path / "cmp.csv"])
    assert result.exit_code == 0, result.output
    assert "1 faster, 1 slower, 1 same" in result.output
    table = pd.read_csv(tmp_path / "cmp.csv").set_index("N")
    assert list(table.loc[[1, 2, 4], "label"]) == ["faster", "slower", "same"]
    assert table.loc[1, "ratio"] == pytest.approx(2.0)
    slower = invoke(compare, [tmp_path / "old.csv", tmp_path / "new.jsonl", "--fail-on-slower"])
    assert slower.exit_code == 1


BAD_BENCH = [
    (["--op", "forward"], "unknown op 'forward'"),
    (["--layout", "NHWC"], "unknown layout 'NHWC'"),
    (["--backend", "cpu,gpu"], "unknown backend 'gpu'"),
    (["--dtype", "float16"], "unknown dtype 'float16'"),
    (["--shapes", "resnet34"], "bad shape 'resnet34'"),
    (["--shapes", "64,56"], "bad shape '64,56'"),
    (["--batch-sizes", "1,two"], "bad batch sizes"),
    (["--batch-sizes", "0"], "bad batch sizes"),
    (["--min-repeats", "0"], "--min-repeats"),
    (["--threads", "4096"], "--threads 4096 is more than Numba's"),
]


@pytest.mark.parametrize("args,message", BAD_BENCH)
def test_bad_bench_input_is_a_one_line_error(tmp_path, args, message):
    result = invoke(bench, [*args, "--out", tmp_path / "never"])
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    error = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(error) == 1 and message in error[0], result.output
    assert not (tmp_path / "never").exists()


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke(bench, ["--quick", "--backend", "numpy", "--out", tmp_path / "afile" / "sub"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert result.output.startswith("Error: cannot write to output folder")
    assert len(result.output.strip().splitlines()) == 1


def test_compare_rejects_files_that_are_not_ours(tmp_path):
    pd.DataFrame(result_rows({1: (1, 1, 1)})).to_csv(tmp_path / "ours.csv", index=False)
    (tmp_path / "theirs.csv").write_text("name,score\nx,1\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\x00\xff\x00garbage\n\x01\n")
    for other in ("theirs.csv", "binary.jsonl", "nothing-here.csv"):
        result = invoke(compare, [tmp_path / "ours.csv", tmp_path / other])
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), other
        assert result.output.startswith("Error: ") and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1, result.output


def test_resume_refuses_a_rows_file_that_is_not_ours(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"hello": 1}\n')
    result = invoke(bench, ["--quick", "--backend", "numpy", "--resume", "--out", tmp_path])
    assert result.exit_code == 1 and "not nbbn bench rows" in result.output


@pytest.mark.skipif(importlib.util.find_spec("nbbn.study.commands") is None,
                    reason="nbbn.study.commands (the accuracy command) is not written yet")
def test_bench_and_compare_are_nbbn_subcommands():
    from nbbn.cli import main

    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0 and "--batch-sizes" in result.output
    assert "compare" in CliRunner().invoke(main, ["--help"]).output


def test_op_and_layout_lists_and_repeats(tmp_path):
    import numba
    import torch

    before = numba.get_num_threads(), torch.get_num_threads()
    result = invoke(bench, ["--backend", "numpy,torch-cpu", "--op", "backward", "--op", "inference",
                            "--threads", "1",
                            "--layout", "NCHW", "--batch-sizes", "2", "--shapes", "3,2,2",
                            *FAST, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp_path / "bench.csv")
    assert set(df["op"]) == {str(Op.BACKWARD), str(Op.INFERENCE)} and set(df["layout"]) == {"NCHW"}
    assert (df["threads"] == 1).all() and (df["torch_threads"] == 1).all()
    assert "--threads 1" in (tmp_path / "summary.md").read_text()
    assert (numba.get_num_threads(), torch.get_num_threads()) == before  # restored afterwards
