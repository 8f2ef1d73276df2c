"""Why the NC reductions want big row chunks (round 10, issue #24 item 1): the forward-train sums
pass, the kernels' own ``_rows_shifted_sums`` (four row streams per chunk), run on ONE thread
over cold arrays (a set of arrays of 64 MiB or more in all, taken in turn) cut into chunks of R
rows, each chunk zeroing and filling its own float64 partials as ``nc_forward`` does; no merge,
no parallel region. If the cost were the merge or the threads, R would not matter here. Median
µs per array of 7 passes. Run alone, on a quiet host:

    python scripts/chunk_streams.py > results/cpu-kernels/round10/chunk-streams.md
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from numba import njit

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from nbbn.cpu import kernels as K  # noqa: E402

SHAPES = [(1568, 512), (4096, 256)]
ROWS = (32, 64, 128, 256, 512)


@njit(fastmath=K._FM, error_model="numpy")
def _sums(x, R, part, shift):
    """Chunks of R rows (the last one takes the rest), each into its own partials."""
    n = x.shape[0] // R
    for k in range(n):
        a1 = part[k, 0]
        a2 = part[k, 1]
        a1[:] = 0.0
        a2[:] = 0.0
        K._rows_shifted_sums(x, k * R, x.shape[0] if k == n - 1 else (k + 1) * R, shift, a1, a2)


def main() -> None:
    print(f"1-minute load before: {os.getloadavg()[0]:.2f}; one thread, float32, µs per array "
          "(median of 7 passes over the set)\n")
    print("| x | bytes of a chunk row | " + " | ".join(f"R = {r}" for r in ROWS)
          + " | one chunk |\n|---|---|" + "---|" * (len(ROWS) + 1))
    for M, C in SHAPES:
        n = max(8, int(64 * 2**20 / (M * C * 4)))
        xs = [np.random.default_rng(i).standard_normal((M, C)).astype(np.float32)
              for i in range(n)]
        shift = np.zeros(C)
        cells = []
        for R in (*ROWS, M):
            part = np.zeros((M // R, 2, C))
            _sums(xs[0], R, part, shift)
            ts = []
            for _ in range(7):
                t0 = time.perf_counter_ns()
                for x in xs:
                    _sums(x, R, part, shift)
                ts.append((time.perf_counter_ns() - t0) / n / 1e3)
            cells.append(f"{np.median(ts):.0f}")
        print(f"| {M}×{C} | {C * 4} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
