"""GPU benchmark of backend="cuda": nbbn vs PyTorch CUDA vs a device-to-device copy.

    python benchmarks/gpu_bench.py --out DIR            # on a machine with an NVIDIA GPU
    python benchmarks/gpu_bench.py --out DIR --smoke    # tiny shapes under the CUDA simulator

For each op × shape (float32, data already on the device) and each registry variant of the cuda
backend (v1: merge kernel, v2: last-block ticket), the script

1. runs nbbn once with preallocated device outputs and checks every output against the float64
   reference (nbbn.reference, nbbn.tolerances); only what passed is timed;
2. times nbbn (the registered variant on validated arguments, ``out=`` preallocated), PyTorch
   (``torch.nn.functional.batch_norm``, cuDNN where it applies; backward through autograd on a
   retained graph) and a device-to-device copy of x, all with CUDA events on the legacy default
   stream after warm-up;
3. writes ``gpu_bench.csv`` and ``gpu_bench.md`` (one row per op × shape × version).

Timing (nvbench's "blocking kernel"): a spin kernel holds the GPU while the host enqueues
``reps`` calls with an event between consecutive calls, so the events measure GPU time of
back-to-back calls, not Python launch overhead; p20/p50/p80 are over the reps. ``host_ms`` is
the host-side cost of one call (Python + launches), measured apart: when it exceeds
``time_ms_p50`` a Python loop of calls is CPU-bound.

Bytes model (what the kernels move; per-channel traffic ignored), S = x.nbytes:
    inference      2S  (read x, write y)
    forward-train  3S  (statistics read x; normalize reads x, writes y)
    backward       5S  (sums read dy and x; dx pass reads dy and x, writes dx)
    copy           2S  (read x, write a copy)
gbps = bytes / time_ms_p50; pct_of_copy = gbps / copy_gbps (same run, same device).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from cases import _data  # noqa: E402  (the CPU suite's inputs: one definition for both)

SHAPES = {
    "NCHW": [(64, 64, 56, 56), (32, 256, 56, 56), (128, 64, 112, 112), (32, 2048, 7, 7)],
    "NC": [(256, 4096), (4096, 1024), (65536, 256)],
}
SMOKE_SHAPES = {"NCHW": [(2, 3, 5, 5)], "NC": [(37, 3)]}
OPS = ("forward-train", "inference", "backward")
BYTES_PER_X = {"forward-train": 3, "inference": 2, "backward": 5}
VARIANTS = ("v1", "v2")
COLUMNS = ["op", "layout", "shape", "dtype", "variant", "time_ms_p50", "time_ms_p20",
           "time_ms_p80", "host_ms", "first_call_s", "gbps", "copy_gbps", "pct_of_copy",
           "torch_ms", "speedup_vs_torch", "rel_err", "passed", "device", "reps", "versions"]


def _percentiles(ms):
    p20, p50, p80 = np.percentile(np.asarray(ms, dtype=np.float64), [20, 50, 80])
    return float(p50), float(p20), float(p80)


class Timer:
    """GPU time of back-to-back calls behind a blocking spin kernel (see the module docstring);
    wall-clock under the simulator, whose events record nothing."""

    def __init__(self, cuda, simulator: bool, reps: int, warmup: int):
        self.cuda, self.simulator, self.reps, self.warmup = cuda, simulator, reps, warmup
        if not simulator:
            @cuda.jit
            def spin(iters):
                for _ in range(iters):
                    cuda.nanosleep(1000)

            self._spin = spin

    def host_ms(self, fn, n: int = 10) -> float:
        """Host cost of one call: n calls enqueued back to back, without waiting for the GPU."""
        self.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        t1 = time.perf_counter()
        self.cuda.synchronize()
        return (t1 - t0) / n * 1e3

    def __call__(self, fn) -> tuple[list[float], float]:
        """(per-call GPU times in ms, host ms per call)."""
        for _ in range(self.warmup):
            fn()
        host = self.host_ms(fn, n=min(10, self.reps))
        if self.simulator:
            times = []
            for _ in range(self.reps):
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
            return times, host
        cuda = self.cuda
        events = [cuda.event(timing=True) for _ in range(self.reps + 1)]
        # Hold the GPU for 1.5× the time the host needs to enqueue everything (+ 2 ms).
        self._spin[1, 1](int((1.5 * host * self.reps + 2.0) * 1e3))
        events[0].record()
        for i in range(self.reps):
            fn()
            events[i + 1].record()
        events[-1].synchronize()
        return [cuda.event_elapsed_time(events[i], events[i + 1]) for i in range(self.reps)], host


def _versions() -> str:
    import numba

    parts = [f"python {platform.python_version()}", f"numba {numba.__version__}"]
    try:
        import numba_cuda

        parts.append(f"numba-cuda {numba_cuda.__version__}")
    except Exception:
        pass
    try:
        import torch

        parts.append(f"torch {torch.__version__}")
    except Exception:
        pass
    return ", ".join(parts)


class Case:
    """Device data, reference results and the three timed callables of one (op, shape)."""

    def __init__(self, op, layout, shape, cuda, torch, torch_device):
        from nbbn import reference as ref

        self.op, self.layout, self.shape, self.cuda = op, layout, shape, cuda
        self.torch, self.torch_device = torch, torch_device
        x, dy, gamma, beta = _data(shape)  # float32, x = −2.3 + 0.5·randn (non-zero mean)
        C = shape[1]
        self.nbytes = x.nbytes
        d = cuda.to_device
        self.x, self.dy, self.gamma, self.beta = d(x), d(dy), d(gamma), d(beta)
        self.rm, self.rv = d(np.zeros(C, np.float32)), d(np.ones(C, np.float32))
        self.xcopy = cuda.device_array_like(self.x)
        f32 = np.float32
        if op == "forward-train":
            self.out = (cuda.device_array(shape, f32), cuda.device_array(C, f32),
                        cuda.device_array(C, f32))
            ry, rmean, rinvstd, _ = ref.forward_train(x, gamma, beta)
            self.refs = (ry, rmean, rinvstd)
        elif op == "inference":
            self.out = cuda.device_array(shape, f32)
            self.host_rm, self.host_rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
            self.rm, self.rv = d(self.host_rm.astype(f32)), d(self.host_rv.astype(f32))
            self.refs = (ref.inference(x, self.rm.copy_to_host(), self.rv.copy_to_host(), gamma,
                                       beta),)
        else:
            _, sm, si, _ = ref.forward_train(x, gamma, beta)  # saved statistics, as float32
            sm, si = sm.astype(f32), si.astype(f32)
            self.sm, self.si = d(sm), d(si)
            self.out = (cuda.device_array(shape, f32), cuda.device_array(C, f32),
                        cuda.device_array(C, f32))
            dx, dg, db = ref.backward(dy, x, sm, si, gamma)
            self.refs = (dx, dg, db)
            self.scales = {"dx": ref.dx_scale(dy, si, gamma)}
        self.x_host, self.dy_host, self.gamma_host, self.beta_host = x, dy, gamma, beta

    def nbbn(self, variant: str = "v1"):
        """One call of the registered cuda kernel of ``variant`` (what the public API runs for
        the default variant: validation, then the kernel)."""
        from nbbn import registry, validate

        fn = registry.select("cuda", self.op, self.layout, variant).fn
        if self.op == "forward-train":
            return fn(validate.train_args(self.x, self.gamma, self.beta, 1e-5, self.rm, self.rv,
                                          0.1, self.out))
        if self.op == "inference":
            return fn(validate.infer_args(self.x, self.rm, self.rv, self.gamma, self.beta, 1e-5,
                                          self.out))
        return fn(validate.backward_args(self.dy, self.x, self.sm, self.si, self.gamma,
                                         self.out))

    def check(self, variant: str) -> tuple[float, bool]:
        from nbbn.tolerances import check_outputs, passed

        outs = [o.copy_to_host() for o in self.nbbn(variant)]
        errs = check_outputs(self.op, outs, self.refs, getattr(self, "scales", None))
        return max(errs.values()), passed(errs, np.float32)

    def copy(self):
        # An explicit stream makes numba use cuMemcpyDtoDAsync (enqueued like the kernels);
        # the legacy default stream is the one the events are recorded on.
        self.xcopy.copy_to_device(self.x, stream=self.cuda.legacy_default_stream())

    def torch_fn(self):
        """A zero-argument callable running the PyTorch equivalent, or None."""
        torch = self.torch
        if torch is None:
            return None
        F = torch.nn.functional
        dev = self.torch_device
        x = torch.as_tensor(self.x_host, device=dev)
        w = torch.as_tensor(self.gamma_host, device=dev)
        b = torch.as_tensor(self.beta_host, device=dev)
        rm = torch.zeros(self.shape[1], device=dev)
        rv = torch.ones(self.shape[1], device=dev)
        if self.op == "forward-train":
            return lambda: F.batch_norm(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
        if self.op == "inference":
            return lambda: F.batch_norm(x, rm, rv, w, b, training=False, eps=1e-5)
        xg = x.clone().requires_grad_(True)
        wg = w.clone().requires_grad_(True)
        bg = b.clone().requires_grad_(True)
        y = F.batch_norm(xg, rm, rv, wg, bg, training=True, momentum=0.1, eps=1e-5)
        dy = torch.as_tensor(self.dy_host, device=dev)
        return lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True)


def _torch_or_reason(simulator: bool):
    """(torch, device, None) for the baseline, or (None, None, why not). Under the simulator
    torch runs on the CPU, only to exercise this script's PyTorch code."""
    try:
        import torch
    except ImportError:
        return None, None, "torch is not installed"
    if simulator:
        return torch, "cpu", None
    if not torch.cuda.is_available():
        return None, None, "torch has no CUDA device"
    if torch.cuda.current_stream().cuda_stream != 0:
        return None, None, "torch's current stream is not the legacy default stream of the events"
    return torch, "cuda", None


def run(out_dir: Path, smoke: bool, reps: int, warmup: int, ops, variants) -> list[dict]:
    from numba import cuda

    from nbbn import registry

    simulator = bool(cuda.config.ENABLE_CUDASIM)
    reason = registry.unavailable_reason("cuda")
    if reason is not None:
        raise SystemExit(f"backend 'cuda' is unavailable: {reason}")
    device = "CUDA simulator" if simulator else cuda.get_current_device().name
    if isinstance(device, bytes):
        device = device.decode()
    torch, torch_device, why_no_torch = _torch_or_reason(simulator)
    if why_no_torch:
        print(f"PyTorch baseline skipped: {why_no_torch}")
    if simulator:
        sys.setswitchinterval(2e-4)  # the simulator busy-polls its threads
    timer = Timer(cuda, simulator, reps, warmup)
    shapes = SMOKE_SHAPES if smoke else SHAPES
    configs = [(op, layout, shape) for op in ops for layout, ss in shapes.items() for shape in ss]
    print(f"{len(configs)} (op, shape) configurations × {len(variants)} kernel versions on "
          f"{device}; {reps} timed reps after {warmup} warm-up calls")
    versions = _versions()
    rows = []
    for op, layout, shape in configs:
        case = Case(op, layout, shape, cuda, torch, torch_device)
        copy_ms = _percentiles(timer(case.copy)[0])[0]
        copy_gbps = 2 * case.nbytes / copy_ms / 1e6
        torch_ms = float("nan")
        tfn = case.torch_fn()
        if tfn is not None:
            torch_ms = _percentiles(timer(tfn)[0])[0]
        for variant in variants:
            t0 = time.perf_counter()
            case.nbbn(variant)
            cuda.synchronize()
            first = time.perf_counter() - t0
            err, ok = case.check(variant)
            row = {"op": op, "layout": layout, "shape": "x".join(map(str, shape)),
                   "dtype": "float32", "variant": variant, "first_call_s": first,
                   "copy_gbps": copy_gbps, "torch_ms": torch_ms, "rel_err": err,
                   "passed": ok, "device": device, "reps": reps, "versions": versions}
            if ok:  # time only what passed
                ms, host = timer(lambda c=case, v=variant: c.nbbn(v))
                p50, p20, p80 = _percentiles(ms)
                gbps = BYTES_PER_X[op] * case.nbytes / p50 / 1e6
                row.update(time_ms_p50=p50, time_ms_p20=p20, time_ms_p80=p80, host_ms=host,
                           gbps=gbps, pct_of_copy=100 * gbps / copy_gbps,
                           speedup_vs_torch=torch_ms / p50)
            rows.append({c: row.get(c, float("nan")) for c in COLUMNS})
            r = rows[-1]
            print(f"{op:13s} {layout:4s} {r['shape']:>16s} {variant}  "
                  f"{r['time_ms_p50']:8.4f} ms  {r['gbps']:7.1f} GB/s  "
                  f"{r['pct_of_copy']:5.1f}% of copy  torch {torch_ms:8.4f} ms  "
                  f"err {err:.1e} {'ok' if ok else 'FAILED'}", flush=True)
        del case
    return rows


def _markdown(rows, header: str) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "nan" if v != v else (f"{v:.4g}" if abs(v) < 1e4 else f"{v:.0f}")
        return str(v)

    cols = [c for c in COLUMNS if c not in ("versions", "device", "dtype", "reps")]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in cols) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write(rows, out_dir: Path, argv) -> None:
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(out_dir / "gpu_bench.csv", index=False)
    first = rows[0] if rows else {}
    header = (f"# nbbn CUDA benchmark\n\nCommand: `python {' '.join(argv)}`  \n"
              f"Device: {first.get('device', '?')}  \nVersions: {first.get('versions', '?')}  \n"
              "float32, data on the device, outputs preallocated. Bytes model: inference 2S, "
              "forward-train 3S, backward 5S, copy 2S (S = x.nbytes); times are GPU medians "
              "(p50) of back-to-back calls.")
    (out_dir / "gpu_bench.md").write_text(_markdown(rows, header))
    print(f"wrote {out_dir / 'gpu_bench.csv'} and {out_dir / 'gpu_bench.md'}")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory for the CSV and Markdown")
    p.add_argument("--smoke", action="store_true",
                   help="tiny shapes under the CUDA simulator (checks the script, times nothing)")
    p.add_argument("--reps", type=int, default=None, help="timed calls (default 100, smoke 2)")
    p.add_argument("--warmup", type=int, default=None, help="warm-up calls (default 10, smoke 1)")
    p.add_argument("--ops", default=",".join(OPS), help=f"comma-separated subset of {OPS}")
    p.add_argument("--variants", default="v1,v2", help="registry variants to time (v1, v2)")
    ns = p.parse_args(argv)
    if ns.smoke:
        os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba is imported
    ops = [o for o in ns.ops.split(",") if o]
    if unknown := set(ops) - set(OPS):
        p.error(f"unknown ops {sorted(unknown)}; choose from {OPS}")
    variants = tuple(v for v in ns.variants.split(",") if v)
    if unknown := set(variants) - set(VARIANTS):
        p.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    reps = ns.reps or (2 if ns.smoke else 100)
    warmup = ns.warmup if ns.warmup is not None else (1 if ns.smoke else 10)
    rows = run(ns.out, ns.smoke, reps, warmup, ops, variants)
    write(rows, ns.out, ["benchmarks/gpu_bench.py", *argv])
    return 0 if rows and all(r["passed"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
