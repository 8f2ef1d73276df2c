"""The accuracy study (``nbbn accuracy``): its reference, its findings, its determinism, its CLI.

Statistical checks use fixed seeds and tolerances derived from the number of samples (4 standard
errors), so they are deterministic and would still pass for a different seed with probability
≈ 0.9999 per check.
"""

from __future__ import annotations

import math
import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from nbbn.accuracy import algorithms as A
from nbbn.accuracy.cli import accuracy, parse_parts
from nbbn.accuracy.common import POPULATIONS, StudyError, parse_size, parse_sizes
from nbbn.accuracy.estimators import EstimatorConfig, run_estimators
from nbbn.accuracy.gradients import (
    OLD_NBBN,
    GradientConfig,
    old_nbbn_backward,
    reference_point,
    run_gradients,
)
from nbbn.accuracy.gradients import _rows as _grad_rows
from nbbn.accuracy.peers import _flax_peer, from_layout, load_peers, nchw_shape, to_layout
from nbbn.accuracy.rounding import (
    DEFAULT_SIZES,
    HALF_DTYPES,
    RoundingConfig,
    run_rounding,
    usable_backends,
)
from nbbn.accuracy.sampling import SamplingConfig, load_activations, run_sampling
from nbbn.seeds import rng_for
from nbbn.tolerances import tolerance

F32, F64 = np.dtype(np.float32), np.dtype(np.float64)
Z = 4.0  # standard errors allowed in statistical checks


def _exact(x):
    fr = [Fraction(float(v)) for v in x]
    mu = sum(fr) / len(fr)
    return mu, sum((f - mu) ** 2 for f in fr) / len(fr)


# ----------------------------------------------------------------------------- the reference

@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kappa", [0.0, 1e4])
@pytest.mark.parametrize("m", [2, 7, 300])
def test_double_double_reference_matches_exact_rationals(dtype, kappa, m):
    x = (kappa + rng_for(1, "ref", m).standard_normal(m)).astype(dtype)
    mh, ml, vh, vl = A.exact_stats(x)
    mu, var = _exact(x)
    assert abs((Fraction(mh) + Fraction(ml) - mu) / (mu if mu else 1)) < 1e-28
    assert abs((Fraction(vh) + Fraction(vl) - var) / var) < 1e-28
    ih, il = A.exact_invstd(vh, vl, 1e-5)
    inv = Fraction(ih) + Fraction(il)
    assert abs(inv * inv * (var + Fraction(1e-5)) - 1) < 1e-28


def test_study_algorithms_agree_with_reference_on_easy_data():
    x = rng_for(2, "easy").standard_normal(5000)
    mh, ml, vh, vl = A.exact_stats(x)
    for name, fn in A.ALGORITHMS.items():
        mean, var = fn(x)
        assert A.dd_rel_err(var, vh, vl) < 1e-13, name
        assert abs(mean - mh) < 1e-14, name
        mean32, var32 = fn(x.astype(F32))
        assert abs(var32 - vh) / vh < 1e-5, name
        sig = next(s for s in fn.nopython_signatures if s.args[0].dtype.name == "float32")
        assert str(sig.return_type) == "UniTuple(float32 x 2)", "accumulates in the data's dtype"


def test_float32_count_stalls_at_2_pow_24():
    """welford-fcount's counter: n + 1 == n in float32 from 2^24 on."""
    n = np.float32(2**24)
    assert n + np.float32(1) == n


# ----------------------------------------------------------------------------- part (a)

@pytest.fixture(scope="module")
def kappa_sweep():
    """float32, κ ∈ {1, 1e2, 1e4}, small m, the study's algorithms and every usable backend."""
    backends, skipped = usable_backends()
    cfg = RoundingConfig(sizes=[16, 32, 64, 128, 256], kappas=(1.0, 1e2, 1e4), dtypes=(F32,))
    df, sk = run_rounding(cfg, backends=backends, peers=[])
    return df, backends, skipped + sk


def _err(df, algorithm, kappa, stat="var", backend="study"):
    s = df[(df["algorithm"] == algorithm) & (df["kappa"] == kappa) & (df["stat"] == stat)
           & (df["backend"] == backend)]
    assert len(s), (algorithm, kappa, stat, backend)
    return s["rel_err"]


def test_naive_float32_variance_fails_at_kappa_1e4(kappa_sweep):
    df, _, _ = kappa_sweep
    assert (_err(df, "naive", 1e4) > 1e-2).all()
    assert (_err(df, "naive", 1e2) > 1e-4).all()  # already 100x worse than float32 rounding


def test_two_pass_float32_holds_the_tolerance_at_kappa_1e4(kappa_sweep):
    """Corrected two-pass: within 1e-5 at every m here. Plain two-pass: within 1e-5 for small m;
    its float32 mean sum drifts by ≈ u·κ·σ·√m and enters the variance squared, so it leaves
    the tolerance around m = 256 at κ = 1e4."""
    df, _, _ = kappa_sweep
    tol = tolerance("var", F32)
    assert (_err(df, "two-pass-corrected", 1e4) <= tol).all()
    plain = df[(df["algorithm"] == "two-pass") & (df["kappa"] == 1e4) & (df["stat"] == "var")]
    assert (plain[plain["m"] <= 64]["rel_err"] <= tol).all()


def test_welford_float32_error_grows_like_kappa_u(kappa_sweep):
    """Welford with a float32 running mean: fine at κ ≤ 1e2, ≈ κ·u (≫ 1e-5) at κ = 1e4."""
    df, _, _ = kappa_sweep
    assert (_err(df, "welford", 1.0) <= tolerance("var", F32)).all()
    assert (_err(df, "welford", 1e2) <= tolerance("var", F32)).all()
    at_1e4 = _err(df, "welford", 1e4)
    assert at_1e4.median() > tolerance("var", F32)
    assert at_1e4.max() < 100 * 1e4 * np.finfo(F32).eps  # bounded by a small multiple of κ·u


def test_backends_statistics_within_float32_tolerance(kappa_sweep):
    df, backends, skipped = kappa_sweep
    assert backends, f"no nbbn backend's statistics could be studied: {skipped}"
    assert all(b.device == "cpu" for b in backends) or not _cudasim()
    for s in skipped:
        assert s["reason"], s
    nb = df[df["algorithm"] == "nbbn"]
    assert set(nb["backend"]) == {b.name for b in backends}
    assert set(nb["layout"]) == {"NC", "NCHW"}
    for stat, name in (("var", "var"), ("invstd", "save_invstd"), ("y", "y"),
                       ("mean", "save_mean")):
        errs = nb[nb["stat"] == stat]["rel_err"]
        assert len(errs) and (errs <= tolerance(name, F32)).all(), stat


def _cudasim() -> bool:
    import numba

    return bool(numba.config.ENABLE_CUDASIM)


def test_half_storage_rows():
    """Part (a)'s half dtypes: data stored in float16/bfloat16, the study's algorithms in float32
    on them (backend study-f32) -- exact enough at κ = 0 --, and at κ = 1e4 the stored batch
    itself has collapsed (an ulp of 8 in float16, 64 in bfloat16, where σ = 1): its exact
    variance is far below the data's 1. With ``half_backends`` off (--quick) no kernel runs half
    data (no half kernel compiled in the fast tier) and a skip row says so;
    :func:`test_half_storage_rows_of_the_kernel_backends` runs them."""
    if not HALF_DTYPES:
        pytest.skip("no half dtypes (ml_dtypes absent and numpy without float16?)")
    backends, _ = usable_backends()
    cfg = RoundingConfig(sizes=[1024], kappas=(0.0, 1e4), dtypes=HALF_DTYPES,
                         half_backends=False)
    df, skipped = run_rounding(cfg, backends=backends, peers=[])
    assert set(df["dtype"]) == {d.name for d in HALF_DTYPES}
    assert set(df["backend"]) == {"study-f32"}
    for dt in HALF_DTYPES:
        easy = df[(df["dtype"] == dt.name) & (df["kappa"] == 0.0) & (df["stat"] == "var")
                  & (df["algorithm"] == "two-pass-corrected")]
        assert len(easy) == 1 and float(easy["rel_err"].iloc[0]) <= tolerance("var", F32)
        far = df[(df["dtype"] == dt.name) & (df["kappa"] == 1e4) & (df["stat"] == "var")]
        assert (far["reference"] < 0.1).all(), far[["algorithm", "reference"]]
    if backends:
        assert any(s["item"].startswith("backends ") and "--quick" in s["reason"]
                   for s in skipped), skipped


@pytest.mark.slow
def test_half_storage_rows_of_the_kernel_backends():
    """The kernel backends that register a half dtype (cpu, and cuda on a GPU) run part (a) on
    half data: their statistics (float64 sums of the exact half values) within float32's
    tolerance of the stored batch's exact ones, and y within the half format's."""
    if not HALF_DTYPES:
        pytest.skip("no half dtypes (ml_dtypes absent and numpy without float16?)")
    backends, _ = usable_backends()
    if not any(b.name == "cpu" for b in backends):
        pytest.skip("the cpu backend is not usable here")
    cfg = RoundingConfig(sizes=[1024], kappas=(0.0,), dtypes=HALF_DTYPES)
    df, skipped = run_rounding(cfg, backends=backends, peers=[])
    assert not [s for s in skipped if "cpu" in s["item"]], skipped
    for dt in HALF_DTYPES:
        for layout in ("NC", "NCHW"):
            rows = df[(df["dtype"] == dt.name) & (df["backend"] == "cpu")
                      & (df["layout"] == layout)]
            var = rows[rows["stat"] == "var"]["rel_err"]
            y = rows[rows["stat"] == "y"]["rel_err"]
            assert len(var) == 1 and float(var.iloc[0]) <= tolerance("var", F32), (dt, layout)
            assert len(y) == 1 and float(y.iloc[0]) <= tolerance("y", dt), (dt, layout)


def test_default_grid_goes_beyond_2_pow_24():
    assert max(DEFAULT_SIZES) > 2**24 and 2**24 + 1 in DEFAULT_SIZES


# ----------------------------------------------------------------------------- peers

def _need(peers: dict, name: str, skipped: list[dict]) -> None:
    """Skip (with the loader's reason) when a peer is missing; fail instead when the
    environment requires it (NBBN_REQUIRE_PEERS, comma-separated peer names: .ci/run installs
    jax and flax and requires the flax peers, so the κ = 1e4 test cannot skip in CI)."""
    if name in peers:
        return
    reason = next((s["reason"] for s in skipped if s["item"] == f"peer {name}"), "not loaded")
    required = {t.strip() for t in os.environ.get("NBBN_REQUIRE_PEERS", "").split(",")}
    if name in required:
        pytest.fail(f"peer {name} is required here (NBBN_REQUIRE_PEERS) but: {reason}")
    pytest.skip(f"peer {name} unavailable: {reason}")


@pytest.fixture(scope="module")
def cpu_peers():
    peers, skipped = load_peers(["torch-cpu", "flax-fast-var", "flax-two-pass", "numpy"])
    return {p.name: p for p in peers}, skipped


@pytest.fixture(scope="module")
def kappa_1e4_point(cpu_peers):
    """Part (a) at κ = 1e4, float32, m = 4096: every peer that loads and every nbbn backend."""
    peers, skipped = cpu_peers
    backends, _ = usable_backends()
    cfg = RoundingConfig(sizes=[4096], kappas=(1e4,), dtypes=(F32,), algorithms=())
    df, sk = run_rounding(cfg, backends=backends, peers=list(peers.values()))
    assert not sk, sk
    return df.assign(label=[f"{b} {lay}" for b, lay in zip(df["backend"], df["layout"],
                                                           strict=True)])


def _stat(df, label, stat):
    s = df[(df["label"] == label) & (df["stat"] == stat)]["rel_err"]
    assert len(s) == 1, (label, stat)
    return float(s.iloc[0])


def test_fast_variance_breaks_at_kappa_1e4_where_torch_and_nbbn_hold(cpu_peers, kappa_1e4_point):
    """The issue's acceptance point: E[x²] − E[x]² (Flax's default) is far off at κ = 1e4 in
    float32 (clamped at 0, or NaN), while PyTorch's and nbbn's statistics stay within 1e-4."""
    peers, skipped = cpu_peers
    _need(peers, "flax-fast-var", skipped)  # jax is what this test is about; torch if present
    df = kappa_1e4_point
    fast = _stat(df, "flax-fast-var NC", "var")
    assert not fast <= 0.1, f"fast variance should be far off at κ = 1e4, rel_err {fast}"
    assert not _stat(df, "flax-fast-var NC", "y") <= 0.1
    held = ["flax-two-pass NC"] + (["torch-cpu NC", "torch-cpu NCHW"] if "torch-cpu" in peers
                                   else [])
    for label in held:
        for stat in ("var", "invstd"):
            assert _stat(df, label, stat) <= 1e-4, (label, stat)
    nb = df[df["algorithm"] == "nbbn"]
    assert len(nb) and set(nb["layout"]) == {"NC", "NCHW"}
    for label in nb["label"].unique():
        for stat in ("var", "invstd"):
            assert _stat(df, label, stat) <= 1e-4, (label, stat)
        assert _stat(df, label, "y") <= tolerance("y", F32), label


def test_float32_mean_costs_every_peer_y_at_kappa_1e4(cpu_peers, kappa_1e4_point):
    """A float32 mean is off by up to ½ulp(1e4) = 4.9e-4 σ: every peer's y (which subtracts it)
    leaves nbbn's float32 tolerance at κ = 1e4; nbbn's stays 100× inside it."""
    peers, _ = cpu_peers
    df = kappa_1e4_point
    labels = [lab for lab in df[df["algorithm"] == "peer"]["label"].unique()
              if not lab.startswith("flax-fast-var")]
    assert any(lab.startswith("numpy") for lab in labels)
    tol = tolerance("y", F32)
    for label in labels:
        assert _stat(df, label, "y") > tol, label
    for label in df[df["algorithm"] == "nbbn"]["label"].unique():
        assert _stat(df, label, "y") < tol / 100, label


def test_torch_peer_reports_what_aten_computed(cpu_peers):
    """The torch-cpu peer's numbers are F.batch_norm's: the same y, mean and invstd as
    torch.native_batch_norm, bit for bit, on both layouts."""
    peers, skipped = cpu_peers
    _need(peers, "torch-cpu", skipped)
    import torch

    x = (1e3 + rng_for(5, "torch").standard_normal(300)).astype(F32)
    for layout in ("NC", "NCHW"):
        f = peers["torch-cpu"].forward(x, layout, 1e-5)
        xt = torch.from_numpy(to_layout(x.reshape(-1, 1), layout))
        y, mean, invstd = torch.native_batch_norm(xt, None, None, None, None, True, 0.0, 1e-5)
        assert np.array_equal(f.y, from_layout(y.numpy(), layout).reshape(-1)), layout
        assert f.mean == float(mean[0]) and f.invstd == float(invstd[0]), layout
        assert f.var == pytest.approx(float(x.astype(np.float64).var()), rel=1e-5)


def test_flax_fallback_is_flax(cpu_peers, monkeypatch):
    """Without Flax the peer re-implements _compute_stats/_normalize in jax.numpy; with Flax
    installed both give the same numbers (forward and gradients)."""
    import sys

    peers, skipped = cpu_peers
    _need(peers, "flax-fast-var", skipped)
    if "flax" not in peers["flax-fast-var"].versions:
        pytest.skip("flax is not installed: only the re-implementation is available")
    x = (1e2 + rng_for(6, "flax").standard_normal((64, 3))).astype(F32)
    dy = rng_for(7, "flax").standard_normal((64, 3)).astype(F32)
    real = {fast: peers["flax-fast-var" if fast else "flax-two-pass"] for fast in (True, False)}
    monkeypatch.setitem(sys.modules, "flax", None)
    monkeypatch.setitem(sys.modules, "flax.linen", None)
    for fast in (True, False):
        mine = _flax_peer(fast)
        assert "re-implemented" in mine.how and "flax" not in mine.versions
        a, b = real[fast].forward(x[:, 0], "NC", 1e-5), mine.forward(x[:, 0], "NC", 1e-5)
        assert (a.mean, a.var, a.invstd) == pytest.approx((b.mean, b.var, b.invstd), rel=1e-6)
        np.testing.assert_allclose(a.y, b.y, rtol=1e-5, atol=1e-5)
        ga, gb = real[fast].backward(x, dy, "NC", 1e-5), mine.backward(x, dy, "NC", 1e-5)
        for u, v in ((ga.dx, gb.dx), (ga.dgamma, gb.dgamma), (ga.dbeta, gb.dbeta)):
            np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


def test_layouts_round_trip():
    a = np.ascontiguousarray(np.arange(36 * 3).reshape(36, 3))
    for layout in ("NC", "NCHW"):
        b = to_layout(a, layout)
        assert b.flags.c_contiguous and b.shape[1] == 3
        assert np.array_equal(from_layout(b, layout), a)
    n, _, _, s = nchw_shape(36)
    assert to_layout(a, "NCHW")[1, 2, 0, 3] == a[1 * s + 3, 2]


def test_missing_peers_are_skipped_with_their_reason(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("torch", "jax", "cupy") else real(name,
                                                                                            *a))
    peers, skipped = load_peers()
    assert [p.name for p in peers] == ["numpy"]
    reasons = {s["item"]: s["reason"] for s in skipped}
    assert "torch is not installed" in reasons["peer torch-cpu"]
    assert "jax is not installed" in reasons["peer flax-fast-var"]
    assert "cupy is not installed" in reasons["peer cupy"]


# ----------------------------------------------------------------------------- part (e)

def _exact_backward(x, dy, ih, il):
    """dβ, dγ and dx in exact rational arithmetic, for the given (double-double) invstd."""
    fx = [Fraction(float(v)) for v in x]
    fd = [Fraction(float(v)) for v in dy]
    m = len(fx)
    mu = sum(fx) / m
    inv = Fraction(ih) + Fraction(il)
    xhat = [(v - mu) * inv for v in fx]
    db = sum(fd)
    dg = sum(d * h for d, h in zip(fd, xhat, strict=True))
    dx = [inv * (d - db / m - h * dg / m) for d, h in zip(fd, xhat, strict=True)]
    return db, dg, dx


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("kappa", [0.0, 1e4])
@pytest.mark.parametrize("m", [2, 7, 100])
def test_double_double_gradients_match_exact_rationals(dtype, kappa, m):
    g = rng_for(3, "gref", m)
    x = (kappa + g.standard_normal(m)).astype(dtype)
    dy = g.standard_normal(m).astype(dtype)
    mh, ml, vh, vl = A.exact_stats(x)
    ih, il = A.exact_invstd(vh, vl, 1e-5)
    bh, bl, gh, gl, sb, sg = A.exact_grad_sums(x, dy, mh, ml, ih, il)
    db, dg, dx = _exact_backward(x, dy, ih, il)
    assert abs(Fraction(bh) + Fraction(bl) - db) <= 1e-28 * max(sb, 1e-300)
    assert abs(Fraction(gh) + Fraction(gl) - dg) <= 1e-28 * max(sg, 1e-300)
    dx64 = np.array([float(v) for v in dx])  # dx rounded once to float64
    err, ref, scale = A.dx_errors(x, dy, dx64, 1.0, mh, ml, ih, il, bh, bl, gh, gl)
    exact_err = math.sqrt(float(sum((Fraction(a) - b) ** 2 for a, b in zip(dx64, dx,
                                                                           strict=True))))
    norm = math.sqrt(float(sum(v * v for v in dx)))
    assert abs(err - exact_err) <= 1e-25 * scale + 1e-300
    assert ref == pytest.approx(norm, rel=1e-14)
    assert scale == pytest.approx(float(np.linalg.norm(dy.astype(np.float64))) * (ih + il),
                                  rel=1e-14)


def test_gradient_rows_measure_like_nbbn_tolerances():
    """tol_err is nbbn.tolerances.rel_err (with reference.dx_scale for dx) of the same output."""
    from nbbn import reference as R
    from nbbn.tolerances import rel_err

    p = reference_point(5, 1e3, F32, seed=1, channels=3)
    mean = np.array([r[0] for r in p.refs])
    invstd = np.array([r[2] for r in p.refs])
    dx, dg, db = old_nbbn_backward(p.x, p.dy, mean, invstd, 1.0)
    rows = {r["output"]: r for r in _grad_rows(p, "t", "emulation", "e", "-", dx, dg, db)}
    rdx, rdg, rdb = R.backward(p.dy, p.x, R.batch_stats(p.x.astype(np.float64))[0],
                               1 / np.sqrt(R.batch_stats(p.x.astype(np.float64))[1] + 1e-5))
    scale = R.dx_scale(p.dy, invstd)
    assert rows["dx"]["tol_err"] == pytest.approx(rel_err(dx, rdx, scale), rel=1e-3)
    assert rows["dgamma"]["tol_err"] == pytest.approx(rel_err(dg, rdg), rel=1e-3)
    assert rows["dbeta"]["tol_err"] == pytest.approx(rel_err(db, rdb), rel=1e-3, abs=1e-12)
    assert rows["dx"]["rel_err_scale"] == pytest.approx(rows["dx"]["err"] / scale, rel=1e-6)


#: The fast tier's grid: m ≤ 16, where every layout's call is small enough for the serial
#: kernels (channels_for(m) channels: ≤ 1024 values); m = 256 and 4096 (16384 values, the
#: parallel kernels, whose float64 specializations the fast tier does not compile) are in the
#: exhaustive tier.
GRID = dict(sizes=[2, 3, 16], kappas=(0.0, 1.0, 1e2, 1e3, -1e3, 1e4))
GRID_LARGE = dict(GRID, sizes=[256, 4096])


@pytest.fixture(scope="module")
def grad_sweep():
    backends, skipped = usable_backends(part="gradients")
    df, sk = run_gradients(GradientConfig(**GRID), backends=backends, peers=[])
    return df, backends, skipped + sk


def _assert_nbbn_within_tolerance(df, backends, skipped):
    assert backends, skipped
    nb = df[df["family"] == "nbbn"]
    assert set(nb["backend"]) == {b.name for b in backends}
    bad = nb[~nb["within_tolerance"]]
    assert bad.empty, "\n" + bad[["impl", "dtype", "kappa", "m", "output", "tol_err",
                                   "tolerance"]].to_string()
    return nb


def test_nbbn_gradients_within_tolerance_over_the_grid(grad_sweep):
    """dx, dγ, dβ of every nbbn backend within nbbn.tolerances at every (m, κ, dtype) of the
    grid, the N = 2, mean ±1e3 float32 NC case included (needs backward to fold the residual
    Σ(x − save_mean)/m into its mean)."""
    df, backends, skipped = grad_sweep
    nb = _assert_nbbn_within_tolerance(df, backends, skipped)
    case = nb[(nb["m"] == 2) & (nb["kappa"].abs() == 1e3) & (nb["dtype"] == "float32")
              & (nb["layout"] == "NC")]
    assert len(case) == 3 * 2 * len(backends)


@pytest.mark.slow
def test_nbbn_gradients_within_tolerance_at_large_m():
    """The same check at m = 256 and 4096, where the parallel kernels run."""
    backends, skipped = usable_backends(part="gradients")
    df, sk = run_gradients(GradientConfig(**GRID_LARGE), backends=backends, peers=[])
    nb = _assert_nbbn_within_tolerance(df, backends, skipped + sk)
    assert set(nb["m"]) == {256, 4096}


def test_n2_mean_1e3_case_exercises_a_rounded_mean(grad_sweep):
    """The case would catch a backward that uses the rounded save_mean: the emulated old
    backward is out of tolerance there (and at κ = 1e4), in float64 nothing is."""
    df, _, _ = grad_sweep
    old = df[(df["impl"] == OLD_NBBN) & (df["output"] == "dx")]
    f32 = old[old["dtype"] == "float32"].set_index(["m", "kappa"])["tol_err"]
    assert f32[(2, 1e3)] > 1e-4 and f32[(2, -1e3)] > 1e-4 and f32[(2, 1e4)] > 1e-4
    assert (f32.xs(0.0, level="kappa") <= 1e-5).all()
    assert (old[old["dtype"] == "float64"]["tol_err"] <= 1e-10).all()


def test_cuda_gradients_at_n2_mean_1e3():
    """The same N = 2, mean ±1e3 float32 case on the CUDA backend (the simulator in tests,
    a tiny grid because it is slow there)."""
    backends, skipped = usable_backends(simulator_ok=True, part="gradients")
    cuda = [b for b in backends if b.device == "cuda"]
    if not cuda:
        pytest.skip("no CUDA backend here: " + "; ".join(s["reason"] for s in skipped))
    df, sk = run_gradients(GradientConfig(sizes=[2], kappas=(1e3, -1e3), dtypes=(F32,),
                                          emulate_old=False), backends=cuda, peers=[])
    assert not sk, sk
    bad = df[~df["within_tolerance"]]
    assert bad.empty, "\n" + bad[["impl", "kappa", "output", "tol_err"]].to_string()


def test_peer_gradients_at_kappa_1e4(cpu_peers):
    """Autograd of the peers against the same reference: fast variance's dx is far off at
    κ = 1e4; PyTorch's and Flax two-pass's dx stay within 1e-4 at m = 4096."""
    peers, skipped = cpu_peers
    _need(peers, "flax-fast-var", skipped)
    df, sk = run_gradients(GradientConfig(sizes=[4096], kappas=(1e4,), dtypes=(F32,),
                                          backends=False), backends=[],
                           peers=list(peers.values()))
    assert not any(s["item"] != "peer numpy" for s in sk), sk
    dx = df[df["output"] == "dx"].set_index("impl")["tol_err"]
    assert not dx["flax-fast-var NC"] <= 1e-2
    for impl in ("torch-cpu NC", "torch-cpu NCHW", "flax-two-pass NC"):
        if impl.split()[0] in peers:
            assert dx[impl] <= 1e-4, impl


# ----------------------------------------------------------------------------- part (b)

def test_mean_sampling_rmse_follows_sigma_over_sqrt_m():
    B = 4000
    df, _ = run_sampling(SamplingConfig(sizes=[2, 16, 256], distributions=["normal"],
                                        batches=B))
    mean = df[df["stat"] == "mean"]
    pop = POPULATIONS["normal"]
    assert np.allclose(mean["theory"], pop.sd / np.sqrt(mean["m"]))
    # the RMSE estimate's relative sd is ≈ 1/√(2B) for normal errors
    assert (abs(mean["rmse"] / mean["theory"] - 1) <= Z / math.sqrt(2 * B)).all()
    assert np.allclose(mean["rmse_rel_se"], 1 / math.sqrt(2 * B), rtol=0.2)
    var = df[df["stat"] == "var"]
    assert (abs(var["ratio"] - 1) <= Z * var["rmse_rel_se"]).all()


def test_activations_iid_and_whole_images(tmp_path):
    """Channel 0 constant within each image (fully correlated): sampling whole images
    inflates the mean's RMSE by ≈ √(H·W); channel 1 i.i.d.: both ways agree with theory."""
    g = np.random.default_rng(7)
    a = np.empty((256, 2, 4, 4))
    a[:, 0] = g.standard_normal((256, 1, 1))
    a[:, 1] = 3 + 2 * g.standard_normal((256, 4, 4))
    path = tmp_path / "acts.npy"
    np.save(path, a)
    acts = load_activations(path)
    df, _ = run_sampling(SamplingConfig(sizes=[16, 64], distributions=[], activations=acts,
                                        batches=1000))
    mean = df[df["stat"] == "mean"].set_index(["sampling", "channel", "m"])
    assert set(df["sampling"]) == {"iid", "images"}
    assert mean.loc[("images", 0, 64), "ratio"] > 3  # √16 = 4: 64 values are 4 images
    assert abs(mean.loc[("images", 1, 64), "ratio"] - 1) < Z / math.sqrt(2000)
    assert abs(mean.loc[("iid", 0, 64), "ratio"] - 1) < Z * mean.loc[("iid", 0, 64),
                                                                     "rmse_rel_se"]


# ----------------------------------------------------------------------------- part (c)

#: 256 streams: every call of the fast tier's estimator checks is a batch of ≤ 16 × 256 values,
#: which the serial kernels run (float64's parallel specializations are not compiled there);
#: the m = 1024 gap is in the exhaustive tier.
@pytest.fixture(scope="module")
def streams():
    cfg = EstimatorConfig(sizes=[4, 16], gap_sizes=[4, 16], distributions=["normal"],
                          streams=256, batches=50)
    return run_estimators(cfg)


def test_algorithm2_variance_is_unbiased_the_biased_average_is_not(streams):
    est, _, _ = streams
    pop = POPULATIONS["normal"]
    last = est[(est["batches"] == 50) & (est["stat"] == "var")].set_index(["estimator", "m"])
    for m in (4, 16):
        a2 = last.loc[("cumulative-unbiased", m)]
        assert abs(a2["bias"]) <= Z * a2["bias_se"]
        b = last.loc[("cumulative-biased", m)]
        assert b["theory_bias"] == pytest.approx(-pop.var / m)
        assert b["bias"] < -Z * b["bias_se"]  # significantly negative
        assert abs(b["bias"] - (-pop.var / m)) <= Z * b["bias_se"]  # and of size σ²/m


def test_ema_follows_its_theory_and_the_kernel_matches_float64(streams):
    est, _, _ = streams
    ema = est[est["estimator"] == "ema"]
    assert set(ema["momentum"]) == {0.01, 0.1, 0.5}
    assert (abs(ema["bias"] - ema["theory_bias"]) <= Z * ema["bias_se"] + 1e-12).all()
    assert (ema["ema_kernel_dev"] < 1e-12).all()


def test_train_inference_gap(streams):
    """The gap between BN_train and BN_infer with population statistics: √(1.5/m) for large
    m (the theory column), larger below; it shrinks with m."""
    _, gap, _ = streams
    pop = gap[gap["inference_stats"] == "population"].set_index("m")
    assert pop.loc[16, "gap_rms"] == pytest.approx(math.sqrt(1.5 / 16), rel=0.2)
    assert pop.loc[4, "gap_rms"] > pop.loc[16, "gap_rms"] * 2


@pytest.mark.slow
def test_train_inference_gap_at_m_1024():
    _, gap, _ = run_estimators(EstimatorConfig(sizes=[], gap_sizes=[4, 1024],
                                               distributions=["normal"], streams=512))
    pop = gap[gap["inference_stats"] == "population"].set_index("m")
    assert pop.loc[1024, "gap_rms"] == pytest.approx(math.sqrt(1.5 / 1024), rel=0.2)
    assert pop.loc[4, "gap_rms"] > pop.loc[1024, "gap_rms"] * 10


# ----------------------------------------------------------------------------- determinism

def test_same_seed_same_results_independent_of_order():
    cfg = dict(distributions=["normal", "t5"], batches=200, seed=3)
    a, _ = run_sampling(SamplingConfig(sizes=[8, 64], **cfg))
    b, _ = run_sampling(SamplingConfig(sizes=[8, 64], **cfg))
    pd.testing.assert_frame_equal(a, b)
    c, _ = run_sampling(SamplingConfig(sizes=[64], distributions=["t5"], batches=200, seed=3))
    pd.testing.assert_frame_equal(
        a[(a["m"] == 64) & (a["distribution"] == "t5")].reset_index(drop=True), c)
    d, _ = run_sampling(SamplingConfig(sizes=[8, 64], **(cfg | {"seed": 4})))
    assert not np.allclose(a["rmse"], d["rmse"])

    r1, _ = run_rounding(RoundingConfig(sizes=[5, 300], seed=3), backends=[])
    r2, _ = run_rounding(RoundingConfig(sizes=[300], seed=3), backends=[])
    pd.testing.assert_frame_equal(r1[r1["m"] == 300].reset_index(drop=True), r2)

    e = [run_estimators(EstimatorConfig(sizes=[4], gap_sizes=[4], distributions=["uniform"],
                                        streams=16, batches=5, seed=3))[:2] for _ in range(2)]
    for x, y in zip(e[0], e[1], strict=True):
        pd.testing.assert_frame_equal(x, y)


# ----------------------------------------------------------------------------- CLI

REQUIRED = {
    "rounding": {"algorithm", "backend", "dtype", "kappa", "m", "stat", "rel_err"},
    "sampling": {"distribution", "m", "stat", "rmse", "theory"},
    "estimators": {"estimator", "momentum", "m", "batches", "stat", "bias", "rmse"},
    "gap": {"distribution", "m", "inference_stats", "gap_rms", "theory"},
    "rounding_crossover": {"algorithm", "dtype", "kappa", "stat", "first_m_not_negligible"},
}


def test_cli_tiny_run_writes_its_tables_and_report(tmp_path):
    """The fast tier's end-to-end run: one cheap part, no figures (the whole --quick study with
    peers and figures is the next test, in the exhaustive tier)."""
    out = tmp_path / "acc"
    res = CliRunner().invoke(accuracy, ["--quick", "--parts", "b", "--sizes", "2,64",
                                        "--distributions", "normal", "--no-plots", "--out",
                                        str(out)])
    assert res.exit_code == 0, res.output
    df = pd.read_csv(out / "sampling.csv")
    assert REQUIRED["sampling"] <= set(df.columns) and set(df["m"]) == {2, 64}
    report = (out / "report.md").read_text()
    assert "Command: `nbbn accuracy --quick" in report and "--parts b" in report


@pytest.mark.slow
def test_cli_quick_writes_tables_report_and_figures(tmp_path):
    out = tmp_path / "acc"
    args = ["--quick", "--sizes", "2,64,4096", "--distributions", "normal", "--out", str(out),
            "--seed", "0"]
    res = CliRunner().invoke(accuracy, args)
    assert res.exit_code == 0, res.output
    for name, cols in REQUIRED.items():
        df = pd.read_csv(out / f"{name}.csv")
        assert cols <= set(df.columns), name
        assert {"numba_version", "threads", "seed"} <= set(df.columns)
        assert not (out / f"{name}.json").exists()  # one format per table: CSV
    rnd = pd.read_csv(out / "rounding.csv")
    assert set(rnd["algorithm"]) >= {"naive", "two-pass", "welford", "chan", "nbbn", "peer"}
    assert set(rnd[rnd["algorithm"] == "peer"]["backend"]) >= {"numpy"}  # always installed
    # float32, float64 and the half storage dtypes this NumPy has (float16; bfloat16 with
    # ml_dtypes)
    assert set(rnd["dtype"]) == {"float32", "float64"} | {d.name for d in HALF_DTYPES}
    assert set(rnd["kappa"]) == {0, 1, 1e2, 1e3, 1e4}
    assert set(rnd["m"]) == {2, 64, 4096}
    grad = pd.read_csv(out / "gradients.csv")
    assert set(grad["output"]) == {"dx", "dgamma", "dbeta"}
    assert {"old-nbbn (emulated)", "cpu NC", "cpu NCHW"} <= set(grad["impl"])
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["reason"].notna().all()
    md = (out / "report.md").read_text()
    assert md.startswith("# nbbn accuracy study")
    assert (f"Command: `nbbn accuracy --quick --out {out} --distributions normal --sizes "
            "2,64,4096 --seed 0`") in md
    assert "## Key findings" in md and "## (e) Rounding error of the gradients" in md
    assert "Peers: " in md and f"numpy {np.__version__}" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in md
    else:
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert "rounding_vs_m_var.png" in pngs and "estimators_rmse_vs_batches.png" in pngs
        assert "gap_vs_m.png" in pngs and "sampling_vs_m.png" in pngs
        assert {"peers_vs_kappa.png", "gradients_vs_kappa.png", "gradients_vs_m.png"} <= set(pngs)


def test_cli_no_peers_and_parts_by_letter(tmp_path):
    out = tmp_path / "np"
    res = CliRunner().invoke(accuracy, ["--quick", "--parts", "a,e", "--sizes", "2,32",
                                        "--no-peers", "--no-plots", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert not (pd.read_csv(out / "rounding.csv")["algorithm"] == "peer").any()
    assert set(pd.read_csv(out / "gradients.csv")["family"]) == {"nbbn", "emulation"}
    sk = pd.read_csv(out / "skipped.csv")
    assert ((sk["item"] == "peers") & (sk["reason"] == "--no-peers")).any()
    assert not (out / "sampling.csv").exists()


def test_every_part_has_the_one_interface():
    """Each part is a module with LETTER, NAME, TITLE, run, findings, report and plots, listed
    once in PARTS in the report's (letter) order."""
    from nbbn.accuracy import parts

    letters = [p.LETTER for p in parts.PARTS]
    assert letters == sorted(set(letters)) == ["a", "b", "c", "d", "e"]
    assert len({p.NAME for p in parts.PARTS}) == len(parts.PARTS)
    for p in parts.PARTS:
        assert isinstance(p.TITLE, str) and p.TITLE
        for fn in ("run", "findings", "report", "plots"):
            assert callable(getattr(p, fn)), f"{p.__name__}.{fn}"
        assert p.findings({}) == [] and p.report({}) == [] and p.plots({}, Path(".")) == []


def test_an_added_part_runs_and_reports(tmp_path, monkeypatch):
    """Adding a part is one module and one entry in PARTS: the command runs it, saves its table,
    puts its findings and section in report.md (the distributed part d is added this way)."""
    import types

    from nbbn.accuracy import parts

    dummy = types.ModuleType("dummy_part")
    dummy.LETTER, dummy.NAME, dummy.TITLE = "z", "dummy", "A dummy part"
    dummy.run, dummy.findings, dummy.report = _dummy_run, _dummy_findings, _dummy_report
    dummy.plots = lambda tables, out: []
    monkeypatch.setattr(parts, "PARTS", (*parts.PARTS, dummy))
    assert parse_parts("z") == ["dummy"] and parse_parts("dummy,a") == ["rounding", "dummy"]
    out = tmp_path / "z"
    res = CliRunner().invoke(accuracy, ["--parts", "z", "--no-plots", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert pd.read_csv(out / "dummy.csv")["value"].tolist() == [3]
    md = (out / "report.md").read_text()
    assert "- dummy finding: 3" in md and "## (z) A dummy part" in md and "part z" in md


def _dummy_run(ctx):
    ctx.save("dummy", pd.DataFrame({"value": [3]}))
    ctx.skip([{"part": "dummy", "item": "nothing", "reason": "a test"}])


def _dummy_findings(tables):
    return [f"dummy finding: {int(tables['dummy']['value'].iloc[0])}"]


def _dummy_report(tables):
    return ["dummy section", ""]


def test_cli_group_has_accuracy():
    from nbbn.cli import main

    res = CliRunner().invoke(main, ["accuracy", "--help"])
    assert res.exit_code == 0 and "--quick" in res.output and "--activations" in res.output


@pytest.fixture
def bad_files(tmp_path):
    (tmp_path / "garbage.npy").write_bytes(b"this is not a npy file")
    np.save(tmp_path / "strings.npy", np.array(["a", "b"]))
    np.save(tmp_path / "nan.npy", np.array([[1.0, np.nan], [2.0, 3.0]]))
    (tmp_path / "a_file").write_text("x")
    return tmp_path


@pytest.mark.parametrize("args, words", [
    (["--parts", "q"], "unknown part"),
    (["--parts", ","], "empty"),
    (["--distributions", "cauchy"], "unknown distribution"),
    (["--sizes", "1"], "m ≥ 2"),
    (["--sizes", "abc"], "bad size"),
    (["--sizes", "2^30"], "maximum"),
    (["--seed", "-1"], "non-negative"),
    (["--seed", "x"], "non-negative"),
    (["--activations", "{tmp}/missing.npy"], "cannot read"),
    (["--activations", "{tmp}/garbage.npy"], "cannot read"),
    (["--activations", "{tmp}/strings.npy"], "real numeric"),
    (["--activations", "{tmp}/nan.npy"], "NaN"),
    (["--out", "{tmp}/a_file/sub"], "cannot write"),
    (["--out", "{tmp}/a_file"], "not a folder"),
    (["--bogus"], "no such option"),
])
def test_bad_inputs_give_one_line_errors(bad_files, args, words):
    args = [a.replace("{tmp}", str(bad_files)) for a in args]
    res = CliRunner().invoke(accuracy, args + ["--out", str(bad_files / "out")]
                             if "--out" not in args else args)
    assert res.exit_code != 0
    assert isinstance(res.exception, SystemExit), res.exception
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error:"), res.output
    assert words.lower() in lines[0].lower()
    assert "Traceback" not in res.output


def test_size_parsing():
    assert parse_size("2^24+1") == 2**24 + 1
    assert parse_size("2**10") == 1024
    assert parse_sizes("64, 2,64") == [2, 64]
    with pytest.raises(StudyError):
        parse_size("2^24+x")


def test_crossover_reads_the_first_non_negligible_m():
    from nbbn.accuracy.rounding import crossover

    base = dict(algorithm="a", backend="study", layout="1-D", dtype="float32", kappa=0.0,
                stat="var")
    df = pd.DataFrame([base | {"m": m, "rounding_to_sampling": r}
                       for m, r in ((2, 0.01), (8, 0.05), (32, 0.2), (128, 0.01))])
    row = crossover(df).iloc[0]
    assert row["negligible_up_to_m"] == 8 and row["first_m_not_negligible"] == 32
    assert row["max_rounding_to_sampling"] == pytest.approx(0.2)


def test_plots_are_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path):
    import sys

    from nbbn.output import pyplot

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    plt, note = pyplot()
    assert plt is None and "matplotlib" in note and "nbbn[plot]" in note
    out = tmp_path / "acc"
    res = CliRunner().invoke(accuracy, ["--quick", "--parts", "b", "--sizes", "2,64",
                                        "--distributions", "normal", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "plots skipped: matplotlib is not usable" in (out / "report.md").read_text()
    assert not list(out.glob("*.png"))
