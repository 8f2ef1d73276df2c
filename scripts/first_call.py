"""First-call latency of nbbn in a fresh process, cold and warm Numba cache.

    python scripts/first_call.py            # prints a Markdown table (run it on a quiet host)

Each measurement is a new Python process that imports nbbn and makes the first forward-train,
backward and inference call on a (32, 64, 28, 28) float32 NCHW array (ResNet-50's small-stage
BN at batch 32), timing import and each call with perf_counter. "Cold" points NUMBA_CACHE_DIR at
an empty folder (what a fresh clone meets: every kernel the calls need is compiled); "warm"
repeats with that folder filled (machine code loaded from disk). The 1-minute load average
before each run is printed beside it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np
import nbbn
t1 = time.perf_counter()
x = (-2.3 + 0.5 * np.random.default_rng(0).standard_normal((32, 64, 28, 28))).astype(np.float32)
g, b = np.ones(64, np.float32), np.zeros(64, np.float32)
t2 = time.perf_counter()
y, m, s = nbbn.batch_norm_train(x, g, b)
t3 = time.perf_counter()
nbbn.batch_norm_backward(x, x, m, s, g)
t4 = time.perf_counter()
nbbn.batch_norm_infer(x, m, 1.0 / (s * s), g, b)
t5 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "forward_s": t3 - t2, "backward_s": t4 - t3,
                  "inference_s": t5 - t4, "total_s": t5 - t0}))
"""


def run(cache: str) -> dict:
    env = {**os.environ, "NUMBA_CACHE_DIR": cache}
    load = os.getloadavg()[0]
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True,
                         check=True).stdout
    return {"load_1m_before": load, **json.loads(out.strip().splitlines()[-1])}


def main() -> None:
    with tempfile.TemporaryDirectory() as cache:
        rows = [("cold", run(cache)), ("warm", run(cache)), ("warm", run(cache))]
    cols = ["import_s", "forward_s", "backward_s", "inference_s", "total_s", "load_1m_before"]
    print("| cache | " + " | ".join(cols) + " |")
    print("|---|" + "---|" * len(cols))
    for name, r in rows:
        print(f"| {name} | " + " | ".join(f"{r[c]:.2f}" for c in cols) + " |")


if __name__ == "__main__":
    main()
