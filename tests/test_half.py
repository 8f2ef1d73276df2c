"""Half storage (float16, bfloat16) on the cpu backend.

The codec (``nbbn.cpu.kernels.ld``/``st``): every one of the 65536 bit patterns decodes to the
float32 value NumPy / ml_dtypes give and encodes back to the same bits; float32 values round to
nearest even as NumPy's float16 cast and ml_dtypes' bfloat16 cast do (ties, subnormals,
overflow, ±inf, NaN). These compile only two tiny loops, not the kernels.

Kernel tests: each half dtype is a specialization set of its own (seconds of compilation per
kernel on a cold cache), and the test session's warm-up compiles none of them. So the fast tier
runs two float16 inference calls that share one specialization (NC, serial, float32 vectors);
forward-train and backward on both formats, and ``precompile`` of the half dtypes, are in the
exhaustive tier, with the full op × layout × variant × fusion matrix in
tests/test_conformance.py.
"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

import nbbn
from nbbn import reference as ref
from nbbn import registry, validate
from nbbn.cpu import kernels as K
from nbbn.spec import Layout, Op
from nbbn.tolerances import rel_err, tolerance

BF16 = validate._bfloat16()
F16 = np.dtype(np.float16)
#: (storage dtype, the kernels' view of its bits)
FORMATS = [pytest.param(F16, np.int16, id="float16"),
           pytest.param(BF16, np.uint16, id="bfloat16",
                        marks=pytest.mark.skipif(BF16 is None, reason="bfloat16 needs ml_dtypes"))]


@njit
def _decode_encode(bits, values, back):
    """values[i] = ld(bits, i) (float32), back[i] = st of that value in bits' format."""
    for i in range(bits.size):
        v = K.ld(bits, i)
        values[i] = v
        K.st(back, i, v)


@njit
def _encode(values, bits):
    for i in range(values.size):
        K.st(bits, i, values[i])


@njit
def _decode_encode_f16_bits(bits, values, back):
    """:func:`_decode_encode` through the float16 bit manipulation (the kernels' path on a CPU
    without F16C), whatever this CPU has."""
    for i in range(bits.size):
        v = K.f16_decode(bits[i])
        values[i] = v
        back[i] = np.int16(K.f16_encode(v))


@njit
def _encode_f16_bits(values, bits):
    for i in range(values.size):
        bits[i] = np.int16(K.f16_encode(values[i]))


#: (format, bits view, decode-encode loop, encode loop): the kernels' codec for both formats,
#: and float16's bit manipulation on its own (the kernels use F16C where the CPU has it).
CODECS = [pytest.param(*p.values, _decode_encode, _encode, id=p.id, marks=p.marks)
          for p in FORMATS] + [
    pytest.param(F16, np.int16, _decode_encode_f16_bits, _encode_f16_bits, id="float16-bits")]


def _all_patterns(view):
    return np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(view)


@pytest.mark.parametrize("dtype, view, decode_encode, encode", CODECS)
def test_every_bit_pattern_decodes_exactly_and_encodes_back(dtype, view, decode_encode, encode):
    bits = _all_patterns(view)
    values = np.empty(bits.size, np.float32)
    back = np.empty_like(bits)
    decode_encode(bits, values, back)
    want = bits.view(dtype).astype(np.float32)  # NumPy / ml_dtypes widening: exact
    nan = np.isnan(want)
    assert np.isnan(values[nan]).all()
    np.testing.assert_array_equal(values[~nan].view(np.uint32), want[~nan].view(np.uint32))
    # NaNs too: sign and payload survive; bfloat16's encode sets the quiet bit (IEEE 754's
    # conversion of a signaling NaN), float16's keeps a signaling NaN's bits
    want_back = bits.view(np.uint16).copy()
    if dtype == BF16:
        want_back[nan] |= 0x40
    np.testing.assert_array_equal(back.view(np.uint16), want_back)


def _awkward_float32(dtype):
    """float32 values at and around every rounding boundary of ``dtype``: each pattern's value,
    the midpoints between neighbours (ties), ±1 float32 ulp around them, the subnormal range,
    overflow, ±inf, NaN, and random bits."""
    rng = np.random.default_rng(5)
    with np.errstate(invalid="ignore"):  # NaN patterns
        finite = _all_patterns(np.uint16).view(dtype).astype(np.float64)
    finite = np.unique(finite[np.isfinite(finite)])
    mid = (finite[:-1] + finite[1:]) / 2  # exact in float64, and in float32 (one bit more)
    mid32 = mid.astype(np.float32)
    near = np.concatenate([mid32, np.nextafter(mid32, np.float32(np.inf)),
                           np.nextafter(mid32, np.float32(-np.inf))])
    big = np.float32(np.finfo(dtype).max)
    extra = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 65519.996, 65520.0, 65536.0,
                      3.4e38, -3.4e38, 1e-45, -1e-45, 2.0**-25, 2.0**-26, 3 * 2.0**-26,
                      2.0**-24 * 1.5, 2.0**-24 * 2.5, 1.00390625, 1.01171875, big],
                     np.float32)
    rand = rng.integers(0, 1 << 32, 200_000, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.concatenate([finite.astype(np.float32), near, extra, rand])


@pytest.mark.parametrize("dtype, view, decode_encode, encode", CODECS)
def test_float32_rounds_to_nearest_even_like_numpy(dtype, view, decode_encode, encode):
    x = _awkward_float32(dtype)
    bits = np.empty(x.size, view)
    encode(x, bits)
    with np.errstate(over="ignore", invalid="ignore"):
        want = x.astype(dtype)  # NumPy's float16 cast and ml_dtypes' are round-to-nearest-even
    got = bits.view(dtype)
    nan = np.isnan(x)
    assert np.isnan(got[nan].astype(np.float32)).all()
    np.testing.assert_array_equal(got[~nan].view(np.uint16), want[~nan].view(np.uint16))


def _f16_infer(x, gamma, beta, residual=None, relu=False):
    """Inference on a small float16 NC x with float32 vectors and population statistics μ = 0,
    σ² = 1: the fast tier's one half specialization (NC_INFER serial, int16 bits, float32
    vectors)."""
    C = x.shape[1]
    return nbbn.batch_norm_infer(x, np.zeros(C, np.float32), np.ones(C, np.float32),
                                 np.asarray(gamma, np.float32), np.asarray(beta, np.float32),
                                 residual=residual, relu=relu, backend="cpu")


def test_float16_inference_fused():
    """float16 y = ReLU(x·γ + β + residual) within 2u of the float64 reference, in x's dtype."""
    rng = np.random.default_rng(4)
    x = (1.0 + rng.standard_normal((37, 5))).astype(F16)
    res = rng.standard_normal(x.shape).astype(F16)
    gamma, beta = np.linspace(0.5, 1.5, 5), np.linspace(-1, 1, 5)
    y = _f16_infer(x, gamma, beta, residual=res, relu=True)
    assert y.dtype == F16 and y.shape == x.shape
    want = ref.inference(x, np.zeros(5), np.ones(5), gamma.astype(np.float32),
                         beta.astype(np.float32), residual=res, relu=True)
    assert rel_err(y, want) <= tolerance("y", F16)


def test_float16_stores_round_to_nearest_even():
    """The kernels' float16 stores against NumPy's rounding of the same float32 values: with
    γ = 0 and mean 0, y = β (a float32 coefficient, rounded once at the store) and y = β +
    residual carries half values through unchanged (±inf, NaN, subnormals)."""
    vals = np.array([1.0, 1.00048828125, 1.00146484375, -2.0009765625, 65519.0, 65520.0,
                     3e-8, 2.0**-25, -(2.0**-24) * 1.5, 1e-3], np.float32)
    x = np.zeros((vals.size, 1), F16)
    x[0, 0], x[1, 0] = 1.0, -1.0
    for b in vals:
        y = _f16_infer(x, [0.0], [b])
        with np.errstate(over="ignore"):
            want = np.float32(b).astype(F16)
        assert y.view(np.uint16)[0, 0] == np.array(want).view(np.uint16), b
    halves = np.array([1.0, -np.inf, np.inf, np.nan, 6e-8, -6e-8, 65504.0], F16)
    res = np.zeros((vals.size, 1), F16)
    res[:halves.size, 0] = halves
    y = _f16_infer(x, [0.0], [0.0], residual=res)
    got, want = y.view(np.uint16)[:, 0], res.view(np.uint16)[:, 0]
    nan = np.isnan(res[:, 0])
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(y[nan, 0]).all()


@pytest.mark.slow
@pytest.mark.parametrize("dtype, view", FORMATS)
def test_half_x_through_the_public_api(dtype, view):
    """forward-train, inference and backward with ReLU on a small NC half x (the serial
    kernels): y, dx in x's dtype within 2u, per-channel outputs float32 (as PyTorch and the
    cuda backend return), running statistics updated in their own dtype."""
    assert dtype in registry.select("cpu", Op.FORWARD_TRAIN, Layout.NC).dtypes
    rng = np.random.default_rng(3)
    x = (3.0 + rng.standard_normal((37, 5))).astype(dtype)
    gamma = np.linspace(0.5, 1.5, 5).astype(np.float32)
    beta = np.linspace(-1, 1, 5).astype(np.float32)
    rm, rv = np.zeros(5, np.float32), np.ones(5, np.float32)
    y, sm, si = nbbn.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv,
                                      momentum=0.5, relu=True, backend="cpu")
    assert y.dtype == dtype and sm.dtype == si.dtype == np.float32
    ey, emean, einvstd, evar = ref.forward_train(x, gamma, beta, relu=True)
    assert rel_err(y, ey) <= tolerance("y", dtype)
    assert rel_err(sm, emean) <= tolerance("save_mean", dtype)
    assert rel_err(si, einvstd) <= tolerance("save_invstd", dtype)
    assert rel_err(rv, 0.5 + 0.5 * evar * 37 / 36) <= tolerance("running_var", dtype)
    out = (np.empty_like(x), np.empty(5, np.float32), np.empty(5, np.float32))
    got = nbbn.batch_norm_train(x, gamma, beta, relu=True, out=out, backend="cpu")
    assert all(g is o for g, o in zip(got, out, strict=True))
    np.testing.assert_array_equal(out[0].view(np.uint16), y.view(np.uint16))
    np.testing.assert_array_equal(out[1], sm)

    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dg, db, dz = nbbn.batch_norm_backward(dy, x, sm, si, gamma, relu=True, y=y,
                                              backend="cpu")
    assert dx.dtype == dz.dtype == dtype and dg.dtype == db.dtype == np.float32
    edx, edg, edb, edz = ref.backward(dy, x, emean, einvstd, gamma, relu=True, y=y)
    np.testing.assert_array_equal(dz.view(np.uint16), np.asarray(edz, dtype).view(np.uint16))
    scale = ref.dx_scale(dy, einvstd, gamma, relu=True, y=y)
    assert rel_err(dx, edx, scale) <= tolerance("dx", dtype)
    assert rel_err(dg, edg) <= tolerance("dgamma", dtype)
    assert rel_err(db, edb) <= tolerance("dbeta", dtype)

    res = rng.standard_normal(x.shape).astype(dtype)
    yi = nbbn.batch_norm_infer(x, rm, rv, gamma, beta, residual=res, backend="cpu")
    assert yi.dtype == dtype
    assert rel_err(yi, ref.inference(x, rm, rv, gamma, beta, residual=res)) \
        <= tolerance("y", dtype)


@pytest.mark.slow
def test_precompile_accepts_the_half_dtypes():
    """A service can warm up the half kernels (the test warm-up does not)."""
    from nbbn.cpu import precompile

    dtypes = [F16] + ([BF16] if BF16 is not None else [])
    n = precompile(dtypes, mixed=False, layouts=(Layout.NC,), ops=(Op.INFERENCE,))
    assert n == 2 * len(dtypes)  # rows and serial per dtype
