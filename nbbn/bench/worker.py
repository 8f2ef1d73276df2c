"""``--isolate process``: trials in a fresh worker process (pyperf's way).

The parent checks every configuration against the reference (as without isolation), then for
each group of ``sets_per_process`` trials starts a new process (``spawn``: a fresh interpreter,
no inherited heap), which imports nbbn, builds the point's data, allocates its buffer sets,
warms up (loads the JIT cache) untimed and runs the trials with the same round-robin sampler
(:meth:`nbbn.bench.runner.Runner.trials_here`). It returns the per-round times; the parent
builds the intervals. Threads (Numba, PyTorch) are set in the worker to the parent's.
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

#: A worker that has not answered in this many seconds is abandoned (its trial is an error).
TIMEOUT_S = 600.0


def _threads() -> tuple[int, int | None]:
    import sys

    import numba

    torch = sys.modules.get("torch")
    return numba.get_num_threads(), (torch.get_num_threads() if torch is not None else None)


def _work(group, order, timing, n, first, seed_key, threads):
    import numba

    numba.set_num_threads(threads[0])
    if threads[1] is not None:
        import torch

        torch.set_num_threads(threads[1])
    from . import (
        baselines,  # noqa: F401  (registers the baselines)
        devices,
    )
    from .cases import point_data
    from .runner import Runner

    dev = devices.device(group.device)
    data = point_data(group.point)
    runner = Runner(timing, lambda r: None, env={})
    try:
        blocks, names, notes = runner.trials_here(group, dev, data, None, None, order, n, first,
                                                  seed_key)
    except devices.CallFailed as exc:  # not picklable as is: sent back as its parts
        return ("failed", exc.callable_index, f"{type(exc.exc).__name__}: {exc.exc}")
    return blocks, names, notes, os.getpid()


def trials_in_process(group, order, timing, first: int, seed_key):
    """``timing.sets_per_process`` trials in one new process: (blocks, names, notes, pid)."""
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as ex:
        fut = ex.submit(_work, group, list(order), timing, max(1, timing.sets_per_process),
                        first, seed_key, _threads())
        res = fut.result(timeout=TIMEOUT_S)
    if res[0] == "failed":
        from .devices import CallFailed

        exc = CallFailed(0, RuntimeError(res[2]))
        exc.callable_index = res[1]
        raise exc
    return res
