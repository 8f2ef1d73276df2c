"""The two default-sweep points still behind PyTorch (round 11, issue #24 item 1): NCHW backward
at batch 1, 1×2048×7×7 and 1×256×14×14, float32, 2 threads. For the nbbn tree at ``--root``
(default: this checkout) one Markdown row per shape, µs per call, medians of 9 passes:

- kernel parts, warm (the same arrays every call): the backward kernel whole, its sums pass
  alone (SUMS_ONLY), and both on one thread (the serial twin, the steadier figure);
- cold (buffer sets rotated over 64 MiB, as the bench's cold mode): nbbn's public call, the
  kernel alone (its dx reused, as the allocating call's freed buffer is), and PyTorch's
  ``native_batch_norm_backward`` on the same arrays in the same process, with the ratio.

Round 11 ran it on main and on main with ``results/cpu-kernels/round11/f32-blocks.diff``
applied (float32 block sums in the NCHW backward; rejected, see round11.md). Run alone, on a
quiet host:

    python scripts/nchw_grad_costs.py [--root TREE] [--label NAME]
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np
from _timing import pass_median_us

SHAPES = ((1, 2048, 7, 7), (1, 256, 14, 14))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", default=os.path.join(os.path.dirname(__file__), ".."))
    ap.add_argument("--label", default="main")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.root))
    import numba
    import torch

    import nbbn
    from nbbn import validate
    from nbbn.cpu import backend as B

    numba.set_num_threads(2)
    torch.set_num_threads(2)
    aten = torch.ops.aten
    rng = np.random.default_rng(0)
    print(f"tree {a.label} ({os.path.abspath(a.root)}); 1-minute load before: "
          f"{os.getloadavg()[0]:.2f}\n")
    print("| tree | x | kernel | sums pass | kernel, 1 thread | sums pass, 1 thread | "
          "cold: api | cold: kernel | cold: PyTorch | PyTorch ÷ api |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for shape in SHAPES:
        C = shape[1]
        n_sets = max(8, int(64 * 2**20 / (2 * np.prod(shape) * 4)))
        sets = []
        for _ in range(n_sets):
            x = rng.standard_normal(shape).astype(np.float32)
            dy = rng.standard_normal(shape).astype(np.float32)
            g = np.ones(C, np.float32)
            _, sm, si = nbbn.batch_norm_train(x, g)
            sets.append((x, dy, g, sm, si))
        preps = [B._prep_backward(validate.backward_args(dy, x, sm, si, g, None, 1), "auto")
                 for x, dy, g, sm, si in sets]
        par, ser = B.K.NCHW_BACKWARD_GROUPED
        dx0 = preps[0][1][3]
        kargs = []
        for p in preps:
            ka = list(p[1])
            ka[3] = ka[4] = dx0
            kargs.append(tuple(ka))
        F = 11  # the flags argument
        sums_only = kargs[0][:F] + (kargs[0][F] | B.K.SUMS_ONLY,) + kargs[0][F + 1:]
        warm = {
            "kernel": [lambda k=par, a=kargs[0]: k(*a)] * 200,
            "sums": [lambda k=par, a=sums_only: k(*a)] * 200,
            "kernel1": [lambda k=ser, a=kargs[0]: k(*a)] * 200,
            "sums1": [lambda k=ser, a=sums_only: k(*a)] * 200,
        }
        tsets = [tuple(map(torch.from_numpy, s)) for s in sets]
        cold = {
            "api": [lambda s=s: nbbn.batch_norm_backward(s[1], s[0], s[3], s[4], s[2])
                    for s in sets],
            "kernel": [lambda k=par, ka=ka: k(*ka) for ka in kargs],
            "torch": [lambda t=t: aten.native_batch_norm_backward(
                t[1], t[0], t[2], None, None, t[3], t[4], True, 1e-5, [True, True, True])
                for t in tsets],
        }
        for fns in (*warm.values(), *cold.values()):
            fns[0]()
        w = {k: pass_median_us(v, passes=9) for k, v in warm.items()}
        c = {k: pass_median_us(v, passes=9) for k, v in cold.items()}
        print(f"| {a.label} | {'×'.join(map(str, shape))} | {w['kernel']:.1f} | {w['sums']:.1f} "
              f"| {w['kernel1']:.1f} | {w['sums1']:.1f} | {c['api']:.1f} | {c['kernel']:.1f} | "
              f"{c['torch']:.1f} | {c['torch'] / c['api']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
