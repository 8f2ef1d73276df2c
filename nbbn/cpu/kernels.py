"""CPU kernels (Numba ``@njit``): compute only, into arrays they are given.

Formulas: :mod:`nbbn.reference`. This module is about how they are computed: the order of every
sum, the thread-to-data mapping, and the memory passes.

Views
    NC family -- x is ``(M, C)`` with C contiguous: NC (M = N) and NHWC (M = N·H·W rows).
    NCHW      -- x is ``(N, C, S)``: channel c is N contiguous runs of S values.

Statistics: shifted sums in float64
    Per channel, Σ(x − K) and Σ(x − K)² with the shift K = the channel's first value, then

        μ = K + s1/m,   σ² = (s2 − s1·(s1/m))/m.

    With float32 data every term (x − K)² is exact in float64; the only rounding is float64
    summation, amplified by the cancellation factor 1 + (μ − K)²/σ². That factor is ≤ m (Samuelson:
    no value lies more than √(m − 1)·σ from the mean) and ~2 for a typical first value; when it
    exceeds ``RESHIFT`` (the first value was an outlier) the channel's sums are taken again with
    K = μ, so the factor is ~1 and the variance is as good as a two-pass one. One read of x for
    the statistics (two only in that rare case), no E[x²] − E[x]² cancellation: float32 data at
    |mean|/std = 1e4 keeps σ² to float64 rounding.

Determinism
    Every sum runs in an order fixed by the shape alone: NC rows are cut into K chunks (K from the
    shape, never from the thread count), each chunk sums its rows in order, and chunk partials
    are added in chunk order; NCHW channels sum their rows in order (``grouped``) or fixed chunks
    of positions (``split``). ``prange`` only distributes those tasks, so outputs are
    bit-identical for any number of threads.

Normalization: y = ((x − h) − l)·α + β in x's dtype, where h + l = μ is the float64 mean split
    into x's dtype (h = μ rounded, l = the rest; l = 0 for float64 data) and α = γ·invstd. x − h
    is exact for x near μ (Sterbenz), so float32 data at |μ|/σ = 1e4 lose nothing to the offset,
    while the arithmetic runs at float32 vector width (x·α − μ·α would cancel). A channel with
    |μ| ≤ ``DIRECT_MAX``·σ (the usual case) takes the direct form y = x·α + (β − μ·α) instead:
    h = l = 0, for at most ~2·DIRECT_MAX ulps of γ (see :func:`_split`); an NC pass whose every
    channel is direct runs a loop that reads neither h nor l (two coefficient reads and two
    subtractions per value fewer). Inference does the same with the population mean, dx with
    its k2, k3. The apply passes end with the fusion: y += residual, y = max(y, 0) (NaN
    propagates, as in ``np.maximum``).

Backward: with g = dy (or dz = dy·[y > 0] under a ReLU, written out in the same pass), the sums
    Σg, Σg·(x − μ̃) and Σ(x − μ̃) in float64 over the saved mean μ̃, then

        dβ = Σg,  dγ = invstd·Σg·(x − μ),  dx = k1·g + k2·(x − μ) + k3,
        k1 = γ·invstd,  k2 = −k1·invstd·dγ/m,  k3 = −k1·dβ/m.

    Rounded-mean fold: μ̃ comes back in x's dtype, off from the batch mean by up to half an ulp
    (3e-5·σ in float32 at |μ|/σ = 1e3). δ = Σ(x − μ̃)/m is that rounding; when |δ| is within
    ``FOLD_ULPS`` ulps of μ̃ the kernel uses μ = μ̃ + δ (no extra memory traffic), otherwise the
    given mean is meant (e.g. a global mean in synchronized BN) and is used as given.

Work split and memory passes (S bytes per element)
    NC family, ``rows``: 2 parallel regions. (1) each of K row chunks accumulates C-long (here
        W = L·C-long, see below) shifted sums while streaming its rows in four ascending
        streams (one per quarter of the chunk), four rows per step so each
        accumulator load/store serves 4 values; (2) after a serial merge of the K partials,
        each chunk normalizes its rows. x is read twice (3S with the write of y); the data of
        one chunk do not stay in cache between the two regions.
    Narrow NC (C < ``WIDE``): L consecutive rows are processed as one row of W = L·C values
        (lane j is channel j mod C), so the inner loops stay long enough to vectorize; the lanes
        are folded to C channels in the merge.
    NCHW, ``grouped``: 1 parallel region. A task owns a group of consecutive channels sized so
        the group's data fit in L2; it streams x[n, c0:c1, :] (contiguous) for four rows n at a
        time (four ascending streams: one run at a time restarted the prefetchers every run,
        see :func:`_group_sums`) to get its channels' sums, then normalizes the group from
        cache the same way: ~2 passes from memory.
    NCHW loops address x through flat offsets (n·C + c)·S + s, unsigned: Numba wraps negative
        signed indices, and that check keeps LLVM from vectorizing a loop over [o, o + n).
    NCHW, ``split`` (few channels): each channel's m positions are cut into fixed chunks; tasks
        (channel, chunk) sum, a serial merge, then tasks normalize: 2 regions, 3 passes.
    Inference: 1 region, contiguous row blocks, one read and one write.
    ``serial``: every kernel also exists without ``parallel`` (same code, ``prange`` runs as
        ``range``), for calls too small to pay a parallel region's wake-up (a few µs).

Arguments: per-channel inputs (γ, β, saved and running statistics) arrive in their own dtype and
are widened to float64 where read; x-shaped arrays in x's dtype, or, for float16 and bfloat16,
as their raw bits (int16 and uint16 views), read and written through :func:`ld` and :func:`st`
(the storage codec below): every "x's dtype" of this docstring is then float32, the compute
dtype, and each stored value is a float32 result rounded once to nearest even.
Absent optional arrays are empty arrays and a ``flags`` bit says whether they are present.
"""

from __future__ import annotations

import math
import types as _pytypes

import numpy as np
from llvmlite import binding as _llvm
from llvmlite import ir as _ir
from numba import config as _config
from numba import njit, prange, types
from numba.extending import intrinsic, overload

# reassoc lets LLVM vectorize the float64 reductions; contract allows FMA. No nnan/ninf: NaN and
# Inf keep their IEEE meaning.
_FM = {"reassoc", "contract"}

# Bits of the ``flags`` argument.
HAS_GAMMA = 1
HAS_BETA = 2
HAS_RUNNING = 4
RELU = 8
RESIDUAL = 16
FOLD = 32  # backward: fold the rounding of save_mean (see the module docstring)
STATS_ONLY = 64  # forward: statistics only (no y, no saved statistics, no running update)
COEF_GIVEN = 128  # apply: c0, c1, c2 are given in ``coef``; backward: sums given in ``sums``
SUMS_ONLY = 256  # backward: the sums only (no dx, no fold)
DIRECT = 512  # elementwise pass, set by the kernel: every channel takes the direct form

#: Re-take a channel's sums with K = μ when (μ − K)² > RESHIFT·σ² (see the module docstring).
RESHIFT = 1024.0
#: The rounded-mean fold applies when |δ| ≤ FOLD_ULPS·ulp(μ̃).
from ..fold import FOLD_ULPS  # noqa: E402  (the rule is stated once, in nbbn.fold)

#: The elementwise passes take the direct form x·α + (β − μ·α) for a channel with
#: |μ| ≤ DIRECT_MAX·σ, the split form otherwise (see the module docstring).
DIRECT_MAX = 8.0

#: NCHW grouped kernels stream this many rows n of a channel at once (see :func:`_group_sums`);
#: backward only where a run x[n, c, :] is at most ROWS_AT_ONCE_BELOW bytes (round 11's A/B: at
#: 7×7 and 14×14 backward took 12-19% less time, at 112×112 (49 KiB runs) up to 9% more).
ROWS_AT_ONCE = 4
ROWS_AT_ONCE_BELOW = 4096


# The helpers below are Numba-IR-inlined (``inline="always"``) on purpose. It is expensive to
# compile -- every helper is re-typed inside every kernel and its serial twin: 77 s of CPU per x
# dtype against 33 s as plain @njit functions (process CPU time, cold cache) -- but measured by
# `nbbn bench` + `nbbn compare` (results/cpu-kernels/inline.md), plain helpers made 24 of 72
# default-sweep points significantly slower relative to PyTorch (up to 2.7x, geomean 1.22x):
# LLVM does not recover what the IR inlining gives the parfor lowering. Speed wins; the test
# suite pays the compile once per cache.


# --------------------------------------------------------------------------------------------
# Storage codec: how the kernels read and write an x-shaped array (x, y, dy, dx, residual, dz)
# --------------------------------------------------------------------------------------------
# Numba's CPU target has no float16 (or bfloat16) type, so half arrays reach the kernels as their
# raw 16 bits, and the format rides in the integer dtype of that view:
#
#     float32, float64   the array itself          ld = a[i],          st: a[i] = v
#     bfloat16           viewed as uint16          (as the cuda kernels see bfloat16)
#     float16            viewed as int16           (the same bits, another Numba type)
#
# ``ld(a, i)`` returns the value as float32 (exact: every half value is a float32 value) and
# ``st(a, i, v)`` rounds a float32 v to the format, to nearest even, once. The elementwise passes
# of a half x compute in float32 (their coefficient scratch ``t`` is float32, see
# :func:`work_empty`), so a half y or dx is a float32 result rounded once -- the same arithmetic
# as for float32 data -- and every sum reads ld(...) into float64 as for float32 data. The codec
# is applied where a value is loaded or stored, inside the same loops: no pass converts a whole
# array before or after.
#
# Why the dtype and not a codec argument: a kernel could take ``ld``/``st`` dispatchers as
# arguments (Numba specializes on each and inlines them), but Numba's on-disk cache cannot key a
# specialization on a dispatcher argument (its type holds the function object: every process
# misses the cache and recompiles, checked with Numba 0.68), and this package relies on that
# cache (``precompile``, the test warm-up). An integer dtype is an ordinary array type: cached,
# and float32/float64 kernels keep the types and code they had, since ``ld``/``st`` reduce to the
# plain index there (inlined into Numba's IR: the same machine code, checked on the vector
# instructions of nc_infer).
#
# Numba 0.68 trap: an inline="always" overload called with a conditional expression as an
# argument, ``st(yf, j, 0.0 if v < 0.0 else v)``, compiles to wrong code (every value stored
# was 0; the ReLU outputs, float32 included, were garbage). Call sites bind such an expression
# to a name first; tests/test_half.py and the conformance suite would catch a relapse.
#
# The conversions: bfloat16 by integer ops (:func:`bf16_decode`; :func:`bf16_encode`, an LLVM
# intrinsic on i32 lanes, see there); float16 by LLVM's ``half`` type (fpext/fptrunc: F16C's
# vcvtph2ps/vcvtps2ph) where the target CPU has F16C (:data:`F16C`), else by integer ops
# (:func:`f16_decode`, :func:`f16_encode`). The integer codecs are compiled ``forceinline``
# (LLVM's alwaysinline), not Numba-IR-inlined: called as functions they stayed calls and kept
# every half loop scalar; Numba's IR inliner, on these branchy bodies, raises SSA warnings.
# Inlined by LLVM, the loops vectorize (the branches become selects). The @njit integer codecs
# compute on 64-bit lanes (Numba widens integer arithmetic): that is why bf16_encode is not one.
_U32 = np.uint32


@njit(cache=True, forceinline=True)
def bf16_decode(b):
    """float32 of bfloat16 bits ``b``: the bits are float32's top half, ``b << 16``; exact."""
    return _U32((_U32(b) & _U32(0xFFFF)) << _U32(16)).view(np.float32)


@intrinsic
def bf16_encode(typingctx, v):
    """bfloat16 bits (uint16) of a float32 v, rounded to nearest even: add 0x7FFF plus the
    lowest kept bit and truncate (carries into the exponent give the next binade or ±inf, which
    is round-to-nearest's overflow). NaN keeps its sign and top payload bits, with the quiet
    bit set (IEEE 754's conversion of a NaN; a NaN that arithmetic produced is already quiet,
    so for every value the kernels store this is plain truncation).

    An LLVM intrinsic on i32, not an @njit function: Numba types every integer operation on
    uint32 as 64-bit, so the @njit version of these steps vectorized on 64-bit lanes -- 8 values
    per AVX-512 register, with widenings and narrowings around them -- and bfloat16 inference
    ran 2-4× slower than float32 on half the bytes (round 7, results/cpu-kernels/round7.md).
    On i32 lanes it is 16 values per register and seven operations (shift, and, two adds,
    shift, unordered compare, masked or): the same as ATen's ``cvtfp32_bf16``, whose NaN is
    the canonical 0x7FFF instead."""
    def codegen(context, builder, sig, args):
        i32 = _ir.IntType(32)

        def k(n):
            return _ir.Constant(i32, n)
        u = builder.bitcast(args[0], i32)
        top = builder.lshr(u, k(16))
        rounded = builder.lshr(builder.add(builder.add(u, k(0x7FFF)), builder.and_(top, k(1))),
                               k(16))
        is_nan = builder.fcmp_unordered("uno", args[0], args[0])
        out = builder.select(is_nan, builder.or_(top, k(0x40)), rounded)
        return builder.trunc(out, _ir.IntType(16))
    return types.uint16(types.float32), codegen


@njit(cache=True, forceinline=True)
def f16_decode(b):
    """float32 of float16 bits ``b`` (sign s, 5-bit exponent e, 10-bit fraction f), exact:
    e = 31: ±inf or NaN (fraction kept); 0 < e < 31: rebias the exponent by 127 − 15 = 112;
    e = 0: zero or subnormal ±f·2⁻²⁴, a float32 product with no rounding (f < 2¹⁰)."""
    h = _U32(b) & _U32(0xFFFF)
    s = (h & _U32(0x8000)) << _U32(16)
    e = (h >> _U32(10)) & _U32(0x1F)
    f = h & _U32(0x3FF)
    if e == _U32(0x1F):
        u = s | _U32(0x7F800000) | (f << _U32(13))
    elif e != _U32(0):
        u = s | ((e + _U32(112)) << _U32(23)) | (f << _U32(13))
    else:
        u = s | np.float32(np.float32(f) * np.float32(2.0**-24)).view(np.uint32)
    return _U32(u).view(np.float32)


@njit(cache=True, forceinline=True)
def f16_encode(v):
    """float16 bits (uint32 < 2¹⁶) of float32(v), rounded to nearest even, on |v|'s bits a:

    * NaN: 0x7C00 | the top 10 fraction bits (NumPy's rule; one bit set if none is left), so
      every float16 NaN comes back with its bits;
    * a ≥ 2⁻¹⁴ (float16 normal or beyond): rebias the exponent (subtract 112 << 23), round the
      13 dropped bits to nearest even (add 0xFFF plus the lowest kept bit) and shift; anything
      from 65520 up (the midpoint above 65504, where ties go to the even 2¹⁶) and inf give
      0x7C00, inf;
    * a < 2⁻¹⁴: a float16 subnormal q·2⁻²⁴ or zero: the 24-bit significand shifted right by
      126 − exponent, rounded to nearest even on the dropped bits (values below 2⁻²⁵ give 0)."""
    u = np.float32(v).view(np.uint32)
    sign = (u >> _U32(16)) & _U32(0x8000)
    a = u & _U32(0x7FFFFFFF)
    if a > _U32(0x7F800000):
        o = _U32(0x7C00) | ((a >> _U32(13)) & _U32(0x3FF))
        if o == _U32(0x7C00):
            o = _U32(0x7C01)
    elif a >= _U32(0x38800000):
        o = (a - _U32(0x38000000) + _U32(0xFFF) + ((a >> _U32(13)) & _U32(1))) >> _U32(13)
        if o > _U32(0x7C00):
            o = _U32(0x7C00)
    elif a < _U32(0x33000000):  # below 2⁻²⁵ (exponent < 102): rounds to zero
        o = _U32(0)
    else:
        e = a >> _U32(23)
        sig = (a & _U32(0x7FFFFF)) | _U32(0x800000)
        k = _U32(126) - e  # 14 ≤ k ≤ 24
        o = sig >> k
        rem = sig & ((_U32(1) << k) - _U32(1))
        half = _U32(1) << (k - _U32(1))
        if rem > half or (rem == half and (o & _U32(1)) == _U32(1)):
            o += _U32(1)
    return o | sign


def _has_f16c() -> bool:
    """Whether the CPU Numba compiles for converts float16 <-> float32 in hardware (x86's F16C:
    vcvtph2ps / vcvtps2ph, exact widening and round-to-nearest-even narrowing, 8 or 16 lanes).
    Numba targets the host unless NUMBA_CPU_NAME / NUMBA_CPU_FEATURES say otherwise (a portable
    cache): then only features named there count."""
    features = _config.CPU_FEATURES
    if features is None:
        features = "" if _config.CPU_NAME else _llvm.get_host_cpu_features().flatten()
    return "+f16c" in features.split(",")


#: float16 through LLVM's ``half`` type and the F16C instructions (when the target has them),
#: else through :func:`f16_decode` / :func:`f16_encode`: the same values either way
#: (tests/test_half.py checks both on every bit pattern); the instructions are far cheaper than
#: the branches and shifts of the bit manipulation, even vectorized.
F16C = _has_f16c()


@intrinsic
def _f16c_decode(typingctx, b):
    """float32 of float16 bits (int16): ``fpext half → float`` (exact)."""
    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], _ir.HalfType()), _ir.FloatType())
    return types.float32(types.int16), codegen


@intrinsic
def _f16c_encode(typingctx, v):
    """float16 bits (int16) of a float32: ``fptrunc float → half`` (round to nearest even)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.fptrunc(args[0], _ir.HalfType()), _ir.IntType(16))
    return types.int16(types.float32), codegen


def ld(a, i):
    """a[i] as a number: float32 or float64 arrays as they are, half bits decoded to float32
    (typed by the overload below; Numba only)."""
    raise NotImplementedError("ld is compiled by Numba")


def st(a, i, v):
    """a[i] = v, rounded to the storage format (typed by the overload below; Numba only)."""
    raise NotImplementedError("st is compiled by Numba")


def work_empty(shape, a):
    """An empty array of the elementwise passes' compute dtype for x-shaped array ``a``: a's
    dtype, float32 for half bits (typed by the overload below; Numba only)."""
    raise NotImplementedError("work_empty is compiled by Numba")


@overload(ld, inline="always")
def _ld(a, i):
    if a.dtype == types.uint16:
        return lambda a, i: bf16_decode(a[i])
    if a.dtype == types.int16:
        if F16C:
            return lambda a, i: _f16c_decode(a[i])
        return lambda a, i: f16_decode(a[i])
    return lambda a, i: a[i]


@overload(st, inline="always")
def _st(a, i, v):
    if a.dtype == types.uint16:
        def st_bf16(a, i, v):
            a[i] = bf16_encode(np.float32(v))
        return st_bf16
    if a.dtype == types.int16:
        if F16C:
            def st_f16c(a, i, v):
                a[i] = _f16c_encode(np.float32(v))
            return st_f16c

        def st_f16(a, i, v):
            a[i] = np.int16(f16_encode(v))  # truncation keeps the 16 bits
        return st_f16

    def st_float(a, i, v):
        a[i] = v
    return st_float


@overload(work_empty, inline="always")
def _work_empty(shape, a):
    if a.dtype in (types.uint16, types.int16):
        return lambda shape, a: np.empty(shape, np.float32)
    return lambda shape, a: np.empty(shape, a.dtype)


def twin(fn):
    """(parallel, serial) dispatchers of one kernel body. The serial one is a copy of the Python
    function under another qualified name, so Numba's on-disk cache (keyed by name, not by
    compile flags) keeps the two apart.

    ``error_model="numpy"``: a float division by zero gives ±inf or NaN (IEEE, as PyTorch)
    instead of raising ZeroDivisionError. Python's model puts a zero test before every
    division, and that branch kept the per-channel loops (1/√(σ² + ε)) from vectorizing. Every
    division here is by a count, a shape, or √(σ² + ε) with ε > 0 (validated), so only a
    running variance of exactly −ε, which used to raise, now gives an infinite α."""
    serial = _pytypes.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + "_serial",
                                   fn.__defaults__, fn.__closure__)
    serial.__qualname__ = fn.__qualname__ + "_serial"
    serial.__doc__ = fn.__doc__
    par = njit(parallel=True, fastmath=_FM, cache=True, nogil=True, error_model="numpy")(fn)
    ser = njit(parallel=False, fastmath=_FM, cache=True, nogil=True, error_model="numpy")(serial)
    return par, ser


# --------------------------------------------------------------------------------------------
# Per-channel scalar math
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _finish(s1, s2, shift, m):
    """μ and biased σ² from the shifted sums s1 = Σ(x − K), s2 = Σ(x − K)² over m values."""
    d = s1 / m
    var = (s2 - s1 * d) / m
    if var < 0.0:  # rounding of an exactly constant channel; NaN passes through
        var = 0.0
    return shift + d, var


@njit(inline="always")
def _far(mean, var, shift):
    """True when the shift was far enough from μ that the sums should be taken again."""
    d = mean - shift
    return d * d > RESHIFT * var


@njit(inline="always")
def _train_all(t, c0, c1, m, eps, gamma, beta, flags, momentum, rmean, rvar, save_mean,
               save_invstd, mean64, var64, inv):
    """The forward's per-channel work for channels c0..c1−1: saved statistics, running ones
    (HAS_RUNNING), and t's columns 0..c1−c0−1 = (h, l, α, β − f·α) of x's dtype with
    α = γ·invstd, the split or direct form of :func:`_split`. Loops with no branch in their
    bodies (the flags tests sit outside them), so LLVM vectorizes the square roots and the
    division, as in :func:`_infer_coefficients`: one channel at a time, this work was ~10 ns a
    channel, 20 µs of a 45 µs batch-1 call at C = 2048 (round 8, NC; round 9, NCHW's channel
    groups). ``inv`` (≥ c1 − c0 float64) is scratch; mean64 and var64 hold μ and σ² already."""
    u0 = np.uint64(c0)  # unsigned indices: no negative-index wraparound, so no gathers
    n = np.uint64(c1 - c0)
    for j in range(n):
        inv[j] = 1.0 / math.sqrt(var64[u0 + j] + eps)
    if not flags & STATS_ONLY:
        for j in range(n):
            save_mean[u0 + j] = mean64[u0 + j]
            save_invstd[u0 + j] = inv[j]
        if flags & HAS_RUNNING:
            # PyTorch's convention; the running variance takes the unbiased σ²·m/(m − 1).
            unbiased = m / (m - 1.0)
            for j in range(n):
                c = u0 + j
                rmean[c] = (1.0 - momentum) * rmean[c] + momentum * mean64[c]
                rvar[c] = (1.0 - momentum) * rvar[c] + momentum * (var64[c] * unbiased)
    if flags & HAS_GAMMA:
        for j in range(n):
            t[2, j] = np.float64(gamma[u0 + j]) * inv[j]
    else:
        for j in range(n):
            t[2, j] = inv[j]
    if flags & HAS_BETA:
        for j in range(n):
            c = u0 + j
            f = _split(t, j, mean64[c], math.sqrt(max(var64[c], 0.0)))
            t[3, j] = np.float64(beta[c]) - f * t[2, j]  # with α as stored (see _split)
    else:
        for j in range(n):
            c = u0 + j
            f = _split(t, j, mean64[c], math.sqrt(max(var64[c], 0.0)))
            t[3, j] = 0.0 - f * t[2, j]


@njit(inline="always")
def _infer_coefficients(rmean, rvar, gamma, beta, coef, t, flags, eps):
    """``coef`` (3, C) = (μ, α, β) from the population statistics (unless COEF_GIVEN: then the
    caller's, whose σ is unknown, so the split form), and t[0:4, c] = (h, l, α, β − f·α).

    α = γ·invstd with invstd = 1/√(σ²_pop + ε), for y = (x − μ_pop)·α + β. Loops over c with
    no branch in their bodies (the flags tests sit outside them; :func:`_split` is a select),
    so LLVM vectorizes the square roots and the division: at
    C = 2048 the per-channel loop cost more than the elementwise pass of a batch-1 call
    (1×7×7×2048: ~17 µs of ~37; results/cpu-kernels/round6.md)."""
    C = coef.shape[1]
    if not flags & COEF_GIVEN:
        for c in range(C):
            coef[0, c] = np.float64(rmean[c])
            coef[1, c] = 1.0 / math.sqrt(np.float64(rvar[c]) + eps)  # invstd
        if flags & HAS_GAMMA:
            for c in range(C):
                coef[1, c] = np.float64(gamma[c]) * coef[1, c]
        if flags & HAS_BETA:
            for c in range(C):
                coef[2, c] = np.float64(beta[c])
        else:
            for c in range(C):
                coef[2, c] = 0.0
        for c in range(C):
            f = _split(t, c, coef[0, c], math.sqrt(max(np.float64(rvar[c]), 0.0)))
            t[2, c] = coef[1, c]
            t[3, c] = coef[2, c] - f * t[2, c]  # with α as stored (see _split)
    else:
        for c in range(C):  # σ unknown: 0, so the split form unless μ = 0
            f = _split(t, c, coef[0, c], 0.0)
            t[2, c] = coef[1, c]
            t[3, c] = coef[2, c] - f * t[2, c]


@intrinsic
def _ulp(typingctx, mu, precision):
    """The ulp of μ in a dtype of ``precision`` significand bits, for :func:`_fold`:
    ldexp(1.0, e − precision) with e frexp(μ)'s exponent (0 for a zero, an infinity or a NaN,
    as Numba's math.frexp gives), bit for bit (tests/test_cpu.py checks zeros, subnormals,
    normals, infinities, NaN and random bit patterns). Integer and select operations on the
    float64's bits, where math.frexp and math.ldexp are library calls that keep a loop over
    channels scalar: the fold's ulp cost ~6 ns a channel (round 8)."""
    def codegen(context, builder, sig, args):
        i64 = _ir.IntType(64)
        f64 = _ir.DoubleType()

        def k(n):
            return _ir.Constant(i64, n)
        x, prec = args
        prec = context.cast(builder, prec, sig.args[1], types.int64)
        biased = builder.and_(builder.lshr(builder.bitcast(x, i64), k(52)), k(0x7FF))
        sub = builder.icmp_unsigned("==", biased, k(0))
        # a subnormal scaled by 2^64 (exact) is normal; its exponent, less 64, is frexp's
        scaled = builder.select(sub, builder.fmul(x, _ir.Constant(f64, 2.0 ** 64)), x)
        e = builder.sub(builder.and_(builder.lshr(builder.bitcast(scaled, i64), k(52)),
                                     k(0x7FF)), k(1022))
        e = builder.sub(e, builder.select(sub, k(64), k(0)))
        special = builder.or_(builder.fcmp_unordered("==", x, _ir.Constant(f64, 0.0)),
                              builder.icmp_unsigned("==", biased, k(0x7FF)))
        p = builder.sub(builder.select(special, k(0), e), prec)
        normal = builder.icmp_signed(">=", p, k(-1022))
        in_sub = builder.icmp_signed(">=", p, k(-1074))
        amount = builder.select(in_sub, builder.add(p, k(1074)), k(0))
        low = builder.select(in_sub, builder.shl(k(1), amount), k(0))
        bits = builder.select(normal, builder.shl(builder.add(p, k(1023)), k(52)), low)
        return builder.bitcast(bits, f64)
    if not isinstance(mu, types.Float) or not isinstance(precision, types.Integer):
        return None
    return types.float64(types.float64, precision), codegen


@njit(inline="always")
def _fold(sx, m, mu_saved, precision):
    """δ = Σ(x − μ̃)/m when it is within FOLD_ULPS ulps of μ̃ (in a dtype of ``precision``
    significand bits), else 0: the part of the batch mean that rounding μ̃ left out."""
    delta = sx / m
    return delta if abs(delta) <= FOLD_ULPS * _ulp(mu_saved, precision) else 0.0


@njit(inline="always")
def _grad_core(t, j, c, sdy, sdyx, sx, m, mu, invstd, k1, fold, precision, dgamma, dbeta):
    """dγ, dβ of channel c and t[:, j] = (h, l, k1, k2, k3) of x's dtype for
    dx = k1·g + k2·((x − h) − l) + k3, from its sums Σg, Σg·(x − μ̃), Σ(x − μ̃), with μ̃,
    invstd and k1 = γ·invstd (or invstd) given: μ = μ̃ + δ when ``fold`` (the rounded-mean
    fold, :func:`_fold`), split into h + l, or h = l = 0 and k3 − k2·μ (the direct form, see
    :func:`_split`). No branch on anything but loop invariants, so that a loop over channels
    vectorizes (:func:`_grad_all`)."""
    delta = _fold(sx, m, mu, precision) if fold else 0.0
    sdyx = sdyx - delta * sdy  # Σg·(x − μ) with μ = μ̃ + δ
    dg = sdyx * invstd
    dgamma[c] = dg
    dbeta[c] = sdy
    k2 = -k1 * invstd * dg / m
    k3 = -k1 * sdy / m
    # dx's error is relative to ‖γ·invstd·dy‖, so 1/invstd is the scale here (see _split).
    f = _split(t, j, mu + delta, 1.0 / invstd if invstd > 0.0 else 0.0)
    t[2, j] = k1
    t[3, j] = k2
    t[4, j] = k3 - f * t[3, j]  # with k2 as stored (see _split)


@njit(inline="always")
def _grad_all(t, c0, c1, sums, m, save_mean, save_invstd, gamma, flags, precision, dgamma,
              dbeta):
    """:func:`_grad_core` of channels c0..c1−1 into t's columns 0..c1−c0−1 (μ̃, invstd and
    k1 = γ·invstd read here), in two loops (with γ, without) whose bodies have no branch, so
    that they vectorize: one channel at a time, with math.frexp and math.ldexp calls in the
    fold, the backward's per-channel work was ~15 ns a channel, 30 µs of a 60 µs batch-1 call
    at C = 2048 (round 8, NC; round 9, NCHW's channel groups)."""
    fold = (flags & FOLD) != 0
    u0 = np.uint64(c0)  # unsigned indices: no negative-index wraparound, so no gathers
    if flags & HAS_GAMMA:
        for j in range(np.uint64(c1 - c0)):
            c = u0 + j
            invstd = np.float64(save_invstd[c])
            _grad_core(t, j, c, sums[0, c], sums[1, c], sums[2, c], m,
                       np.float64(save_mean[c]), invstd, np.float64(gamma[c]) * invstd, fold,
                       precision, dgamma, dbeta)
    else:
        for j in range(np.uint64(c1 - c0)):
            c = u0 + j
            invstd = np.float64(save_invstd[c])
            _grad_core(t, j, c, sums[0, c], sums[1, c], sums[2, c], m,
                       np.float64(save_mean[c]), invstd, invstd, fold, precision, dgamma, dbeta)


@njit(inline="always")
def _split(t, c, mu, sigma):
    """How the elementwise passes subtract μ from x in x's dtype; returns the part of μ to fold
    into the additive coefficient (the caller subtracts it times the multiplier of x − μ).

    Split form: t[0, c] = μ rounded to t's dtype (h), t[1, c] = the rest (l = μ − h, rounded),
    and the pass forms (x − h) − l. x − h is exact when x is near μ (Sterbenz), so float32
    data at |μ|/σ = 1e4 keep their accuracy in float32 arithmetic, where x·α − μ·α would
    cancel; for float64 data l = 0. Returns 0.

    Direct form, when |μ| ≤ DIRECT_MAX·σ: h = l = 0, returns μ, and the pass computes
    x·α + (β − μ·α) -- in the NC family's all-direct loop two coefficient reads and two
    subtractions per value fewer (NCHW keeps its scalar h = l = 0 in registers). The caller
    forms β − μ·α in float64 with α as stored (rounded to x's dtype), so x·α̃ + (β − μ·α̃) =
    (x − μ)·α̃ + β exactly and α's rounding stays relative to x̂·γ; what remains is the
    rounding of β − μ·α̃ to x's dtype, |μ|/σ ulps of γ, and (without an FMA) that of x·α̃,
    another |μ|/σ + |x̂|: at most ~2·DIRECT_MAX ulps of γ more than the split
    form (≈ 1e-6·γ in float32 at the threshold; float32's tolerance for y is 1e-5), where the
    direct form at |μ|/σ = 1e4 would cost ~1e4 ulps. DIRECT_MAX = 8 keeps typical activations
    (|μ|/σ ≲ 2 before and after a ReLU) and the harness's −2.3 + 0.5·randn (4.6) direct and
    large offsets split. NaN or infinite statistics keep the split form.

    σ is the channel's standard deviation without eps (the scale of x − μ, which is what y's
    error is measured against): with eps ≫ σ², |μ|/√(σ² + eps) is small while |μ|/σ is not, and
    the direct form missed float32's tolerance (σ = 1e-5 at μ = 0.02: 4e-5; round 3's property
    tests). Backward passes 1/save_invstd: its error is relative to ‖γ·invstd·dy‖.

    Written as selects, not a branch, so the callers' loops over channels vectorize."""
    direct = abs(mu) <= DIRECT_MAX * sigma
    t[0, c] = 0.0 if direct else mu
    t[1, c] = 0.0 if direct else mu - t[0, c]
    return mu if direct else 0.0


@njit(inline="always")
def _direct(t, C, flags):
    """flags with DIRECT set when every channel of t (4+, W) took the direct form (a count, not
    an early exit, so the loop vectorizes; NaN counts as split)."""
    n = 0
    for c in range(C):
        n += 0 if (t[0, c] == 0.0 and t[1, c] == 0.0) else 1
    return flags | DIRECT if n == 0 else flags


# --------------------------------------------------------------------------------------------
# Row loops shared by the layouts. A "row" is a 1-D contiguous slice; coefficient vectors are
# indexed like the row (NC: per column) or are scalars (NCHW: one channel per row).
# --------------------------------------------------------------------------------------------
@njit(fastmath=_FM, inline="always")
def _rows_shifted_sums(x, r0, r1, shift, a1, a2):
    """a1 += Σ(x − shift), a2 += Σ(x − shift)² column-wise over rows [r0, r1) of x (R, W).
    Four row streams, one per quarter of the rows, each walking its quarter in order: every
    accumulator load and store serves four values, and each stream's addresses only ascend,
    which the hardware prefetchers follow (four *adjacent* rows of 512 B interleave within a
    page, and that pattern read x from DRAM 3× slower than a plain sum; see the notes). The
    rows left over by the quarters follow, one at a time. The order depends on r0, r1 only."""
    W = x.shape[1]
    Q = (r1 - r0) // 4
    for i in range(r0, r0 + Q):
        x0 = x[i]
        x1 = x[i + Q]
        x2 = x[i + 2 * Q]
        x3 = x[i + 3 * Q]
        for j in range(W):
            k = shift[j]
            d0 = ld(x0, j) - k
            d1 = ld(x1, j) - k
            d2 = ld(x2, j) - k
            d3 = ld(x3, j) - k
            a1[j] += (d0 + d1) + (d2 + d3)
            a2[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
    for n in range(r0 + 4 * Q, r1):
        xr = x[n]
        for j in range(W):
            d = ld(xr, j) - shift[j]
            a1[j] += d
            a2[j] += d * d


@njit(fastmath=_FM, inline="always")
def _span_apply_vec(xf, yf, rf, o, n, h, lo, a, b, flags):
    """yf[o + i] = ((xf[o + i] − h[i]) − l[i])·a[i] + b[i], then + rf[o + i] (RESIDUAL) and
    max(·, 0) (RELU), for i < n, in x's dtype; h, l, a, b (see :func:`_split`) are arrays of x's
    dtype indexed like the run (NC: lane j is channel j mod C); DIRECT: every h = l = 0, the
    loop skips them. Unsigned offsets, as in :func:`_span_apply`."""
    o = np.uint64(o)
    if flags & DIRECT:
        _span_direct_vec(xf, yf, rf, o, n, a, b, flags)
    elif flags & RESIDUAL:
        if flags & RELU:
            for i in range(np.uint64(n)):
                j = o + i
                v = ((ld(xf, j) - h[i]) - lo[i]) * a[i] + b[i] + ld(rf, j)
                w = 0.0 if v < 0.0 else v  # not inside st(): see "Storage codec"
                st(yf, j, w)
        else:
            for i in range(np.uint64(n)):
                j = o + i
                st(yf, j, ((ld(xf, j) - h[i]) - lo[i]) * a[i] + b[i] + ld(rf, j))
    elif flags & RELU:
        for i in range(np.uint64(n)):
            j = o + i
            v = ((ld(xf, j) - h[i]) - lo[i]) * a[i] + b[i]
            w = 0.0 if v < 0.0 else v  # not inside st(): see "Storage codec"
            st(yf, j, w)
    else:
        for i in range(np.uint64(n)):
            j = o + i
            st(yf, j, ((ld(xf, j) - h[i]) - lo[i]) * a[i] + b[i])


@njit(fastmath=_FM, inline="always")
def _span_direct_vec(xf, yf, rf, o, n, a, b, flags):
    """:func:`_span_apply_vec` in the direct form, y = x·a + b (``o`` unsigned)."""
    if flags & RESIDUAL:
        if flags & RELU:
            for i in range(np.uint64(n)):
                j = o + i
                v = ld(xf, j) * a[i] + b[i] + ld(rf, j)
                w = 0.0 if v < 0.0 else v  # not inside st(): see "Storage codec"
                st(yf, j, w)
        else:
            for i in range(np.uint64(n)):
                j = o + i
                st(yf, j, ld(xf, j) * a[i] + b[i] + ld(rf, j))
    elif flags & RELU:
        for i in range(np.uint64(n)):
            j = o + i
            v = ld(xf, j) * a[i] + b[i]
            w = 0.0 if v < 0.0 else v  # not inside st(): see "Storage codec"
            st(yf, j, w)
    else:
        for i in range(np.uint64(n)):
            j = o + i
            st(yf, j, ld(xf, j) * a[i] + b[i])


@njit(fastmath=_FM, inline="always")
def _span_apply(xf, yf, rf, o, n, h, lo, a, b, flags):
    """:func:`_span_apply_vec` with scalar coefficients of x's dtype (one channel per run:
    NCHW; a run can be as short as 49 values). The offsets are
    made unsigned: Numba wraps a negative signed index, and that per-element check keeps LLVM
    from vectorizing a loop over [o, o + n) -- 5.5× slower at 7×7 (measured, see the notes).
    A channel in the direct form has h = l = 0 here (the scalars stay in registers, so no
    separate loop: measured the same speed)."""
    o = np.uint64(o)
    if flags & RESIDUAL:
        if flags & RELU:
            for i in range(np.uint64(n)):
                j = o + i
                v = ((ld(xf, j) - h) - lo) * a + b + ld(rf, j)
                w = 0.0 if v < 0.0 else v  # not inside st(): see "Storage codec"
                st(yf, j, w)
        else:
            for i in range(np.uint64(n)):
                j = o + i
                st(yf, j, ((ld(xf, j) - h) - lo) * a + b + ld(rf, j))
    elif flags & RELU:
        for i in range(np.uint64(n)):
            j = o + i
            v = ((ld(xf, j) - h) - lo) * a + b
            w = 0.0 if v < 0.0 else v  # not inside st(): see "Storage codec"
            st(yf, j, w)
    else:
        for i in range(np.uint64(n)):
            j = o + i
            st(yf, j, ((ld(xf, j) - h) - lo) * a + b)


@njit(fastmath=_FM, inline="always")
def _span_apply4(xf, yf, rf, o0, o1, o2, o3, n, h, lo, a, b, flags):
    """:func:`_span_apply` over the four runs [o_r, o_r + n) of one channel together: four
    ascending write streams, as :func:`_group_sums` reads (NCHW grouped forward: 32×512×28×28
    apply-like pass 4.69 → 4.21 ms cold, round 11)."""
    o0 = np.uint64(o0)
    o1 = np.uint64(o1)
    o2 = np.uint64(o2)
    o3 = np.uint64(o3)
    if flags & RESIDUAL:
        if flags & RELU:
            for i in range(np.uint64(n)):
                v0 = ((ld(xf, o0 + i) - h) - lo) * a + b + ld(rf, o0 + i)
                v1 = ((ld(xf, o1 + i) - h) - lo) * a + b + ld(rf, o1 + i)
                v2 = ((ld(xf, o2 + i) - h) - lo) * a + b + ld(rf, o2 + i)
                v3 = ((ld(xf, o3 + i) - h) - lo) * a + b + ld(rf, o3 + i)
                w0 = 0.0 if v0 < 0.0 else v0  # not inside st(): see "Storage codec"
                w1 = 0.0 if v1 < 0.0 else v1
                w2 = 0.0 if v2 < 0.0 else v2
                w3 = 0.0 if v3 < 0.0 else v3
                st(yf, o0 + i, w0)
                st(yf, o1 + i, w1)
                st(yf, o2 + i, w2)
                st(yf, o3 + i, w3)
        else:
            for i in range(np.uint64(n)):
                st(yf, o0 + i, ((ld(xf, o0 + i) - h) - lo) * a + b + ld(rf, o0 + i))
                st(yf, o1 + i, ((ld(xf, o1 + i) - h) - lo) * a + b + ld(rf, o1 + i))
                st(yf, o2 + i, ((ld(xf, o2 + i) - h) - lo) * a + b + ld(rf, o2 + i))
                st(yf, o3 + i, ((ld(xf, o3 + i) - h) - lo) * a + b + ld(rf, o3 + i))
    elif flags & RELU:
        for i in range(np.uint64(n)):
            v0 = ((ld(xf, o0 + i) - h) - lo) * a + b
            v1 = ((ld(xf, o1 + i) - h) - lo) * a + b
            v2 = ((ld(xf, o2 + i) - h) - lo) * a + b
            v3 = ((ld(xf, o3 + i) - h) - lo) * a + b
            w0 = 0.0 if v0 < 0.0 else v0  # not inside st(): see "Storage codec"
            w1 = 0.0 if v1 < 0.0 else v1
            w2 = 0.0 if v2 < 0.0 else v2
            w3 = 0.0 if v3 < 0.0 else v3
            st(yf, o0 + i, w0)
            st(yf, o1 + i, w1)
            st(yf, o2 + i, w2)
            st(yf, o3 + i, w3)
    else:
        for i in range(np.uint64(n)):
            st(yf, o0 + i, ((ld(xf, o0 + i) - h) - lo) * a + b)
            st(yf, o1 + i, ((ld(xf, o1 + i) - h) - lo) * a + b)
            st(yf, o2 + i, ((ld(xf, o2 + i) - h) - lo) * a + b)
            st(yf, o3 + i, ((ld(xf, o3 + i) - h) - lo) * a + b)


@njit(fastmath=_FM, inline="always")
def _rows_grad_sums(dy, x, yv, dz, r0, r1, mu, a1, a2, a3, flags):
    """Column-wise Σg, Σg·(x − μ̃), Σ(x − μ̃) over rows [r0, r1) with g = dy, or g = dy·[y > 0]
    written to dz (RELU)."""
    W = x.shape[1]
    if flags & RELU:
        for n in range(r0, r1):
            xr = x[n]
            gr = dy[n]
            yr = yv[n]
            zr = dz[n]
            for j in range(W):
                u = ld(gr, j)
                g = u if ld(yr, j) > 0.0 else 0.0
                st(zr, j, g)
                d = ld(xr, j) - mu[j]
                a1[j] += g
                a2[j] += g * d
                a3[j] += d
    else:
        # Four row streams over the quarters of [r0, r1), as in _rows_shifted_sums: each of the
        # three accumulators' load and store serves 4 values, every stream ascends.
        Q = (r1 - r0) // 4
        for i in range(r0, r0 + Q):
            x0 = x[i]
            x1 = x[i + Q]
            x2 = x[i + 2 * Q]
            x3 = x[i + 3 * Q]
            g0 = dy[i]
            g1 = dy[i + Q]
            g2 = dy[i + 2 * Q]
            g3 = dy[i + 3 * Q]
            for j in range(W):
                k = mu[j]
                d0 = ld(x0, j) - k
                d1 = ld(x1, j) - k
                d2 = ld(x2, j) - k
                d3 = ld(x3, j) - k
                u0 = np.float64(ld(g0, j))
                u1 = np.float64(ld(g1, j))
                u2 = np.float64(ld(g2, j))
                u3 = np.float64(ld(g3, j))
                a1[j] += (u0 + u1) + (u2 + u3)
                a2[j] += (u0 * d0 + u1 * d1) + (u2 * d2 + u3 * d3)
                a3[j] += (d0 + d1) + (d2 + d3)
        for i in range(r0 + 4 * Q, r1):
            xr = x[i]
            gr = dy[i]
            for j in range(W):
                d = ld(xr, j) - mu[j]
                u = np.float64(ld(gr, j))
                a1[j] += u
                a2[j] += u * d
                a3[j] += d


@njit(fastmath=_FM, inline="always")
def _span_dx_vec(gf, xf, df, o, n, h, lo, k1, k2, k3, flags):
    """df[o + i] = k1[i]·g + k2[i]·((x − h[i]) − l[i]) + k3[i] over the run [o, o + n), in x's
    dtype, coefficient arrays indexed like the run; DIRECT: every h = l = 0, not read."""
    o = np.uint64(o)
    if flags & DIRECT:
        for i in range(np.uint64(n)):
            j = o + i
            st(df, j, k1[i] * ld(gf, j) + k2[i] * ld(xf, j) + k3[i])
    else:
        for i in range(np.uint64(n)):
            j = o + i
            st(df, j, k1[i] * ld(gf, j) + k2[i] * ((ld(xf, j) - h[i]) - lo[i]) + k3[i])


@njit(fastmath=_FM, inline="always")
def _span_dx(gf, xf, df, o, n, h, lo, k1, k2, k3):
    """:func:`_span_dx_vec` with scalar coefficients (one channel per run: NCHW; the direct
    form is h = l = 0, as in :func:`_span_apply`)."""
    o = np.uint64(o)
    for i in range(np.uint64(n)):
        j = o + i
        st(df, j, k1 * ld(gf, j) + k2 * ((ld(xf, j) - h) - lo) + k3)


# --------------------------------------------------------------------------------------------
# NC family: x is (M, C); rows are processed L at a time as wide rows of W = L·C values.
# --------------------------------------------------------------------------------------------
@njit(inline="always")
def _chunk(M, K, k):
    """Rows [r0, r1) of chunk k of K (a function of the shape only)."""
    return (M * k) // K, (M * (k + 1)) // K


@njit(inline="always")
def _wide(a, r0, r1, L):
    """Rows [r0, r0 + L·R) of the (M, C) array ``a`` as R wide rows of L·C values, and the first
    row left over (R = (r1 − r0) // L)."""
    C = a.shape[1]
    R = (r1 - r0) // L
    flat = a.reshape(a.size)
    return flat[r0 * C:(r0 + R * L) * C].reshape(R, L * C), r0 + R * L


@njit(fastmath=_FM, inline="always")
def _nc_chunk_sums(x, r0, r1, L, wshift, a1, a2):
    """Shifted sums of rows [r0, r1) into the W-long lanes a1, a2 (zeroed here)."""
    a1[:] = 0.0
    a2[:] = 0.0
    xw, tail = _wide(x, r0, r1, L)
    _rows_shifted_sums(xw, 0, xw.shape[0], wshift, a1, a2)
    _rows_shifted_sums(x, tail, r1, wshift, a1, a2)  # leftover rows use lanes 0..C−1


@njit(fastmath=_FM, inline="always")
def _merge(part, q, C, L, acc):
    """acc[c] = Σ over chunks k, then lanes, of part[k, q, lane·C + c] (lane j holds channel
    j mod C), in that fixed order; chunk-major, so every pass is a unit-stride vector add."""
    for c in range(C):
        acc[c] = 0.0
    for k in range(part.shape[0]):
        for lane in range(L):
            p = part[k, q, lane * C:(lane + 1) * C]
            for c in range(C):
                acc[c] += p[c]


@njit(inline="always")
def _tile(v, C, L):
    """v[j] = v[j mod C] for j ≥ C (a per-channel vector repeated over the L lanes)."""
    for j in range(C, L * C):
        v[j] = v[j - C]


def nc_forward(x, y, res, gamma, beta, rmean, rvar, save_mean, save_invstd, mean64, var64,
               flags, eps, momentum, K, L, part, shift, t):
    """Forward-train over x (M, C). Scratch: ``part`` (K, 2, W) and ``shift`` (W,) float64,
    ``t`` (5, W) in x's dtype (the apply pass's h, l, α, β)."""
    M, C = x.shape
    m = float(M)
    for j in range(C):
        shift[j] = ld(x[0], j)
    _tile(shift, C, L)
    for k in prange(K):
        r0, r1 = _chunk(M, K, k)
        _nc_chunk_sums(x, r0, r1, L, shift, part[k, 0], part[k, 1])
    _merge(part, 0, C, L, mean64)  # Σ(x − K), then Σ(x − K)², per channel
    _merge(part, 1, C, L, var64)
    far = 0  # a count, not `or`, so the loop has no branch and vectorizes
    for c in range(C):
        mean64[c], var64[c] = _finish(mean64[c], var64[c], shift[c], m)
        far += 1 if _far(mean64[c], var64[c], shift[c]) else 0
    redo = far > 0
    if redo:  # an outlier first row: take the sums again around μ
        for j in range(C):
            shift[j] = mean64[j]
        _tile(shift, C, L)
        for k in prange(K):
            r0, r1 = _chunk(M, K, k)
            _nc_chunk_sums(x, r0, r1, L, shift, part[k, 0], part[k, 1])
        _merge(part, 0, C, L, mean64)
        _merge(part, 1, C, L, var64)
        for c in range(C):
            mean64[c], var64[c] = _finish(mean64[c], var64[c], shift[c], m)
    if flags & STATS_ONLY:
        return
    _train_all(t, 0, C, m, eps, gamma, beta, flags, momentum, rmean, rvar, save_mean,
               save_invstd, mean64, var64, shift)  # shift is free now: the invstd scratch
    flags = _direct(t, C, flags)
    for q in range(4):
        _tile(t[q], C, L)
    for k in prange(K):
        r0, r1 = _chunk(M, K, k)
        _nc_apply_rows(x, y, res, r0, r1, L, t, flags)


@njit(fastmath=_FM, inline="always")
def _nc_apply_rows(x, y, res, r0, r1, L, t, flags):
    """Rows [r0, r1): y = ((x − h) − l)·a + b (+ res, ReLU), as wide rows of W = L·C values,
    then the leftover rows. The rows are contiguous: flat unsigned offsets, coefficient rows
    taken once (no per-row views: a row can be as short as 64 values)."""
    C = x.shape[1]
    W = L * C
    xf = _flat(x)
    yf = _flat(y)
    rf = _flat(res)  # res is y itself when there is no residual (never read)
    h = t[0]
    lo = t[1]
    a = t[2]
    b = t[3]
    R = (r1 - r0) // L
    for i in range(R):
        _span_apply_vec(xf, yf, rf, (r0 + i * L) * C, W, h, lo, a, b, flags)
    for n in range(r0 + R * L, r1):
        _span_apply_vec(xf, yf, rf, n * C, C, h, lo, a, b, flags)


def nc_infer(x, y, res, rmean, rvar, gamma, beta, coef, t, flags, eps, K, L):
    """Inference (or any apply pass) over x (M, C): y = (x − μ)·α + β with ``coef`` (3, C)
    float64 = (μ, α, β), computed here from the population statistics unless COEF_GIVEN;
    ``t`` (5, W) in x's dtype is scratch for the split form."""
    M, C = x.shape
    _infer_coefficients(rmean, rvar, gamma, beta, coef, t, flags, eps)
    flags = _direct(t, C, flags)
    for q in range(4):
        _tile(t[q], C, L)
    for k in prange(K):
        r0, r1 = _chunk(M, K, k)
        _nc_apply_rows(x, y, res, r0, r1, L, t, flags)


def nc_backward(dy, x, yv, dx, dz, save_mean, save_invstd, gamma, dgamma, dbeta, sums, flags,
                m, precision, K, L, part, mu, t):
    """Backward over x (M, C) (RELU: g = dy·[yv > 0], written to dz). Scratch: ``part``
    (K, 3, W) and ``mu`` (W,) float64, ``t`` (5, W) in x's dtype. ``sums`` (3, C) receives
    Σg, Σg·(x − μ̃), Σ(x − μ̃), or holds them (COEF_GIVEN: sums of every process, m values per
    channel)."""
    M, C = x.shape
    for j in range(C):
        mu[j] = save_mean[j]
    _tile(mu, C, L)
    if not flags & COEF_GIVEN:
        for k in prange(K):
            r0, r1 = _chunk(M, K, k)
            a1 = part[k, 0]
            a2 = part[k, 1]
            a3 = part[k, 2]
            a1[:] = 0.0
            a2[:] = 0.0
            a3[:] = 0.0
            # Without a ReLU, yv is x and dz is dx: placeholders, never read or written here.
            xw, tail = _wide(x, r0, r1, L)
            gw, _ = _wide(dy, r0, r1, L)
            yw, _ = _wide(yv, r0, r1, L)
            zw, _ = _wide(dz, r0, r1, L)
            _rows_grad_sums(gw, xw, yw, zw, 0, xw.shape[0], mu, a1, a2, a3, flags)
            _rows_grad_sums(dy, x, yv, dz, tail, r1, mu, a1, a2, a3, flags)
        for q in range(3):
            _merge(part, q, C, L, sums[q])
    if flags & SUMS_ONLY:
        return
    _grad_all(t, 0, C, sums, m, save_mean, save_invstd, gamma, flags, precision, dgamma, dbeta)
    flags = _direct(t, C, flags)
    for q in range(5):
        _tile(t[q], C, L)
    for k in prange(K):
        r0, r1 = _chunk(M, K, k)
        if flags & RELU:  # g = dz, written by the sums pass
            _nc_dx_rows(dz, x, dx, r0, r1, L, t, flags)
        else:
            _nc_dx_rows(dy, x, dx, r0, r1, L, t, flags)


@njit(fastmath=_FM, inline="always")
def _nc_dx_rows(g, x, dx, r0, r1, L, t, flags):
    """dx = k1·g + k2·((x − h) − l) + k3 over rows [r0, r1), wide rows first (flat offsets, as
    :func:`_nc_apply_rows`)."""
    C = x.shape[1]
    W = L * C
    gf = _flat(g)
    xf = _flat(x)
    df = _flat(dx)
    h = t[0]
    lo = t[1]
    k1 = t[2]
    k2 = t[3]
    k3 = t[4]
    R = (r1 - r0) // L
    for i in range(R):
        _span_dx_vec(gf, xf, df, (r0 + i * L) * C, W, h, lo, k1, k2, k3, flags)
    for n in range(r0 + R * L, r1):
        _span_dx_vec(gf, xf, df, n * C, C, h, lo, k1, k2, k3, flags)


# --------------------------------------------------------------------------------------------
# NCHW: x is (N, C, S). Channel groups (one region) or fixed chunks of positions (few channels).
# --------------------------------------------------------------------------------------------
@njit(fastmath=_FM, inline="always")
def _span_shifted(xf, o, n, k):
    """Σ(x − k), Σ(x − k)² over the run [o, o + n) of a flat array."""
    s1 = 0.0
    s2 = 0.0
    o = np.uint64(o)
    for i in range(np.uint64(n)):
        d = ld(xf, o + i) - k
        s1 += d
        s2 += d * d
    return s1, s2


@njit(fastmath=_FM, inline="always")
def _span_grad_sums(gf, xf, yf, zf, o, n, mu, relu):
    """Σg, Σg·(x − μ̃), Σ(x − μ̃) over the run [o, o + n) (g = dy·[y > 0] written to zf under a
    ReLU)."""
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    o = np.uint64(o)
    if relu:
        for i in range(np.uint64(n)):
            j = o + i
            u = ld(gf, j)
            g = u if ld(yf, j) > 0.0 else 0.0
            st(zf, j, g)
            d = ld(xf, j) - mu
            s1 += g
            s2 += g * d
            s3 += d
    else:
        for i in range(np.uint64(n)):
            j = o + i
            u = np.float64(ld(gf, j))
            d = ld(xf, j) - mu
            s1 += u
            s2 += u * d
            s3 += d
    return s1, s2, s3


@njit(fastmath=_FM, inline="always")
def _span_grad_sums4(gf, xf, yf, zf, o0, o1, o2, o3, n, mu, relu):
    """:func:`_span_grad_sums` over the four runs [o_r, o_r + n) of one channel together (see
    :func:`_group_sums`): the sums of the four runs, added per value in a fixed order."""
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    o0 = np.uint64(o0)
    o1 = np.uint64(o1)
    o2 = np.uint64(o2)
    o3 = np.uint64(o3)
    if relu:
        for i in range(np.uint64(n)):
            u0 = ld(gf, o0 + i)
            u1 = ld(gf, o1 + i)
            u2 = ld(gf, o2 + i)
            u3 = ld(gf, o3 + i)
            g0 = u0 if ld(yf, o0 + i) > 0.0 else 0.0
            g1 = u1 if ld(yf, o1 + i) > 0.0 else 0.0
            g2 = u2 if ld(yf, o2 + i) > 0.0 else 0.0
            g3 = u3 if ld(yf, o3 + i) > 0.0 else 0.0
            st(zf, o0 + i, g0)
            st(zf, o1 + i, g1)
            st(zf, o2 + i, g2)
            st(zf, o3 + i, g3)
            d0 = ld(xf, o0 + i) - mu
            d1 = ld(xf, o1 + i) - mu
            d2 = ld(xf, o2 + i) - mu
            d3 = ld(xf, o3 + i) - mu
            s1 += (g0 + g1) + (g2 + g3)
            s2 += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3)
            s3 += (d0 + d1) + (d2 + d3)
    else:
        for i in range(np.uint64(n)):
            u0 = np.float64(ld(gf, o0 + i))
            u1 = np.float64(ld(gf, o1 + i))
            u2 = np.float64(ld(gf, o2 + i))
            u3 = np.float64(ld(gf, o3 + i))
            d0 = ld(xf, o0 + i) - mu
            d1 = ld(xf, o1 + i) - mu
            d2 = ld(xf, o2 + i) - mu
            d3 = ld(xf, o3 + i) - mu
            s1 += (u0 + u1) + (u2 + u3)
            s2 += (u0 * d0 + u1 * d1) + (u2 * d2 + u3 * d3)
            s3 += (d0 + d1) + (d2 + d3)
    return s1, s2, s3


@njit(fastmath=_FM, inline="always")
def _span_dx4(gf, xf, df, o0, o1, o2, o3, n, h, lo, k1, k2, k3):
    """:func:`_span_dx` over the four runs [o_r, o_r + n) of one channel together."""
    o0 = np.uint64(o0)
    o1 = np.uint64(o1)
    o2 = np.uint64(o2)
    o3 = np.uint64(o3)
    for i in range(np.uint64(n)):
        st(df, o0 + i, k1 * ld(gf, o0 + i) + k2 * ((ld(xf, o0 + i) - h) - lo) + k3)
        st(df, o1 + i, k1 * ld(gf, o1 + i) + k2 * ((ld(xf, o1 + i) - h) - lo) + k3)
        st(df, o2 + i, k1 * ld(gf, o2 + i) + k2 * ((ld(xf, o2 + i) - h) - lo) + k3)
        st(df, o3 + i, k1 * ld(gf, o3 + i) + k2 * ((ld(xf, o3 + i) - h) - lo) + k3)


@njit(inline="always")
def _flat(a):
    return a.reshape(a.size)


@njit(fastmath=_FM, inline="always")
def _span_shifted4(xf, o0, o1, o2, o3, n, k):
    """Σ(x − k), Σ(x − k)² over the four runs [o_r, o_r + n) together: four ascending streams
    (see :func:`_group_sums`)."""
    s1 = 0.0
    s2 = 0.0
    o0 = np.uint64(o0)
    o1 = np.uint64(o1)
    o2 = np.uint64(o2)
    o3 = np.uint64(o3)
    for i in range(np.uint64(n)):
        a = ld(xf, o0 + i) - k
        b = ld(xf, o1 + i) - k
        c = ld(xf, o2 + i) - k
        d = ld(xf, o3 + i) - k
        s1 += (a + b) + (c + d)
        s2 += (a * a + b * b) + (c * c + d * d)
    return s1, s2


@njit(fastmath=_FM, inline="always")
def _group_sums(xf, N, C, S, c0, c1, sh, t1, t2):
    """Shifted sums of channels [c0, c1) over all N rows; channel c's total is Σ, in order of n,
    of its sums over rows n..n+3 taken together (then single rows for the last N mod 4).

    Four rows at once: x[n, c0:c1, :] is contiguous for each n, so the loop reads four ascending
    streams, one per row. One row at a time it read one stream of G·S values at a time -- 12.5
    KB at 32×256×56×56 (G = 1) -- and every run restarted the hardware prefetcher: the
    statistics pass of 3 × 98 MiB cold arrays on two threads took 3.83 ms one row at a time
    and 2.70 ms four at once (round 11; 32×512×28×28: 2.90 → 1.71 ms)."""
    for i in range(c1 - c0):
        t1[i] = 0.0
        t2[i] = 0.0
    n = 0
    while n + ROWS_AT_ONCE <= N:
        for i in range(c1 - c0):
            c = c0 + i
            s1, s2 = _span_shifted4(xf, (n * C + c) * S, ((n + 1) * C + c) * S,
                                    ((n + 2) * C + c) * S, ((n + 3) * C + c) * S, S, sh[i])
            t1[i] += s1
            t2[i] += s2
        n += ROWS_AT_ONCE
    while n < N:
        for i in range(c1 - c0):
            s1, s2 = _span_shifted(xf, (n * C + c0 + i) * S, S, sh[i])
            t1[i] += s1
            t2[i] += s2
        n += 1


def nchw_forward_grouped(x, y, res, gamma, beta, rmean, rvar, save_mean, save_invstd, mean64,
                         var64, flags, eps, momentum, G):
    """Forward-train, one task per group of G channels: statistics, then y from cache."""
    N, C, S = x.shape
    m = float(N * S)
    xf = _flat(x)
    yf = _flat(y)
    rf = _flat(res)
    ngroups = (C + G - 1) // G
    for task in prange(ngroups):
        c0 = task * G
        c1 = min(C, c0 + G)
        w = c1 - c0
        sh = np.empty(w)
        t1 = np.empty(w)
        t2 = np.empty(w)
        tg = work_empty((4, w), x)  # h, l, α, β of the group's channels
        for i in range(w):
            sh[i] = ld(xf, (c0 + i) * S)
        _group_sums(xf, N, C, S, c0, c1, sh, t1, t2)
        redo = False
        for i in range(w):
            mean, var = _finish(t1[i], t2[i], sh[i], m)
            redo = redo or _far(mean, var, sh[i])
        if redo:  # an outlier first value: take the group's sums again around the means
            for i in range(w):
                sh[i], _ = _finish(t1[i], t2[i], sh[i], m)
            _group_sums(xf, N, C, S, c0, c1, sh, t1, t2)
        for i in range(w):
            mean64[c0 + i], var64[c0 + i] = _finish(t1[i], t2[i], sh[i], m)
        _train_all(tg, c0, c1, m, eps, gamma, beta, flags, momentum, rmean, rvar, save_mean,
                   save_invstd, mean64, var64, sh)  # sh is free now: the invstd scratch
        if not flags & STATS_ONLY:  # rows four at a time, as _group_sums reads them
            n = 0
            while n + ROWS_AT_ONCE <= N:
                for i in range(w):
                    c = c0 + i
                    _span_apply4(xf, yf, rf, (n * C + c) * S, ((n + 1) * C + c) * S,
                                 ((n + 2) * C + c) * S, ((n + 3) * C + c) * S, S, tg[0, i],
                                 tg[1, i], tg[2, i], tg[3, i], flags)
                n += ROWS_AT_ONCE
            while n < N:
                for i in range(w):
                    _span_apply(xf, yf, rf, (n * C + c0 + i) * S, S, tg[0, i], tg[1, i], tg[2, i],
                                tg[3, i], flags)
                n += 1


@njit(inline="always")
def _positions(m, K, k):
    return (m * k) // K, (m * (k + 1)) // K


@njit(fastmath=_FM, inline="always")
def _segment_shifted(xf, C, S, c, p0, p1, k):
    """Shifted sums of channel c over its positions [p0, p1) (position p = n·S + s)."""
    s1 = 0.0
    s2 = 0.0
    p = p0
    while p < p1:
        n = p // S
        s = p - n * S
        e = min(S, s + (p1 - p))
        a, b = _span_shifted(xf, (n * C + c) * S + s, e - s, k)
        s1 += a
        s2 += b
        p += e - s
    return s1, s2


def nchw_forward_split(x, y, res, gamma, beta, rmean, rvar, save_mean, save_invstd, mean64,
                       var64, flags, eps, momentum, K, part, shift, t):
    """Forward-train with each channel's m positions in K chunks: tasks (channel, chunk) take
    partial sums (``part`` (C, K, 2) float64), a serial merge in chunk order, then tasks
    normalize. ``shift`` (C,) float64 and ``t`` (5, C) of x's dtype (h, l, α, β) are scratch."""
    N, C, S = x.shape
    m = N * S
    fm = float(m)
    xf = _flat(x)
    for c in range(C):
        shift[c] = ld(xf, c * S)
    for task in prange(C * K):
        c = task // K
        k = task - c * K
        p0, p1 = _positions(m, K, k)
        part[c, k, 0], part[c, k, 1] = _segment_shifted(xf, C, S, c, p0, p1, shift[c])
    redo = False
    for c in range(C):
        s1 = 0.0
        s2 = 0.0
        for k in range(K):
            s1 += part[c, k, 0]
            s2 += part[c, k, 1]
        mean64[c], var64[c] = _finish(s1, s2, shift[c], fm)
        redo = redo or _far(mean64[c], var64[c], shift[c])
    if redo:
        for c in range(C):
            shift[c] = mean64[c]
        for task in prange(C * K):
            c = task // K
            k = task - c * K
            p0, p1 = _positions(m, K, k)
            part[c, k, 0], part[c, k, 1] = _segment_shifted(xf, C, S, c, p0, p1, shift[c])
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            for k in range(K):
                s1 += part[c, k, 0]
                s2 += part[c, k, 1]
            mean64[c], var64[c] = _finish(s1, s2, shift[c], fm)
    _train_all(t, 0, C, fm, eps, gamma, beta, flags, momentum, rmean, rvar, save_mean,
               save_invstd, mean64, var64, shift)  # shift is free now: the invstd scratch
    if flags & STATS_ONLY:
        return
    for task in prange(C * K):
        c = task // K
        k = task - c * K
        p0, p1 = _positions(m, K, k)
        _segment_apply(xf, _flat(y), _flat(res), C, S, c, p0, p1, t[0, c], t[1, c], t[2, c],
                       t[3, c], flags)


@njit(fastmath=_FM, inline="always")
def _segment_apply(xf, yf, rf, C, S, c, p0, p1, h, lo, a, b, flags):
    p = p0
    while p < p1:
        n = p // S
        s = p - n * S
        e = min(S, s + (p1 - p))
        _span_apply(xf, yf, rf, (n * C + c) * S + s, e - s, h, lo, a, b, flags)
        p += e - s


def nchw_infer(x, y, res, rmean, rvar, gamma, beta, coef, t, flags, eps, R):
    """Inference (or any apply pass) over x (N, C, S): tasks of R consecutive (n, c) rows of the
    (N·C, S) view, contiguous in memory; ``coef`` (3, C) and ``t`` as in :func:`nc_infer`."""
    N, C, S = x.shape
    _infer_coefficients(rmean, rvar, gamma, beta, coef, t, flags, eps)
    xf = _flat(x)
    yf = _flat(y)
    rf = _flat(res)
    rows = N * C
    ntasks = (rows + R - 1) // R
    for task in prange(ntasks):
        r0 = task * R
        c = r0 % C  # one division per task; then the channel steps with the row
        for r in range(r0, min(rows, r0 + R)):
            _span_apply(xf, yf, rf, r * S, S, t[0, c], t[1, c], t[2, c], t[3, c], flags)
            c += 1
            if c == C:
                c = 0


def nchw_backward_grouped(dy, x, yv, dx, dz, save_mean, save_invstd, gamma, dgamma, dbeta, sums,
                          flags, m, precision, G):
    """Backward, one task per group of G channels: the sums, then dx from cache. ``sums``
    (3, C) receives (or, with COEF_GIVEN, holds) Σg, Σg·(x − μ̃), Σ(x − μ̃)."""
    N, C, S = x.shape
    ngroups = (C + G - 1) // G
    relu = flags & RELU
    gf = _flat(dy)
    xf = _flat(x)
    yf = _flat(yv)
    zf = _flat(dz)
    df = _flat(dx)
    short = S * x.itemsize <= ROWS_AT_ONCE_BELOW  # see ROWS_AT_ONCE
    for task in prange(ngroups):
        c0 = task * G
        c1 = min(C, c0 + G)
        w = c1 - c0
        if not flags & COEF_GIVEN:
            for i in range(w):
                sums[0, c0 + i] = 0.0
                sums[1, c0 + i] = 0.0
                sums[2, c0 + i] = 0.0
            n = 0
            while short and n + ROWS_AT_ONCE <= N:  # rows four at a time (see _group_sums)
                for i in range(w):
                    c = c0 + i
                    a, b, d = _span_grad_sums4(gf, xf, yf, zf, (n * C + c) * S,
                                               ((n + 1) * C + c) * S, ((n + 2) * C + c) * S,
                                               ((n + 3) * C + c) * S, S,
                                               np.float64(save_mean[c]), relu)
                    sums[0, c] += a
                    sums[1, c] += b
                    sums[2, c] += d
                n += ROWS_AT_ONCE
            while n < N:
                for i in range(w):
                    c = c0 + i
                    a, b, d = _span_grad_sums(gf, xf, yf, zf, (n * C + c) * S, S,
                                              np.float64(save_mean[c]), relu)
                    sums[0, c] += a
                    sums[1, c] += b
                    sums[2, c] += d
                n += 1
        if not flags & SUMS_ONLY:
            tg = work_empty((5, w), x)  # h, l, k1, k2, k3 of the group's channels
            _grad_all(tg, c0, c1, sums, m, save_mean, save_invstd, gamma, flags, precision,
                      dgamma, dbeta)
            gz = zf if relu else gf  # g: dz under a ReLU (written by the sums pass)
            n = 0
            while short and n + ROWS_AT_ONCE <= N:
                for i in range(w):
                    c = c0 + i
                    _span_dx4(gz, xf, df, (n * C + c) * S, ((n + 1) * C + c) * S,
                              ((n + 2) * C + c) * S, ((n + 3) * C + c) * S, S, tg[0, i],
                              tg[1, i], tg[2, i], tg[3, i], tg[4, i])
                n += ROWS_AT_ONCE
            while n < N:
                for i in range(w):
                    _span_dx(gz, xf, df, (n * C + c0 + i) * S, S, tg[0, i], tg[1, i], tg[2, i],
                             tg[3, i], tg[4, i])
                n += 1


@njit(fastmath=_FM, inline="always")
def _segment_grad_sums(gf, xf, yf, zf, C, S, c, p0, p1, mu, relu):
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    p = p0
    while p < p1:
        n = p // S
        s = p - n * S
        e = min(S, s + (p1 - p))
        a, b, d = _span_grad_sums(gf, xf, yf, zf, (n * C + c) * S + s, e - s, mu, relu)
        s1 += a
        s2 += b
        s3 += d
        p += e - s
    return s1, s2, s3


def nchw_backward_split(dy, x, yv, dx, dz, save_mean, save_invstd, gamma, dgamma, dbeta, sums,
                        flags, m, precision, K, part, t):
    """Backward with each channel's positions in K chunks (``part`` (C, K, 3) float64 and ``t``
    (5, C) of x's dtype are scratch); ``sums`` as in :func:`nchw_backward_grouped`."""
    N, C, S = x.shape
    mm = N * S
    relu = flags & RELU
    gf = _flat(dy)
    xf = _flat(x)
    yf = _flat(yv)
    zf = _flat(dz)
    df = _flat(dx)
    if not flags & COEF_GIVEN:
        for task in prange(C * K):
            c = task // K
            k = task - c * K
            p0, p1 = _positions(mm, K, k)
            part[c, k, 0], part[c, k, 1], part[c, k, 2] = _segment_grad_sums(
                gf, xf, yf, zf, C, S, c, p0, p1, np.float64(save_mean[c]), relu)
        for c in range(C):
            s1 = 0.0
            s2 = 0.0
            s3 = 0.0
            for k in range(K):
                s1 += part[c, k, 0]
                s2 += part[c, k, 1]
                s3 += part[c, k, 2]
            sums[0, c] = s1
            sums[1, c] = s2
            sums[2, c] = s3
    if flags & SUMS_ONLY:
        return
    _grad_all(t, 0, C, sums, m, save_mean, save_invstd, gamma, flags, precision, dgamma, dbeta)
    for task in prange(C * K):
        c = task // K
        k = task - c * K
        p0, p1 = _positions(mm, K, k)
        p = p0
        while p < p1:
            n = p // S
            s = p - n * S
            e = min(S, s + (p1 - p))
            o = (n * C + c) * S + s
            if relu:
                _span_dx(zf, xf, df, o, e - s, t[0, c], t[1, c], t[2, c], t[3, c], t[4, c])
            else:
                _span_dx(gf, xf, df, o, e - s, t[0, c], t[1, c], t[2, c], t[3, c], t[4, c])
            p += e - s


# --------------------------------------------------------------------------------------------
# The dispatchers: (parallel, serial) twins of every kernel
# --------------------------------------------------------------------------------------------
NC_FORWARD = twin(nc_forward)
NC_INFER = twin(nc_infer)
NC_BACKWARD = twin(nc_backward)
NCHW_FORWARD_GROUPED = twin(nchw_forward_grouped)
NCHW_FORWARD_SPLIT = twin(nchw_forward_split)
NCHW_INFER = twin(nchw_infer)
NCHW_BACKWARD_GROUPED = twin(nchw_backward_grouped)
NCHW_BACKWARD_SPLIT = twin(nchw_backward_split)
