"""Developer sessions: ``nox -s lint tests`` (the default), ``nox -s tests_full``, ``nox -s docs``,
``nox -s bench``, ``nox -s report``."""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"

#: The fused-op report's shapes (results/fusion-cpu.md): an early and a late ResNet-50 stage at
#: N = 32, channels first and last (NHWC runs the NC kernel family, with N·H·W rows).
FUSION_SHAPES = ["--shapes", "NCHW:256,56,56 NCHW:1024,14,14 NHWC:256,56,56 NHWC:1024,14,14",
                 "-N", "32"]


def _install(session, extras="test"):
    # torch is optional (PyTorch baselines); a missing wheel must not stop the session.
    try:
        session.install("torch==2.13.0", silent=True)
    except Exception:  # noqa: BLE001
        session.log("torch not installed: PyTorch baselines will be skipped")
    session.install("-e", f".[{extras}]")


@nox.session
def lint(session):
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session
def tests(session):
    """The fast tier (README's ``python -m pytest``): every kernel × variant × layout × dtype ×
    fusion on small shapes (CUDA under the simulator), every error path, the CLIs."""
    _install(session, "cuda,plot,test,mpi,paper")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def tests_full(session):
    """The exhaustive tier: m = 2^24 + 1, simulator grids, PTX for every kernel, MPI runs,
    subprocess CLIs, the accuracy peers; Hypothesis with its larger profile."""
    _install(session, "cuda,plot,test,mpi,paper,peers")
    session.run("python", "-m", "pytest", "-m", "slow", *session.posargs,
                env={"NBBN_HYPOTHESIS_PROFILE": "full"})


@nox.session
def docs(session):
    """The docs/ pages as a site (MkDocs, Material); fails on a broken link or page."""
    session.install("-e", ".[docs]")
    session.run("mkdocs", "build", "--strict", *session.posargs)


@nox.session
def bench(session):
    """pytest-benchmark over the harness's case table (benchmarks/), autosaved under .benchmarks/.

    Compare with the last saved run: ``nox -s bench -- --benchmark-compare`` (a local trend:
    pytest-benchmark has no paired trial intervals, so it is no regression gate; use ``nbbn
    compare OLD NEW --fail-on-slower``, benchmarks/test_bench.py says why).
    ``NBBN_BENCH_SWEEP=quick|default|cpu-targets`` picks the sweep (benchmarks/test_bench.py).
    Paired figures with intervals: ``nbbn bench``.
    """
    _install(session, "test")
    # -n 0: pytest-benchmark times nothing on xdist workers (pyproject addopts has -n auto).
    session.run("python", "-m", "pytest", "benchmarks", "-n", "0", "--benchmark-autosave",
                "--benchmark-json=.benchmarks/latest.json", *session.posargs)


@nox.session
def report(session):
    """Re-make the committed reports of this machine (run it on a quiet host: it waits up to
    5 minutes for a 1-minute load below 0.5, else stops): the default bench sweep, issue #9's
    target sweep and its report, the fused-op sweep and its report, README's generated headline,
    the accuracy study with its peers, the distributed cost."""
    _install(session, "plot,test,peers,mpi")
    quiet = ["--require-quiet", "--quiet-timeout", "300"]
    session.run("nbbn", "bench", *quiet, "--out", "results/bench-cpu")
    session.run("nbbn", "bench", "--sweep", "cpu-targets", "--threads", "2",
                *quiet, "--out", "results/cpu-kernels")
    session.run("nbbn", "report", "targets", "results/cpu-kernels", "--out",
                "results/cpu-kernels.md", *(["--notes", "results/cpu-kernels.notes.md"]
                                            if Path("results/cpu-kernels.notes.md").exists()
                                            else []))
    session.run("nbbn", "bench", "--backend", "cpu,nbbn-unfused,torch-cpu",
                "--fusion", "none,relu,add-relu", "--threads", "2", *quiet, *FUSION_SHAPES,
                "--out", "results/fusion-cpu")
    session.run("nbbn", "report", "fusion", "results/fusion-cpu", "--out",
                "results/fusion-cpu.md")
    session.run("nbbn", "report", "readme")
    session.run("nbbn", "accuracy", "--out", "results/accuracy")
    session.run("nbbn", "distributed", "bench", "--ranks", "1,2", "--out",
                "results/distributed.md")
