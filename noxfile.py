"""Developer sessions: ``nox -s lint tests``, ``nox -s bench``, ``nox -s report``."""

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.default_venv_backend = "venv"


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
    """The whole suite: CPU kernels, CUDA kernels under the simulator, PTX compile checks."""
    _install(session, "cuda,plot,test")
    session.run("python", "-m", "pytest", *session.posargs)


@nox.session
def bench(session):
    """pytest-benchmark suite, autosaved under .benchmarks/.

    Compare with the last saved run: ``nox -s bench -- --benchmark-compare
    --benchmark-compare-fail=median:10%``.
    """
    _install(session, "test")
    session.run("python", "-m", "pytest", "benchmarks/test_cpu.py", "--benchmark-autosave",
                "--benchmark-json=.benchmarks/latest.json", *session.posargs)
    session.run("python", "benchmarks/summarize.py", ".benchmarks/latest.json",
                "--out", "results/cpu-kernels.md", "--command", "nox -s bench")


@nox.session
def report(session):
    """Re-make the committed reports of this machine: nbbn bench and nbbn accuracy."""
    _install(session, "plot,test")
    session.run("nbbn", "bench", "--out", "results/bench-cpu")
    session.run("nbbn", "accuracy", "--out", "results/accuracy")
