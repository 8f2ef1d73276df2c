"""Where the variance lives: ``nbbn report variance RUN_DIRS...`` and ``nbbn report coverage``.

**Variance study** (Kalibera & Jones, "Rigorous benchmarking in reasonable time", ISMM 2013).
Every bench run with ``--out`` writes ``samples.jsonl``: per point and trial, the per-round
times of every callable, with the trial's worker process. For a ratio (``--ratio KERNEL/BASE``,
default ``cpu/torch-cpu``: the kernel's time over the baseline's, paired per round) each round
gives z = log(T_kernel / T_base), labelled by its run (the folder), process, trial (buffer set)
and round. Per point, :func:`nbbn.bench.stats.variance_components` splits the variance of z
over the nested levels run > process > trial > round (method of moments; a level that never
has two units in a parent -- process in runs without ``--isolate process`` -- is merged into
the level below and reported as not varied). The tidy CSV has one row per (point, level):
``variance`` and ``sd_pct`` (100·σ, ≈ % of the ratio); the Markdown report gives per level the
median over points and the share of the total, and the design these imply: the standard error
of a point's ratio with t trials of r rounds is

    se² = σ²_run + σ²_process/t + σ²_trial/t + σ²_round/(t·r)     (one process per trial)

so trials pay until σ²_run dominates; σ_run (no run's trials can see it) is what
``nbbn compare --run-sd`` adds between runs.

**Coverage** (``nbbn report coverage RUN1 RUN2``): the fraction of points whose speed-up in RUN2
lies inside RUN1's 95% interval, and the median relative half-width -- the A/A check of the
intervals. Two independent correct 95% intervals of one quantity do *not* hold each other's
estimate 95% of the time: with log half-widths h1, h2 (so standard errors h/1.96), run 2's
estimate lies inside run 1's interval with probability 2Φ(1.96·h1/√(h1² + h2²)) − 1, 83.4% for
equal widths. So the report gives, beside the observed coverage, that *expected* coverage
(the mean of this probability over the points) and a second check whose target is 95%: the
runs *agree* when |log s2 − log s1| ≤ √(h1² + h2²) (the difference's own 95% interval holds 0).
Both hold only if the intervals carry every level of variance that differs between two runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..output import markdown_table, read_rows
from . import stats
from .compare import load_results
from .runner import SCHEMA
from .sweep import KEY_COLUMNS

SAMPLES = "samples.jsonl"
LEVELS = ("run", "process", "trial", "round")
POINT = ["op", "layout", "fusion", "call", "cache", "dtype", "N", "C", "H", "W"]


def _records(run_dir: Path) -> list[dict]:
    p = Path(run_dir) / SAMPLES
    if not p.is_file():
        raise ValueError(f"{run_dir}: no {SAMPLES} (a bench run made with --out and trials)")
    recs = read_rows(p)
    if not recs or any(r.get("schema") != SCHEMA for r in recs):
        raise ValueError(f"{p}: not {SCHEMA} samples")
    return recs


def log_ratios(run_dirs, ratio: str = "cpu/torch-cpu") -> pd.DataFrame:
    """Tidy per-round log ratios: point columns, run, process, trial, round, z."""
    num, _, den = ratio.partition("/")
    if not num or not den:
        raise ValueError(f"bad --ratio {ratio!r}: use KERNEL/BASELINE, e.g. cpu/torch-cpu")
    out = []
    for k, d in enumerate(run_dirs):
        for r in _records(Path(d)):
            labels = [lab.split(":")[0] for lab in r["labels"]]
            if num not in labels or den not in labels:
                continue
            T = np.asarray(r["times_us"], dtype=np.float64)
            with np.errstate(divide="ignore", invalid="ignore"):
                z = np.log(T[:, labels.index(num)] / T[:, labels.index(den)])
            base = {c: r.get(c) for c in POINT}
            for i, v in enumerate(z):
                if np.isfinite(v):
                    out.append({**base, "run": k, "run_dir": str(d), "process": r["process"],
                                "trial": r["trial"], "round": i, "z": float(v)})
    if not out:
        raise ValueError(f"no samples with both {num} and {den} in {', '.join(map(str, run_dirs))}")
    return pd.DataFrame(out)


def components(z: pd.DataFrame) -> pd.DataFrame:
    """Per point and level: variance and sd_pct (module docstring)."""
    rows = []
    for key, g in z.groupby(POINT, sort=False, dropna=False):
        ids = g[["run", "process", "trial"]].to_numpy()
        keep, names = [], []
        prev_units = 1
        for L, name in enumerate(("run", "process", "trial")):
            units = len({tuple(x) for x in ids[:, :L + 1]})
            if units > prev_units:
                keep.append(L)
                names.append(name)
            prev_units = units
        comps = stats.variance_components(g["z"].to_numpy(), ids[:, keep]) if keep else []
        got = dict(zip(names + ["round"], comps, strict=False))
        for name in LEVELS:
            c = got.get(name)
            var = c["variance"] if c else np.nan
            rows.append({**dict(zip(POINT, key, strict=True)), "level": name,
                         "varied": c is not None, "units": c["units"] if c else None,
                         "variance": var, "sd_pct": 100 * np.sqrt(var) if var == var else np.nan,
                         "rounds": len(g)})
    return pd.DataFrame(rows)


def summary(comp: pd.DataFrame) -> pd.DataFrame:
    """Per level: points where it varied, median variance and sd, share of the total."""
    tot = comp.groupby(POINT, dropna=False)["variance"].transform(lambda v: np.nansum(v))
    comp = comp.assign(share=comp["variance"] / tot)
    recs = []
    for lev in LEVELS:
        g = comp[(comp["level"] == lev) & comp["varied"]]
        recs.append({"level": lev, "points": len(g),
                     "sd_pct median": float(np.nanmedian(g["sd_pct"])) if len(g) else np.nan,
                     "sd_pct max": float(np.nanmax(g["sd_pct"])) if len(g) else np.nan,
                     "share of variance (median)": float(np.nanmedian(g["share"]))
                     if len(g) else np.nan})
    return pd.DataFrame(recs)


def run_sd(summ: pd.DataFrame) -> float:
    """σ_run as a fraction (the median over points), 0 when the run level did not vary."""
    v = summ.loc[summ["level"] == "run", "sd_pct median"]
    return float(v.iloc[0]) / 100 if len(v) and np.isfinite(v.iloc[0]) else 0.0


def markdown(run_dirs, ratio: str, comp: pd.DataFrame, summ: pd.DataFrame) -> str:
    cmds = []
    for d in run_dirs:
        try:
            cmds.append(json.loads((Path(d) / "run.json").read_text())["command"])
        except (OSError, ValueError, KeyError):
            cmds.append("?")
    lines = ["# Variance study", "",
             f"Ratio: `{ratio}` (log of the paired per-round time ratio). Runs, in order:", ""]
    lines += [f"- `{d}`: `{c}`" for d, c in zip(run_dirs, cmds, strict=True)]
    lines += ["", "Per level, over the points (method of moments, nested; `nbbn.bench.stats."
              "variance_components`); sd in % of the ratio:", "",
              markdown_table(summ, ".3g", index=False), "",
              f"σ_run = {100 * run_sd(summ):.2f}% (median over points): pass it to "
              f"`nbbn compare --run-sd {run_sd(summ):.4f}`.", "",
              "Per point (sd %):", "",
              markdown_table(comp.pivot_table(index=POINT, columns="level", values="sd_pct",
                                              sort=False), ".3g"), ""]
    return "\n".join(lines)


def _normal_cdf(x):
    from math import erf, sqrt

    return np.vectorize(lambda v: 0.5 * (1 + erf(v / sqrt(2))))(np.asarray(x, dtype=float))


def coverage(run1, run2, baseline_kind: str = "kernel") -> tuple[pd.DataFrame, dict]:
    """Per kernel row in both runs: run 2's speed-up inside run 1's interval? (module)."""
    a, b = load_results(run1), load_results(run2)
    keys = list(KEY_COLUMNS)
    cols = ["speedup", "speedup_ci_lo", "speedup_ci_hi"]
    a = a[(a["status"] == "ok") & pd.to_numeric(a["speedup"], errors="coerce").notna()]
    b = b[(b["status"] == "ok") & pd.to_numeric(b["speedup"], errors="coerce").notna()]
    m = a[keys + cols].merge(b[keys + cols], on=keys, suffixes=("_1", "_2"))
    m = m[m["backend"].isin(a.loc[a["kind"] == baseline_kind, "backend"].unique())] \
        if "kind" in a.columns else m
    inside = (m["speedup_2"] >= m["speedup_ci_lo_1"]) & (m["speedup_2"] <= m["speedup_ci_hi_1"])
    h1 = (np.log(m["speedup_ci_hi_1"]) - np.log(m["speedup_ci_lo_1"])) / 2
    h2 = (np.log(m["speedup_ci_hi_2"]) - np.log(m["speedup_ci_lo_2"])) / 2
    both = np.sqrt(h1 ** 2 + h2 ** 2)
    agree = np.abs(np.log(m["speedup_2"]) - np.log(m["speedup_1"])) <= both
    expected = 2 * _normal_cdf(stats.Z975 * h1 / both) - 1
    m = m.assign(inside=inside, agree=agree, expected_inside=expected,
                 half_width_pct_1=100 * (m["speedup_ci_hi_1"] - m["speedup_ci_lo_1"]) / 2
                 / m["speedup_1"],
                 change_pct=100 * (m["speedup_2"] / m["speedup_1"] - 1))
    summ = {"points": int(len(m)), "inside": int(inside.sum()),
            "coverage": float(inside.mean()) if len(m) else float("nan"),
            "expected_coverage": float(expected.mean()) if len(m) else float("nan"),
            "agree": int(agree.sum()),
            "agreement": float(agree.mean()) if len(m) else float("nan"),
            "median_half_width_pct": float(m["half_width_pct_1"].median()) if len(m) else
            float("nan"),
            "sd_change_pct": float(m["change_pct"].std()) if len(m) > 1 else float("nan")}
    return m, summ
