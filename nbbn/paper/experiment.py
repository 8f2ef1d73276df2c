"""The experiment of Ioffe & Szegedy (2015) §4.1 / Figure 1, and the paper's learning-rate and
inference claims, on a NumPy network whose batch norms run on nbbn.

Plan (every run is deterministic for its seed; seeds are 0 … K−1):

1. **Learning-rate sweep of the baseline** (no BN): SGD at each rate of ``lr_grid`` for ``steps``
   steps and every seed; the baseline's best rate ``lr*`` maximizes the validation accuracy
   averaged over the seeds and over the last 10% of the evaluations (validation rows are carved
   from the training rows, never the test rows).
2. **Main runs**: no BN and BN at lr* × each of ``multipliers`` (1, 5, 30), every seed. For one
   seed both networks start from the same weights (BN has no hidden biases) and see the same
   mini-batches. Every ``steps/evals`` steps: test and validation accuracy in eval mode (BN with
   its running statistics, momentum 0.1), the mean training loss since the last evaluation, the
   15/50/85th percentiles of the last hidden layer's sigmoid inputs on (up to) 2,000 test rows,
   and the fraction of saturated sigmoids (|z| > 4) over the test rows.
3. **Inference** (the BN networks trained at lr* × 1): test accuracy with population statistics
   re-estimated after training from R training mini-batches (the network frozen, every BN layer
   in training mode) by EMA of momentum a (from running_mean = 0, running_var = 1) and by
   Algorithm 2 (the cumulative average, ``momentum=None``); with the running statistics kept
   during training; with the statistics of the whole training set as one batch; and with
   training-mode statistics of test batches of B rows. For each hidden layer and B, the
   train–inference gap of :mod:`nbbn.accuracy.estimators`, ‖x̂_train − x̂_infer‖/‖x̂_infer‖ per channel
   and batch (x̂_infer with Algorithm 2's statistics), beside its first-order theory
   √((1 + (κ₄ − 1)/4)/B) (κ₄ = the channel's kurtosis; √(1.5/B) for normal data).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .. import batch_norm_infer, batch_norm_train
from .data import Dataset, check
from .network import MLP

PERCENTILES = (15, 50, 85)


@dataclass
class Config:
    steps: int = 5000
    seeds: int = 3
    batch: int = 60
    hidden: tuple = (100, 100, 100)
    init_std: float = 0.1
    lr_grid: tuple = (0.1, 0.3, 1.0, 3.0, 10.0)
    multipliers: tuple = (1, 5, 30)
    evals: int = 50
    unit: int = 0  # the last hidden layer's sigmoid shown in (b, c)
    percentile_rows: int = 2000
    saturation: float = 4.0
    momentum: float = 0.1  # BN's running-statistics momentum during training
    ema_momenta: tuple = (0.01, 0.1, 0.5)
    pop_checkpoints: tuple = (1, 3, 10, 30, 100)
    eval_batch_sizes: tuple = (2, 4, 8, 16, 32, 60, 64, 128, 256, 500)
    batch_eval_rows: int = 5000  # test rows used for the batch-size study (e)
    backend: str = "cpu"
    dtype: str = "float32"
    quick: bool = False

    @classmethod
    def quick_config(cls, **kw) -> Config:
        base = dict(steps=600, seeds=2, evals=20, lr_grid=(0.3, 1.0, 3.0),
                    pop_checkpoints=(1, 10, 30), eval_batch_sizes=(2, 8, 60, 256), quick=True)
        base.update(kw)
        return cls(**base)

    @property
    def eval_every(self) -> int:
        return max(1, self.steps // self.evals)

    def eval_steps(self) -> list[int]:
        s = list(range(0, self.steps, self.eval_every)) + [self.steps]
        return sorted(set(s))

    def n_runs(self) -> int:
        main = len(self.multipliers) * 2 - (1 if 1 in self.multipliers else 0)
        return self.seeds * (len(self.lr_grid) + main)


@contextlib.contextmanager
def single_threaded() -> Iterator[None]:
    """One Numba thread and one BLAS thread for the duration: the experiment makes thousands
    of calls on (60, 100) arrays, where waking a second thread costs more than the work, and on
    a shared host a spinning BLAS thread that waits for a busy core costs ~20x (measured
    roughly on the development machine). Results do not depend on it."""
    import numba

    threads = numba.get_num_threads()
    numba.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits
        except ImportError:  # comes with scikit-learn (the paper extra); optional
            yield
            return
        with threadpool_limits(1):
            yield
    finally:
        numba.set_num_threads(threads)


def _seq(seed: int, *keys: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *keys]))


class _Batches:
    """Epochs of a fixed-seed permutation cut into mini-batches of ``size`` (the last partial
    batch of each epoch dropped)."""

    def __init__(self, n: int, size: int, rng: np.random.Generator):
        self.n, self.size, self.rng = n, size, rng
        self._queue: list[np.ndarray] = []

    def next(self) -> np.ndarray:
        if not self._queue:
            perm = self.rng.permutation(self.n)
            k = self.n // self.size
            self._queue = [perm[i * self.size:(i + 1) * self.size] for i in range(k)][::-1]
        return self._queue.pop()


def make_net(ds: Dataset, cfg: Config, *, bn: bool, seed: int) -> MLP:
    return MLP(ds.features, ds.classes, hidden=cfg.hidden, bn=bn, init_std=cfg.init_std,
               rng=_seq(seed, 0), dtype=cfg.dtype, backend=cfg.backend, momentum=cfg.momentum)


def accuracy(net: MLP, x: np.ndarray, y: np.ndarray, batch: int | None = None) -> float:
    if batch is not None:
        k = (len(y) // batch) * batch
        x, y = x[:k], y[:k]
    return float((net.predict(x, batch) == y).mean())


@dataclass
class Run:
    """One training run: its tidy evaluation rows and the trained network."""

    bn: bool
    lr: float
    seed: int
    rows: list[dict] = field(default_factory=list)
    net: MLP | None = None
    diverged_step: int | None = None
    #: (evals, 3, units): percentiles of every last-layer unit (main ×1 runs only)
    unit_percentiles: np.ndarray | None = None


def train_run(ds: Dataset, cfg: Config, *, bn: bool, lr: float, seed: int,
              percentiles: bool = True, validation: bool = True,
              progress: Callable[[int], None] = lambda n: None) -> Run:
    """SGD on mini-batches of ``cfg.batch`` for ``cfg.steps`` steps, evaluated at
    :meth:`Config.eval_steps` (validation accuracy only with ``validation``). A non-finite loss
    stops the run (``diverged_step``); its later evaluations repeat the last one."""
    net = make_net(ds, cfg, bn=bn, seed=seed)
    batches = _Batches(len(ds.y_train), cfg.batch, _seq(seed, 1))
    run = Run(bn, lr, seed, net=net)
    pct_rows = min(cfg.percentile_rows, len(ds.y_test))
    all_pct = []
    losses: list[float] = []
    step = 0
    last = None
    for target in cfg.eval_steps():
        while step < target and run.diverged_step is None:
            idx = batches.next()
            net.train()
            loss = net.loss_and_grad(ds.x_train[idx], ds.y_train[idx])
            step += 1
            if not math.isfinite(loss):
                run.diverged_step = step
                progress(cfg.steps - step + 1)
                break
            net.sgd_step(lr)
            losses.append(loss)
            progress(1)
        if run.diverged_step is not None and last is not None:
            run.rows.append({**last, "step": target})
            if percentiles:
                all_pct.append(all_pct[-1])
            continue
        net.eval()
        with np.errstate(over="ignore", invalid="ignore"):
            test_pred = net.forward(ds.x_test).argmax(axis=1)
            z = net.z
            val_acc = accuracy(net, ds.x_val, ds.y_val) if validation else math.nan
        row = {"step": target, "test_acc": float((test_pred == ds.y_test).mean()),
               "val_acc": val_acc,
               "train_loss": float(np.mean(losses)) if losses else math.nan}
        sat = [float((np.abs(zl) > cfg.saturation).mean()) for zl in z]
        row["saturated"] = float(np.mean(sat))
        for i, s in enumerate(sat, 1):
            row[f"saturated_l{i}"] = s
        if percentiles:
            p = np.percentile(z[-1][:pct_rows], PERCENTILES, axis=0)  # (3, units)
            all_pct.append(p)
            for q, v in zip(PERCENTILES, p[:, cfg.unit], strict=True):
                row[f"p{q}"] = float(v)
        losses = []
        run.rows.append(row)
        last = row
    if percentiles:
        run.unit_percentiles = np.stack(all_pct)
    for r in run.rows:
        r.update({"net": "BN" if bn else "no BN", "lr": lr, "seed": seed,
                  "diverged_step": run.diverged_step})
    return run


def final_val(run: Run, frac: float = 0.1) -> float:
    """Mean validation accuracy over the last ``frac`` of the evaluations."""
    k = max(1, int(round(len(run.rows) * frac)))
    return float(np.mean([r["val_acc"] for r in run.rows[-k:]]))


# ------------------------------------------------------------------------------ inference


def _copy_net(net: MLP, momentum: float | None) -> MLP:
    """The same weights and γ, β with fresh running statistics (0 and 1) and ``momentum``."""
    new = MLP.__new__(MLP)
    new.__dict__.update(net.__dict__)
    new.norms = []
    for norm in net.norms:
        fresh = type(norm)(norm.num_features, eps=norm.eps, momentum=momentum,
                           backend=norm.backend, dtype=norm.dtype)
        fresh.gamma, fresh.beta = norm.gamma, norm.beta  # shared, read-only here
        new.norms.append(fresh)
    new.grads, new.z, new._a = {}, [], []
    return new


def population_rows(ds: Dataset, cfg: Config, run: Run) -> list[dict]:
    """Test accuracy with population statistics estimated after training from R batches."""
    net = run.net
    rows = []
    base = {"seed": run.seed, "lr": run.lr}
    net.eval()
    rows.append({**base, "estimator": f"running (ema {cfg.momentum:g}, during training)",
                 "batches": cfg.steps, "test_acc": accuracy(net, ds.x_test, ds.y_test)})
    estimators = [(f"ema {a:g}", a) for a in cfg.ema_momenta] + [("algorithm 2", None)]
    for name, a in estimators:
        est = _copy_net(net, a)
        batches = _Batches(len(ds.y_train), cfg.batch, _seq(run.seed, 2))
        done = 0
        for r in cfg.pop_checkpoints:
            est.train()
            while done < r:
                est.forward(ds.x_train[batches.next()])
                done += 1
            est.eval()
            rows.append({**base, "estimator": name, "batches": r,
                         "test_acc": accuracy(est, ds.x_test, ds.y_test)})
    full = _copy_net(net, 1.0)
    full.train().forward(ds.x_train)
    full.eval()
    rows.append({**base, "estimator": "whole training set", "batches": 1,
                 "test_acc": accuracy(full, ds.x_test, ds.y_test)})
    return rows


def _kurtosis(h: np.ndarray) -> np.ndarray:
    c = h - h.mean(axis=0)
    v = (c * c).mean(axis=0)
    return (c ** 4).mean(axis=0) / np.maximum(v * v, np.finfo(float).tiny)


def batch_size_rows(ds: Dataset, cfg: Config, run: Run) -> tuple[list[dict], list[dict]]:
    """Test accuracy with training-mode statistics of test batches of B rows, and the
    per-layer train–inference gap of x̂ at each B."""
    net = run.net
    alg2 = _copy_net(net, None)
    batches = _Batches(len(ds.y_train), cfg.batch, _seq(run.seed, 2))
    alg2.train()
    for _ in range(max(cfg.pop_checkpoints)):
        alg2.forward(ds.x_train[batches.next()])
    alg2.eval()
    x_rows, y_rows = ds.x_test[:cfg.batch_eval_rows], ds.y_test[:cfg.batch_eval_rows]
    # Kurtosis of each layer's BN input over the training set (network in eval mode).
    alg2.forward(ds.x_train)
    kurt = [_kurtosis(np.asarray(a @ W, dtype=np.float64))
            for a, W in zip(alg2._a[:-1], alg2.W[:-1], strict=True)]
    acc_rows, gap_rows = [], []
    base = {"seed": run.seed, "lr": run.lr}
    for B in cfg.eval_batch_sizes:
        if B > len(y_rows) or B < 2:
            continue
        k = len(y_rows) // B
        tm = _copy_net(net, 0.0)  # training mode; momentum 0 leaves its running stats alone
        tm.train()
        acc_rows.append({**base, "batch_size": B, "test_rows": k * B,
                         "train_mode_acc": accuracy(tm, x_rows, y_rows, batch=B),
                         "population_acc": accuracy(alg2, x_rows[:k * B], y_rows[:k * B])})
        sq = np.zeros(len(cfg.hidden))
        for i in range(k):
            tm.forward(x_rows[i * B:(i + 1) * B])
            for l in range(len(cfg.hidden)):
                h = tm._a[l] @ tm.W[l]
                yt, _, _ = batch_norm_train(h, backend=cfg.backend)
                yi = batch_norm_infer(h, alg2.norms[l].running_mean, alg2.norms[l].running_var,
                                      backend=cfg.backend)
                yt, yi = np.asarray(yt, np.float64), np.asarray(yi, np.float64)
                g = (np.linalg.norm(yt - yi, axis=0)
                     / np.maximum(np.linalg.norm(yi, axis=0), np.finfo(float).tiny))
                sq[l] += float((g * g).sum())
        for l in range(len(cfg.hidden)):
            gap_rows.append({
                **base, "layer": l + 1, "batch_size": B, "batches": k,
                "gap_rms": math.sqrt(sq[l] / (k * cfg.hidden[l])),
                "theory_kurtosis": float(np.sqrt(np.mean((1 + (kurt[l] - 1) / 4) / B))),
                "theory_normal": math.sqrt(1.5 / B),
                "kurtosis_median": float(np.median(kurt[l]))})
    return acc_rows, gap_rows


# ------------------------------------------------------------------------------ driver


@dataclass
class Results:
    config: Config
    lr_best: float
    sweep: pd.DataFrame
    curves: pd.DataFrame
    lr_table: pd.DataFrame
    drift: pd.DataFrame
    population: pd.DataFrame
    batch_size: pd.DataFrame
    gap: pd.DataFrame
    target_acc: float
    notes: list[str]


def run_all(ds: Dataset, cfg: Config, progress: Callable[[int], None] = lambda n: None,
            status: Callable[[str], None] = lambda s: None) -> Results:
    check(ds, cfg.batch)  # DataError before any training
    seeds = list(range(cfg.seeds))
    ds = ds.astype(cfg.dtype)
    notes = []
    # 1. the baseline's learning-rate sweep
    runs: dict[tuple[bool, float, int], Run] = {}
    for lr in cfg.lr_grid:
        status(f"sweep: no BN, lr {lr:g}")
        for s in seeds:
            runs[False, lr, s] = train_run(ds, cfg, bn=False, lr=lr, seed=s, progress=progress)
    sweep_rows = [{"lr": lr, "seed": s, "final_val_acc": final_val(runs[False, lr, s]),
                   "final_test_acc": runs[False, lr, s].rows[-1]["test_acc"],
                   "diverged_step": runs[False, lr, s].diverged_step}
                  for lr in cfg.lr_grid for s in seeds]
    sweep = pd.DataFrame(sweep_rows)
    score = sweep.groupby("lr")["final_val_acc"].mean()
    lr_best = float(score.idxmax())
    sweep["chosen"] = sweep["lr"] == lr_best
    if lr_best in (min(cfg.lr_grid), max(cfg.lr_grid)):
        notes.append(f"the baseline's best learning rate {lr_best:g} is at the edge of the grid "
                     f"{', '.join(f'{v:g}' for v in cfg.lr_grid)}: a wider grid might do better")
    # 2. main runs
    for mult in cfg.multipliers:
        lr = lr_best * mult
        for bn in (False, True):
            if (bn, lr, 0) in runs:
                if not (mult == 1 and not bn):
                    progress(cfg.seeds * cfg.steps)  # counted in total_units, already run
                continue
            status(f"{'BN' if bn else 'no BN'}, lr {lr:g} (x{mult})")
            for s in seeds:
                runs[bn, lr, s] = train_run(ds, cfg, bn=bn, lr=lr, seed=s, validation=False,
                                            progress=progress)
    curve_rows = []
    for mult in cfg.multipliers:
        for bn in (False, True):
            for s in seeds:
                for r in runs[bn, lr_best * mult, s].rows:
                    curve_rows.append({"lr_mult": mult, **r})
    curves = pd.DataFrame(curve_rows)
    first = ["net", "lr_mult", "lr", "seed", "step"]
    curves = curves[first + [c for c in curves.columns if c not in first]]
    # (d) final accuracy, and steps to the accuracy every baseline seed has at its end
    base_final = curves[(curves.net == "no BN") & (curves.lr_mult == 1)
                        & (curves.step == cfg.steps)]["test_acc"]
    target = float(base_final.min())
    lr_rows = []
    for (net, mult), g in curves.groupby(["net", "lr_mult"], sort=False):
        finals, reach, sat, div = [], [], [], 0
        for _, gs in g.groupby("seed"):
            finals.append(float(gs[gs.step == cfg.steps]["test_acc"].iloc[0]))
            sat.append(float(gs[gs.step == cfg.steps]["saturated"].iloc[0]))
            hit = gs[gs.test_acc >= target - 1e-12]["step"]
            reach.append(int(hit.iloc[0]) if len(hit) else None)
            div += gs["diverged_step"].notna().any()
        got = [r for r in reach if r is not None]
        lr_rows.append({
            "net": net, "lr_mult": mult, "lr": lr_best * mult,
            "final_acc_mean": float(np.mean(finals)), "final_acc_min": float(np.min(finals)),
            "final_acc_max": float(np.max(finals)),
            "steps_to_target_mean": float(np.mean(got)) if got else math.nan,
            "steps_to_target_min": float(min(got)) if got else math.nan,
            "steps_to_target_max": float(max(got)) if got else math.nan,
            "reached": f"{len(got)}/{len(reach)}", "diverged": int(div),
            "saturated_final_mean": float(np.mean(sat)), "target_acc": target})
    lr_table = pd.DataFrame(lr_rows).sort_values(["lr_mult", "net"], ascending=[True, False])
    # (b, c) drift of the last hidden layer's input distributions (x1 runs)
    drift_rows = []
    for bn in (False, True):
        for s in seeds:
            p = runs[bn, lr_best, s].unit_percentiles[1:]  # skip step 0
            spread = p[:, 2, :] - p[:, 0, :]
            drift_rows.append({
                "net": "BN" if bn else "no BN", "seed": s,
                "median_range_over_spread": float(np.mean(
                    (p[:, 1, :].max(0) - p[:, 1, :].min(0)) / spread.mean(0))),
                "spread_range_over_spread": float(np.mean(
                    (spread.max(0) - spread.min(0)) / spread.mean(0)))})
    drift = pd.DataFrame(drift_rows)
    # 3. inference
    pop_rows, acc_rows, gap_rows = [], [], []
    for s in seeds:
        status(f"inference: seed {s}")
        run = runs[True, lr_best, s]
        pop_rows += population_rows(ds, cfg, run)
        a, g = batch_size_rows(ds, cfg, run)
        acc_rows += a
        gap_rows += g
        progress(1)
    return Results(cfg, lr_best, sweep, curves, lr_table, drift, pd.DataFrame(pop_rows),
                   pd.DataFrame(acc_rows), pd.DataFrame(gap_rows), target, notes)


def total_units(cfg: Config) -> int:
    """Progress units: one per training step of every run, one per seed for inference."""
    return cfg.n_runs() * cfg.steps + cfg.seeds

