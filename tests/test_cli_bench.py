"""``nbbn bench`` and ``nbbn compare`` driven through click's CliRunner on tiny sweeps, and the
report generators (results/cpu-kernels.md, README's headline block)."""

from __future__ import annotations

import json
import os
import re

import pandas as pd
import pytest
from click.testing import CliRunner

from nbbn import registry
from nbbn.bench.cli import bench, compare, report
from nbbn.output import RowLog, read_rows

from .test_harness import NUMPY_FNS, register_throwaway, result_rows

#: Under the CUDA simulator (tests/conftest.py) the cuda backend is checked but not timed and
#: torch-cuda is unavailable; on a GPU (NBBN_TEST_GPU=1) both run, so those asserts do not hold.
SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
FAST = ["--isolate", "none", "--warmup", "0", "--min-rounds", "3", "--max-time", "0.01",
        "--min-trials", "2", "--max-trials", "2", "--trial-time", "0", "--no-plots"]
TINY = ["--batch-sizes", "1,4", "--shapes", "NC:5;NCHW:3,2,3"]


def invoke(cmd, args):
    return CliRunner().invoke(cmd, [str(a) for a in args])


def counts(output: str) -> tuple[int, int, int]:
    m = re.search(r"(\d+) configurations in \d+ points: (\d+) to run \(\d+ points\), "
                  r"(\d+) skipped", output)
    assert m, output
    return int(m[1]), int(m[2]), int(m[3])


def one_line_error(result, code: int, message: str) -> None:
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and message in lines[0], \
        result.output


def test_help_explains_every_option():
    result = invoke(bench, ["--help"])
    assert result.exit_code == 0
    for opt in ("--sweep", "--op", "--layout", "--backend", "--variant", "--dtype", "--fusion",
                "--call", "--cache", "--batch-sizes", "--shapes", "--baseline", "--min-rounds",
                "--max-rounds", "--max-time", "--ci", "--warmup", "--seed", "--threads",
                "--quick", "--out", "--resume", "--plots", "--require-quiet", "--quiet-timeout",
                "--quiet-load", "--list"):
        assert opt in result.output, opt
    for name in ("forward-train", "NHWC", "torch-cpu", "resnet50", "cpu-targets", "cold", "api"):
        assert name in result.output
    assert "ambiguous" in invoke(compare, ["--help"]).output


def test_list_shows_backends_variants_and_sweeps():
    result = invoke(bench, ["--list"])
    assert result.exit_code == 0
    assert re.search(r"numpy\s+baseline\s+cpu\s+ready; variants default\*", result.output)
    assert re.search(r"cpu\s+kernel\s+cpu\s+ready; variants .*auto\*", result.output)
    if SIMULATOR:
        assert re.search(r"torch-cuda\s+baseline\s+cuda\s+backend unavailable: ", result.output)
    assert "cpu-targets" in result.output and "cuda-targets" in result.output


def test_tiny_sweep_writes_every_report(tmp_path):
    out = tmp_path / "run"
    result = invoke(bench, ["--backend", "cpu,numpy,cuda,torch-cuda", *TINY, *FAST,
                            "--out", out])
    assert result.exit_code == 0, result.output
    total, to_run, skipped = counts(result.output)
    # NC 5, NCHW 3x2x3 at N = 1, 4; 3 ops; 4 backends: every configuration valid
    assert total == 2 * 2 * 3 * 4
    for name in ("rows.jsonl", "ratios.jsonl", "bench.csv", "ratios.csv", "summary.md",
                 "run.json"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.json")) or [p.name for p in out.glob("*.json")] == ["run.json"]
    df = pd.read_csv(out / "bench.csv")
    assert len(df) == total == len(read_rows(out / "rows.jsonl"))
    assert (df["status"] == "ok").sum() == to_run and (df["status"] == "skipped").sum() == skipped
    ok = df[df["status"] == "ok"]
    assert set(ok["backend"]) == {"cpu", "numpy"} and ok["passed"].all()
    assert (ok["speedup"].notna() == (ok["backend"] == "cpu")).all()  # over numpy
    reasons = set(df["skip_reason"].dropna())
    assert any(r.startswith("m = 1 in training") for r in reasons)  # NC at N = 1
    if SIMULATOR:
        assert "CUDA simulator: not timed" in reasons
        assert any(r.startswith("backend unavailable: torch.cuda") for r in reasons)
    assert not any("mismatch" in r for r in reasons)
    run_json = json.loads((out / "run.json").read_text())
    assert run_json["command"].startswith("nbbn bench --backend cpu,numpy,cuda,torch-cuda")
    assert run_json["load_before_1m"] is not None and run_json["load_after_1m"] is not None
    md = (out / "summary.md").read_text()
    assert "Command: `nbbn bench --backend cpu,numpy,cuda,torch-cuda" in md
    assert "## Headline" in md and "## Skipped" in md


@pytest.mark.slow  # half kernels the fast tier's warm-up does not compile
def test_half_dtype_from_the_cli(tmp_path):
    """--dtype float16 through forward-train and backward: cpu and torch-cpu ok (float32
    per-channel outputs and running statistics, half tolerances), numpy skipped with the
    reason; the help says what half storage means."""
    out = tmp_path / "half"
    result = invoke(bench, ["--dtype", "float16", "--backend", "cpu,torch-cpu,numpy", "--op",
                            "forward-train,backward", "--shapes", "NC:5", "--batch-sizes", "6",
                            *FAST, "--out", out])
    assert result.exit_code == 0, result.output
    assert "skipped    2: numpy default does not run float16 (it runs float32, float64)" \
        in result.output
    df = pd.read_csv(out / "bench.csv")
    ok = df[df["status"] == "ok"]
    assert sorted(zip(ok["backend"], ok["op"], strict=True)) == [
        ("cpu", "backward"), ("cpu", "forward-train"), ("torch-cpu", "backward"),
        ("torch-cpu", "forward-train")]
    assert ok["passed"].all() and set(ok["dtype"]) == {"float16"}
    assert (ok["x_bytes"] == 2 * 6 * 5).all()
    for op, errors in zip(ok["op"], ok["errors"], strict=True):  # every output was checked
        names = {e.split("=")[0] for e in errors.split("; ")}
        assert names == ({"dx", "dgamma", "dbeta"} if op == "backward" else
                         {"y", "save_mean", "save_invstd", "running_mean", "running_var"})
    assert "bfloat16" in invoke(bench, ["--help"]).output


def test_variant_axis_from_the_cli(tmp_path):
    args = ["--backend", "cpu,numpy", "--op", "inference", "--shapes", "NCHW:3,2,2",
            "--batch-sizes", "2", *FAST]
    every = invoke(bench, [*args, "--variant", "all", "--out", tmp_path / "all"])
    assert every.exit_code == 0, every.output
    df = pd.read_csv(tmp_path / "all" / "bench.csv")
    cpu = registry.variants("cpu", "inference", "NCHW")
    assert sorted(df[df["backend"] == "cpu"]["variant"]) == sorted(cpu)
    assert list(df[df["backend"] == "numpy"]["variant"]) == ["default"]
    one = invoke(bench, [*args, "--variant", cpu[-1], "--out", tmp_path / "one"])
    assert one.exit_code == 0, one.output
    df = pd.read_csv(tmp_path / "one" / "bench.csv")
    assert sorted(zip(df["backend"], df["variant"], strict=True)) == [("cpu", cpu[-1]),
                                                                       ("numpy", "default")]


BAD_BENCH = [
    (["--op", "forward"], "unknown op 'forward'"),
    (["--layout", "NWHC"], "unknown layout 'NWHC'"),
    (["--backend", "cpu,gpu"], "unknown backend 'gpu'"),
    (["--dtype", "int8"], "unknown dtype 'int8'; choose from float32, float64, float16"),
    (["--cache", "hot"], "unknown cache 'hot'; choose from cold, warm"),
    (["--call", "python"], "unknown call 'python'"),
    (["--fusion", "gelu"], "unknown fusion 'gelu'"),
    (["--variant", "v7", "--backend", "cpu,numpy"], "unknown variant 'v7'"),
    (["--sweep", "gpu-targets"], "gpu-targets"),
    (["--sweep", "cpu-targets", "--shapes", "NC:3"], "fixes its shapes"),
    (["--shapes", "resnet34"], "bad shape 'resnet34'"),
    (["--shapes", "NC:64,56,56"], "NC takes C"),
    (["--batch-sizes", "1,two"], "bad batch sizes"),
    (["--min-rounds", "0"], "--min-rounds"),
    (["--ci", "1.5"], "--ci"),
    (["--threads", "4096"], "--threads 4096 is more than Numba's"),
    (["--baseline", "cpu"], "unknown baseline 'cpu'"),
]


@pytest.mark.parametrize("args,message", BAD_BENCH)
def test_bad_bench_input_is_a_one_line_error(tmp_path, args, message):
    result = invoke(bench, [*args, "--out", tmp_path / "never"])
    one_line_error(result, 2, message)
    assert not (tmp_path / "never").exists()


def test_unwritable_output_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    result = invoke(bench, ["--quick", "--backend", "numpy", "--out", tmp_path / "afile" / "sub"])
    one_line_error(result, 1, "cannot write to output folder")


def test_require_quiet_refuses_or_goes_ahead(tmp_path):
    args = ["--backend", "numpy", "--op", "inference", "--shapes", "NC:3", "--batch-sizes", "2",
            *FAST, "--require-quiet", "--quiet-timeout", "0"]
    refused = invoke(bench, [*args, "--quiet-load", "0", "--out", tmp_path / "no"])
    one_line_error(refused, 1, "host not quiet: 1-minute load")
    assert not (tmp_path / "no").exists()
    ok = invoke(bench, [*args, "--quiet-load", "10000", "--out", tmp_path / "yes"])
    assert ok.exit_code == 0, ok.output
    assert json.loads((tmp_path / "yes" / "run.json").read_text())["quiet_required"] is True


@pytest.fixture
def interrupting_backend():
    """numpy kernels that raise KeyboardInterrupt on their 5th call while armed: inside the
    2nd point's timing (first call + 3 rounds per point, no warm-up)."""
    state = {"calls": 0, "armed": True}

    def wrap(fn):
        def kernel(args):
            state["calls"] += 1
            if state["armed"] and state["calls"] == 5:
                raise KeyboardInterrupt
            return fn(args)
        return kernel

    register_throwaway("flaky", {op: wrap(fn) for op, fn in NUMPY_FNS.items()})
    yield state
    registry.unregister_backend("flaky")


def test_interrupt_keeps_points_and_resume_finishes(tmp_path, interrupting_backend):
    args = ["--backend", "flaky,numpy", "--op", "inference,forward-train", "--layout", "NC",
            "--batch-sizes", "2,3,4", "--shapes", "5", "--warmup", "0", "--min-rounds", "3",
            "--max-rounds", "3", "--min-trials", "1", "--max-trials", "1", "--no-plots",
            "--isolate", "none", "--out", tmp_path]  # flaky lives in this process only
    first = invoke(bench, args)
    assert first.exit_code == 130, first.output
    assert "add --resume" in first.output
    kept = read_rows(tmp_path / "rows.jsonl")
    assert [(r["backend"], r["N"]) for r in kept] == [("flaky", 2), ("numpy", 2)]
    assert len(pd.read_csv(tmp_path / "bench.csv")) == 2  # reports written from them
    with open(tmp_path / "rows.jsonl", "a") as f:  # a kill mid-write: dropped, not an error
        f.write('{"schema": "nbbn-be')
    interrupting_backend["armed"] = False
    second = invoke(bench, [*args, "--resume"])
    assert second.exit_code == 0, second.output
    assert counts(second.output) == (12, 10, 0) and "2 already done" in second.output
    rows = read_rows(tmp_path / "rows.jsonl")
    keys = [(r["backend"], r["op"], r["N"]) for r in rows]
    assert len(rows) == 12 and len(set(keys)) == 12
    assert all(r["status"] == "ok" for r in rows)
    third = invoke(bench, [*args, "--resume"])  # nothing left to do
    assert counts(third.output)[1] == 0 and len(read_rows(tmp_path / "rows.jsonl")) == 12
    changed = invoke(bench, [*args, "--resume", "--cache", "warm"])  # cache is in the key
    assert counts(changed.output)[1] == 12


def test_resume_refuses_a_rows_file_that_is_not_ours(tmp_path):
    (tmp_path / "rows.jsonl").write_text('{"hello": 1}\n')
    result = invoke(bench, ["--quick", "--backend", "numpy", "--resume", "--out", tmp_path])
    one_line_error(result, 1, "not nbbn-bench/2 bench rows")


def _write(path, rows):
    with RowLog(path) as log:
        for r in rows:
            log.write(r)


def test_compare_labels_and_fail_on_slower(tmp_path):
    old = result_rows({1: (1.0, 0.98, 1.02), 2: (1.0, 0.98, 1.02), 4: (1.0, 0.98, 1.02),
                       8: (1.0, 0.98, 1.02)})
    new = result_rows({1: (0.5, 0.49, 0.51), 2: (1.5, 1.45, 1.55), 4: (1.01, 0.99, 1.03),
                       8: (1.1, 0.8, 1.4)})
    pd.DataFrame(old).to_csv(tmp_path / "old.csv", index=False)
    _write(tmp_path / "new.jsonl", new)
    result = invoke(compare, [tmp_path / "old.csv", tmp_path / "new.jsonl", "--csv",
                              tmp_path / "cmp.csv", "--run-sd", "0", "--margin", "0.1"])
    assert result.exit_code == 0, result.output
    assert "1 faster, 1 slower, 1 same, 1 ambiguous" in result.output
    table = pd.read_csv(tmp_path / "cmp.csv").set_index("N")
    assert list(table.loc[[1, 2, 4, 8], "label"]) == ["faster", "slower", "same", "ambiguous"]
    slower = invoke(compare, [tmp_path / "old.csv", tmp_path / "new.jsonl", "--fail-on-slower",
                              "--run-sd", "0"])
    assert slower.exit_code == 1
    _write(tmp_path / "same.jsonl", old)
    same = invoke(compare, [tmp_path / "old.csv", tmp_path / "same.jsonl", "--fail-on-slower",
                            "--run-sd", "0"])
    assert same.exit_code == 0 and "0 faster, 0 slower, 4 same, 0 ambiguous" in same.output
    wider = invoke(compare, [tmp_path / "old.csv", tmp_path / "new.jsonl", "--threshold", "1.5",
                             "--run-sd", "0"])
    assert "0 faster, 0 slower, 4 same" in wider.output


def test_compare_two_real_runs(tmp_path):
    args = ["--backend", "numpy", "--op", "inference", "--shapes", "NC:5", "--batch-sizes", "4",
            *FAST]
    for name in ("a", "b"):
        assert invoke(bench, [*args, "--out", tmp_path / name]).exit_code == 0
    result = invoke(compare, [tmp_path / "a", tmp_path / "b", "--metric", "time"])
    assert result.exit_code == 0, result.output
    assert re.search(r"\d faster, \d slower, \d same, \d ambiguous", result.output)


def test_compare_rejects_files_that_are_not_ours(tmp_path):
    pd.DataFrame(result_rows({1: (1, 1, 1)})).to_csv(tmp_path / "ours.csv", index=False)
    (tmp_path / "theirs.csv").write_text("name,score\nx,1\n")
    (tmp_path / "binary.jsonl").write_bytes(b"\x00\xff\x00garbage\n\x01\n")
    pd.DataFrame(result_rows({1: (1, 1, 1)})).assign(schema="nbbn-bench/1").to_csv(
        tmp_path / "round1.csv", index=False)
    for other in ("theirs.csv", "binary.jsonl", "nothing-here.csv", "round1.csv"):
        result = invoke(compare, [tmp_path / "ours.csv", tmp_path / other])
        one_line_error(result, 1, "")
    one_line_error(invoke(compare, [tmp_path / "ours.csv", tmp_path / "ours.csv", "--metric",
                                    "speed"]), 2, "--metric")


def test_bench_and_compare_are_nbbn_subcommands():
    from nbbn.cli import main

    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0 and "--variant" in result.output
    assert "compare" in CliRunner().invoke(main, ["--help"]).output


def test_threads_apply_to_numba_and_torch_and_are_restored(tmp_path):
    import numba
    import torch

    before = numba.get_num_threads(), torch.get_num_threads()
    result = invoke(bench, ["--backend", "numpy,torch-cpu", "--op", "backward", "--op",
                            "inference", "--threads", "1", "--layout", "NCHW", "--batch-sizes",
                            "2", "--shapes", "3,2,2", *FAST, "--out", tmp_path])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(tmp_path / "bench.csv")
    assert set(df["op"]) == {"backward", "inference"} and set(df["layout"]) == {"NCHW"}
    assert (df["threads"] == 1).all() and (df["torch_threads"] == 1).all()
    assert "--threads 1" in (tmp_path / "summary.md").read_text()
    assert (numba.get_num_threads(), torch.get_num_threads()) == before


# --------------------------------------------------------------------------------- generators


@pytest.fixture(scope="module")
def target_run(tmp_path_factory):
    """A tiny stand-in for a cpu-targets run: cpu vs torch-cpu, allocating calls, the (8, 16)
    per-call point tagged tiny (with few rounds: its figures are not the point here)."""
    out = tmp_path_factory.mktemp("cpu-kernels")
    result = invoke(bench, ["--backend", "cpu,torch-cpu", "--call", "api", "--shapes",
                            "NC:16;NHWC:4,2,2", "--batch-sizes", "8", *FAST, "--out", out])
    assert result.exit_code == 0, result.output
    df = pd.read_csv(out / "bench.csv")
    df["tag"] = df["tag"].astype(object)
    df.loc[df["layout"] == "NC", "tag"] = "tiny"
    df.to_csv(out / "bench.csv", index=False)
    return out


def report_cmd(argv) -> int:
    """``nbbn report ARGV``'s exit code (one-line errors, no traceback)."""
    result = CliRunner().invoke(report, argv)
    assert "Traceback" not in result.output
    return result.exit_code


def test_targets_report(target_run, tmp_path):
    notes = tmp_path / "notes.md"
    notes.write_text("Backward NC misses because ...")
    assert report_cmd(["targets", str(target_run), "--out", str(tmp_path / "t.md"), "--notes",
                       str(notes)]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "Command: `nbbn bench --backend cpu,torch-cpu --call api" in md
    assert "1-minute load average before the run" in md and "the host was" in md
    for line in ("at least as fast as PyTorch on every point", "by geometric mean",
                 "per call on (8, 16)"):
        assert line in md
    assert "## forward-train" in md and "## Per-call cost (tiny calls)" in md
    assert "Backward NC misses because" in md
    assert report_cmd(["targets", str(tmp_path / "missing")]) == 1


def test_readme_headline_is_generated(target_run, tmp_path):
    src = target_run.relative_to(target_run.parent)
    text = (f"# x\n\nbefore\n<!-- nbbn:headline:begin source={src} -->\nstale\n"
            "<!-- nbbn:headline:end -->\nafter\n")
    path = target_run.parent / "README.md"
    path.write_text(text)
    assert report_cmd(["readme", "--readme", str(path), "--check"]) == 1
    assert report_cmd(["readme", "--readme", str(path)]) == 0
    new = path.read_text()
    assert "stale" not in new and new.startswith("# x\n\nbefore\n") and new.endswith("after\n")
    assert "| kernel | op | layout |" in new and "nbbn report readme" in new
    assert report_cmd(["readme", "--readme", str(path), "--check"]) == 0
    (tmp_path / "R.md").write_text("no markers")
    assert report_cmd(["readme", "--readme", str(tmp_path / "R.md")]) == 1


def test_per_call_from_a_warm_run(target_run, tmp_path):
    """--per-call (targets) and per_call= (README marker): the (8, 16) target is judged from the
    warm run's rows, and says so."""
    warm = target_run.parent / "per-call"
    result = invoke(bench, ["--backend", "cpu,torch-cpu", "--call", "api", "--cache", "warm",
                            "--shapes", "NC:16", "--batch-sizes", "8", *FAST, "--out", warm])
    assert result.exit_code == 0, result.output
    assert report_cmd(["targets", str(target_run), "--out", str(tmp_path / "t.md"),
                       "--per-call", str(warm)]) == 0
    md = (tmp_path / "t.md").read_text()
    assert "## Per-call cost, warm" in md and "cache warm): " in md
    assert "cache cold): " not in md  # the cold tiny rows no longer judge the target
    src, pc = (p.relative_to(target_run.parent) for p in (target_run, warm))
    path = target_run.parent / "README2.md"
    path.write_text(f"<!-- nbbn:headline:begin source={src} per_call={pc} -->\n"
                    "<!-- nbbn:headline:end -->\n")
    assert report_cmd(["readme", "--readme", str(path)]) == 0
    new = path.read_text()
    assert "8×16 call µs (warm)" in new and f"per_call={pc}" in new
    row = next(line for line in new.splitlines() if line.startswith("| cpu | forward-train | NC"))
    assert row.split("|")[-2].strip() not in ("", "nan")
