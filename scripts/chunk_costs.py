"""The NC family's row-chunk count against its cost (round 9, issue #24 item 1): median µs per
backend call (cold: buffer sets rotated over 64 MiB, as in the bench) of NC shapes from the
cpu-targets sweep that trail PyTorch, under other values of ``backend.CHUNK_BYTES`` and
``backend.MIN_CHUNK_ROWS`` (the plan's K row chunks follow from them; the first and last
columns are the plan's own). Float32, 2 threads. Run alone, on a quiet host:

    python scripts/chunk_costs.py > results/cpu-kernels/round9/chunk-costs.md
"""

from __future__ import annotations

import os
import sys

import numba
import numpy as np
from cold_costs import per_call_us

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nbbn  # noqa: E402
from nbbn import validate  # noqa: E402
from nbbn.cpu import backend as B  # noqa: E402

CASES = [("backward", (1568, 512)), ("forward-train", (1568, 512)), ("backward", (256, 1024)),
         ("forward-train", (4096, 256)), ("backward", (4096, 256))]
#: (CHUNK_BYTES, MIN_CHUNK_ROWS): the plan's, then fewer chunks, then the plan's again.
SETTINGS = [(64 << 10, 32), (256 << 10, 32), (1 << 20, 32), (64 << 10, 128), (64 << 10, 32)]


def _row(op: str, shape) -> str:
    rng = np.random.default_rng(0)
    C = shape[1]
    bundles = []
    for _ in range(max(8, int(64 * 2**20 / (2 * np.prod(shape) * 4)))):
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        g = np.ones(C, np.float32)
        _, sm, si = nbbn.batch_norm_train(x, g)
        bundles.append(validate.backward_args(dy, x, sm, si, g, None, 1) if op == "backward"
                       else validate.train_args(x, g, g * 0, 1e-5, g.copy(), g.copy(), 0.1,
                                                None, 1))
    fn = B.backward if op == "backward" else B.forward_train
    cells = []
    for chunk_bytes, min_rows in SETTINGS:
        B.CHUNK_BYTES, B.MIN_CHUNK_ROWS = chunk_bytes, min_rows
        B._PLANS.clear()
        fns = [lambda a=a: fn(a) for a in bundles]
        for f in fns:
            f()
        K = B.nc_plan(*shape, 4, B.SPLIT_FROM_BYTES.get("backward" if op == "backward"
                                                         else "forward"))[0]
        cells.append(f"K={K}: {per_call_us(fns):.0f}")
    B.CHUNK_BYTES, B.MIN_CHUNK_ROWS = SETTINGS[0]
    B._PLANS.clear()
    return f"| {op} | {shape[0]}×{shape[1]} | " + " | ".join(cells) + " |"


def main() -> None:
    numba.set_num_threads(2)
    print(f"1-minute load before: {os.getloadavg()[0]:.2f}; the backend call, µs, median of 7 "
          "passes; settings (CHUNK_BYTES, MIN_CHUNK_ROWS): " + ", ".join(
              f"({b >> 10} KiB, {r})" for b, r in SETTINGS) + "\n")
    print("| op | x | plan's | | | | plan's again |\n|---|---|---|---|---|---|---|")
    for op, shape in CASES:
        print(_row(op, shape), flush=True)


if __name__ == "__main__":
    main()
