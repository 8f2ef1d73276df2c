"""Batch-statistics algorithms as a naive kernel would run them, and the exact reference.

Study-only code: nothing here is used by the nbbn kernels. Every algorithm reads a 1-D array ``x``
of m values and accumulates **sequentially in x's own dtype** (float32 data → float32 sums), in
index order, with no reassociation (no fastmath). That is the point: it shows what float32
accumulation does. Each returns ``(mean, var_biased)`` in x's dtype.

* ``naive``     one pass, μ = Σx/m, σ² = Σx²/m − μ² (the textbook formula that cancels
                catastrophically when |μ|/σ is large; σ² may even come out negative).
* ``two-pass``  μ = Σx/m, then σ² = Σ(x − μ)²/m (plain, without the Σ(x − μ) correction term).
* ``two-pass-corrected``  the corrected two-pass algorithm (Chan, Golub & LeVeque 1983):
                σ² = (Σd² − (Σd)²/m)/m with d = x − μ, which cancels the first-order effect of
                an inexact μ (Σ(x − c)² = Σ(x − μ)² + m(μ − c)²).
* ``welford``   Welford's update with an integer count n:
                δ = x − μ;  μ += δ/n;  M2 += δ·(x − μ);  σ² = M2/m.
* ``welford-fcount``  the same with the count n held in x's dtype, as kernels that keep a float
                counter do: in float32, n + 1 == n once n = 2^24, so every later update divides by
                2^24 and σ² = M2/n overshoots (×2 at m = 2^25).
* ``chan``      a parallel kernel's shape: P = 256 "threads" each run Welford over a contiguous
                chunk, and the partial (n, μ, M2) are merged pairwise in a binary tree with Chan's
                formula  n = nₐ + n_b,  δ = μ_b − μₐ,  μ = μₐ + δ·n_b/n,
                M2 = M2ₐ + M2_b + δ²·nₐ·n_b/n.

The reference (:func:`exact_stats`) is double-double arithmetic (≈ 106-bit significand) built
from error-free transformations (Knuth's TwoSum, Dekker's TwoProd), for float32 and float64 data
alike: the mean is a double-double sum divided by m, the variance the double-double sum of the
squared deviations from that double-double mean. Its error is below 1e-25 relative for the sizes
used here, far below float64's 1.1e-16 (checked against exact rational arithmetic in the tests).
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: "Threads" of the chan algorithm (contiguous chunks merged in a binary tree).
CHAN_PARTS = 256


@njit(cache=True)
def naive_stats(x):
    """One pass: μ = Σx/m, σ² = Σx²/m − μ², sums accumulated sequentially in x's dtype."""
    T = x.dtype.type
    s = T(0)
    q = T(0)
    for i in range(x.size):
        s += x[i]
        q += x[i] * x[i]
    mt = T(x.size)
    mean = s / mt
    return mean, q / mt - mean * mean


@njit(cache=True)
def two_pass_stats(x):
    """Two passes: μ = Σx/m, σ² = Σ(x − μ)²/m, sequential sums in x's dtype."""
    T = x.dtype.type
    s = T(0)
    for i in range(x.size):
        s += x[i]
    mt = T(x.size)
    mean = s / mt
    q = T(0)
    for i in range(x.size):
        d = x[i] - mean
        q += d * d
    return mean, q / mt


@njit(cache=True)
def two_pass_corrected_stats(x):
    """Corrected two-pass: μ = Σx/m, d = x − μ, σ² = (Σd² − (Σd)²/m)/m, sums in x's dtype."""
    T = x.dtype.type
    s = T(0)
    for i in range(x.size):
        s += x[i]
    mt = T(x.size)
    mean = s / mt
    q = T(0)
    c = T(0)
    for i in range(x.size):
        d = x[i] - mean
        c += d
        q += d * d
    return mean, (q - c * c / mt) / mt


@njit(cache=True)
def welford_stats(x):
    """Welford with an integer count: δ = x − μ; μ += δ/n; M2 += δ·(x − μ); σ² = M2/m."""
    T = x.dtype.type
    mean = T(0)
    m2 = T(0)
    for i in range(x.size):
        d = x[i] - mean
        mean += d / T(i + 1)
        m2 += d * (x[i] - mean)
    return mean, m2 / T(x.size)


@njit(cache=True)
def welford_fcount_stats(x):
    """Welford with the count held in x's dtype (n += 1 stalls at 2^24 in float32); σ² = M2/n."""
    T = x.dtype.type
    mean = T(0)
    m2 = T(0)
    n = T(0)
    one = T(1)
    for i in range(x.size):
        n += one
        d = x[i] - mean
        mean += d / n
        m2 += d * (x[i] - mean)
    return mean, m2 / n


@njit(cache=True)
def chan_stats(x):
    """Welford per contiguous chunk (CHAN_PARTS of them), merged pairwise with Chan's formula."""
    T = x.dtype.type
    m = x.size
    P = CHAN_PARTS if m >= CHAN_PARTS else m
    n = np.zeros(P, dtype=x.dtype)
    mu = np.zeros(P, dtype=x.dtype)
    m2 = np.zeros(P, dtype=x.dtype)
    for p in range(P):
        lo = (m * p) // P
        hi = (m * (p + 1)) // P
        a = T(0)
        b = T(0)
        for i in range(lo, hi):
            d = x[i] - a
            a += d / T(i - lo + 1)
            b += d * (x[i] - a)
        n[p] = T(hi - lo)
        mu[p] = a
        m2[p] = b
    step = 1
    while step < P:
        for p in range(0, P - step, 2 * step):
            q = p + step
            nn = n[p] + n[q]
            d = mu[q] - mu[p]
            mu[p] = mu[p] + d * (n[q] / nn)
            m2[p] = m2[p] + m2[q] + d * d * (n[p] * n[q] / nn)
            n[p] = nn
        step *= 2
    return mu[0], m2[0] / T(m)


#: name -> function(x) -> (mean, var_biased) in x's dtype; the study's own algorithms.
ALGORITHMS = {
    "naive": naive_stats,
    "two-pass": two_pass_stats,
    "two-pass-corrected": two_pass_corrected_stats,
    "welford": welford_stats,
    "welford-fcount": welford_fcount_stats,
    "chan": chan_stats,
}


# ---------------------------------------------------------------- double-double reference

@njit(cache=True, inline="always")
def _two_sum(a, b):
    """Knuth: s + e == a + b exactly, s = fl(a + b)."""
    s = a + b
    bb = s - a
    e = (a - (s - bb)) + (b - bb)
    return s, e


@njit(cache=True, inline="always")
def _quick_two_sum(a, b):
    """s + e == a + b exactly when |a| >= |b|."""
    s = a + b
    return s, b - (s - a)


@njit(cache=True, inline="always")
def _split(a):
    t = 134217729.0 * a  # 2^27 + 1
    hi = t - (t - a)
    return hi, a - hi


@njit(cache=True, inline="always")
def _two_prod(a, b):
    """Dekker: p + e == a·b exactly, p = fl(a·b)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    return p, e


@njit(cache=True, inline="always")
def _dd_add(ah, al, bh, bl):
    s, e = _two_sum(ah, bh)
    t, f = _two_sum(al, bl)
    e += t
    s, e = _quick_two_sum(s, e)
    e += f
    return _quick_two_sum(s, e)


@njit(cache=True, inline="always")
def _dd_mul(ah, al, bh, bl):
    p, e = _two_prod(ah, bh)
    e += ah * bl + al * bh
    return _quick_two_sum(p, e)


@njit(cache=True, inline="always")
def _dd_div(ah, al, bh, bl):
    q1 = ah / bh
    ph, pl = _dd_mul(q1, 0.0, bh, bl)
    rh, rl = _dd_add(ah, al, -ph, -pl)
    q2 = rh / bh
    ph, pl = _dd_mul(q2, 0.0, bh, bl)
    rh, rl = _dd_add(rh, rl, -ph, -pl)
    q3 = rh / bh
    h, l = _quick_two_sum(q1, q2)
    return _dd_add(h, l, q3, 0.0)


@njit(cache=True, inline="always")
def _dd_sqrt(ah, al):
    """Karp's step: s = √a_hi, then s + (a − s²)/(2s) in double-double."""
    s = np.sqrt(ah)
    ph, pl = _two_prod(s, s)
    rh, rl = _dd_add(ah, al, -ph, -pl)
    return _quick_two_sum(s, rh / (2.0 * s))


@njit(cache=True)
def exact_stats(x):
    """Double-double (hi, lo) mean and biased variance of x (float32 or float64), in float64.

    Returns ``(mean_hi, mean_lo, var_hi, var_lo)``: μ = Σx/m, σ² = Σ(x − μ)²/m with every sum,
    deviation and square carried as an unevaluated pair hi + lo.
    """
    m = x.size
    sh = 0.0
    sl = 0.0
    for i in range(m):
        s, e = _two_sum(sh, np.float64(x[i]))
        e += sl
        sh, sl = _quick_two_sum(s, e)
    mh, ml = _dd_div(sh, sl, np.float64(m), 0.0)
    qh = 0.0
    ql = 0.0
    for i in range(m):
        s, e = _two_sum(np.float64(x[i]), -mh)
        e -= ml
        dh, dl = _quick_two_sum(s, e)
        ph, pl = _dd_mul(dh, dl, dh, dl)
        qh, ql = _dd_add(qh, ql, ph, pl)
    vh, vl = _dd_div(qh, ql, np.float64(m), 0.0)
    return mh, ml, vh, vl


@njit(cache=True)
def exact_invstd(var_hi, var_lo, eps):
    """1/√(σ² + ε) in double-double."""
    vh, vl = _dd_add(var_hi, var_lo, eps, 0.0)
    sh, sl = _dd_sqrt(vh, vl)
    return _dd_div(1.0, 0.0, sh, sl)


@njit(cache=True)
def dd_rel_err(value, ref_hi, ref_lo):
    """|value − (hi + lo)| / |hi + lo| for a float64 value against a double-double reference."""
    d = (value - ref_hi) - ref_lo
    return abs(d) / abs(ref_hi) if ref_hi != 0.0 else abs(d)


@njit(cache=True)
def y_rel_err(x, mean, invstd, mh, ml, ih, il):
    """‖y − y_ref‖₂/‖y_ref‖₂ for y = (x − μ)·invstd computed in x's dtype from the given
    (mean, invstd) (as a kernel's normalisation pass does), y_ref = (x − μ_ref)·invstd_ref in
    double-double."""
    T = x.dtype.type
    mu = T(mean)
    inv = T(invstd)
    num = 0.0
    den = 0.0
    for i in range(x.size):
        y = np.float64((x[i] - mu) * inv)
        s, e = _two_sum(np.float64(x[i]), -mh)
        e -= ml
        dh, dl = _quick_two_sum(s, e)
        yh, yl = _dd_mul(dh, dl, ih, il)
        d = (y - yh) - yl
        num += d * d
        den += yh * yh
    return np.sqrt(num) / np.sqrt(den) if den > 0.0 else np.sqrt(num)


@njit(cache=True)
def y_array_rel_err(x, y, mh, ml, ih, il):
    """‖y − y_ref‖₂/‖y_ref‖₂ for a given output array y (a kernel's), flattened like x."""
    num = 0.0
    den = 0.0
    for i in range(x.size):
        s, e = _two_sum(np.float64(x[i]), -mh)
        e -= ml
        dh, dl = _quick_two_sum(s, e)
        yh, yl = _dd_mul(dh, dl, ih, il)
        d = (np.float64(y[i]) - yh) - yl
        num += d * d
        den += yh * yh
    return np.sqrt(num) / np.sqrt(den) if den > 0.0 else np.sqrt(num)


# ---------------------------------------------------------------- double-double backward

@njit(cache=True, inline="always")
def _dd_xhat(xi, mh, ml, ih, il):
    """x̂ = (x − μ)·invstd in double-double (x exact in float64)."""
    s, e = _two_sum(np.float64(xi), -mh)
    e -= ml
    dh, dl = _quick_two_sum(s, e)
    return _dd_mul(dh, dl, ih, il)


@njit(cache=True)
def exact_grad_sums(x, dy, mh, ml, ih, il):
    """The reductions of backward against the exact statistics, in double-double:
    dβ = Σ dy, dγ = Σ dy·x̂ with x̂ = (x − μ)·invstd. Returns ``(dbeta_hi, dbeta_lo, dgamma_hi,
    dgamma_lo, sum_abs_dy, sum_abs_dy_xhat)``; the last two (Σ|dy|, Σ|dy·x̂|, plain float64) are
    the sizes of the terms each sum adds up, the natural error scale of a sum."""
    bh = 0.0
    bl = 0.0
    gh = 0.0
    gl = 0.0
    sb = 0.0
    sg = 0.0
    for i in range(x.size):
        d = np.float64(dy[i])
        bh, bl = _dd_add(bh, bl, d, 0.0)
        xh, xl = _dd_xhat(x[i], mh, ml, ih, il)
        ph, pl = _dd_mul(xh, xl, d, 0.0)
        gh, gl = _dd_add(gh, gl, ph, pl)
        sb += abs(d)
        sg += abs(ph)
    return bh, bl, gh, gl, sb, sg


@njit(cache=True)
def dx_errors(x, dy, dx, gamma, mh, ml, ih, il, bh, bl, gh, gl):
    """Errors of a computed dx against the exact gradient of y = γ·(x − μ)·invstd + β with the
    batch statistics of x:

        dx_ref = γ·invstd·(dy − dβ/m − x̂·dγ/m)      (every quantity in double-double)

    Returns ``(‖dx − dx_ref‖₂, ‖dx_ref‖₂, ‖γ·invstd·dy‖₂)``; the last is dx's term scale (dx
    itself cancels to ~0 at small m: at m = 2 it is exactly γ·invstd·ε/(σ² + ε)·(dy − dȳ))."""
    m = x.size
    mb_h, mb_l = _dd_div(bh, bl, np.float64(m), 0.0)
    mg_h, mg_l = _dd_div(gh, gl, np.float64(m), 0.0)
    kh, kl = _dd_mul(gamma, 0.0, ih, il)
    num = 0.0
    den = 0.0
    sc = 0.0
    for i in range(m):
        d = np.float64(dy[i])
        xh, xl = _dd_xhat(x[i], mh, ml, ih, il)
        th, tl = _dd_mul(xh, xl, mg_h, mg_l)
        uh, ul = _dd_add(d, 0.0, -mb_h, -mb_l)
        uh, ul = _dd_add(uh, ul, -th, -tl)
        rh, rl = _dd_mul(uh, ul, kh, kl)
        e = (np.float64(dx[i]) - rh) - rl
        num += e * e
        den += rh * rh
        s = kh * d
        sc += s * s
    return np.sqrt(num), np.sqrt(den), np.sqrt(sc)
