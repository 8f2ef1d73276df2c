"""Where an allocating cpu call's Python time goes (rounds 8-9, issue #24 item 1): median µs of
the whole public call, its validation, the backend's preparation (views, outputs, flags, plan,
scratch) and the kernel on the prepared arguments, then each preparation step alone, for
backward (two x-shaped inputs) on the sweep's small shapes that trail PyTorch in the allocating
mode. Float32, 2 threads, warm caches. Run alone, on a quiet host:

    python scripts/prep_costs.py > results/cpu-kernels/round9/prep-costs.md
"""

from __future__ import annotations

import os
import sys

import numba
import numpy as np
from _timing import median_us as _median_us

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nbbn  # noqa: E402
from nbbn import validate  # noqa: E402
from nbbn.cpu import backend as B  # noqa: E402
from nbbn.fold import fold_precision  # noqa: E402

CASES = [((1, 2048, 7, 7), 1), ((1, 256, 14, 14), 1), ((64, 256), 1), ((1, 14, 14, 256), -1)]


def median_us(fn) -> float:
    return _median_us(fn, rounds=3000, warmup=300)


def _row(shape, ax) -> None:
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    g = np.ones(shape[ax], np.float32)
    _, sm, si = nbbn.batch_norm_train(x, g, channel_axis=ax)
    a = validate.backward_args(x, x, sm, si, g, None, ax)
    kernel, kargs, _, _ = B._prep_backward(a, "auto")
    row = [median_us(lambda: nbbn.batch_norm_backward(x, x, sm, si, g, channel_axis=ax)),
           median_us(lambda: validate.backward_args(x, x, sm, si, g, None, ax)),
           median_us(lambda: B._prep_backward(a, "auto")),
           median_us(lambda: kernel(*kargs)),
           median_us(lambda: B.backward(a))]
    print(f"| {'×'.join(map(str, shape))} | " + " | ".join(f"{v:.1f}" for v in row) + " |",
          flush=True)


def main() -> None:
    numba.set_num_threads(2)
    print(f"1-minute load before: {os.getloadavg()[0]:.2f}; median µs of 3000 calls after 300; "
          "backward, float32\n")
    print("| x | api | validation | preparation | kernel | backend call |")
    print("|---|---|---|---|---|---|")
    for shape, ax in CASES:
        _row(shape, ax)
    f32 = np.dtype(np.float32)
    shape, ax = CASES[0]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    g = np.ones(shape[ax], np.float32)
    _, sm, si = nbbn.batch_norm_train(x, g, channel_axis=ax)
    a = validate.backward_args(x, x, sm, si, g, None, ax)
    geom = a.geom
    p = B.plan("backward", geom.kernel_shape, 4, "auto")
    empty = median_us(lambda: None)
    steps = {
        "view of x for the kernels (`_kview`)": lambda: B._kview(a.x, geom, "x"),
        "... as the kernels take it (`_input`)": lambda: B._input(a.x, geom, "x"),
        "flags": lambda: B._flags(a),
        "dx allocated (`_out`)": lambda: B._out(geom, None),
        "dgamma, dbeta allocated": lambda: (np.empty(geom.C, f32), np.empty(geom.C, f32)),
        "fold precision": lambda: fold_precision(a.save_mean.dtype, f32),
        "vectors (`_vecs`)": lambda: B._vecs(
            f32, (a.save_mean, a.save_invstd, a.gamma), B._BACKWARD_VECS),
        "plan": lambda: B.plan("backward", geom.kernel_shape, 4, "auto"),
        "sums and scratch (`_carve`)": lambda: B._carve(p, f32),
    }
    print(f"\nThe preparation's steps, {'×'.join(map(str, shape))} (µs, less an empty call's "
          f"{empty:.2f}):\n\n| step | µs |\n|---|---|")
    for name, fn in steps.items():
        print(f"| {name} | {median_us(fn) - empty:.2f} |", flush=True)


if __name__ == "__main__":
    main()
