"""The CPU backend against the float64 reference, at every op × layout × dtype × variant."""

import numpy as np
import pytest

import nbbn
from nbbn import cpu
from nbbn import reference as ref
from nbbn.spec import Op
from nbbn.tolerances import rel_err, tolerance

from .helpers import assert_close, backward_refs, make_params, make_x

# Awkward on purpose: C = 1, odd C, N = 2, H·W = 1, S > BLOCK (rows split into pieces), sizes
# that are no multiple of any chunk, NC tiles with ragged last tile, NCL (3-D) input.
SHAPES = [
    (2, 1), (2, 7), (37, 130), (1001, 3), (3, 2049),
    (2, 1, 1, 1), (2, 3, 1, 1), (3, 5, 7, 9), (4, 3, 50), (2, 1, 4099), (1, 2, 3, 1500),
    (5, 17, 6, 6),
]
DTYPES = [np.float32, np.float64]
OFFSETS = [0.0, 1e4]


def _force_variant(monkeypatch, name):
    """Make ``name`` the cpu backend's default variant for one test (through the registry)."""
    from dataclasses import replace

    from nbbn import registry

    info = registry.backend_info("cpu")
    monkeypatch.setitem(registry._STATE.backends, "cpu", replace(info, default_variant=name))
    registry._STATE.fast.clear()
    monkeypatch.setattr(registry._STATE, "fast", {})


@pytest.fixture(params=["fused", "split"])
def variant(request, monkeypatch):
    _force_variant(monkeypatch, request.param)
    return request.param


@pytest.mark.parametrize("offset", OFFSETS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_all_ops_against_reference(shape, dtype, offset, variant):
    x = make_x(shape, dtype, offset)
    C = shape[1]
    gamma, beta = make_params(C)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    rm0, rv0 = rm.copy(), rv.copy()

    y, sm, si = nbbn.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv,
                                      momentum=0.3)
    ry, rmean, rinvstd, rvar = ref.forward_train(x, gamma, beta)
    assert y.dtype == sm.dtype == si.dtype == dtype and sm.shape == si.shape == (C,)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), dtype)
    erm, erv = ref.running_update(rm0, rv0, rmean, rvar, ref.count_per_channel(x), 0.3)
    assert rel_err(rm, erm) <= tolerance("running_mean", rm.dtype)
    assert rel_err(rv, erv) <= tolerance("running_var", rv.dtype)

    dy = make_x(shape, dtype, 0.1, seed=7)
    outs = nbbn.batch_norm_backward(dy, x, sm, si, gamma)
    refs, scales = backward_refs(dy, x, sm, si, gamma)
    assert_close(Op.BACKWARD, outs, refs, dtype, scales)

    yi = nbbn.batch_norm_infer(x, rm, rv, gamma, beta)
    assert_close(Op.INFERENCE, (yi,), (ref.inference(x, rm, rv, gamma, beta),), dtype)


@pytest.mark.parametrize("shape", [(9, 4), (3, 4, 5, 5)], ids=str)
def test_no_affine_means_unit_gamma_zero_beta(shape, variant):
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
def test_nan_and_inf_stay_in_their_channel(shape, bad, variant):
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


def test_fused_and_split_agree(monkeypatch):
    """Different work splits, same function: agreement to rounding."""
    x = make_x((64, 40, 5, 5), np.float32, 100.0)
    res = {}
    for v in ("fused", "split"):
        _force_variant(monkeypatch, v)
        res[v] = nbbn.batch_norm_train(x)
    for a, b in zip(res["fused"], res["split"], strict=True):
        assert rel_err(a, b) < 1e-6


def test_batch_stats_is_the_forward_statistics():
    x = make_x((33, 3, 17), np.float32, 1e4)
    mean, var = cpu.batch_stats(x)
    rmean, rvar = ref.batch_stats(x)
    assert mean.dtype == var.dtype == np.float64
    assert rel_err(var, rvar) <= tolerance("var", np.float32)
    assert rel_err(mean, rmean) <= 1e-15


@pytest.mark.slow
@pytest.mark.parametrize("shape", [(2**24 + 1, 1), (1, 1, 2**24 + 1), (2**12 + 1, 2, 2**11)],
                         ids=str)
def test_float32_large_m_and_offset_1e4(shape):
    """m up to 2^24 + 1 (float32 counts stop being exact), |mean|/std = 1e4: σ² within 1e-5,
    y within 1e-5 of the float64 reference."""
    x = make_x(shape, np.float32, 1e4 * 0.5)  # std 0.5·(0.5..2), mean ≈ 5e3: κ ≈ 1e4
    mean, var = cpu.batch_stats(x)
    rmean, rvar = ref.batch_stats(x)
    assert np.all(np.abs(rmean) / np.sqrt(rvar) > 2e3)
    assert rel_err(var, rvar) <= tolerance("var", np.float32)
    y, sm, si = nbbn.batch_norm_train(x)
    ry, _, rinvstd, _ = ref.forward_train(x)
    assert rel_err(y, ry) <= tolerance("y", np.float32)
    assert rel_err(si, rinvstd) <= tolerance("save_invstd", np.float32)
