"""Per peer, how many points nbbn's ``cpu`` is behind in one or more bench runs: the point
estimate below 1, and the whole 95% interval below 1 (what the round-3 intervals call slower),
with the worst point; then per op and layout against one peer (geomean, min, slower).

    python scripts/peer_counts.py results/bench/round7-default results/bench/round7-api
    python scripts/peer_counts.py --by-op torch-cpu results/bench/round7-bfloat16

Reads each run's ratios.csv (rows ``backend == "cpu"`` over ``vs_backend``); prints Markdown.
"""

from __future__ import annotations

import argparse
import math

import pandas as pd

PEERS = ("torch-cpu", "onnxruntime", "jax")


def counts(run: str) -> list[str]:
    r = pd.read_csv(f"{run}/ratios.csv")
    r = r[(r.backend == "cpu") & r.vs_backend.isin(PEERS)]
    lines = []
    for vs, g in r.groupby("vs_backend", sort=False):
        worst = g.loc[g.speedup.idxmin()]
        lines.append(f"| `{run}` | {g.call.iloc[0]} | {vs} | {len(g)} | "
                     f"{(g.speedup < 1).sum()} | {(g.speedup_ci_hi < 1).sum()} | "
                     f"{worst.speedup:.3g} [{worst.speedup_ci_lo:.3g}, {worst.speedup_ci_hi:.3g}] "
                     f"({worst.op} {worst.layout} {worst.x_shape}) |")
    return lines


def by_op(run: str, vs: str) -> list[str]:
    r = pd.read_csv(f"{run}/ratios.csv")
    r = r[(r.backend == "cpu") & (r.vs_backend == vs)]
    lines = ["| op | layout | points | speed-up geomean | min | interval below 1 |",
             "|---|---|---|---|---|---|"]
    for (op, lay), g in r.groupby(["op", "layout"], sort=False):
        gm = math.exp(sum(math.log(v) for v in g.speedup) / len(g))
        lines.append(f"| {op} | {lay} | {len(g)} | {gm:.3g} | {g.speedup.min():.3g} | "
                     f"{(g.speedup_ci_hi < 1).sum()} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--by-op", metavar="PEER")
    a = ap.parse_args()
    if a.by_op:
        for run in a.runs:
            print("\n".join([f"`{run}`, cpu over {a.by_op}:", "", *by_op(run, a.by_op), ""]))
        return
    print("| run | call | peer | points | point estimate < 1 | interval below 1 | worst |")
    print("|---|---|---|---|---|---|---|")
    for run in a.runs:
        print("\n".join(counts(run)))


if __name__ == "__main__":
    main()
