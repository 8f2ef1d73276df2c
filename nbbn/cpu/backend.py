"""The ``"cpu"`` backend: convert, allocate, choose the variant, call the kernels, register.

Arguments arrive validated (:mod:`nbbn.validate`). Here they become what the kernels index
(:mod:`nbbn.cpu.kernels`): C-contiguous views of x-shaped arrays in x's memory layout -- (M, C)
for NC and NHWC, (N, C, S) for NCHW -- made without a copy when the memory allows it (one copy
otherwise), float64 per-channel inputs, and outputs allocated in x's memory layout, so a
channels-last x gets a channels-last y.

Variants (registry key ``variant``; ``auto`` is the default):

* NC, NHWC: ``rows`` (K row chunks stream their rows, see the kernels), ``serial``.
* NCHW: ``grouped`` (a task per group of channels, one parallel region), ``split`` (a task per
  (channel, chunk of positions); for few channels), ``serial``.
* ``auto`` picks by shape alone -- never by the thread count, so a result does not change with
  the number of threads: ``serial`` up to ``SERIAL_MAX`` elements of its layout family (a
  parallel region's wake-up costs more than such a call) and wherever the plan makes one task
  (a region of one task pays the team's wake-up and barrier for one thread's work), ``split``
  for NCHW with fewer than ``SPLIT_BELOW_C`` channels, else ``rows`` / ``grouped``.

Scratch (partial sums, coefficients) is cached per thread and reused, so a steady-state call
allocates only its outputs (none with ``out=``).
"""

from __future__ import annotations

import math
import threading
from typing import NamedTuple

import numpy as np

from .. import pool, registry
from ..fold import fold_precision
from ..spec import Fusion, Layout, Op, inverse_perm
from ..validate import HALF_DTYPES, STORAGE_DTYPES, channel_dtype
from . import kernels as K

# ---------------------------------------------------------------------------------------------
# Shape-only tuning constants (see the module docstring; measured in results/cpu-kernels.md)
# ---------------------------------------------------------------------------------------------
#: Calls with at most this many elements run the serial kernels, per layout family: NCHW's
#: serial twins match or beat the parallel kernels up to 32768 elements; the NC family's do not
#: beyond ~4096 (their serial twins run 2-3x slower per element than the parallel kernels on
#: one thread -- Numba compiles the two apart and the serial one's row loops come out slower,
#: not explained; at 32768: inference 28 vs 14 µs, forward 36 vs 27 µs; round 6's
#: measurements in results/cpu-kernels/round6.md). Round 9 raised NC's from 4096 to 8192: at
#: 32×256 the serial kernels took 4.8/3.0/6.5 µs (forward/inference/backward) and the parallel
#: ones 7.0/3.8/8.2 (results/cpu-kernels/round9.md).
SERIAL_MAX = {"nc": 1 << 13, "nchw": 1 << 15}
#: NC: rows are widened to at least this many values (L = ⌈WIDE/C⌉ rows per wide row).
WIDE = 64
#: NC: bytes of x per row chunk (at least), per op, and the most chunks (the partials' count).
#: The reductions (forward-train, backward) take 256 KiB: their sums walk a chunk as four row
#: streams (kernels, ``_rows_shifted_sums``), and every chunk starts its streams afresh on cold
#: data. Round 10 measured 64 KiB chunks (32 rows of 2 KiB: streams of 16 KiB) at 203 µs for
#: the sums of a cold 1568×512 array on one thread, 128-row chunks at 145 and one chunk at 116;
#: on two threads the backend call of 1568×512 forward took 188 µs with 49 chunks and 163 with
#: 12, 4096×256 forward 247 with 64 and 223 with 16 (results/cpu-kernels/round10.md). The
#: apply pass is one stream per thread whatever the chunks, and inference keeps 64 KiB, so
#: calls of 128-512 KB still take two threads. 256 KiB is twice ATen's grain (32768 values)
#: in float32: a 4 MB array still makes 16 tasks for a many-core host.
CHUNK_BYTES = {"forward": 256 * 1024, "backward": 256 * 1024, "apply": 64 * 1024}
MAX_CHUNKS = 64
#: NC: at least this many (wide) rows per chunk, so the K chunks' float64 partials (2-3 per
#: lane) stay a small fraction of x: with 4096 channels and 256 rows, 64 chunks of 4 rows made
#: 6 MiB of partials for 4 MiB of data, merged serially.
MIN_CHUNK_ROWS = 32
#: NC forward-train and backward: but two chunks where the rows make one by MIN_CHUNK_ROWS or
#: CHUNK_BYTES and two of at least this many (wide) rows, for x of at least
#: SPLIT_FROM_BYTES[op]. A batch-1 NHWC call of 7×7 positions and 2048 channels (49 rows,
#: 400 KB) ran both its passes on one thread (round 8). Two chunks' partials are 2-3 float64
#: values per lane each, ≤ 3/8 of x at 16 float32 rows. Inference keeps one chunk by the
#: bytes: in warm caches two came out slower at 33-49 × 2048 (round 8,
#: results/cpu-kernels/round8.md), and one chunk runs the serial kernel (module docstring).
MIN_SPLIT_ROWS = 8
#: Round 9, 64×256 (64 KB), allocating calls in the bench: backward's three float64 sums per
#: value paid for a second thread (two chunks 9.2 µs against 11.0 on one, kernel alone; the
#: same as the serial kernel in the bench), forward's two did not (the serial kernel 9% faster
#: than two chunks). results/cpu-kernels/round9.md.
SPLIT_FROM_BYTES = {"forward": 128 * 1024, "backward": 0}
#: NC, and NCHW inference's tasks: an odd count below 2·EVEN_BELOW is rounded down to even. On
#: two threads three chunks take two chunks' time on one thread (2/3 of the work, against 1/2
#: for two); an even count divides evenly among 2 and 4 threads. Still a function of the shape
#: only.
EVEN_BELOW = 4
#: NCHW: a channel group's data (N·G·S values) fit in this many bytes, to be normalized from L2.
GROUP_BYTES = 256 * 1024
#: NCHW: at least this many channel groups (load balance), when there are channels enough.
MIN_GROUPS = 16
#: NCHW: fewer channels than this use the ``split`` variant.
SPLIT_BELOW_C = 16
#: NCHW split: chunks per channel so that C·K ≥ this, each of at least SPLIT_CHUNK values.
SPLIT_TASKS = 64
SPLIT_CHUNK = 4096
#: NCHW inference: bytes of x per task (at most; the rows are then spread evenly over the
#: tasks, see :func:`nchw_infer_rows`).
INFER_TASK_BYTES = 64 * 1024

_LOCAL = threading.local()
#: Absent optional vectors: an empty array of x's dtype (so no extra kernel signature).
_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32),
          np.dtype(np.float64): np.empty(0, np.float64)}
_F64 = np.dtype(np.float64)
#: Half storage dtypes -> the integer dtype of the bits view the kernels get; the dtype names
#: the format for Numba (:mod:`nbbn.cpu.kernels`, "Storage codec"): bfloat16 as uint16 (as the
#: cuda kernels see it), float16 as int16. Per-channel outputs and the elementwise arithmetic
#: of a half x are float32 (:func:`nbbn.validate.channel_dtype`).
KERNEL_VIEW = {d: np.dtype(np.int16 if d == np.float16 else np.uint16) for d in HALF_DTYPES}


# ---------------------------------------------------------------------------------------------
# Plans: the shape-only choices of one call, computed once per shape and cached
# ---------------------------------------------------------------------------------------------
class Plan(NamedTuple):
    """What a call of one (op, kernel shape, itemsize, variant) runs: the kernel dispatcher, the
    trailing integer parameters it takes (chunks, lanes, group size, rows per task), the shapes
    of its float64 scratch arrays -- first the op's per-channel ones (forward: mean and variance
    (C,); inference: coefficients (3, C); backward: sums (3, C)), then those that follow the
    parameters -- and the shape of the last scratch argument, in x's arithmetic dtype (the
    elementwise pass's coefficients), if it takes one."""

    kernel: object
    params: tuple
    scratch: tuple
    typed: tuple | None = None


_PLANS: dict[tuple, Plan] = {}


def nc_plan(M: int, C: int, itemsize: int, op: str = "apply") -> tuple[int, int]:
    """(K row chunks, L rows per wide row) of an (M, C) array for ``op`` ("forward",
    "backward" or "apply"): chunks of CHUNK_BYTES[op] and MIN_CHUNK_ROWS; for the ops that sum
    over the rows, two chunks of few rows from SPLIT_FROM_BYTES[op] (MIN_SPLIT_ROWS)."""
    L = -(-WIDE // C) if C < WIDE else 1
    rows = M // L
    K_ = max(1, min(MAX_CHUNKS, rows // MIN_CHUNK_ROWS, (M * C * itemsize) // CHUNK_BYTES[op]))
    split_from = SPLIT_FROM_BYTES.get(op)
    if K_ == 1 and split_from is not None and rows >= 2 * MIN_SPLIT_ROWS \
            and M * C * itemsize >= split_from:
        K_ = 2  # see MIN_SPLIT_ROWS
    if 2 < K_ < 2 * EVEN_BELOW and K_ % 2:
        K_ -= 1  # see EVEN_BELOW
    return K_, L


def nchw_group(N: int, C: int, S: int, itemsize: int) -> int:
    """Channels per group: the group's data fit in GROUP_BYTES, and there are ≥ MIN_GROUPS
    groups when C allows."""
    fit = max(1, GROUP_BYTES // max(1, N * S * itemsize))
    return max(1, min(fit, C // MIN_GROUPS if C >= MIN_GROUPS else 1))


def nchw_infer_rows(N: int, C: int, S: int, itemsize: int) -> int:
    """Rows (n, c) of the (N·C, S) view per NCHW inference task: tasks of at most
    INFER_TASK_BYTES, their count rounded down to even below 2·EVEN_BELOW, the rows spread
    evenly over them. Round 9: 1×2048×7×7 made 7 tasks (4 and 3 on two threads) and
    1×256×14×14 made tasks of 83, 83, 83 and 7 rows (166 and 90 rows per thread)."""
    rows = N * C
    per = max(1, INFER_TASK_BYTES // (S * itemsize))
    tasks = -(-rows // per)
    if 2 < tasks < 2 * EVEN_BELOW and tasks % 2:
        tasks -= 1  # see EVEN_BELOW
    return -(-rows // tasks)


def nchw_split_chunks(N: int, C: int, S: int) -> int:
    m = N * S
    return max(1, min(-(-SPLIT_TASKS // C), m // SPLIT_CHUNK if m >= SPLIT_CHUNK else 1))


def _twin(pair, numel: int, variant: str, family: str, tasks: int = 2):
    """The parallel or the serial dispatcher of a kernel pair; ``tasks``: the parallel loops'
    trip count (one task runs serially under ``auto``, see the module docstring)."""
    if variant == "serial" or (variant == "auto" and (numel <= SERIAL_MAX[family]
                                                      or tasks == 1)):
        return pair[1]
    return pair[0]


def _nchw_split(C: int, variant: str) -> bool:
    if variant in ("grouped", "split"):
        return variant == "split"
    return C < SPLIT_BELOW_C


def _make_plan(op: str, shape: tuple, itemsize: int, variant: str) -> Plan:
    numel = math.prod(shape)
    family = "nc" if len(shape) == 2 else "nchw"

    def pick(pair, tasks):
        return _twin(pair, numel, variant, family, tasks)

    if family == "nc":  # (M, C)
        M, C = shape
        K_, L = nc_plan(M, C, itemsize, op)
        W = L * C
        if op == "forward":
            return Plan(pick(K.NC_FORWARD, K_), (K_, L), ((C,), (C,), (K_, 2, W), (W,)), (5, W))
        if op == "apply":
            return Plan(pick(K.NC_INFER, K_), (K_, L), ((3, C),), (5, W))
        return Plan(pick(K.NC_BACKWARD, K_), (K_, L), ((3, C), (K_, 3, W), (W,)), (5, W))
    N, C, S = shape
    if op == "apply":
        R = nchw_infer_rows(N, C, S, itemsize)
        return Plan(pick(K.NCHW_INFER, -(-N * C // R)), (R,), ((3, C),), (5, C))
    if _nchw_split(C, variant):
        K_ = nchw_split_chunks(N, C, S)
        if op == "forward":
            return Plan(pick(K.NCHW_FORWARD_SPLIT, C * K_), (K_,), ((C,), (C,), (C, K_, 2), (C,)),
                        (5, C))
        return Plan(pick(K.NCHW_BACKWARD_SPLIT, C * K_), (K_,), ((3, C), (C, K_, 3)), (5, C))
    G = nchw_group(N, C, S, itemsize)
    if op == "forward":
        return Plan(pick(K.NCHW_FORWARD_GROUPED, -(-C // G)), (G,), ((C,), (C,)))
    return Plan(pick(K.NCHW_BACKWARD_GROUPED, -(-C // G)), (G,), ((3, C),))


def plan(op: str, shape: tuple, itemsize: int, variant: str) -> Plan:
    """The cached :class:`Plan` of a call (``op`` is "forward", "apply" or "backward")."""
    key = (op, shape, itemsize, variant)
    p = _PLANS.get(key)
    if p is None:
        p = _PLANS[key] = _make_plan(op, shape, itemsize, variant)
    return p


# ---------------------------------------------------------------------------------------------
# Scratch: one float64 buffer per thread, carved into the arrays a plan needs
# ---------------------------------------------------------------------------------------------
def _scratch(n: int) -> np.ndarray:
    """A float64 buffer of at least n values, owned by this thread and reused across calls."""
    buf = getattr(_LOCAL, "buf", None)
    if buf is None or buf.size < n:
        buf = np.empty(max(n, 2 * (0 if buf is None else buf.size)))
        _LOCAL.buf = buf
        _LOCAL.views = {}  # views of the old buffer are dropped with it
    return buf


def _carve(p: Plan, dtype) -> tuple:
    """A plan's scratch arrays, this thread's: disjoint float64 arrays of the shapes
    ``p.scratch`` from the thread's buffer, then, when the plan has one, an array of shape
    ``p.typed`` and ``dtype`` (x's arithmetic dtype). The set is cached per (plan, dtype): one
    dict lookup per call."""
    key = (id(p), dtype)  # the entry holds p: the id is p's while the entry lives
    views = getattr(_LOCAL, "views", None)
    if views is not None:
        got = views.get(key)
        if got is not None:
            return got[1]
    sizes = [math.prod(s) for s in p.scratch]
    buf = _scratch(sum(sizes))
    out, o = [], 0
    for shape, n in zip(p.scratch, sizes, strict=True):
        out.append(buf[o:o + n].reshape(shape))
        o += n
    if p.typed is not None:
        out.append(np.empty(p.typed, dtype))
    out = tuple(out)
    _LOCAL.views[key] = (p, out)
    return out


# ---------------------------------------------------------------------------------------------
# Arrays in, arrays out
# ---------------------------------------------------------------------------------------------
def _host(a, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"backend 'cpu' takes NumPy arrays; {name} is {type(a).__name__} "
                        "(use backend='cuda' for device arrays)")
    return a


def _kview(a, geom, name: str) -> np.ndarray:
    """The kernels' C-contiguous view of an x-shaped array (:func:`_layout_view`), a half array
    as its bits (:func:`_bits`)."""
    return _bits(_layout_view(a, geom, name))


def _bits(a: np.ndarray) -> np.ndarray:
    """A half array as the kernels index it: its raw bits, viewed as the integer dtype that
    names the format (:data:`KERNEL_VIEW`); any other array as it is. No copy."""
    view = KERNEL_VIEW.get(a.dtype)
    return a if view is None else a.view(view)


def _layout_view(a, geom, name: str) -> np.ndarray:
    """The kernels' C-contiguous view of an x-shaped array: no copy when it is laid out as the
    kernels need (x's memory layout), one copy otherwise."""
    if type(a) is not np.ndarray:
        _host(a, name)
    if geom.identity_perm:
        if geom.layout is Layout.NC and len(geom.shape) == 2:
            return a if a.flags.c_contiguous else np.ascontiguousarray(a)
    else:
        a = a.transpose(geom.perm)
    if not a.flags.c_contiguous:
        a = np.ascontiguousarray(a)
    return a.reshape(geom.kernel_shape)


def _alloc(geom, out):
    """(array returned to the caller, kernel view) of an x-shaped output in x's memory layout;
    ``out`` is a validated preallocated array or None. A new one comes from :mod:`nbbn.pool`
    (a big buffer an earlier call returned and its caller dropped, else ``np.empty``)."""
    if out is None:
        if geom.identity_perm:
            buf = pool.empty(geom.shape, geom.dtype)
            if len(geom.shape) == 2:
                return buf, buf
            return buf, buf.reshape(geom.kernel_shape)
        buf = pool.empty(geom.memory_shape, geom.dtype)
        return buf.transpose(inverse_perm(geom.perm)), buf.reshape(geom.kernel_shape)
    buf = out if geom.identity_perm else out.transpose(geom.perm)
    if buf.shape == geom.kernel_shape:  # NC: out itself
        return out, buf
    view = buf.reshape(geom.kernel_shape)
    if not np.shares_memory(view, out):  # validation guarantees a view; never write a copy
        raise AssertionError("out= array could not be viewed without a copy")
    return out, view


def _out(geom, out):
    """:func:`_alloc`, with the kernel view as the kernels index it (:func:`_bits`)."""
    user, view = _alloc(geom, out)
    return user, _bits(view)


def _vector_dtype(dt, *vectors) -> np.dtype:
    """The one dtype every per-channel input of a call reaches the kernels in: x's when every
    given vector has it (the usual case: nothing converted), else float64, which holds a float32
    value exactly. The kernels widen what they read to float64 either way, so results do not
    depend on it; but each combination of argument types is a Numba specialization that costs
    seconds to compile, and this keeps them at two per kernel and x dtype instead of one per mix
    of vector dtypes."""
    for v in vectors:
        if v is not None and v.dtype != dt:
            return _F64
    return dt


def _vec(v, name: str, dtype) -> np.ndarray:
    """A per-channel input as a contiguous writeable array of the call's vector dtype (see
    :func:`_vector_dtype`); an empty one when absent."""
    if v is None:
        return _EMPTY[dtype]
    if type(v) is not np.ndarray:
        _host(v, name)
    if v.dtype != dtype or not v.flags.carray:
        v = np.array(v, dtype=dtype)  # one kernel argument type: contiguous, writeable
    return v


def _vecs(dt, vectors: tuple, names: tuple):
    """The per-channel inputs ``vectors`` (called ``names``) as the kernels take them: each
    :func:`_vec`'s in :func:`_vector_dtype`'s dtype. The usual case -- every given vector
    a C-contiguous writeable NumPy array of ``dt`` itself -- is one loop of identity tests that
    returns the vectors as they are: function calls and attribute reads are most of a small
    call's Python time (round 10: 1.6 µs for four vectors before, 0.7 after)."""
    absent = 0
    for v in vectors:
        if v is None:
            absent += 1
        elif type(v) is not np.ndarray or v.dtype is not dt or not v.flags.carray:
            break  # carray: C-contiguous, aligned and writeable, as the kernels are typed
    else:
        if not absent:
            return vectors
        empty = _EMPTY[dt]
        return [empty if v is None else v for v in vectors]
    vd = _vector_dtype(dt, *vectors)
    return [_vec(v, n, vd) for v, n in zip(vectors, names, strict=True)]


class _Alias:
    """An array interface holder (see :func:`_input`)."""

    __slots__ = ("__array_interface__", "_of")


def _input(a, geom, name: str) -> np.ndarray:
    """An x-shaped input as the kernels read it: :func:`_kview`, typed writeable. The kernels
    are compiled for writeable arrays only, so that a read-only x or dy compiles no second
    specialization, and they never write an input: a read-only one reaches them as a writeable
    alias of its own memory, no copy (a view made read-only, typed as such, cost each call ~0.5
    µs to make and Numba's dispatcher its slow path; round 9). The common case, a C-contiguous
    writeable float32/float64 array in x's memory layout, is tested first."""
    if type(a) is np.ndarray and geom.identity_perm and a.dtype is geom.dtype:
        f = a.flags
        if f.c_contiguous and f.writeable and a.dtype.char in "fd":
            return a if len(geom.shape) == 2 else a.reshape(geom.kernel_shape)
    v = _kview(a, geom, name)
    if v.flags.writeable:
        return v
    alias = _Alias()
    iface = dict(v.__array_interface__)
    iface["data"] = (iface["data"][0], False)  # (address, read-only flag)
    alias.__array_interface__ = iface
    alias._of = v  # keeps the memory alive as long as the alias
    return np.asarray(alias)


def _vectors(geom, out):
    """The two per-channel outputs (x's dtype), preallocated or new."""
    if out is None:
        return np.empty(geom.C, geom.dtype), np.empty(geom.C, geom.dtype)
    return out[1], out[2]


def _channel_vectors(geom, out, dt):
    """The two per-channel outputs in the per-channel dtype ``dt`` (float32 for a half x: not
    x's dtype, which :func:`_vectors` allocates), preallocated or new."""
    if out is None and dt != geom.dtype:
        return np.empty(geom.C, dt), np.empty(geom.C, dt)
    return _vectors(geom, out)


def _flags(args) -> int:
    f = 0
    if args.gamma is not None:
        f |= K.HAS_GAMMA
    if getattr(args, "beta", None) is not None:
        f |= K.HAS_BETA
    if args.relu:
        f |= K.RELU
    if getattr(args, "residual", None) is not None:
        f |= K.RESIDUAL
    return f


# ---------------------------------------------------------------------------------------------
# The three ops
# ---------------------------------------------------------------------------------------------
def _run(call):
    """Run a prepared call, ``(kernel, kernel arguments, result, after or None)``: the kernel,
    then ``after()`` (copies converted running statistics back); returns the result. (A plain
    tuple: a NamedTuple's construction cost ~0.3 µs a call, round 7.)"""
    kernel, kargs, result, after = call
    kernel(*kargs)
    if after is not None:
        after()
    return result


def _own(p: Plan, dtype) -> tuple:
    """:func:`_carve`'s arrays, new: a bound call's own (:func:`bind`)."""
    own = tuple(np.empty(s) for s in p.scratch)
    return own if p.typed is None else (*own, np.empty(p.typed, dtype))


_TRAIN_VECS = ("gamma", "beta", "running_mean", "running_var")
_INFER_VECS = ("running_mean", "running_var", "gamma", "beta")
_BACKWARD_VECS = ("save_mean", "save_invstd", "gamma")


def _prep_forward(args, variant: str, *, stats_only=False, scratch=_carve):
    """Forward-train, prepared; result (y_user, save_mean, save_invstd, mean64, var64) -- the
    last two are scratch (the thread's unless ``scratch`` says otherwise): copy them to keep
    them."""
    geom = args.geom
    dt = channel_dtype(geom.dtype)  # per-channel outputs and elementwise arithmetic
    rm_user, rv_user = args.running_mean, args.running_var
    gamma, beta, rm, rv = _vecs(dt, (args.gamma, args.beta, rm_user, rv_user), _TRAIN_VECS)
    x = _input(args.x, geom, "x")
    flags = _flags(args)
    if stats_only:  # y is never written: an untouched allocation keeps the kernel's types
        flags = (flags | K.STATS_ONLY) & ~(K.RELU | K.RESIDUAL)
        y_user, y = None, np.empty(x.shape, x.dtype)
        save_mean = save_invstd = np.empty(geom.C, dt)
    else:
        y_user, y = _out(geom, None if args.out is None else args.out[0])
        save_mean, save_invstd = _channel_vectors(geom, args.out, dt)
    res = y if args.residual is None else _input(args.residual, geom, "residual")
    after = None
    if rm_user is not None and not stats_only:
        flags |= K.HAS_RUNNING
        if rm is not rm_user or rv is not rv_user:  # converted copies (_vec): written back
            def after():
                rm_user[...] = rm
                rv_user[...] = rv
    p = plan("forward", x.shape, x.itemsize, variant)
    mean64, var64, *scr = scratch(p, dt)
    return (p.kernel, (x, y, res, gamma, beta, rm, rv, save_mean, save_invstd, mean64, var64,
                       flags, args.eps, args.momentum, *p.params, *scr),
            (y_user, save_mean, save_invstd, mean64, var64), after)


def _forward(args, variant: str, *, stats_only=False):
    """Run forward-train; returns :func:`_prep_forward`'s result."""
    return _run(_prep_forward(args, variant, stats_only=stats_only))


def forward_train(args, variant: str = "auto"):
    y, save_mean, save_invstd, _, _ = _forward(args, variant)
    return y, save_mean, save_invstd


def _prep_apply(args, variant: str, coef_given=None, scratch=_carve):
    """y = (x − c0)·c1 + c2 (+ residual, ReLU), prepared: inference with the population
    statistics, or with ``coef_given`` (3, C) float64; result (y_user,)."""
    geom = args.geom
    dt = channel_dtype(geom.dtype)  # per-channel outputs and elementwise arithmetic
    x = _input(args.x, geom, "x")
    flags = _flags(args)
    y_user, y = _out(geom, args.out if not isinstance(args.out, tuple) else args.out[0])
    res = y if args.residual is None else _input(args.residual, geom, "residual")
    p = plan("apply", x.shape, x.itemsize, variant)
    coef, t = scratch(p, dt)
    if coef_given is not None:
        flags |= K.COEF_GIVEN
        coef[...] = coef_given
        rm = rv = gamma = beta = _EMPTY[dt]
    else:
        rm, rv, gamma, beta = _vecs(dt, (args.running_mean, args.running_var, args.gamma,
                                         args.beta), _INFER_VECS)
    return (p.kernel, (x, y, res, rm, rv, gamma, beta, coef, t, flags,
                       args.eps, *p.params), (y_user,), None)


def _apply(args, variant: str, coef_given=None):
    """Run :func:`_prep_apply`; returns y_user."""
    return _run(_prep_apply(args, variant, coef_given))[0]


def inference(args, variant: str = "auto"):
    return (_apply(args, variant),)


def _prep_backward(args, variant: str, *, sums=None, sums_only=False, m_total=None, fold=True,
                   scratch=_carve):
    """Backward, prepared; result (dx_user, dgamma, dbeta, dz_user or None, sums (3, C)); sums
    not given are scratch, as :func:`_prep_forward`'s mean64 and var64: copy them to keep them."""
    geom = args.geom
    dt = channel_dtype(geom.dtype)  # per-channel outputs and elementwise arithmetic
    x = _input(args.x, geom, "x")
    dy = _input(args.dy, geom, "dy")
    flags = _flags(args)
    relu = args.relu
    yv = _input(args.y, geom, "y") if relu else x
    out = args.out
    if sums_only:  # dx is never written (untouched allocation, see _forward)
        dx_user, dx = None, np.empty(x.shape, x.dtype)
    else:
        dx_user, dx = _out(geom, None if out is None else out[0])
    dz_user, dz = None, dx
    if relu:
        dz_user, dz = _out(geom, None if out is None else out[3])
    if out is None:
        dgamma, dbeta = np.empty(geom.C, dt), np.empty(geom.C, dt)
    else:
        dgamma, dbeta = out[1], out[2]
    precision = fold_precision(args.save_mean.dtype, dt)
    save_mean, save_invstd, gamma = _vecs(dt, (args.save_mean, args.save_invstd, args.gamma),
                                          _BACKWARD_VECS)
    p = plan("backward", x.shape, x.itemsize, variant)
    own_sums, *scr = scratch(p, dt)
    if sums is None:
        sums = own_sums
    else:  # the given sums replace the scratch ones
        flags |= K.COEF_GIVEN
    if sums_only:
        flags |= K.SUMS_ONLY
    if fold:
        flags |= K.FOLD
    m = float(geom.m if m_total is None else m_total)
    return (p.kernel, (dy, x, yv, dx, dz, save_mean, save_invstd, gamma, dgamma, dbeta, sums,
                       flags, m, precision, *p.params, *scr),
            (dx_user, dgamma, dbeta, dz_user, sums), None)


def _backward(args, variant: str, *, sums=None, sums_only=False, m_total=None, fold=True):
    """Run backward; returns (dx_user, dgamma, dbeta, dz_user or None, sums (3, C))."""
    return _run(_prep_backward(args, variant, sums=sums, sums_only=sums_only, m_total=m_total,
                               fold=fold))


def backward(args, variant: str = "auto"):
    dx, dgamma, dbeta, dz, _ = _backward(args, variant)
    return (dx, dgamma, dbeta, dz) if args.relu else (dx, dgamma, dbeta)


# ---------------------------------------------------------------------------------------------
# Statistics and parts (nbbn.distributed, the accuracy study)
# ---------------------------------------------------------------------------------------------
def batch_stats(x, channel_axis=1) -> tuple[np.ndarray, np.ndarray]:
    """(μ, σ²_biased) per channel in float64, by the forward kernel's own statistics code."""
    from ..validate import train_args

    args = train_args(x, None, None, 1e-5, None, None, 0.0, None, channel_axis, min_m=1)
    _, _, _, mean, var = _forward(args, "auto", stats_only=True)
    return mean.copy(), var.copy()


def part_stats(args):
    _, _, _, mean, var = _forward(args, "auto", stats_only=True)
    return mean.copy(), var * args.geom.m


def part_normalize(args, mean, var, m_total):
    """The forward's normalization with given (global) statistics; running update with the
    unbiased var·m_total/(m_total − 1)."""
    geom = args.geom
    mean = np.asarray(mean, dtype=np.float64)
    var = np.asarray(var, dtype=np.float64)
    invstd = 1.0 / np.sqrt(var + args.eps)
    gamma = 1.0 if args.gamma is None else np.asarray(args.gamma, dtype=np.float64)
    beta = 0.0 if args.beta is None else np.asarray(args.beta, dtype=np.float64)
    coef = np.empty((3, geom.C))
    coef[0] = mean
    coef[1] = gamma * invstd
    coef[2] = beta
    y = _apply(args, "auto", coef_given=coef)
    save_mean, save_invstd = _channel_vectors(geom, args.out, channel_dtype(geom.dtype))
    save_mean[...] = mean
    save_invstd[...] = invstd
    if args.running_mean is not None:
        mo = args.momentum
        rm, rv = args.running_mean, args.running_var
        rm[...] = (1.0 - mo) * rm.astype(np.float64) + mo * mean
        rv[...] = (1.0 - mo) * rv.astype(np.float64) + mo * var * (m_total / (m_total - 1.0))
    return y, save_mean, save_invstd


def part_grad_sums(args):
    *_, sums = _backward(args, "auto", sums_only=True, fold=False)
    return sums[0].copy(), sums[1].copy(), sums[2].copy()


def part_grad_apply(args, sum_dy, sum_dy_xmu, m_total, sum_xmu=None):
    sums = np.zeros((3, args.geom.C))
    sums[0] = sum_dy
    sums[1] = sum_dy_xmu
    if sum_xmu is not None:
        sums[2] = sum_xmu
    dx, dgamma, dbeta, _, _ = _backward(args, "auto", sums=sums, m_total=m_total,
                                        fold=sum_xmu is not None)
    return dx, dgamma, dbeta


# ---------------------------------------------------------------------------------------------
# Compiling ahead of the first call
# ---------------------------------------------------------------------------------------------
def precompile(dtypes=(np.float32, np.float64), *, mixed: bool = True,
               layouts=(Layout.NC, Layout.NCHW), ops=tuple(Op), variants=None) -> int:
    """Compile every kernel specialization this backend calls for x of ``dtypes``, or load it
    from Numba's on-disk cache: each op × layout family × variant's dispatchers (the parallel
    kernel and its serial twin; NCHW's serial variant reaches both serial twins, the split one
    below SPLIT_BELOW_C channels and the grouped one from there), with the per-channel vectors
    in x's per-channel dtype (x's own; float32 for a half x) and, with ``mixed``, in float64
    too (a call whose vectors are not all of that dtype, :func:`_vector_dtype`). Fusion,
    channel axis, strides and read-only inputs need no other (they are flags, or canonicalized
    here). ``dtypes`` may name float16 and bfloat16 (:data:`nbbn.validate.STORAGE_DTYPES`):
    each is a specialization set of its own. ``variants`` keeps only the named registry
    variants (None: all). NHWC runs the NC kernels.

    A service calls it once at start-up so that no request pays seconds of compilation. Two
    processes may call it at once only for disjoint ``layouts``/``ops`` (disjoint kernel
    functions): Numba saves a function's cache index by an unlocked read-modify-write, and two
    processes saving one function's index together lose an entry (``tests/conftest.py``
    splits its warm-up that way). Returns the number of kernel calls made."""
    calls = 0
    for dt in map(np.dtype, dtypes):
        cd = channel_dtype(dt)
        for vd in dict.fromkeys((cd, _F64) if mixed else (cd,)):
            for layout in layouts:
                for variant in _VARIANTS[layout]:
                    if variant == "auto" or (variants is not None and variant not in variants):
                        continue
                    chans = (3,) if layout is Layout.NC or variant != "serial" \
                        else (3, SPLIT_BELOW_C)
                    for C in chans:
                        shape = (4, C) if layout is Layout.NC else (2, C, 4)
                        x = np.linspace(-1.0, 1.0, math.prod(shape)).reshape(shape).astype(dt)
                        g, b = np.ones(C, vd), np.zeros(C, vd)
                        for op in ops:
                            _precompile_call(op, layout, variant, x, g, b)
                            calls += 1
    return calls


def _precompile_call(op, layout, variant, x, g, b):
    from .. import validate

    fn = registry.select("cpu", op, layout, variant).fn
    if op is Op.FORWARD_TRAIN:
        fn(validate.train_args(x, g, b, 1e-5, g.copy(), g.copy(), 0.1, None, 1))
    elif op is Op.INFERENCE:
        fn(validate.infer_args(x, b, g, g, b, 1e-5, None, 1))
    else:
        fn(validate.backward_args(x, x, b, g, g, None, 1))


# ---------------------------------------------------------------------------------------------
# Registration
# ---------------------------------------------------------------------------------------------
_DESCRIPTIONS = {
    Op.FORWARD_TRAIN: "float64 shifted-sum statistics in fixed chunks, then y = (x − μ)·α + β",
    Op.BACKWARD: "float64 sums of g, g·(x − μ̃), x − μ̃ (rounded-mean fold), then dx",
    Op.INFERENCE: "folded y = α·x + β' in float64",
}
_FUNCTIONS = {Op.FORWARD_TRAIN: forward_train, Op.BACKWARD: backward, Op.INFERENCE: inference}
_VARIANTS = {
    Layout.NC: {"auto": "shape picks serial or rows", "rows": "K row chunks, 2 regions",
                "serial": "one thread, no parallel region"},
    Layout.NHWC: {"auto": "shape picks serial or rows", "rows": "K row chunks, 2 regions",
                  "serial": "one thread, no parallel region"},
    Layout.NCHW: {"auto": "shape picks serial, split or grouped",
                  "grouped": "a task per channel group, 1 region",
                  "split": "tasks (channel, chunk of positions), 2 regions",
                  "serial": "one thread, no parallel region"},
}


def _bind(fn, variant):
    if variant == "auto":
        return fn
    return lambda args: fn(args, variant)


#: Per op: (prepare with the call's own scratch, the public result from the prepared one's,
#: the kernel arguments that are the caller's x-shaped inputs, and its per-channel ones).
_PREPARED = {
    Op.FORWARD_TRAIN: (lambda a, v: _prep_forward(a, v, scratch=_own),
                       lambda r, a: r[:3], (0, 2), (3, 4, 5, 6)),
    Op.INFERENCE: (lambda a, v: _prep_apply(a, v, scratch=_own),
                   lambda r, a: r[:1], (0, 2), (3, 4, 5, 6)),
    Op.BACKWARD: (lambda a, v: _prep_backward(a, v, scratch=_own),
                  lambda r, a: r[:4] if a.relu else r[:3], (0, 1, 2), (5, 6, 7)),
}
_INPUTS = {Op.FORWARD_TRAIN: (("x", "residual"), ("gamma", "beta", "running_mean",
                                                  "running_var")),
           Op.INFERENCE: (("x", "residual"), ("running_mean", "running_var", "gamma", "beta")),
           Op.BACKWARD: (("dy", "x", "y"), ("save_mean", "save_invstd", "gamma"))}


def _binder(op: Op, variant: str):
    """The registry's ``bind`` of (op, variant): :func:`nbbn.bind`'s cpu call. Everything a
    call derives from its bundle -- the kernels' views of the arrays, the flags, the plan, the
    per-channel vectors in the kernels' dtype -- is derived once, with scratch of the bound
    call's own (so two bound calls may run in two threads), and the call is the kernel alone:
    round 7 measured ~5 µs of a 10 µs NC 64×256 inference in that derivation. Where the
    derivation had to copy an input (a layout the kernels cannot view, a vector of another
    dtype or strided) the copy would go stale, so such a bundle gets the unbound call."""
    prepare, public, x_like, vectors = _PREPARED[op]
    x_names, v_names = _INPUTS[op]
    unbound = _bind(_FUNCTIONS[op], variant)

    def bind(args):
        if args.out is None:
            raise ValueError("a bound call needs preallocated outputs (out=)")
        kernel, kargs, result, after = prepare(args, variant)
        users = [getattr(args, n, None) for n in x_names]
        if op is Op.BACKWARD and not args.relu:
            users[2] = None  # y is not read (x stands in)
        ok = after is None and all(
            u is None or np.shares_memory(kargs[i], u)
            for i, u in zip(x_like, users, strict=True))
        ok = ok and all(getattr(args, n) is None or kargs[i] is getattr(args, n)
                        for i, n in zip(vectors, v_names, strict=True))
        if not ok:
            def prepared_each_time():
                return unbound(args)
            prepared_each_time.prepared = False
            return prepared_each_time
        result = public(result, args)

        def bound():
            kernel(*kargs)
            return result
        bound.prepared = True  # (tests read which of the two a bundle got)
        return bound
    return bind


for _op, _fn in _FUNCTIONS.items():
    for _layout, _names in _VARIANTS.items():
        for _variant, _how in _names.items():
            registry.register(registry.KernelSpec(
                "cpu", _op, _layout, _bind(_fn, _variant), f"{_DESCRIPTIONS[_op]} ({_how})",
                variant=_variant, dtypes=STORAGE_DTYPES,
                fusions=(Fusion.NONE, Fusion.RELU) if _op is Op.BACKWARD else tuple(Fusion),
                bind=_binder(_op, _variant)))
registry.register_stats("cpu", batch_stats)
registry.register_parts("cpu", registry.Parts(part_stats, part_normalize, part_grad_sums,
                                              part_grad_apply))
