"""Turn a pytest-benchmark JSON of benchmarks/test_cpu.py into the Markdown report.

    python benchmarks/summarize.py BENCH.json --out results/cpu-kernels.md --command "..."

Every figure is a ratio of medians taken in the same run, so machine noise mostly cancels.
Goals checked (float32, allocating API vs allocating API):
  speed-up over PyTorch CPU: median over shapes ≥ 2 per op, and > 1 on every shape;
  time over copy: forward-train and inference ≤ 1.25, backward ≤ 2.
"""

from __future__ import annotations

import argparse
import json
import platform

import pandas as pd

from nbbn.report import markdown_table

COPY_GOAL = {"forward-train": 1.25, "inference": 1.25, "backward": 2.0}


def load(path: str) -> pd.DataFrame:
    data = json.load(open(path))
    rows = []
    for b in data["benchmarks"]:
        info = b.get("extra_info", {})
        if "op" not in info:
            continue
        st = b["stats"]
        rows.append({"op": info["op"], "shape": "x".join(map(str, info["shape"])),
                     "impl": info["impl"], "time_ms_p50": st["median"] * 1e3,
                     "time_ms_iqr": st["iqr"] * 1e3, "rounds": st["rounds"],
                     "bytes": info["bytes"], "threads": info["threads"]})
    return pd.DataFrame(rows), data.get("machine_info", {})


def summarize(df: pd.DataFrame) -> tuple[pd.DataFrame, list[str]]:
    t = df.pivot_table(index=["op", "shape"], columns="impl", values="time_ms_p50")
    t["speedup_vs_torch"] = t["torch"] / t["nbbn"]
    t["nbbn_over_copy"] = t["nbbn"] / t["copy"]
    t["nbbn_out_over_copy"] = t["nbbn-out"] / t["copy"]
    verdicts = []
    for op, g in t.groupby(level="op"):
        med, worst = g["speedup_vs_torch"].median(), g["speedup_vs_torch"].min()
        ok = med >= 2 and worst > 1
        verdicts.append(f"- {op}: speed-up over PyTorch CPU median {med:.2f}× (goal ≥ 2), "
                        f"lowest {worst:.2f}× (goal > 1): **{'met' if ok else 'MISSED'}**")
        worst_copy = g["nbbn_over_copy"].max()
        goal = COPY_GOAL[op]
        verdicts.append(f"- {op}: time over copy at most {worst_copy:.2f}× (goal ≤ {goal}): "
                        f"**{'met' if worst_copy <= goal else 'MISSED'}**")
    return t.reset_index(), verdicts


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("json")
    ap.add_argument("--out", required=True)
    ap.add_argument("--command", required=True)
    a = ap.parse_args()
    df, machine = load(a.json)
    table, verdicts = summarize(df)
    cpu = machine.get("cpu", {}).get("brand_raw", platform.processor())
    cols = ["op", "shape", "nbbn", "nbbn-out", "torch", "copy", "speedup_vs_torch",
            "nbbn_over_copy", "nbbn_out_over_copy"]
    md = [
        "# CPU kernels: measured speed",
        "",
        f"Command: `{a.command}`",
        "",
        f"Machine: {cpu}, {df['threads'].iloc[0]} Numba threads; float32; times are medians "
        "(ms) of 15 rounds after 2 warm-up rounds. `nbbn` and `torch` allocate their outputs; "
        "`nbbn-out` writes into preallocated ones; `copy` is `np.copy` of the op's input (one "
        "read + one write of the same bytes, allocating).",
        "",
        markdown_table(table[cols], ".3g", index=False),
        "",
        "## Goals",
        "",
        *verdicts,
        "",
    ]
    with open(a.out, "w") as f:
        f.write("\n".join(md))
    df.to_csv(a.out.rsplit(".", 1)[0] + ".csv", index=False)
    print("\n".join(md))


if __name__ == "__main__":
    main()
