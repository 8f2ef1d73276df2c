"""nbbn paper: the IDX reader on files written here, the network's gradient against central
finite differences (float64, with and without BN), determinism, and ``nbbn paper --quick``."""

from __future__ import annotations

import gzip

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from nbbn.cli import main
from nbbn.paper import data
from nbbn.paper.experiment import Config, single_threaded, train_run
from nbbn.paper.network import MLP
from nbbn.paper.report import TABLES

# Central differences of a smooth float64 loss: truncation h²·|f'''|/6 ≈ 1e-12 and rounding
# ε·|f|/h ≈ 1e-10 at h = 1e-6, against gradient entries of order 1e-2 … 1: a correct gradient
# lands near 1e-8 relative; a wrong term is off by order 1.
FD_STEP = 1e-6
FD_RTOL = 1e-6


# ------------------------------------------------------------------------------ IDX


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("dtype", ["u1", "i1", ">i2", ">i4", ">f4", ">f8"])
def test_idx_round_trip(tmp_path, compress, dtype):
    rng = np.random.default_rng(0)
    a = (rng.standard_normal((3, 4, 5)) * 50).astype(dtype)
    p = data.write_idx(tmp_path / ("a.idx" + (".gz" if compress else "")), a)
    raw = p.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == compress
    body = gzip.decompress(raw) if compress else raw
    assert body[:4] == bytes([0, 0, {"u1": 8, "i1": 9, ">i2": 11, ">i4": 12, ">f4": 13,
                                     ">f8": 14}[dtype], 3])
    assert int.from_bytes(body[4:8], "big") == 3 and int.from_bytes(body[12:16], "big") == 5
    b = data.read_idx(p)
    assert b.shape == a.shape and b.dtype.isnative
    np.testing.assert_array_equal(b, a)


def test_idx_hand_written_bytes(tmp_path):
    """A file written byte by byte as the format says (not by write_idx)."""
    p = tmp_path / "labels-idx1-ubyte"
    p.write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 4, 7, 2, 1, 0]))
    np.testing.assert_array_equal(data.read_idx(p), [7, 2, 1, 0])
    q = tmp_path / "int16-idx2"
    q.write_bytes(bytes([0, 0, 0x0B, 2, 0, 0, 0, 1, 0, 0, 0, 2, 0x01, 0x02, 0xFF, 0xFE]))
    np.testing.assert_array_equal(data.read_idx(q), [[258, -2]])


def test_idx_errors(tmp_path):
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x01\x05")
    with pytest.raises(data.DataError, match="not an IDX file"):
        data.read_idx(bad)
    bad.write_bytes(bytes([0, 0, 0x42, 1, 0, 0, 0, 1, 5]))
    with pytest.raises(data.DataError, match="unknown IDX type code 0x42"):
        data.read_idx(bad)
    bad.write_bytes(bytes([0, 0, 8, 2, 0, 0, 0, 2, 0, 0, 0, 3, 1, 2, 3]))
    with pytest.raises(data.DataError, match="3 bytes of data, expected 6"):
        data.read_idx(bad)
    bad.write_bytes(b"\x1f\x8bnot gzip")
    with pytest.raises(data.DataError, match="corrupt gzip"):
        data.read_idx(bad)
    with pytest.raises(data.DataError, match="cannot read"):
        data.read_idx(tmp_path / "missing")


def _write_mnist_like(folder, n_train=48, n_test=20, gz=True):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    sfx = ".gz" if gz else ""
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, (n, 6, 5)).astype(np.uint8)
        images[:, 0, 0] = labels * 25  # learnable: a pixel carries the label
        data.write_idx(folder / f"{prefix}-images-idx3-ubyte{sfx}", images)
        data.write_idx(folder / f"{prefix}-labels-idx1-ubyte{sfx}", labels)


@pytest.mark.parametrize("gz", [True, False])
def test_load_idx_dir(tmp_path, gz):
    _write_mnist_like(tmp_path / "mini", gz=gz)
    ds = data.load_idx_dir(tmp_path / "mini")
    assert ds.name == "mini" and ds.features == 30 and ds.classes == 10
    assert len(ds.y_train) + len(ds.y_val) == 48 and len(ds.y_val) == 4
    assert len(ds.y_test) == 20
    assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1
    np.testing.assert_array_equal(ds.y_test, np.arange(20) % 10)
    # the fixed split does not depend on anything but the data
    again = data.load_idx_dir(tmp_path / "mini")
    np.testing.assert_array_equal(again.y_val, ds.y_val)


def test_load_idx_dir_errors(tmp_path):
    with pytest.raises(data.DataError, match="is not a folder"):
        data.load_idx_dir(tmp_path / "nowhere")
    _write_mnist_like(tmp_path / "d")
    (tmp_path / "d" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(data.DataError, match="t10k-labels-idx1-ubyte"):
        data.load_idx_dir(tmp_path / "d")
    data.write_idx(tmp_path / "d" / "t10k-labels-idx1-ubyte", np.zeros(3, np.uint8))
    with pytest.raises(data.DataError, match="one per image"):
        data.load_idx_dir(tmp_path / "d")


def test_load_digits():
    pytest.importorskip("sklearn", reason="the digits come with scikit-learn (the paper extra)")
    ds = data.load_digits()
    assert (len(ds.y_train), len(ds.y_val), len(ds.y_test)) == (997, 300, 500)
    assert ds.features == 64 and ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0


# ------------------------------------------------------------------------------ network


def _loss(net, x, y):
    from nbbn.paper.network import log_softmax

    net.train()
    logp = log_softmax(net.forward(x))
    return -logp[np.arange(len(y)), y].mean()


@pytest.mark.parametrize("bn", [True, False])
def test_network_gradient_against_finite_differences(bn):
    rng = np.random.default_rng(3)
    net = MLP(6, 3, hidden=(5, 4, 3), bn=bn, init_std=0.7, rng=rng, dtype=np.float64)
    for name, p in net.params().items():  # move γ, β and the biases off their initial values
        if not name.startswith("W"):
            p += 0.3 * rng.standard_normal(p.shape)
    x = 1.5 + rng.standard_normal((8, 6))
    y = rng.integers(0, 3, 8)
    net.loss_and_grad(x, y)
    grads = {k: v.copy() for k, v in net.grads.items()}
    assert set(grads) == set(net.params())
    analytic, numeric = [], []
    for name, p in net.params().items():
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + FD_STEP
            up = _loss(net, x, y)
            p[i] = old - FD_STEP
            down = _loss(net, x, y)
            p[i] = old
            numeric.append((up - down) / (2 * FD_STEP))
            analytic.append(grads[name][i])
    analytic, numeric = np.array(analytic), np.array(numeric)
    err = np.linalg.norm(analytic - numeric) / np.linalg.norm(numeric)
    assert err <= FD_RTOL, f"relative gradient error {err:.2e}"
    if bn:
        assert {"gamma1", "beta3"} <= set(grads) and "b1" not in grads


def test_training_run_is_deterministic():
    _ = pytest.importorskip("sklearn", reason="the digits come with scikit-learn")
    ds = data.load_digits().astype(np.float32)
    cfg = Config(steps=40, evals=4)
    with single_threaded():  # as the command runs it (a spinning BLAS thread is slow when busy)
        a = train_run(ds, cfg, bn=True, lr=1.0, seed=7)
        b = train_run(ds, cfg, bn=True, lr=1.0, seed=7)
        c = train_run(ds, cfg, bn=True, lr=1.0, seed=8)
    assert a.rows == b.rows
    assert c.rows != a.rows


# ------------------------------------------------------------------------------ command


def test_paper_quick_cli(tmp_path):
    pytest.importorskip("sklearn", reason="the default data set (digits) comes with scikit-learn")
    out = tmp_path / "paper"
    res = CliRunner().invoke(main, ["paper", "--quick", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for t in TABLES:
        df = pd.read_csv(out / f"{t}.csv")
        assert len(df), t
        assert len(pd.read_csv(out / f"{t}.csv")), t
        assert not (out / f"{t}.json").exists()  # one format per table
    report = (out / "report.md").read_text()
    for heading in ("## (a)", "## (b, c)", "## (d)", "## (e)"):
        assert heading in report
    assert "nbbn paper --quick" in report
    curves = pd.read_csv(out / "curves.csv")
    final = curves[(curves.lr_mult == 1) & (curves.step == curves.step.max())
                   & (curves.seed == 0)].set_index("net")["test_acc"]
    assert final["BN"] > final["no BN"]  # (a): BN ahead at the fixed seed
    lr = pd.read_csv(out / "lr.csv").set_index(["net", "lr_mult"])
    assert lr.loc[("BN", 1), "final_acc_mean"] > lr.loc[("no BN", 1), "final_acc_mean"]
    assert set(lr.reset_index().lr_mult) == {1, 5, 30}
    pop = pd.read_csv(out / "population.csv")
    assert {"algorithm 2", "ema 0.01", "ema 0.1", "ema 0.5"} <= set(pop.estimator)
    gap = pd.read_csv(out / "gap.csv")
    assert gap.gap_rms.notna().all() and set(gap.layer) == {1, 2, 3}
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (out / "a_accuracy.png").is_file() and (out / "e_inference.png").is_file()


def test_paper_cli_errors(tmp_path):
    res = CliRunner().invoke(main, ["paper", "--data", str(tmp_path / "none")])
    assert res.exit_code != 0 and "is not a folder" in res.output
    res = CliRunner().invoke(main, ["paper", "--backend", "numpy", "--quick"])
    assert res.exit_code != 0 and "baseline" in res.output
    res = CliRunner().invoke(main, ["paper", "--steps", "3"])
    assert res.exit_code != 0


def test_paper_on_idx_files(tmp_path):
    """--data with IDX files: a tiny run end to end (few steps, 1 seed, no plots)."""
    _write_mnist_like(tmp_path / "mini", n_train=130, n_test=40)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["paper", "--quick", "--data", str(tmp_path / "mini"),
                                    "--steps", "20", "--seeds", "1", "--out", str(out),
                                    "--no-plots"])
    assert res.exit_code == 0, res.output
    assert "IDX files in" in (out / "report.md").read_text()


# ------------------------------------------------------------------------------ bad data (issue 20)


def _bad_data(folder, n_train=130, nan=False, label=None):
    _write_mnist_like(folder, n_train=n_train, n_test=40, gz=False)
    if nan:
        images = data.read_idx(folder / "train-images-idx3-ubyte").astype(np.float32) / 255
        images[7, 2, 3] = np.nan
        data.write_idx(folder / "train-images-idx3-ubyte", images)
    if label is not None:
        labels = data.read_idx(folder / "train-labels-idx1-ubyte").astype(np.int16)
        labels[5] = label
        data.write_idx(folder / "train-labels-idx1-ubyte", labels)
    return folder


@pytest.mark.parametrize("case, match", [
    (dict(n_train=40), r"37 training rows .* fewer than one mini-batch of 60"),
    (dict(nan=True), r"train-images-idx3-ubyte: .*not finite .*image 7"),
    (dict(label=200), r"train-labels-idx1-ubyte: labels must be digits 0.9, .*200 .*entry 5"),
    (dict(label=-1), r"train-labels-idx1-ubyte: labels must be digits 0.9, .*-1 .*entry 5"),
], ids=["small", "nan", "label200", "label-1"])
def test_paper_refuses_bad_data_in_one_line(tmp_path, case, match):
    """Refused before any training: one line, exit 1, no traceback, no --out folder made."""
    folder = _bad_data(tmp_path / "bad", **case)
    out = tmp_path / "out"
    res = CliRunner().invoke(main, ["paper", "--quick", "--data", str(folder), "--steps", "20",
                                    "--seeds", "1", "--out", str(out), "--no-plots"])
    assert res.exit_code == 1, res.output
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), \
        repr(res.exception)
    assert "Traceback" not in res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), res.output
    import re
    assert re.search(match, lines[0]), lines[0]
    assert not out.exists()


def test_paper_run_all_refuses_too_few_rows():
    """The same check for a caller of the experiment (not the CLI)."""
    from nbbn.paper.experiment import run_all

    ds = data.load_digits()
    small = data.Dataset("tiny", "test", ds.x_train[:59], ds.y_train[:59], ds.x_val, ds.y_val,
                         ds.x_test, ds.y_test)
    with pytest.raises(data.DataError, match="59 training rows"):
        run_all(small, Config.quick_config(steps=20, seeds=1))
