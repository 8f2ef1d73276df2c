"""The CUDA backend against the float64 reference.

Runs under Numba's CUDA simulator by default (tests/conftest.py sets NUMBA_ENABLE_CUDASIM=1), on
the real GPU with NBBN_TEST_GPU=1; ``@pytest.mark.gpu`` tests need the real GPU. The simulator
runs every thread as a Python thread, so shapes stay tiny (≤ a few hundred values) and blocks
small (32 threads), yet every shape below still splits channels over several blocks, leaves
ragged last blocks, and has sizes that are no multiple of the block.
"""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import numpy as np
import pytest

import nbbn
from nbbn import reference as ref
from nbbn import registry, validate
from nbbn.spec import Op
from nbbn.tolerances import rel_err, tolerance

from .helpers import assert_close, backward_refs, make_params, make_x

SIMULATOR = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
pytestmark = pytest.mark.cudasim

# Awkward on purpose: C = 1, odd C, C > 32 (two NC column groups, the last ragged), N = 2,
# H·W = 1, NCL input, S not a multiple of anything, m = 74 or 75 split over 3 blocks.
SHAPES = [(2, 1), (37, 3), (3, 33), (2, 1, 1, 1), (2, 3, 1, 1), (2, 1, 37), (3, 2, 5, 5)]
DTYPES = [np.float32, np.float64]
OFFSET = 1e3


@pytest.fixture(scope="module")
def K():
    """nbbn.cuda.kernels, or a skip saying why the backend cannot run here."""
    reason = registry.unavailable_reason("cuda")
    if reason is not None:
        pytest.skip(f"backend 'cuda' is unavailable here: {reason}")
    from nbbn.cuda import kernels

    return kernels


@pytest.fixture(scope="module", autouse=True)
def _fast_simulator():
    """The simulator's block manager busy-polls its Python threads; a short GIL switch interval
    lets the worker threads run and makes these tests ~3x faster."""
    old = sys.getswitchinterval()
    if SIMULATOR:
        sys.setswitchinterval(2e-4)
    yield
    sys.setswitchinterval(old)


@pytest.fixture
def device_arrays():
    """``numba.cuda``, whose device arrays expose ``__cuda_array_interface__`` under the
    simulator too (see nbbn.cuda.sim)."""
    from numba import cuda

    if not SIMULATOR:
        yield cuda
        return
    from nbbn.cuda.sim import device_array_interface

    with device_array_interface():
        yield cuda


@pytest.fixture(params=[1, 2], ids=["v1-merge-kernel", "v2-ticket"])
def variant(request, K, monkeypatch):
    monkeypatch.setattr(K, "DEFAULT", replace(K.DEFAULT, variant=request.param))
    return request.param


def _host(a):
    return a if isinstance(a, np.ndarray) else a.copy_to_host()


def _check_all_ops(x, dtype, gamma, beta, device=None):
    """Forward-train (with running stats), backward and inference against the reference."""
    C = x.shape[1]
    rm, rv = np.linspace(-1, 1, C), np.linspace(0.5, 2, C)
    rm0, rv0 = rm.copy(), rv.copy()
    xin = x if device is None else device.to_device(x)

    y, sm, si = nbbn.batch_norm_train(xin, gamma, beta, running_mean=rm, running_var=rv,
                                      momentum=0.3, backend="cuda")
    y, sm, si = _host(y), _host(sm), _host(si)
    ry, rmean, rinvstd, rvar = ref.forward_train(x, gamma, beta)
    assert y.dtype == sm.dtype == si.dtype == dtype
    assert y.shape == x.shape and sm.shape == si.shape == (C,)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), dtype)
    erm, erv = ref.running_update(rm0, rv0, rmean, rvar, ref.count_per_channel(x), 0.3)
    assert rel_err(rm, erm) <= tolerance("running_mean", rm.dtype)
    assert rel_err(rv, erv) <= tolerance("running_var", rv.dtype)

    dy = make_x(x.shape, dtype, 0.1, seed=7)
    outs = nbbn.batch_norm_backward(dy, x, sm, si, gamma, backend="cuda")
    refs, scales = backward_refs(dy, x, sm, si, gamma)
    assert_close(Op.BACKWARD, [_host(o) for o in outs], refs, dtype, scales)

    yi = nbbn.batch_norm_infer(xin, rm, rv, gamma, beta, backend="cuda")
    assert_close(Op.INFERENCE, (_host(yi),), (ref.inference(x, rm, rv, gamma, beta),), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_all_ops_against_reference(shape, dtype, variant):
    gamma, beta = make_params(shape[1])
    _check_all_ops(make_x(shape, dtype, OFFSET), dtype, gamma, beta)


@pytest.mark.parametrize("shape", [(50, 3), (4, 2, 5, 5)], ids=str)
def test_float32_statistics_at_offset_1e4(shape, K):
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


def _shortest_run(K, g, plan) -> int:
    """Values in a thread's shortest full run under ``plan`` (rows per thread, or columns)."""
    if g.layout.value == "NC":
        return g.N // (plan.grid[1] * plan.block[1])
    C, S, L = plan.dims
    return g.N // L if L else S // (plan.grid[1] * plan.block[0])


@pytest.mark.parametrize("shape, L", [((37, 3, 4), 2), ((70, 3), None), ((2, 3, 200), 0)],
                         ids=["nchw-row-strided", "nc", "nchw-column-strided"])
def test_long_runs(shape, L, K):
    """Runs of ≥ 5 values: the four-at-a-time loop plus a remainder, in each run layout."""
    cfg = K.LaunchConfig(block=32, target_blocks=1, min_per_thread=16)
    x = make_x(shape, np.float32, OFFSET)
    g = validate.geometry(x)
    plan = K._LAYOUTS[g.layout].plan(g, cfg)
    assert L is None or plan.dims[2] == L
    assert _shortest_run(K, g, plan) >= 5, plan
    args = validate.train_args(x, None, None, 1e-5, None, None, 0.1, None)
    y, sm, si = K.train(args, cfg)
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), np.float32)
    dy = make_x(shape, np.float32, 0.0, seed=3)
    outs = K.backward(validate.backward_args(dy, x, sm, si, None, None), cfg)
    refs, scales = backward_refs(dy, x, sm, si, None)
    assert_close(Op.BACKWARD, outs, refs, np.float32, scales)


def test_threads_with_several_slots(K, monkeypatch):
    """With the grid capped at one block per channel, threads walk several row-strided slots."""
    monkeypatch.setattr(K, "_MAX_GRID_Y", 1)
    x = make_x((3, 1, 70), np.float64, OFFSET)
    plan = K.plan_nchw(validate.geometry(x), K.DEFAULT)
    C, S, L = plan.dims
    assert plan.nparts == 1 and L * S > 2 * plan.block[0]  # each thread takes ≥ 2 slots
    _check_all_ops(x, np.float64, *make_params(1))


def test_no_affine_means_unit_gamma_zero_beta(K):
    x = make_x((3, 2, 5), np.float64, OFFSET)
    y, sm, si = nbbn.batch_norm_train(x, backend="cuda")
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), np.float64)
    dy = make_x(x.shape, np.float64, 0.0, seed=5)
    refs, scales = backward_refs(dy, x, sm, si, None)
    assert_close(Op.BACKWARD, nbbn.batch_norm_backward(dy, x, sm, si, backend="cuda"), refs,
                 np.float64, scales)


def test_mixed_vector_dtypes_and_strided_running_stats(K):
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
    dy = make_x(x.shape, np.float32, 0.0, seed=2)
    refs, scales = backward_refs(dy, x32, rmean, rinvstd, gamma)
    assert_close(Op.BACKWARD, nbbn.batch_norm_backward(dy, x32, rmean, rinvstd, gamma,
                                                       backend="cuda"),
                 refs, np.float32, scales)


def test_non_contiguous_host_input_is_copied(K):
    base = make_x((4, 3, 10), np.float32, OFFSET)
    x = base[:, :, ::2]  # (4, 3, 5) view
    y, sm, si = nbbn.batch_norm_train(x, backend="cuda")
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, (y, sm, si), (ry, rmean, rinvstd), np.float32)


def test_out_host_arrays_are_written_and_returned(K):
    x = make_x((5, 2, 3), np.float32, OFFSET)
    out = (np.empty_like(x), np.empty(2, np.float32), np.empty(2, np.float32))
    res = nbbn.batch_norm_train(x, out=out, backend="cuda")
    assert all(r is o for r, o in zip(res, out, strict=True))
    ry, rmean, rinvstd, _ = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, res, (ry, rmean, rinvstd), np.float32)

    dy = make_x(x.shape, np.float32, 0.0, seed=4)
    dout = (np.empty_like(x), np.empty(2, np.float32), np.empty(2, np.float32))
    res = nbbn.batch_norm_backward(dy, x, out[1], out[2], out=dout, backend="cuda")
    assert all(r is o for r, o in zip(res, dout, strict=True))

    yout = np.empty_like(x)
    assert nbbn.batch_norm_infer(x, rmean, rinvstd, out=yout, backend="cuda") is yout


def test_device_arrays_stay_on_device(K, device_arrays):
    """Device x: outputs are device arrays, device running stats are updated in place, and
    ``out=`` device arrays are written and returned."""
    cuda = device_arrays
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
    refs, scales = backward_refs(dy, x, sm.copy_to_host(), si.copy_to_host(), gamma)
    assert_close(Op.BACKWARD, [r.copy_to_host() for r in res], refs, np.float32, scales)

    yi = nbbn.batch_norm_infer(dx_, drm, drv, dg, db, backend="cuda")
    assert is_cuda_ndarray(yi)
    assert_close(Op.INFERENCE, (yi.copy_to_host(),),
                 (ref.inference(x, drm.copy_to_host(), drv.copy_to_host(), gamma, beta),),
                 np.float32)


def test_non_contiguous_device_input_is_refused(K, device_arrays):
    x = device_arrays.to_device(make_x((4, 3, 10), np.float32))[:, :, ::2]
    with pytest.raises(ValueError, match="non-contiguous CUDA array"):
        nbbn.batch_norm_train(x, backend="cuda")


def test_results_are_deterministic(K, variant):
    x = make_x((3, 2, 5, 5), np.float32, OFFSET)
    first = nbbn.batch_norm_train(x, backend="cuda")
    again = nbbn.batch_norm_train(x, backend="cuda")
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_launch_config_limits(K):
    for bad in ({"block": 48}, {"block": 1024}, {"nc_width": 3}, {"variant": 3},
                {"min_per_thread": 0}):
        with pytest.raises(ValueError):
            K.LaunchConfig(**bad)


@pytest.mark.parametrize("shape", [(64, 64, 56, 56), (32, 256, 56, 56), (128, 64, 112, 112),
                                   (32, 2048, 7, 7), (256, 4096), (4096, 1024), (65536, 256),
                                   (1, 3, 2000, 2000), (2, 5)], ids=str)
def test_plans_for_a_132_sm_gpu(shape, K, monkeypatch):
    """Grid math for the benchmark shapes on an H100-sized GPU, without running anything."""
    monkeypatch.setattr(K, "_sm_count", lambda: 132)
    cfg = K.LaunchConfig()
    g = validate.geometry(np.empty((2,) * len(shape)))
    g = replace(g, shape=shape, N=shape[0], C=shape[1], S=int(np.prod(shape[2:])))
    plan = K._LAYOUTS[g.layout].plan(g, cfg)
    threads = int(np.prod(plan.block))
    assert threads % 32 == 0 and threads <= K.MAX_THREADS
    assert 1 <= plan.grid[1] <= 65535 and np.prod(plan.merge_block) <= K.MAX_THREADS
    if g.m * g.C >= 1 << 20:  # big enough to fill the GPU and give every thread long runs
        assert plan.grid[0] * plan.grid[1] >= 132, plan
        assert _shortest_run(K, g, plan) >= 4, plan


def test_unavailable_backend_says_why(monkeypatch):
    monkeypatch.setitem(registry._STATE.reasons, "cuda", "no usable CUDA driver or GPU found")
    monkeypatch.setattr(registry._STATE, "fast", {})
    with pytest.raises(nbbn.BackendUnavailable, match="'cuda' is unavailable: no usable CUDA"):
        nbbn.batch_norm_train(np.ones((2, 3), np.float32), backend="cuda")
    assert nbbn.availability()["cuda"] == "no usable CUDA driver or GPU found"


def test_availability_probe_reports_missing_gpu(monkeypatch):
    from numba import cuda

    from nbbn.cuda import availability

    monkeypatch.delenv("NUMBA_ENABLE_CUDASIM", raising=False)
    monkeypatch.setattr(cuda, "is_available", lambda: False)
    assert "no usable CUDA driver or GPU" in availability()


# ---------------------------------------------------------------------------------------------
# Real GPU only (NBBN_TEST_GPU=1 on a machine with a GPU)
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def gpu(K):
    if SIMULATOR:
        pytest.skip("needs a real GPU: running under the CUDA simulator (set NBBN_TEST_GPU=1)")
    return K


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(16, 64, 28, 28), (8, 3, 224, 224), (4096, 256), (3, 1000),
                                   (32, 512, 7, 7), (2, 1, 100003)], ids=str)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_gpu_medium_shapes(shape, dtype, gpu, variant):
    gamma, beta = make_params(shape[1])
    _check_all_ops(make_x(shape, dtype, 1e4), dtype, gamma, beta)


@pytest.mark.gpu
def test_gpu_device_inputs_and_default_launch(gpu, device_arrays):
    x = make_x((8, 32, 16, 16), np.float32, OFFSET)
    _check_all_ops(x, np.float32, *make_params(32), device=device_arrays)


@pytest.mark.gpu
def test_gpu_torch_tensors_via_cuda_array_interface(gpu):
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("torch has no CUDA device")
    from numba.cuda.cudadrv.devicearray import is_cuda_ndarray

    x = make_x((8, 16, 9, 9), np.float32, OFFSET)
    xt = torch.from_numpy(x).cuda()
    rm, rv = torch.zeros(16, device="cuda"), torch.ones(16, device="cuda")
    y, sm, si = nbbn.batch_norm_train(xt, running_mean=rm, running_var=rv, backend="cuda")
    assert is_cuda_ndarray(y)
    ry, rmean, rinvstd, rvar = ref.forward_train(x)
    assert_close(Op.FORWARD_TRAIN, (y.copy_to_host(), sm.copy_to_host(), si.copy_to_host()),
                 (ry, rmean, rinvstd), np.float32)
    erm, _ = ref.running_update(np.zeros(16), np.ones(16), rmean, rvar, 8 * 81, 0.1)
    assert rel_err(rm.cpu().numpy(), erm) <= tolerance("running_mean", np.float32)
    yt = torch.empty_like(xt)
    assert nbbn.batch_norm_infer(xt, rm, rv, out=yt, backend="cuda") is yt
    with pytest.raises(ValueError, match="non-contiguous"):
        nbbn.batch_norm_train(xt.transpose(2, 3), backend="cuda")
