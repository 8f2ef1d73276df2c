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

Overflow: a sum whose correctly rounded value exceeds the float64 range decodes to ±inf.

Implementations. :func:`deposit`, :func:`forward_rows` (a rank's forward terms and their rows in
one pass), :func:`combine_rows` (the body of the MPI user op), :func:`to_float` and
:func:`mean_var` are Numba kernels (``cache=True``, one specialization each). The decoding
kernels round with a small fixed-size big integer (32-bit words in uint64, schoolbook products,
division by the count a word at a time) instead of Python integers; :func:`_mean_var_kernel`
says why that stays exact. :func:`deposit_reference`, :func:`combine_rows_reference`,
:func:`to_float_reference` and :func:`mean_var_reference` are the first implementations (NumPy
and Python integers), kept as the specification: the tests check that both give the same bits,
and :func:`mean_var` falls back to its reference for a count n ≥ 2^32 (the kernel divides by n
one 32-bit word at a time).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

#: Limbs per row (window of K·32 bits).
K = 4
ROW = K + 1
#: 2^BIAS scales the smallest subnormal's mantissa LSB to a non-negative bit position.
BIAS = 1130
NONFINITE = 1 << 40
EMPTY = -1
_M32 = np.uint64(0xFFFFFFFF)


def deposit_reference(terms) -> np.ndarray:
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


def combine_rows_reference(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
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


def to_float_reference(rows: np.ndarray) -> np.ndarray:
    """Each row's exact value, correctly rounded to float64 (NaN for non-finite)."""
    return np.array([np.nan if ie is None else _ratio(ie[0], ie[1], 1)
                     for ie in exact_ints(rows)])


def _ratio(i: int, e: int, den: int) -> float:
    """i·2^e / den correctly rounded (Python's int true division rounds correctly), ±inf past
    the float64 range."""
    if i == 0:
        return 0.0
    try:
        if e >= 0:
            return (i << e) / den
        return i / (den << -e)
    except OverflowError:
        return math.inf if i > 0 else -math.inf  # den > 0


def mean_var_reference(s1_rows: np.ndarray, s2_rows: np.ndarray, n: int
                       ) -> tuple[np.ndarray, np.ndarray]:
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


# ------------------------------------------------------------------------ compiled kernels
#
# Big integers below are little-endian arrays of 32-bit words held in uint64, so a word
# product plus two words fits: (2^32 − 1)² + 2·(2^32 − 1) = 2^64 − 1.

_U32 = np.uint64(0xFFFFFFFF)
_S32 = np.uint64(32)
_ONE = np.uint64(1)
#: Words of one scratch big integer: ≥ the 27 the variance's aligned difference can need.
_W = 40
#: Words of a row's magnitude: 3 words of limbs 1..3 and a 64-bit top (limb 0 + carries).
_MAGW = K + 1
#: Bits between the larger operand's lowest bit and a far smaller operand's highest bit beyond
#: which the smaller one only decides the direction of the rounding (see _signed_sum).
_FAR = 192
#: A dividend is normalized to 129…160 bits (5 words): ≥ 64 quotient bits after ÷ n².
_NORM_BITS = 129
_NORM_WORDS = 5


@njit(cache=True)
def _deposit_row(v, T, rows, r):
    """rows[r] ← the row of Σ v[0:T] (the format of the module docstring): a term
    v = mant·2^(e − 53) (frexp's 53-bit mant) lands in bins b, b + 1, b + 2 of its LSB's bit
    position p = e − 53 + BIAS, b = p // 32; idx = the highest b + 2 of a nonzero term."""
    for j in range(ROW):
        rows[r, j] = 0
    idx = EMPTY
    for t in range(T):
        if not math.isfinite(v[t]):
            rows[r, 0] = NONFINITE
            return
    for t in range(T):
        if v[t] != 0.0:
            b = (math.frexp(v[t])[1] - 53 + BIAS) // 32
            if b + 2 > idx:
                idx = b + 2
    rows[r, 0] = idx
    for t in range(T):
        x = v[t]
        if x == 0.0:
            continue
        f, e = math.frexp(abs(x))
        mant = np.int64(f * 9007199254740992.0)  # f·2^53: exact
        p = e - 53 + BIAS
        b = p // 32
        s = p - 32 * b
        hi = mant >> (32 - s)
        c0 = (mant << s) & 0xFFFFFFFF  # low 32 bits (the shift may wrap past bit 63)
        c1 = hi & 0xFFFFFFFF
        c2 = hi >> 32
        if x < 0:
            c0, c1, c2 = -c0, -c1, -c2
        j = idx - b  # the limb of bin b; bins b + 1, b + 2 go to limbs j − 1, j − 2 ≥ 0
        if j < K:
            rows[r, 1 + j] += c0
        if j - 1 < K:
            rows[r, j] += c1
        if j - 2 < K:
            rows[r, j - 1] += c2


@njit(cache=True)
def _deposit_kernel(terms, rows):
    """rows[r] ← the row of Σ_t terms[t, r]."""
    T, R = terms.shape
    v = np.empty(T)
    for r in range(R):
        for t in range(T):
            v[t] = terms[t, r]
        _deposit_row(v, T, rows, r)


@njit(cache=True)
def _two_prod_kernel(a, b):
    """:func:`_two_prod` on scalars (IEEE operations, no contraction: the same bits)."""
    p = a * b
    t = 134217729.0 * a
    ah = t - (t - a)
    al = a - ah
    t = 134217729.0 * b
    bh = t - (t - b)
    bl = b - bh
    return p, ((ah * bh - p) + ah * bl + al * bh) + al * bl


@njit(cache=True)
def _forward_kernel(count, mean, m2, rows):
    """rows[c] ← S1's terms of channel c, rows[C + c] ← S2's (:func:`forward_terms`)."""
    C = mean.shape[0]
    n = float(count)
    v = np.empty(5)
    for c in range(C):
        mu = mean[c]
        v[0], v[1] = _two_prod_kernel(n, mu)
        _deposit_row(v, np.int64(2), rows, c)
        q, qe = _two_prod_kernel(mu, mu)
        v[0] = m2[c]
        v[1], v[2] = _two_prod_kernel(n, q)
        v[3], v[4] = _two_prod_kernel(n, qe)
        _deposit_row(v, np.int64(5), rows, C + c)


@njit(cache=True)
def _combine_kernel(a, b, out):
    """out ← a ∘ b row by row (out may be a or b): idx = max, each row's limbs moved down by
    d = idx − its idx (int64, wrapping: d outside [0, K] drops them all) and added. Limbs are
    written from the last down, so an aliased input is read before it is overwritten."""
    for r in range(a.shape[0]):
        ia = a[r, 0]
        ib = b[r, 0]
        idx = max(ia, ib)
        da = idx - ia
        db = idx - ib
        if da < 0 or da > K:
            da = K
        if db < 0 or db > K:
            db = K
        for j in range(K - 1, -1, -1):
            v = np.int64(0)
            if j >= da:
                v += a[r, 1 + j - da]
            if j >= db:
                v += b[r, 1 + j - db]
            out[r, 1 + j] = v
        out[r, 0] = idx


@njit(cache=True)
def _magnitude(rows, r, w):
    """The row's integer I = Σ_j limb_j·2^(32·(K − 1 − j)): writes |I| to w[0:_MAGW] (32-bit
    words, little-endian) and returns its sign (−1, 0, 1). Carries run from the lowest limb up
    (arithmetic shifts); if the top comes out negative, the limbs are negated and it runs again."""
    neg = False
    top = np.int64(0)
    for _ in range(2):
        c = np.int64(0)
        for j in range(K - 1, 0, -1):
            t = (-rows[r, 1 + j] if neg else rows[r, 1 + j]) + c
            w[K - 1 - j] = np.uint64(t & 0xFFFFFFFF)
            c = t >> 32
        top = (-rows[r, 1] if neg else rows[r, 1]) + c
        if top >= 0:
            break
        neg = True
    w[K - 1] = np.uint64(top & 0xFFFFFFFF)
    w[K] = np.uint64(top >> 32)
    for i in range(_MAGW):
        if w[i] != 0:
            return -1 if neg else 1
    return 0


@njit(cache=True)
def _nbits(w, n):
    """Bit length of w[0:n]."""
    for i in range(n - 1, -1, -1):
        x = w[i]
        if x != 0:
            k = 1
            for step in (16, 8, 4, 2, 1):  # binary search for the top bit of a 32-bit word
                if x >> np.uint64(step) != 0:
                    x >>= np.uint64(step)
                    k += step
            return 32 * i + k
    return 0


@njit(cache=True)
def _bit(w, n, pos):
    i = pos >> 5
    if i >= n:
        return False
    return (w[i] >> np.uint64(pos & 31)) & _ONE != 0


@njit(cache=True)
def _below(w, n, pos):
    """Whether any bit of w[0:n] below position pos is set."""
    i = pos >> 5
    for k in range(min(i, n)):
        if w[k] != 0:
            return True
    return i < n and (w[i] & ((_ONE << np.uint64(pos & 31)) - _ONE)) != 0


@njit(cache=True)
def _window(w, n, pos):
    """Bits pos … pos + 52 of w[0:n] (bits past the end read as 0), as int64."""
    i = pos >> 5
    sh = pos & 31
    v = np.uint64(0)
    if i < n:
        v = w[i] >> np.uint64(sh)
    if i + 1 < n:
        v |= w[i + 1] << np.uint64(32 - sh)
    if sh > 0 and i + 2 < n:
        v |= w[i + 2] << np.uint64(64 - sh)
    return np.int64(v & np.uint64((1 << 53) - 1))


@njit(cache=True)
def _round(w, n, e, sticky, neg):
    """±(w·2^e + s) rounded to the nearest float64, ties to even, where s = 0 when not sticky
    and 0 < s < 2^e when sticky (the caller keeps enough bits that the rounding position is
    above bit 0 then). The LSB kept is 2^(top − 52), or 2^−1074 below the normal range; past the
    range the result is ±inf (ldexp overflows)."""
    L = _nbits(w, n)
    if L == 0:
        return 0.0
    t = L - 1 + e
    lsb = t - 52 if t >= -1022 else -1074
    drop = lsb - e
    if drop <= 0:
        r = math.ldexp(float(_window(w, n, np.int64(0))), e)
    else:
        m = _window(w, n, drop)
        if _bit(w, n, drop - 1) and (sticky or (m & 1) != 0 or _below(w, n, drop - 1)):
            m += 1
        r = math.ldexp(float(m), lsb)
    return -r if neg else r


@njit(cache=True)
def _mul(a, na, b, nb, out):
    """out[0:na + nb] ← a[0:na]·b[0:nb] (schoolbook); returns na + nb."""
    for i in range(na + nb):
        out[i] = 0
    for i in range(na):
        carry = np.uint64(0)
        ai = a[i]
        for j in range(nb):
            t = ai * b[j] + out[i + j] + carry
            out[i + j] = t & _U32
            carry = t >> _S32
        out[i + nb] = carry
    return na + nb


@njit(cache=True)
def _shl(src, n, s, out):
    """out[0:n + s//32 + 1] ← src[0:n]·2^s; returns that length."""
    ws = s >> 5
    for i in range(n + ws + 1):
        out[i] = 0
    bs = np.uint64(s & 31)
    for i in range(n):
        v = src[i]
        out[i + ws] |= (v << bs) & _U32
        if bs != 0:
            out[i + ws + 1] |= v >> (_S32 - bs)
    return n + ws + 1


@njit(cache=True)
def _add_to(a, b, n, sign):
    """a[0:n] ← a + sign·b (a ≥ b when subtracting; the caller leaves room for a carry)."""
    c = np.int64(0)
    for i in range(n):
        t = np.int64(a[i]) + sign * np.int64(b[i]) + c
        a[i] = np.uint64(t & 0xFFFFFFFF)
        c = t >> 32


@njit(cache=True)
def _compare(a, b, n):
    for i in range(n - 1, -1, -1):
        if a[i] != b[i]:
            return 1 if a[i] > b[i] else -1
    return 0


@njit(cache=True)
def _signed_sum(sa, a, na, ea, sb, b, nb, eb, x, tmp):
    """x·2^ex (+ s) = sa·a·2^ea + sb·b·2^eb; returns (sign, words, ex, sticky), sticky meaning
    0 < s < 2^ex. Exact (sticky False) unless the smaller operand's highest bit lies _FAR bits
    or more below the larger one's lowest: then x = larger·2^_FAR, minus 1 if the signs differ,
    and sticky (the smaller operand is > 0 and < one unit of x's last bit, so the value lies
    strictly between x and x + 1 units)."""
    la = _nbits(a, na)
    lb = _nbits(b, nb)
    na = (la + 31) // 32
    nb = (lb + 31) // 32
    if la == 0:
        sa = 0
    if lb == 0:
        sb = 0
    if sa == 0 and sb == 0:
        return 0, 0, 0, False
    if sb == 0 or (sa != 0 and ea + la >= eb + lb):  # "big": the higher top bit
        big, nbig, ebig, sbig = a, na, ea, sa
        small, nsmall, esmall, ssmall, lsmall = b, nb, eb, sb, lb
    else:
        big, nbig, ebig, sbig = b, nb, eb, sb
        small, nsmall, esmall, ssmall, lsmall = a, na, ea, sa, la
    if ssmall == 0:
        n = _shl(big, nbig, np.int64(0), x)
        return sbig, n, ebig, False
    if esmall + lsmall <= ebig - _FAR:
        n = _shl(big, nbig, np.int64(_FAR), x)
        if ssmall != sbig:
            i = 0
            while x[i] == 0:  # x − 1: borrow through the zero words (x ≥ 2^_FAR)
                x[i] = _U32
                i += 1
            x[i] -= _ONE
        return sbig, n, ebig - _FAR, True
    e0 = min(ebig, esmall)
    nx = _shl(big, nbig, ebig - e0, x)
    nt = _shl(small, nsmall, esmall - e0, tmp)
    n = max(nx, nt)
    for i in range(nx, n):
        x[i] = 0
    for i in range(nt, n):
        tmp[i] = 0
    if sbig == ssmall:
        _add_to(x, tmp, n, np.int64(1))
        return sbig, n, e0, False
    c = _compare(x, tmp, n)
    if c == 0:
        return 0, 0, 0, False
    if c > 0:
        _add_to(x, tmp, n, np.int64(-1))
        return sbig, n, e0, False
    _add_to(tmp, x, n, np.int64(-1))
    for i in range(n):
        x[i] = tmp[i]
    return ssmall, n, e0, False


@njit(cache=True)
def _normalize(x, n, e, sticky, tmp):
    """Bring x[0:n]·2^e to 129…160 bits in x[0:5]: shift up (only when not sticky: exact) or
    drop whole low words into the sticky flag. Returns (e, sticky)."""
    L = _nbits(x, n)
    n = (L + 31) // 32
    if L < _NORM_BITS:
        s = _NORM_BITS - L
        _shl(x, n, s, tmp)  # ≥ 5 words written
        for i in range(_NORM_WORDS):
            x[i] = tmp[i]
        return e - s, sticky
    k = n - _NORM_WORDS
    for i in range(k):
        if x[i] != 0:
            sticky = True
    for i in range(_NORM_WORDS):
        x[i] = x[i + k]
    return e + 32 * k, sticky


@njit(cache=True)
def _divide(x, d):
    """x[0:5] ← x // d (d < 2^32), a word at a time; returns whether the remainder is nonzero.
    floor(floor(X/a)/b) = floor(X/(a·b)), and (X + s)/d with 0 ≤ s < 1 has the same floor: a
    sticky dividend stays sticky, and ÷ n twice is ÷ n²."""
    rem = np.uint64(0)
    for i in range(_NORM_WORDS - 1, -1, -1):
        cur = (rem << _S32) | x[i]
        q = cur // d
        rem = cur - q * d
        x[i] = q
    return rem != 0


@njit(cache=True)
def _to_float_kernel(rows, out):
    """out[r] ← row r's value I·2^(32·(idx − K + 1) − BIAS), correctly rounded (NaN for
    NONFINITE)."""
    w = np.zeros(_MAGW, np.uint64)
    magw = np.int64(_MAGW)  # non-literal constants (see _mean_var_kernel)
    no = rows.shape[0] < 0  # False
    for r in range(rows.shape[0]):
        idx = rows[r, 0]
        if idx >= NONFINITE:
            out[r] = np.nan
            continue
        s = _magnitude(rows, r, w)
        out[r] = 0.0 if s == 0 else _round(w, magw, 32 * (idx - K + 1) - BIAS, no, s < 0)


@njit(cache=True)
def _mean_var_kernel(r1, r2, n, mean, var):
    """mean[c], var[c] ← μ = S1/n and σ² = max((n·S2 − S1²)/n², 0) from the rows S1 = I1·2^e1,
    S2 = I2·2^e2, each correctly rounded once, as :func:`mean_var_reference` (n < 2^32).

    Exact integers: |I| < 2^159 (5 words); n·|I2| < 2^192, I1² < 2^320. The numerator
    n·I2·2^e2 − I1²·2^(2·e1) is formed exactly when the two operands overlap or lie within _FAR
    bits (< 832 bits aligned), else as the larger with a sticky bit of the right sign
    (:func:`_signed_sum`). A dividend is cut to its top 5 words (lower words → sticky) or shifted
    up to 129 bits, so the quotient by n or n² has ≥ 64 bits: the rounding position lies above
    the remainder, and round-to-nearest-even sees the exact rational's side of every midpoint.
    A negative numerator gives σ² = 0.0, or −0.0 when its quotient rounds to 0 (Python's
    ``max(−0.0, 0.0)`` is −0.0: the reference's bits)."""
    buf = np.zeros((6, _W), np.uint64)
    m1, m2, ba, bb, x, tmp = buf[0], buf[1], buf[2], buf[3], buf[4], buf[5]
    nn = np.zeros(1, np.uint64)
    # non-literal constants, so each helper compiles once (a literal argument specializes it)
    magw, normw = np.int64(_MAGW), np.int64(_NORM_WORDS)
    no = n < 0  # False
    d = np.uint64(n)
    nn[0] = d
    for c in range(r1.shape[0]):
        i1 = r1[c, 0]
        i2 = r2[c, 0]
        if i1 >= NONFINITE or i2 >= NONFINITE:
            mean[c] = np.nan
            var[c] = np.nan
            continue
        e1 = 32 * (i1 - K + 1) - BIAS
        e2 = 32 * (i2 - K + 1) - BIAS
        s1 = _magnitude(r1, c, m1)
        s2 = _magnitude(r2, c, m2)
        if s1 == 0:
            mean[c] = 0.0
        else:
            for i in range(_MAGW):
                x[i] = m1[i]
            e, sticky = _normalize(x, magw, e1, no, tmp)
            sticky = _divide(x, d) or sticky
            mean[c] = _round(x, normw, e, sticky, s1 < 0)
        na = _mul(m2, magw, nn, np.int64(1), ba)
        nb = _mul(m1, magw, m1, magw, bb)
        sign, nx, e, sticky = _signed_sum(s2, ba, na, e2, -1 if s1 != 0 else 0, bb, nb, 2 * e1,
                                          x, tmp)
        if sign == 0:
            var[c] = 0.0
            continue
        e, sticky = _normalize(x, nx, e, sticky, tmp)
        if d < 65536:
            sticky = _divide(x, d * d) or sticky
        else:
            sticky = _divide(x, d) or sticky
            sticky = _divide(x, d) or sticky
        v = _round(x, normw, e, sticky, no)
        var[c] = v if sign > 0 else (-0.0 if v == 0.0 else 0.0)


# ------------------------------------------------------------------------ the public calls


def deposit(terms) -> np.ndarray:
    """Rows holding Σ_t terms[t, r] exactly (within the window), for each r.

    ``terms``: (T, R) float64 (T terms per row). Returns (R, ROW) int64. idx = the highest bin
    of any nonzero term (EMPTY when all are zero; NONFINITE when any is NaN or ±inf)."""
    v = np.ascontiguousarray(np.atleast_2d(np.asarray(terms, dtype=np.float64)))
    rows = np.empty((v.shape[1], ROW), np.int64)
    _deposit_kernel(v, rows)
    return rows


def forward_rows(count: int, mean: np.ndarray, m2: np.ndarray) -> np.ndarray:
    """The (2·C, ROW) rows of a rank's S1 terms (rows 0…C−1) and S2 terms (rows C…2C−1):
    ``deposit`` of :func:`forward_terms`, in one compiled pass."""
    mean = np.ascontiguousarray(mean, dtype=np.float64)
    rows = np.empty((2 * mean.shape[0], ROW), np.int64)
    _forward_kernel(int(count), mean, np.ascontiguousarray(m2, dtype=np.float64), rows)
    return rows


def combine_rows(a: np.ndarray, b: np.ndarray, out: np.ndarray) -> None:
    """out ← a ∘ b, row by row (out may be a or b; int64 (R, ROW) arrays): idx = max, limbs
    aligned to it and added."""
    if not a.shape == b.shape == out.shape or a.ndim != 2 or a.shape[1] != ROW:
        raise ValueError(f"combine_rows needs three (R, {ROW}) arrays, got {a.shape}, "
                         f"{b.shape}, {out.shape}")
    _combine_kernel(a, b, out)


def to_float(rows: np.ndarray) -> np.ndarray:
    """Each row's exact value, correctly rounded to float64 (NaN for non-finite)."""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty(rows.shape[0])
    _to_float_kernel(rows, out)
    return out


def mean_var(s1_rows: np.ndarray, s2_rows: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Per channel μ = S1/n and σ² = (S2 − S1²/n)/n from exact S1 = Σ n_r·μ_r and
    S2 = Σ (M2_r + n_r·μ_r²), each correctly rounded once from the exact rational (the
    cancellation in S2 − S1²/n costs nothing: it happens in integers); σ² is clamped at 0 (only
    the dropped bits below the window could make it negative). The bits of
    :func:`mean_var_reference`; compiled for 1 ≤ n < 2^32, the reference beyond."""
    n = int(n)
    if not 0 < n < 2 ** 32:
        return mean_var_reference(s1_rows, s2_rows, n)
    r1 = np.ascontiguousarray(s1_rows, dtype=np.int64)
    r2 = np.ascontiguousarray(s2_rows, dtype=np.int64)
    mean = np.empty(r1.shape[0])
    var = np.empty(r1.shape[0])
    _mean_var_kernel(r1, r2, n, mean, var)
    return mean, var


# ------------------------------------------------------------------------------ the MPI op

def _user_op(inmem, inoutmem, datatype) -> None:
    """MPI calls this once per application of the op (a reduction step, or a segment of one),
    with two buffers of the same whole number of rows: one call into the compiled combine."""
    b = np.frombuffer(inoutmem, dtype=np.int64).reshape(-1, ROW)
    _combine_kernel(np.frombuffer(inmem, dtype=np.int64).reshape(-1, ROW), b, b)


_MPI_OBJECTS: dict = {}


def mpi_op_and_type():
    """(op, datatype): the commutative user op over rows and the row datatype (ROW int64)."""
    if not _MPI_OBJECTS:
        from mpi4py import MPI

        _MPI_OBJECTS["type"] = MPI.INT64_T.Create_contiguous(ROW).Commit()
        _MPI_OBJECTS["op"] = MPI.Op.Create(_user_op, commute=True)
    return _MPI_OBJECTS["op"], _MPI_OBJECTS["type"]


