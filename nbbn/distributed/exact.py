"""Exact, tree-independent sums over MPI: a binned integer accumulator and its reduction op.

Why. MPI leaves the grouping of a reduction to the library: "the operation is assumed to be
associative" (MPI 4.1, §6.9.1; a user operation declared non-commutative keeps the rank *order*,
but the library may still group ``(a∘b)∘c`` or ``a∘(b∘c)``, §6.9.5). Floating-point sums and
Chan merges are not associative bit for bit, so their result can depend on the reduction tree
(Open MPI's ``coll_tuned_allreduce_algorithm``: linear, recursive doubling, ring, ...). Integer
addition is associative; so we turn every float64 partial into integers on one fixed grid and
add integers.

The format (one *row* per accumulated quantity, ``K + 1`` int64)::

    row = [idx, limb_0, limb_1, ..., limb_{K-1}],   value = Σ_j limb_j · 2^(32·(idx − j) − BIAS)

Bins are 32 bits wide on an absolute grid (bin b holds bits 32·b … 32·b + 31 of the value scaled
by 2^BIAS); ``idx`` is the highest bin a row keeps and limb j holds bin idx − j, *unnormalized*
(a signed int64 sum of 32-bit chunks; no carries, so adding is plain integer addition). A float64
v = mant·2^e (53-bit mant) spans at most three bins, so :func:`deposit` splits it into three
exact chunks. The combine of two rows (:func:`combine_rows`) takes idx = max(idx_a, idx_b),
shifts each row's limbs down to that idx (limbs falling below bin idx − K + 1 are dropped) and
adds. Any tree of combines over the same inputs gives ``(G, Σ_inputs Σ_{chunks in bins
G−K+1 … G} chunk)`` with G the largest idx of any input: max and integer + are associative and
commutative, and a chunk is dropped iff its bin is below G − K + 1, whichever combine drops it.
So the result's bits do not depend on the tree, the rank order or the segmenting (ReproBLAS's
binned summation, Demmel & Nguyen 2015, with exact integer bins instead of float bins).

Accuracy: exact except the chunks below the window, < 2^(32·(G−K+1)) per input chunk, i.e. a
relative error below P·T·2^(−32·(K−1)) of the largest input (T terms per rank); K = 4 keeps ≥ 96
bits below the top bin. Headroom: one chunk < 2^32; T ≤ 5 terms per rank add < 2^35 to a limb,
so P < 2^28 ranks cannot overflow int64.

Header fields ride in rows too: a row ``[v, 0, …]`` combines to ``[max v, 0, …]`` (MAX, and MIN
as −MAX(−v)), and a row ``[0, n, 0, …]`` combines to ``[0, Σn, 0, …]`` (SUM). So one commutative
user operation on one derived datatype (a row) carries the header and the data, and MPI may
split the buffer into segments anywhere between rows.

Non-finite inputs: a row with a NaN or ±inf term gets idx = NONFINITE, which wins every max and
decodes to NaN (the sign of an infinity is not kept).
"""

from __future__ import annotations

import numpy as np

#: Limbs per row (window of K·32 bits).
K = 4
ROW = K + 1
#: 2^BIAS scales the smallest subnormal's mantissa LSB to a non-negative bit position.
BIAS = 1130
NONFINITE = 1 << 40
EMPTY = -1
_M32 = np.uint64(0xFFFFFFFF)


def deposit(terms) -> np.ndarray:
    """Rows holding Σ_t terms[t, r] exactly (within the window), for each r.

    ``terms``: (T, R) float64 (T terms per row). Returns (R, ROW) int64. idx = the highest bin
    of any nonzero term (EMPTY when all are zero)."""
    v = np.atleast_2d(np.asarray(terms, dtype=np.float64))
    T, R = v.shape
    rows = np.zeros((R, ROW), np.int64)
    finite = np.isfinite(v)
    bad = ~finite.all(axis=0)
    v = np.where(finite, v, 0.0)
    nz = v != 0
    f, e = np.frexp(np.abs(v))
    mant = (f * 2.0 ** 53).astype(np.uint64)  # v = mant · 2^(e − 53), exactly
    p = (e.astype(np.int64) - 53 + BIAS)  # bit position of mant's LSB on the grid
    b = p // 32
    s = (p % 32).astype(np.uint64)
    top = np.where(nz, b + 2, EMPTY)
    idx = top.max(axis=0)
    rows[:, 0] = idx
    sign = np.where(v < 0, -1, 1).astype(np.int64)
    hi = mant >> (np.uint64(32) - s)
    # (3, T, R): the chunks of bins b, b+1, b+2 (signed), and the limb each lands in
    chunks = np.stack([(mant << s) & _M32, hi & _M32, hi >> np.uint64(32)]).astype(np.int64)
    chunks *= sign * nz
    j = idx - (b + np.arange(3)[:, None, None])
    for limb in range(K):
        rows[:, 1 + limb] = np.where(j == limb, chunks, 0).sum(axis=(0, 1))
    rows[bad, 0] = NONFINITE
    rows[bad, 1:] = 0
    return rows


def _shifted(limbs: np.ndarray, d: np.ndarray) -> np.ndarray:
    """limbs moved down by d bins (limb j → j + d), those past K dropped; d outside [0, K]
    (including int64 wrap-around of header rows, whose limbs are 0) drops everything."""
    d = np.where((d < 0) | (d > K), K, d)
    jj = np.arange(K)[None, :] - d[:, None]
    out = np.take_along_axis(limbs, np.clip(jj, 0, K - 1), axis=1)
    out[jj < 0] = 0
    return out


def combine_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out ← a ∘ b, row by row (out may be b): idx = max, limbs aligned to it and added."""
    ia, ib = a[:, 0], b[:, 0]
    moved = np.flatnonzero(ia != ib)  # rows whose windows differ: usually few or none
    a_moved, b_moved = a[moved], b[moved]  # copies, before out (maybe b) is written
    np.add(a[:, 1:], b[:, 1:], out=out[:, 1:])  # rows with one idx: plain integer addition
    out[:, 0] = np.maximum(ia, ib)
    if moved.size:
        a, b = a_moved, b_moved
        ia, ib = a[:, 0], b[:, 0]
        idx = np.maximum(ia, ib)
        with np.errstate(over="ignore"):
            out[moved, 1:] = _shifted(a[:, 1:], idx - ia) + _shifted(b[:, 1:], idx - ib)


def _user_op(inmem, inoutmem, datatype) -> None:
    a = np.frombuffer(inmem, dtype=np.int64).reshape(-1, ROW)
    b = np.frombuffer(inoutmem, dtype=np.int64).reshape(-1, ROW)
    combine_rows(a, b, b)


_MPI_OBJECTS: dict = {}


def mpi_op_and_type():
    """(op, datatype): the commutative user op over rows and the row datatype (ROW int64)."""
    if not _MPI_OBJECTS:
        from mpi4py import MPI

        _MPI_OBJECTS["type"] = MPI.INT64_T.Create_contiguous(ROW).Commit()
        _MPI_OBJECTS["op"] = MPI.Op.Create(_user_op, commute=True)
    return _MPI_OBJECTS["op"], _MPI_OBJECTS["type"]


def exact_ints(rows: np.ndarray) -> list[tuple[int, int] | None]:
    """Each row as (I, E) with value = I·2^E exactly (Python ints), or None (non-finite)."""
    out = []
    for row in rows.tolist():
        idx = row[0]
        if idx >= NONFINITE:
            out.append(None)
            continue
        i = 0
        for limb in row[1:]:
            i = (i << 32) + limb
        out.append((i, 32 * (idx - K + 1) - BIAS))
    return out


def to_float(rows: np.ndarray) -> np.ndarray:
    """Each row's exact value, correctly rounded to float64 (NaN for non-finite)."""
    return np.array([np.nan if ie is None else _ratio(ie[0], ie[1], 1)
                     for ie in exact_ints(rows)])


def _ratio(i: int, e: int, den: int) -> float:
    """i·2^e / den correctly rounded (Python's int true division rounds correctly)."""
    if i == 0:
        return 0.0
    if e >= 0:
        return (i << e) / den
    return i / (den << -e)


def mean_var(s1_rows: np.ndarray, s2_rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel μ = S1/n and σ² = (S2 − S1²/n)/n from exact S1 = Σ n_r·μ_r and
    S2 = Σ (M2_r + n_r·μ_r²), each correctly rounded once from the exact rational (so the
    cancellation in S2 − S1²/n costs nothing: it happens in integers). σ² is clamped at 0 (only
    the dropped bits below the window could make it negative)."""
    mean, var = [], []
    for a, b in zip(exact_ints(s1_rows), exact_ints(s2_rows), strict=True):
        if a is None or b is None:
            mean.append(np.nan)
            var.append(np.nan)
            continue
        (i1, e1), (i2, e2) = a, b
        mean.append(_ratio(i1, e1, n))
        # n·S2 − S1² = (n·i2·2^e2 − i1²·2^(2e1)); at the common exponent em = min(e2, 2e1)
        em = min(e2, 2 * e1)
        num = ((n * i2) << (e2 - em)) - ((i1 * i1) << (2 * e1 - em))
        var.append(max(_ratio(num, em, n * n), 0.0))
    return np.array(mean), np.array(var)


def _two_prod(a, b):
    """(p, e) with p + e = a·b exactly (Veltkamp/Dekker split; |a·b| far from overflow)."""
    p = a * b
    f = 134217729.0  # 2^27 + 1
    t = f * a
    ah = t - (t - a)
    al = a - ah
    t = f * b
    bh = t - (t - b)
    bl = b - bh
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


def forward_terms(count: int, mean: np.ndarray, m2: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A rank's exact terms for S1 = n_r·μ_r (2 terms) and S2 = M2_r + n_r·μ_r² (5 terms),
    from its float64 (n_r, μ_r, M2_r): error-free products, so Σ over ranks of the terms is the
    exact Σ n_r·μ_r and Σ (M2_r + n_r·μ_r²) of the ranks' rounded statistics."""
    n = np.full_like(mean, float(count))
    s1 = _two_prod(n, mean)
    q, qe = _two_prod(mean, mean)
    p1, p2 = _two_prod(n, q)
    e1, e2 = _two_prod(n, qe)
    return np.array(s1), np.array([m2, p1, p2, e1, e2])
