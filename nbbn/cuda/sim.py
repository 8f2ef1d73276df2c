"""Numba CUDA simulator support for the tests and ``benchmarks/gpu_bench.py --smoke``.

Real numba device arrays describe themselves with ``__cuda_array_interface__``, which is what
:func:`nbbn.validate.array_meta` reads; the simulator's ``FakeCUDAArray`` does not, so nbbn
rejects it. :func:`device_array_interface` gives it the same description for the duration of a
``with`` block. (Once ``nbbn.validate`` accepts simulator arrays itself, this module can go.)
"""

from __future__ import annotations

import contextlib

_NAME = "__cuda_array_interface__"


def _interface(self) -> dict:
    a = self._ary  # the NumPy array a FakeCUDAArray wraps
    return {"shape": a.shape, "typestr": a.dtype.str, "version": 3,
            "strides": None if a.flags.c_contiguous else a.strides,
            "data": (a.ctypes.data, not a.flags.writeable)}


@contextlib.contextmanager
def device_array_interface():
    """Within the block, simulator device arrays expose ``__cuda_array_interface__``."""
    from numba.cuda.simulator.cudadrv.devicearray import FakeCUDAArray

    added = _NAME not in vars(FakeCUDAArray)
    if added:
        setattr(FakeCUDAArray, _NAME, property(_interface))
    try:
        yield
    finally:
        if added:
            delattr(FakeCUDAArray, _NAME)
