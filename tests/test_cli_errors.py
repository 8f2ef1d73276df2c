"""Every subcommand's bad arguments, table-driven: one line ``Error: ...``, a non-zero exit,
no traceback, and nothing written where the command would have written (the arguments are
checked before any work starts). Each case runs the real ``nbbn`` group in-process."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from nbbn.cli import main

#: (id, argv with {tmp} for a fresh folder, exit code, words the one-line error must hold)
CASES = [
    ("bench-max-time-nan", ["bench", "--max-time", "nan", "--out", "{tmp}/o"], 2, "finite"),
    ("bench-max-time-inf", ["bench", "--max-time", "inf", "--out", "{tmp}/o"], 2, "finite"),
    ("bench-quiet-load-nan", ["bench", "--quiet-load", "nan", "--out", "{tmp}/o"], 2, "finite"),
    ("bench-trial-time-nan", ["bench", "--trial-time", "nan", "--out", "{tmp}/o"], 2, "finite"),
    ("bench-isolate-bad", ["bench", "--isolate", "thread", "--out", "{tmp}/o"], 2, "thread"),
    ("bench-trials-order", ["bench", "--min-trials", "5", "--max-trials", "2", "--out",
                            "{tmp}/o"], 2, "max_trials"),
    ("bench-sets-per-process-0", ["bench", "--sets-per-process", "0", "--out", "{tmp}/o"], 2,
     "sets-per-process"),
    ("compare-run-sd-nan", ["compare", "{tmp}/a", "{tmp}/b", "--run-sd", "nan"], 2, "finite"),
    ("report-variance-missing", ["report", "variance", "{tmp}/none", "--out", "{tmp}/o"], 1,
     "samples.jsonl"),
    ("bench-unknown-op", ["bench", "--op", "sideways", "--out", "{tmp}/o"], 2, "sideways"),
    ("bench-bad-shape", ["bench", "--shapes", "NC:x", "--out", "{tmp}/o"], 2, "NC:x"),
    ("bench-bad-batch", ["bench", "-N", "0", "--out", "{tmp}/o"], 2, "0"),
    ("bench-threads-0", ["bench", "--threads", "0", "--out", "{tmp}/o"], 2, "--threads"),
    ("compare-missing", ["compare", "{tmp}/a", "{tmp}/b"], 1, "a"),
    ("report-targets-missing", ["report", "targets", "{tmp}/none", "--out", "{tmp}/o/t.md"], 1,
     "none"),
    ("report-fusion-missing", ["report", "fusion", "{tmp}/none", "--out", "{tmp}/o/f.md"], 1,
     "none"),
    ("report-readme-missing", ["report", "readme", "--readme", "{tmp}/o/README.md"], 1,
     "README.md"),
    ("accuracy-bad-part", ["accuracy", "--parts", "z", "--out", "{tmp}/o"], 2, "z"),
    ("accuracy-bad-size", ["accuracy", "--sizes", "1", "--out", "{tmp}/o"], 2, "1"),
    ("accuracy-bad-seed", ["accuracy", "--seed", "x", "--out", "{tmp}/o"], 2, "x"),
    ("paper-steps-1", ["paper", "--steps", "1", "--out", "{tmp}/o"], 2, "--steps"),
    ("paper-missing-data", ["paper", "--data", "{tmp}/nodata", "--out", "{tmp}/o"], 1,
     "nodata"),
    ("distributed-reps-neg", ["distributed", "bench", "--reps", "-5", "--out", "{tmp}/o/d.md"],
     2, "--reps"),
    ("distributed-budget-neg", ["distributed", "bench", "--budget", "-1",
                                "--out", "{tmp}/o/d.md"], 2, "--budget"),
    ("distributed-threads-0", ["distributed", "bench", "--threads", "0",
                               "--out", "{tmp}/o/d.md"], 2, "--threads"),
    ("distributed-timeout-0", ["distributed", "bench", "--timeout", "0",
                               "--out", "{tmp}/o/d.md"], 2, "--timeout"),
    ("distributed-quick-bad-shapes", ["distributed", "bench", "--quick", "--shapes", "NC:x",
                                      "--out", "{tmp}/o/d.md"], 2, "NC:x"),
    ("distributed-ranks-0", ["distributed", "bench", "--ranks", "0", "--out", "{tmp}/o/d.md"],
     2, "--ranks"),
    ("distributed-out-is-dir", ["distributed", "bench", "--quick", "--out", "{tmp}"], 2,
     "folder"),
    ("distributed-out-under-file", ["distributed", "bench", "--quick",
                                    "--out", "{tmp}/file/d.md"], 2, "cannot make"),
    ("ptxcheck-bad-cc", ["ptxcheck", "--cc", "nine"], 2, "--cc"),
    ("ptxcheck-bad-dtype", ["ptxcheck", "--dtype", "int8"], 2, "int8"),
    ("unknown-command", ["frobnicate"], 2, "frobnicate"),
]


@pytest.mark.parametrize("argv, code, words", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_arguments_are_one_line_errors(tmp_path, argv, code, words):
    (tmp_path / "file").write_text("a file, not a folder")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = sorted(p.name for p in tmp_path.rglob("*"))
    result = CliRunner().invoke(main, argv)
    assert result.exit_code == code, result.output
    assert not isinstance(result.exception, Exception) or isinstance(result.exception,
                                                                     SystemExit), result.exception
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert words in result.output, result.output
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.parametrize("argv", [[], ["bench"], ["compare"], ["report"], ["report", "targets"],
                                  ["report", "fusion"], ["report", "readme"], ["accuracy"],
                                  ["paper"], ["distributed"], ["distributed", "bench"],
                                  ["ptxcheck"]])
@pytest.mark.parametrize("flag", ["-h", "--help"])
def test_help_everywhere(argv, flag):
    result = CliRunner().invoke(main, [*argv, flag])
    assert result.exit_code == 0 and result.output.startswith("Usage:"), result.output


def test_distributed_bench_without_mpiexec_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("NBBN_MPIEXEC", str(tmp_path / "no-such-mpiexec"))
    monkeypatch.setattr("nbbn.distributed.launch.mpiexec_command",
                        lambda n: (_ for _ in ()).throw(FileNotFoundError("no mpiexec: pip "
                                                                          "install 'nbbn[mpi]'")))
    out = tmp_path / "o" / "d.md"
    result = CliRunner().invoke(main, ["distributed", "bench", "--quick", "--out", str(out)])
    assert result.exit_code == 1 and "Error: no mpiexec" in result.output, result.output
    assert "Traceback" not in result.output and not out.exists()


def test_bench_allocation_failure_exits_nonzero(tmp_path):
    """A point whose arrays cannot be allocated is an error row and a non-zero exit."""
    out = tmp_path / "o"
    result = CliRunner().invoke(main, ["bench", "--backend", "cpu", "--op", "inference",
                                       "--layout", "NC", "--shapes", "NC:4000000", "-N",
                                       "1000000", "--quick", "--no-plots", "--out", str(out)])
    assert result.exit_code == 1, result.output
    assert "1 error" in result.output


def test_compare_fail_on_slower_refuses_runs_with_nothing_in_common(tmp_path):
    """Two runs that share no configuration compare nothing: --fail-on-slower must not pass."""
    from nbbn.bench.runner import SCHEMA
    from nbbn.bench.sweep import KEY_COLUMNS
    from nbbn.output import RowLog

    for name, backend in (("a", "cpu"), ("b", "numpy")):
        Path(tmp_path / name).mkdir()
        row = {k: "x" for k in KEY_COLUMNS}
        row.update(schema=SCHEMA, backend=backend, status="ok", time_over_copy=1.0,
                   time_over_copy_ci_lo=0.9, time_over_copy_ci_hi=1.1)
        with RowLog(tmp_path / name / "rows.jsonl") as log:
            log.write(row)
    result = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b"),
                                       "--fail-on-slower"])
    assert result.exit_code == 1 and "nothing was compared" in result.output, result.output


# runpy warns when a module it runs was imported before (by earlier tests): harmless here.
@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")
@pytest.mark.parametrize("module, new", [
    ("nbbn.harness.targets", "nbbn report targets"), ("nbbn.harness.fusion", "nbbn report fusion"),
    ("nbbn.harness.readme", "nbbn report readme"), ("nbbn.distributed", "nbbn distributed"),
    ("nbbn.study.distributed", "nbbn accuracy --parts d"), ("nbbn.cuda.ptxcheck", "nbbn ptxcheck"),
    ("nbbn", None)])
def test_python_m_entry_points_still_work(module, new, monkeypatch, capsys):
    """Round 2's ``python -m`` entry points are deprecated aliases for one release: each runs
    the command it became (here with -h) and says where it went."""
    import runpy

    extra = ["bench"] if module == "nbbn.distributed" else []
    monkeypatch.setattr("sys.argv", [module, *extra, "-h"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    assert exc.value.code in (0, None)
    out = capsys.readouterr()
    assert "Usage:" in out.out
    if new:
        assert f"use `{new}`" in out.err


def test_command_echo_of_a_sub_command_names_its_group():
    """Reports echo the command that made them: `nbbn distributed bench --x 3`, not the group
    twice (the first distributed reports said `'nbbn distributed' distributed bench`)."""
    import click

    from nbbn.output import command_line

    seen = []

    @click.group("nbbn")
    def top():
        pass

    @top.group("distributed")
    def grp():
        pass

    @grp.command("bench")
    @click.option("--x", default=1)
    @click.pass_context
    def sub(ctx, x):
        seen.append(command_line(ctx))

    assert CliRunner().invoke(top, ["distributed", "bench", "--x", "3"]).exit_code == 0
    assert seen == ["nbbn distributed bench --x 3"]
