"""One conformance suite, driven by the registry: every registered kernel (backend, op, memory
layout, variant) against the float64 reference, on awkward inputs.

Awkward on purpose: C = 1, odd C, N = 2, H·W = 1, sizes that are no multiple of any block or
chunk, offsets up to 1e4 (|mean|/std ≈ 1e4), channels-last arrays (channel_axis=-1, and
(N, C, H, W) arrays with channels-last memory), non-contiguous inputs, every fusion a kernel
declares. A variant is forced through the registry (``registry.select(..., variant).fn``).

The cpu backend runs every case; the cuda backend runs under the CUDA simulator
(tests/conftest.py) on the tiny cases only, since the simulator runs each GPU thread as a Python
thread. Backward is checked against the gradient with the exact (float64) statistics while the
kernel gets them rounded to x's dtype, as a training step hands them over.
"""

from __future__ import annotations

import numpy as np
import pytest

from nbbn import reference as ref
from nbbn import registry, validate
from nbbn.spec import Fusion, Layout, Op
from nbbn.tolerances import rel_err, tolerance

from .helpers import exact_backward, make_params, make_x

SIMULATED_MAX = 160  # elements per case the CUDA simulator gets

# (shape, channel_axis, memory): memory "c" = C-contiguous as given, "cl" = an (N, C, ...) shape
# whose memory is channels-last, "cf" = an (N, ..., C) shape whose memory is channels-first,
# "strided" = every other element of a larger array (the backend copies it).
CASES = [
    # NC
    ((2, 1), 1, "c"), ((2, 7), 1, "c"), ((37, 130), 1, "c"), ((1001, 3), -1, "c"),
    ((3, 2049), 1, "c"), ((300, 130), 1, "c"), ((57, 9), 1, "strided"),
    # S = 1: NC memory whatever the axis
    ((2, 3, 1, 1), 1, "c"), ((3, 1, 1, 5), -1, "c"),
    # NCHW
    ((3, 5, 7, 9), 1, "c"), ((4, 3, 50), 1, "c"), ((2, 1, 4099), 1, "c"), ((1, 2, 3, 1500), 1, "c"),
    ((5, 17, 6, 6), 1, "c"), ((4, 37, 15, 15), 1, "c"), ((2, 1, 130, 131), 1, "c"),
    ((3, 20, 1, 600), 1, "c"), ((2, 5, 4, 4), 1, "strided"), ((3, 4, 5, 6), -1, "cf"),
    # NHWC
    ((3, 7, 9, 5), -1, "c"), ((4, 50, 3), -1, "c"), ((5, 6, 6, 17), -1, "c"),
    ((8, 30, 30, 17), -1, "c"), ((2, 6, 6, 1), -1, "c"), ((5, 17, 6, 6), 1, "cl"),
    ((2, 3, 5, 7), 1, "cl"), ((3, 5, 4, 6), -1, "strided"),
    # tiny memory-layout cases the CUDA simulator runs too
    ((2, 3, 2, 3), 1, "cl"), ((2, 2, 3, 3), -1, "cf"), ((2, 3, 2, 2), 1, "strided"),
    ((2, 2, 3, 4), -1, "strided"),
]
DTYPES = [np.float32, np.float64]
OFFSETS = [0.0, 1e4]
#: Half storage dtypes (float16; bfloat16 with ml_dtypes), for every backend whose registry
#: entry declares them, in the exhaustive tier only: each is a kernel specialization set of its
#: own (tests/test_half.py has the fast tier's few half checks). Their per-channel inputs and
#: outputs are float32 (:func:`nbbn.validate.channel_dtype`).
HALF_DTYPES = list(validate.HALF_DTYPES)
#: Offsets for half data: at 1e4 float16's spacing is 8 and bfloat16's 64, so σ ≈ 0.5 data would
#: be a handful of stored values (as tests/test_cuda.py says); 8 puts |mean|/σ near 20, past the
#: kernels' direct-form threshold (nbbn.cpu.kernels.DIRECT_MAX), where the split form runs.
HALF_OFFSETS = [0.0, 8.0]
FORWARD_FUSIONS = list(Fusion)
BACKWARD_FUSIONS = [Fusion.NONE, Fusion.RELU]


def _case_id(case):
    shape, axis, memory = case
    return f"{'x'.join(map(str, shape))}-axis{axis}-{memory}"


def _layout_like(a, axis: int, memory: str):
    """``a`` (C-contiguous, its shape the case's) re-laid out in memory as the case says."""
    if memory == "c":
        return a
    if memory == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    nd = a.ndim
    if memory == "cl":  # channels-last memory for an (N, C, ...) shape
        perm = (0,) + tuple(range(2, nd)) + (1,)
    else:  # "cf": channels-first memory for an (N, ..., C) shape
        perm = (0, nd - 1) + tuple(range(1, nd - 1))
    return np.ascontiguousarray(a.transpose(perm)).transpose(np.argsort(perm))


def _x(case, dtype, offset, seed=0):
    shape, axis, memory = case
    # make_x puts its per-channel skew on axis 1; move the channel axis there and back.
    ax = axis % len(shape)
    first = (shape[0], shape[ax]) + tuple(s for i, s in enumerate(shape) if i not in (0, ax))
    x = make_x(first, dtype, offset, seed)
    if ax != 1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, ax))
    return _layout_like(x, axis, memory)


def _kernel_backends():
    return registry.backend_names("kernel")


def _usable(backend):
    reason = registry.unavailable_reason(backend)
    if reason is not None:
        pytest.skip(f"backend {backend!r} is unavailable here: {reason}")


def _simulated(backend) -> bool:
    from numba import config

    return registry.backend_info(backend).device == "cuda" and bool(config.ENABLE_CUDASIM)


def _specs(backend, op, layout):
    """Every variant's KernelSpec for (backend, op, layout), or a skip with the reason."""
    try:
        names = registry.variants(backend, op, layout)
    except Exception as exc:  # the backend failed to load
        pytest.fail(f"backend {backend!r} failed to load: {exc}")
    if not names:
        return []
    return [registry.select(backend, op, layout, v) for v in names]


def _selected(spec, fusion, simulated: bool) -> bool:
    """Whether to run this (variant, fusion): all of them, except under the CUDA simulator
    (~1 s per kernel call), where every variant runs unfused and the default variant runs the
    fullest fusion (add-relu forward and inference, relu backward)."""
    if fusion not in spec.fusions:
        return False
    if not simulated or fusion is Fusion.NONE:
        return True
    default = registry.backend_info(spec.backend).default_variant
    return spec.variant == default and fusion in (Fusion.ADD_RELU, Fusion.RELU)


def _check(errors: dict, bounds: dict, what: str):
    bad = {n: (e, bounds[n]) for n, e in errors.items() if not e <= bounds[n]}
    assert not bad, f"{what}: rel_err above tolerance {bad} (all: {errors})"


#: The simulator cases of the fast tier: one per memory layout the kernels see (NC; NCHW from a
#: strided view; NHWC from channels-last memory), at the awkward offset, float32 and float64
#: between them -- the conformance path on every cuda kernel and variant in 3 runs
#: (tests/test_cuda.py checks every layout × dtype × variant × fusion on its own cases). The
#: other simulator cases (each a few seconds: the simulator runs every GPU thread as a Python
#: thread) are in the exhaustive tier, and on a GPU (NBBN_TEST_GPU=1) every case runs.
FAST_SIMULATED = {((2, 7), 1, "c", np.float32), ((2, 3, 2, 2), 1, "strided", np.float64),
                  ((2, 3, 2, 3), 1, "cl", np.float32)}


#: Host backends' float64 in the fast tier: the one-thread variant only (its serial twins), for
#: every op. Every other float64 variant -- the parallel twins, and "auto", which picks them
#: above a size -- runs in the exhaustive tier (the "-parallel" cases). The parallel twins are
#: the serial twins' code under ``prange``, and their float32 specializations run in the fast
#: tier. Compiling their float64 ones is ~48 CPU-s of a cold cache (tests/conftest.py's
#: warm-up; docs/testing.md).
FAST_F64_VARIANTS = ("serial",)


def _params():
    for backend in _kernel_backends():
        info = registry.backend_info(backend)
        device = info.device == "cuda"
        halves = [d for d in HALF_DTYPES if d in info.dtypes]
        for case in CASES:
            for dtype in DTYPES + halves:
                half = np.dtype(dtype).itemsize == 2
                for offset in HALF_OFFSETS if half else OFFSETS:
                    slow = half or device and not ((*case, dtype) in FAST_SIMULATED
                                                   and offset == OFFSETS[-1])
                    name = f"{backend}-{_case_id(case)}-{np.dtype(dtype).name}-{offset}"
                    if device or slow or dtype is not np.float64:
                        yield pytest.param(backend, case, dtype, offset, "all",
                                           marks=[pytest.mark.slow] if slow else [], id=name)
                        continue
                    yield pytest.param(backend, case, dtype, offset, "fast-f64", id=name)
                    yield pytest.param(backend, case, dtype, offset, "parallel",
                                       marks=[pytest.mark.slow], id=name + "-parallel")


def _keep(spec, part: str) -> bool:
    """Whether a case's ``part`` runs this variant: "all"; "fast-f64", FAST_F64_VARIANTS;
    "parallel", the other variants (the exhaustive tier's complement of a "fast-f64" case)."""
    fast = spec.variant in FAST_F64_VARIANTS
    return {"all": True, "fast-f64": fast, "parallel": not fast}[part]


@pytest.mark.parametrize("backend, case, dtype, offset, part", list(_params()))
def test_every_kernel_against_the_reference(backend, case, dtype, offset, part):
    _usable(backend)
    shape, axis, _ = case
    sim = _simulated(backend)
    if sim and np.prod(shape) > SIMULATED_MAX:
        pytest.skip(f"{np.prod(shape)} elements: too many for the CUDA simulator (tiny cases "
                    "only; NBBN_TEST_GPU=1 runs them on a GPU)")
    if sim and np.dtype(dtype).itemsize == 2:
        pytest.skip("half dtypes under the CUDA simulator: tests/test_cuda.py runs them on its "
                    "own cases (NBBN_TEST_GPU=1 runs these on a GPU)")
    x = _x(case, dtype, offset)
    geom = validate.geometry(x, axis)
    C = geom.C
    # Per-channel vectors, inputs and outputs: x's dtype, float32 for a half x.
    vdt = validate.channel_dtype(dtype)
    gamma, beta = make_params(C, dtype=vdt)
    residual = _layout_like(make_x(x.shape, dtype, 0.0, seed=11), axis, case[2])
    dy = _x(case, dtype, 0.1, seed=7)
    rm0 = np.linspace(-1, 1, C).astype(vdt)
    rv0 = np.linspace(0.5, 2, C).astype(vdt)
    ry, rmean, rinvstd, rvar = ref.forward_train(x, gamma, beta, channel_axis=axis)
    m = ref.count_per_channel(x, axis)
    erm, erv = ref.running_update(rm0, rv0, rmean, rvar, m, 0.3)
    checked = 0

    for spec in _specs(backend, Op.FORWARD_TRAIN, geom.layout):
        if not _keep(spec, part):
            continue
        for fusion in FORWARD_FUSIONS:
            if not _selected(spec, fusion, sim):
                continue
            res = residual if fusion.residual else None
            rm, rv = rm0.copy(), rv0.copy()
            args = validate.train_args(x, gamma, beta, 1e-5, rm, rv, 0.3, None, axis,
                                       fusion.relu, res)
            y, sm, si = spec.fn(args)
            what = f"{backend}/{spec.variant} forward-train {fusion}"
            assert y.shape == x.shape and y.dtype == dtype and sm.dtype == si.dtype == vdt, what
            assert validate.contiguous_in(validate.array_meta(y, "y"), geom.perm), \
                f"{what}: y is not in x's memory layout"
            ey = ref.forward_train(x, gamma, beta, channel_axis=axis, relu=fusion.relu,
                                   residual=res)[0]
            _check({"y": rel_err(y, ey), "save_mean": rel_err(sm, rmean),
                    "save_invstd": rel_err(si, rinvstd), "running_mean": rel_err(rm, erm),
                    "running_var": rel_err(rv, erv)},
                   {"y": tolerance("y", dtype), "save_mean": tolerance("save_mean", dtype),
                    "save_invstd": tolerance("save_invstd", dtype),
                    "running_mean": tolerance("save_mean", dtype),
                    "running_var": tolerance("var", dtype)}, what)
            checked += 1

    # Backward gets the statistics rounded to their dtype; the reference uses the exact ones.
    sm, si = rmean.astype(vdt), rinvstd.astype(vdt)
    for spec in _specs(backend, Op.BACKWARD, geom.layout):
        if not _keep(spec, part):
            continue
        for fusion in BACKWARD_FUSIONS:
            if not _selected(spec, fusion, sim):
                continue
            yfwd = None
            if fusion.relu:
                yfwd = _layout_like(np.ascontiguousarray(
                    ref.forward_train(x, gamma, beta, channel_axis=axis, relu=True,
                                      residual=residual)[0].astype(dtype)), axis, case[2])
            args = validate.backward_args(dy, x, sm, si, gamma, None, axis, fusion.relu, yfwd)
            outs = spec.fn(args)
            what = f"{backend}/{spec.variant} backward {fusion}"
            expected = exact_backward(dy, x, rmean, rinvstd, gamma, axis, fusion.relu, yfwd)
            assert len(outs) == len(expected), what
            scale = ref.dx_scale(dy, rinvstd, gamma, channel_axis=axis, relu=fusion.relu,
                                 y=yfwd)
            errors = {"dx": rel_err(outs[0], expected[0], scale),
                      "dgamma": rel_err(outs[1], expected[1]),
                      "dbeta": rel_err(outs[2], expected[2])}
            if fusion.relu:  # dz = dy·[y > 0]: exact (compared as float32, NaN-free)
                assert outs[3].dtype == dtype, what
                np.testing.assert_array_equal(outs[3].astype(np.float32),
                                              np.asarray(expected[3], dtype).astype(np.float32),
                                              what)
            assert outs[0].dtype == dtype and outs[0].shape == x.shape, what
            assert outs[1].dtype == outs[2].dtype == vdt, what
            _check(errors, {n: tolerance(n, dtype) for n in errors}, what)
            checked += 1

    for spec in _specs(backend, Op.INFERENCE, geom.layout):
        if not _keep(spec, part):
            continue
        for fusion in FORWARD_FUSIONS:
            if not _selected(spec, fusion, sim):
                continue
            res = residual if fusion.residual else None
            args = validate.infer_args(x, rm0, rv0, gamma, beta, 1e-5, None, axis, fusion.relu,
                                       res)
            (y,) = spec.fn(args)
            what = f"{backend}/{spec.variant} inference {fusion}"
            ey = ref.inference(x, rm0, rv0, gamma, beta, channel_axis=axis, relu=fusion.relu,
                               residual=res)
            assert y.shape == x.shape and y.dtype == dtype, what
            _check({"y": rel_err(y, ey)}, {"y": tolerance("y", dtype)}, what)
            checked += 1
    assert checked >= 3, f"{backend} ran only {checked} kernels on {geom.layout}"


@pytest.mark.parametrize("backend", _kernel_backends())
def test_every_layout_has_kernels(backend):
    _usable(backend)
    for op in Op:
        for layout in Layout:
            assert registry.variants(backend, op, layout), f"{backend} lacks {op} {layout}"
