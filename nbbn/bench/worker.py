"""``--isolate process``: trials in a fresh worker process (pyperf's way).

The parent checks every configuration against the reference (as without isolation), then for
each group of ``sets_per_process`` trials starts a new process (:func:`in_new_process` running
:func:`nbbn.bench.runner.worker_trials`) (``spawn``: a fresh interpreter,
no inherited heap), which imports nbbn, builds the point's data, allocates its buffer sets,
warms up (loads the JIT cache) untimed and runs the trials with the same round-robin sampler
(:meth:`nbbn.bench.runner.Runner.trials_here`). It returns the per-round times; the parent
builds the intervals. Threads (Numba, PyTorch) are set in the worker to the parent's.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ProcessPoolExecutor

#: A worker that has not answered in this many seconds is abandoned (its trial is an error).
TIMEOUT_S = 600.0


def threads() -> tuple[int, int | None]:
    """Numba's and (if loaded) PyTorch's thread counts, for the worker to set."""
    import sys

    import numba

    torch = sys.modules.get("torch")
    return numba.get_num_threads(), (torch.get_num_threads() if torch is not None else None)


def set_threads(counts: tuple[int, int | None]) -> None:
    import numba

    numba.set_num_threads(counts[0])
    if counts[1] is not None:
        import torch

        torch.set_num_threads(counts[1])


def in_new_process(fn, *args):
    """``fn(*args)`` in a fresh ``spawn`` process (``fn`` importable by name); its result, or
    the parts of a :class:`~nbbn.bench.devices.CallFailed` it returned, raised again here."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        res = ex.submit(fn, *args).result(timeout=TIMEOUT_S)
    if res[0] == "failed":
        from .devices import CallFailed

        exc = CallFailed(0, RuntimeError(res[2]))
        exc.callable_index = res[1]
        raise exc
    return res
