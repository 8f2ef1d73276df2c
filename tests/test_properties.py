"""Property-based tests (Hypothesis): the three public functions against the float64 reference.

Each example draws a call the way a user might make it and checks every output against
:mod:`nbbn.reference` with the named tolerances (:mod:`nbbn.tolerances`):

* shapes 2-, 3- and 4-D with 1-sized and prime dimensions, channel axis 1 or −1;
* memory: each x-shaped input independently C-contiguous, in any axis order (channels-last,
  channels-first, Fortran, orders dense in neither layout), every other element of a larger array,
  reversed (negative strides) or a slice of a larger buffer;
* x float32 or float64; per-channel vectors in x's dtype or all in the other float dtype;
* offsets |mean|/std from 0 to 1e4, scales from 1e-3 to 1e3; γ, β, running statistics present
  or not; eps, momentum; the fusions (relu, residual);
* ``out=``: none, fresh arrays, the exact aliases the kernels support (y over x or the residual,
  dx or dz over dy), or an array that partly overlaps an input, which must raise ValueError
  naming both and leave the memory untouched.

On the CPU backend, and on the CUDA backend under the simulator (tests/conftest.py) at tiny
sizes, with host arrays or (dense) device arrays. A failure prints Hypothesis's shrunk example
(the drawn case) and ``note()`` lines with the arrays' strides.

Budget. The examples are derandomized (a fixed seed per test) and their count is the profile's
(tests/conftest.py: ``fast`` by default, ``full`` with NBBN_HYPOTHESIS_PROFILE=full); the CUDA
tests run a tenth of it. Shapes stay small, so the CPU calls run the serial kernels, and the fast
profile draws only per-channel dtype combinations that the rest of the suite already compiles
(every vector in x's dtype; γ/β in the other dtype without running statistics in forward-train):
each new combination of argument dtypes is a new Numba specialization, ~7 s to compile. The full
profile adds every op with all its vectors in the other dtype.
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st

import nbbn
from nbbn import reference as ref
from nbbn import registry, validate
from nbbn.cpu.kernels import DIRECT_MAX
from nbbn.spec import Layout, inverse_perm
from nbbn.tolerances import rel_err, tolerance

from .helpers import exact_backward

FULL = os.environ.get("NBBN_HYPOTHESIS_PROFILE") == "full"
F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
CPU_MAX = 1500  # elements per example on the CPU backend (serial kernels: ≤ 2^15)
SIM_MAX = 36  # elements per example under the CUDA simulator (~0.5 s per kernel call)
VIEWS = ("c", "perm", "strided", "negative", "sliced")


def _sim_settings():
    return settings(max_examples=max(3, settings().max_examples // 10))


# ---------------------------------------------------------------------------------------------
# Drawing a case
# ---------------------------------------------------------------------------------------------
@st.composite
def cases(draw, *, sim: bool, op: str):
    """A call's structure; the numbers are drawn from ``seed`` in the test (so that a shrunk
    example is short)."""
    if sim:
        ndim = draw(st.sampled_from([2, 3, 4]))
        dims = st.sampled_from([1, 2, 3])
        N = draw(st.sampled_from([1, 2, 3]))
        C = draw(st.sampled_from([1, 2, 3, 5]))
        limit = SIM_MAX
    else:
        ndim = draw(st.sampled_from([2, 3, 4]))
        dims = st.sampled_from([1, 2, 3, 5, 7, 11])
        N = draw(st.sampled_from([1, 2, 3, 5, 7, 13]))
        C = draw(st.sampled_from([1, 2, 3, 5, 7, 13, 17]))
        limit = CPU_MAX
    spatial = [draw(dims) for _ in range(ndim - 2)]
    assume(N * C * math.prod(spatial) <= limit)
    axis = draw(st.sampled_from([1, -1]))
    shape = (N, C, *spatial) if axis == 1 else (N, *spatial, C)
    dtype = draw(st.sampled_from([F32, F64]))
    other = F64 if dtype == F32 else F32
    # Per-channel vectors: x's dtype, or (see the module docstring) the other dtype.
    vec = draw(st.sampled_from(["same", "other"] if FULL or op == "train" else ["same"]))
    if vec == "other" and op == "train" and not FULL:
        vec = "other-affine"  # γ, β in the other dtype, no running statistics
    ndim_perm = st.permutations(range(ndim))
    views = {name: (draw(st.sampled_from(VIEWS)), tuple(draw(ndim_perm)))
             for name in ("x", "dy", "residual", "y")}
    case = {
        "shape": shape, "axis": axis, "dtype": dtype,
        "vec_dtype": dtype if vec == "same" else other, "vec": vec,
        "kappa": draw(st.sampled_from([0.0, 1.0, -3.0, 30.0, 1e3, -1e4, 1e4])),
        "sigma": draw(st.sampled_from([1e-3, 1.0, 1e3])),
        "gamma": draw(st.booleans()) or vec != "same",
        "beta": draw(st.booleans()) or vec != "same",
        "running": (draw(st.booleans()) or vec == "other") and vec != "other-affine",
        "eps": draw(st.sampled_from([1e-5, 1e-3, 0.5])),
        "momentum": draw(st.sampled_from([0.0, 0.1, 0.37, 1.0])),
        "relu": draw(st.booleans()),
        "residual": draw(st.booleans()) and op != "backward",
        "near_mean": draw(st.booleans()),  # inference: running mean near the batch mean
        "out": draw(st.sampled_from(["none", "fresh", "alias", "overlap"])),
        "overlap_shift": draw(st.integers(1, 7)),
        "overlap_input": draw(st.sampled_from(["x", "dy"] if op == "backward" else ["x"])),
        "views": views,
        "seed": draw(st.integers(0, 2**16)),
    }
    return case


# ---------------------------------------------------------------------------------------------
# Building the arrays
# ---------------------------------------------------------------------------------------------
def _lay_out(a: np.ndarray, view: str, perm: tuple) -> np.ndarray:
    """``a`` (C-contiguous) with the same values in the memory ``view`` names."""
    if view == "c":
        return a
    if view == "perm":  # memory order = axes ``perm``: channels-last, Fortran, or neither
        return np.ascontiguousarray(a.transpose(perm)).transpose(inverse_perm(perm))
    if view == "strided":
        big = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), a.dtype)
        big[..., ::2] = a
        return big[..., ::2]
    if view == "negative":
        rev = np.ascontiguousarray(a[::-1, ..., ::-1])
        return rev[::-1, ..., ::-1]
    # "sliced": rows 1..N of a larger buffer (an offset start, not the owner of its memory)
    big = np.zeros((a.shape[0] + 2,) + a.shape[1:], a.dtype)
    big[1:-1] = a
    return big[1:-1]


def _like_kernels(shape, dtype, geom) -> np.ndarray:
    """An empty array laid out as the kernels see x (what out= must be)."""
    buf = np.empty(geom.memory_shape, dtype)
    return buf.transpose(inverse_perm(geom.perm))


def _data(case, rng, name="x", offset=None):
    shape, axis = case["shape"], case["axis"]
    C = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = C
    chan = np.linspace(0.5, 2.0, C).reshape(bshape)
    sigma = case["sigma"]
    kappa = case["kappa"] if offset is None else offset
    a = kappa * sigma + sigma * chan * rng.standard_normal(shape)
    return np.ascontiguousarray(a.astype(case["dtype"]))


def _vectors(case, rng):
    C = case["shape"][case["axis"]]
    vd = case["vec_dtype"]
    gamma = (1 + 0.5 * rng.standard_normal(C)).astype(vd) if case["gamma"] else None
    beta = (0.5 * rng.standard_normal(C)).astype(vd) if case["beta"] else None
    return gamma, beta


def _overlapping(a: np.ndarray, geom, shift: int, device: bool):
    """(buffer, input with a's values, out) sharing one buffer, ``shift`` elements apart, both
    in the kernels' memory order (C order for device arrays)."""
    n = a.size
    assume(n > 1)  # one element cannot overlap another partly
    shift = min(shift, n - 1)
    buf = np.zeros(n + shift, a.dtype)
    if device:
        from numba import cuda

        buf[:n] = np.ascontiguousarray(a).reshape(-1)
        d = cuda.to_device(buf)
        return d, d[:n].reshape(a.shape), d[shift:].reshape(a.shape)
    mem = geom.memory_shape
    inv = inverse_perm(geom.perm)
    inp = buf[:n].reshape(mem).transpose(inv)
    inp[...] = a
    out = buf[shift:].reshape(mem).transpose(inv)
    return buf, inp, out


def _upload(arrays: dict, device: bool) -> dict:
    """With ``device``: C-contiguous device copies of the arrays, one per distinct host array,
    so that an alias stays an alias (dense device arrays: the CUDA backend does not copy device
    data, so strided views stay on the host side of these tests)."""
    if not device:
        return arrays
    from numba import cuda

    copies, res = {}, {}
    for k, a in arrays.items():
        if a is not None and id(a) not in copies:
            copies[id(a)] = cuda.to_device(np.ascontiguousarray(a))
        res[k] = None if a is None else copies[id(a)]
    return res


def _host(a):
    return a if a is None or isinstance(a, np.ndarray) else a.copy_to_host()


def _check(errors: dict, what: str):
    bad = {n: e for n, e in errors.items() if not e[0] <= e[1]}
    assert not bad, f"{what}: rel_err above tolerance (err, bound): {bad} (all: {errors})"


def _describe(**arrays):
    for name, a in arrays.items():
        if isinstance(a, np.ndarray):
            note(f"{name}: shape {a.shape} strides {a.strides} dtype {a.dtype}")


def _expect_overlap_error(call, buf, names):
    before = _host(buf).copy()
    with pytest.raises(ValueError, match=r"overlaps") as info:
        call()
    msg = str(info.value)
    for n in names:
        assert n in msg, msg
    np.testing.assert_array_equal(_host(buf), before)


def _usable(backend):
    why = registry.unavailable_reason(backend)
    if why is not None:
        pytest.skip(f"backend {backend!r} is unavailable here: {why}")




# ---------------------------------------------------------------------------------------------
# The three ops
# ---------------------------------------------------------------------------------------------
def check_train(case, backend="cpu", device=False):
    rng = np.random.default_rng(case["seed"])
    shape, axis, dt = case["shape"], case["axis"], case["dtype"]
    x0 = _data(case, rng)
    gamma, beta = _vectors(case, rng)
    res0 = _data(case, rng, offset=0.0) if case["residual"] else None
    C = shape[axis]
    vd = case["vec_dtype"]
    rm = rv = None
    if case["running"]:
        rm = rng.standard_normal(C).astype(vd)
        rv = (0.5 + rng.random(C)).astype(vd)
    rm0 = None if rm is None else rm.copy()
    rv0 = None if rv is None else rv.copy()
    geom = validate.geometry(x0, axis)
    kw = dict(eps=case["eps"], momentum=case["momentum"], channel_axis=axis,
              relu=case["relu"], backend=backend)

    if geom.m < 2:  # one value per channel: refused, nothing touched
        with pytest.raises(ValueError, match="more than 1 value per channel"):
            nbbn.batch_norm_train(x0, gamma, beta, running_mean=rm, running_var=rv,
                                  residual=res0, **kw)
        if rm is not None:
            np.testing.assert_array_equal(rm, rm0)
        return
    bmean, bvar = ref.batch_stats(x0, axis)
    if case["out"] == "overlap":
        buf, x, y_out = _overlapping(x0, geom, case["overlap_shift"], device)
        outs = _upload({"sm": np.empty(C, dt), "si": np.empty(C, dt), "residual": res0},
                       device)
        _describe(x=x, out_y=y_out)
        _expect_overlap_error(lambda: nbbn.batch_norm_train(
            x, gamma, beta, running_mean=rm, running_var=rv, residual=outs["residual"],
            out=(y_out, outs["sm"], outs["si"]), **kw), buf, ("out[y]", "x"))
        if rm is not None:
            np.testing.assert_array_equal(rm, rm0)
        return

    a = {"x": _lay_out(x0, *case["views"]["x"]),
         "residual": None if res0 is None else _lay_out(res0, *case["views"]["residual"])}
    geom = validate.geometry(a["x"], axis)  # out= follows x's memory layout
    if case["out"] != "none":
        a["y"] = _like_kernels(shape, dt, geom)
        a["y"][...] = np.nan
        a["sm"], a["si"] = np.full(C, np.nan, dt), np.full(C, np.nan, dt)
        if case["out"] == "alias":  # y over x, or over the residual
            target = "residual" if res0 is not None and case["seed"] % 2 else "x"
            a["y"][...] = x0 if target == "x" else res0
            a[target] = a["y"]
    _describe(**a)
    a = _upload(a, device)
    out = (a["y"], a["sm"], a["si"]) if "y" in a else None
    y, sm, si = nbbn.batch_norm_train(a["x"], gamma, beta, running_mean=rm, running_var=rv,
                                      residual=a["residual"], out=out, **kw)
    if out is not None:
        assert y is out[0] and sm is out[1] and si is out[2]
    y, sm, si = _host(y), _host(sm), _host(si)
    ey, emean, einvstd, evar = ref.forward_train(x0, gamma, beta, case["eps"], channel_axis=axis,
                                                 relu=case["relu"], residual=res0)
    assert y.shape == shape and y.dtype == dt and sm.dtype == si.dtype == dt
    if not device:
        assert validate.contiguous_in(validate.array_meta(y, "y"), geom.perm), \
            "y is not in x's memory layout"
    errors = {"y": (rel_err(y, ey), tolerance("y", dt)),
              "save_mean": (rel_err(sm, emean), tolerance("save_mean", dt)),
              "save_invstd": (rel_err(si, einvstd), tolerance("save_invstd", dt))}
    if rm is not None:
        erm, erv = ref.running_update(rm0, rv0, emean, evar, geom.m, case["momentum"])
        errors["running_mean"] = (rel_err(rm, erm), max(tolerance("running_mean", vd),
                                                        tolerance("save_mean", dt)))
        errors["running_var"] = (rel_err(rv, erv), max(tolerance("running_var", vd),
                                                       tolerance("var", dt)))
    _check(errors, f"{backend} forward-train")
    if res0 is not None and a["residual"] is not a.get("y"):
        np.testing.assert_array_equal(_host(a["residual"]), res0, "the residual was modified")
    if a["x"] is not a.get("y"):
        np.testing.assert_array_equal(_host(a["x"]), x0, "x was modified")


def check_infer(case, backend="cpu", device=False):
    rng = np.random.default_rng(case["seed"])
    shape, axis, dt = case["shape"], case["axis"], case["dtype"]
    x0 = _data(case, rng)
    gamma, beta = _vectors(case, rng)
    res0 = _data(case, rng, offset=0.0) if case["residual"] else None
    C = shape[axis]
    vd = case["vec_dtype"]
    if case["near_mean"]:  # the hard case: y = α·(x − μ) + β cancels |μ|/σ
        # The population variance is kept ≥ (σ/10)²: the reference folds (y = α·x + β'), which
        # loses log2(|μ|·α/|y|) bits in float64 too -- fine for |μ|/σ ≤ 4e4 (nbbn.tolerances),
        # not for a running variance of 0 at |μ| = 3e3 (found here: the oracle off by 8e-10).
        mean, var = ref.batch_stats(x0, axis)
        var = np.maximum(var, (0.1 * case["sigma"]) ** 2)
        rm = (mean + 0.1 * np.sqrt(var) * rng.standard_normal(C)).astype(vd)
        rv = (var * (0.5 + rng.random(C))).astype(vd)
    else:
        rm = rng.standard_normal(C).astype(vd)
        rv = (0.5 + rng.random(C)).astype(vd)
    geom = validate.geometry(x0, axis)
    kw = dict(eps=case["eps"], channel_axis=axis, relu=case["relu"], backend=backend)
    if case["out"] == "overlap":
        buf, x, y_out = _overlapping(x0, geom, case["overlap_shift"], device)
        res = _upload({"residual": res0}, device)["residual"]
        _describe(x=x, out=y_out)
        _expect_overlap_error(lambda: nbbn.batch_norm_infer(
            x, rm, rv, gamma, beta, residual=res, out=y_out, **kw), buf, ("out[y]", "x"))
        return
    a = {"x": _lay_out(x0, *case["views"]["x"]),
         "residual": None if res0 is None else _lay_out(res0, *case["views"]["residual"])}
    geom = validate.geometry(a["x"], axis)  # out= follows x's memory layout
    if case["out"] != "none":
        a["y"] = _like_kernels(shape, dt, geom)
        a["y"][...] = np.nan
        if case["out"] == "alias":
            target = "residual" if res0 is not None and case["seed"] % 2 else "x"
            a["y"][...] = x0 if target == "x" else res0
            a[target] = a["y"]
    _describe(**a)
    a = _upload(a, device)
    y = nbbn.batch_norm_infer(a["x"], rm, rv, gamma, beta, residual=a["residual"],
                              out=a.get("y"), **kw)
    if "y" in a:
        assert y is a["y"]
    y = _host(y)
    ey = ref.inference(x0, rm, rv, gamma, beta, case["eps"], channel_axis=axis,
                       relu=case["relu"], residual=res0)
    assert y.shape == shape and y.dtype == dt
    _check({"y": (rel_err(y, ey), tolerance("y", dt))}, f"{backend} inference")


def check_backward(case, backend="cpu", device=False):
    rng = np.random.default_rng(case["seed"])
    shape, axis, dt = case["shape"], case["axis"], case["dtype"]
    x0 = _data(case, rng)
    dy0 = _data(case, rng, offset=0.1 * case["kappa"])
    gamma, _ = _vectors(case, rng)
    C = shape[axis]
    vd = case["vec_dtype"]
    relu = case["relu"]
    _, emean, einvstd, _ = ref.forward_train(x0, channel_axis=axis)
    # The statistics as a training step hands them over: rounded to their dtype.
    sm, si = emean.astype(vd), einvstd.astype(vd)
    y0 = None
    if relu:
        y0 = np.ascontiguousarray(ref.forward_train(x0, gamma, None, channel_axis=axis)[0]
                                  .astype(dt))
    geom = validate.geometry(x0, axis)
    kw = dict(channel_axis=axis, relu=relu, backend=backend)
    if case["out"] == "overlap":
        which = case["overlap_input"]
        buf, inp, d_out = _overlapping(x0 if which == "x" else dy0, geom,
                                       case["overlap_shift"], device)
        a = _upload({"x": x0, "dy": dy0, "y": y0, "dg": np.empty(C, dt), "db": np.empty(C, dt),
                     "dz": np.empty_like(x0) if relu else None}, device)
        a[which] = inp
        outs = (d_out, a["dg"], a["db"]) + ((a["dz"],) if relu else ())
        _describe(**{which: inp, "out_dx": d_out})
        _expect_overlap_error(lambda: nbbn.batch_norm_backward(
            a["dy"], a["x"], sm, si, gamma, y=a["y"], out=outs, **kw), buf, ("out[dx]", which))
        return
    a = {"x": _lay_out(x0, *case["views"]["x"]), "dy": _lay_out(dy0, *case["views"]["dy"]),
         "y": None if y0 is None else _lay_out(y0, *case["views"]["y"])}
    geom = validate.geometry(a["x"], axis)  # out= follows x's memory layout
    names = ("dx", "dg", "db", "dz") if relu else ("dx", "dg", "db")
    if case["out"] != "none":
        a["dx"] = _like_kernels(shape, dt, geom)
        a["dx"][...] = np.nan
        a["dg"], a["db"] = np.full(C, np.nan, dt), np.full(C, np.nan, dt)
        if relu:
            a["dz"] = _like_kernels(shape, dt, geom)
        if case["out"] == "alias":  # dx over dy, or (relu) dz over dy
            target = "dz" if relu and case["seed"] % 2 else "dx"
            a[target][...] = dy0
            a["dy"] = a[target]
    _describe(**a)
    a = _upload(a, device)
    out = tuple(a[n] for n in names) if "dx" in a else None
    got = nbbn.batch_norm_backward(a["dy"], a["x"], sm, si, gamma, y=a["y"], out=out, **kw)
    assert len(got) == len(names)
    if out is not None:
        assert all(g is o for g, o in zip(got, out, strict=True))
    got = [_host(g) for g in got]
    expected = exact_backward(dy0, x0, emean, si.astype(np.float64), gamma, axis, relu, y0)
    scale = ref.dx_scale(dy0, si.astype(np.float64), gamma, channel_axis=axis, relu=relu, y=y0)
    assert got[0].shape == shape and got[0].dtype == dt
    _check({"dx": (rel_err(got[0], expected[0], scale), tolerance("dx", dt)),
            "dgamma": (rel_err(got[1], expected[1]), tolerance("dgamma", dt)),
            "dbeta": (rel_err(got[2], expected[2]), tolerance("dbeta", dt))},
           f"{backend} backward")
    if relu:
        np.testing.assert_array_equal(got[3], np.asarray(expected[3], dt))
    np.testing.assert_array_equal(_host(a["x"]), x0, "x was modified")


# ---------------------------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------------------------
@given(cases(sim=False, op="train"))
def test_train_cpu(case):
    check_train(case)


@given(cases(sim=False, op="infer"))
def test_infer_cpu(case):
    check_infer(case)


@given(cases(sim=False, op="backward"))
def test_backward_cpu(case):
    check_backward(case)


@pytest.mark.cudasim
@_sim_settings()
@given(cases(sim=True, op="train"), st.booleans())
def test_train_cuda(case, device):
    _usable("cuda")
    check_train(case, "cuda", device)


@pytest.mark.cudasim
@_sim_settings()
@given(cases(sim=True, op="infer"), st.booleans())
def test_infer_cuda(case, device):
    _usable("cuda")
    check_infer(case, "cuda", device)


@pytest.mark.cudasim
@_sim_settings()
@given(cases(sim=True, op="backward"), st.booleans())
def test_backward_cuda(case, device):
    _usable("cuda")
    check_backward(case, "cuda", device)


def test_layouts_are_reached():
    """The views the strategies draw reach every kernel layout (a guard on the strategies)."""
    seen = set()
    for shape, axis, view, perm in [((3, 4), 1, "c", (0, 1)), ((3, 4, 5), 1, "c", (0, 1, 2)),
                                    ((3, 4, 5), -1, "c", (0, 1, 2)),
                                    ((3, 4, 5, 6), 1, "perm", (0, 2, 3, 1))]:
        a = _lay_out(np.zeros(shape, np.float32), view, perm)
        seen.add(validate.geometry(a, axis).layout)
    assert seen == set(Layout)


@pytest.mark.parametrize("op", ["train", "infer"])
def test_direct_form_with_eps_above_the_variance(op):
    """Found by these property tests: a float32 channel with σ = 1e-5 around μ = 0.02
    (|μ|/σ = 2000) and the default eps. The CPU kernels chose the direct form by
    |μ|/√(σ² + eps) ≤ 8 and missed float32's tolerance (4e-5); they now choose by |μ|/σ."""
    rng = np.random.default_rng(0)
    x = (0.02 + 1e-5 * rng.standard_normal((64, 8))).astype(np.float32)
    mean, var = ref.batch_stats(x)
    assert np.all(np.abs(mean) / np.sqrt(var + 1e-5) <= DIRECT_MAX)  # the old test said direct
    assert np.all(np.abs(mean) > DIRECT_MAX * np.sqrt(var))  # while |μ|/σ is far beyond it
    if op == "train":
        y, ey = nbbn.batch_norm_train(x)[0], ref.forward_train(x)[0]
    else:
        y, ey = nbbn.batch_norm_infer(x, mean, var), ref.inference(x, mean, var)
    assert rel_err(y, ey) <= tolerance("y", np.float32)
