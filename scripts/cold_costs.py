"""Where a cold allocating backward call's time goes (round 9, issue #24 item 1): median µs per
call over buffer sets rotated to exceed 64 MiB (every call's x and dy come from DRAM, as in the
bench's cold mode), for nbbn's public call, its validation, its preparation, the backend call
(preparation and kernel), and PyTorch's ``native_batch_norm_backward`` on the same arrays;
with ``--groups``, the backend call of the two batch-1 NCHW shapes under other values of
``backend.MIN_GROUPS`` (the NCHW kernels' least number of channel groups). Float32, 2 threads.
Run alone, on a quiet host:

    python scripts/cold_costs.py > results/cpu-kernels/round9/cold-costs.md
    python scripts/cold_costs.py --groups > results/cpu-kernels/round9/cold-groups.md
"""

from __future__ import annotations

import os
import sys

import numba
import numpy as np
import torch
from _timing import pass_median_us

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nbbn  # noqa: E402
from nbbn import validate  # noqa: E402
from nbbn.cpu import backend as B  # noqa: E402

CASES = [((1, 2048, 7, 7), 1), ((1, 256, 14, 14), 1), ((64, 256), 1), ((1, 14, 14, 256), -1)]
ATEN = torch.ops.aten


def _torch_call(x, dy, g, sm, si, ax):
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    if ax != 1:
        tx, tdy = tx.movedim(-1, 1), tdy.movedim(-1, 1)
    w, m, s = map(torch.from_numpy, (g, sm, si))
    return lambda: ATEN.native_batch_norm_backward(tdy, tx, w, None, None, m, s, True, 1e-5,
                                                   [True, True, True])


def _sets(shape, ax) -> list:
    """Buffer sets (x, dy, γ, save_mean, save_invstd) of at least 64 MiB in all."""
    rng = np.random.default_rng(0)
    C = shape[ax]
    n_sets = max(8, int(64 * 2**20 / (2 * np.prod(shape) * 4)))
    sets = []
    for _ in range(n_sets):
        x = rng.standard_normal(shape).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        g = np.ones(C, np.float32)
        _, sm, si = nbbn.batch_norm_train(x, g, channel_axis=ax)
        sets.append((x, dy, g, sm, si))
    return sets


def _groups(shape) -> str:
    bundles = [validate.backward_args(dy, x, sm, si, g, None, 1)
               for x, dy, g, sm, si in _sets(shape, 1)]
    cells = []
    for mg in (16, 4, 8, 32, 16):
        B.MIN_GROUPS = mg
        B._PLANS.clear()
        fns = [lambda a=a: B.backward(a) for a in bundles]
        for f in fns:
            f()
        G = B.nchw_group(*bundles[0].geom.kernel_shape, 4)
        cells.append(f"{-(-shape[1] // G)}: {pass_median_us(fns):.1f}")
    B.MIN_GROUPS = 16
    B._PLANS.clear()
    return f"| {'×'.join(map(str, shape))} | " + " | ".join(cells) + " |"


def _row(shape, ax) -> str:
    sets = _sets(shape, ax)
    n_sets = len(sets)
    bundles = [validate.backward_args(dy, x, sm, si, g, None, ax) for x, dy, g, sm, si in sets]
    calls = {
        "api": [lambda s=s: nbbn.batch_norm_backward(s[1], s[0], s[3], s[4], s[2],
                                                     channel_axis=ax) for s in sets],
        "validation": [lambda s=s: validate.backward_args(s[1], s[0], s[3], s[4], s[2], None, ax)
                       for s in sets],
        "preparation": [lambda a=a: B._prep_backward(a, "auto") for a in bundles],
        "backend call": [lambda a=a: B.backward(a) for a in bundles],
        "PyTorch": [_torch_call(x, dy, g, sm, si, ax) for x, dy, g, sm, si in sets],
    }
    for fns in calls.values():
        for f in fns:
            f()
    t = {name: pass_median_us(fns) for name, fns in calls.items()}
    return (f"| {'×'.join(map(str, shape))} | {n_sets} | " + " | ".join(f"{v:.1f}" for v in
                                                                       t.values()) + " |")


def main() -> None:
    numba.set_num_threads(2)
    torch.set_num_threads(2)
    if "--groups" in sys.argv[1:]:
        print(f"1-minute load before: {os.getloadavg()[0]:.2f}; the backend call, µs, median of "
              "7 passes; groups: µs for MIN_GROUPS = 16 (the plan's), 4, 8, 32, 16 again\n")
        print("| x | groups: µs | | | | |\n|---|---|---|---|---|---|")
        for shape in ((1, 2048, 7, 7), (1, 256, 14, 14)):
            print(_groups(shape), flush=True)
        return
    print(f"1-minute load before: {os.getloadavg()[0]:.2f}; median of 7 passes over the buffer "
          "sets, µs per call; backward, float32, 2 threads\n")
    print("| x | buffer sets | api | validation | preparation | backend call | PyTorch |")
    print("|---|---|---|---|---|---|---|")
    for shape, ax in CASES:
        print(_row(shape, ax), flush=True)


if __name__ == "__main__":
    main()
