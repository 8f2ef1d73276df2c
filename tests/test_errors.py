"""Bad input: a clear exception naming the argument, and nothing modified."""

import numpy as np
import pytest

import nbbn

X = np.arange(24, dtype=np.float32).reshape(4, 3, 2)
C = 3


def _state():
    return {"rm": np.zeros(C), "rv": np.ones(C)}


def train(**kw):
    args = {"x": X, "running_mean": np.zeros(C), "running_var": np.ones(C)}
    args.update(kw)
    x = args.pop("x")
    return nbbn.batch_norm_train(x, **args)


@pytest.mark.parametrize("x, exc, match", [
    (np.zeros(5, np.float32), ValueError, "x must be 2-D"),
    (np.zeros((2, 2, 2, 2, 2), np.float32), ValueError, "x must be 2-D"),
    ([[1.0, 2.0], [3.0, 4.0]], TypeError, "x must be a NumPy array"),
    (np.zeros((4, 3), np.int64), TypeError, "x must be a floating dtype"),
    (np.zeros((4, 3), np.float16), TypeError, "backend .cpu. does not run float16"),
    (np.zeros((4, 3), np.complex64), TypeError, "x must be a floating dtype"),
    (np.zeros((0, 3), np.float32), ValueError, "x is empty"),
    (np.zeros((4, 0), np.float32), ValueError, "x is empty"),
    (np.zeros((4, 3, 0), np.float32), ValueError, "x is empty"),
])
def test_bad_x(x, exc, match):
    for call in (lambda: nbbn.batch_norm_train(x),
                 lambda: nbbn.batch_norm_infer(x, np.zeros(3), np.ones(3)),
                 lambda: nbbn.batch_norm_backward(x, x, np.zeros(3), np.ones(3))):
        with pytest.raises(exc, match=match):
            call()


@pytest.mark.parametrize("name", ["gamma", "beta", "running_mean", "running_var"])
def test_train_channel_vector_length(name):
    rm, rv = np.zeros(C), np.ones(C)
    kw = {"running_mean": rm, "running_var": rv, name: np.ones(C + 1)}
    with pytest.raises(ValueError, match=f"{name} must have shape \\(3,\\)"):
        nbbn.batch_norm_train(X, **kw)
    if name not in ("running_mean", "running_var"):
        np.testing.assert_array_equal(rm, 0.0)
        np.testing.assert_array_equal(rv, 1.0)


@pytest.mark.parametrize("name", ["save_mean", "save_invstd", "gamma"])
def test_backward_channel_vector_length(name):
    kw = {"save_mean": np.zeros(C), "save_invstd": np.ones(C), name: np.ones(2)}
    with pytest.raises(ValueError, match=name):
        nbbn.batch_norm_backward(X, X, **kw)


@pytest.mark.parametrize("name", ["running_mean", "running_var", "gamma", "beta"])
def test_infer_channel_vector_length(name):
    kw = {"running_mean": np.zeros(C), "running_var": np.ones(C), name: np.ones(5)}
    with pytest.raises(ValueError, match=name):
        nbbn.batch_norm_infer(X, **kw)


@pytest.mark.parametrize("name", ["gamma", "running_var", "save_invstd"])
def test_channel_vector_dtype(name):
    bad = np.ones(C, dtype=np.int32)
    with pytest.raises(TypeError, match=f"{name} must be float32 or float64"):
        if name == "save_invstd":
            nbbn.batch_norm_backward(X, X, np.zeros(C), bad)
        else:
            kw = {"running_mean": np.zeros(C), "running_var": np.ones(C), name: bad}
            nbbn.batch_norm_train(X, **kw)


def test_dy_dtype_must_match_x():
    with pytest.raises(TypeError, match="dy must have x's dtype"):
        nbbn.batch_norm_backward(X.astype(np.float64), X, np.zeros(C), np.ones(C))


def test_dy_shape_must_match_x():
    with pytest.raises(ValueError, match="dy must have x's shape"):
        nbbn.batch_norm_backward(X[:2], X, np.zeros(C), np.ones(C))


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_one_value_per_channel_rejected_in_training(shape):
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        nbbn.batch_norm_train(np.ones(shape, np.float32), running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 0.0)
    # inference with one value per channel is fine
    assert nbbn.batch_norm_infer(np.ones(shape, np.float32), rm, rv).shape == shape


@pytest.mark.parametrize("eps", [0.0, -1e-5, np.nan, np.inf])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be finite and > 0"):
        train(eps=eps)
    with pytest.raises(ValueError, match="eps"):
        nbbn.batch_norm_infer(X, np.zeros(C), np.ones(C), eps=eps)


@pytest.mark.parametrize("momentum", [-0.1, 1.5, np.nan])
def test_bad_momentum(momentum):
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(ValueError, match="momentum must lie in \\[0, 1\\]"):
        nbbn.batch_norm_train(X, running_mean=rm, running_var=rv, momentum=momentum)
    np.testing.assert_array_equal(rm, 0.0)


def test_eps_of_wrong_type():
    with pytest.raises(TypeError, match="eps must be a real number"):
        train(eps="small")


def test_unknown_backend_lists_the_available_ones():
    with pytest.raises(ValueError, match="unknown backend 'tpu'.*cpu.*cuda"):
        nbbn.batch_norm_train(X, backend="tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        nbbn.batch_norm_infer(X, np.zeros(C), np.ones(C), backend="tpu")
    with pytest.raises(ValueError, match="unknown backend"):
        nbbn.batch_norm_backward(X, X, np.zeros(C), np.ones(C), backend="tpu")


def test_running_stats_come_in_pairs():
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        nbbn.batch_norm_train(X, running_mean=np.zeros(C))


def test_read_only_running_stats_rejected():
    rm = np.zeros(C)
    rm.flags.writeable = False
    with pytest.raises(ValueError, match="running_mean is updated in place"):
        nbbn.batch_norm_train(X, running_mean=rm, running_var=np.ones(C))


@pytest.mark.parametrize("out, exc, match", [
    ((np.empty((4, 3, 2), np.float32), np.empty(3, np.float32)), ValueError, "out must hold 3"),
    ((np.empty((4, 3, 3), np.float32), np.empty(3, np.float32), np.empty(3, np.float32)),
     ValueError, r"out\[y\] must have shape"),
    ((np.empty((4, 3, 2), np.float64), np.empty(3, np.float32), np.empty(3, np.float32)),
     TypeError, r"out\[y\] must have dtype"),
    ((np.empty((4, 3, 2), np.float32, order="F"), np.empty(3, np.float32),
      np.empty(3, np.float32)), ValueError, r"out\[y\] must have the memory layout"),
])
def test_bad_out(out, exc, match):
    with pytest.raises(exc, match=match):
        nbbn.batch_norm_train(X, out=out)


def test_inputs_are_not_modified():
    x = X.copy()
    g, b = np.ones(C), np.zeros(C)
    y, sm, si = nbbn.batch_norm_train(x, g, b)
    dy = x * 0.5
    dy0 = dy.copy()
    nbbn.batch_norm_backward(dy, x, sm, si, g)
    nbbn.batch_norm_infer(x, sm, si, g, b)
    np.testing.assert_array_equal(x, X)
    np.testing.assert_array_equal(dy, dy0)
    np.testing.assert_array_equal(g, 1.0)
    np.testing.assert_array_equal(b, 0.0)


def test_baseline_backends_are_refused_by_the_public_api():
    from nbbn import registry

    registry.register_backend(registry.BackendInfo("test-baseline", "t", lambda: None,
                                                   kind="baseline"))
    try:
        with pytest.raises(ValueError, match="benchmark baseline"):
            nbbn.batch_norm_train(X, backend="test-baseline")
    finally:
        registry.unregister_backend("test-baseline")


def test_unavailable_backend_says_why():
    from nbbn import registry

    registry.register_backend(registry.BackendInfo("test-missing", "t",
                                                   lambda: "no such hardware here"))
    try:
        assert nbbn.availability()["test-missing"] == "no such hardware here"
        with pytest.raises(nbbn.BackendUnavailable, match="no such hardware here"):
            nbbn.batch_norm_train(X, backend="test-missing")
    finally:
        registry.unregister_backend("test-missing")


def test_device_array_refused_by_cpu_backend_with_a_clear_message():
    class FakeDevice:
        __cuda_array_interface__ = {"shape": (4, 3), "typestr": "<f4", "data": (0, False),
                                    "version": 3, "strides": None}

    with pytest.raises(TypeError, match="backend 'cpu' takes NumPy arrays"):
        nbbn.batch_norm_train(FakeDevice())
