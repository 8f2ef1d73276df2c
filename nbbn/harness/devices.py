"""Where a backend's arrays live and how its calls are timed, keyed by ``BackendInfo.device``.

* ``cpu``  -- NumPy arrays; wall time of each call with ``time.perf_counter_ns``; the copy
  reference is ``np.copyto`` between two host arrays of the same size as x.
* ``cuda`` -- numba device arrays (``cuda.to_device``, ``cuda.device_array``), so no host
  transfer is timed; each call is bracketed by two CUDA events recorded on the default stream
  (which torch's default stream also is) and read after the end event has completed; the copy
  reference is a device-to-device copy of the same size, timed the same way.

Every sample is one call. Warm-up calls are made and discarded first; then samples are taken
until both ``min_repeats`` and ``min_time`` (sum of samples) are reached, or ``max_time`` of
wall time has passed with at least 3 samples.
"""

from __future__ import annotations

import platform
import time
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class TimingConfig:
    warmup: int = 2
    min_repeats: int = 10
    min_time: float = 0.05  # seconds of measured kernel time
    max_time: float = 0.5  # seconds of wall time, per configuration


@dataclass(frozen=True)
class Samples:
    seconds: np.ndarray

    @property
    def n(self) -> int:
        return int(self.seconds.size)

    def ms(self, q: float) -> float:
        return float(np.percentile(self.seconds, q)) * 1e3

    def noise_pct(self) -> float:
        """Spread of the middle 60 % of samples relative to the median: 100·(p80 − p20)/p50."""
        p20, p50, p80 = np.percentile(self.seconds, [20, 50, 80])
        return float(100.0 * (p80 - p20) / p50) if p50 > 0 else float("nan")


def measure(time_once, fn, cfg: TimingConfig) -> Samples:
    """Warm up, then collect samples of ``time_once(fn)`` (seconds) under cfg's stopping rule."""
    for _ in range(cfg.warmup):
        time_once(fn)
    samples: list[float] = []
    total = 0.0
    start = time.perf_counter()
    while True:
        s = time_once(fn)
        samples.append(s)
        total += s
        n = len(samples)
        if n >= cfg.min_repeats and total >= cfg.min_time:
            break
        if n >= 3 and time.perf_counter() - start >= cfg.max_time:
            break
    return Samples(np.asarray(samples))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


class HostDevice:
    kind = "cpu"

    def put(self, a: np.ndarray):
        return a

    def empty(self, shape, dtype):
        return np.empty(shape, dtype)

    def to_host(self, a) -> np.ndarray:
        return np.asarray(a)

    def sync(self) -> None:
        pass

    def time_once(self, fn) -> float:
        t0 = time.perf_counter_ns()
        fn()
        return (time.perf_counter_ns() - t0) * 1e-9

    def copy_callable(self, nbytes: int):
        """np.copyto between two host buffers of nbytes (pages touched beforehand)."""
        src = np.ones(nbytes, np.uint8)
        dst = np.zeros(nbytes, np.uint8)
        return lambda: np.copyto(dst, src)

    def name(self) -> str:
        return _cpu_model()


class CudaDevice:
    kind = "cuda"

    def __init__(self) -> None:
        from numba import cuda

        self.cuda = cuda
        self._start = cuda.event()  # timing=True is the default
        self._end = cuda.event()

    def put(self, a: np.ndarray):
        return self.cuda.to_device(a)

    def empty(self, shape, dtype):
        return self.cuda.device_array(shape, dtype)

    def to_host(self, a) -> np.ndarray:
        if hasattr(a, "copy_to_host"):
            return a.copy_to_host()
        if hasattr(a, "cpu"):  # a torch tensor
            return a.cpu().numpy()
        return np.asarray(a)

    def sync(self) -> None:
        self.cuda.synchronize()

    def time_once(self, fn) -> float:
        self._start.record()
        fn()
        self._end.record()
        self._end.synchronize()
        return self._start.elapsed_time(self._end) * 1e-3  # ms between the two events

    def copy_callable(self, nbytes: int):
        """Device-to-device copy of nbytes."""
        src = self.cuda.to_device(np.ones(nbytes, np.uint8))
        dst = self.cuda.device_array(nbytes, np.uint8)
        return lambda: dst.copy_to_device(src)

    def name(self) -> str:
        n = getattr(self.cuda.get_current_device(), "name", "CUDA simulator")
        return n.decode() if isinstance(n, bytes) else str(n)


_DEVICES: dict[str, object] = {}
_FACTORIES = {"cpu": HostDevice, "cuda": CudaDevice}


def device(kind: str):
    """The (cached) device object for a BackendInfo.device value."""
    if kind not in _DEVICES:
        try:
            _DEVICES[kind] = _FACTORIES[kind]()
        except KeyError:
            raise ValueError(f"unknown device kind {kind!r}; known: {', '.join(_FACTORIES)}") \
                from None
    return _DEVICES[kind]
