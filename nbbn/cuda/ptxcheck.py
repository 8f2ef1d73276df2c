"""Compile every CUDA kernel to PTX with the real compiler (NVVM), no GPU needed; report as JSON.

    python -m nbbn.cuda.ptxcheck [--cc 8.0 --cc 9.0]

Every kernel of :data:`nbbn.cuda.kernels.KERNELS` is compiled for x = float32, float64, float16 and
bfloat16 at each compute capability, with the signature declared next to the kernel (bfloat16 by
numba-cuda's own type, so ml_dtypes is not needed here). Kernels defined with a bare
``@cuda.jit`` (not in KERNELS) are reported as ``unlisted`` and fail the check. Exit status 0
when everything compiled.

It must run without ``NUMBA_ENABLE_CUDASIM`` (the simulator compiles nothing), hence a separate
process for the tests, which run under the simulator.

Device functions: numba-cuda compiles a ``@cuda.jit(device=True)`` callee for the compute
capability of the *current device*, which needs a driver. During the check that lookup is pointed
at the capability being compiled for, so no GPU or driver is needed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import time
from types import SimpleNamespace

DTYPES = ("float32", "float64", "float16", "bfloat16")
DEFAULT_CCS = ((8, 0), (9, 0))


@contextlib.contextmanager
def _device_functions_target(cc):
    import numba.cuda.dispatcher as dispatcher

    saved = dispatcher.get_current_device
    dispatcher.get_current_device = lambda: SimpleNamespace(compute_capability=cc)
    try:
        yield
    finally:
        dispatcher.get_current_device = saved


def _ptx_facts(ptx: str) -> dict:
    """A few things worth seeing at a glance in the PTX of a memory-bound kernel."""
    return {
        "ptx_lines": ptx.count("\n"),
        "shfl": "shfl.sync" in ptx,
        "atomics": bool(re.search(r"\batom\.", ptx)),
        "ld_global_cg": "ld.global.cg" in ptx,
        "fp64_ops": len(re.findall(r"\b(?:add|sub|mul|fma|div)(?:\.rn)?\.f64\b", ptx)),
        "fp64_compares": len(re.findall(r"\bsetp\.\w+\.f64\b", ptx)),
        "local_memory": ".local" in ptx,  # local arrays / spills at PTX level
        "calls": bool(re.search(r"\bcall(?:\.uni)?\b", ptx)),  # out-of-line device calls
    }


def unlisted_kernels(module) -> list[str]:
    """Module-level ``@cuda.jit`` kernels (not device functions) missing from KERNELS."""
    from numba.cuda.dispatcher import CUDADispatcher

    listed = {id(e.dispatcher) for e in module.KERNELS.values()}
    return sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device")
                  and id(obj) not in listed)


def run(ccs=DEFAULT_CCS) -> dict:
    from numba import cuda

    from nbbn.cuda import kernels

    rows = []
    for entry in kernels.KERNELS.values():
        for dtype in DTYPES:
            sig = entry.signature(kernels.signature_types(dtype))
            for cc in ccs:
                row = {"kernel": entry.name, "dtype": dtype,
                       "cc": f"{cc[0]}.{cc[1]}"}
                t0 = time.perf_counter()
                try:
                    with _device_functions_target(cc):
                        ptx, _ = cuda.compile_ptx(entry.dispatcher.py_func, sig, cc=cc)
                    row.update(ok=True, **_ptx_facts(ptx))
                except Exception as exc:  # report every failure, not only the first
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
                row["compile_s"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
    unlisted = unlisted_kernels(kernels)
    return {"ok": all(r["ok"] for r in rows) and not unlisted, "kernels": len(kernels.KERNELS),
            "unlisted": unlisted, "results": rows}


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nbbn.cuda.ptxcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cc", action="append", type=_cc,
                        help="compute capability, e.g. 9.0 (repeatable; default 8.0 and 9.0)")
    ns = parser.parse_args(argv)
    if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1":
        print(json.dumps({"ok": False, "error": "NUMBA_ENABLE_CUDASIM=1: the simulator compiles "
                                                "nothing; unset it for the PTX check"}))
        return 2
    report = run(tuple(ns.cc) if ns.cc else DEFAULT_CCS)
    print(json.dumps(report, indent=1))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
