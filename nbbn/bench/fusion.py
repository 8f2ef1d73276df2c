"""Issue #14's report on fused batch norm (``results/fusion-cpu.md``) from a bench run.

    python -m nbbn.cli bench --backend cpu,nbbn-unfused,torch-cpu --fusion none,relu,add-relu \\
        --threads 2 --require-quiet --out results/fusion-cpu --shapes ... -N 32
        (the shapes: FUSION_SHAPES in noxfile.py's report session)
    python -m nbbn.bench.fusion results/fusion-cpu --out results/fusion-cpu.md

Per fused configuration of the ``cpu`` backend: its time; the speed-up over ``nbbn-unfused``
(nbbn's plain kernel, then ``np.add`` / ``np.maximum`` in place: what fusion saves) and over
``torch-cpu`` (``native_batch_norm`` then ``add_`` / ``relu_``), both paired medians with 95%
intervals from the run's ``ratios.csv``; and the fused call's time over the plain (``--fusion
none``) call of the same shape -- a ratio of two medians from two points of the same run, not
round-robin paired (the two are different configurations), so read it with the points' noise.

Targets (issue #14, CPU, quiet machine): forward with ReLU ≤ 1.05× plain forward and ≥ 1.5×
faster than the unfused sequence; backward with ReLU ≤ 1.1× plain backward; with the residual
(add-relu), ≥ 1.5× faster than the unfused sequence.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..output import markdown_table
from .report import RATIOS_STEM, interval
from .targets import load_run, load_summary

#: (op, fusion) -> (most fused/plain time, least speed-up over nbbn-unfused), None: no target.
TARGETS = {
    ("forward-train", "relu"): (1.05, 1.5),
    ("backward", "relu"): (1.1, None),
    ("forward-train", "add-relu"): (None, 1.5),
    ("inference", "add-relu"): (None, 1.5),
}
_POINT = ["op", "layout", "call", "cache", "dtype", "N", "C", "H", "W"]


def _ratios(run_dir: Path) -> pd.DataFrame:
    path = run_dir / f"{RATIOS_STEM}.csv"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: the run wrote no paired ratios")
    return pd.read_csv(path)


def table(df: pd.DataFrame, ratios: pd.DataFrame) -> pd.DataFrame:
    ok = df[(df["status"] == "ok")]
    cpu = ok[ok["backend"] == "cpu"]
    plain = cpu[cpu["fusion"] == "none"].set_index(_POINT)["time_ms_p50"]
    r = ratios[ratios["backend"] == "cpu"]
    rows = []
    for _, row in cpu[cpu["fusion"] != "none"].iterrows():
        key = tuple(row[k] for k in _POINT)
        t_plain = plain.get(key, np.nan)
        out = {"op": row["op"], "layout": row["layout"], "shape": row["shape"],
               "N": int(row["N"]), "fusion": row["fusion"], "fused ms": row["time_ms_p50"],
               "plain ms": t_plain, "fused/plain": row["time_ms_p50"] / t_plain}
        sel = r[(r["op"] == row["op"]) & (r["layout"] == row["layout"])
                & (r["fusion"] == row["fusion"]) & (r["N"] == row["N"]) & (r["C"] == row["C"])
                & (r["H"].fillna(0) == (row["H"] if not pd.isna(row["H"]) else 0))
                & (r["W"].fillna(0) == (row["W"] if not pd.isna(row["W"]) else 0))]
        for vs, name in (("nbbn-unfused", "vs unfused"), ("torch-cpu", "vs torch")):
            s = sel[sel["vs_backend"] == vs]
            out[name] = (s["speedup"].iloc[0], s["speedup_ci_lo"].iloc[0],
                         s["speedup_ci_hi"].iloc[0]) if len(s) else (np.nan,) * 3
        rows.append(out)
    return pd.DataFrame(rows)


def verdicts(t: pd.DataFrame) -> list[str]:
    lines = []
    for (op, fusion), (most_over_plain, least_vs_unfused) in TARGETS.items():
        g = t[(t["op"] == op) & (t["fusion"] == fusion)]
        if not len(g):
            lines.append(f"- {op} + {fusion}: not in this run")
            continue
        if most_over_plain is not None:
            worst = g.loc[g["fused/plain"].idxmax()]
            met = (g["fused/plain"] <= most_over_plain).all()
            lines.append(
                f"- **{op} + {fusion} ≤ {most_over_plain:g}× plain {op}**: worst "
                f"{worst['fused/plain']:.2f}× ({worst['layout']} {worst['shape']} N={worst['N']})"
                f", median {g['fused/plain'].median():.2f}×: "
                + ("met" if met else f"MISSED on {(g['fused/plain'] > most_over_plain).sum()} "
                   f"of {len(g)} shapes"))
        if least_vs_unfused is not None:
            sp = g["vs unfused"].map(lambda v: v[0])
            worst = g.loc[sp.idxmin()]
            met = (sp >= least_vs_unfused).all()
            lines.append(
                f"- **{op} + {fusion} ≥ {least_vs_unfused:g}× faster than unfused**: least "
                f"{sp.min():.2f}× ({worst['layout']} {worst['shape']} N={worst['N']}), median "
                f"{sp.median():.2f}×: "
                + ("met" if met else f"MISSED on {(sp < least_vs_unfused).sum()} of {len(g)} "
                   "shapes"))
    return lines


def markdown(run_dir: Path, notes: str | None = None) -> str:
    df, meta = load_run(run_dir)
    t = table(df, _ratios(run_dir))
    load, quiet = load_summary(df, meta)
    shown = t.copy()
    for c in ("vs unfused", "vs torch"):
        shown[c] = [interval(*v) for v in shown[c]]
    lines = [
        "# Fused batch norm + ReLU / + residual + ReLU on the CPU (issue #14's targets)", "",
        "Generated by `python -m nbbn.bench.fusion` from the run below; do not edit by hand.",
        "", f"Command: `{meta.get('command', '?')}`", "",
        f"{load} -- the host was **{'quiet' if quiet else 'NOT quiet'}**"
        ".", "",
        "Columns: `fused ms` the cpu backend's fused call (median); `plain ms` the same shape "
        "with `--fusion none` in the same run; `fused/plain` their ratio (two points, not "
        "paired); `vs unfused` / `vs torch`: paired speed-up (baseline time ÷ fused time, "
        "median of per-round ratios, 95% bootstrap interval) over nbbn's plain kernel followed "
        "by np.add/np.maximum in place, and over PyTorch's batch norm followed by add_/relu_.",
        "", "## Targets", "", *verdicts(t), "",
        markdown_table(shown, ".3g", index=False), ""]
    if notes:
        lines += [notes.rstrip(), ""]
    return "\n".join(lines)
