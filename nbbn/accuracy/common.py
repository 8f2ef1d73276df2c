"""Shared pieces of the accuracy study: seeding, populations, size parsing, environment columns,
and what every part's ``run`` gets (:class:`RunContext`; the peers, loaded once per command).

Seeding: every configuration draws from its own ``numpy.random.Generator`` seeded by
``SeedSequence(seed, spawn_key=crc32 of each part of the configuration's key)``, so a
configuration's numbers depend only on (seed, key), never on which other configurations ran or
in what order.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import output as _output


class StudyError(ValueError):
    """A bad study input (part, distribution, size, file); the message is one line for the CLI."""




# ------------------------------------------------------------------------------ populations

@dataclass(frozen=True)
class Population:
    """A distribution with known moments: mean μ, variance σ², fourth central moment μ4."""

    name: str
    description: str
    mean: float
    var: float
    mu4: float
    draw: Callable[[np.random.Generator, tuple[int, ...]], np.ndarray]

    @property
    def sd(self) -> float:
        return math.sqrt(self.var)

    @property
    def kurtosis(self) -> float:
        """μ4/σ⁴ (3 for the normal)."""
        return self.mu4 / self.var**2


def _lognormal_moments(s: float) -> tuple[float, float, float]:
    w = math.exp(s * s)
    mean = math.exp(s * s / 2)
    var = (w - 1) * w
    kurt = w**4 + 2 * w**3 + 3 * w**2 - 3
    return mean, var, kurt * var * var


_LN_MEAN, _LN_VAR, _LN_MU4 = _lognormal_moments(1.0)

#: The synthetic populations of parts (b) and (c), by name.
POPULATIONS: dict[str, Population] = {
    p.name: p
    for p in (
        Population("normal", "normal N(1, 2²)", 1.0, 4.0, 3.0 * 16.0,
                   lambda g, s: g.normal(1.0, 2.0, s)),
        Population("uniform", "uniform U(0, 1)", 0.5, 1.0 / 12.0, 1.0 / 80.0,
                   lambda g, s: g.random(s)),
        Population("t5", "Student-t, 5 degrees of freedom", 0.0, 5.0 / 3.0, 25.0,
                   lambda g, s: g.standard_t(5, s)),
        Population("lognormal", "log-normal, exp(N(0, 1))", _LN_MEAN, _LN_VAR, _LN_MU4,
                   lambda g, s: g.lognormal(0.0, 1.0, s)),
    )
}


def parse_distributions(text: str | None) -> list[str]:
    """Comma-separated population names (None: all of them)."""
    if text is None:
        return list(POPULATIONS)
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise StudyError("--distributions is empty; choose from " + ", ".join(POPULATIONS))
    for n in names:
        if n not in POPULATIONS:
            raise StudyError(f"unknown distribution {n!r}; choose from {', '.join(POPULATIONS)}")
    return list(dict.fromkeys(names))


# ------------------------------------------------------------------------------ sizes

#: Largest m accepted (a 2^26-value float64 array is 512 MiB; part (a) holds a few of them).
MAX_M = 2**26

_SIZE_RE = re.compile(r"^(\d+)(?:(?:\^|\*\*)(\d+))?([+-]\d+)?$")


def parse_size(token: str) -> int:
    """An integer m ≥ 2, written plainly (4096) or as a power with an offset (2^24+1, 2**10)."""
    t = token.strip().replace("_", "")
    mt = _SIZE_RE.match(t)
    if not mt:
        raise StudyError(f"bad size {token!r}: expected an integer like 4096, 2^24+1 or 2**10")
    base, exp, off = mt.groups()
    if exp is not None and int(exp) > 64:
        raise StudyError(f"size {token!r} is larger than the maximum {MAX_M} (2^26)")
    m = int(base) ** int(exp) if exp is not None else int(base)
    m += int(off) if off else 0
    if m < 2:
        raise StudyError(f"size {token!r} gives m = {m}: batch statistics need m ≥ 2")
    if m > MAX_M:
        raise StudyError(f"size {token!r} gives m = {m}, larger than the maximum {MAX_M} (2^26)")
    return m


def parse_sizes(text: str | None) -> list[int] | None:
    """Comma-separated sizes, sorted and de-duplicated; None when not given."""
    if text is None:
        return None
    tokens = [t for t in text.split(",") if t.strip()]
    if not tokens:
        raise StudyError("--sizes is empty: give comma-separated m values such as 2,64,4096")
    return sorted({parse_size(t) for t in tokens})


# ------------------------------------------------------------------------------ environment

def environment(seed: int) -> dict:
    """Columns added to every row: the seed, then :func:`nbbn.output.short_environment`."""
    return {"seed": seed, **_output.short_environment()}


# ------------------------------------------------------------------------------ running a part

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


def load_peers_once(ctx: RunContext, part: str):
    """The peers to run (loaded once per command) and their skip rows."""
    if not ctx.peers:
        return [], [{"part": part, "item": "peers", "reason": "--no-peers"}]
    if "_peers" not in ctx.meta:
        from .peers import load_peers, versions

        peers, skipped = load_peers(part="peers")
        ctx.meta["_peers"] = (peers, skipped)
        ctx.meta["peer_versions"] = versions(peers)
        ctx.meta["peer_how"] = {p.name: p.how for p in peers}
        ctx.skip(skipped)
        ctx.echo("peers: " + (", ".join(p.name for p in peers) or "none")
                 + "".join(f"; skipped {s['item']}: {s['reason']}" for s in skipped))
    return ctx.meta["_peers"][0], []
