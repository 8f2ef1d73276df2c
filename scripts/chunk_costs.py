"""The NC family's row-chunk count against its cost (issue #24 item 1): median µs per backend
call (cold: buffer sets rotated over 64 MiB, as in the bench) of forward-train and backward on
NC shapes of the cpu-targets and default sweeps (NHWC's are NC to the kernels), under other
values of ``backend.CHUNK_BYTES[op]`` and ``backend.MIN_CHUNK_ROWS`` (the K row chunks follow
from them). Each setting is timed twice, in the order given and then reversed, and the row
shows the lower median. The first setting is round 9's plan, the second round 10's. Float32,
2 threads. Run alone, on a quiet host:

    python scripts/chunk_costs.py > results/cpu-kernels/round10/chunk-costs.md

(round 9's version of this script, with five shapes and one pass per setting, wrote
results/cpu-kernels/round9/chunk-costs.md.)
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

SHAPES = [(256, 1024), (512, 512), (1024, 256), (1568, 512), (4096, 256), (6272, 256),
          (4096, 1024), (100352, 64)]
CASES = [(op, s) for s in SHAPES for op in ("forward-train", "backward")]
#: (CHUNK_BYTES[op], MIN_CHUNK_ROWS): round 9's plan, round 10's, then fewer chunks.
SETTINGS = [(64 << 10, 32), (256 << 10, 32), (256 << 10, 64), (512 << 10, 64), (1 << 20, 32)]


def _row(op: str, shape) -> str:
    rng = np.random.default_rng(0)
    C = shape[1]
    bundles = []
    for _ in range(max(4, int(64 * 2**20 / (2 * np.prod(shape) * 4)))):
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        g = np.ones(C, np.float32)
        _, sm, si = nbbn.batch_norm_train(x, g)
        bundles.append(validate.backward_args(dy, x, sm, si, g, None, 1) if op == "backward"
                       else validate.train_args(x, g, g * 0, 1e-5, g.copy(), g.copy(), 0.1,
                                                None, 1))
    fn = B.backward if op == "backward" else B.forward_train
    kind = "backward" if op == "backward" else "forward"
    saved = B.CHUNK_BYTES[kind], B.MIN_CHUNK_ROWS
    best: dict[tuple, float] = {}
    for setting in SETTINGS + SETTINGS[::-1]:
        B.CHUNK_BYTES[kind], B.MIN_CHUNK_ROWS = setting
        B._PLANS.clear()
        fns = [lambda a=a: fn(a) for a in bundles]
        for f in fns:
            f()
        us = per_call_us(fns)
        best[setting] = min(us, best.get(setting, us))
    cells = []
    for setting in SETTINGS:
        B.CHUNK_BYTES[kind], B.MIN_CHUNK_ROWS = setting
        cells.append(f"K={B.nc_plan(*shape, 4, kind)[0]}: {best[setting]:.0f}")
    B.CHUNK_BYTES[kind], B.MIN_CHUNK_ROWS = saved
    B._PLANS.clear()
    return f"| {op} | {shape[0]}×{shape[1]} | " + " | ".join(cells) + " |"


def main() -> None:
    numba.set_num_threads(2)
    print(f"1-minute load before: {os.getloadavg()[0]:.2f}; the backend call, µs, the lower of "
          "two medians of 7 passes; K: the row chunks\n")
    head = " | ".join(f"{b >> 10} KiB, {r} rows" for b, r in SETTINGS)
    print(f"| op | x | {head} |\n|---|---|" + "---|" * len(SETTINGS))
    for op, shape in CASES:
        print(_row(op, shape), flush=True)


if __name__ == "__main__":
    main()
