"""The public API's contract, on the cpu backend: defaults, running statistics, memory layouts,
preallocated outputs, dtypes, NaN/Inf. (Kernels against the reference: test_conformance.py.)"""

import numpy as np
import pytest

import nbbn
from nbbn import reference as ref
from nbbn import validate
from nbbn.spec import Op

from .helpers import assert_close, make_params, make_x


@pytest.mark.parametrize("shape", [(9, 4), (3, 4, 5, 5)], ids=str)
def test_no_affine_means_unit_gamma_zero_beta(shape):
    x = make_x(shape, np.float64, 3.0)
    C = shape[1]
    y, sm, si = nbbn.batch_norm_train(x)
    y1, *_ = nbbn.batch_norm_train(x, np.ones(C), np.zeros(C))
    np.testing.assert_array_equal(y, y1)
    dy = make_x(shape, np.float64, seed=3)
    for a, b in zip(nbbn.batch_norm_backward(dy, x, sm, si),
                    nbbn.batch_norm_backward(dy, x, sm, si, np.ones(C)), strict=True):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(nbbn.batch_norm_infer(x, sm, 1 / si**2),
                                  nbbn.batch_norm_infer(x, sm, 1 / si**2, np.ones(C),
                                                        np.zeros(C)))


def test_running_statistics_by_hand():
    """One channel 1, 2, 3, 4 (μ 2.5, σ² 1.25, unbiased 5/3), another 10, 10, 10, 14."""
    x = np.array([[1.0, 10.0], [2.0, 10.0], [3.0, 10.0], [4.0, 14.0]], dtype=np.float32)
    rm = np.array([1.0, 0.0], dtype=np.float32)
    rv = np.array([2.0, 1.0], dtype=np.float32)
    _, sm, si = nbbn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=0.25,
                                      eps=1e-5)
    np.testing.assert_allclose(sm, [2.5, 11.0], rtol=1e-7)
    np.testing.assert_allclose(si, [1 / np.sqrt(1.25 + 1e-5), 1 / np.sqrt(3.0 + 1e-5)],
                               rtol=1e-7)
    np.testing.assert_allclose(rm, [0.75 * 1.0 + 0.25 * 2.5, 0.25 * 11.0], rtol=1e-7)
    np.testing.assert_allclose(rv, [0.75 * 2.0 + 0.25 * 5 / 3, 0.75 + 0.25 * 4.0], rtol=1e-7)
    assert rm.dtype == rv.dtype == np.float32  # updated in their own dtype


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_edges(momentum):
    x = make_x((6, 3), np.float64, 2.0)
    rm, rv = np.full(3, 7.0), np.full(3, 9.0)
    nbbn.batch_norm_train(x, running_mean=rm, running_var=rv, momentum=momentum)
    mean, var = ref.batch_stats(x)
    if momentum == 0.0:
        np.testing.assert_array_equal(rm, 7.0)
        np.testing.assert_array_equal(rv, 9.0)
    else:
        np.testing.assert_allclose(rm, mean, rtol=1e-15)
        np.testing.assert_allclose(rv, var * 6 / 5, rtol=1e-14)


def _views(x):
    """Same values, other memory layouts: Fortran order, negative strides, a strided slice, and
    a read-only array."""
    f = np.asfortranarray(x)
    neg = x[::-1].copy()[::-1]
    big = np.empty((x.shape[0], 2 * x.shape[1]) + x.shape[2:], dtype=x.dtype)
    big[:, ::2] = x
    ro = x.copy()
    ro.flags.writeable = False
    return {"fortran": f, "negative-stride": neg, "strided": big[:, ::2], "read-only": ro}


@pytest.mark.parametrize("shape", [(13, 6), (3, 4, 5, 6)], ids=str)
def test_non_contiguous_and_read_only_inputs_match_contiguous(shape):
    x = make_x(shape, np.float32, 50.0)
    C = shape[1]
    gamma, beta = make_params(C)
    dy = make_x(shape, np.float32, seed=4)
    base_f = nbbn.batch_norm_train(x, gamma, beta)
    base_b = nbbn.batch_norm_backward(dy, x, base_f[1], base_f[2], gamma)
    base_i = nbbn.batch_norm_infer(x, base_f[1], base_f[2], gamma, beta)
    for name, xv in _views(x).items():
        np.testing.assert_array_equal(xv, x)
        before = xv.copy()
        for a, b in zip(nbbn.batch_norm_train(xv, gamma, beta), base_f, strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
        dyv = _views(dy)[name]
        for a, b in zip(nbbn.batch_norm_backward(dyv, xv, base_f[1], base_f[2], gamma), base_b,
                        strict=True):
            np.testing.assert_array_equal(a, b, err_msg=name)
        np.testing.assert_array_equal(nbbn.batch_norm_infer(xv, base_f[1], base_f[2], gamma,
                                                            beta), base_i, err_msg=name)
        np.testing.assert_array_equal(xv, before, err_msg=f"{name}: input was modified")


@pytest.mark.parametrize("shape", [(11, 5), (2, 5, 3, 3)], ids=str)
def test_preallocated_outputs_are_written_and_returned(shape):
    x = make_x(shape, np.float32, 1.0)
    C = shape[1]
    gamma, beta = make_params(C)
    y, sm, si = (np.full(shape, np.nan, np.float32), np.full(C, np.nan, np.float32),
                 np.full(C, np.nan, np.float32))
    res = nbbn.batch_norm_train(x, gamma, beta, out=(y, sm, si))
    assert res[0] is y and res[1] is sm and res[2] is si
    for a, b in zip(res, nbbn.batch_norm_train(x, gamma, beta), strict=True):
        np.testing.assert_array_equal(a, b)
    dy = make_x(shape, np.float32, seed=5)
    outs = (np.full(shape, np.nan, np.float32), np.full(C, np.nan, np.float32),
            np.full(C, np.nan, np.float32))
    res = nbbn.batch_norm_backward(dy, x, sm, si, gamma, out=outs)
    assert all(a is b for a, b in zip(res, outs, strict=True))
    for a, b in zip(res, nbbn.batch_norm_backward(dy, x, sm, si, gamma), strict=True):
        np.testing.assert_array_equal(a, b)
    yi = np.full(shape, np.nan, np.float32)
    assert nbbn.batch_norm_infer(x, sm, 1 / si**2, gamma, beta, out=yi) is yi
    np.testing.assert_array_equal(yi, nbbn.batch_norm_infer(x, sm, 1 / si**2, gamma, beta))


def test_mixed_float_dtypes_are_read_in_their_own_precision():
    """float32 x with float64 γ/β/running stats (and the reverse) is a documented cast."""
    x = make_x((20, 4), np.float32, 3.0)
    g32, b32 = make_params(4, dtype=np.float32)
    y32, sm, si = nbbn.batch_norm_train(x, g32, b32)
    y64, *_ = nbbn.batch_norm_train(x, g32.astype(np.float64), b32.astype(np.float64))
    np.testing.assert_array_equal(y32, y64)
    xd = x.astype(np.float64)
    yd, *_ = nbbn.batch_norm_train(xd, g32, b32)
    assert yd.dtype == np.float64
    assert_close(Op.FORWARD_TRAIN, (yd,) + nbbn.batch_norm_train(xd, g32, b32)[1:],
                 ref.forward_train(xd, g32, b32)[:3], np.float64)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("shape", [(8, 5), (4, 5, 3, 3)], ids=str)
def test_nan_and_inf_stay_in_their_channel(shape, bad):
    x = make_x(shape, np.float32, 1.0)
    x[(1, 2) + (0,) * (len(shape) - 2)] = bad
    rm, rv = np.zeros(5), np.ones(5)
    y, sm, si = nbbn.batch_norm_train(x, running_mean=rm, running_var=rv)
    others = [0, 1, 3, 4]
    assert np.isnan(y[:, 2]).all() and np.isnan(sm[2]) | np.isinf(sm[2]) and np.isnan(si[2])
    assert np.isfinite(y[:, others]).all() and np.isfinite(sm[others]).all()
    assert np.isfinite(rm[others]).all() and np.isfinite(rv[others]).all()
    clean = np.delete(x, 2, axis=1)
    np.testing.assert_array_equal(np.delete(y, 2, axis=1), nbbn.batch_norm_train(clean)[0])
    dy = make_x(shape, np.float32, seed=6)
    dx, dg, db = nbbn.batch_norm_backward(dy, x, sm, si)
    assert np.isnan(dx[:, 2]).all() and np.isfinite(dx[:, others]).all()


def test_channels_last_round_trip_keeps_the_memory_format():
    """An (N, C, H, W) array with channels-last memory comes back channels-last, and equals the
    channel_axis=-1 call on the (N, H, W, C) array it views."""
    x = make_x((3, 5, 4, 6), np.float32, 7.0)
    nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    cl = nhwc.transpose(0, 3, 1, 2)  # NCHW shape, channels-last memory
    y, sm, si = nbbn.batch_norm_train(cl)
    assert y.shape == cl.shape and y.strides == cl.strides
    y2, sm2, si2 = nbbn.batch_norm_train(nhwc, channel_axis=-1)
    np.testing.assert_array_equal(y.transpose(0, 2, 3, 1), y2)
    np.testing.assert_array_equal(sm, sm2)
    dy = make_x(nhwc.shape, np.float32, seed=3)
    dx, dg, db = nbbn.batch_norm_backward(dy.transpose(0, 3, 1, 2), cl, sm, si)
    assert dx.strides == cl.strides
    dx2, dg2, db2 = nbbn.batch_norm_backward(dy, nhwc, sm2, si2, channel_axis=-1)
    np.testing.assert_array_equal(dx.transpose(0, 2, 3, 1), dx2)
    yi = nbbn.batch_norm_infer(cl, sm, 1 / si**2)
    assert yi.strides == cl.strides


def test_out_must_have_the_kernels_memory_layout():
    x = np.ascontiguousarray(make_x((2, 3, 4, 5), np.float32).transpose(0, 2, 3, 1))
    wrong = np.empty((2, 3, 4, 5), np.float32).transpose(0, 2, 3, 1)  # channels-first memory
    with pytest.raises(ValueError, match=r"out\[y\] must have the memory layout"):
        nbbn.batch_norm_train(x, channel_axis=-1,
                              out=(wrong, np.empty(3, np.float32), np.empty(3, np.float32)))
    right = np.empty_like(x)
    y, *_ = nbbn.batch_norm_train(x, channel_axis=-1,
                                  out=(right, np.empty(3, np.float32), np.empty(3, np.float32)))
    assert y is right


@pytest.mark.parametrize("axis", [0, 2, -2, 5, "1", 1.0, True])
def test_bad_channel_axis(axis):
    x = make_x((2, 3, 4, 5), np.float32)
    exc = TypeError if not isinstance(axis, int) or isinstance(axis, bool) else ValueError
    with pytest.raises(exc, match="channel_axis"):
        nbbn.batch_norm_train(x, channel_axis=axis)


# ---------------------------------------------------------------------------------------------
# nbbn.bind: a call prepared once, on the same buffers every time
@pytest.mark.parametrize("shape, axis", [((11, 5), 1), ((2, 5, 3, 3), 1), ((2, 3, 3, 5), -1)],
                         ids=str)
def test_a_bound_call_reads_its_arrays_contents_at_each_call(shape, axis):
    """Each bound call equals the plain call on the arrays' contents of that moment (new data
    written into x between calls), returns the bound outputs, and updates running statistics
    as the plain calls do; NC, NCHW and channels-last."""
    C = shape[axis]
    g, b = make_params(C, dtype=np.float32)
    x = make_x(shape, np.float32, 2.0)
    y, sm, si = np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    rm1, rv1 = rm.copy(), rv.copy()
    train = nbbn.bind(nbbn.batch_norm_train, x, g, b, running_mean=rm, running_var=rv,
                      out=(y, sm, si), relu=True, channel_axis=axis)
    dy = make_x(shape, np.float32, seed=7)
    dx, dg, db, dz = (np.empty_like(x), np.empty(C, np.float32), np.empty(C, np.float32),
                      np.empty_like(x))
    back = nbbn.bind(nbbn.batch_norm_backward, dy, x, sm, si, g, relu=True, y=y,
                     out=(dx, dg, db, dz), channel_axis=axis)
    yi = np.empty_like(x)
    infer = nbbn.bind(nbbn.batch_norm_infer, x, rm, rv, g, b, out=yi, channel_axis=axis)
    for seed in (1, 2):
        x[...] = make_x(shape, np.float32, 2.0, seed=seed)
        got = train()
        assert got[0] is y and got[1] is sm and got[2] is si
        want = nbbn.batch_norm_train(x, g, b, running_mean=rm1, running_var=rv1, relu=True,
                                     channel_axis=axis)
        for a, w in zip(got, want, strict=True):
            np.testing.assert_array_equal(a, w)
        np.testing.assert_array_equal(rm, rm1)
        np.testing.assert_array_equal(rv, rv1)
        for a, w in zip(back(), nbbn.batch_norm_backward(dy, x, sm, si, g, relu=True, y=y,
                                                         channel_axis=axis), strict=True):
            np.testing.assert_array_equal(a, w)
        assert infer() is yi
        np.testing.assert_array_equal(yi, nbbn.batch_norm_infer(x, rm, rv, g, b,
                                                                channel_axis=axis))


def test_a_bound_call_whose_input_needed_a_copy_does_not_go_stale():
    """A strided x, and a float32 γ among float64 vectors, are copied for the kernels: the bound
    call prepares again each time instead of reading a copy made at bind time."""
    base = make_x((11, 10), np.float32, 2.0)
    x = base[:, ::2]
    rm, rv = np.zeros(5), np.ones(5)
    y = np.empty((11, 5), np.float32)
    infer = nbbn.bind(nbbn.batch_norm_infer, x, rm, rv, out=y)
    base[...] = make_x((11, 10), np.float32, 2.0, seed=9)
    np.testing.assert_array_equal(infer(), nbbn.batch_norm_infer(x, rm, rv))
    xc = np.ascontiguousarray(x)
    gamma = np.ones(5, np.float32)  # with float64 statistics: converted to float64
    infer = nbbn.bind(nbbn.batch_norm_infer, xc, rm, rv, gamma, out=y)
    gamma[...] = 3.0
    np.testing.assert_array_equal(infer(), nbbn.batch_norm_infer(xc, rm, rv, gamma))


def test_the_cpu_backend_binds_what_it_can_view_and_prepares_the_rest_each_time():
    from nbbn import registry, validate
    from nbbn.spec import Layout

    bind = registry.select("cpu", Op.INFERENCE, Layout.NC).bind
    base = make_x((11, 10), np.float32, 2.0)
    rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
    y = np.empty((11, 5), np.float32)
    for x, gamma, prepared in ((np.ascontiguousarray(base[:, ::2]), None, True),
                               (base[:, ::2], None, False),
                               (np.ascontiguousarray(base[:, ::2]), np.ones(5), False)):
        args = validate.infer_args(x, rm, rv, gamma, None, 1e-5, y)
        assert bind(args).prepared is prepared


def test_bind_needs_out_and_one_of_the_three_functions():
    x = make_x((6, 3), np.float32, 1.0)
    with pytest.raises(ValueError, match="needs out="):
        nbbn.bind(nbbn.batch_norm_infer, x, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(TypeError, match="binds nbbn.batch_norm_train"):
        nbbn.bind(np.add, x, x, out=x)
    with pytest.raises(TypeError):  # the function's own signature decides
        nbbn.bind(nbbn.batch_norm_infer, x, out=x, colour="red")


@pytest.mark.parametrize("shape", [(5, 3, 4), (5, 3, 4, 2), (5, 1, 4, 2), (5, 3, 1, 1),
                                   (5, 3, 2, 1), (2, 4, 3, 3)], ids=str)
@pytest.mark.parametrize("axis", [1, -1])
@pytest.mark.parametrize("order", ["C", "F"])
def test_the_short_path_of_x_agrees_with_the_general_geometry(shape, axis, order):
    """validate._x's short path for common arrays gives the same Geometry as the general rule
    (validate._geometry), including the degenerate cases it leaves to the latter."""
    x = np.zeros(shape, np.float32, order=order)
    meta = validate.array_meta(x, "x")
    assert validate._x(x, axis) == (validate._geometry(meta, axis, "x"), False)


def test_the_short_path_cache_is_not_taken_by_another_memory_layout():
    """validate._x caches the short path's geometry by (shape, dtype, channel axis); an array of
    a cached shape laid out otherwise (channels last in memory, channel axis 1) still gets the
    general rule's geometry, before and after the contiguous one."""
    c = np.zeros((2, 3, 4, 5), np.float32)
    last = np.zeros((2, 4, 5, 3), np.float32).transpose(0, 3, 1, 2)  # same shape
    for x in (c, last, c, last):
        meta = validate.array_meta(x, "x")
        assert validate._x(x, 1) == (validate._geometry(meta, 1, "x"), False)
    assert validate._x(last, 1)[0].perm != validate._x(c, 1)[0].perm
