"""Trials in other processes: ``--isolate workers`` (the default of a full run) and
``--isolate process`` (pyperf's way).

``workers``: W long-lived worker processes (:class:`WorkerPool`, started once per run, ``spawn``:
fresh interpreters with their own heaps) take a point's trials in turn, trial k in worker
k mod W, one at a time (never two timing at once). Each worker keeps the current point's data
and allocates fresh buffer sets per trial, so its trials land where *its* heap puts them: the
process-level variance (buffer placement, the pools' threads, the interpreter's state) is
sampled W times per point for W process starts per run, not per point. The parent checks every
configuration first and builds the intervals with the process as the top level
(:func:`nbbn.bench.stats.cluster_ci`).

``process``: see below.

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
    return _raise_failed(res)


class WorkerPool:
    """``n`` long-lived ``spawn`` worker processes for ``--isolate workers``; worker k runs
    :func:`nbbn.bench.runner.pool_trial` calls one at a time. Started all at once (their
    imports overlap, before any timing), closed by :meth:`close` or as a context manager."""

    def __init__(self, n: int, counts: tuple[int, int | None], against: tuple = ()):
        ctx = multiprocessing.get_context("spawn")
        self._ex = [ProcessPoolExecutor(max_workers=1, mp_context=ctx, initializer=_init_worker,
                                        initargs=(counts, against)) for _ in range(n)]
        for f in [ex.submit(_pid) for ex in self._ex]:  # start them now, together
            f.result(timeout=TIMEOUT_S)

    def __len__(self) -> int:
        return len(self._ex)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def run(self, k: int, fn, *args):
        """``fn(*args)`` (``fn`` importable by name: :func:`nbbn.bench.runner.pool_trial`) in
        worker ``k mod n``; its result, or its CallFailed raised here."""
        res = self._ex[k % len(self._ex)].submit(fn, *args).result(timeout=TIMEOUT_S)
        return _raise_failed(res)

    def close(self) -> None:
        for ex in self._ex:
            ex.shutdown(wait=True, cancel_futures=True)
        self._ex = []


def _init_worker(counts, against=()) -> None:
    """Baselines and the parent's ``--against`` copies registered, threads set."""
    from . import baselines  # noqa: F401  (registers the baselines)
    from .against import register_all

    register_all(against)
    set_threads(counts)


def _pid() -> int:
    import os

    return os.getpid()


def _raise_failed(res):
    if res[0] == "failed":
        from .devices import CallFailed

        exc = CallFailed(0, RuntimeError(res[2]))
        exc.callable_index = res[1]
        raise exc
    return res
