"""Where a backend's arrays live and how its calls are timed: one timer per device, picked by
``BackendInfo.device``.

Both devices time a *sequence* of zero-argument calls (the runner's round-robin schedule, see
:mod:`nbbn.bench.runner`) and return one time per call, in seconds.

* ``cpu`` -- NumPy arrays. Each call is bracketed by ``time.perf_counter_ns``; the garbage
  collector is off during a sequence, and a call's result is released after its end time is
  read, so freeing it is not timed. The copy reference is ``np.copyto`` into a preallocated
  destination (``--call kernel``) or ``np.copy`` (``--call api``, allocating as the API calls
  do).
* ``cuda`` -- numba device arrays (``cuda.to_device``, ``cuda.device_array``): no host transfer
  is timed. Timer (nvbench's *blocking kernel*): a one-thread kernel that sleeps
  (``cuda.nanosleep``) holds the GPU while the host enqueues the whole sequence with an event
  recorded between consecutive calls; the kernel is sized to 1.5× the host's enqueue time of the
  previous sequence + 2 ms. The GPU then runs the calls back to back, so the time between two
  events is the GPU time of one call with no launch gap in it. If the sleeping kernel ended
  before the host finished enqueuing (the event after it had completed), the sequence is
  flagged (``blocking_expired`` notes) and the next one sleeps longer. With ``--call api`` the
  spin kernel is not used: the events then include the host's launch and allocation gaps, which
  are part of an API call. Events are recorded on the legacy default stream, where nbbn's
  kernels, numba's copies and PyTorch's default stream run. The copy reference is a
  device-to-device copy of x (``copy_to_device`` on that stream).
  Under Numba's CUDA simulator events record nothing: calls are timed with the host clock after
  a synchronize (``timer = wall-simulator``), which only exercises the code.

The last-level cache each device has (:meth:`llc_bytes`) sizes the cold-cache buffer rotation
(:mod:`nbbn.bench.cases`): the host's L3 (sysfs or lscpu), the GPU's L2.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import numpy as np

from .. import output


@dataclass(frozen=True)
class TimingConfig:
    """How a point is sampled (the runner's stopping rule; :mod:`nbbn.bench.stats`, "Trials").

    A point is measured in *trials*: each allocates fresh buffer sets, draws new random call
    orders, starts at a new buffer set, and runs (``isolate="workers"``) in the next of ``workers``
    long-lived worker processes, or (``isolate="process"``) in a fresh worker process that
    does ``sets_per_process`` trials, or (``"none"``) here. Within a trial, after ``warmup``
    untimed rounds, rounds are taken until at least ``min_rounds`` are in and ``trial_time``
    seconds have passed (or ``max_rounds``/``min_trials`` rounds). Trials are added, after
    ``min_trials``, until every watched ratio's trial interval has a half-width <= ``ci_rel``
    of its ratio, or ``max_time`` seconds of sampling have passed, or ``max_trials`` trials are
    in. ``bootstrap``: resamples for the final intervals; ``seed``: their generator's seed."""

    warmup: int = 1
    min_rounds: int = 5
    max_rounds: int = 20000
    max_time: float = 1.2
    ci_rel: float = 0.03
    bootstrap: int = 1000
    seed: int = 0
    min_trials: int = 4
    max_trials: int = 12
    trial_time: float = 0.06
    isolate: str = "none"
    sets_per_process: int = 1
    workers: int = 4


class CallFailed(Exception):
    """A call of a timed sequence raised: ``index`` in the sequence, the exception as cause."""

    def __init__(self, index: int, exc: BaseException):
        super().__init__(f"call {index} raised {type(exc).__name__}: {exc}")
        self.index = index
        self.exc = exc


class HostDevice:
    kind = "cpu"
    timer = "perf_counter_ns"

    def __init__(self) -> None:
        self._caches = output.cache_sizes()

    def put(self, a: np.ndarray):
        return a

    def empty(self, shape, dtype):
        """A host array with its pages touched (so first-touch faults are never timed)."""
        a = np.empty(shape, dtype)
        a.fill(0)
        return a

    def copy_of(self, a: np.ndarray):
        return a.copy()

    def to_host(self, a) -> np.ndarray:
        if hasattr(a, "numpy") and not isinstance(a, np.ndarray):  # a torch tensor
            return a.detach().numpy()
        return np.asarray(a)

    def sync(self) -> None:
        pass

    def llc_bytes(self) -> int:
        return output.last_level_cache_bytes(self._caches)

    def copy_call(self, src, dst):
        """The copy of x: np.copyto into dst, or np.copy (allocating) when dst is None."""
        if dst is None:
            return lambda: np.copy(src)
        return lambda: np.copyto(dst, src)

    def name(self) -> str:
        return output.cpu_model()

    def time_sequence(self, fns) -> tuple[np.ndarray, list[str]]:
        """Seconds per call of ``fns`` (called in order), and notes (none on the host)."""
        out = np.empty(len(fns))
        pc = time.perf_counter_ns
        enabled = gc.isenabled()
        gc.disable()
        i = 0
        try:
            for i, fn in enumerate(fns):
                t0 = pc()
                r = fn()
                t1 = pc()
                out[i] = t1 - t0
                r = None  # noqa: F841  (the result is freed here, outside the timed region)
        except Exception as exc:
            raise CallFailed(i, exc) from exc
        finally:
            if enabled:
                gc.enable()
        return out * 1e-9, []


class CudaDevice:
    kind = "cuda"

    def __init__(self) -> None:
        from numba import config, cuda

        self.cuda = cuda
        self.simulator = bool(config.ENABLE_CUDASIM)
        self.timer = "wall-simulator" if self.simulator else "cuda-events-blocking"
        self._spin = None
        self._host_per_call = 50e-6  # enqueue time per call, updated after every sequence
        self._hold_factor = 1.5
        self.blocking = True

    def put(self, a: np.ndarray):
        return self.cuda.to_device(a)

    def empty(self, shape, dtype):
        return self.cuda.device_array(shape, dtype)

    def copy_of(self, a):
        out = self.cuda.device_array(a.shape, a.dtype)
        out.copy_to_device(a)
        return out

    def to_host(self, a) -> np.ndarray:
        if hasattr(a, "copy_to_host"):
            return a.copy_to_host()
        if hasattr(a, "cpu"):  # a torch tensor
            return a.detach().cpu().numpy()
        return np.asarray(a)

    def sync(self) -> None:
        self.cuda.synchronize()

    def llc_bytes(self) -> int:
        """The GPU's L2 cache (CU_DEVICE_ATTRIBUTE_L2_CACHE_SIZE); 50 MiB under the simulator
        or if the attribute cannot be read (an H100's)."""
        try:
            size = int(self.cuda.get_current_device().L2_CACHE_SIZE)
            return size if size > 0 else 50 << 20
        except Exception:
            return 50 << 20

    def _stream(self):
        return self.cuda.legacy_default_stream() if not self.simulator else 0

    def copy_call(self, src, dst):
        """Device-to-device copy of x, enqueued on the legacy default stream (asynchronous);
        with dst None a new device array is allocated first, as an allocating call does."""
        cuda, stream = self.cuda, self._stream()
        if dst is None:
            def copy_new():
                out = cuda.device_array(src.shape, src.dtype)
                out.copy_to_device(src, stream=stream)
                return out
            return copy_new
        return lambda: dst.copy_to_device(src, stream=stream)

    def name(self) -> str:
        if self.simulator:
            return "CUDA simulator"
        n = getattr(self.cuda.get_current_device(), "name", "CUDA device")
        return n.decode() if isinstance(n, bytes) else str(n)

    def _spin_kernel(self):
        if self._spin is None:
            from .spin import spin

            self._spin = self.cuda.jit(spin)
        return self._spin

    def time_sequence(self, fns) -> tuple[np.ndarray, list[str]]:
        if self.simulator:
            return self._time_wall(fns)
        cuda = self.cuda
        n = len(fns)
        events = [cuda.event(timing=True) for _ in range(n + 1)]
        notes = []
        if self.blocking:
            hold_s = self._hold_factor * self._host_per_call * n + 2e-3
            self._spin_kernel()[1, 1](max(1, int(hold_s * 1e6)))
        events[0].record()
        t0 = time.perf_counter()
        i = 0
        try:
            for i, fn in enumerate(fns):
                fn()
                events[i + 1].record()
        except Exception as exc:
            cuda.synchronize()
            raise CallFailed(i, exc) from exc
        enqueue = time.perf_counter() - t0
        expired = self.blocking and events[0].query()
        events[-1].synchronize()
        self._host_per_call = enqueue / max(n, 1)
        if expired:
            self._hold_factor = min(self._hold_factor * 2, 64.0)
            notes.append("blocking_expired: the GPU ran out of queued work while the host was "
                         "still enqueuing; launch gaps may be in some samples")
        ms = np.array([events[k].elapsed_time(events[k + 1]) for k in range(n)])
        return ms * 1e-3, notes

    def _time_wall(self, fns) -> tuple[np.ndarray, list[str]]:
        out = np.empty(len(fns))
        i = 0
        try:
            for i, fn in enumerate(fns):
                t0 = time.perf_counter_ns()
                fn()
                self.cuda.synchronize()
                out[i] = time.perf_counter_ns() - t0
        except Exception as exc:
            raise CallFailed(i, exc) from exc
        return out * 1e-9, []


_DEVICES: dict[str, object] = {}
_FACTORIES = {"cpu": HostDevice, "cuda": CudaDevice}


def device(kind: str):
    """The (cached) device object for a BackendInfo.device value."""
    if kind not in _DEVICES:
        try:
            factory = _FACTORIES[kind]
        except KeyError:
            raise ValueError(f"unknown device kind {kind!r}; known: {', '.join(_FACTORIES)}") \
                from None
        _DEVICES[kind] = factory()
    return _DEVICES[kind]
