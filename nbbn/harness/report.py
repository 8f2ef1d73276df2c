"""Bench rows -> bench.csv, bench.json, summary.md and plots in one output folder.

The tidy rows (one per configuration, :data:`nbbn.harness.runner.COLUMNS`) are always written;
the Markdown summary pivots them (time per backend, speed-up of each kernel over each baseline,
GB/s and % of copy) and the plots show GB/s against batch size per op and layout.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..report import frame, markdown_table, read_rows, write_tables
from .runner import COLUMNS
from .sweep import KEY_COLUMNS

ROWS_FILE = "rows.jsonl"
TABLE_STEM = "bench"
SUMMARY_FILE = "summary.md"


def tidy(rows: list[dict]) -> pd.DataFrame:
    """Rows -> DataFrame in column order, one row per configuration (the latest one wins)."""
    df = frame(rows, COLUMNS)
    if len(df):
        df = df.drop_duplicates(subset=list(KEY_COLUMNS), keep="last").reset_index(drop=True)
    return df


def _geomean(s: pd.Series) -> float:
    s = s.dropna()
    return float(np.exp(np.log(s).mean())) if len(s) else math.nan


def _groups(ok: pd.DataFrame):
    return ok.groupby(["dtype", "op", "layout"], sort=False)


def _speedups(g: pd.DataFrame, kernels: list[str], baselines: list[str]) -> pd.DataFrame:
    """Baseline time ÷ kernel time per point (> 1: the kernel is faster)."""
    t = g.pivot_table(index=["shape", "N"], columns="backend", values="time_ms_p50",
                      sort=False)
    out = pd.DataFrame(index=t.index)
    for k in kernels:
        for b in baselines:
            if k in t and b in t:
                out[f"{k} vs {b}"] = t[b] / t[k]
    return out


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per (dtype, op, layout): geometric-mean speed-up of each kernel backend over each
    baseline, and the median % of copy of every backend, over the points that ran."""
    ok = df[df["status"] == "ok"]
    kinds = dict(zip(ok["backend"], ok["kind"], strict=False))
    kernels = [b for b in dict.fromkeys(ok["backend"]) if kinds[b] == "kernel"]
    baselines = [b for b in dict.fromkeys(ok["backend"]) if kinds[b] != "kernel"]
    records = []
    for (dtype, op, layout), g in _groups(ok):
        rec = {"dtype": dtype, "op": op, "layout": layout, "points": g.groupby(["shape", "N"],
                                                                              sort=False).ngroups}
        sp = _speedups(g, kernels, baselines)
        for c in sp.columns:
            rec[f"speed-up {c}"] = _geomean(sp[c])
        for b in kernels:
            sub = g[g["backend"] == b]
            if len(sub):
                rec[f"GB/s {b}"] = float(sub["gbps"].median())
        for b in kernels + baselines:
            sub = g[g["backend"] == b]
            if len(sub):
                rec[f"% of copy {b}"] = float(sub["pct_of_copy"].median())
        records.append(rec)
    return pd.DataFrame(records)


def summary_markdown(df: pd.DataFrame, command: str) -> str:
    ok = df[df["status"] == "ok"]
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    first = df.iloc[0] if len(df) else None
    lines = ["# nbbn bench", "", f"Command: `{command}`", ""]
    if first is not None:
        devices = ", ".join(f"{d}" for d in dict.fromkeys(ok["device_name"].dropna())) or "-"
        lines += [
            f"Machine: {devices}; {first['platform']}; numba threads {first['threads']}"
            + (f", torch threads {int(first['torch_threads'])}"
               if pd.notna(first["torch_threads"]) else ""),
            f"Versions: nbbn {first['nbbn_version']}, numba {first['numba_version']}, "
            f"numpy {first['numpy_version']}, torch {first['torch_version'] or '-'}, "
            f"Python {first['python_version']}",
            f"Run: {first['run_id']} at {first['timestamp']}; {first['cpu_count']} CPUs, "
            f"1-minute load average {df['load_avg_1m'].min():g}–{df['load_avg_1m'].max():g} "
            "while it ran (a load above the CPU count means other work shared the cores)",
            "",
        ]
    lines += [
        "Configurations: " + ", ".join(f"{counts.get(s, 0)} {s}"
                                       for s in ("ok", "failed", "error", "skipped")),
        "",
        "Every row was checked against the float64 reference before it was timed. Times are the "
        "median (p20–p80 in the tidy rows) of single calls writing into preallocated outputs, "
        "so allocation is not timed; warm-up and the first (JIT-compiling) call are excluded. "
        "GB/s counts the minimal bytes model (inference and forward-train 2 bytes moved per "
        "byte of x, backward 3, plus the per-channel vectors); % of copy compares it with a "
        "copy of x's bytes timed on the same device in the same run. Tidy rows: bench.csv, "
        "bench.json.",
        "",
    ]
    if len(ok):
        lines += ["## Headline", "",
                  "Geometric-mean speed-up of each kernel over each baseline (baseline time ÷ "
                  "kernel time, > 1 = kernel faster) over the points where both ran; median "
                  "GB/s (minimal bytes model) and median % of copy per backend.", "",
                  markdown_table(headline(df), ".3g", index=False), ""]
    kinds = dict(zip(ok["backend"], ok["kind"], strict=False))
    kernels = [b for b in dict.fromkeys(ok["backend"]) if kinds[b] == "kernel"]
    baselines = [b for b in dict.fromkeys(ok["backend"]) if kinds[b] != "kernel"]
    for (dtype, op, layout), g in _groups(ok):
        lines += [f"## {op}, {layout}, {dtype}", ""]
        t = g.pivot_table(index=["shape", "N"], columns="backend", values="time_ms_p50",
                          sort=False)
        lines += ["Median time (ms):", "", markdown_table(t, ".4g"), ""]
        sp = _speedups(g, kernels, baselines)
        if len(sp.columns):
            lines += ["Speed-up (baseline time ÷ kernel time):", "",
                      markdown_table(sp, ".3g"), ""]
        bw = g.pivot_table(index=["shape", "N"], columns="backend", values="pct_of_copy",
                           sort=False)
        bw["copy GB/s"] = g.groupby(["shape", "N"], sort=False)["copy_gbps"].first()
        lines += ["% of copy bandwidth (minimal bytes model):", "", markdown_table(bw, ".3g"),
                  ""]
    checked = df[df["status"].isin(["ok", "failed"])]
    if len(checked):
        first = checked.pivot_table(index=["op", "layout", "dtype"], columns="backend",
                                    values="compile_s", aggfunc="max", sort=False)
        lines += ["## First call (compile) time", "",
                  "Wall time of the first call of each kernel, in seconds: JIT compilation (or "
                  "loading it from Numba's cache) plus one run; the longest over the points. "
                  "Never part of the samples.", "", markdown_table(first, ".3g"), ""]
    bad = df[df["status"].isin(["failed", "error"])]
    if len(bad):
        cols = ["backend", "op", "layout", "dtype", "N", "shape", "status", "errors", "error"]
        lines += ["## Failed or raised (not timed)", "",
                  markdown_table(bad[cols], ".3g", index=False), ""]
    skipped = df[df["status"] == "skipped"]
    if len(skipped):
        reasons = skipped.groupby("skip_reason", sort=False).agg(
            configurations=("backend", "size"),
            backends=("backend", lambda s: ", ".join(dict.fromkeys(s))))
        lines += ["## Skipped", "", markdown_table(reasons, ".3g"), ""]
    return "\n".join(lines)


def plots(df: pd.DataFrame, out: Path) -> tuple[list[Path], str | None]:
    """GB/s vs batch size per (dtype, op, layout), one panel per shape, a line per backend and
    the copy's GB/s dashed. Returns the files and a message when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: plots skipped (pip install 'nbbn[plot]')"
    ok = df[df["status"] == "ok"]
    files = []
    for (dtype, op, layout), g in _groups(ok):
        shapes = list(dict.fromkeys(g["shape"]))
        ncols = min(3, len(shapes))
        nrows = math.ceil(len(shapes) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows),
                                 squeeze=False, sharey=True)
        for ax, shape in zip(axes.flat, shapes, strict=False):
            s = g[g["shape"] == shape]
            for backend, b in s.groupby("backend", sort=False):
                b = b.sort_values("N")
                ax.plot(b["N"], b["gbps"], marker="o", label=backend)
            c = s.groupby("N")["copy_gbps"].first()
            ax.plot(c.index, c.values, "k--", lw=1, label="copy")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{layout} {shape}", fontsize=9)
            ax.set_xlabel("batch size N")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(shapes):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("GB/s (minimal bytes)")
        axes.flat[0].legend(fontsize=8)
        fig.suptitle(f"{op}, {layout}, {dtype}")
        fig.tight_layout()
        path = out / f"gbps-{op}-{layout}-{dtype}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        files.append(path)
    return files, None


def write_report(out: Path, command: str, make_plots: bool = True) -> tuple[list[Path], str | None]:
    """Everything derived from ``out/rows.jsonl``: tables, summary and (optionally) plots."""
    out = Path(out)
    df = tidy(read_rows(out / ROWS_FILE))
    files = write_tables(df, out / TABLE_STEM)
    (out / SUMMARY_FILE).write_text(summary_markdown(df, command), encoding="utf-8")
    files.append(out / SUMMARY_FILE)
    message = None
    for stale in out.glob("gbps-*.png"):  # plots of an earlier run: redrawn below or dropped
        stale.unlink()
    if make_plots and len(df):
        pngs, message = plots(df, out)
        files += pngs
    return files, message
