"""nbbn.BatchNorm: training/eval against the float64 reference, running statistics after several
batches against hand computation, momentum=None = Algorithm 2, state round trip, errors."""

from __future__ import annotations

import numpy as np
import pytest

import nbbn
from nbbn import reference as ref
from nbbn import validate
from nbbn.spec import Op
from nbbn.tolerances import rel_err, tolerance

from .helpers import assert_close, make_params, make_x

DTYPES = [np.float32, np.float64]
#: Half storage, in the exhaustive tier: the fast tier's warm-up compiles no half kernel the
#: layer calls (their compile took the cold fast tier past 3 minutes; tests/conftest.py).
HALF = [pytest.param(d, id=d.name, marks=pytest.mark.slow)
        for d in validate.HALF_DTYPES]


def _layer(C, dtype, **kw):
    bn = nbbn.BatchNorm(C, dtype=dtype, **kw)
    if bn.affine:
        g, b = make_params(C, dtype=dtype)
        bn.gamma[...] = g
        bn.beta[...] = b
    return bn


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 5), (3, 4, 2, 3)])
def test_train_forward_backward_match_reference(dtype, shape):
    C = shape[1]
    bn = _layer(C, dtype)
    x = make_x(shape, dtype, offset=10.0)
    y = bn(x)
    assert y.dtype == np.dtype(dtype) and y.shape == x.shape
    ry, rmean, rinvstd, _ = ref.forward_train(x, bn.gamma, bn.beta, 1e-5)
    assert rel_err(y, ry) <= tolerance("y", dtype)
    dy = make_x(shape, dtype, seed=3)
    dx = bn.backward(dy)
    refs = ref.backward(dy, x, rmean, rinvstd, bn.gamma)
    assert_close(Op.BACKWARD, (dx, bn.dgamma, bn.dbeta), refs, dtype,
                 {"dx": ref.dx_scale(dy, rinvstd, bn.gamma)})
    # backward again: the same saved statistics, the same result
    np.testing.assert_array_equal(bn.backward(dy), dx)


@pytest.mark.parametrize("dtype", DTYPES)
def test_eval_uses_running_statistics(dtype):
    bn = _layer(4, dtype)
    bn.running_mean[...] = np.array([1.0, -2.0, 0.5, 3.0])
    bn.running_var[...] = np.array([0.5, 2.0, 1.0, 4.0])
    x = make_x((6, 4), dtype)
    y = bn.eval()(x)
    r = ref.inference(x, bn.running_mean, bn.running_var, bn.gamma, bn.beta, 1e-5)
    assert rel_err(y, r) <= tolerance("y", dtype)
    assert bn.num_batches_tracked == 0  # eval touches no statistics
    # train() switches back: batch statistics again
    y2 = bn.train()(x)
    assert rel_err(y2, ref.forward_train(x, bn.gamma, bn.beta, 1e-5)[0]) <= tolerance("y", dtype)


def test_running_statistics_after_several_batches_by_hand():
    """r ← (1 − a)·r + a·batch, variance unbiased (÷ (m − 1)), from r = (0, 1), in float64."""
    a, C = 0.3, 3
    bn = nbbn.BatchNorm(C, momentum=a, dtype=np.float64)
    rm, rv = np.zeros(C), np.ones(C)
    rng = np.random.default_rng(5)
    for k, m in enumerate((4, 9, 2, 17), 1):
        x = 5.0 + 2.0 * rng.standard_normal((m, C))
        bn(x)
        rm = (1 - a) * rm + a * x.mean(axis=0)
        rv = (1 - a) * rv + a * x.var(axis=0, ddof=1)
        assert bn.num_batches_tracked == k
    np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(bn.running_var, rv, rtol=1e-13)


@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_none_is_algorithm_2(dtype):
    """Algorithm 2: E[x] = mean of the batch means, Var[x] = m/(m − 1)·mean of the batch
    variances (equal batch sizes), whatever the starting running statistics."""
    C, m, k = 4, 8, 25
    bn = nbbn.BatchNorm(C, momentum=None, dtype=dtype)
    bn.running_mean[...] = 123.0  # forgotten at the first batch (a = 1/1)
    rng = np.random.default_rng(2)
    means, variances = [], []
    for _ in range(k):
        x = (-3.0 + 0.7 * rng.standard_normal((m, C))).astype(dtype)
        bn(x)
        x64 = x.astype(np.float64)
        means.append(x64.mean(axis=0))
        variances.append(x64.var(axis=0))
    assert bn.num_batches_tracked == k
    pop_mean = np.mean(means, axis=0)
    pop_var = m / (m - 1) * np.mean(variances, axis=0)
    # k running updates in the layer's dtype: a few roundings each
    bound = 10 * k * np.finfo(dtype).eps
    assert rel_err(bn.running_mean, pop_mean) <= bound
    assert rel_err(bn.running_var, pop_var) <= bound


def test_track_running_stats_false_eval_uses_batch_statistics():
    bn = _layer(3, np.float64, track_running_stats=False)
    assert bn.running_mean is None and bn.running_var is None
    x = make_x((5, 3), np.float64)
    y = bn.eval()(x)
    np.testing.assert_allclose(y, ref.forward_train(x, bn.gamma, bn.beta, 1e-5)[0], rtol=1e-12)
    assert "running_mean" not in bn.state_dict()


def test_affine_false_has_no_parameters():
    bn = nbbn.BatchNorm(3, affine=False, dtype=np.float64)
    x = make_x((6, 3), np.float64)
    y = bn(x)
    np.testing.assert_allclose(y, ref.forward_train(x, None, None, 1e-5)[0], rtol=1e-12)
    dx = bn.backward(np.ones_like(x))
    assert dx.shape == x.shape
    assert bn.gamma is None and bn.beta is None and bn.dgamma is None and bn.dbeta is None
    assert set(bn.state_dict()) == {"running_mean", "running_var", "num_batches_tracked"}


@pytest.mark.parametrize("dtype", DTYPES)
def test_channel_axis_last(dtype):
    """channel_axis=-1 on (N, H, W, C) equals channel_axis=1 on the transposed data."""
    C = 5
    first = _layer(C, dtype)
    last = _layer(C, dtype, channel_axis=-1)
    x = make_x((3, C, 2, 4), dtype)
    x_last = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    y1, y2 = first(x), last(x_last)
    assert rel_err(y2.transpose(0, 3, 1, 2), y1) <= tolerance("y", dtype)
    np.testing.assert_allclose(last.running_var, first.running_var,
                               rtol=tolerance("running_var", dtype))
    dy = make_x((3, C, 2, 4), dtype, seed=9)
    dx1 = first.backward(dy)
    dx2 = last.backward(np.ascontiguousarray(dy.transpose(0, 2, 3, 1)))
    assert rel_err(dx2.transpose(0, 3, 1, 2), dx1) <= tolerance("dx", dtype)
    assert rel_err(last.dgamma, first.dgamma) <= tolerance("dgamma", dtype)
    assert "channel_axis=-1" in repr(last)


def test_state_round_trip_through_npz(tmp_path):
    bn = _layer(6, np.float32, momentum=None)
    rng = np.random.default_rng(0)
    for _ in range(3):
        bn(rng.standard_normal((10, 6)).astype(np.float32))
    state = bn.state_dict()
    assert set(state) == {"gamma", "beta", "running_mean", "running_var", "num_batches_tracked"}
    assert state["num_batches_tracked"].dtype == np.int64 and int(state["num_batches_tracked"]) == 3
    np.savez(tmp_path / "bn.npz", **state)
    other = nbbn.BatchNorm(6, momentum=None)
    with np.load(tmp_path / "bn.npz") as f:
        other.load_state_dict(f)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(other.state_dict()[k], v)
    # state_dict is a copy: changing it changes nothing in the layer
    state["running_mean"][:] = 99
    assert not np.any(bn.running_mean == 99)
    # the next batch continues the cumulative average identically (the counter came along)
    x = rng.standard_normal((10, 6)).astype(np.float32)
    bn(x)
    other(x)
    np.testing.assert_array_equal(other.running_var, bn.running_var)
    np.testing.assert_array_equal(other.eval()(x), bn.eval()(x))


def test_load_state_dict_errors():
    bn = nbbn.BatchNorm(4)
    good = bn.state_dict()
    with pytest.raises(ValueError, match="missing key.*'running_var'.*unexpected key.*'extra'"):
        bn.load_state_dict({**{k: v for k, v in good.items() if k != "running_var"},
                            "extra": np.zeros(4)})
    with pytest.raises(ValueError, match=r"gamma has shape \(5,\), expected \(4,\)"):
        bn.load_state_dict({**good, "gamma": np.ones(5, np.float32)})
    with pytest.raises(TypeError, match="beta has dtype float64.*float32"):
        bn.load_state_dict({**good, "beta": np.zeros(4)})
    with pytest.raises(ValueError, match="num_batches_tracked"):
        bn.load_state_dict({**good, "num_batches_tracked": np.array(-1)})
    # a failed load changes nothing
    before = bn.state_dict()
    with pytest.raises(TypeError):
        bn.load_state_dict({**good, "gamma": np.full(4, 7, np.float32),
                            "running_var": np.ones(4)})
    for k, v in before.items():
        np.testing.assert_array_equal(bn.state_dict()[k], v)


def test_errors():
    bn = nbbn.BatchNorm(3)
    with pytest.raises(RuntimeError, match="before forward"):
        bn.backward(np.ones((4, 3), np.float32))
    bn.eval()(np.ones((4, 3), np.float32))
    with pytest.raises(RuntimeError, match="eval mode"):
        bn.backward(np.ones((4, 3), np.float32))
    bn.train()
    with pytest.raises(TypeError, match="x has dtype float64 but the layer's dtype is float32"):
        bn(np.ones((4, 3)))
    bn(make_x((4, 3), np.float32))
    with pytest.raises(TypeError, match="dy has dtype float64 but the layer's dtype is float32"):
        bn.backward(np.ones((4, 3)))
    with pytest.raises(ValueError, match="3 channels on axis 1"):
        nbbn.BatchNorm(2)(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.ones((1, 3), np.float32))
    assert bn.num_batches_tracked == 1  # the failed call did not count
    with pytest.raises(ValueError, match="num_features"):
        nbbn.BatchNorm(0)
    with pytest.raises(ValueError, match="eps"):
        nbbn.BatchNorm(3, eps=0.0)
    with pytest.raises(ValueError, match="momentum"):
        nbbn.BatchNorm(3, momentum=1.5)
    with pytest.raises(ValueError, match="channel_axis"):
        nbbn.BatchNorm(3, channel_axis=2)
    with pytest.raises(TypeError, match="unknown dtype .*; choose from float32, float64, float16"):
        nbbn.BatchNorm(3, dtype=np.int32)
    with pytest.raises(ValueError, match="backend"):
        nbbn.BatchNorm(3, backend="nope")


def test_repr():
    r = repr(nbbn.BatchNorm(8, momentum=None).eval())
    assert r.startswith("BatchNorm(8, eps=1e-05, momentum=None") and "mode=eval" in r


def test_cuda_backend_matches_cpu():
    """The layer is backend-agnostic: the same state after train, backward and eval on "cuda"
    (NumPy arrays in and out; the CUDA simulator in the default test run)."""
    why = nbbn.availability().get("cuda")
    if why:
        pytest.skip(f"cuda backend unavailable: {why}")
    x = make_x((6, 3), np.float32, offset=2.0)
    dy = make_x((6, 3), np.float32, seed=4)
    a, b = _layer(3, np.float32, backend="cuda"), _layer(3, np.float32)
    assert rel_err(a(x), b(x)) <= tolerance("y", np.float32)
    for name in ("running_mean", "running_var"):
        assert rel_err(getattr(a, name), getattr(b, name)) <= tolerance(name, np.float32)
    assert rel_err(a.backward(dy), b.backward(dy)) <= tolerance("dx", np.float32)
    assert rel_err(a.dgamma, b.dgamma) <= tolerance("dgamma", np.float32)
    assert rel_err(a.eval()(x), b.eval()(x)) <= tolerance("y", np.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_fused_relu_and_residual(dtype, channel_axis):
    """relu=True and forward(x, residual=z): y = max(BN(x) + z, 0) against the reference;
    backward masks by the saved y, dx/dγ/dβ match the reference gradient of the masked dy, and
    dresidual = dy·[y > 0]; eval mode fuses the same way."""
    shape = (6, 4, 3, 5) if channel_axis == 1 else (6, 3, 5, 4)
    C = shape[channel_axis]
    bn = _layer(C, dtype, relu=True, channel_axis=channel_axis)
    x = make_x(shape, dtype, offset=3.0)
    z = make_x(shape, dtype, seed=5)
    y = bn(x, residual=z)
    ry, rmean, rinvstd, _ = ref.forward_train(x, bn.gamma, bn.beta, 1e-5,
                                              channel_axis=channel_axis, relu=True, residual=z)
    assert rel_err(y, ry) <= tolerance("y", dtype)
    assert (y == 0).any() and (y > 0).any()  # the mask is not trivial
    dy = make_x(shape, dtype, seed=3)
    dx = bn.backward(dy)
    refs = ref.backward(dy, x, rmean, rinvstd, bn.gamma, channel_axis=channel_axis,
                        relu=True, y=y)
    assert_close(Op.BACKWARD, (dx, bn.dgamma, bn.dbeta), refs[:3], dtype,
                 {"dx": ref.dx_scale(dy, rinvstd, bn.gamma, channel_axis=channel_axis,
                                     relu=True, y=y)})
    np.testing.assert_array_equal(bn.dresidual, np.where(y > 0, dy, 0))
    # without a residual there is no residual gradient
    bn(x)
    bn.backward(dy)
    assert bn.dresidual is None
    bn.eval()
    ye = bn(x, residual=z)
    re = ref.inference(x, bn.running_mean, bn.running_var, bn.gamma, bn.beta, 1e-5,
                       channel_axis=channel_axis, relu=True, residual=z)
    assert rel_err(ye, re) <= tolerance("y", dtype)
    assert "relu=True" in repr(bn)


def test_residual_without_relu_gradient_is_dy():
    bn = _layer(3, np.float64)
    x = make_x((5, 3), np.float64)
    z = make_x((5, 3), np.float64, seed=2)
    y = bn(x, residual=z)
    ry, *_ = ref.forward_train(x, bn.gamma, bn.beta, 1e-5, residual=z)
    assert rel_err(y, ry) <= tolerance("y", np.float64)
    dy = make_x((5, 3), np.float64, seed=4)
    bn.backward(dy)
    assert bn.dresidual is dy
    with pytest.raises(TypeError, match="residual"):
        bn(x, residual=z.astype(np.float32))


@pytest.mark.parametrize("dtype", HALF)
def test_half_storage_is_pytorch_mixed_precision(dtype):
    """dtype=float16/bfloat16: x, y, dy, dx (and dresidual) in the half dtype; γ, β, the running
    statistics, dγ and dβ float32, as PyTorch's mixed-precision batch norm; every output within
    the half tolerances of the float64 reference (training, running update, backward, eval)."""
    C, shape = 5, (9, 5)
    bn = nbbn.BatchNorm(C, dtype=dtype)
    f32 = np.dtype(np.float32)
    assert bn.dtype == dtype and bn.param_dtype == f32
    assert {getattr(bn, n).dtype for n in ("gamma", "beta", "running_mean", "running_var")} \
        == {f32}
    bn.gamma[...], bn.beta[...] = make_params(C, dtype=f32)
    rm0, rv0 = bn.running_mean.copy(), bn.running_var.copy()
    x = make_x(shape, dtype, offset=10.0)
    y = bn(x)
    assert y.dtype == dtype and y.shape == x.shape
    ry, rmean, rinvstd, rvar = ref.forward_train(x, bn.gamma, bn.beta, 1e-5)
    assert rel_err(y, ry) <= tolerance("y", dtype)
    for name, r in zip(("running_mean", "running_var"),
                       ref.running_update(rm0, rv0, rmean, rvar, shape[0], 0.1), strict=True):
        assert getattr(bn, name).dtype == f32
        assert rel_err(getattr(bn, name), r) <= tolerance(name, dtype), name
    dy = make_x(shape, dtype, seed=3)
    dx = bn.backward(dy)
    assert dx.dtype == dtype and bn.dgamma.dtype == f32 and bn.dbeta.dtype == f32
    assert_close(Op.BACKWARD, (dx, bn.dgamma, bn.dbeta),
                 ref.backward(dy, x, rmean, rinvstd, bn.gamma), dtype,
                 {"dx": ref.dx_scale(dy, rinvstd, bn.gamma)})
    ye = bn.eval()(x)
    assert ye.dtype == dtype
    r = ref.inference(x, bn.running_mean, bn.running_var, bn.gamma, bn.beta, 1e-5)
    assert rel_err(ye, r) <= tolerance("y", dtype)
    # the state is float32 and goes round trip; half vectors are refused, as x of another dtype
    state = bn.state_dict()
    assert all(v.dtype == f32 for k, v in state.items() if k != "num_batches_tracked")
    other = nbbn.BatchNorm(C, dtype=dtype)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.eval()(x), ye)
    with pytest.raises(TypeError, match=f"gamma has dtype {dtype.name}.*float32"):
        other.load_state_dict({**state, "gamma": state["gamma"].astype(dtype)})
    with pytest.raises(TypeError, match=f"x has dtype float32 but the layer's dtype is "
                                        f"{dtype.name}"):
        bn(x.astype(np.float32))
    assert f"dtype={dtype.name}" in repr(bn)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(validate.HALF_DTYPES), ids=lambda d: d.name)
@pytest.mark.parametrize("channel_axis", [1, -1])
def test_half_storage_fused_spatial(dtype, channel_axis):
    """Half storage through NCHW and NHWC with the fused ReLU and residual: y, dx, dγ, dβ within
    the half tolerances; dresidual = dy·[y > 0], exactly, in the half dtype."""
    shape = (4, 3, 5, 6) if channel_axis == 1 else (4, 5, 6, 3)
    C = shape[channel_axis]
    bn = nbbn.BatchNorm(C, dtype=dtype, relu=True, channel_axis=channel_axis)
    bn.gamma[...], bn.beta[...] = make_params(C, dtype=np.float32)
    x = make_x(shape, dtype, offset=3.0)
    z = make_x(shape, dtype, seed=5)
    y = bn(x, residual=z)
    ry, rmean, rinvstd, _ = ref.forward_train(x, bn.gamma, bn.beta, 1e-5,
                                              channel_axis=channel_axis, relu=True, residual=z)
    assert y.dtype == dtype and rel_err(y, ry) <= tolerance("y", dtype)
    dy = make_x(shape, dtype, seed=3)
    dx = bn.backward(dy)
    refs = ref.backward(dy, x, rmean, rinvstd, bn.gamma, channel_axis=channel_axis, relu=True,
                        y=y)
    assert_close(Op.BACKWARD, (dx, bn.dgamma, bn.dbeta), refs[:3], dtype,
                 {"dx": ref.dx_scale(dy, rinvstd, bn.gamma, channel_axis=channel_axis,
                                     relu=True, y=y)})
    assert bn.dresidual.dtype == dtype
    np.testing.assert_array_equal(bn.dresidual.astype(np.float32),
                                  np.where(y > 0, dy, 0).astype(np.float32))
    ye = bn.eval()(x, residual=z)
    re = ref.inference(x, bn.running_mean, bn.running_var, bn.gamma, bn.beta, 1e-5,
                       channel_axis=channel_axis, relu=True, residual=z)
    assert rel_err(ye, re) <= tolerance("y", dtype)
