"""Per-channel against per-element time of the NC family's bound calls (round 8, issue #24):
median µs of forward-train, backward and inference on (M, C) float32 arrays, M = 2..64,
C = 256 and 2048, 2 threads, the same arrays every call (warm caches). The intercept over M is
the per-channel work (the coefficients), the slope the elementwise passes. Run alone, from the
checkout to measure (it imports the ``nbbn`` that Python finds first):

    PYTHONPATH=. python scripts/channel_costs.py
"""

from __future__ import annotations

import os

import numba
import numpy as np
from _timing import median_us as _median_us

import nbbn


def median_us(fn) -> float:
    return _median_us(fn, rounds=2000, warmup=200)


def main() -> None:
    numba.set_num_threads(2)
    print(f"nbbn from {os.path.dirname(nbbn.__file__)}; 1-minute load before: "
          f"{os.getloadavg()[0]:.2f}; median µs of 2000 bound calls after 200\n")
    print("| C | M | forward-train | backward | inference |\n|---|---|---|---|---|")
    for C in (2048, 256):
        for M in (2, 4, 16, 64):
            x = np.random.default_rng(0).standard_normal((M, C)).astype(np.float32)
            g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            y, sm, si = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
            dx, dg, db = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
            fwd = nbbn.bind(nbbn.batch_norm_train, x, g, b, out=(y, sm, si))
            fwd()
            bwd = nbbn.bind(nbbn.batch_norm_backward, x, x, sm, si, g, out=(dx, dg, db))
            inf = nbbn.bind(nbbn.batch_norm_infer, x, rm, rv, g, b, out=y)
            print(f"| {C} | {M} | {median_us(fwd):.1f} | {median_us(bwd):.1f} | "
                  f"{median_us(inf):.1f} |", flush=True)


if __name__ == "__main__":
    main()
