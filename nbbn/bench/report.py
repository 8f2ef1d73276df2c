"""Bench rows -> bench.csv/json, ratios.csv/json, summary.md and plots in one output folder.

The tidy rows (one per configuration, :data:`nbbn.bench.runner.COLUMNS`) and the ratio records
(one per ordered pair of callables of a point, :data:`RATIO_COLUMNS`) are always written; the
Markdown summary pivots them: per group of points the time of every backend, its speed-up over
the reference baseline and its time over the copy, each with its 95% interval, and a headline
of geometric means. Writers, tables and Markdown come from :mod:`nbbn.output`.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import output, registry
from ..output import frame, markdown_table, pyplot, read_rows, save_figure, write_tables, write_text
from .runner import COLUMNS
from .sweep import KEY_COLUMNS

ROWS_FILE = "rows.jsonl"
RATIOS_FILE = "ratios.jsonl"
TABLE_STEM = "bench"
RATIOS_STEM = "ratios"
SUMMARY_FILE = "summary.md"
RUN_FILE = "run.json"
GROUP = ["dtype", "op", "layout", "fusion", "call", "cache"]
POINT = ["shape", "N"]

RATIO_COLUMNS = ("schema", "run_id", "backend", "variant", "device", "op", "layout", "fusion",
                 "call", "cache", "dtype", "N", "C", "H", "W", "shape", "x_shape", "m", "tag",
                 "vs_backend", "vs_variant", "speedup", "speedup_ci_lo", "speedup_ci_hi",
                 "rounds")
RATIO_KEY = (*KEY_COLUMNS, "vs_backend", "vs_variant")


def tidy(rows: list[dict]) -> pd.DataFrame:
    """Rows -> DataFrame in column order, one row per configuration (the latest one wins)."""
    df = frame(rows, COLUMNS)
    if len(df):
        df = df.drop_duplicates(subset=list(KEY_COLUMNS), keep="last").reset_index(drop=True)
    return df


def tidy_ratios(records: list[dict]) -> pd.DataFrame:
    df = frame(records, RATIO_COLUMNS)
    if len(df):
        df = df.drop_duplicates(subset=list(RATIO_KEY), keep="last").reset_index(drop=True)
    return df


def label(backend: str, variant) -> str:
    """``backend`` for its default variant, ``backend:variant`` for another."""
    try:
        default = registry.backend_info(backend).default_variant
    except ValueError:
        default = None
    if variant is None or (isinstance(variant, float) and math.isnan(variant)) \
            or variant == default:
        return str(backend)
    return f"{backend}:{variant}"


def _labelled(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(label=[label(b, v) for b, v in zip(df["backend"], df["variant"],
                                                        strict=True)])


def _base_label(text: str) -> str:
    """"torch-cpu:default" -> "torch-cpu" (a variant shown only when not the default)."""
    backend, _, variant = str(text).partition(":")
    return label(backend, variant or None)


def _geomean(s: pd.Series) -> float:
    s = pd.to_numeric(s, errors="coerce").dropna()
    s = s[s > 0]
    return float(np.exp(np.log(s).mean())) if len(s) else math.nan


def interval(v, lo, hi, fmt: str = ".3g") -> str:
    """"1.23 [1.19, 1.27]"; blank when v is missing."""
    if v is None or pd.isna(v):
        return ""
    if lo is None or pd.isna(lo) or hi is None or pd.isna(hi):
        return format(float(v), fmt)
    return f"{float(v):{fmt}} [{float(lo):{fmt}}, {float(hi):{fmt}}]"


def headline(df: pd.DataFrame) -> pd.DataFrame:
    """Per group (dtype, op, layout, fusion, call, cache), kernel backend:variant and reference
    baseline: the points that ran, the geometric mean, minimum and maximum of the paired
    speed-up over that baseline, how many points are faster / slower with an interval that
    excludes 1, and the median time over copy and % of the limit."""
    ok = _labelled(df[df["status"] == "ok"])
    records = []
    for keys, g in ok.groupby(GROUP, sort=False):
        k = g[g["kind"] == "kernel"]
        k = k.assign(base=[_base_label(x) if isinstance(x, str) else "-" for x in k["baseline"]])
        for (lab, base), b in k.groupby(["label", "base"], sort=False):
            sp = pd.to_numeric(b["speedup"], errors="coerce")
            lo = pd.to_numeric(b["speedup_ci_lo"], errors="coerce")
            hi = pd.to_numeric(b["speedup_ci_hi"], errors="coerce")
            records.append({
                **dict(zip(GROUP, keys, strict=True)), "backend": lab, "points": len(b),
                "baseline": base, "speed-up geomean": _geomean(sp),
                "speed-up min": float(sp.min()) if sp.notna().any() else math.nan,
                "speed-up max": float(sp.max()) if sp.notna().any() else math.nan,
                "faster": int((lo > 1).sum()), "slower": int((hi < 1).sum()),
                "time/copy median": float(pd.to_numeric(b["time_over_copy"]).median()),
                "% of limit median": float(pd.to_numeric(b["pct_of_limit"]).median()),
            })
    return pd.DataFrame(records)


def _load_line(df: pd.DataFrame, meta: dict) -> str:
    during = pd.to_numeric(df["load_avg_1m"], errors="coerce").dropna()
    text, _ = output.quiet_verdict(meta)
    after = meta.get("load_after_1m")
    shown = [f"during {during.min():g}–{during.max():g}" if len(during) else None,
             f"after {after:g}" if after is not None else None]
    shown = [p for p in shown if p]
    return text + (f"; 1-minute load {', '.join(shown)}, which counts the run's own threads"
                   if shown else "")


def _gib(v) -> str:
    if v is None or pd.isna(v):
        return "?"
    v = float(v)
    return f"{v / 2**20:.0f} MiB" if v >= 2**20 else f"{v / 2**10:.0f} KiB"


def summary_markdown(df: pd.DataFrame, command: str, meta: dict | None = None) -> str:
    meta = meta or {}
    ok = _labelled(df[df["status"] == "ok"]) if len(df) else df
    counts = df["status"].value_counts().to_dict() if len(df) else {}
    lines = ["# nbbn bench", "", f"Command: `{command}`", ""]
    if len(df):
        first = df.iloc[0]
        devs = ", ".join(dict.fromkeys(ok["device_name"].dropna())) if len(ok) else "-"
        threads = f"numba threads {first['threads']}"
        if pd.notna(first.get("torch_threads")):
            threads += f", torch threads {int(first['torch_threads'])}"
        lines += [
            f"Machine: {first['cpu']} ({first['cpu_count']} CPUs; caches L1d "
            f"{_gib(first['cache_l1d_bytes'])}, L2 {_gib(first['cache_l2_bytes'])} per core, L3 "
            f"{_gib(first['cache_l3_bytes'])}); {first['platform']}; {threads}. "
            f"Devices timed: {devs or '-'}.",
            f"Versions: nbbn {first['nbbn_version']}, numba {first['numba_version']}, numpy "
            f"{first['numpy_version']}, torch {first['torch_version'] or '-'}, Python "
            f"{first['python_version']}.",
            f"Run {first['run_id']} at {first['timestamp']}; " + _load_line(df, meta) + ".",
            "",
        ]
    t = meta.get("timing", {})
    if t:
        lines += [
            f"Timing: the configurations of a point and the limit callables (copies, read "
            f"stream) are timed round-robin in one loop (paired rounds; starting callable "
            f"rotated each round), in {t.get('min_trials')}-{t.get('max_trials')} independent "
            f"trials (fresh buffer sets, new random call orders"
            + (f", a fresh worker process per {t.get('sets_per_process')} trial(s)"
               if t.get("isolate") == "process" else "")
            + f"), each {t.get('warmup')} warm-up round(s) then at least "
            f"{t.get('min_rounds')} rounds and {t.get('trial_time')} s; trials added until "
            f"every ratio's 95% trial interval (two-level bootstrap) has a half-width <= "
            f"{100 * t.get('ci_rel', 0):g}% of it or {t.get('max_time')} s have passed. Cache: "
            + ", ".join(sorted(set(df["cache"].dropna()))) + " (cold: every call on the next of "
            "enough buffer sets to exceed twice the last-level cache; warm: the same buffers). "
            "Call: " + ", ".join(sorted(set(df["call"].dropna()))) + " (kernel: preallocated "
            "outputs, arguments validated once; api: the whole allocating public call).",
            ""]
    rounds = pd.to_numeric(ok["rounds"], errors="coerce").dropna() if len(ok) else []
    if len(rounds):
        conv = ok["converged"].fillna(False).astype(bool)
        lines += [f"Rounds per point: {int(rounds.min())}–{int(rounds.max())}; "
                  f"{int(conv.sum())} of {len(ok)} rows reached the interval target.", ""]
    lines += ["Configurations: " + ", ".join(f"{counts.get(s, 0)} {s}"
                                             for s in ("ok", "failed", "error", "skipped")), "",
              "Every row was checked against the float64 reference before it was timed. "
              "speed-up = baseline time ÷ kernel time and time/copy = time ÷ copy time are "
              "geometric means over trials of the trials' median per-round ratios, with 95% "
              "trial intervals (two-level bootstrap) in brackets. GB/s "
              "uses the minimal bytes model (nbbn/bench/roofline.py); % of limit = the op's "
              "limit time (fastest copy, read stream: limits.py) ÷ its time. Tidy rows: "
              "bench.csv/json; every pair: ratios.csv/json.", ""]
    if len(ok):
        lines += ["## Headline", "",
                  "Per kernel: geometric mean, minimum and maximum of the speed-up over the "
                  "reference baseline over the points; faster / slower: points whose interval "
                  "lies above / below 1.", "",
                  markdown_table(headline(df), ".3g", index=False), ""]
    for keys, g in ok.groupby(GROUP, sort=False) if len(ok) else ():
        d = dict(zip(GROUP, keys, strict=True))
        lines += [f"## {d['op']}, {d['layout']}, fusion {d['fusion']}, call {d['call']}, "
                  f"cache {d['cache']}, {d['dtype']}", ""]
        cols = list(dict.fromkeys(g["label"]))
        idx = list(dict.fromkeys(zip(g["shape"], g["N"], strict=True)))
        tab = pd.DataFrame(index=pd.MultiIndex.from_tuples(idx, names=POINT))
        sp = pd.DataFrame(index=tab.index)
        oc = pd.DataFrame(index=tab.index)
        for lab in cols:
            b = g[g["label"] == lab].set_index(POINT)
            tab[lab] = b["time_ms_p50"]
            with_base = b[b["speedup"].notna() & b["baseline"].notna()]
            for base, bb in with_base.groupby("baseline", sort=False):
                sp[f"{lab} vs {_base_label(base)}"] = pd.Series(
                    [interval(r["speedup"], r["speedup_ci_lo"], r["speedup_ci_hi"])
                     for _, r in bb.iterrows()], index=bb.index)
            oc[lab] = pd.Series([interval(r["time_over_copy"], r["time_over_copy_ci_lo"],
                                          r["time_over_copy_ci_hi"]) for _, r in b.iterrows()],
                                index=b.index)
        tab["copy"] = g.groupby(POINT, sort=False)["copy_ms_p50"].first()
        lines += ["Median time (ms):", "", markdown_table(tab, ".4g"), ""]
        if len(sp.columns):
            lines += ["Speed-up over the baseline (paired median [95% interval]):", "",
                      markdown_table(sp, ".3g"), ""]
        lines += ["Time over the copy of x (paired median [95% interval]):", "",
                  markdown_table(oc, ".3g"), ""]
        bw = g.pivot_table(index=POINT, columns="label", values="pct_of_limit", sort=False)
        lines += ["% of the limit (limit time ÷ time, paired; limits.py, minimal bytes):", "",
                  markdown_table(bw, ".3g"),
                  ""]
    checked = df[df["status"].isin(["ok", "failed"])] if len(df) else df
    if len(checked):
        comp = _labelled(checked).pivot_table(index=["op", "layout", "dtype"], columns="label",
                                              values="compile_s", aggfunc="max", sort=False)
        lines += ["## First call (compile) time", "",
                  "Wall time of the first call of each configuration, in seconds: JIT "
                  "compilation (or loading it from Numba's cache) plus one run; the longest over "
                  "the points. Never part of the samples.", "", markdown_table(comp, ".3g"), ""]
    bad = df[df["status"].isin(["failed", "error"])] if len(df) else df
    if len(bad):
        cols = ["backend", "variant", "op", "layout", "fusion", "call", "dtype", "N", "shape",
                "status", "errors", "error"]
        lines += ["## Failed or raised (not timed)", "",
                  markdown_table(bad[cols], ".3g", index=False), ""]
    notes = ok["notes"].dropna() if len(ok) else []
    if len(notes):
        lines += ["## Notes", ""] + [f"- {n} ({c} rows)" for n, c in
                                     pd.Series(notes).value_counts().items()] + [""]
    skipped = df[df["status"] == "skipped"] if len(df) else df
    if len(skipped):
        reasons = skipped.groupby("skip_reason", sort=False).agg(
            configurations=("backend", "size"),
            backends=("backend", lambda s: ", ".join(dict.fromkeys(s))))
        lines += ["## Skipped", "", markdown_table(reasons, ".3g"), ""]
    return "\n".join(lines)


def plots(df: pd.DataFrame, out: Path) -> tuple[list[Path], str | None]:
    """GB/s vs batch size per group, one panel per shape, a line per backend and the copy's
    GB/s dashed. Returns the files and a message when matplotlib is missing."""
    plt, why = pyplot()
    if plt is None:
        return [], why
    ok = _labelled(df[df["status"] == "ok"])
    files = []
    for keys, g in ok.groupby(GROUP, sort=False):
        d = dict(zip(GROUP, keys, strict=True))
        shapes = list(dict.fromkeys(g["shape"]))
        ncols = min(3, len(shapes))
        nrows = math.ceil(len(shapes) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.2 * nrows),
                                 squeeze=False, sharey=True)
        for ax, shape in zip(axes.flat, shapes, strict=False):
            s = g[g["shape"] == shape]
            for lab, b in s.groupby("label", sort=False):
                b = b.sort_values("N")
                ax.plot(b["N"], b["gbps"], marker="o", label=lab)
            c = s.groupby("N")["copy_gbps"].first()
            ax.plot(c.index, c.values, "k--", lw=1, label="copy")
            ax.set_xscale("log", base=2)
            ax.set_title(f"{d['layout']} {shape}", fontsize=9)
            ax.set_xlabel("batch size N")
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(shapes):]:
            ax.set_visible(False)
        for ax in axes[:, 0]:
            ax.set_ylabel("GB/s (minimal bytes)")
        axes.flat[0].legend(fontsize=8)
        stem = "-".join(str(d[k]) for k in ("op", "layout", "fusion", "call", "cache", "dtype"))
        fig.suptitle(stem.replace("-", " "))
        path = out / f"gbps-{stem}.png"
        save_figure(fig, path)
        files.append(path)
    return files, None


def write_report(out: Path, command: str, meta: dict | None = None,
                 make_plots: bool = True) -> tuple[list[Path], str | None, pd.DataFrame,
                                                   pd.DataFrame]:
    """Everything derived from ``out/rows.jsonl`` and ``out/ratios.jsonl``: tables, summary and
    (optionally) plots. Returns (files, message, rows, ratios)."""
    out = Path(out)
    df = tidy(read_rows(out / ROWS_FILE))
    rpath = out / RATIOS_FILE
    ratios = tidy_ratios(read_rows(rpath) if rpath.exists() else [])
    files = write_tables(df, out / TABLE_STEM) + write_tables(ratios, out / RATIOS_STEM)
    files.append(write_text(out / SUMMARY_FILE, summary_markdown(df, command, meta)))
    message = None
    for stale in out.glob("gbps-*.png"):  # plots of an earlier run: redrawn below or dropped
        stale.unlink()
    if make_plots and len(df):
        pngs, message = plots(df, out)
        files += pngs
    return files, message, df, ratios
