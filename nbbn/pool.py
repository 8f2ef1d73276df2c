"""A cache of big output buffers, reused once the caller has dropped them (``nbbn.pool``).

Why: an allocating call writes into fresh memory. glibc serves an allocation above its mmap
threshold (dynamic, at most 32 MiB on 64-bit Linux) with a fresh ``mmap`` and returns it with
``munmap`` on free, so every big allocating call pays a page fault per page (per 2 MiB page
with the transparent huge pages NumPy asks for) and the operating system's zeroing of every page:
one more write pass over the output before the kernel's own. A preallocated ``out=`` avoids it;
so does an arena like ONNX Runtime's, and so does this pool: the CPU backend asks :func:`empty`
for its x-sized outputs (y, dx, dz) and gets a buffer an earlier call returned and its caller
has let go.

When a buffer is free
---------------------
The pool keeps the owning ndarray (the one whose memory it is: ``base is None``) and hands out
that very object (or, for a channels-last output, the backend's transposed view of it). Every way
Python code can reach its memory keeps a reference to that owner: NumPy views, views of views,
slices, ``reshape``/``.T``/``as_strided`` (their ``.base`` is the owner), ``memoryview`` and
any buffer-protocol export (``np.frombuffer``, the export holds the exporter), ``__dlpack__``,
``torch.from_numpy`` / ``torch.as_tensor`` / ``torch.from_dlpack`` (checked on NumPy 2.4 and
torch 2.13: each holds one reference until the tensor dies). So the owner is free exactly when its
reference count is the pool's own and no weak reference to it exists: :func:`_free` tests
``sys.getrefcount`` against the count it measured on a buffer only the pool holds, under the
pool's lock, and the buffer handed out is returned while the lock is held, so no other thread can
find it free in between. An object in a reference cycle, a frame kept by a traceback, anything
that still holds it keeps the buffer out of the pool: a mistake costs a miss, never sharing.

What is not seen: a raw address (``y.ctypes.data``, ``y.__array_interface__["data"]``,
``np.ctypeslib.as_array(address)``, a C library that stores the pointer) holds no reference. Using
such an address after dropping the array is a use-after-free with or without the pool (malloc
reuses freed memory too); with the pool the memory stays mapped and is overwritten by a later
call instead of faulting. Keep the array alive while its address is in use, or opt out.

Bounds and opt-out
------------------
* Only requests of at least ``min_bytes`` (default 4 MiB) are pooled. A pooled request costs a
  lock, a dict probe and a reference count per candidate, a fraction of a microsecond more than
  ``np.empty``: a visible part of a 1 MiB call, a negligible one from 4 MiB. Below 32 MiB
  glibc, once its threshold has adapted, serves a repeated size from its free lists without new
  faults, so there the pool gains nothing on glibc; it still gains where the allocator maps
  such sizes afresh (glibc before its threshold adapts or with ``MALLOC_MMAP_THRESHOLD_`` set;
  allocators that always map big blocks). 4 MiB is also where NumPy starts asking for 2 MiB
  pages: below it, a fresh array faults in 4 KiB pages.
* The pool holds at most ``max_bytes`` (default 1 GiB, or an eighth of the physical memory if
  that is less; ``NBBN_POOL_MAX_BYTES``), counting buffers in use by callers as well as free
  ones: room for the outputs of a forward and backward step over a few of the largest arrays
  one passes (16 of 4096×4096 float32), and what an idle process keeps at most. A request
  that would exceed it first evicts free buffers, least recently used first; if
  the buffers callers still hold leave no room, it is served by a plain ``np.empty`` the pool does
  not keep (keeping the buffers a training loop will ask for again, in order, rather than
  thrashing them).
* ``NBBN_POOL=0`` (or ``false``/``off``/``no``) at import, or :func:`configure` with
  ``enabled=False``, turns it off: every request is a plain ``np.empty``. Outputs of ``out=``
  calls never come from or go to the pool.
* The free test needs the GIL: on a free-threaded CPython build the pool is off.

Buffers are "pre-touched" only by having been used: the pool never writes to a buffer.
"""

from __future__ import annotations

import math
import os
import sys
import threading
import weakref

import numpy as np

__all__ = ["clear", "configure", "empty", "stats"]

#: Requests below this many bytes are served by np.empty (see the module docstring).
DEFAULT_MIN_BYTES = 4 << 20


def _default_max_bytes() -> int:
    try:
        phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        phys = 0
    return min(1 << 30, phys // 8) if phys > 0 else 1 << 30


def _env_enabled() -> bool:
    return os.environ.get("NBBN_POOL", "1").strip().lower() not in ("0", "false", "off", "no")


def _env_max_bytes() -> int:
    v = os.environ.get("NBBN_POOL_MAX_BYTES")
    if v is None or not v.strip():
        return _default_max_bytes()
    try:
        n = int(v)
    except ValueError:
        raise ValueError(f"NBBN_POOL_MAX_BYTES must be an integer number of bytes, got {v!r}") \
            from None
    if n < 0:
        raise ValueError(f"NBBN_POOL_MAX_BYTES must be ≥ 0, got {n}")
    return n


#: Whether reference counts decide ownership: not on a free-threaded build (no GIL).
_GIL = getattr(sys, "_is_gil_enabled", lambda: True)()


class _Buf:
    """A buffer the pool holds: the owning array, its key, size, shape and strides as made (see
    :func:`_intact`), and when it was last handed out."""

    __slots__ = ("base", "key", "nbytes", "shape", "strides", "tick")

    def __init__(self, base: np.ndarray, key: tuple, tick: int):
        self.base = base
        self.key = key
        self.nbytes = base.nbytes
        self.shape = base.shape
        self.strides = base.strides
        self.tick = tick


def _intact(b: _Buf) -> bool:
    """Whether the array is still as ``np.empty`` made it: a caller may have changed the very
    object in place before dropping it (``y.shape = -1``, ``y.flags.writeable = False``,
    ``y.resize(..., refcheck=False)``, ``y.dtype = ...``); such a buffer is forgotten, not
    handed out."""
    a = b.base
    return (a.shape == b.shape and a.strides == b.strides and a.dtype == b.key[1]
            and a.flags.writeable)


def _refs(b: _Buf) -> int:
    """The owner's reference count as seen from here (the pool's entry, this call's own)."""
    return sys.getrefcount(b.base)


#: _refs of a buffer only the pool holds, measured by the same code on this interpreter rather
#: than assumed (what sys.getrefcount reports for the same references may differ between CPython
#: versions; its documentation warns of borrowed references).
_FREE_REFS = _refs(_Buf(np.empty(0), (), 0))


def _free(b: _Buf) -> bool:
    """Whether no one but the pool holds the buffer (no strong and no weak reference). The
    count is taken by the same expression as in :func:`_refs`, which calibrated it."""
    return sys.getrefcount(b.base) == _FREE_REFS and not weakref.getweakrefcount(b.base)


_lock = threading.Lock()
#: The thread that holds _lock. Python code can run inside the pool's critical section on the
#: same thread -- a finalizer (``__del__``, weakref.finalize) run by the garbage collector when
#: the pool allocates -- and a finalizer that calls nbbn would wait for the lock forever: such a
#: nested request is served by np.empty (and configure/clear/stats raise), see :func:`_enter`.
_holder: int | None = None
_get_ident = threading.get_ident
_bufs: dict[tuple, list[_Buf]] = {}  # (shape, dtype) → the buffers of that request
_state = {"enabled": _GIL and _env_enabled(), "max_bytes": _env_max_bytes(),
          "min_bytes": DEFAULT_MIN_BYTES, "held": 0, "tick": 0}
_counts = {"hits": 0, "misses": 0, "untracked": 0, "evictions": 0}
#: Requests of at least this many bytes are pooled: min_bytes, or infinity when the pool is off
#: (one comparison decides, on every call).
_threshold: float = DEFAULT_MIN_BYTES if _state["enabled"] else math.inf


def _after_fork():  # a lock held by another thread at fork() would stay held in the child
    global _lock, _holder
    _lock = threading.Lock()
    _holder = None


def _enter() -> bool:
    """Take the lock; False (lock not taken) when this thread holds it already (a finalizer
    running inside the pool)."""
    global _holder
    me = _get_ident()
    if not _lock.acquire(blocking=False):
        if _holder == me:
            return False
        _lock.acquire()
    _holder = me
    return True


def _leave() -> None:
    global _holder
    _holder = None
    _lock.release()


class _Locked:
    """``with _Locked():`` -- the lock for configure, clear and stats; RuntimeError when called
    from inside the pool on the same thread (a finalizer), where waiting would never end."""

    def __enter__(self):
        if not _enter():
            raise RuntimeError("nbbn.pool was called from a finalizer run inside the pool")

    def __exit__(self, *exc):
        _leave()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def empty(shape: tuple, dtype: np.dtype) -> np.ndarray:
    """A C-contiguous array of ``shape`` (a tuple of ints) and ``dtype`` (a ``np.dtype``) whose
    contents are undefined, like ``np.empty``: a pooled buffer no one else holds when the pool is
    on and the request is at least ``min_bytes``, else a new one (kept by the pool for reuse when
    there is room under ``max_bytes``). The array returned owns its memory (``base is None``),
    exactly as ``np.empty``'s does."""
    if math.prod(shape) * dtype.itemsize < _threshold:  # small, or the pool is off: one test
        return np.empty(shape, dtype)
    return _take(shape, dtype)


def _take(shape: tuple, dtype: np.dtype) -> np.ndarray:
    key = (shape, dtype)
    if not _enter():  # a finalizer run inside the pool: not pooled
        return np.empty(shape, dtype)
    try:
        if not _state["enabled"]:  # turned off since empty() read the threshold
            return np.empty(shape, dtype)
        tick = _state["tick"] = _state["tick"] + 1
        for b in _bufs.get(key, ()):
            # _free, inlined (this runs on every pooled call); the count is taken by the same
            # expression as in _refs, which calibrated _FREE_REFS.
            if sys.getrefcount(b.base) == _FREE_REFS and not weakref.getweakrefcount(b.base):
                if not _intact(b):
                    b = _find_free(key)  # forgets the changed ones; the rest are looked at again
                    if b is None:
                        break
                b.tick = tick
                _counts["hits"] += 1
                return b.base  # a reference taken under the lock: no other thread can find it free
        return _new(key)
    finally:
        _leave()


def _find_free(key) -> _Buf | None:
    """A free, unchanged buffer of ``key``, or None; changed free ones are forgotten on the way
    (the lock is held)."""
    bufs = _bufs.get(key)
    while bufs:
        for b in bufs:
            if _free(b):
                break
        else:
            return None
        if _intact(b):
            return b
        _forget(b)
        bufs = _bufs.get(key)
    return None


def _new(key) -> np.ndarray:
    """A miss (the lock is held): a new array, kept when it fits under ``max_bytes``."""
    s = _state
    _counts["misses"] += 1
    base = np.empty(*key)
    if s["held"] + base.nbytes > s["max_bytes"] and not _trim(s["max_bytes"] - base.nbytes):
        _counts["untracked"] += 1
        return base
    _bufs.setdefault(key, []).append(_Buf(base, key, s["tick"]))
    s["held"] += base.nbytes
    return base


def _trim(limit: int) -> bool:
    """Evict free buffers, least recently handed out first, until the pool holds ≤ limit bytes;
    whether it does. Called with the lock held."""
    s = _state
    if s["held"] <= limit:
        return True
    free = sorted((b for bufs in _bufs.values() for b in bufs if _free(b)), key=lambda b: b.tick)
    for b in free:
        _forget(b)
        _counts["evictions"] += 1
        if s["held"] <= limit:
            return True
    return False


def _forget(b: _Buf) -> None:
    """Drop the pool's reference to a buffer (its memory goes back when no one else holds it)."""
    bufs = _bufs[b.key]
    bufs[:] = [c for c in bufs if c is not b]
    if not bufs:
        del _bufs[b.key]
    _state["held"] -= b.nbytes


def configure(enabled: bool | None = None, max_bytes: int | None = None,
              min_bytes: int | None = None) -> dict:
    """Change the pool's settings (``None`` leaves one as it is); returns the previous ones, so
    ``configure(**previous)`` restores them. ``enabled=False`` also releases every buffer the
    pool holds; a smaller ``max_bytes`` evicts free buffers (least recently used first), then
    forgets buffers still in use by callers (they keep them) until the pool fits."""
    global _threshold
    for name, v in (("max_bytes", max_bytes), ("min_bytes", min_bytes)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
            raise ValueError(f"{name} must be an int ≥ 0, got {v!r}")
    if enabled and not _GIL:
        raise RuntimeError("nbbn.pool needs the GIL: on a free-threaded build reference counts "
                           "do not tell whether a buffer is still in use")
    with _Locked():
        s = _state
        previous = {k: s[k] for k in ("enabled", "max_bytes", "min_bytes")}
        if enabled is not None:
            s["enabled"] = bool(enabled)
        if max_bytes is not None:
            s["max_bytes"] = max_bytes
        if min_bytes is not None:
            s["min_bytes"] = min_bytes
        _threshold = s["min_bytes"] if s["enabled"] else math.inf
        if not s["enabled"]:
            _clear()
        elif not _trim(s["max_bytes"]):
            for b in sorted((b for bufs in _bufs.values() for b in bufs), key=lambda b: b.tick):
                _forget(b)
                if s["held"] <= s["max_bytes"]:
                    break
        return previous


def _clear() -> int:
    held = _state["held"]
    _bufs.clear()
    _state["held"] = 0
    return held


def clear() -> int:
    """Release every buffer the pool holds (callers keep the ones they hold); returns the bytes
    the pool held. The hit and miss counts are kept."""
    with _Locked():
        return _clear()


def stats() -> dict:
    """The pool's settings and counts: ``enabled``, ``max_bytes``, ``min_bytes``; ``hits``
    (requests served by a reused buffer), ``misses`` (pooled-size requests that allocated),
    ``untracked`` (misses the pool could not keep under ``max_bytes``), ``evictions``;
    ``buffers`` and ``bytes_held`` (all the pool holds), ``bytes_free`` (the part no caller holds
    now, reusable)."""
    with _Locked():
        all_bufs = [b for bufs in _bufs.values() for b in bufs]
        free = sum(b.nbytes for b in all_bufs if _free(b))
        return {"enabled": _state["enabled"], "max_bytes": _state["max_bytes"],
                "min_bytes": _state["min_bytes"], **_counts, "buffers": len(all_bufs),
                "bytes_held": _state["held"], "bytes_free": free}
