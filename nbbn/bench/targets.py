"""Issue #9's report, ``results/cpu-kernels.md``, from a ``nbbn bench --sweep cpu-targets`` run.

    nbbn bench --sweep cpu-targets --threads 2 --require-quiet --out RUN_DIR
    nbbn bench --backend cpu,torch-cpu --call api --cache warm -s NC:16 -N 8 \\
        --min-rounds 2000 --threads 2 --require-quiet --out results/per-call
    nbbn report targets RUN_DIR --out results/cpu-kernels.md \\
        --per-call results/per-call [--notes results/cpu-kernels.notes.md]

The report holds the command, the machine, the load before / during / after, then per point the
time of nbbn and of PyTorch, GB/s, % of limit, time over the copy and the speed-up over PyTorch
(paired medians with 95% intervals), the per-call cost of the tiny calls (median of >= 2000
calls), and each target of issue #9 checked: met, or missed by how much. ``--notes`` appends a
hand-written file (why a target is missed: bytes, passes, vector width, idle threads), so the
figures can be regenerated without losing it.

Targets (issue #9, float32, allocating API against allocating API):

* nbbn at least as fast as PyTorch CPU on every point (paired median speed-up >= 1), and >= 2×
  by geometric mean over the points;
* arrays of >= 64 MiB: time over ``np.copy(x)`` at most 1.5 (forward-train), 1.1 (inference),
  2.0 (backward);
* per call: the (8, 16) call <= 8 µs (median of >= 2000 calls), for each op.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import output
from ..output import markdown_table
from .report import TABLE_STEM, interval, label

COPY_TARGET = {"forward-train": 1.5, "inference": 1.1, "backward": 2.0}
BIG_BYTES = 64 << 20
SPEEDUP_GEOMEAN_TARGET = 2.0
PER_CALL_US_TARGET = 8.0
TINY_SHAPE = ("NC", 8, 16)  # layout, N, C of the per-call target


def load_run(run_dir: str | Path) -> tuple[pd.DataFrame, dict]:
    """A bench output folder's tidy rows and run.json."""
    run_dir = Path(run_dir)
    csv = run_dir / f"{TABLE_STEM}.csv"
    if not csv.is_file():
        raise FileNotFoundError(f"{csv} not found: run nbbn bench --out {run_dir} first")
    df = pd.read_csv(csv)
    meta_path = run_dir / "run.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    return df, meta


def kernel_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The ok rows of kernel backends, with a display label and x's size in MiB."""
    ok = df[(df["status"] == "ok") & (df["kind"] == "kernel")].copy()
    ok["label"] = [label(b, v) for b, v in zip(ok["backend"], ok["variant"], strict=True)]
    ok["MiB"] = ok["x_bytes"] / 2**20
    # The targets are against PyTorch: a speed-up over another baseline does not count.
    other = ~ok["baseline"].fillna("").astype(str).str.startswith("torch-")
    ok.loc[other, ["speedup", "speedup_ci_lo", "speedup_ci_hi"]] = np.nan
    return ok


def baseline_times(df: pd.DataFrame) -> pd.Series:
    """Median time (ms) of each point's reference baseline, keyed like the kernel rows."""
    b = df[(df["status"] == "ok") & (df["kind"] != "kernel")]
    keys = ["op", "layout", "fusion", "call", "cache", "dtype", "N", "C", "H", "W"]
    b = b.assign(label=[f"{x}:{v}" for x, v in zip(b["backend"], b["variant"], strict=True)])
    return b.set_index(keys + ["label"])["time_ms_p50"]


def _geomean(s) -> float:
    s = pd.to_numeric(pd.Series(s), errors="coerce").dropna()
    s = s[s > 0]
    return float(np.exp(np.log(s).mean())) if len(s) else math.nan


def load_summary(df: pd.DataFrame, meta: dict) -> tuple[str, bool]:
    """(text, quiet) by the one quiet rule (:func:`nbbn.output.is_quiet`); callers word the
    verdict themselves."""
    return output.load_facts(meta), output.is_quiet(meta)


def verdicts(ok: pd.DataFrame, per_call: pd.DataFrame | None = None) -> list[str]:
    """Each target of issue #9, met or missed by how much, per kernel label. The per-call
    target is read from ``per_call`` (kernel rows of a warm run) when it is given."""
    lines = []
    for lab, g in ok.groupby("label", sort=False):
        sp = pd.to_numeric(g["speedup"], errors="coerce")
        slow = g[sp < 1]
        gm = _geomean(sp)
        missing = int(sp.isna().sum())
        verdict = ("met" if len(slow) == 0 else
                   f"MISSED on {len(slow)} of {len(g)} points (slowest {sp.min():.2f}×: "
                   f"{_where(g.loc[sp.idxmin()])})")
        if missing:
            verdict += f"; {missing} point(s) without a PyTorch time (see bench.csv)"
        lines.append(f"- **{lab}: at least as fast as PyTorch on every point**: {verdict}")
        lines.append(f"- **{lab}: ≥ {SPEEDUP_GEOMEAN_TARGET:g}× by geometric mean**: "
                     f"{gm:.2f}× over {sp.notna().sum()} points: "
                     + ("met" if gm >= SPEEDUP_GEOMEAN_TARGET else
                        f"MISSED by {SPEEDUP_GEOMEAN_TARGET / gm:.2f}×"))
        big = g[g["x_bytes"] >= BIG_BYTES]
        for op, limit in COPY_TARGET.items():
            b = big[big["op"] == op]
            if not len(b):
                continue
            worst = b.loc[pd.to_numeric(b["time_over_copy"]).idxmax()]
            ok_ = (pd.to_numeric(b["time_over_copy"]) <= limit).all()
            lines.append(f"- **{lab}: {op} on arrays ≥ 64 MiB ≤ {limit:g}× the copy**: worst "
                         f"{worst['time_over_copy']:.2f}× ({_where(worst)}): "
                         + ("met" if ok_ else f"MISSED by {worst['time_over_copy'] / limit:.2f}×"))
        src = g if per_call is None else per_call[per_call["label"] == lab]
        tiny = src[(src["layout"] == TINY_SHAPE[0]) & (src["N"] == TINY_SHAPE[1])
                   & (src["C"] == TINY_SHAPE[2])]
        for _, r in tiny.iterrows():
            us = r["time_ms_p50"] * 1e3
            lines.append(f"- **{lab}: {r['op']} per call on (8, 16) ≤ {PER_CALL_US_TARGET:g} µs**:"
                         f" {us:.1f} µs (median of {int(r['rounds'])} calls, cache {r['cache']}"
                         "): "
                         + ("met" if us <= PER_CALL_US_TARGET else
                            f"MISSED by {us / PER_CALL_US_TARGET:.2f}×"))
    return lines


def _where(r) -> str:
    shape = r["shape"] if r["layout"] != "NC" else f"{int(r['N'])}×{int(r['C'])}"
    return f"{r['op']} {r['layout']} {shape}" + (f" N={int(r['N'])}" if r["layout"] != "NC"
                                                 else "")


def point_table(ok: pd.DataFrame, base: pd.Series) -> pd.DataFrame:
    keys = ["op", "layout", "fusion", "call", "cache", "dtype", "N", "C", "H", "W"]
    rows = []
    for _, r in ok.iterrows():
        bt = base.get(tuple(r[k] for k in keys) + (r["baseline"],), np.nan) \
            if isinstance(r.get("baseline"), str) else np.nan
        rows.append({
            "op": r["op"], "layout": r["layout"],
            "shape": r["shape"] if r["layout"] != "NC" else f"C={int(r['C'])}",
            "N": int(r["N"]), "MiB": r["MiB"], "kernel": r["label"],
            "time ms": r["time_ms_p50"],
            "torch ms": bt if not pd.isna(r["speedup"]) else np.nan,
            "copy ms": r["copy_ms_p50"],
            "GB/s": r["gbps"], "% of limit": r["pct_of_limit"],
            "time/copy": interval(r["time_over_copy"], r["time_over_copy_ci_lo"],
                                  r["time_over_copy_ci_hi"]),
            "speed-up": interval(r["speedup"], r["speedup_ci_lo"], r["speedup_ci_hi"]),
        })
    return pd.DataFrame(rows)


def markdown(df: pd.DataFrame, meta: dict, notes: str | None = None,
             per_call: tuple[pd.DataFrame, dict] | None = None) -> str:
    """The report. ``per_call``: the rows and run.json of a warm run of the (8, 16) calls
    (``--per-call``), from which the per-call target is judged: a cold call on a tiny array
    measures the DRAM and TLB misses of its half-dozen fresh arrays, not the call's cost."""
    ok = kernel_rows(df)
    pc = kernel_rows(per_call[0]) if per_call is not None else None
    base = baseline_times(df)
    load, quiet = load_summary(df, meta)
    first = df.iloc[0] if len(df) else {}
    calls = ", ".join(sorted(set(df["call"].dropna()))) if len(df) else "-"
    caches = ", ".join(sorted(set(df["cache"].dropna()))) if len(df) else "-"
    lines = [
        "# CPU kernels against PyTorch CPU (issue #9's targets)", "",
        "Generated by `nbbn report targets` from the run below; do not edit by hand "
        "(notes come from a separate file).", "",
        f"Command: `{meta.get('command', '?')}`", "",
        f"Machine: {first.get('cpu', '?')}, {first.get('cpu_count', '?')} CPUs, numba threads "
        f"{first.get('threads', '?')}, torch threads {first.get('torch_threads', '?')}; L2 "
        f"{_mib(first.get('cache_l2_bytes'))} per core, L3 {_mib(first.get('cache_l3_bytes'))}. "
        f"Versions: nbbn {first.get('nbbn_version', '?')}, numba {first.get('numba_version', '?')}"
        f", numpy {first.get('numpy_version', '?')}, torch {first.get('torch_version', '?')}.", "",
        f"{load} -- the host was **{'quiet' if quiet else 'NOT quiet'}**"
        ".", "",
        f"Method: float32; call {calls} (api: the whole allocating call, "
        "`nbbn.batch_norm_*` against `torch.ops.aten.native_batch_norm[_backward]`); cache "
        f"{caches} (cold: every call on the next of enough buffer sets to exceed twice the L3); "
        "nbbn, PyTorch and `np.copy(x)` timed round-robin in one loop; time/copy and speed-up "
        "(PyTorch time ÷ nbbn time) are medians of per-round ratios with 95% bootstrap "
        "intervals; GB/s counts the minimal bytes model (nbbn/harness/roofline.py).", "",
        "## Targets", "", *verdicts(ok, pc), "",
    ]
    for op, g in ok.groupby("op", sort=False):
        lines += [f"## {op}", "", markdown_table(point_table(g, base), ".3g", index=False), ""]
    tiny = ok[ok["tag"] == "tiny"] if "tag" in ok else ok.iloc[0:0]
    if len(tiny):
        t = pd.DataFrame({
            "op": tiny["op"], "shape": [f"{int(n)}×{int(c)}" for n, c in zip(tiny["N"], tiny["C"],
                                                                           strict=True)],
            "kernel": tiny["label"], "nbbn µs": tiny["time_ms_p50"] * 1e3,
            "calls": tiny["rounds"],
            "torch µs": [base.get(tuple(r[k] for k in ("op", "layout", "fusion", "call", "cache",
                                                         "dtype", "N", "C", "H", "W"))
                                  + (r["baseline"],), np.nan) * 1e3
                         for _, r in tiny.iterrows()],
            "speed-up": [interval(r["speedup"], r["speedup_ci_lo"], r["speedup_ci_hi"])
                         for _, r in tiny.iterrows()]})
        lines += ["## Per-call cost (tiny calls)", "",
                  "Median of single whole calls (>= 2000 rounds).", "",
                  markdown_table(t, ".3g", index=False), ""]
    if pc is not None:
        pbase = baseline_times(per_call[0])
        load_pc, quiet_pc = load_summary(per_call[0], per_call[1])
        lines += ["## Per-call cost, warm (the per-call target)", "",
                  f"Command: `{per_call[1].get('command', '?')}`; {load_pc} -- "
                  f"**{'quiet' if quiet_pc else 'NOT quiet'}**. The same arrays every call "
                  "(PyTorch's ~11–13 µs in the issue were measured so).", "",
                  markdown_table(point_table(pc, pbase), ".3g", index=False), ""]
    if notes:
        lines += ["## Notes", "", notes.strip(), ""]
    return "\n".join(lines)


def _mib(v) -> str:
    try:
        return f"{float(v) / 2**20:g} MiB"
    except (TypeError, ValueError):
        return "?"
