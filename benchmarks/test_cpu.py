"""CPU speed of nbbn beside PyTorch CPU and a copy of the same bytes (pytest-benchmark).

Run with ``nox -s bench`` (autosaves); ``nox -s bench -- --benchmark-compare
--benchmark-compare-fail=median:10%`` compares against the last saved run. Never part of the test
suite: no wall-clock assertions.
"""

import gc

import numba
import numpy as np
import pytest
from cases import IMPLS, OPS, SHAPES, make


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("op", OPS)
def test_op(benchmark, op, shape, impl):
    fn = make(impl, op, shape)
    if fn is None:
        pytest.skip(f"{impl}: torch is not installed")
    benchmark.group = f"{op} {shape}"
    benchmark.extra_info.update(op=op, shape=list(shape), impl=impl,
                                threads=numba.get_num_threads(),
                                bytes=int(np.prod(shape)) * 4)
    gc.collect()
    benchmark.pedantic(fn, rounds=15, iterations=1, warmup_rounds=2)


def test_compile_time(benchmark):
    """Cold JIT compile of the forward NCHW kernel (no cache), apart from any kernel timing."""
    from numba import njit

    from nbbn import cpu

    x = np.ones((2, 3, 4), np.float32)
    args = (x, cpu._EMPTY, cpu._EMPTY, False, False, 1e-5, cpu._EMPTY, cpu._EMPTY, False, 0.1,
            True, np.empty_like(x), np.empty(3, np.float32), np.empty(3, np.float32),
            np.empty(3), np.empty(3))

    def setup():
        return (njit(parallel=True, fastmath=cpu._FM)(cpu.fwd_nchw_fused.py_func),), {}

    benchmark.group = "compile"
    benchmark.pedantic(lambda k: k(*args), setup=setup, rounds=3, iterations=1)
