"""The accuracy study (``nbbn accuracy``): its reference, its findings, its determinism, its CLI.

Statistical checks use fixed seeds and tolerances derived from the number of samples (4 standard
errors), so they are deterministic and would still pass for a different seed with probability
≈ 0.9999 per check.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from nbbn.study import algorithms as A
from nbbn.study.commands import accuracy
from nbbn.study.common import POPULATIONS, StudyError, parse_size, parse_sizes, rng_for
from nbbn.study.estimators import EstimatorConfig, run_estimators
from nbbn.study.rounding import DEFAULT_SIZES, RoundingConfig, run_rounding, usable_backends
from nbbn.study.sampling import SamplingConfig, load_activations, run_sampling
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
    df, sk = run_rounding(cfg, backends=backends)
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


def test_default_grid_goes_beyond_2_pow_24():
    assert max(DEFAULT_SIZES) > 2**24 and 2**24 + 1 in DEFAULT_SIZES


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

@pytest.fixture(scope="module")
def streams():
    cfg = EstimatorConfig(sizes=[4, 16], gap_sizes=[4, 1024], distributions=["normal"],
                          streams=512, batches=50)
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
    _, gap, _ = streams
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


def test_cli_quick_writes_tables_report_and_figures(tmp_path):
    out = tmp_path / "acc"
    res = CliRunner().invoke(accuracy, ["--quick", "--out", str(out), "--seed", "0"])
    assert res.exit_code == 0, res.output
    for name, cols in REQUIRED.items():
        df = pd.read_csv(out / f"{name}.csv")
        assert cols <= set(df.columns), name
        assert {"numba_version", "threads", "seed"} <= set(df.columns)
        assert len(df) == len(json.loads((out / f"{name}.json").read_text()))
    rnd = pd.read_csv(out / "rounding.csv")
    assert set(rnd["algorithm"]) >= {"naive", "two-pass", "welford", "chan"}
    assert set(rnd["dtype"]) == {"float32", "float64"}
    assert set(rnd["kappa"]) == {0, 1, 1e2, 1e3, 1e4}
    assert rnd["m"].max() > 2**20
    skipped = pd.read_csv(out / "skipped.csv")
    assert skipped["reason"].notna().all()
    md = (out / "report.md").read_text()
    assert md.startswith("# nbbn accuracy study")
    assert f"Command: `nbbn accuracy --quick --out {out} --seed 0`" in md
    assert "## Key findings" in md
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "plots skipped" in md
    else:
        pngs = sorted(p.name for p in out.glob("*.png"))
        assert "rounding_vs_m_var.png" in pngs and "estimators_rmse_vs_batches.png" in pngs
        assert "gap_vs_m.png" in pngs and "sampling_vs_m.png" in pngs


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
    (["--parts", "z"], "unknown part"),
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
    from nbbn.study.rounding import crossover

    base = dict(algorithm="a", backend="study", layout="1-D", dtype="float32", kappa=0.0,
                stat="var")
    df = pd.DataFrame([base | {"m": m, "rounding_to_sampling": r}
                       for m, r in ((2, 0.01), (8, 0.05), (32, 0.2), (128, 0.01))])
    row = crossover(df).iloc[0]
    assert row["negligible_up_to_m"] == 8 and row["first_m_not_negligible"] == 32
    assert row["max_rounding_to_sampling"] == pytest.approx(0.2)


def test_plots_are_skipped_with_a_message_without_matplotlib(monkeypatch, tmp_path):
    import sys

    from nbbn.study.report import write_plots

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    paths, note = write_plots(tmp_path, {})
    assert paths == [] and "matplotlib" in note
