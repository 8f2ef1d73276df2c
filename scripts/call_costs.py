"""Where the time of a small call goes (round 7, issue #24 item 1): per shape, median µs of the
allocating API call, its validation alone, the backend's call on a validated bundle (preparation
+ kernel), the bound call (``nbbn.bind``: the kernel alone) and PyTorch's ``native_batch_norm``
on tensors it holds; inference and backward, float32, 2 threads, the same arrays every call
(warm caches). Run alone on a quiet host:

    python scripts/call_costs.py > results/cpu-kernels/round7/call-costs.md
"""

from __future__ import annotations

import os
import sys

import numba
import numpy as np
import torch
from _timing import median_us as _median_us

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import nbbn  # noqa: E402
from nbbn import registry, validate  # noqa: E402
from nbbn.spec import Layout, Op  # noqa: E402

CASES = [("NC", (64, 256), 1), ("NC", (64, 1024), 1), ("NCHW", (1, 256, 14, 14), 1),
         ("NCHW", (1, 2048, 7, 7), 1), ("NHWC", (1, 7, 7, 2048), -1), ("NC", (8, 16), 1)]


def median_us(fn) -> float:
    return _median_us(fn, rounds=3000, warmup=200)


def _case(lay: str, shape: tuple, axis: int, aten) -> None:
    C = shape[axis]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    g, b = np.ones(C, np.float32), np.zeros(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    xt = torch.from_numpy(x)
    xt = xt.permute(0, 3, 1, 2) if lay == "NHWC" else xt
    gt, bt, rmt, rvt = map(torch.from_numpy, (g, b, rm, rv))
    y = np.empty_like(x)
    ia = validate.infer_args(x, rm, rv, g, b, 1e-5, y, axis)
    fi = registry.select("cpu", Op.INFERENCE, Layout(lay)).fn
    row = [median_us(lambda: nbbn.batch_norm_infer(x, rm, rv, g, b, channel_axis=axis)),
           median_us(lambda: validate.infer_args(x, rm, rv, g, b, 1e-5, None, axis)),
           median_us(lambda: fi(ia)),
           median_us(nbbn.bind(nbbn.batch_norm_infer, x, rm, rv, g, b, channel_axis=axis,
                               out=y)),
           median_us(lambda: aten.native_batch_norm(xt, gt, bt, rmt, rvt, False, 0.0, 1e-5))]
    print(f"| inference | {lay} | {'×'.join(map(str, shape))} | "
          + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)
    _, sm, si = nbbn.batch_norm_train(x, g, b, channel_axis=axis)
    smt, sit = torch.from_numpy(sm), torch.from_numpy(si)
    dx, dg, db = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
    ba = validate.backward_args(x, x, sm, si, g, (dx, dg, db), axis)
    fb = registry.select("cpu", Op.BACKWARD, Layout(lay)).fn
    row = [median_us(lambda: nbbn.batch_norm_backward(x, x, sm, si, g, channel_axis=axis)),
           median_us(lambda: validate.backward_args(x, x, sm, si, g, None, axis)),
           median_us(lambda: fb(ba)),
           median_us(nbbn.bind(nbbn.batch_norm_backward, x, x, sm, si, g,
                               channel_axis=axis, out=(dx, dg, db))),
           median_us(lambda: aten.native_batch_norm_backward(
               xt, xt, gt, None, None, smt, sit, True, 1e-5, [True, True, True]))]
    print(f"| backward | {lay} | {'×'.join(map(str, shape))} | "
          + " | ".join(f"{v:.1f}" for v in row) + " |", flush=True)



def main() -> None:
    numba.set_num_threads(2)
    torch.set_num_threads(2)
    aten = torch.ops.aten
    print(f"1-minute load before: {os.getloadavg()[0]:.2f}; numba {numba.__version__}, torch "
          f"{torch.__version__}; median µs of {3000} calls after 200\n")
    print("| op | layout | shape | api | validation | backend call | bound | torch |")
    print("|---|---|---|---|---|---|---|---|")
    for lay, shape, axis in CASES:
        _case(lay, shape, axis, aten)

if __name__ == "__main__":
    main()
