"""The parts of ``nbbn accuracy``, as a registry: adding a part is one :class:`Part` entry in
:data:`PARTS` (or a :func:`register` call) and one module.

A part has a key (its letter, the order in the report), a name, one line of help, and up to
three functions named ``"module:function"``, imported only when used:

* ``run(ctx: RunContext) -> None`` computes, saves its tidy tables with ``ctx.save(name, df)``
  and its skips with ``ctx.skip(rows)`` (each row: part, item, reason);
* ``report(tables: dict[str, DataFrame]) -> Section`` (optional) returns its key findings (one
  Markdown paragraph each) and its section of ``report.md``, from the saved tables only;
* ``plots(out: Path, tables) -> list[Path]`` (optional) draws its PNG figures (matplotlib is
  imported by the caller first; a part without matplotlib-free fallbacks may assume it).

Letters in use: a rounding, b sampling, c estimators, d distributed, e gradients.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd


@dataclass(frozen=True)
class Part:
    key: str
    name: str
    help: str
    run: str
    report: str | None = None
    plots: str | None = None


@dataclass
class Section:
    """What a part contributes to report.md: key findings and its own section's lines."""

    findings: list[str] = field(default_factory=list)
    lines: list[str] = field(default_factory=list)


@dataclass
class RunContext:
    """What a part's ``run`` gets: the command's options, and where its results go."""

    quick: bool
    sizes: list[int] | None
    seed: int
    distributions: list[str]
    activations: object | None
    peers: bool
    save: Callable[[str, pd.DataFrame], None]
    skip: Callable[[list[dict]], None]
    progress: Callable[[str, int, str], AbstractContextManager]
    echo: Callable[[str], None]
    #: the output folder (for parts that write files of their own) and whether to draw plots
    out: Path = Path(".")
    plots: bool = True
    #: facts for the report's header (e.g. the versions of the peers that ran)
    meta: dict = field(default_factory=dict)


PARTS: dict[str, Part] = {}


def register(part: Part) -> Part:
    if part.key in PARTS or part.name in {p.name for p in PARTS.values()}:
        raise ValueError(f"part {part.key}/{part.name} is already registered")
    PARTS[part.key] = part
    return part


for _p in (
    Part("a", "rounding",
         "rounding error of mean/var/invstd/y: textbook float algorithms, every nbbn backend "
         "and the peers (PyTorch, Flax/XLA, NumPy; PyTorch CUDA and CuPy on a GPU) vs "
         "double-double, float32/float64, κ = |mean|/std 0…1e4, m = 2…2^25",
         run="nbbn.accuracy.runners:run_rounding_part",
         report="nbbn.accuracy.summary:report_rounding",
         plots="nbbn.accuracy.figures:rounding_figures"),
    Part("b", "sampling",
         "sampling error (RMSE) of batch mean and variance vs the population, beside theory",
         run="nbbn.accuracy.runners:run_sampling_part",
         report="nbbn.accuracy.summary:report_sampling",
         plots="nbbn.accuracy.figures:sampling_figures"),
    Part("c", "estimators",
         "population estimators (EMA, Algorithm 2, biased average) and the train–inference gap",
         run="nbbn.accuracy.runners:run_estimators_part",
         report="nbbn.accuracy.summary:report_estimators",
         plots="nbbn.accuracy.figures:estimator_figures"),
    Part("d", "distributed",
         "statistics across processes: per-rank vs synchronized (nbbn.distributed), "
         "count-weighted merge vs equal-weight pmean, (mean, invstd) vs (count, mean, M2); "
         "also writes distributed.md and its figures",
         run="nbbn.accuracy.runners:run_distributed_part",
         report="nbbn.accuracy.runners:report_distributed"),
    Part("e", "gradients",
         "rounding error of dx, dγ, dβ vs double-double: nbbn backends, old nbbn (emulated), "
         "PyTorch autograd, Flax jax.vjp; float32/float64 over κ and m, dy ~ N(0, 1)",
         run="nbbn.accuracy.runners:run_gradients_part",
         report="nbbn.accuracy.summary:report_gradients",
         plots="nbbn.accuracy.figures:gradient_plots"),
):
    register(_p)


def ordered() -> list[Part]:
    return [PARTS[k] for k in sorted(PARTS)]


def choices() -> str:
    return ", ".join(f"{p.key}/{p.name}" for p in ordered())


def load(ref: str) -> Callable:
    """The function named ``"module:function"``."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)
