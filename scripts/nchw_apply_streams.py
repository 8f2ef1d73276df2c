"""The write side of scripts/nchw_row_streams.py (round 11): y = x·a + b over cold NCHW arrays,
one task per channel on two threads, each channel's N runs one at a time or four at a time;
``one``/``four`` read and write from DRAM, ``stats_then_apply_*`` first sum the channel (so its
runs come back from L2, as in the forward kernel's normalize pass) and then write y. Run alone,
on a quiet host:

    python scripts/nchw_apply_streams.py

Round 11's output is in results/cpu-kernels/round11/row-streams.md.
"""

import os
import time

import numpy as np
from numba import njit, prange, set_num_threads

FM = {"reassoc", "contract"}


@njit(parallel=True, fastmath=FM)
def one(x, y):
    N, C, S = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    for c in prange(C):
        a = np.float32(1.5)
        b = np.float32(0.5)
        for n in range(N):
            o = np.uint64((n * C + c) * S)
            for i in range(np.uint64(S)):
                yf[o + i] = xf[o + i] * a + b


@njit(parallel=True, fastmath=FM)
def four(x, y):
    N, C, S = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    for c in prange(C):
        a = np.float32(1.5)
        b = np.float32(0.5)
        for n in range(0, N, 4):
            o0 = np.uint64((n * C + c) * S)
            o1 = np.uint64(((n + 1) * C + c) * S)
            o2 = np.uint64(((n + 2) * C + c) * S)
            o3 = np.uint64(((n + 3) * C + c) * S)
            for i in range(np.uint64(S)):
                yf[o0 + i] = xf[o0 + i] * a + b
                yf[o1 + i] = xf[o1 + i] * a + b
                yf[o2 + i] = xf[o2 + i] * a + b
                yf[o3 + i] = xf[o3 + i] * a + b


@njit(parallel=True, fastmath=FM)
def stats_then_apply_one(x, y):
    # x's channel read once (brings it to L2), then applied one run at a time
    N, C, S = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    for c in prange(C):
        s = 0.0
        for n in range(N):
            o = np.uint64((n * C + c) * S)
            for i in range(np.uint64(S)):
                s += xf[o + i]
        a = np.float32(1.0 + s * 1e-30)
        b = np.float32(0.5)
        for n in range(N):
            o = np.uint64((n * C + c) * S)
            for i in range(np.uint64(S)):
                yf[o + i] = xf[o + i] * a + b


@njit(parallel=True, fastmath=FM)
def stats_then_apply_four(x, y):
    N, C, S = x.shape
    xf = x.reshape(x.size)
    yf = y.reshape(y.size)
    for c in prange(C):
        s = 0.0
        for n in range(N):
            o = np.uint64((n * C + c) * S)
            for i in range(np.uint64(S)):
                s += xf[o + i]
        a = np.float32(1.0 + s * 1e-30)
        b = np.float32(0.5)
        for n in range(0, N, 4):
            o0 = np.uint64((n * C + c) * S)
            o1 = np.uint64(((n + 1) * C + c) * S)
            o2 = np.uint64(((n + 2) * C + c) * S)
            o3 = np.uint64(((n + 3) * C + c) * S)
            for i in range(np.uint64(S)):
                yf[o0 + i] = xf[o0 + i] * a + b
                yf[o1 + i] = xf[o1 + i] * a + b
                yf[o2 + i] = xf[o2 + i] * a + b
                yf[o3 + i] = xf[o3 + i] * a + b


set_num_threads(2)
for shape in ((32, 256, 3136), (32, 512, 784)):
    xs = [np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(3)]
    ys = [np.empty_like(x) for x in xs]
    fs = (one, four, stats_then_apply_one, stats_then_apply_four)
    for f in fs:
        f(xs[0], ys[0])
    r = {}
    for _rep in range(5):
        for f in fs:
            t0 = time.perf_counter_ns()
            for x, y in zip(xs, ys, strict=False):
                f(x, y)
            r.setdefault(f.__name__, []).append((time.perf_counter_ns() - t0) / 3 / 1e6)
    print(
        shape,
        {k: round(float(np.median(v)), 2) for k, v in r.items()},
        "ms; load",
        os.getloadavg()[0],
        flush=True,
    )
