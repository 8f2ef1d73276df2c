"""The machine's limit, measured in the loop: the fastest copy and a read-only stream.

Round 2 measured kernels against ``np.copyto``, which is one thread: a 2-thread kernel ran
"faster than the copy". The limit is now timed beside every point, round-robin with the
configurations, as several callables (cpu device, ``--call kernel`` and ``api`` alike):

* ``copy:numpy``  -- ``np.copyto(dst, x)`` (one thread);
* ``copy:numba``  -- a ``prange`` copy over contiguous chunks (Numba's threads, ``--threads``);
* ``copy:torch``  -- ``torch.Tensor.copy_`` on ``from_numpy`` views (PyTorch's thread pool),
  when torch is installed;
* ``read:numba``  -- a ``prange`` sum of x (read-only stream: the read bandwidth).

The *copy* is the fastest of the copies by median time over the point's rounds (``limit_copy``
in the rows). With x of X bytes, per round r, read time ``t_read = read_r`` and write time
``t_write = copy_r − min(read_r, copy_r)`` for X bytes (on tiny arrays the parallel read is
all fork-join cost, so it is capped at the copy's time, which reads X bytes too), an op that
reads ``Rb`` and writes ``Wb`` bytes (:func:`nbbn.bench.roofline.read_write_bytes`, the
minimal model) is limited to

    limit_r = (Rb / X)·t_read + (Wb / X)·t_write

(inference and forward-train read and write x-sized arrays once: their limit is the copy;
backward reads two: copy + read). ``pct_of_limit`` = 100 · median over rounds and trials of
limit_r / time_r (paired): at most 100 unless the minimal bytes model is wrong.
The GPU keeps its one device-to-device copy (``limit`` = ``copy:device``).

Half data (float16, bfloat16) are timed as their raw 16-bit patterns (:func:`bits`): a copy of
the bits is the copy of x, byte for byte, and the read stream sums the patterns as integers --
the same bytes read, a meaningless sum (Numba and PyTorch's ``from_numpy`` know no bfloat16).
"""

from __future__ import annotations

import importlib.util

import numba
import numpy as np
from numba import njit, prange

#: Elements per chunk of the prange loops (unit-stride inner loops of 256 KiB of float32).
CHUNK = 1 << 16


@njit(parallel=True, cache=True)
def prange_copy(src, dst):
    """dst[i] = src[i]; thread t takes whole chunks of CHUNK elements."""
    n = src.size
    nchunks = (n + CHUNK - 1) // CHUNK
    for c in prange(nchunks):
        a = c * CHUNK
        b = min(a + CHUNK, n)
        for i in range(a, b):
            dst[i] = src[i]


@njit(parallel=True, fastmath=True, cache=True)
def prange_sum(src):
    """Σ src (float64 partial sums per chunk, summed at the end): reads every byte once."""
    n = src.size
    nchunks = (n + CHUNK - 1) // CHUNK
    parts = np.zeros(nchunks)
    for c in prange(nchunks):
        a = c * CHUNK
        b = min(a + CHUNK, n)
        s = 0.0
        for i in range(a, b):
            s += src[i]
        parts[c] = s
    return parts.sum()


def bits(a):
    """A 2-byte array (float16, bfloat16) as its raw bits (a uint16 view, host or device);
    others as they are."""
    return a.view(np.uint16) if a.dtype.itemsize == 2 else a


def _flat(a: np.ndarray) -> np.ndarray:
    a = bits(a)
    return a.reshape(-1) if a.flags.c_contiguous else np.ascontiguousarray(a).reshape(-1)


def host_limit_calls(src: np.ndarray, dst: np.ndarray) -> dict:
    """name -> zero-argument call on one buffer set (see the module)."""
    s, d = _flat(src), _flat(dst)
    bs, bd = bits(src), bits(dst)
    calls = {"copy:numpy": lambda: np.copyto(bd, bs),
             "copy:numba": lambda: prange_copy(s, d),
             "read:numba": lambda: prange_sum(s)}
    if importlib.util.find_spec("torch") is not None:
        import torch

        ts, td = torch.from_numpy(s), torch.from_numpy(d)
        calls["copy:torch"] = lambda: td.copy_(ts)
    return calls


def warm(dtype) -> None:
    """Compile (or load from cache) the two kernels for ``dtype`` outside any timed region."""
    a = bits(np.zeros(8, dtype))
    prange_copy(a, a.copy())
    prange_sum(a)


def limit_per_round(T_copy: np.ndarray, T_read: np.ndarray | None, read_bytes: int,
                    write_bytes: int, x_bytes: int) -> np.ndarray:
    """limit_r of the module docstring (seconds per round); the copy alone when there is no
    read stream (a GPU): then reads and writes are charged at the copy's mean rate."""
    if T_read is None:
        return T_copy * (read_bytes + write_bytes) / (2.0 * x_bytes)
    T_read = np.minimum(T_read, T_copy)  # a read cannot take longer than a copy that reads too
    t_write = T_copy - T_read
    return (read_bytes / x_bytes) * T_read + (write_bytes / x_bytes) * t_write


__all__ = ["host_limit_calls", "limit_per_round", "prange_copy", "prange_sum", "warm", "numba"]
