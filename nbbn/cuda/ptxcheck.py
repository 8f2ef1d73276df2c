"""Compile every CUDA kernel to PTX with the real compiler (NVVM), no GPU needed; report as JSON.

    nbbn ptxcheck [--cc 8.0 --cc 9.0] [--dtype float32 ...] [--kernel NAME ...]
                  [--ptxas] [--table]

Every kernel of :data:`nbbn.cuda.kernels.KERNELS` is compiled for x = float32, float64, float16 and
bfloat16 at each compute capability, with the signature declared next to the kernel (bfloat16 by
numba-cuda's own type, so ml_dtypes is not needed here). Kernels defined with a bare
``@cuda.jit`` (not in KERNELS) are reported as ``unlisted`` and fail the check. Exit status 0
when everything compiled.

It must run without ``NUMBA_ENABLE_CUDASIM`` (the simulator compiles nothing), hence a separate
process for the tests, which run under the simulator.

``--ptxas`` also assembles each PTX with ``ptxas -v`` (PATH, $CUDA_HOME/bin or /usr/local/cuda/bin;
its PTX ISA ``.version`` is lowered to the one ptxas accepts when NVVM is newer -- the kernels use
no newer instruction) and reports registers per thread, spill bytes, stack and shared memory,
and the resident blocks per SM (:func:`nbbn.cuda.launch.occupancy`) at blocks of 256 and 512
threads. ``--table`` prints those rows as a fixed-width table instead of JSON.

Device functions: numba-cuda compiles a ``@cuda.jit(device=True)`` callee for the compute
capability of the *current device*, which needs a driver. During the check that lookup is pointed
at the capability being compiled for, so no GPU or driver is needed.
"""

from __future__ import annotations

import contextlib
import os
import re
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


def find_ptxas() -> str | None:
    """The ptxas executable, or None."""
    import shutil

    found = shutil.which("ptxas")
    if found:
        return found
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.exists(os.path.join(root, "bin", "ptxas")):
            return os.path.join(root, "bin", "ptxas")
    return None


_PTXAS_VERSION: dict[str, str] = {}


def _ptxas_isa(ptxas: str) -> str | None:
    """The highest PTX ISA version ``ptxas`` accepts (read from its error on a too-new one)."""
    if ptxas not in _PTXAS_VERSION:
        import subprocess
        import tempfile

        probe = ".version 99.9\n.target sm_90\n.address_size 64\n"
        with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
            f.write(probe)
        try:
            err = subprocess.run([ptxas, "-arch=sm_90", f.name, "-o", os.devnull],
                                 capture_output=True, text=True, timeout=60).stderr
        finally:
            os.unlink(f.name)
        m = re.search(r"current version is '([0-9.]+)'", err)
        _PTXAS_VERSION[ptxas] = m.group(1) if m else ""
    return _PTXAS_VERSION[ptxas] or None


def ptxas_facts(ptx: str, cc, ptxas: str) -> dict:
    """Registers, spills, stack and shared memory of ``ptx`` assembled for ``cc`` by ptxas -v,
    and the resident blocks per SM they allow at 256 and 512 threads per block."""
    import subprocess
    import tempfile

    from .launch import occupancy

    isa = _ptxas_isa(ptxas)
    m = re.search(r"^\.version (\d+)\.(\d+)", ptx, re.M)
    if isa and m and tuple(map(int, isa.split("."))) < (int(m.group(1)), int(m.group(2))):
        ptx = ptx.replace(m.group(0), f".version {isa}", 1)
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        proc = subprocess.run([ptxas, f"-arch=sm_{cc[0]}{cc[1]}", "-v", f.name, "-o", os.devnull],
                              capture_output=True, text=True, timeout=300)
    finally:
        os.unlink(f.name)
    if proc.returncode:
        return {"ptxas_error": proc.stderr[-1000:]}
    err = proc.stderr

    def num(pattern):
        hit = re.search(pattern, err)
        return int(hit.group(1)) if hit else 0

    regs = num(r"Used (\d+) registers")
    smem = num(r"(\d+) bytes smem")
    return {"registers": regs, "spill_stores": num(r"(\d+) bytes spill stores"),
            "spill_loads": num(r"(\d+) bytes spill loads"),
            "stack": num(r"(\d+) bytes stack frame"), "smem": smem,
            "blocks_per_sm_256": occupancy(regs, 256, smem),
            "blocks_per_sm_512": occupancy(regs, 512, smem)}


def unlisted_kernels(module) -> list[str]:
    """Module-level ``@cuda.jit`` kernels (not device functions) missing from KERNELS."""
    from numba.cuda.dispatcher import CUDADispatcher

    listed = {id(e.dispatcher) for e in module.KERNELS.values()}
    return sorted(name for name, obj in vars(module).items()
                  if isinstance(obj, CUDADispatcher) and not obj.targetoptions.get("device")
                  and id(obj) not in listed)


def run(ccs=DEFAULT_CCS, dtypes=DTYPES, names=None, ptxas: str | None = None) -> dict:
    """Compile the kernels (all, or those in ``names``) for ``dtypes`` at ``ccs``; with
    ``ptxas`` (a path) also assemble them and report registers and occupancy."""
    from numba import cuda

    from nbbn.cuda import kernels

    rows = []
    for entry in kernels.KERNELS.values():
        if names and entry.name not in names:
            continue
        for dtype in dtypes:
            sig = entry.signature(kernels.signature_types(dtype))
            for cc in ccs:
                row = {"kernel": entry.name, "dtype": dtype,
                       "cc": f"{cc[0]}.{cc[1]}"}
                t0 = time.perf_counter()
                try:
                    with _device_functions_target(cc):
                        ptx, _ = cuda.compile_ptx(entry.dispatcher.py_func, sig, cc=cc,
                                                  launch_bounds=entry.launch_bounds)
                    row.update(ok=True, **_ptx_facts(ptx))
                    if ptxas:
                        row.update(ptxas_facts(ptx, cc, ptxas))
                        row["ok"] = "ptxas_error" not in row
                except Exception as exc:  # report every failure, not only the first
                    row.update(ok=False, error=f"{type(exc).__name__}: {exc}"[:2000])
                row["compile_s"] = round(time.perf_counter() - t0, 3)
                rows.append(row)
    unlisted = unlisted_kernels(kernels)
    return {"ok": all(r["ok"] for r in rows) and not unlisted, "kernels": len(kernels.KERNELS),
            "unlisted": unlisted, "results": rows}


def table(report: dict) -> str:
    """The rows of a ``--ptxas`` report as a fixed-width text table."""
    head = ("kernel", "dtype", "cc", "regs", "spill_st", "spill_ld", "smem", "blk/SM@256",
            "blk/SM@512")
    keys = ("kernel", "dtype", "cc", "registers", "spill_stores", "spill_loads", "smem",
            "blocks_per_sm_256", "blocks_per_sm_512")
    lines = [head] + [tuple(str(r.get(k, r.get("error", "")[:30])) for k in keys)
                      for r in report["results"]]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True))
                     for line in lines)


def _cc(text: str) -> tuple[int, int]:
    major, _, minor = text.partition(".")
    return int(major), int(minor or 0)


if __name__ == "__main__":
    from ..cli import deprecated_alias

    deprecated_alias("python -m nbbn.cuda.ptxcheck", ["ptxcheck"])
