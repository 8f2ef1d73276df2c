"""What is particular to the cpu backend: accuracy at large m and offsets, determinism across
thread counts, the statistics' re-shift, the rounded-mean fold, its variants, scratch reuse.
(Every kernel against the reference: test_conformance.py.)"""

import numba
import numpy as np
import pytest

import nbbn
from nbbn import cpu, registry, validate
from nbbn import reference as ref
from nbbn.cpu import backend as B
from nbbn.cpu import kernels as K
from nbbn.tolerances import rel_err, tolerance

from .helpers import exact_backward, make_params, make_x


@pytest.mark.slow
@pytest.mark.parametrize("shape, axis", [((2**24 + 1, 1), 1), ((1, 1, 2**24 + 1), 1),
                                         ((2**12 + 1, 2, 2**11), 1), ((2**12 + 1, 2**11, 2), -1)],
                         ids=str)
def test_float32_large_m_and_offset_1e4(shape, axis):
    """m up to 2^24 + 1 (float32 counts stop being exact), |mean|/std = 1e4: σ² within 1e-5,
    y within 1e-5 of the float64 reference."""
    x = make_x(shape, np.float32, 1e4 * 0.5)  # std 0.5·(0.5..2), mean ≈ 5e3: κ ≈ 1e4
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x.reshape(shape[0], shape[2], shape[1]), 1, 2))
    mean, var = cpu.batch_stats(x, axis)
    rmean, rvar = ref.batch_stats(x, axis)
    assert np.all(np.abs(rmean) / np.sqrt(rvar) > 2e3)
    assert rel_err(var, rvar) <= tolerance("var", np.float32)
    y, sm, si = nbbn.batch_norm_train(x, channel_axis=axis)
    ry, _, rinvstd, _ = ref.forward_train(x, channel_axis=axis)
    assert rel_err(y, ry) <= tolerance("y", np.float32)
    assert rel_err(si, rinvstd) <= tolerance("save_invstd", np.float32)


# Shapes above the serial threshold, so the parallel kernels run: NC (narrow and wide), NHWC,
# NCHW grouped, NCHW split (C < 16).
PARALLEL = [((5000, 3), 1), ((700, 130), 1), ((6, 20, 20, 17), -1), ((8, 37, 15, 15), 1),
            ((3, 2, 130, 131), 1)]


@pytest.mark.parametrize("shape, axis", PARALLEL, ids=str)
def test_bit_identical_with_one_and_two_threads(shape, axis):
    """Sums run in an order fixed by the shape: the thread count only distributes the tasks."""
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads (NUMBA_NUM_THREADS >= 2)")
    x = make_x(shape, np.float32, 100.0)
    C = shape[axis]
    gamma, beta = make_params(C, dtype=np.float32)
    dy = make_x(shape, np.float32, seed=5)
    res = make_x(shape, np.float32, seed=6)

    def run():
        y, sm, si = nbbn.batch_norm_train(x, gamma, beta, channel_axis=axis, relu=True,
                                          residual=res)
        grads = nbbn.batch_norm_backward(dy, x, sm, si, gamma, channel_axis=axis, relu=True,
                                         y=y)
        yi = nbbn.batch_norm_infer(x, sm, 1 / si**2, gamma, beta, channel_axis=axis)
        return (y, sm, si, *grads, yi)

    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = run()
        numba.set_num_threads(2)
        two = run()
    finally:
        numba.set_num_threads(before)
    for a, b in zip(one, two, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(200_000, 2), (4, 3, 100, 100), (1, 20, 60, 60)], ids=str)
def test_outlier_first_value_is_reshifted(shape, dtype):
    """The statistics shift by the first value; when that value is an outlier (here √m·σ away,
    the most Samuelson's inequality allows), the sums are taken again around μ, so the float64
    variance stays within its bound (the sums are float64 for either x dtype; float64 x runs
    the parallel kernels' float64 specializations, in the exhaustive tier)."""
    x = np.random.default_rng(3).standard_normal(shape).astype(dtype)
    x[(0,) * len(shape)] = np.sqrt(x.size / shape[1]) * 50.0
    mean, var = cpu.batch_stats(x)
    rmean, rvar = ref.batch_stats(x)
    assert rel_err(var, rvar) <= 1e-13
    # The mean within 1e-13·σ: the scale BN subtracts it at. float64 x also relative to itself
    # (float32's NC case has a channel with |μ| = 6e-4·σ, within 2e-12 of itself, not 1e-13).
    assert (np.abs(mean - rmean) <= 1e-13 * np.sqrt(rvar)).all()
    if dtype is np.float64:
        assert rel_err(mean, rmean) <= 1e-13


@pytest.mark.parametrize("shape, axis", [((2, 64), 1), ((2, 5, 3, 3), 1), ((2, 3, 3, 5), -1)],
                         ids=str)
def test_rounded_mean_is_folded(shape, axis):
    """float32, mean ±1e3, N = 2: save_mean is off by up to half an ulp (3e-5·σ); backward
    folds Σ(x − save_mean)/m back in, so dx is within 1e-4 of the exact gradient relative to
    ‖γ·invstd·dy‖ (the old kernels: ~2e-4)."""
    rng = np.random.default_rng(0)
    C = shape[axis]
    sign = np.where(np.arange(C) % 2 == 0, 1.0, -1.0)
    bshape = [1] * len(shape)
    bshape[axis] = C
    x = (1e3 * sign.reshape(bshape) + rng.standard_normal(shape)).astype(np.float32)
    gamma, _ = make_params(C, dtype=np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    _, sm, si = nbbn.batch_norm_train(x, gamma, channel_axis=axis)
    _, mean, invstd, _ = ref.forward_train(x, gamma, channel_axis=axis)
    dx, _, _ = nbbn.batch_norm_backward(dy, x, sm, si, gamma, channel_axis=axis)
    # the exact gradient: shift x by the float64 mean (see test_conformance._exact_backward)
    xs = x.astype(np.float64) - mean.reshape(bshape)
    rdx, _, _ = ref.backward(dy, xs, ref.batch_stats(xs, axis)[0], invstd, gamma,
                             channel_axis=axis)
    scale = ref.dx_scale(dy, invstd, gamma, channel_axis=axis)
    assert rel_err(dx, rdx, scale) <= 1e-4
    if x.size // C == 2:  # m = 2 (the case): without the fold it is outside the bound
        old, _, _ = ref.backward(dy, x, sm, si, gamma, channel_axis=axis)
        assert rel_err(old, rdx, scale) > 1e-4


def test_split_and_direct_forms():
    """A channel with |μ| ≤ DIRECT_MAX·σ = 8σ is normalized as x·α + (β − μ·α) (h = l = 0), one
    further away as ((x − h) − l)·α + β; the threshold is exact and NaN keeps the split form."""
    K = cpu.kernels
    t = np.ones((5, 1), np.float32)
    assert K.DIRECT_MAX == 8.0
    assert K._split(t, 0, 7.9, 1.0) == 7.9 and t[0, 0] == 0 and t[1, 0] == 0
    assert K._split(t, 0, -16.0, 2.0) == -16.0  # |μ| = 8σ: direct
    assert K._split(t, 0, 8.1, 1.0) == 0.0 and t[0, 0] == np.float32(8.1)
    assert t[1, 0] == np.float32(8.1 - float(np.float32(8.1)))
    assert K._split(t, 0, np.nan, 1.0) == 0.0
    assert K._split(t, 0, 1.0, 0.0) == 0.0  # σ unknown (given coefficients): split
    assert K._split(t, 0, 1.0, np.nan) == 0.0


@pytest.mark.parametrize("shape, axis", [((3000, 6), 1), ((700, 130), 1), ((4, 6, 20, 20), 1),
                                         ((4, 20, 20, 6), -1)], ids=str)
def test_mixed_forms_match_the_reference_and_each_other(shape, axis):
    """Channels at |μ|/σ of 0 to 1e4 in one call: every output within the float32 tolerance of
    the float64 reference, and the channels that take the direct form give the same bits
    whether the other channels are direct too (the NC family's loop that reads no h, l) or not
    (the split loop with h = l = 0)."""
    rng = np.random.default_rng(4)
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    sd = np.linspace(0.5, 2.0, C)
    ratio = np.resize([0.0, 4.6, -7.9, 8.5, 100.0, 1e4], C)  # |μ|/σ per channel
    base = rng.standard_normal(shape)
    x = (base * sd.reshape(bshape) + (ratio * sd).reshape(bshape)).astype(np.float32)
    gamma, beta = make_params(C, dtype=np.float32)
    dy = make_x(shape, np.float32, seed=5)
    y, sm, si = nbbn.batch_norm_train(x, gamma, beta, channel_axis=axis)
    ry, rmean, rinvstd, _ = ref.forward_train(x, gamma, beta, channel_axis=axis)
    assert rel_err(y, ry) <= tolerance("y", np.float32)
    # elementwise: within 2·DIRECT_MAX + 16 float32 ulps of |γ| + |β| + |y| in every channel
    # (the split form keeps the far channels there; the direct form there would miss by ~|μ|/σ)
    g, b = (np.abs(v.astype(np.float64)).reshape(bshape) for v in (gamma, beta))
    bound = (2 * 8 + 16) * 2.0**-24 * (g + b + np.abs(ry))
    assert np.all(np.abs(y - ry) <= bound)
    var = (1 / si.astype(np.float64) ** 2 - 1e-5).astype(np.float32)  # x's dtype, as sm's
    yi = nbbn.batch_norm_infer(x, sm, var, gamma, beta, channel_axis=axis)
    ryi = ref.inference(x, sm, var, gamma, beta, channel_axis=axis)
    assert rel_err(yi, ryi) <= tolerance("y", np.float32)
    dx, dg, db = nbbn.batch_norm_backward(dy, x, sm, si, gamma, channel_axis=axis)
    rdx, rdg, rdb = ref.backward(dy, x, sm, si, gamma, channel_axis=axis)
    scale = ref.dx_scale(dy, si, gamma, channel_axis=axis)
    assert rel_err(dx, rdx, scale) <= tolerance("dx", np.float32)
    # the far channels brought near (same shape, so the same sums for the near ones): now every
    # channel is direct
    near = np.abs(ratio) <= 7.9
    x2 = np.where(near.reshape(bshape), x, (base * sd.reshape(bshape)).astype(np.float32))
    y2, sm2, si2 = nbbn.batch_norm_train(x2, gamma, beta, channel_axis=axis)
    dx2, _, _ = nbbn.batch_norm_backward(dy, x2, sm2, si2, gamma, channel_axis=axis)
    idx = np.flatnonzero(near)
    for a, b in ((y2, y), (dx2, dx)):
        np.testing.assert_array_equal(np.take(a, idx, axis=axis), np.take(b, idx, axis=axis))


def test_a_different_mean_is_used_as_given():
    """A save_mean that is not this batch's (e.g. a global mean in synchronized BN) is no
    rounding error: backward uses it as it is."""
    x = make_x((50, 7), np.float64, 3.0)
    dy = make_x((50, 7), np.float64, seed=2)
    other = x.mean(axis=0) + 0.25
    invstd = np.full(7, 0.8)
    got = nbbn.batch_norm_backward(dy, x, other, invstd)
    want = ref.backward(dy, x, other, invstd)
    for a, b in zip(got, want, strict=True):
        assert rel_err(a, b) <= 1e-13


def test_a_float64_mean_given_with_float32_data_is_used_exactly():
    """A float64 save_mean with float32 data is subtracted as it is: a given mean 0.4 float32
    ulps off any float32 (not this batch's, so used as given) gives dγ to float32 rounding;
    rounded to float32 first, dγ is off by more than 1e-5 relative."""
    x = make_x((2, 3, 10, 10), np.float32, 1e3)
    dy = (1.0 + 0.1 * make_x((2, 3, 10, 10), np.float64, 2.3, seed=2)).astype(np.float32)
    m32 = np.float32(x.astype(np.float64).mean(axis=(0, 2, 3)) + 0.25)
    given = m32.astype(np.float64) + 0.4 * np.spacing(m32).astype(np.float64)
    assert np.all(given.astype(np.float32).astype(np.float64) != given)
    invstd = np.full(3, 0.8)
    got = nbbn.batch_norm_backward(dy, x, given, invstd)
    want = ref.backward(dy, x, given, invstd)
    rounded = ref.backward(dy, x, given.astype(np.float32), invstd)
    assert rel_err(rounded[1], want[1]) > 1e-5  # the case tells the two means apart
    for name, a, b, bound in zip(("dx", "dgamma", "dbeta"), got, want, (1e-6, 2e-7, 2e-7),
                                 strict=True):
        assert rel_err(a, b) <= bound, name


@pytest.mark.parametrize("dtype", [np.float32, pytest.param(np.float64, marks=pytest.mark.slow)],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(5, 20, 9, 9), (6, 18, 2, 600)], ids=str)
def test_nchw_rows_four_at_a_time_match_the_reference(shape, dtype):
    """NCHW grouped kernels stream rows n four at a time (kernels.ROWS_AT_ONCE) and the last
    N mod 4 one at a time; backward only for runs of ≤ ROWS_AT_ONCE_BELOW bytes: 81-value runs
    take both loops in both ops, 1200-value runs the four-row loop in forward and the one-row
    loop in backward. ReLU and residual included (their own loop bodies)."""
    assert shape[2] * shape[3] * np.dtype(dtype).itemsize > K.ROWS_AT_ONCE_BELOW or \
        shape[2] * shape[3] * 8 <= K.ROWS_AT_ONCE_BELOW
    x = make_x(shape, dtype, 1.0)
    C = shape[1]
    gamma, beta = make_params(C, dtype=dtype)
    dy = make_x(shape, dtype, seed=5)
    res = make_x(shape, dtype, seed=6)
    assert B.plan("forward", (shape[0], C, shape[2] * shape[3]), x.itemsize,
                  "auto").kernel in K.NCHW_FORWARD_GROUPED
    for relu in (False, True):
        y, sm, si = nbbn.batch_norm_train(x, gamma, beta, relu=relu, residual=res)
        ry, mean, invstd, _ = ref.forward_train(x, gamma, beta, relu=relu, residual=res)
        assert rel_err(y, ry) <= tolerance("y", dtype)
        got = nbbn.batch_norm_backward(dy, x, sm, si, gamma, relu=relu, y=y if relu else None)
        want = exact_backward(dy, x, mean, invstd, gamma, relu=relu, y=y if relu else None)
        scale = ref.dx_scale(dy, invstd, gamma)
        assert rel_err(got[0], want[0], scale) <= tolerance("dx", dtype)
        for name, a, b in zip(("dgamma", "dbeta"), got[1:3], want[1:3], strict=True):
            assert rel_err(a, b) <= tolerance(name, dtype), name


def test_variants_are_registered_per_layout():
    for op in ("forward-train", "backward", "inference"):
        assert set(registry.variants("cpu", op, "NCHW")) == {"auto", "grouped", "split",
                                                             "serial"}
        for layout in ("NC", "NHWC"):
            assert set(registry.variants("cpu", op, layout)) == {"auto", "rows", "serial"}
    assert registry.variants("cpu", "backward", "NC")[0] == "auto"  # the default first
    with pytest.raises(ValueError, match="no variant 'tiles'"):
        registry.select("cpu", "backward", "NC", "tiles")


def test_auto_depends_on_the_shape_only():
    """The plan of a shape never reads the thread count (determinism), and small calls run the
    serial kernels."""
    assert B.nc_plan(32768, 1024, 4) == (64, 1)
    assert B.nc_plan(8, 16, 4) == (1, 4)
    # few rows, many channels: chunks of >= MIN_CHUNK_ROWS rows, partials << x
    K_, L = B.nc_plan(256, 4096, 4)
    assert (K_, L) == (8, 1) and K_ * 3 * 4096 * 8 <= 256 * 4096 * 4 // 4
    # 49 rows of 2048 (batch-1 NHWC 7×7): two chunks for the reductions, one for inference;
    # 64 of 256 (64 KB): two for backward only; one where the rows are below 2·MIN_SPLIT_ROWS
    assert B.nc_plan(49, 2048, 4, "forward") == B.nc_plan(49, 2048, 4, "backward") == (2, 1)
    assert B.nc_plan(49, 2048, 4) == (1, 1)
    assert B.nc_plan(64, 256, 4, "backward") == (2, 1)
    assert B.nc_plan(64, 256, 4, "forward") == B.nc_plan(64, 256, 4) == (1, 1)
    assert B.nc_plan(15, 4096, 4, "backward") == (1, 1)
    assert B.nc_plan(16, 4096, 4, "backward") == (2, 1)
    # an odd count below 2·EVEN_BELOW rounds down to even (3 -> 2, 5 -> 4, 7 -> 6)
    assert [B.nc_plan(M, 1024, 4)[0] for M in (100, 170, 240, 300)] == [2, 4, 6, 9]
    assert B.nc_plan(196, 256, 4) == (2, 1)
    # the reductions take chunks of 256 KiB (fresh row streams per chunk cost on cold data),
    # inference 64 KiB: 1568×512 (3.2 MB) makes 12 and 49
    assert B.nc_plan(1568, 512, 4, "forward") == B.nc_plan(1568, 512, 4, "backward") == (12, 1)
    assert B.nc_plan(1568, 512, 4) == (49, 1)
    # NCHW inference: tasks of at most INFER_TASK_BYTES, an even count below 2·EVEN_BELOW, the
    # rows spread evenly (1×2048×7×7: 6 tasks of 342 rows, not 7 of 334; 1×256×14×14: 4 of 64,
    # not 83, 83, 83 and 7)
    assert B.nchw_infer_rows(1, 2048, 49, 4) == 342
    assert B.nchw_infer_rows(1, 256, 196, 4) == 64
    assert B.nchw_infer_rows(32, 2048, 49, 4) == 333  # 197 tasks of 333 rows or fewer
    assert B.nchw_infer_rows(1, 3, 1 << 20, 4) == 2  # 3 rows of 4 MB: 2 tasks, not 3
    assert B.nchw_group(32, 2048, 49, 4) * 32 * 49 * 4 <= B.GROUP_BYTES
    for family, limit in B.SERIAL_MAX.items():
        assert B._twin(("par", "ser"), 128, "auto", family) == "ser"
        assert B._twin(("par", "ser"), limit, "auto", family) == "ser"
        assert B._twin(("par", "ser"), limit + 1, "auto", family) == "par"
        assert B._twin(("par", "ser"), 1 << 20, "serial", family) == "ser"
        # one task: no parallel region under auto; a variant named asks for it anyway
        assert B._twin(("par", "ser"), 1 << 20, "auto", family, tasks=1) == "ser"
        assert B._twin(("par", "ser"), 1 << 20, "rows", family, tasks=1) == "par"
    assert B.SERIAL_MAX["nc"] < B.SERIAL_MAX["nchw"]  # round 6: the NC twins are slower
    # the plans: inference and forward of 64×256 (one chunk) run the serial kernel, backward
    # (two) the parallel one
    assert B.plan("apply", (64, 256), 4, "auto").kernel is K.NC_INFER[1]
    assert B.plan("forward", (64, 256), 4, "auto").kernel is K.NC_FORWARD[1]
    assert B.plan("backward", (64, 256), 4, "auto").kernel is K.NC_BACKWARD[0]


@pytest.mark.parametrize("shape", [(49, 2048), (17, 4099)], ids=str)
def test_two_chunks_of_few_rows_match_the_reference(shape):
    """Few rows and many channels: forward-train and backward sum over two row chunks of
    24/25 and 8/9 rows (nc_plan's MIN_SPLIT_ROWS; a ragged C), merged in a fixed order."""
    M, C = shape
    assert B.nc_plan(M, C, 4, "forward")[0] == 2
    x = make_x(shape, np.float32, 100.0)
    dy = make_x(shape, np.float32, seed=5)
    gamma, beta = make_params(C, dtype=np.float32)
    y, sm, si = nbbn.batch_norm_train(x, gamma, beta)
    ey, emean, einvstd, _ = ref.forward_train(x, gamma, beta)
    assert rel_err(y, ey) <= tolerance("y", np.float32)
    assert rel_err(sm, emean) <= tolerance("save_mean", np.float32)
    assert rel_err(si, einvstd) <= tolerance("save_invstd", np.float32)
    dx, dg, db = nbbn.batch_norm_backward(dy, x, sm, si, gamma)
    edx, edg, edb = exact_backward(dy, x, emean, einvstd, gamma)
    assert rel_err(dx, edx, ref.dx_scale(dy, einvstd, gamma)) <= tolerance("dx", np.float32)
    assert rel_err(dg, edg) <= tolerance("dgamma", np.float32)
    assert rel_err(db, edb) <= tolerance("dbeta", np.float32)


def test_the_vectorizable_ulp_equals_frexp_and_ldexp():
    """The backward's fold computes μ̃'s ulp by integer operations on its bits (kernels._ulp), in
    place of math.frexp and math.ldexp: bit for bit the same on zeros, subnormals, normals
    across the exponent range, infinities, NaN and random bit patterns, at every precision the
    fold uses (float16's 11 bits, bfloat16's 8, float32's 24, float64's 53)."""
    import math

    from numba import njit

    from nbbn.cpu.kernels import _ulp

    @njit
    def by_bits(a, p):
        return np.array([_ulp(v, p) for v in a])

    @njit
    def by_libm(a, p):
        return np.array([math.ldexp(1.0, math.frexp(v)[1] - p) for v in a])

    rng = np.random.default_rng(0)
    special = [0.0, -0.0, np.inf, -np.inf, np.nan, 5e-324, -5e-324, 2.2250738585072014e-308,
               2.225073858507201e-308, 1e-310, 0.5, 1.0, -1.0, 1.7976931348623157e308]
    values = np.concatenate([special,
                             rng.standard_normal(500) * 10.0 ** rng.integers(-320, 308, 500),
                             rng.integers(0, 2**63, 500, dtype=np.int64).view(np.float64)])
    for p in (8, 11, 24, 53):
        np.testing.assert_array_equal(by_bits(values, p).view(np.int64),
                                      by_libm(values, p).view(np.int64), err_msg=str(p))


def test_scratch_is_reused_across_calls():
    x = make_x((300, 130), np.float32)
    nbbn.batch_norm_train(x)
    first = B._LOCAL.buf
    for _ in range(3):
        nbbn.batch_norm_train(x)
        nbbn.batch_norm_backward(x, x, np.zeros(130, np.float32), np.ones(130, np.float32))
    assert B._LOCAL.buf is first or B._LOCAL.buf.size > first.size


def test_strided_running_statistics_are_updated_in_place():
    x = make_x((20, 4), np.float64, 1.0)
    big = np.zeros((4, 2))
    rm, rv = big[:, 0], big[:, 1]
    nbbn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=1.0)
    mean, var = ref.batch_stats(x)
    np.testing.assert_allclose(big[:, 0], mean, rtol=1e-14)
    np.testing.assert_allclose(big[:, 1], var * 20 / 19, rtol=1e-13)


def test_vectors_of_another_dtype_or_layout_give_the_same_results():
    """Per-channel inputs that are not contiguous writeable arrays of x's dtype (float64 with
    float32 x, strided, read-only) reach the kernels converted (backend._vecs), with the same
    outputs as the usual ones, and running statistics converted for the kernel are written back
    into the caller's arrays."""
    x = make_x((40, 6), np.float32, 3.0)
    dy = make_x((40, 6), np.float32, seed=2)
    gamma, beta = make_params(6, dtype=np.float32)
    rm, rv = np.zeros(6, np.float32), np.ones(6, np.float32)
    y, sm, si = nbbn.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv)
    dx = nbbn.batch_norm_backward(dy, x, sm, si, gamma)
    yi = nbbn.batch_norm_infer(x, rm, rv, gamma, beta)
    ro = gamma.copy()
    ro.flags.writeable = False
    wide = np.zeros((6, 2))  # float64, strided: converted, then written back
    wide[:, 1] = 1.0
    strided_beta = np.repeat(beta, 2)[::2]
    y2, sm2, si2 = nbbn.batch_norm_train(x, ro, strided_beta, running_mean=wide[:, 0],
                                         running_var=wide[:, 1])
    np.testing.assert_array_equal(y2, y)
    np.testing.assert_array_equal(sm2, sm)
    np.testing.assert_allclose(wide[:, 0], rm, rtol=1e-6)
    np.testing.assert_allclose(wide[:, 1], rv, rtol=1e-6)
    for a, b in zip(nbbn.batch_norm_backward(dy, x, np.repeat(sm, 2)[::2], si, ro), dx,
                    strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(nbbn.batch_norm_infer(x, rm.astype(np.float64), rv, ro,
                                                        strided_beta), yi)


def test_parts_split_a_batch():
    """registry.Parts: statistics of two halves merged, normalized and differentiated with the
    global sums equal the whole batch's forward and backward."""
    P = registry.parts("cpu")
    x = make_x((30, 5, 3, 3), np.float32, 20.0)
    dy = make_x((30, 5, 3, 3), np.float32, seed=9)
    halves = (x[:13], x[13:])
    stats = [P.stats(validate.train_args(h, None, None, 1e-5, None, None, 0.1, None))
             for h in halves]
    n = [h.shape[0] * 9 for h in halves]
    m = sum(n)
    mean = (n[0] * stats[0][0] + n[1] * stats[1][0]) / m
    m2 = stats[0][1] + stats[1][1] + (stats[1][0] - stats[0][0]) ** 2 * n[0] * n[1] / m
    y, sm, si, = ref.forward_train(x)[0], *ref.forward_train(x)[1:3]
    ys = [P.normalize(validate.train_args(h, None, None, 1e-5, None, None, 0.1, None), mean,
                      m2 / m, m)[0] for h in halves]
    assert rel_err(np.concatenate(ys), y) <= tolerance("y", np.float32)
    smf, sif = sm.astype(np.float32), si.astype(np.float32)
    bargs = [validate.backward_args(d, h, smf, sif, None, None)
             for d, h in ((dy[:13], x[:13]), (dy[13:], x[13:]))]
    sums = [P.grad_sums(a) for a in bargs]
    sdy = sums[0][0] + sums[1][0]
    sdyx = sums[0][1] + sums[1][1]
    dxs = [P.grad_apply(a, sdy, sdyx, m)[0] for a in bargs]
    rdx = ref.backward(dy, x, smf, sif)[0]
    assert rel_err(np.concatenate(dxs), rdx, ref.dx_scale(dy, sif)) <= tolerance("dx",
                                                                                  np.float32)


def test_read_only_inputs_are_read_in_place_by_the_writeable_typed_kernels():
    """A read-only x reaches the kernels as a writeable alias of its own memory (no copy, and
    the caller's array stays read-only), so no kernel compiles a read-only specialization."""
    x = make_x((64, 6), np.float32, 3.0)
    x.flags.writeable = False
    geom = validate.geometry(x)
    v = B._input(x, geom, "x")
    assert v.flags.writeable and not x.flags.writeable
    assert v.__array_interface__["data"][0] == x.__array_interface__["data"][0]
    gamma, beta = make_params(6, dtype=np.float32)
    y, sm, si = nbbn.batch_norm_train(x, gamma, beta)
    np.testing.assert_array_equal(y, nbbn.batch_norm_train(x.copy(), gamma, beta)[0])
    np.testing.assert_array_equal(x, make_x((64, 6), np.float32, 3.0))
    for pair in (K.NC_FORWARD, K.NC_BACKWARD, K.NC_INFER):
        for sig in pair[1].signatures:
            assert all(t.mutable for t in sig if isinstance(t, numba.types.Array)), sig
