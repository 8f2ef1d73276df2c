"""What each kernel specialization of the test warm-up costs to compile: every call that
``tests/conftest.py``'s ``_WARMUP_PARTS`` makes, one at a time, in one process, on an empty
Numba cache, with the wall seconds of each (a specialization whose helpers an earlier one
compiled is cheaper; the order is the parts'). Run alone:

    NUMBA_CACHE_DIR=$(mktemp -d) python scripts/compile_costs.py > results/testing/compile-costs.md
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from nbbn.cpu import backend as B  # noqa: E402
from nbbn.spec import Layout, Op  # noqa: E402
from nbbn.validate import channel_dtype  # noqa: E402


def _parts() -> dict:
    spec = importlib.util.spec_from_file_location("conftest", ROOT / "tests" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod._WARMUP_PARTS


def main() -> None:
    print(f"1-minute load before: {os.getloadavg()[0]:.2f}; NUMBA_CACHE_DIR="
          f"{os.environ.get('NUMBA_CACHE_DIR', '(default)')}\n")
    print("| part | x | vectors | layout | variant | C | op | compile s |")
    print("|---|---|---|---|---|---|---|---|")
    total = 0.0
    for part, specs in _parts().items():
        for s in specs:
            for dt in map(np.dtype, s["dtypes"]):
                cd = channel_dtype(dt)
                for vd in dict.fromkeys((cd, np.dtype(np.float64)) if s["mixed"] else (cd,)):
                    for layout in map(Layout, s["layouts"]):
                        for variant in B._VARIANTS[layout]:
                            if variant == "auto" or (s.get("variants") is not None
                                                     and variant not in s["variants"]):
                                continue
                            chans = ((3,) if layout is Layout.NC or variant != "serial"
                                     else (3, B.SPLIT_BELOW_C))
                            for C in chans:
                                shape = (4, C) if layout is Layout.NC else (2, C, 4)
                                x = np.linspace(-1, 1, math.prod(shape)).reshape(shape).astype(dt)
                                g, b = np.ones(C, vd), np.zeros(C, vd)
                                for op in map(Op, s["ops"]):
                                    t = time.perf_counter()
                                    B._precompile_call(op, layout, variant, x, g, b)
                                    dt_s = time.perf_counter() - t
                                    total += dt_s
                                    print(f"| {part} | {dt} | {vd} | {layout.value} | {variant} "
                                          f"| {C} | {op.value} | {dt_s:.2f} |", flush=True)
    print(f"\nTotal: {total:.1f} s")


if __name__ == "__main__":
    main()
