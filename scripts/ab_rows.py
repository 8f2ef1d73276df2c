"""The rows of ``nbbn compare --csv`` files that are not ``same``, sorted by ratio, as Markdown
(time new/old with its 95% interval and the verdict), then the verdict counts.

    python scripts/ab_rows.py results/cpu-kernels/round9/ab-kernel-default.csv
"""

from __future__ import annotations

import sys

import pandas as pd


def main() -> None:
    for path in sys.argv[1:]:
        d = pd.read_csv(path).sort_values("ratio")
        print(f"`{path}`: " + ", ".join(f"{n} {k}" for k, n in d.label.value_counts().items()))
        print("\n| op | layout | x | time new/old [95%] | verdict |\n|---|---|---|---|---|")
        for r in d[d.label != "same"].itertuples():
            x = f"{r.N}×{r.C}" if r.layout == "NC" else (
                f"{r.N}×{r.C}×{r.H}×{r.W}" if r.layout == "NCHW" else f"{r.N}×{r.H}×{r.W}×{r.C}")
            print(f"| {r.op} | {r.layout} | {x} | {r.ratio:.3f} [{r.ratio_lo:.3f}, "
                  f"{r.ratio_hi:.3f}] | {r.label} |")
        print()


if __name__ == "__main__":
    main()
