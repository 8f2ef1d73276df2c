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


def _read_only(shape):
    a = np.empty(shape, np.float32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("out, exc, match", [
    ((np.empty((4, 3, 2), np.float32), np.empty(3, np.float32)), ValueError, "out must hold 3"),
    ((np.empty((4, 3, 3), np.float32), np.empty(3, np.float32), np.empty(3, np.float32)),
     ValueError, r"out\[y\] must have shape"),
    ((np.empty((4, 3, 2), np.float64), np.empty(3, np.float32), np.empty(3, np.float32)),
     TypeError, r"out\[y\] must have dtype"),
    ((np.empty((4, 3, 2), np.float32, order="F"), np.empty(3, np.float32),
      np.empty(3, np.float32)), ValueError, r"out\[y\] must have the memory layout"),
    # Per-argument checks behind the common case's shortcut (validate._numpy_output_ok)
    ((_read_only((4, 3, 2)), np.empty(3, np.float32), np.empty(3, np.float32)), ValueError,
     r"out\[y\] must be writeable"),
    ((np.empty((4, 3, 2), np.float32), np.empty(6, np.float32)[::2], np.empty(3, np.float32)),
     ValueError, r"out\[save_mean\] must be contiguous"),
    ((np.empty((4, 3, 2), np.float32), np.empty(3, np.float32), np.empty(3, np.float64)),
     TypeError, r"out\[save_invstd\] must have dtype"),
    ((np.empty((4, 3, 2), np.float32), np.empty(4, np.float32), np.empty(3, np.float32)),
     ValueError, r"out\[save_mean\] must have shape"),
    ((np.empty((4, 3, 2), np.float32), _read_only(3), np.empty(3, np.float32)), ValueError,
     r"out\[save_mean\] must be writeable"),
    ((np.empty((4, 3, 2), np.float32).astype(">f4"), np.empty(3, np.float32),
      np.empty(3, np.float32)), TypeError, r"out\[y\] must have dtype"),
])
def test_bad_out(out, exc, match):
    with pytest.raises(exc, match=match):
        nbbn.batch_norm_train(X, out=out)


def test_out_with_any_stride_on_a_length_one_axis_is_accepted():
    """NumPy's contiguity flags and the full check agree that a length-1 axis's stride does not
    matter: the shortcut accepts what the full check accepts."""
    x = np.linspace(-1, 1, 4 * 3).astype(np.float32).reshape(1, 3, 4)
    y = np.lib.stride_tricks.as_strided(np.empty(12, np.float32), (1, 3, 4), (999, 16, 4))
    sm, si = np.empty(3, np.float32), np.empty(3, np.float32)
    got = nbbn.batch_norm_train(x, out=(y, sm, si))
    assert got[0] is y
    np.testing.assert_array_equal(y, nbbn.batch_norm_train(x)[0])


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


def test_dtype_a_backend_does_not_run_names_who_does():
    """A kernel that declares float32 and float64 only refuses float16 x with a TypeError that
    says which backends run it (the cpu backend runs every storage dtype since #24)."""
    from nbbn import registry
    from nbbn.spec import Layout, Op

    registry.register_backend(registry.BackendInfo("test-f32", "t", lambda: None))
    registry.register(registry.KernelSpec("test-f32", Op.FORWARD_TRAIN, Layout.NC,
                                          lambda args: None))
    try:
        with pytest.raises(TypeError, match="backend .test-f32. does not run float16 x .*"
                                            "float16 runs on backend .cpu."):
            nbbn.batch_norm_train(np.zeros((4, 3), np.float16), backend="test-f32")
    finally:
        registry.unregister_backend("test-f32")


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


# ---------------------------------------------------------------------------------------------
# out= overlapping an input (issue 20, fault 1)
# ---------------------------------------------------------------------------------------------
OVERLAP_SHAPE = (65, 64, 8, 8)
SAME = "is the same memory as"


def _shifted_pair(shape=OVERLAP_SHAPE, dtype=np.float32):
    """Two arrays of ``shape`` in one buffer, one element apart: a = buf[:-1], b = buf[1:]."""
    n = int(np.prod(shape))
    buf = np.random.default_rng(0).standard_normal(n + 1).astype(dtype) - 2.3
    return buf, buf[:-1].reshape(shape), buf[1:].reshape(shape)


def test_train_out_partly_overlapping_x_is_refused():
    buf, x, out = _shifted_pair()
    before = buf.copy()
    C = x.shape[1]
    with pytest.raises(ValueError, match=r"out\[y\].*overlaps.*\bx\b"):
        nbbn.batch_norm_train(x, out=(out, np.empty(C, np.float32), np.empty(C, np.float32)))
    np.testing.assert_array_equal(buf, before)


def test_infer_out_partly_overlapping_x_is_refused():
    buf, x, out = _shifted_pair()
    before = buf.copy()
    C = x.shape[1]
    with pytest.raises(ValueError, match=r"out\[y\].*overlaps.*\bx\b"):
        nbbn.batch_norm_infer(x, np.zeros(C), np.ones(C), out=out)
    np.testing.assert_array_equal(buf, before)


@pytest.mark.parametrize("which", ["dy", "x"])
def test_backward_out_partly_overlapping_an_input_is_refused(which):
    buf, a, out = _shifted_pair()
    other = np.random.default_rng(1).standard_normal(OVERLAP_SHAPE).astype(np.float32)
    dy, x = (a, other) if which == "dy" else (other, a)
    before = buf.copy()
    C = a.shape[1]
    outs = (out, np.empty(C, np.float32), np.empty(C, np.float32))
    with pytest.raises(ValueError, match=rf"out\[dx\].*overlaps.*\b{which}\b"):
        nbbn.batch_norm_backward(dy, x, np.zeros(C, np.float32), np.ones(C, np.float32),
                                 out=outs)
    np.testing.assert_array_equal(buf, before)


def test_out_partly_overlapping_residual_or_y_is_refused():
    buf, res, out = _shifted_pair((6, 4, 3))
    x = np.random.default_rng(2).standard_normal((6, 4, 3)).astype(np.float32)
    with pytest.raises(ValueError, match=r"out\[y\].*overlaps.*residual"):
        nbbn.batch_norm_infer(x, np.zeros(4), np.ones(4), residual=res, out=out)
    with pytest.raises(ValueError, match=r"out\[dz\].*overlaps.*\by\b"):
        nbbn.batch_norm_backward(x, x, np.zeros(4, np.float32), np.ones(4, np.float32),
                                 relu=True, y=res,
                                 out=(np.empty_like(x), np.empty(4, np.float32),
                                      np.empty(4, np.float32), out))


def test_per_channel_outputs_overlapping_are_refused():
    x = np.random.default_rng(3).standard_normal((6, 4)).astype(np.float32)
    y = np.empty_like(x)
    v = np.empty(4, np.float32)
    with pytest.raises(ValueError, match=rf"out\[save_invstd\] {SAME} out\[save_mean\]"):
        nbbn.batch_norm_train(x, out=(y, v, v))
    rm, rv = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match=rf"running_mean {SAME} out\[save_mean\]"):
        nbbn.batch_norm_train(x, running_mean=rm, running_var=rv,
                              out=(y, rm, np.empty(4, np.float32)))
    g = np.ones(4, np.float32)
    with pytest.raises(ValueError, match=rf"out\[dgamma\] {SAME} gamma"):
        nbbn.batch_norm_backward(x, x, np.zeros(4, np.float32), np.ones(4, np.float32), g,
                                 out=(np.empty_like(x), g, np.empty(4, np.float32)))
    np.testing.assert_array_equal(g, 1.0)
    np.testing.assert_array_equal(rm, 0.0)


def test_interleaved_views_of_one_buffer_do_not_overlap():
    """Running statistics as every other element of one buffer (and x in the even columns of
    another whose odd columns are y): bounds that meet, no common element (np.shares_memory
    decides), so the call runs and matches the one with separate arrays."""
    x0 = np.random.default_rng(4).standard_normal((7, 5)).astype(np.float32) + 2
    stats = np.empty(10)
    rm, rv = stats[0::2], stats[1::2]
    rm[...], rv[...] = 0.0, 1.0
    y, sm, si = nbbn.batch_norm_train(x0, running_mean=rm, running_var=rv)
    rm2, rv2 = np.zeros(5), np.ones(5)
    y2, _, _ = nbbn.batch_norm_train(x0, running_mean=rm2, running_var=rv2)
    np.testing.assert_array_equal(y, y2)
    np.testing.assert_array_equal(rm, rm2)
    np.testing.assert_array_equal(rv, rv2)
    buf = np.zeros((7, 10), np.float32)
    buf[:, 0::2] = x0
    out = nbbn.batch_norm_infer(buf[:, 0::2], sm, 1 / si**2)
    np.testing.assert_array_equal(buf[:, 0::2], x0)
    assert out.shape == x0.shape


def test_exact_aliasing_that_is_safe_keeps_working():
    """out=x (y over x), y over the residual, dx over dy, dz over dy: each element is read
    before it is written, by the same thread; results equal the out-of-place ones."""
    x0 = np.random.default_rng(5).standard_normal((9, 4, 5)).astype(np.float32) + 3
    g, b = np.linspace(0.5, 2, 4).astype(np.float32), np.linspace(-1, 1, 4).astype(np.float32)
    y_ref, sm, si = nbbn.batch_norm_train(x0, g, b)
    x = x0.copy()
    y, _, _ = nbbn.batch_norm_train(x, g, b, out=(x, np.empty(4, np.float32),
                                                  np.empty(4, np.float32)))
    assert y is x
    np.testing.assert_array_equal(y, y_ref)
    r = x0 * 0.5
    yr = nbbn.batch_norm_infer(x0, sm, 1 / si**2, g, b, residual=r.copy())
    assert nbbn.batch_norm_infer(x0, sm, 1 / si**2, g, b, residual=r, out=r) is r
    np.testing.assert_array_equal(r, yr)
    dy0 = x0[::-1].copy() * 0.1
    ref_b = nbbn.batch_norm_backward(dy0, x0, sm, si, g)
    dy = dy0.copy()
    got = nbbn.batch_norm_backward(dy, x0, sm, si, g,
                                   out=(dy, np.empty(4, np.float32), np.empty(4, np.float32)))
    assert got[0] is dy
    for a, e in zip(got, ref_b, strict=True):
        np.testing.assert_array_equal(a, e)
    yf = nbbn.batch_norm_train(x0, g, b, relu=True)[0]
    ref_r = nbbn.batch_norm_backward(dy0, x0, sm, si, g, relu=True, y=yf)
    dy = dy0.copy()
    got = nbbn.batch_norm_backward(dy, x0, sm, si, g, relu=True, y=yf,
                                   out=(np.empty_like(x0), np.empty(4, np.float32),
                                        np.empty(4, np.float32), dy))
    assert got[3] is dy
    for a, e in zip(got, ref_r, strict=True):
        np.testing.assert_array_equal(a, e)


# ---------------------------------------------------------------------------------------------
# eps / momentum: real numbers only, as nbbn.BatchNorm (issue 20, fault 5)
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("value", ["0.1", True, False, None, 1 + 0j, np.bool_(True),
                                   np.array([0.1])])
def test_eps_and_momentum_must_be_real_numbers(value):
    rm, rv = np.zeros(C), np.ones(C)
    with pytest.raises(TypeError, match="eps must be a real number"):
        nbbn.batch_norm_train(X, eps=value)
    with pytest.raises(TypeError, match="eps must be a real number"):
        nbbn.batch_norm_infer(X, rm, rv, eps=value)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        nbbn.batch_norm_train(X, running_mean=rm, running_var=rv, momentum=value)
    with pytest.raises(TypeError, match="eps must be a real number"):
        nbbn.BatchNorm(C, eps=value)
    if value is not None:  # None is BatchNorm's cumulative average
        with pytest.raises(TypeError, match="momentum must be a real number"):
            nbbn.BatchNorm(C, momentum=value)
    np.testing.assert_array_equal(rm, 0.0)


@pytest.mark.parametrize("value", [1e-3, 1, np.float32(1e-3), np.float64(0.5), np.int64(1)])
def test_eps_and_momentum_accept_real_numbers(value):
    rm, rv = np.zeros(C), np.ones(C)
    nbbn.batch_norm_train(X, eps=value, running_mean=rm, running_var=rv, momentum=value)
    nbbn.BatchNorm(C, eps=value, momentum=value)


def test_out_count_for_training_names_the_number_of_arrays():
    with pytest.raises(ValueError, match=r"out must hold 3 arrays .*got one array"):
        nbbn.batch_norm_train(X, out=np.empty_like(X))
    with pytest.raises(ValueError, match=r"out must hold 3 arrays .*got 2"):
        nbbn.batch_norm_train(X, out=[np.empty_like(X), np.empty(C, np.float32)])


def test_exact_aliases_outside_the_safe_list_are_refused():
    x = np.random.default_rng(6).standard_normal((5, 3, 4)).astype(np.float32)
    sm, si = np.zeros(3, np.float32), np.ones(3, np.float32)
    v = (np.empty(3, np.float32), np.empty(3, np.float32))
    with pytest.raises(ValueError, match=rf"out\[dx\] {SAME} x:.*allowed: out\[dx\] over dy"):
        nbbn.batch_norm_backward(x.copy(), x, sm, si, out=(x, *v))
    dy, y = x * 0.5, np.abs(x)
    dz = np.empty_like(x)
    with pytest.raises(ValueError, match=rf"out\[dz\] {SAME} out\[dx\]"):
        nbbn.batch_norm_backward(dy, x, sm, si, relu=True, y=y, out=(dz, *v, dz))
    with pytest.raises(ValueError, match=rf"out\[dz\] {SAME} out\[dx\]"):  # both over dy
        nbbn.batch_norm_backward(dy, x, sm, si, relu=True, y=y, out=(dy, *v, dy))
    with pytest.raises(ValueError, match=r"out\[y\] overlaps running_mean"):
        nbbn.batch_norm_infer(x[:1, :, 0].copy(), sm, si, out=sm.reshape(1, 3))
    rm = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=rf"running_var {SAME} running_mean"):
        nbbn.batch_norm_train(x, running_mean=rm, running_var=rm)
    with pytest.raises(ValueError, match=rf"running_mean {SAME} gamma"):
        nbbn.batch_norm_train(x, rm, running_mean=rm, running_var=np.ones(3, np.float32))


def test_overlap_of_device_arrays_is_decided_by_address():
    """Arrays seen only through __cuda_array_interface__ (a real GPU's device arrays) are
    compared by their addresses, never read: here, host memory described as a device array."""
    from nbbn import validate

    class Dev:
        def __init__(self, a):
            self.keep = a
            self.__cuda_array_interface__ = {
                "shape": a.shape, "typestr": a.dtype.str, "strides": a.strides,
                "data": (a.__array_interface__["data"][0], False), "version": 3}

    buf = np.zeros((4, 10), np.float32)
    check = validate.check_overlap
    with pytest.raises(ValueError, match=r"out\[y\] overlaps x"):
        check((("y", Dev(buf[:, 1:9])),), (("x", Dev(buf[:, :8])),), ("y",))
    check((("y", Dev(buf[:, 1::2])),), (("x", Dev(buf[:, ::2])),), ("y",))  # interleaved
    check((("y", Dev(buf[:, :8])),), (("x", Dev(buf[:, :8])),), ("y",))  # exact, safe
    check((("y", Dev(buf[2:])),), (("x", Dev(buf[:2])),), ("y",))  # disjoint
