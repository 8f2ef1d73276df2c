"""Driver for compute-sanitizer: run every CUDA kernel once on a handful of multi-block shapes
that reach every reduction path, and check the results against the float64 reference.

    compute-sanitizer --tool memcheck python3 scripts/gpu_sanitize.py [--list] [--quick]

Unlike the test suite, each configuration is one call per op and variant (the sanitizer slows
kernels 10-100x and re-JITs nothing when NBBN_CUDA_CACHE=1 reuses the cache). The shapes make
every channel span several blocks (the block merge of NCHW: shuffles across ≥ 2 warps and the
second level; the v1 merge kernel; the v2 ticket with > 1 arrival), NC with two column
groups and a ragged last one, column-strided NCHW (N = 1), threads with several slots, and
every storage dtype. Exit status 1 if any result is off (the sanitizer's own errors make it
exit 99 through --error-exitcode).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: (label, shape, channel_axis, dtypes, LaunchConfig kwargs): block 64 keeps the grids small
#: while still giving 2 warps per block and several blocks per channel.
CONFIGS = [
    ("nchw-row-strided", (6, 3, 9, 11), 1, ("float32", "bfloat16"),
     {"block": 64, "target_blocks": 12, "min_per_thread": 2}),
    ("nchw-column-strided", (1, 2, 40, 41), 1, ("float16",),
     {"block": 64, "target_blocks": 8, "min_per_thread": 8}),
    ("nchw-several-slots", (4, 2, 300, 3), 1, ("float64",),
     {"block": 64, "target_blocks": 2, "min_per_thread": 1}),
    ("nc-two-groups", (257, 45), 1, ("float32", "float16"),
     {"block": 64, "target_blocks": 8, "min_per_thread": 2}),
    ("nhwc", (4, 5, 6, 40), -1, ("bfloat16",),
     {"block": 128, "target_blocks": 10, "min_per_thread": 2}),
]


def _dtype(name):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def run(quick: bool = False) -> int:
    from nbbn import reference as ref
    from nbbn import validate
    from nbbn.cuda import backend as B
    from nbbn.cuda import launch
    from nbbn.tolerances import rel_err, tolerance

    failures = 0
    configs = [CONFIGS[0][:3] + (CONFIGS[0][3][:1],) + CONFIGS[0][4:]] if quick else CONFIGS
    for label, shape, ax, dtypes, knobs in configs:
        cfg = launch.LaunchConfig(**knobs)
        for name in dtypes:
            dt = _dtype(name)
            rng = np.random.default_rng(0)
            x = (-2.3 + 0.5 * rng.standard_normal(shape)).astype(dt)
            dy = rng.standard_normal(shape).astype(dt)
            g = validate.geometry(x, ax)
            plan = launch.plan(g, cfg)
            for variant in ("v1", "v2"):
                args = validate.train_args(x, None, None, 1e-5, None, None, 0.1, None, ax, True)
                y, sm, si = B.train(args, variant, cfg)
                ry, rmean, rinvstd, _ = ref.forward_train(x, channel_axis=ax, relu=True)
                err_y = rel_err(y, ry)
                bargs = validate.backward_args(dy, x, sm, si, None, None, ax)
                dx, dg, db = B.backward(bargs, variant, cfg)
                rdx, rdg, rdb = ref.backward(dy, x, rmean, si, channel_axis=ax)
                err_dx = rel_err(dx, rdx, ref.dx_scale(dy, si, channel_axis=ax))
                ok = err_y <= tolerance("y", dt) and err_dx <= tolerance("dx", dt) \
                    and rel_err(db, rdb) <= tolerance("dbeta", dt)
                failures += not ok
                print(f"{'ok  ' if ok else 'FAIL'} {label:20s} {name:9s} {variant} "
                      f"grid={plan.grid} block={plan.block} dims={plan.dims} "
                      f"err_y={err_y:.1e} err_dx={err_dx:.1e}", flush=True)
            (yi,) = B.infer(validate.infer_args(x, np.zeros(g.C), np.ones(g.C), None, None, 1e-5,
                                                None, ax), "v1", cfg)
            err = rel_err(yi, ref.inference(x, np.zeros(g.C), np.ones(g.C), channel_axis=ax))
            failures += err > tolerance("y", dt)
            print(f"{'ok  ' if err <= tolerance('y', dt) else 'FAIL'} {label:20s} {name:9s} "
                  f"infer err_y={err:.1e}", flush=True)
    print(f"{failures} failure(s)")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--list", action="store_true", help="print the configurations and exit")
    p.add_argument("--quick", action="store_true", help="first configuration, float32 only")
    ns = p.parse_args(argv)
    if ns.list:
        for c in CONFIGS:
            print(*c)
        return 0
    return run(ns.quick)


if __name__ == "__main__":
    sys.exit(main())
