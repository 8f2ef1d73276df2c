"""Standalone GPU bench for the verification run: nbbn's CUDA kernels (v1, v2) vs PyTorch CUDA and
a device copy of the same bytes, float32, float16 and bfloat16, timed with CUDA events.

    python3 scripts/gpu_bench.py --out DIR [--budget SECONDS] [--points N] [--dry-run]

Why not ``nbbn bench``: its ``--dtype`` takes float32/float64 only and its CUDA timing path has
never run on a GPU; this driver is small enough to trust on a first run. Data lives on the
device as PyTorch tensors (so the PyTorch interop path -- the caller's stream, the caching
allocator for the ``out=`` buffers made once per point -- is what runs), outputs are
preallocated, and each point is checked against PyTorch before it is timed (habit 4):
``rel_err`` of y within the named tolerance.

Per point: 3 warm-up calls, then rounds of (nbbn v1, nbbn v2, torch, copy) in that order
(paired, so drift hits all), each call timed by its own event pair, until ``--budget`` seconds
or 50 rounds. ``bytes`` per element: inference 2S, forward-train 3S, backward 5S (S = itemsize;
see nbbn.cuda.kernels); the copy moves 2S per element. Columns: op, shape, layout, dtype,
impl, time_ms_p50, time_ms_p10, time_ms_p90, rounds, gbps, pct_of_copy, rel_err_y.
"""

# The lambdas below close over the loop's tensors on purpose: each is called only within
# the iteration that made it.
# ruff: noqa: B023
from __future__ import annotations

import argparse
import csv
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

#: (name, shape, layout): ResNet-50's BN shapes at N = 32 (channels first and last) and NC.
SHAPES = [
    ("r50-conv1", (32, 64, 112, 112), "NCHW"),
    ("r50-stage1", (32, 256, 56, 56), "NCHW"),
    ("r50-stage2", (32, 512, 28, 28), "NCHW"),
    ("r50-stage3", (32, 1024, 14, 14), "NCHW"),
    ("r50-stage4", (32, 2048, 7, 7), "NCHW"),
    ("r50-stage1-cl", (32, 256, 56, 56), "NHWC"),
    ("small-S", (256, 64, 4, 4), "NCHW"),
    ("nc-wide", (256, 4096), "NC"),
    ("nc-tall", (65536, 256), "NC"),
]
DTYPES = ("float32", "float16", "bfloat16")
OPS = ("forward_train", "backward", "inference")
BYTES_PER_ELEMENT = {"inference": 2, "forward_train": 3, "backward": 5}  # × itemsize


def plan(points: int | None = None):
    rows = [(s, d, o) for s in SHAPES for d in DTYPES for o in OPS]
    return rows[:points] if points else rows


def _median(v):
    v = sorted(v)
    return v[len(v) // 2]


def _q(v, q):
    v = sorted(v)
    return v[min(len(v) - 1, int(q * len(v)))]


def run(out: str, budget: float, points: int | None) -> int:
    import numpy as np
    import torch

    import nbbn
    from nbbn import registry, validate
    from nbbn.spec import Layout, Op
    from nbbn.tolerances import rel_err, tolerance

    dev = torch.device("cuda")
    tdt = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    aten = torch.ops.aten
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "gpu_bench.csv")
    fields = ["op", "shape", "layout", "dtype", "impl", "time_ms_p50", "time_ms_p10",
              "time_ms_p90", "rounds", "gbps", "pct_of_copy", "rel_err_y", "device",
              "torch", "nbbn"]
    todo = plan(points)
    print(f"{len(todo)} points, {budget:.2f} s each", flush=True)
    failures = 0
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fields)
        w.writeheader()
        for (name, shape, layout), dname, opname in todo:
            op = {"forward_train": Op.FORWARD_TRAIN, "backward": Op.BACKWARD,
                  "inference": Op.INFERENCE}[opname]
            g = torch.Generator(device=dev).manual_seed(0)
            x = (-2.3 + 0.5 * torch.randn(shape, generator=g, device=dev)).to(tdt[dname])
            if layout == "NHWC":
                x = x.contiguous(memory_format=torch.channels_last)
            C = shape[1]
            w_, b_ = torch.ones(C, device=dev), torch.zeros(C, device=dev)
            rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
            dy = torch.randn_like(x)
            y_t, sm_t, si_t = aten.native_batch_norm(x, w_, b_, rm.clone(), rv.clone(), True,
                                                     0.1, 1e-5)
            calls = {}
            lay = Layout(layout) if layout != "NC" else Layout.NC
            for variant in ("v1", "v2"):
                fn = registry.select("cuda", op, lay, variant).fn
                if op is Op.FORWARD_TRAIN:
                    o = (torch.empty_like(x), torch.empty(C, device=dev),
                         torch.empty(C, device=dev))
                    a = validate.train_args(x, w_, b_, 1e-5, rm, rv, 0.1, o)
                elif op is Op.BACKWARD:
                    o = (torch.empty_like(x), torch.empty(C, device=dev),
                         torch.empty(C, device=dev))
                    a = validate.backward_args(dy, x, sm_t, si_t, w_, o)
                else:
                    o = torch.empty_like(x)
                    a = validate.infer_args(x, rm, rv, w_, b_, 1e-5, o)
                calls[f"nbbn-{variant}"] = (lambda fn=fn, a=a: fn(a), o)
            if op is Op.FORWARD_TRAIN:
                ref_y = y_t
                calls["torch"] = (lambda: aten.native_batch_norm(x, w_, b_, rm, rv, True, 0.1,
                                                                 1e-5), None)
            elif op is Op.BACKWARD:
                ref_y = aten.native_batch_norm_backward(dy, x, w_, rm, rv, sm_t, si_t, True,
                                                        1e-5, [True, True, True])[0]
                calls["torch"] = (lambda: aten.native_batch_norm_backward(
                    dy, x, w_, rm, rv, sm_t, si_t, True, 1e-5, [True, True, True]), None)
            else:
                ref_y = aten.native_batch_norm(x, w_, b_, rm, rv, False, 0.1, 1e-5)[0]
                calls["torch"] = (lambda: aten.native_batch_norm(x, w_, b_, rm, rv, False, 0.1,
                                                                 1e-5), None)
            ycopy = torch.empty_like(x)
            calls["copy"] = (lambda: ycopy.copy_(x), None)
            errs = {}
            for impl, (fn, o) in calls.items():
                if o is None:
                    continue
                fn()
                got = (o[0] if isinstance(o, tuple) else o).float().cpu().numpy()
                errs[impl] = rel_err(got, ref_y.float().cpu().numpy())
            tol = 100 * tolerance("dx" if op is Op.BACKWARD else "y", np.dtype(
                "float32" if dname != "float16" else "float16"))  # vs torch, not the reference
            bad = {k: e for k, e in errs.items() if not e <= max(tol, 2e-2)}
            if bad:
                failures += 1
                print(f"FAIL check {name} {dname} {opname}: {bad}", flush=True)
            times = {k: [] for k in calls if k not in bad}
            for fn, _ in calls.values():
                for _ in range(3):
                    fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            rounds = 0
            while rounds < 50 and (rounds < 3 or time.perf_counter() - t0 < budget):
                evs = []
                for k in times:
                    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                        enable_timing=True)
                    s.record()
                    calls[k][0]()
                    e.record()
                    evs.append((k, s, e))
                torch.cuda.synchronize()
                for k, s, e in evs:
                    times[k].append(s.elapsed_time(e))
                rounds += 1
            nbytes = x.numel() * x.element_size()
            copy_ms = _median(times["copy"]) if times.get("copy") else float("nan")
            for k, v in times.items():
                moved = 2 * nbytes if k == "copy" else BYTES_PER_ELEMENT[opname] * nbytes
                p50 = _median(v)
                w.writerow({"op": opname, "shape": "x".join(map(str, shape)), "layout": layout,
                            "dtype": dname, "impl": k, "time_ms_p50": f"{p50:.5f}",
                            "time_ms_p10": f"{_q(v, 0.1):.5f}", "time_ms_p90": f"{_q(v, 0.9):.5f}",
                            "rounds": len(v), "gbps": f"{moved / p50 / 1e6:.1f}",
                            "pct_of_copy": f"{100 * (moved / p50) / (2 * nbytes / copy_ms):.1f}",
                            "rel_err_y": f"{errs.get(k, float('nan')):.2e}",
                            "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                            "nbbn": nbbn.__version__})
            f.flush()
            print(f"{name:14s} {dname:9s} {opname:14s} " + "  ".join(
                f"{k}={_median(v):.4f}ms" for k, v in times.items()), flush=True)
    print(f"wrote {path}; {failures} point(s) failed their check (not timed)")
    return 1 if failures else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="gpu-out/bench")
    p.add_argument("--budget", type=float, default=0.25, help="seconds of rounds per point")
    p.add_argument("--points", type=int, default=None, help="only the first N points")
    p.add_argument("--dry-run", action="store_true", help="print the points and exit")
    ns = p.parse_args(argv)
    if ns.dry_run:
        todo = plan(ns.points)
        print(f"{len(todo)} points, {ns.budget:.2f} s each (+ set-up and check)")
        for (name, shape, layout), d, o in todo:
            print(f"  {name} {shape} {layout} {d} {o}")
        return 0
    return run(ns.out, ns.budget, ns.points)


if __name__ == "__main__":
    sys.exit(main())
