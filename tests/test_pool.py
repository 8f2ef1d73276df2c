"""nbbn.pool: a big output buffer is handed out again only once every reference to it is gone,
results do not change, the pool stays within its bound, and it can be turned off.

The pool's size threshold is lowered (``min_bytes=0``) so small, quickly computed arrays are
pooled; nothing here times anything."""

from __future__ import annotations

import gc
import os
import pickle
import subprocess
import sys
import threading
import weakref

import numpy as np
import pytest

import nbbn
from nbbn import pool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
F32 = np.dtype(np.float32)


@pytest.fixture(autouse=True)
def small_pool():
    """Every request pooled, an empty pool before and after each test, settings restored."""
    pool.clear()
    previous = pool.configure(enabled=True, min_bytes=0, max_bytes=1 << 30)
    _BASE.update(pool.stats())
    yield
    pool.configure(**previous)
    pool.clear()


def _data(shape, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return (-2.3 + 0.5 * rng.standard_normal(shape)).astype(dtype)


def _vectors(C, dtype=np.float32, seed=1):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(C).astype(dtype), (0.5 + rng.random(C)).astype(dtype),
            rng.standard_normal(C).astype(dtype), rng.standard_normal(C).astype(dtype))


def _infer(x, channel_axis=1, **kw):
    C = x.shape[channel_axis]
    rm, rv, g, b = _vectors(C, x.dtype)
    return nbbn.batch_norm_infer(x, rm, rv, g, b, channel_axis=channel_axis, **kw)


_BASE: dict = {}
_COUNTS = ("hits", "misses", "untracked", "evictions")


def _stats():
    """pool.stats() with the counts taken since the test began."""
    s = pool.stats()
    return {k: v - _BASE[k] if k in _COUNTS else v for k, v in s.items()}


def _hits():
    return _stats()["hits"]


# ---------------------------------------------------------------------------------------------
# The free test: every way Python code can hold the memory keeps the buffer out of the pool
# ---------------------------------------------------------------------------------------------
def _torch(fn):
    def make(a):
        torch = pytest.importorskip("torch")
        return fn(torch, a)
    return make


HOLDERS = {
    "itself": lambda a: a,
    "view": lambda a: a.view(),
    "view of a view": lambda a: a.view()[1:].view(),
    "slice": lambda a: a[1:2],
    "element row": lambda a: a[0],
    "reshape": lambda a: a.reshape(-1),
    "transpose": lambda a: a.T,
    "dtype view": lambda a: a.view(np.int32),
    "np.asarray of a view": lambda a: np.asarray(a[1:]),
    "as_strided": lambda a: np.lib.stride_tricks.as_strided(a, (2, 2), (4, 4)),
    "memoryview": lambda a: memoryview(a),
    "memoryview of a slice": lambda a: memoryview(a[1:]),
    "np.frombuffer": lambda a: np.frombuffer(memoryview(a[1:]), np.float32),
    "flat iterator": lambda a: a.flat,
    "__dlpack__ capsule": lambda a: a.__dlpack__(),
    "weakref": lambda a: weakref.ref(a),
    "torch.from_numpy": _torch(lambda torch, a: torch.from_numpy(a)),
    "torch.from_numpy of a slice": _torch(lambda torch, a: torch.from_numpy(a[1:])),
    "torch.as_tensor": _torch(lambda torch, a: torch.as_tensor(a)),
    "torch.from_dlpack": _torch(lambda torch, a: torch.from_dlpack(a)),
    "torch tensor's .numpy()": _torch(lambda torch, a: torch.from_numpy(a).numpy()),
}


@pytest.mark.parametrize("how", list(HOLDERS))
def test_a_held_buffer_is_never_handed_out_again(how):
    a = pool.empty((4, 8), F32)
    holder = HOLDERS[how](a)
    del a
    gc.collect(1)  # the young generations: a full collection costs ~0.5 s in this process
    b = pool.empty((4, 8), F32)
    assert _hits() == 0
    if isinstance(holder, np.ndarray):
        assert not np.shares_memory(holder, b)
    del holder
    gc.collect(1)
    c = pool.empty((4, 8), F32)  # now only b is held: the first buffer comes back
    assert _hits() == 1 and not np.shares_memory(b, c)


def test_pickling_copies():
    a = pool.empty((4, 8), F32)
    a[...] = 1.0
    copy = pickle.loads(pickle.dumps(a))
    assert not np.shares_memory(copy, a)
    addr = a.ctypes.data
    del a
    b = pool.empty((4, 8), F32)
    assert _hits() == 1 and b.ctypes.data == addr
    b[...] = 2.0
    assert (copy == 1.0).all()


def test_a_buffer_in_a_reference_cycle_waits_for_the_collector():
    a = pool.empty((4, 8), F32)
    cycle = [a]
    cycle.append(cycle)
    del a, cycle  # unreachable, but alive until the collector runs: not free yet
    b = pool.empty((4, 8), F32)
    gc.collect()
    c = pool.empty((4, 8), F32)
    assert not np.shares_memory(b, c) and _hits() == 1


def _set_shape(a):
    a.shape = (-1,)


def _set_strides(a):
    a.strides = (4, 16)


def _set_dtype(a):
    a.dtype = np.int32


CHANGES = {
    "shape assigned": _set_shape,
    "strides assigned": _set_strides,
    "dtype assigned": _set_dtype,
    "made read-only": lambda a: a.setflags(write=False),
    "resized without the reference check": lambda a: a.resize((64,), refcheck=False),
}


@pytest.mark.parametrize("how", list(CHANGES))
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_array_changed_in_place_is_forgotten_not_reused(how):
    """What the caller did to the very array before dropping it does not come back: the buffer
    is dropped from the pool, and the next request gets a new array as np.empty makes it."""
    a = pool.empty((4, 8), F32)
    CHANGES[how](a)
    del a
    b = pool.empty((4, 8), F32)
    assert (b.shape, b.strides, b.dtype, b.flags.writeable) == ((4, 8), (32, 4), F32, True)
    s = _stats()
    assert s["hits"] == 0 and s["buffers"] == 1


def test_request_kinds_are_kept_apart():
    a = pool.empty((4, 8), F32)
    del a
    assert pool.empty((8, 4), F32).shape == (8, 4)
    assert pool.empty((4, 8), np.dtype(np.float64)).dtype == np.float64
    assert _hits() == 0


# ---------------------------------------------------------------------------------------------
# Through the API
# ---------------------------------------------------------------------------------------------
def test_a_dropped_output_is_reused_and_results_do_not_change():
    x = _data((6, 5, 3, 4))
    ref = _infer(x)  # pooled, and held
    y = _infer(x)
    assert _hits() == 0 and not np.shares_memory(ref, y)
    addr = y.ctypes.data
    y.fill(np.nan)
    del y
    y2 = _infer(x)
    assert _hits() == 1 and y2.ctypes.data == addr
    np.testing.assert_array_equal(y2, ref)


def test_chained_calls_alternate_buffers():
    """y = infer(y): the old y is still referenced during the call, so the new one is another
    buffer; the one dropped before comes back."""
    x = _data((4, 6))
    y = x
    for _ in range(5):
        y = _infer(y)
    s = _stats()
    assert (s["buffers"], s["misses"], s["hits"]) == (2, 2, 3)
    pool.configure(enabled=False)
    z = x
    for _ in range(5):
        z = _infer(z)
    np.testing.assert_array_equal(y, z)


@pytest.mark.parametrize("case", ["NC", "NCHW", "NCHW channels-last memory", "NHWC axis -1",
                                  "NLC axis -1"])
def test_outputs_match_the_unpooled_path_exactly(case):
    """Bit-identical values and the same dtype, shape, strides and flags, for every op's x-sized
    outputs (y; dx; dz with relu), with the reused buffers first filled with NaN."""
    shape, axis, cl = {"NC": ((7, 5), 1, False), "NCHW": ((3, 5, 2, 3), 1, False),
                       "NCHW channels-last memory": ((3, 5, 2, 3), 1, True),
                       "NHWC axis -1": ((3, 2, 3, 5), -1, False),
                       "NLC axis -1": ((3, 4, 5), -1, False)}[case]
    x = _data(shape)
    dy = _data(shape, seed=2)
    if cl:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    C = shape[axis]
    rm, rv, g, b = _vectors(C)

    def calls():
        y, sm, si = nbbn.batch_norm_train(x, g, b, channel_axis=axis, relu=True)
        yi = nbbn.batch_norm_infer(x, rm, rv, g, b, channel_axis=axis)
        dx, dg, db, dz = nbbn.batch_norm_backward(dy, x, sm, si, g, channel_axis=axis, relu=True,
                                                  y=y)
        return [y, sm, si, yi, dx, dg, db, dz]

    pool.configure(enabled=False)
    plain = calls()
    pool.configure(enabled=True)
    for a in calls():  # fill the pool with NaN-filled buffers
        a.fill(np.nan)
    del a
    pooled = calls()
    assert _hits() == 4  # y, yi, dx, dz reused
    for p, q in zip(plain, pooled, strict=True):
        np.testing.assert_array_equal(p, q)
        assert (p.dtype, p.shape, p.strides) == (q.dtype, q.shape, q.strides)
        for flag in ("C_CONTIGUOUS", "F_CONTIGUOUS", "WRITEABLE", "OWNDATA", "ALIGNED"):
            assert p.flags[flag] == q.flags[flag], flag
        assert (p.base is None) == (q.base is None)


def test_out_arrays_are_never_pooled():
    x = _data((4, 6))
    out = np.empty_like(x)
    before = _stats()
    y = _infer(x, out=out)
    assert y is out
    after = _stats()
    assert (after["hits"], after["misses"], after["buffers"]) == (
        before["hits"], before["misses"], before["buffers"])
    del y, out
    assert _hits() == 0 and _stats()["buffers"] == 0


def test_small_requests_bypass_the_pool():
    pool.configure(min_bytes=1 << 20)
    x = _data((4, 6))
    for _ in range(3):
        _infer(x)
    s = _stats()
    assert (s["hits"], s["misses"], s["buffers"]) == (0, 0, 0)


# ---------------------------------------------------------------------------------------------
# Bound, opt-out, settings
# ---------------------------------------------------------------------------------------------
def test_the_cap_evicts_least_recently_used_free_buffers():
    n = 4 * 8 * 4  # bytes of a (4, 8) float32
    pool.configure(max_bytes=2 * n)
    a = pool.empty((4, 8), F32)
    b = pool.empty((8, 4), F32)
    del a, b
    pool.empty((8, 4), F32)  # a hit: (8, 4) is now the more recently used
    c = pool.empty((2, 16), F32)  # a miss: evicts the least recently used free one, (4, 8)
    s = _stats()
    assert s["evictions"] == 1 and s["bytes_held"] <= 2 * n and s["buffers"] == 2
    held = [c, pool.empty((8, 4), F32)]  # (8, 4) was kept
    assert _stats()["hits"] == 2
    d = pool.empty((1, 32), F32)  # both buffers held: served but not kept
    s = _stats()
    assert s["untracked"] == 1 and s["bytes_held"] == 2 * n and not np.shares_memory(d, held[0])


def test_lowering_the_cap_forgets_without_taking_from_callers():
    a = pool.empty((4, 8), F32)
    a[...] = 3.0
    b = pool.empty((4, 8), F32)
    del b
    pool.configure(max_bytes=0)
    assert _stats()["bytes_held"] == 0
    assert (a == 3.0).all()
    pool.configure(max_bytes=1 << 30)
    c = pool.empty((4, 8), F32)
    assert not np.shares_memory(a, c)


def test_configure_disables_and_clears():
    x = _data((4, 6))
    y = _infer(x)
    del y
    pool.configure(enabled=False)
    s = _stats()
    assert not s["enabled"] and s["buffers"] == 0 and s["bytes_held"] == 0
    _infer(x)
    _infer(x)
    assert _stats()["hits"] == 0 and _stats()["buffers"] == 0


def test_configure_returns_previous_settings_and_checks_values():
    previous = pool.configure(max_bytes=123)
    assert previous["max_bytes"] == 1 << 30 and _stats()["max_bytes"] == 123
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(ValueError, match="max_bytes"):
            pool.configure(max_bytes=bad)


def test_a_refused_configure_changes_nothing():
    before = {k: v for k, v in pool.stats().items() if k in ("enabled", "max_bytes", "min_bytes")}
    with pytest.raises(ValueError, match="min_bytes"):
        pool.configure(enabled=False, max_bytes=5, min_bytes=-1)
    after = {k: v for k, v in pool.stats().items() if k in ("enabled", "max_bytes", "min_bytes")}
    assert after == before


def test_clear_returns_what_it_held():
    a = pool.empty((4, 8), F32)
    assert pool.clear() == a.nbytes
    assert _stats()["buffers"] == 0


@pytest.mark.parametrize("value, enabled", [("0", False), ("off", False), ("1", True),
                                            ("", True)])
def test_environment_variable_turns_it_off(value, enabled):
    env = {**os.environ, "NBBN_POOL": value, "NBBN_POOL_MAX_BYTES": "4096",
           "PYTHONPATH": ROOT}
    code = ("import nbbn; s = nbbn.pool.stats(); "
            "print(s['enabled'], s['max_bytes'])")
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.split()
    assert out == [str(enabled), "4096"]


# ---------------------------------------------------------------------------------------------
# Threads
# ---------------------------------------------------------------------------------------------
def test_concurrent_calls_never_share_a_live_output():
    """Four threads call inference on their own data, each keeping its last three outputs alive
    (a mix of hits and misses); every output is checked against the unpooled result, and no two
    live outputs, across all threads, share memory."""
    shape = (6, 7)
    xs = [_data(shape, seed=s) for s in range(4)]
    pool.configure(enabled=False)
    expect = [_infer(x) for x in xs]
    pool.configure(enabled=True)
    live: dict[int, list] = {i: [] for i in range(4)}
    errors = []
    barrier = threading.Barrier(4)

    def work(i):
        try:
            barrier.wait()
            for _ in range(200):
                y = _infer(xs[i])
                if not np.array_equal(y, expect[i]):
                    errors.append(f"thread {i}: wrong values")
                live[i].append(y)
                if len(live[i]) > 3:
                    live[i].pop(0)
        except Exception as e:  # noqa: BLE001 -- reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[:5]
    held = [y for ys in live.values() for y in ys]
    addresses = {y.ctypes.data for y in held}
    assert len(addresses) == len(held)
    for i, ys in live.items():
        for y in ys:
            np.testing.assert_array_equal(y, expect[i])
    assert _hits() > 0


def test_a_cast_memoryview_holds_the_buffer():
    """Objects built over the buffer protocol (here ``memoryview.cast``) keep the exporter."""
    a = pool.empty((4, 8), F32)
    m = memoryview(a).cast("B")
    del a
    assert not np.shares_memory(np.frombuffer(m, np.uint8), pool.empty((4, 8), F32))


def test_a_finalizer_that_runs_inside_the_pool_does_not_deadlock(monkeypatch):
    """The garbage collector can run a finalizer while the pool holds its lock (when the pool
    allocates); a finalizer that asks the pool for a buffer gets a plain array instead of
    waiting forever for the lock its own thread holds. Run in a thread, so a hang fails."""
    got = {}

    class Finalized:
        def __del__(self):
            got["array"] = pool.empty((4, 8), F32)
            try:
                pool.stats()
            except RuntimeError as e:
                got["stats"] = str(e)

    real_empty = np.empty

    def empty_collecting(*a, **k):  # what an allocation may do: run the collector
        gc.collect()
        return real_empty(*a, **k)

    def work():
        cycle = [Finalized()]
        cycle.append(cycle)
        del cycle
        got["outer"] = pool.empty((2, 16), F32)  # a miss: allocates inside the lock

    gc.collect()
    monkeypatch.setattr(np, "empty", empty_collecting)
    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(timeout=30)
    monkeypatch.undo()
    assert not t.is_alive(), "deadlocked"
    assert got["array"].shape == (4, 8) and got["outer"].shape == (2, 16)
    assert "finalizer" in got["stats"]
    assert _stats()["buffers"] == 1  # only the outer request was kept
