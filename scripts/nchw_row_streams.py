"""Why the NCHW grouped kernels read four rows at once (round 11, issue #24 item 4): the
statistics pass of cold NCHW arrays (three buffer sets, 3 × 98 MiB or 3 × 49 MiB: every read
from DRAM), one task per channel on two threads, reading each channel's N runs x[n, c, :] one
at a time (``one``: one stream that restarts every run, 12.5 KB at 32×256×56×56) or four at a
time (``four``: four ascending streams). The shifted float64 sums of the kernels, reduced to
the pass alone. Run alone, on a quiet host:

    python scripts/nchw_row_streams.py

Round 11's output is in results/cpu-kernels/round11/row-streams.md.
"""

import os
import time

import numpy as np
from numba import njit, prange, set_num_threads

FM = {"reassoc", "contract"}


@njit(fastmath=FM, inline="always")
def span(xf, o, n, k):
    s1 = 0.0
    s2 = 0.0
    o = np.uint64(o)
    for i in range(np.uint64(n)):
        d = xf[o + i] - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(fastmath=FM, inline="always")
def span4(xf, o0, o1, o2, o3, n, k):
    s1 = 0.0
    s2 = 0.0
    o0 = np.uint64(o0)
    o1 = np.uint64(o1)
    o2 = np.uint64(o2)
    o3 = np.uint64(o3)
    for i in range(np.uint64(n)):
        a = xf[o0 + i] - k
        b = xf[o1 + i] - k
        c = xf[o2 + i] - k
        d = xf[o3 + i] - k
        s1 += (a + b) + (c + d)
        s2 += (a * a + b * b) + (c * c + d * d)
    return s1, s2


@njit(parallel=True, fastmath=FM)
def one(x, out):
    N, C, S = x.shape
    xf = x.reshape(x.size)
    for c in prange(C):
        k = np.float64(xf[c * S])
        t1 = 0.0
        t2 = 0.0
        for n in range(N):
            a, b = span(xf, (n * C + c) * S, S, k)
            t1 += a
            t2 += b
        out[0, c] = t1
        out[1, c] = t2


@njit(parallel=True, fastmath=FM)
def four(x, out):
    N, C, S = x.shape
    xf = x.reshape(x.size)
    for c in prange(C):
        k = np.float64(xf[c * S])
        t1 = 0.0
        t2 = 0.0
        n = 0
        while n + 4 <= N:
            a, b = span4(
                xf,
                (n * C + c) * S,
                ((n + 1) * C + c) * S,
                ((n + 2) * C + c) * S,
                ((n + 3) * C + c) * S,
                S,
                k,
            )
            t1 += a
            t2 += b
            n += 4
        while n < N:
            a, b = span(xf, (n * C + c) * S, S, k)
            t1 += a
            t2 += b
            n += 1
        out[0, c] = t1
        out[1, c] = t2


def main():
    set_num_threads(2)
    for shape in ((32, 256, 3136), (32, 64, 12544), (32, 512, 784)):
        nset = 3
        xs = [
            np.random.default_rng(i).standard_normal(shape).astype(np.float32) for i in range(nset)
        ]
        out = np.zeros((2, shape[1]))
        for f in (one, four):
            f(xs[0], out)
        r = {}
        for _rep in range(5):
            for f in (one, four):
                t0 = time.perf_counter_ns()
                for x in xs:
                    f(x, out)
                r.setdefault(f.__name__, []).append((time.perf_counter_ns() - t0) / nset / 1e6)
        o1, o4 = np.zeros((2, shape[1])), np.zeros((2, shape[1]))
        one(xs[0], o1)
        four(xs[0], o4)
        assert np.allclose(o1, o4, rtol=1e-9, atol=1e-6)
        mib = np.prod(shape) * 4 / 2**20
        print(
            shape,
            f"{mib:.0f} MiB",
            {k: round(float(np.median(v)), 2) for k, v in r.items()},
            "ms; load",
            os.getloadavg()[0],
            flush=True,
        )


main()
