"""Two changes to Numba's CUDA simulator, applied only under ``NUMBA_ENABLE_CUDASIM=1``
(:mod:`nbbn.cuda.reduce` calls :func:`install` at import): a fix for a race that gave wrong
results, and a block manager that yields the GIL while it waits.

The race
    The simulator runs each thread of a block as a Python thread. numba-cuda 0.30's
    ``FakeCUDAShared.array`` finds a block's shared array in a dict keyed by call site, with an
    unlocked check-then-set::

        res = self._allocations.get(caller)
        if res is None:
            res = np.empty(shape, dtype)
            self._allocations[caller] = res

    The array is created in the launch's first block, and every thread of that block runs this
    at the same moment. If the interpreter switches threads between the ``get`` and the store,
    two threads get two different "shared" arrays. A block reduction then silently drops the
    values written to the other array. That is why only the launch's first block was hit:
    channel 0 in NCHW, the first column group in NC/NHWC.

How it was found
    ``tests/test_cuda.py`` failed in about one run of three under pytest-xdist (3 workers) and
    never in one process: a channel's mean or variance was wrong. Two instruments found the
    cause:

    - Running every simulated launch twice, on copies of its arguments, showed that only block
      (0, 0)'s partial sums differed between the two runs.
    - A check inside ``FakeCUDAShared.array`` logged, in the failing runs, threads of block
      (0, 0, 0) holding two distinct arrays for one call site (``kernels.py:691``).

    Why xdist makes the switch likely was not pinned down. Its worker has a second Python thread
    (execnet's I/O thread) that wants the GIL.

    This is a bug in the simulator, not in the kernels. On a GPU a block's shared array is one
    array by construction.

The fix
    The same lookup (key: the caller's file and line), with the check and the store under one
    lock; the key is read from the caller's frame (the original extracts the whole stack, with
    its source lines, on every call: the patched simulator is also faster). Dynamic
    shared memory (``shape == 0``) and ``alignment`` keep the simulator's own code. If the
    simulator's class changes shape (a numba-cuda without ``_allocations``), nothing is
    patched.

The block manager's wait
    ``BlockManager.run`` starts a block's threads, then polls them in a loop until they have all
    reached ``syncthreads`` (then it releases them) or ended. The loop never blocks. The polling
    thread only gives up the GIL when the interpreter's switch interval forces it, so the
    block's threads wait for the poller. :func:`_block_manager_run` is numba-cuda 0.30's loop
    (BSD-2-Clause, NVIDIA) with one change: ``time.sleep(0)`` after each poll.

    Measured on the 2-core host: ``tests/test_cuda.py`` in one process took 31.4 s wall and
    35.6 CPU-s with the simulator's loop, and 23.0 s wall and 26.5 CPU-s with this one. The
    semantics are unchanged. It is installed only on the numba-cuda version it was copied
    from (:data:`_RUN_FROM`).
"""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
from numba.core import types
from numba.np import numpy_support

_LOCK = threading.Lock()
_INSTALLED: dict = {}


def _shared_array(self, shape, dtype, alignment=None):
    """``cuda.shared.array`` under the simulator: one array per (launch, call site), created
    once under a lock (see the module doc)."""
    if shape == 0 or alignment is not None:
        return _INSTALLED["original"](self, shape, dtype, alignment)
    if isinstance(dtype, types.Type):
        dtype = numpy_support.as_dtype(dtype)
    frame = sys._getframe(1)  # the kernel or device function that asks
    caller = (frame.f_code.co_filename, frame.f_lineno)
    with _LOCK:
        res = self._allocations.get(caller)
        if res is None:
            res = self._allocations[caller] = np.empty(shape, dtype)
    return res


#: The numba-cuda release :func:`_block_manager_run` was copied from.
_RUN_FROM = "0.30."


def _block_manager_run(self, grid_point, *args):
    """``BlockManager.run`` of numba-cuda 0.30, yielding the GIL after each poll (see the
    module doc)."""
    from numba.cuda.simulator.kernel import BlockThread

    threads = set()
    livethreads = set()
    blockedthreads = set()
    for block_point in np.ndindex(*self._block_dim):

        def target():
            self._f(*args)

        t = BlockThread(target, self, grid_point, block_point, self._debug)
        t.start()
        threads.add(t)
        livethreads.add(t)

    while livethreads:
        for t in livethreads:
            if t.syncthreads_blocked:
                blockedthreads.add(t)
            elif t.exception:
                for t_other in threads:  # abort the others, do not join (as numba-cuda)
                    t_other.abort = True
                    t_other.syncthreads_blocked = False
                    t_other.syncthreads_event.set()
                raise t.exception[0].with_traceback(t.exception[1])
        if livethreads == blockedthreads:
            for t in blockedthreads:
                t.syncthreads_blocked = False
                t.syncthreads_event.set()
            blockedthreads = set()
        livethreads = {t for t in livethreads if t.is_alive()}
        time.sleep(0)  # the one change: let the block's threads run
    for t in threads:
        if t.exception:
            raise t.exception[0].with_traceback(t.exception[1])


def install() -> bool:
    """Patch ``FakeCUDAShared.array`` and, on numba-cuda 0.30, ``BlockManager.run``
    (idempotent). Returns whether the shared-array fix is in place."""
    if "original" in _INSTALLED:
        return True
    try:
        from numba.cuda.simulator.kernel import BlockManager
        from numba.cuda.simulator.kernelapi import FakeCUDAShared
    except ImportError:  # pragma: no cover - every numba-cuda has the simulator
        return False
    probe = FakeCUDAShared(0)
    if not isinstance(getattr(probe, "_allocations", None), dict):  # pragma: no cover
        return False
    _INSTALLED["original"] = FakeCUDAShared.array
    FakeCUDAShared.array = _shared_array
    try:
        import numba_cuda

        version = numba_cuda.__version__
    except (ImportError, AttributeError):  # pragma: no cover
        version = ""
    if version.startswith(_RUN_FROM):
        _INSTALLED["run"] = BlockManager.run
        BlockManager.run = _block_manager_run
    return True
