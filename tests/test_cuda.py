"""The CUDA backend against the float64 reference: every op × layout (NC, NCHW, NHWC) × dtype
(float32, float64, float16, bfloat16) × fusion × registry variant, plus what is CUDA-specific:
device arrays (channels-last views, no copies), launch plans, the save_mean fold, the Parts.

Runs under Numba's CUDA simulator by default (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1), on
the real GPU with NBBN_TEST_GPU=1; ``@pytest.mark.gpu`` tests need the real GPU. The simulator
runs every thread as a Python thread, so shapes stay tiny (≤ a few hundred values) and blocks
small (32 threads), yet every shape below still splits channels over several blocks, leaves
ragged last blocks, and has sizes that are no multiple of the block.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

import nbbn
from nbbn import reference as ref
from nbbn import registry, validate
from nbbn.spec import Fusion, Layout, Op
from nbbn.tolerances import rel_err, tolerance

from .helpers import assert_close, backward_refs, make_params, make_x

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = pytest.mark.cudasim

try:
    import ml_dtypes

    BF16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - ml_dtypes comes with the cuda extra
    BF16 = None

F16 = np.dtype(np.float16)
DTYPES = [np.dtype(np.float32), np.dtype(np.float64), F16,
          pytest.param(BF16, marks=pytest.mark.skipif(
              BF16 is None, reason="bfloat16 needs ml_dtypes (pip install 'nbbn[cuda]')"))]
VARIANTS = ["v1", "v2"]
#: One small case per memory layout: (shape, channel_axis). NC: C > 32 would need two column
#: groups, tested apart; NHWC: an (N, H, W, C) array, m = 36 rows of C = 5.
LAYOUT_CASES = {Layout.NC: ((37, 3), 1), Layout.NCHW: ((3, 2, 5, 5), 1),
                Layout.NHWC: ((3, 4, 3, 5), -1)}
OFFSET = 1e3


def _offset(dtype) -> float:
    """Data offsets: 1e3 for float32/64 (|μ|/σ up to 4e3), 8 for the half formats (whose spacing
    at 1e3 -- 0.5 for float16, 4 for bfloat16 -- would quantize σ ≈ 0.5 data to a few values)."""
    return OFFSET if np.dtype(dtype).itemsize > 2 else 8.0


def _name(d):
    return np.dtype(d).name


@pytest.fixture(scope="module")
def B():
    """nbbn.cuda.backend, or a skip saying why the backend cannot run here."""
    reason = registry.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend 'cuda' is unavailable here: {reason}")
    from nbbn.cuda import backend

    return backend


@pytest.fixture(scope="module", autouse=True)
def _fast_simulator():
    """The simulator's block manager busy-polls its Python threads; a short GIL switch interval
    lets the worker threads run and makes these tests ~3x faster."""
    old = sys.getswitchinterval()
    if SIMULATOR:
        sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


def _kernel(op, layout, variant, dtype):
    spec = registry.select("cuda", op, layout, variant)
    assert np.dtype(dtype) in spec.dtypes
    return spec.fn


def _data(shape, dtype, C, seed=0, offset=None):
    off = _offset(dtype) if offset is None else offset
    if len(shape) == 4 and shape[-1] == C and shape[1] != C:  # channels last: make_x wants axis 1
        x = make_x((shape[0], C, shape[1], shape[2]), np.float64, off, seed)
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    else:
        x = make_x(shape, np.float64, off, seed)
    return x.astype(dtype)


def _check_ops(x, ax, dtype, fusion, variant, gamma, beta):
    """Forward-train (running stats), backward (with the forward's y for a ReLU) and inference
    (v1 only: v2 registers the same kernels) of one registered variant against the reference."""
    g = validate.geometry(x, ax)
    C = g.C
    rng = np.random.default_rng(5)
    residual = (rng.standard_normal(x.shape).astype(dtype) if fusion.residual else None)
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    rm0, rv0 = rm.copy(), rv.copy()

    args = validate.train_args(x, gamma, beta, 1e-5, rm, rv, 0.3, None, ax, fusion.relu,
                               residual)
    y, sm, si = _kernel(Op.FORWARD_TRAIN, g.layout, variant, dtype)(args)
    ry, rmean, rinvstd, rvar = ref.forward_train(x, gamma, beta, channel_axis=ax,
                                                 relu=fusion.relu, residual=residual)
    cdt = validate.channel_dtype(dtype)
    assert y.dtype == dtype and sm.dtype == si.dtype == cdt
    assert y.shape == x.shape and sm.shape == si.shape == (C,)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), dtype)
    erm, erv = ref.running_update(rm0, rv0, rmean, rvar, g.m, 0.3)
    assert rel_err(rm, erm) <= tolerance("running_mean", rm.dtype)
    assert rel_err(rv, erv) <= tolerance("running_var", rv.dtype)

    dy = make_x(x.shape, np.float64, 0.1, seed=7).astype(dtype)
    bargs = validate.backward_args(dy, x, sm, si, gamma, None, ax, fusion.relu,
                                   y if fusion.relu else None)
    outs = _kernel(Op.BACKWARD, g.layout, variant, dtype)(bargs)
    assert len(outs) == (4 if fusion.relu else 3)
    assert outs[0].dtype == dtype and outs[1].dtype == outs[2].dtype == cdt
    # sm is the rounded batch mean of x: backward folds it back to the float64 mean (the fold),
    # so the exact reference is the gradient at the float64 mean.
    rdx, rdg, rdb, *rdz = ref.backward(dy, x, rmean, si, gamma, channel_axis=ax,
                                       relu=fusion.relu, y=y)
    scale = ref.dx_scale(dy, si, gamma, channel_axis=ax, relu=fusion.relu, y=y)
    assert_close(Op.BACKWARD, outs[:3], (rdx, rdg, rdb), dtype, {"dx": scale})
    if fusion.relu:
        assert outs[3].dtype == dtype
        np.testing.assert_array_equal(outs[3].astype(np.float64), rdz[0])  # dz: exact

    infer = _kernel(Op.INFERENCE, g.layout, variant, dtype)
    if variant != "v1":  # inference has no reduction: every variant runs v1's kernels
        assert infer.__name__ == "infer_" + variant
        return
    iargs = validate.infer_args(x, rm, rv, gamma, beta, 1e-5, None, ax, fusion.relu, residual)
    (yi,) = infer(iargs)
    assert yi.dtype == dtype
    assert_close(Op.INFERENCE, (yi,),
                 (ref.inference(x, rm, rv, gamma, beta, channel_axis=ax, relu=fusion.relu,
                                residual=residual),), dtype)


#: The fast tier's (fusion, variant) per (layout, dtype): a Latin square over these four, so
#: that every layout × dtype runs once, every layout runs all four, and every dtype (three
#: layouts, three consecutive entries) runs both variants, with no fusion and with the fullest
#: one (add-relu: the residual read and the ReLU mask on every op that has them). The other
#: 84 combinations -- relu and add alone, the same kernels with one flag fewer, among them --
#: run in the exhaustive tier (each is 1-2 s of simulator time).
_FAST_COMBOS = [(Fusion.NONE, "v1"), (Fusion.ADD_RELU, "v1"), (Fusion.ADD_RELU, "v2"),
                (Fusion.NONE, "v2")]


def _ops_params():
    for i, layout in enumerate(LAYOUT_CASES):
        for j, d in enumerate(DTYPES):
            dtype, marks = (d.values[0], list(d.marks)) if hasattr(d, "values") else (d, [])
            for fusion in Fusion:
                for variant in VARIANTS:
                    slow = (fusion, variant) != _FAST_COMBOS[(i + j) % len(_FAST_COMBOS)]
                    yield pytest.param(layout, dtype, fusion, variant,
                                       marks=marks + [pytest.mark.slow] * slow,
                                       id=f"{layout}-{_name(dtype) if dtype else 'bfloat16'}"
                                          f"-{fusion}-{variant}")


@pytest.mark.parametrize("layout, dtype, fusion, variant", list(_ops_params()))
def test_ops_against_reference(layout, dtype, fusion, variant, B):
    shape, ax = LAYOUT_CASES[layout]
    x = _data(shape, dtype, shape[ax])
    assert validate.geometry(x, ax).layout is layout
    _check_ops(x, ax, dtype, fusion, variant, *make_params(shape[ax]))


# Awkward on purpose: C = 1, C > 32 (two NC column groups, the last ragged), N = 2, H·W = 1,
# NCL input, S not a multiple of anything, a channels-last (N, L, C).
AWKWARD = [((2, 1), 1), ((3, 33), 1), ((2, 1, 1, 1), 1), ((2, 3, 1, 1), 1), ((2, 1, 37), 1),
           ((2, 7, 3), -1), ((2, 1, 1, 3), -1)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", AWKWARD, ids=str)
def test_awkward_shapes(case, variant, B):
    shape, ax = case
    C = shape[ax]
    x = make_x(shape if ax == 1 else (shape[0], C) + shape[1:-1], np.float64, OFFSET)
    if ax != 1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    _check_ops(x.astype(np.float32), ax, np.dtype(np.float32), Fusion.ADD_RELU, variant,
               *make_params(C))


def test_registry_entries(B):
    """Variants v1 (default) and v2 for every op and layout, every storage dtype, the fusions."""
    assert registry.backend_info("cuda").default_variant == "v1"
    for op in Op:
        for layout in Layout:
            assert registry.variants("cuda", op, layout) == VARIANTS
            spec = registry.select("cuda", op, layout)
            assert spec.variant == "v1" and set(spec.dtypes) == set(validate.STORAGE_DTYPES)
            if hasattr(spec, "fusions"):
                want = {Fusion.NONE, Fusion.RELU} if op is Op.BACKWARD else set(Fusion)
                assert set(spec.fusions) == want
    assert set(registry.backend_info("cuda").dtypes) == set(validate.STORAGE_DTYPES)
    if BF16 is not None:
        assert BF16 in registry.backend_info("cuda").dtypes


def test_half_x_public_api_and_out_dtypes(B):
    """float16 through the public API: per-channel outputs float32 (as PyTorch), ``out=`` must
    say so, and the CPU backend points at cuda."""
    x = _data((9, 4), F16, 4)
    y, sm, si = nbbn.batch_norm_train(x, backend="cuda")
    assert y.dtype == F16 and sm.dtype == si.dtype == np.float32
    out = (np.empty_like(x), np.empty(4, np.float32), np.empty(4, np.float32))
    res = nbbn.batch_norm_train(x, out=out, backend="cuda")
    assert all(r is o for r, o in zip(res, out, strict=True))
    np.testing.assert_array_equal(res[0], y)
    with pytest.raises(TypeError, match=r"out\[save_mean\] must have dtype float32"):
        nbbn.batch_norm_train(x, out=(np.empty_like(x), np.empty(4, F16), np.empty(4, F16)),
                              backend="cuda")
    if F16 not in registry.backend_info("cpu").dtypes:
        with pytest.raises(TypeError, match="float16 runs on backend 'cuda'"):
            nbbn.batch_norm_train(x, backend="cpu")


# ---------------------------------------------------------------------------------------------
# Backward's save_mean fold (#15 item 3)
# ---------------------------------------------------------------------------------------------


def _two_row_batch(C=16):
    """N = 2 float32 rows per channel at mean ±1e3, σ ≈ 0.07: save_mean in float32 is off by up
    to half an ulp of 1e3 (3e-5), i.e. ~4e-4·σ."""
    rng = np.random.default_rng(11)
    mean = np.where(np.arange(C) % 2 == 0, 1e3, -1e3)
    return (mean + 0.1 * rng.standard_normal((2, C))).astype(np.float32)


@pytest.mark.parametrize("variant", VARIANTS)
def test_fold_keeps_dx_at_large_offset(variant, B):
    """dx within 1e-4 relative to ‖γ·invstd·dy‖ against the gradient at the float64 batch mean;
    the same call without the fold is off by more (so this test can fail)."""
    x = _two_row_batch()
    gamma, _ = make_params(x.shape[1])
    y, sm, si = nbbn.batch_norm_train(x, gamma, backend="cuda")
    _, mean64, invstd64, _ = ref.forward_train(x, gamma)
    assert np.any(sm.astype(np.float64) != mean64)  # the rounding the fold repairs
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    rdx, rdg, _ = ref.backward(dy, x, mean64, invstd64, gamma)
    scale = ref.dx_scale(dy, invstd64, gamma)
    args = validate.backward_args(dy, x, sm, si, gamma, None)
    dx, dg, _ = B.backward(args, variant)
    dx_nofold, dg_nofold, _ = B.backward(args, variant, fold=False)
    err, err_nofold = rel_err(dx, rdx, scale), rel_err(dx_nofold, rdx, scale)
    print(f"dx error relative to ‖γ·invstd·dy‖: {err:.2e} with the fold, {err_nofold:.2e} without")
    assert err <= 1e-4 < err_nofold, (err, err_nofold)
    assert rel_err(dg, rdg) <= tolerance("dgamma", np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=_name)
@pytest.mark.parametrize("variant", VARIANTS)
def test_deliberately_different_save_mean_is_used_as_given(dtype, variant, B):
    """A save_mean that is not this x's mean (a global mean of synchronized BN): the gradient
    formulas with that mean, as given."""
    x = make_x((20, 4), dtype, 3.0)
    gamma, _ = make_params(4)
    mean64, var64 = ref.batch_stats(x)
    sm = (mean64 + 0.3 * np.sqrt(var64)).astype(dtype)
    si = (1.0 / np.sqrt(var64 + 1e-5)).astype(dtype)
    dy = make_x(x.shape, dtype, 0.2, seed=4)
    args = validate.backward_args(dy, x, sm, si, gamma, None)
    outs = B.backward(args, variant)
    refs, scales = backward_refs(dy, x, sm, si, gamma)
    assert_close(Op.BACKWARD, outs, refs, dtype, scales)
    folded, _, _ = ref.backward(dy, x, mean64, si, gamma)
    assert rel_err(outs[0], folded, scales["dx"]) > 100 * tolerance("dx", dtype)


# ---------------------------------------------------------------------------------------------
# Device arrays
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def cuda():
    from numba import cuda

    return cuda


def _device_like(B, cuda, host):
    """A device array with ``host``'s shape and memory layout (channels-last views included),
    built from one contiguous upload."""
    g = validate.geometry(host)
    mem = np.ascontiguousarray(host.transpose(g.perm)).reshape(-1)
    return B._user_view(cuda.to_device(mem), g)


def _strides(a):
    return tuple(validate.array_meta(a, "a").strides)


def _same_memory(a, b) -> bool:
    if SIMULATOR:
        return np.shares_memory(a._ary, b._ary)
    return a.device_ctypes_pointer.value == b.device_ctypes_pointer.value


@pytest.mark.parametrize("variant", VARIANTS)
def test_channels_last_device_arrays_are_not_copied(variant, B, cuda):
    """(N, C, H, W) device arrays with channels-last memory (a PyTorch channels_last tensor):
    computed on the NHWC kernels in place, outputs in the same memory layout with the user's axis
    order, residual and ReLU fused, backward dz too."""
    host = np.ascontiguousarray(make_x((3, 4, 2, 5), np.float32, OFFSET).transpose(0, 2, 3, 1))
    x_cl = host.transpose(0, 3, 1, 2)  # (N, C, H, W) view, C has the smallest stride
    g = validate.geometry(x_cl)
    assert g.layout is Layout.NHWC and not g.identity_perm
    xd = _device_like(B, cuda, x_cl)
    assert _strides(xd) == x_cl.strides and _same_memory(B._x_like(xd, "x", g), xd)
    res_host = np.ascontiguousarray(
        make_x((3, 4, 2, 5), np.float32, 0.0, seed=2).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gamma, beta = make_params(4)
    fwd = registry.select("cuda", Op.FORWARD_TRAIN, Layout.NHWC, variant).fn
    y, sm, si = fwd(validate.train_args(xd, gamma, beta, 1e-5, None, None, 0.1, None, 1, True,
                                        _device_like(B, cuda, res_host)))
    assert y.shape == x_cl.shape and _strides(y) == x_cl.strides
    ry, rmean, rinvstd, _ = ref.forward_train(x_cl, gamma, beta, relu=True, residual=res_host)
    assert_close(Op.FORWARD_TRAIN, (_host(y), _host(sm), _host(si)), (ry, rmean, rinvstd),
                 np.float32)

    dy_host = np.ascontiguousarray(
        make_x((3, 4, 2, 5), np.float32, 0.0, seed=6).transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    bwd = registry.select("cuda", Op.BACKWARD, Layout.NHWC, variant).fn
    dx, dg, db, dz = bwd(validate.backward_args(_device_like(B, cuda, dy_host), xd, sm, si, gamma,
                                                None, 1, True, y))
    assert _strides(dx) == _strides(dz) == x_cl.strides
    y_h = _host(y)
    rdx, rdg, rdb, rdz = ref.backward(dy_host, x_cl, rmean, _host(si), gamma, relu=True, y=y_h)
    assert_close(Op.BACKWARD, (_host(dx), _host(dg), _host(db)), (rdx, rdg, rdb), np.float32,
                 {"dx": ref.dx_scale(dy_host, _host(si), gamma, relu=True, y=y_h)})
    np.testing.assert_array_equal(_host(dz), rdz)

    # out= in the same layout is written and returned.
    out = _device_like(B, cuda, np.empty_like(x_cl))
    assert nbbn.batch_norm_infer(xd, rmean, 1.0 / rinvstd**2 - 1e-5, gamma, beta, out=out,
                                 backend="cuda") is out
    assert_close(Op.INFERENCE, (_host(out),), (ref.inference(x_cl, rmean, 1.0 / rinvstd**2 - 1e-5,
                                                              gamma, beta),), np.float32)


def test_nhwc_device_array_channel_axis_last(B, cuda):
    """An (N, H, W, C) C-contiguous device array with channel_axis=-1: outputs (N, H, W, C)."""
    x = _data((2, 3, 4, 5), np.dtype(np.float32), 5)
    y, sm, si = nbbn.batch_norm_train(cuda.to_device(x), channel_axis=-1, backend="cuda")
    assert y.shape == x.shape and _strides(y) == x.strides
    ry, rmean, rinvstd, _ = ref.forward_train(x, channel_axis=-1)
    assert_close(Op.FORWARD_TRAIN, (_host(y), _host(sm), _host(si)), (ry, rmean, rinvstd),
                 np.float32)


def test_channels_last_host_view_comes_back_channels_last(B):
    x = np.ascontiguousarray(make_x((3, 4, 2, 5), np.float64, OFFSET).transpose(0, 2, 3, 1))
    x = x.transpose(0, 3, 1, 2)
    y, sm, si = nbbn.batch_norm_train(x, backend="cuda")
    assert y.strides == x.strides
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), np.float64)


def test_device_arrays_stay_on_device(B, cuda):
    """Device x: outputs are device arrays, device running stats are updated in place, and
    ``out=`` device arrays are written and returned."""
    from numba.cuda.cudadrv.devicearray import is_cuda_ndarray

    x = make_x((4, 3, 5), np.float32, OFFSET)
    gamma, beta = make_params(3)
    dx_, dg, db = cuda.to_device(x), cuda.to_device(gamma), cuda.to_device(beta)
    drm, drv = cuda.to_device(np.zeros(3)), cuda.to_device(np.ones(3))
    y, sm, si = nbbn.batch_norm_train(dx_, dg, db, running_mean=drm, running_var=drv,
                                      momentum=0.2, backend="cuda")
    assert all(is_cuda_ndarray(a) for a in (y, sm, si))
    ry, rmean, rinvstd, rvar = ref.forward_train(x, gamma, beta)
    assert_close(Op.FORWARD_TRAIN, (y.copy_to_host(), sm.copy_to_host(), si.copy_to_host()),
                 (ry, rmean, rinvstd), np.float32)
    erm, erv = ref.running_update(np.zeros(3), np.ones(3), rmean, rvar, 20, 0.2)
    assert rel_err(drm.copy_to_host(), erm) <= tolerance("running_mean", np.float64)
    assert rel_err(drv.copy_to_host(), erv) <= tolerance("running_var", np.float64)

    dy = make_x(x.shape, np.float32, 0.0, seed=9)
    out = tuple(cuda.device_array(s, np.float32) for s in (x.shape, (3,), (3,)))
    res = nbbn.batch_norm_backward(cuda.to_device(dy), dx_, sm, si, dg, out=out, backend="cuda")
    assert all(r is o for r, o in zip(res, out, strict=True))
    refs, scales = backward_refs(dy, x, rmean, si.copy_to_host(), gamma)
    assert_close(Op.BACKWARD, [r.copy_to_host() for r in res], refs, np.float32, scales)

    yi = nbbn.batch_norm_infer(dx_, drm, drv, dg, db, backend="cuda")
    assert is_cuda_ndarray(yi)
    assert_close(Op.INFERENCE, (yi.copy_to_host(),),
                 (ref.inference(x, drm.copy_to_host(), drv.copy_to_host(), gamma, beta),),
                 np.float32)


def test_non_contiguous_device_input_is_refused(B, cuda):
    x = cuda.to_device(make_x((4, 3, 10), np.float32))[:, :, ::2]
    with pytest.raises(ValueError, match="x is a non-contiguous CUDA array.*dense neither"):
        nbbn.batch_norm_train(x, backend="cuda")


def test_device_dy_in_another_layout_is_refused(B, cuda):
    x = make_x((3, 4, 2, 5), np.float32, OFFSET)
    dy_cl = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    sm, si = np.zeros(4, np.float32), np.ones(4, np.float32)
    with pytest.raises(ValueError, match="dy is a non-contiguous CUDA array.*differs from x's"):
        nbbn.batch_norm_backward(_device_like(B, cuda, dy_cl), cuda.to_device(x), sm, si,
                                 backend="cuda")


# ---------------------------------------------------------------------------------------------
# Parts (registry.Parts, for nbbn.distributed)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.dtype(np.float32), F16], ids=_name)
@pytest.mark.parametrize("layout", list(LAYOUT_CASES), ids=str)
def test_parts_on_two_halves_of_a_batch(layout, dtype, B):
    """Two 'processes' each holding half the batch: local stats merged on the host (Chan), the
    normalization with the global statistics, local gradient sums added, the dx pass with the
    global sums -- equal to the whole-batch reference."""
    parts = registry.parts("cuda")
    shape, ax = LAYOUT_CASES[layout]
    x = _data((4,) + shape[1:], dtype, shape[ax])
    C = shape[ax]
    gamma, beta = make_params(C)
    halves = (x[:2], x[2:])
    targs = [validate.train_args(h, gamma, beta, 1e-5, None, None, 0.1, None, ax, min_m=1)
             for h in halves]
    stats = [parts.stats(a) for a in targs]
    m_local = [a.geom.m for a in targs]
    m_total = sum(m_local)
    for (mean, m2), h in zip(stats, halves, strict=True):  # each half against the reference
        rmean, rvar = ref.batch_stats(h, ax)
        assert rel_err(mean, rmean) <= 1e-12 and rel_err(m2, rvar * h.size / C) <= 1e-12
    mean = sum(m * s[0] for m, s in zip(m_local, stats, strict=True)) / m_total
    m2 = sum(s[1] + m * (s[0] - mean) ** 2 for m, s in zip(m_local, stats, strict=True))
    var = m2 / m_total
    rm, rv = np.zeros(C), np.ones(C)
    targs[0] = validate.train_args(halves[0], gamma, beta, 1e-5, rm, rv, 0.1, None, ax, min_m=1)
    ys = [parts.normalize(a, mean, var, m_total) for a in targs]
    ry, rmean, rinvstd, rvar = ref.forward_train(x, gamma, beta, channel_axis=ax)
    y = np.concatenate([_host(t[0]) for t in ys])
    assert y.dtype == dtype and ys[0][1].dtype == validate.channel_dtype(dtype)
    assert_close(Op.FORWARD_TRAIN, (y, ys[0][1], ys[0][2]), (ry, rmean, rinvstd), dtype)
    erm, erv = ref.running_update(np.zeros(C), np.ones(C), rmean, rvar, m_total, 0.1)
    assert rel_err(rm, erm) <= 1e-13 and rel_err(rv, erv) <= 1e-13

    sm, si = ys[0][1], ys[0][2]
    dy = _data(x.shape, dtype, C, seed=3, offset=0.0)
    bargs = [validate.backward_args(d, h, sm, si, gamma, None, ax)
             for d, h in zip((dy[:2], dy[2:]), halves, strict=True)]
    sums = [parts.grad_sums(a) for a in bargs]
    for s, d, h in zip(sums, (dy[:2], dy[2:]), halves, strict=True):
        dyc = ref._first(d, ax)
        xc = ref._first(h, ax) - sm.astype(np.float64).reshape((1, C) + (1,) * (x.ndim - 2))
        axes = (0,) + tuple(range(2, x.ndim))
        assert rel_err(s[0], dyc.sum(axis=axes)) <= 1e-12
        assert rel_err(s[1], (dyc * xc).sum(axis=axes)) <= 1e-12
    sum_dy, sum_dy_xmu = sums[0][0] + sums[1][0], sums[0][1] + sums[1][1]
    outs = [parts.grad_apply(a, sum_dy, sum_dy_xmu, m_total) for a in bargs]
    dx = np.concatenate([_host(o[0]) for o in outs])
    refs = ref.backward(dy, x, sm, si, gamma, channel_axis=ax)  # the Parts take save_mean as is
    assert_close(Op.BACKWARD, (dx, outs[0][1], outs[0][2]), refs, dtype,
                 {"dx": ref.dx_scale(dy, si, gamma, channel_axis=ax)})


def test_backward_parts_refuse_relu(B):
    x = make_x((4, 3), np.float32)
    args = validate.backward_args(x, x, np.zeros(3), np.ones(3), None, None, 1, True, x)
    with pytest.raises(NotImplementedError, match="do not take relu"):
        registry.parts("cuda").grad_sums(args)


# ---------------------------------------------------------------------------------------------
# Numerics, launch plans, determinism
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(50, 3), (4, 2, 5, 5)], ids=str)
def test_float32_statistics_at_offset_1e4(shape, B):
    """|μ|/σ ≈ 1e4 in float32: σ² and y still within the 1e-5 bounds (shifted float64 sums,
    y from (x − μ_hi) − μ_lo)."""
    x = (1e4 + np.random.default_rng(3).standard_normal(shape)).astype(np.float32)
    mean, var = registry.stats_function("cuda")(x)
    rmean, rvar = ref.batch_stats(x)
    assert mean.dtype == var.dtype == np.float64
    assert rel_err(var, rvar) <= tolerance("var", np.float32)
    assert rel_err(mean, rmean) <= tolerance("save_mean", np.float32)
    y, _, _ = nbbn.batch_norm_train(x, backend="cuda")
    assert rel_err(y, ref.forward_train(x)[0]) <= tolerance("y", np.float32)
    yi = nbbn.batch_norm_infer(x, rmean, rvar, backend="cuda")
    assert rel_err(yi, ref.inference(x, rmean, rvar)) <= tolerance("y", np.float32)


def test_bfloat16_stores_round_to_nearest_even(B):
    """The raw-bits store of bfloat16 y against ml_dtypes' rounding of the same float32 values
    (ties, negative values, ±inf, NaN)."""
    if BF16 is None:
        pytest.skip("bfloat16 needs ml_dtypes")
    vals = np.array([1.0, 1.00390625, 1.01171875, -2.00390625, 3.0e38, -np.inf, np.inf, np.nan,
                     0.0], np.float32)
    x = np.zeros((vals.size, 1), BF16)
    x[0, 0], x[1, 0] = 1.0, -1.0  # mean 0, any invstd: y = β = residual + 0 with γ = 0
    res = vals.reshape(-1, 1).astype(BF16)
    y = nbbn.batch_norm_infer(x, np.zeros(1), np.ones(1), np.zeros(1), np.zeros(1),
                              residual=res, backend="cuda")
    np.testing.assert_array_equal(y.view(np.uint16), res.view(np.uint16))
    # and a float32 value that needs rounding: β carries it (coefficients are float32)
    beta = vals[:5].astype(np.float64)
    for b in beta:
        y = nbbn.batch_norm_infer(x, np.zeros(1), np.ones(1), np.zeros(1), np.array([b]),
                                  backend="cuda")
        want = np.float32(b).astype(BF16)
        assert y.view(np.uint16)[0, 0] == np.array(want).view(np.uint16), b


def _shortest_run(g, plan) -> int:
    """Values in a thread's shortest full run under ``plan`` (rows per thread, or columns)."""
    if g.layout is not Layout.NCHW:
        return g.kernel_shape[0] // (plan.grid[1] * plan.block[1])
    C, S, L = plan.dims
    return g.N // L if L else S // (plan.grid[1] * plan.block[0])


@pytest.mark.parametrize("shape, ax, L", [((37, 3, 4), 1, 2), ((70, 3), 1, None),
                                          ((2, 3, 200), 1, 0), ((10, 7, 3), -1, None)],
                         ids=["nchw-row-strided", "nc", "nchw-column-strided", "nhwc"])
def test_long_runs(shape, ax, L, B):
    """Runs of ≥ 5 values: the four-at-a-time loop plus a remainder, in each run layout."""
    from nbbn.cuda import launch

    cfg = launch.LaunchConfig(block=32, target_blocks=1, min_per_thread=16)
    x = make_x(shape, np.float32, OFFSET)
    g = validate.geometry(x, ax)
    plan = launch.plan(g, cfg)
    assert L is None or plan.dims[2] == L
    assert _shortest_run(g, plan) >= 5, plan
    for variant in VARIANTS:
        args = validate.train_args(x, None, None, 1e-5, None, None, 0.1, None, ax, True)
        y, sm, si = B.train(args, variant, cfg)
        ry, rmean, rinvstd, _ = ref.forward_train(x, channel_axis=ax, relu=True)
        assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), np.float32)
        dy = make_x(shape, np.float32, 0.0, seed=3)
        outs = B.backward(validate.backward_args(dy, x, sm, si, None, None, ax), variant, cfg)
        rdx, rdg, rdb = ref.backward(dy, x, rmean, si, channel_axis=ax)
        assert_close(Op.BACKWARD, outs, (rdx, rdg, rdb), np.float32,
                     {"dx": ref.dx_scale(dy, si, channel_axis=ax)})


def test_threads_with_several_slots(B, monkeypatch):
    """With the grid capped at one block per channel, threads walk several row-strided slots.
    The knobs are the simulator's defaults, set here so the plan is the same on a GPU (whose
    defaults give L = 0 for this shape)."""
    from nbbn.cuda import launch

    cfg = launch.LaunchConfig(block=32, target_blocks=8, min_per_thread=1)
    monkeypatch.setattr(B, "DEFAULT_LAUNCH", cfg)
    monkeypatch.setattr(launch, "_MAX_GRID_Y", 1)
    x = make_x((3, 1, 70), np.float64, OFFSET)
    plan = launch.plan(validate.geometry(x), cfg)
    C, S, L = plan.dims
    assert plan.nparts == 1 and L * S > 2 * plan.block[0]  # each thread takes ≥ 2 slots
    for variant in VARIANTS:
        _check_ops(x, 1, np.dtype(np.float64), Fusion.NONE, variant, *make_params(1))


def test_mixed_vector_dtypes_and_strided_running_stats(B):
    """float32 γ/β with float64 x; running stats float32 and strided (updated in place, in their
    own dtype); float32 x with float64 saved statistics."""
    x = make_x((9, 3), np.float64, OFFSET)
    gamma, beta = make_params(3, dtype=np.float32)
    rm_store = np.zeros(6, np.float32)
    rm = rm_store[::2]  # non-contiguous view: must be updated in place
    rv = np.ones(3, np.float32)
    y, sm, si = nbbn.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv,
                                      momentum=0.5, backend="cuda")
    ry, rmean, rinvstd, rvar = ref.forward_train(x, gamma, beta)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), np.float64)
    erm, erv = ref.running_update(np.zeros(3), np.ones(3), rmean, rvar, 9, 0.5)
    assert rm.dtype == rv.dtype == np.float32 and rm_store[1::2].tolist() == [0, 0, 0]
    assert rel_err(rm, erm) <= tolerance("running_mean", np.float32)
    assert rel_err(rv, erv) <= tolerance("running_var", np.float32)

    x32 = x.astype(np.float32)
    mean32 = ref.batch_stats(x32)[0]  # float64 save_mean of the float32 x
    dy = make_x(x.shape, np.float32, 0.0, seed=2)
    refs, scales = backward_refs(dy, x32, mean32, rinvstd, gamma)
    assert_close(Op.BACKWARD, nbbn.batch_norm_backward(dy, x32, mean32, rinvstd, gamma,
                                                       backend="cuda"),
                 refs, np.float32, scales)


def test_non_contiguous_host_input_is_copied(B):
    base = make_x((4, 3, 10), np.float32, OFFSET)
    x = base[:, :, ::2]  # (4, 3, 5) view
    y, sm, si = nbbn.batch_norm_train(x, backend="cuda")
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), np.float32)


def test_out_host_arrays_are_written_and_returned(B):
    x = make_x((5, 2, 3), np.float32, OFFSET)
    out = (np.empty_like(x), np.empty(2, np.float32), np.empty(2, np.float32))
    res = nbbn.batch_norm_train(x, out=out, backend="cuda")
    assert all(r is o for r, o in zip(res, out, strict=True))
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, res, (ry, rmean, rinvstd), np.float32)

    dy = make_x(x.shape, np.float32, 0.0, seed=4)
    dout = (np.empty_like(x), np.empty(2, np.float32), np.empty(2, np.float32),
            np.empty_like(x))
    res = nbbn.batch_norm_backward(dy, x, out[1], out[2], relu=True, y=out[0], out=dout,
                                   backend="cuda")
    assert len(res) == 4 and all(r is o for r, o in zip(res, dout, strict=True))

    yout = np.empty_like(x)
    assert nbbn.batch_norm_infer(x, rmean, rinvstd, out=yout, backend="cuda") is yout


@pytest.mark.parametrize("variant", VARIANTS)
def test_results_are_deterministic(variant, B):
    x = make_x((3, 2, 5, 5), np.float32, OFFSET)
    fwd = registry.select("cuda", Op.FORWARD_TRAIN, Layout.NCHW, variant).fn
    first = fwd(validate.train_args(x, None, None, 1e-5, None, None, 0.1, None))
    again = fwd(validate.train_args(x, None, None, 1e-5, None, None, 0.1, None))
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_launch_config_limits(B):
    from nbbn.cuda import launch

    for bad in ({"block": 48}, {"block": 1024}, {"block": 512}, {"nc_width": 3},
                {"min_per_thread": 0},
                {"target_blocks": -1}):
        with pytest.raises(ValueError):
            launch.LaunchConfig(**bad)


@pytest.mark.parametrize("shape, ax", [
    ((64, 64, 56, 56), 1), ((32, 256, 56, 56), 1), ((128, 64, 112, 112), 1), ((32, 2048, 7, 7), 1),
    ((256, 4096), 1), ((4096, 1024), 1), ((65536, 256), 1), ((1, 3, 2000, 2000), 1), ((2, 5), 1),
    ((32, 56, 56, 256), -1), ((32, 7, 7, 2048), -1), ((1, 224, 224, 3), -1)], ids=str)
def test_plans_for_a_132_sm_gpu(shape, ax, B, monkeypatch):
    """Grid math for the benchmark shapes on an H100-sized GPU, without running anything."""
    from nbbn.cuda import launch

    monkeypatch.setattr(launch, "_sm_count", lambda: 132)
    cfg = launch.LaunchConfig()
    g = validate.geometry(np.empty((2,) * len(shape), np.float32), ax)  # layout from the axes
    C = shape[ax]
    S = int(np.prod(shape)) // (shape[0] * C)
    g = g._replace(shape=shape, N=shape[0], C=C, S=S)
    plan = launch.plan(g, cfg)
    threads = int(np.prod(plan.block))
    assert threads % 32 == 0 and threads <= launch.MAX_THREADS
    assert 1 <= plan.grid[1] <= 65535 and np.prod(plan.merge_block) <= launch.MAX_THREADS
    if g.m * g.C >= 1 << 20:  # big enough to fill the GPU and give every thread long runs
        assert plan.grid[0] * plan.grid[1] >= 132, plan
        assert _shortest_run(g, plan) >= 4, plan


def test_planner_caps_blocks_per_channel_and_sizes_by_occupancy(B, monkeypatch):
    """8x3x2048x2048 on 132 SMs: one wave is 132 SMs x 4 resident blocks of 256 (64-register
    launch bounds), so at most ceil(528/3) blocks per channel -- not 16,384 (L = 1, width =
    S); the threads take several slots each. NC grids stay under MAX_PARTS row chunks."""
    from nbbn.cuda import kernels, launch

    monkeypatch.setattr(launch, "_sm_count", lambda: 132)
    assert kernels.MAX_REGISTERS == 64 and launch.resident_blocks(256) == 4
    assert launch.occupancy(64, 256, launch.SCRATCH_BYTES) == 4
    assert launch.occupancy(48, 256) == 5 and launch.occupancy(32, 256) == 8
    assert launch.occupancy(255, 512) == 0  # cannot launch
    cfg = launch.LaunchConfig()
    g = validate.geometry(np.empty((2, 2, 2, 2), np.float32))
    g = g._replace(shape=(8, 3, 2048, 2048), N=8, C=3, S=2048 * 2048)
    plan = launch.plan(g, cfg)
    assert plan.dims[2] == 1 and plan.grid[0] * plan.nparts <= 132 * 4 + 3, plan
    gnc = validate.geometry(np.empty((2, 2), np.float32))._replace(shape=(1 << 26, 3),
                                                                   N=1 << 26, C=3)
    assert launch.plan(gnc, cfg).nparts <= launch.MAX_PARTS


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setitem(registry._STATE.reasons, "cuda", "no usable CUDA driver or GPU found")
    registry._changed()  # forget cached selections, which skip the availability check
    with pytest.raises(nbbn.BackendUnavailable, match="'cuda' is unavailable: no usable CUDA"):
        nbbn.batch_norm_train(np.ones((2, 3), np.float32), backend="cuda")
    assert nbbn.availability()["cuda"] == "no usable CUDA driver or GPU found"


def test_availability_probe_reports_missing_gpu(monkeypatch):
    from numba import cuda

    from nbbn.cuda import availability

    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    assert "no usable CUDA driver or GPU" in availability()


def _shared_arrays_seen(array_fn, monkeypatch) -> int:
    """How many distinct arrays 16 threads get from ``array_fn`` for one call site of one
    launch, with the window between its lookup and its store widened (np.empty sleeps)."""
    import threading
    import time

    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    shared = FakeCUDAShared(0)
    real_empty = np.empty

    def slow_empty(*a, **k):
        time.sleep(0.02)
        return real_empty(*a, **k)

    monkeypatch.setattr(np, "empty", slow_empty)
    barrier, got = threading.Barrier(16), []

    def thread():
        barrier.wait()
        got.append(id(array_fn(shared, (4,), np.float64)))  # one call site for every thread

    threads = [threading.Thread(target=thread) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    monkeypatch.undo()
    return len(set(got))


@pytest.mark.skipif(not SIMULATOR, reason="checks a fix to Numba's CUDA simulator")
def test_simulator_gives_a_block_one_shared_array(B, monkeypatch):
    """nbbn.cuda.simulator's fix: the simulator's own FakeCUDAShared.array hands threads of
    one block different arrays when they race (which made the CUDA tests fail
    intermittently under pytest-xdist); the installed fix gives every thread the same one."""
    from numba.cuda.simulator.kernelapi import FakeCUDAShared

    from nbbn.cuda import simulator

    assert FakeCUDAShared.array is simulator._shared_array  # installed at import
    assert _shared_arrays_seen(simulator._INSTALLED["original"], monkeypatch) > 1
    assert _shared_arrays_seen(simulator._shared_array, monkeypatch) == 1


# ---------------------------------------------------------------------------------------------
# Real GPU only (NBBN_TEST_GPU=1 on a machine with a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def gpu(B):
    if SIMULATOR:
        pytest.skip("needs a real GPU: running under the CUDA simulator (set NBBN_TEST_GPU=1)")
    return B


@pytest.mark.gpu
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fusion", [Fusion.NONE, Fusion.ADD_RELU], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=_name)
@pytest.mark.parametrize("shape, ax", [((16, 64, 28, 28), 1), ((8, 3, 224, 224), 1),
                                       ((4096, 256), 1), ((3, 1000), 1), ((32, 512, 7, 7), 1),
                                       ((2, 1, 100003), 1), ((16, 28, 28, 64), -1)], ids=str)
def test_gpu_medium_shapes(shape, ax, dtype, fusion, variant, gpu):
    x = _data(shape, dtype, shape[ax], offset=1e4 if np.dtype(dtype).itemsize > 2 else 8.0)
    _check_ops(x, ax, np.dtype(dtype), fusion, variant, *make_params(shape[ax]))


@pytest.mark.gpu
def test_gpu_torch_tensors_via_cuda_array_interface(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    x = make_x((8, 16, 9, 9), np.float32, OFFSET)
    xt = torch.from_numpy(x).cuda()
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    y, sm, si = nbbn.batch_norm_train(xt, running_mean=rm, running_var=rv, backend="cuda")
    ry, rmean, rinvstd, rvar = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, (y.copy_to_host(), sm.copy_to_host(), si.copy_to_host()),
                 (ry, rmean, rinvstd), np.float32)
    erm, _ = ref.running_update(np.zeros(16), np.ones(16), rmean, rvar, 8 * 81, 0.1)
    assert rel_err(rm.cpu().numpy(), erm) <= tolerance("running_mean", np.float32)
    yt = torch.empty_like(xt)
    assert nbbn.batch_norm_infer(xt, rm, rv, out=yt, backend="cuda") is yt
    xcl = xt.contiguous(memory_format=torch.channels_last)  # NHWC kernels, no copy
    ycl, _, _ = nbbn.batch_norm_train(xcl, backend="cuda")
    assert ycl.strides == tuple(s * 4 for s in xcl.stride())
    assert rel_err(ycl.copy_to_host(), ry) <= tolerance("y", np.float32)
    with pytest.raises(ValueError, match="non-contiguous"):
        nbbn.batch_norm_train(xt.transpose(2, 3), backend="cuda")
