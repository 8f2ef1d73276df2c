"""Two OpenMP runtimes in one process (round 9, noticed while measuring issue #24 item 1):
PyTorch's wheel ships its own libgomp and Numba's ``omp`` threading layer loads the system's,
so a process that imports both has two thread teams. Median µs of nbbn's warm backend call
(NC 64×1024 forward, parallel kernel) and of PyTorch's forward on (64, 8192), each timed alone
and each timed right after a call of the other, in a process that imports nbbn first and in
one that imports torch first. 2 threads each. Run alone, on a quiet host:

    python scripts/omp_interference.py > results/cpu-kernels/round9/omp-interference.md
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

ROUNDS, WARMUP = 2000, 200


def _child(order: str) -> str:
    if order == "torch":
        import torch  # noqa: F401  (loaded first on purpose)
    import numba
    import numpy as np

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    import torch

    import nbbn  # noqa: F401
    from nbbn import validate
    from nbbn.cpu import backend as B

    numba.set_num_threads(2)
    torch.set_num_threads(2)
    libs = sorted({line.split()[-1] for line in open("/proc/self/maps")
                   if "gomp" in line.split()[-1]})
    x = np.random.default_rng(0).standard_normal((64, 1024)).astype(np.float32)
    g = np.ones(1024, np.float32)
    a = validate.train_args(x, g, g * 0, 1e-5, None, None, 0.1, None, 1)
    X = torch.from_numpy(np.random.default_rng(1).standard_normal((64, 8192)).astype(np.float32))
    W = torch.ones(8192)

    def nb():
        B.forward_train(a, "rows")

    def pt():
        torch.ops.aten.native_batch_norm(X, W, W, None, None, True, 0.1, 1e-5)

    def median_us(fn, before=None):
        ts = []
        for i in range(WARMUP + ROUNDS):
            if before is not None:
                before()
            t0 = time.perf_counter_ns()
            fn()
            if i >= WARMUP:
                ts.append(time.perf_counter_ns() - t0)
        return float(np.median(ts)) / 1e3

    cells = [median_us(nb), median_us(nb, pt), median_us(pt), median_us(pt, nb)]
    return (f"| {order} first | " + " | ".join(f"{v:.1f}" for v in cells) + " | "
            + ", ".join(libs) + " |")


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        print(_child(sys.argv[2]))
        return
    print(f"1-minute load before: {os.getloadavg()[0]:.2f}; median µs of {ROUNDS} calls after "
          f"{WARMUP}; each row a fresh process\n")
    print("| process | nbbn alone | nbbn after a PyTorch call | PyTorch alone | PyTorch after an "
          "nbbn call | libgomp copies mapped |\n|---|---|---|---|---|---|")
    for order in ("nbbn", "torch", "nbbn", "torch"):
        out = subprocess.run([sys.executable, __file__, "--child", order], check=True,
                             capture_output=True, text=True).stdout.strip()
        print(out.splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
