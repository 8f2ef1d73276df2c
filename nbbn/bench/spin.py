"""The blocking kernel of the harness's CUDA timer (:class:`nbbn.bench.devices.CudaDevice`).

One thread sleeps ``iters`` times for about a microsecond (``nanosleep``, sm_70+), holding the
GPU while the host enqueues the timed calls behind it; the calls then run back to back and the
events between them measure GPU time with no launch gap. Imported only when a CUDA device is
timed (it imports numba.cuda); compiled with ``cuda.jit(spin)`` on first use.
"""

from __future__ import annotations

from numba import cuda


def spin(iters):
    for _ in range(iters):
        cuda.nanosleep(1000)
