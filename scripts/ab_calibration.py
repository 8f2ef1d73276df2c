"""The A/B backend's calibration check: in one run that timed cpu-slowed beside cpu, the paired
ratio cpu-slowed time / cpu time per point (ratios.csv: backend cpu, vs_backend cpu-slowed) --
expected 1 + nbbn.bench.baselines.SLOWDOWN (1.15).

    python scripts/ab_calibration.py results/reliability/ab-run
"""

import sys
from pathlib import Path

import pandas as pd

from nbbn.bench.baselines import SLOWDOWN

r = pd.read_csv(Path(sys.argv[1]) / "ratios.csv")
r = r[(r["backend"] == "cpu") & (r["vs_backend"] == "cpu-slowed")]
if not len(r):
    sys.exit(f"{sys.argv[1]}: no cpu vs cpu-slowed ratios (run with --backend cpu,cpu-slowed)")
s = r["speedup"]
print(f"cpu-slowed time / cpu time over {len(r)} points: median {s.median():.3f}, "
      f"min {s.min():.3f}, max {s.max():.3f} (target {1 + SLOWDOWN:.2f})")
