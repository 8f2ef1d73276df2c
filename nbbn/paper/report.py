"""``nbbn paper``'s outputs: tidy tables (CSV, JSON) through :mod:`nbbn.output`, PNG figures
(when matplotlib is installed) and ``report.md``. Every summary in the Markdown is derived from
the tidy tables written beside it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..output import markdown_table, pyplot, save_figure, write_tables
from .experiment import PERCENTILES, Results

#: The accuracy study's train–inference gap table (normal data), read when present.
#: Where ``nbbn paper`` looks for the accuracy study's gap table by default (relative to the
#: working directory, as every results/ path of the CLI; ``--study-gap`` names another).
STUDY_GAP = Path("results") / "accuracy" / "gap.csv"

TABLES = ("sweep", "curves", "lr", "drift", "population", "batch_size", "gap")


def _spread(values) -> str:
    """mean [min, max] of a few seeds' values."""
    v = np.asarray(list(values), dtype=float)
    v = v[~np.isnan(v)]
    if not len(v):
        return ""
    if len(v) == 1:
        return f"{v[0]:.3f}"
    return f"{v.mean():.3f} [{v.min():.3f}, {v.max():.3f}]"


def tables(res: Results, env: dict) -> dict[str, pd.DataFrame]:
    """The tidy tables, environment columns appended to every row."""
    out = {"sweep": res.sweep, "curves": res.curves, "lr": res.lr_table, "drift": res.drift,
           "population": res.population, "batch_size": res.batch_size, "gap": res.gap}
    return {k: df.assign(**env) if len(df) else df for k, df in out.items()}


def write(out: Path, res: Results, env: dict) -> list[Path]:
    paths = []
    for name, df in tables(res, env).items():
        paths += write_tables(df, out / name)
    return paths


# ------------------------------------------------------------------------------ figures


def write_plots(out: Path, res: Results, data_name: str,
                study_path: Path = STUDY_GAP) -> tuple[list[Path], str | None]:
    plt, why = pyplot()
    if plt is None:
        return [], why
    cur = res.curves
    colors = {"no BN": "tab:red", "BN": "tab:blue"}
    paths = []

    def band(ax, g, col, label, color, style="-"):
        s = g.groupby("step")[col]
        m, lo, hi = s.mean(), s.min(), s.max()
        ax.plot(m.index, m.values, style, color=color, label=label, lw=1.4)
        ax.fill_between(m.index, lo.values, hi.values, color=color, alpha=0.18, lw=0)

    def save(fig, name):
        paths.append(save_figure(fig, out / name))

    n_seeds = cur["seed"].nunique()
    x1 = cur[cur.lr_mult == 1]
    # (a)
    fig, ax = plt.subplots(figsize=(6, 4))
    for net in ("no BN", "BN"):
        band(ax, x1[x1.net == net], "test_acc", f"{net}", colors[net])
    lo = min(0.5, float(np.nanmin(x1.groupby(["net", "step"]).test_acc.mean().values)))
    ax.set_ylim(max(0.0, lo), 1.0)
    ax.set_xlabel("training step")
    ax.set_ylabel("test accuracy")
    ax.set_title(f"(a) {data_name}: test accuracy, lr {res.lr_best:g} "
                 f"(mean, min–max over {n_seeds} seeds)", fontsize=9)
    ax.legend()
    ax.grid(alpha=0.3)
    save(fig, "a_accuracy.png")
    # (b, c)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, net in zip(axes, ("no BN", "BN"), strict=True):
        g = x1[(x1.net == net) & (x1.step > 0)]
        for q, style in zip(PERCENTILES, (":", "-", "--"), strict=True):
            band(ax, g, f"p{q}", f"{q}th percentile", colors[net], style)
        ax.set_title(f"({'b' if net == 'no BN' else 'c'}) {net}: input of sigmoid "
                     f"#{res.config.unit} of hidden layer {len(res.config.hidden)}", fontsize=9)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("sigmoid input z")
    save(fig, "bc_percentiles.png")
    # (d) accuracy and saturation for every learning rate
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    styles = dict(zip(sorted(cur.lr_mult.unique()), ("-", "--", ":", "-."), strict=False))
    for (net, mult), g in cur.groupby(["net", "lr_mult"], sort=False):
        lr = res.lr_best * mult
        band(axes[0], g, "test_acc", f"{net} lr {lr:g} (×{mult})", colors[net], styles[mult])
        band(axes[1], g, "saturated", f"{net} lr {lr:g} (×{mult})", colors[net], styles[mult])
    axes[0].axhline(res.target_acc, color="gray", lw=0.8)
    axes[0].set_ylabel("test accuracy")
    axes[1].set_ylabel(f"fraction of sigmoids with |z| > {res.config.saturation:g}")
    for ax, t in zip(axes, ("(d) test accuracy by learning rate (grey: target)",
                            "(d) saturated sigmoids (all hidden layers, test rows)"),
                     strict=True):
        ax.set_xlabel("training step")
        ax.set_title(t, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save(fig, "d_learning_rates.png")
    # (e)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    pop = res.population
    ax = axes[0]
    for i, (est, g) in enumerate(pop[pop.estimator.str.startswith(("ema", "algorithm"))]
                                 .groupby("estimator", sort=False)):
        s = g.groupby("batches")["test_acc"]
        m = s.mean()
        ax.plot(m.index, m.values, "o-", label=est, color=f"C{i}")
        ax.fill_between(m.index, s.min().values, s.max().values, alpha=0.15, color=f"C{i}")
    for est, style in (("running", "--"), ("whole", ":")):
        v = pop[pop.estimator.str.startswith(est)]["test_acc"].mean()
        name = pop[pop.estimator.str.startswith(est)]["estimator"].iloc[0]
        ax.axhline(v, ls=style, color="k", lw=1, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training batches R used to estimate the population statistics")
    ax.set_ylabel("test accuracy")
    ax.set_title("(e) population statistics after training", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[1]
    bs = res.batch_size
    s = bs.groupby("batch_size")["train_mode_acc"]
    ax.plot(s.mean().index, s.mean().values, "o-", label="training-mode statistics of the test "
            "batch", color="tab:purple")
    ax.fill_between(s.mean().index, s.min().values, s.max().values, alpha=0.15,
                    color="tab:purple")
    ax.axhline(bs["population_acc"].mean(), color="k", ls="--", lw=1,
               label=f"Algorithm 2 ({max(res.config.pop_checkpoints)} batches)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("test batch size B")
    ax.set_ylabel("test accuracy")
    ax.set_title("(e) inference with batch statistics vs population", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    ax = axes[2]
    gap = res.gap
    for l, g in gap.groupby("layer"):
        s = g.groupby("batch_size")["gap_rms"]
        ax.plot(s.mean().index, s.mean().values, "o-", label=f"layer {l}", color=f"C{l}")
    th = gap.groupby("batch_size")["theory_normal"].mean()
    ax.plot(th.index, th.values, "k--", lw=1, label="√(1.5/B) (normal data)")
    study = study_gap(study_path)
    if study is not None:
        study = study[study.index <= 2 * gap["batch_size"].max()]
        ax.plot(study.index, study.values, "k:", lw=1, label="accuracy study, normal data")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size B = m")
    ax.set_ylabel("RMS ‖x̂_train − x̂_infer‖/‖x̂_infer‖")
    ax.set_title("(e) train–inference gap of the BN outputs", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    save(fig, "e_inference.png")
    return paths, None


def study_gap(path: Path = STUDY_GAP) -> pd.Series | None:
    """The accuracy study's measured gap for normal data (exact population), by m; None when
    ``path`` is not there or not that table."""
    if not Path(path).is_file():
        return None
    try:
        df = pd.read_csv(path)
        d = df[(df.distribution == "normal") & (df.inference_stats == "population")]
        return d.set_index("m")["gap_rms"].sort_index()
    except (KeyError, ValueError, OSError):
        return None


# ------------------------------------------------------------------------------ markdown


def _at_steps(res: Results) -> list[int]:
    steps = sorted(res.curves.step.unique())
    total = res.config.steps
    want = [steps[1] if len(steps) > 1 else 0] + [round(total * f) for f in (0.1, 0.25, 0.5, 1)]
    return sorted({min(steps, key=lambda s, w=w: abs(s - w)) for w in want})


def _pivot_spread(df, index, columns, value) -> pd.DataFrame:
    cells = df.groupby([*index, columns], sort=False)[value].apply(_spread).unstack(columns)
    cells.columns = [f"{columns} {c}" for c in cells.columns]
    return cells


def markdown(meta: dict, res: Results, figures: list[str], note: str | None) -> str:
    cfg = res.config
    cur = res.curves
    K = cur.seed.nunique()
    lines = [f"# nbbn paper: Ioffe & Szegedy (2015) §4.1 on {meta['data_name']}", "",
             f"Command: `{meta['command']}`", "",
             f"Data: {meta['data']}.", "",
             f"Run {meta['date']} on {meta['machine']}; backend `{cfg.backend}`, {cfg.dtype}; "
             f"seeds 0–{K - 1}; wall time {meta['wall_s']:.0f} s on a shared host "
             f"(1-minute load {meta['load']}; a rough duration, not a benchmark).", "",
             f"Network: {len(cfg.hidden)} hidden layers of {', '.join(map(str, cfg.hidden))} "
             f"sigmoid units, 10-way softmax, cross-entropy; weights N(0, {cfg.init_std:g}²), "
             "biases 0 (no hidden biases with BN: β replaces them); plain SGD on mini-batches "
             f"of {cfg.batch} (epochs of a seeded permutation), {cfg.steps} steps; BN after each "
             f"hidden affine transform, before the sigmoid, on `nbbn.BatchNorm` (momentum "
             f"{cfg.momentum:g}, eps 1e-5). Evaluated every {cfg.eval_every} steps in eval mode "
             "(BN with its running statistics). Formulas and plan: the docstrings of "
             "`nbbn/paper/network.py` and `nbbn/paper/experiment.py`.", "",
             "Tidy tables beside this file (CSV, environment in every row): "
             + ", ".join(f"`{t}.csv`" for t in TABLES) + ".", ""]
    for n in res.notes:
        lines.append(f"**Note:** {n}.")
        lines.append("")
    # headline
    lt = res.lr_table.set_index(["net", "lr_mult"])
    a_bn, a_no = lt.loc[("BN", 1)], lt.loc[("no BN", 1)]
    lines += ["## Summary", ""]
    lines.append(
        f"- **(a)** at the baseline's best learning rate {res.lr_best:g}: final test accuracy "
        f"BN {_spread_row(a_bn)} vs no BN {_spread_row(a_no)} (mean [min, max] over {K} "
        f"seeds). BN reaches the accuracy every baseline seed ends with, {res.target_acc:.3f}, "
        f"after {_steps(a_bn)}, the baseline after {_steps(a_no)}.")
    dr = res.drift.groupby("net")[["median_range_over_spread", "spread_range_over_spread"]].mean()
    lines.append(
        f"- **(b, c)** last hidden layer, over training (after step 0), averaged over its "
        f"{cfg.hidden[-1]} sigmoids and the seeds: the median of a sigmoid's input moves over a "
        f"range of {dr.loc['no BN', 'median_range_over_spread']:.2f} × its 15–85 spread without "
        f"BN and {dr.loc['BN', 'median_range_over_spread']:.2f} × with BN; the spread itself "
        f"varies over {dr.loc['no BN', 'spread_range_over_spread']:.2f} × vs "
        f"{dr.loc['BN', 'spread_range_over_spread']:.2f} × its mean.")
    d_items = []
    for mult in cfg.multipliers:
        if mult == 1:
            continue
        d_items.append(f"×{mult} (lr {res.lr_best * mult:g}): BN "
                       f"{_spread_row(lt.loc[('BN', mult)])}, no BN "
                       f"{_spread_row(lt.loc[('no BN', mult)])}")
    lines.append("- **(d)** final test accuracy at higher learning rates: " + "; ".join(d_items)
                 + ". Saturated sigmoids (|z| > "
                 f"{cfg.saturation:g}) at the end, ×1: BN {a_bn['saturated_final_mean']:.3f}, "
                 f"no BN {a_no['saturated_final_mean']:.3f}.")
    pop = res.population
    big = max(cfg.pop_checkpoints)
    alg2 = pop[(pop.estimator == "algorithm 2") & (pop.batches == big)].test_acc
    run_ = pop[pop.estimator.str.startswith("running")].test_acc
    bs = res.batch_size.groupby("batch_size")["train_mode_acc"].mean()
    lines.append(
        f"- **(e)** test accuracy with Algorithm 2's population statistics ({big} batches) "
        f"{_spread(alg2)}, with the running statistics kept in training {_spread(run_)}; "
        "with training-mode statistics of the test batch: "
        + ", ".join(f"B = {b}: {v:.3f}" for b, v in bs.items()) + ".")
    lines.append("")
    # (a)
    steps = _at_steps(res)
    x1 = cur[(cur.lr_mult == 1) & cur.step.isin(steps)]
    lines += ["## (a) Test accuracy vs training steps (Figure 1a)", "",
              f"lr {res.lr_best:g} for both networks, mean [min, max] over {K} seeds.", "",
              markdown_table(_pivot_spread(x1, ["net"], "step", "test_acc")), ""]
    if "a_accuracy.png" in figures:
        lines += ["![a_accuracy.png](a_accuracy.png)", ""]
    # (b, c)
    lines += ["## (b, c) Input distribution of one sigmoid of the last hidden layer "
              "(Figure 1b, c)", "",
              f"Sigmoid #{cfg.unit} of hidden layer {len(cfg.hidden)}; percentiles over the "
              f"first {min(cfg.percentile_rows, meta['test_rows'])} test rows in eval mode, "
              f"mean [min, max] over {K} seeds.", ""]
    rows = []
    for (net, step), g in x1.groupby(["net", "step"], sort=False):
        rows.append({"net": net, "step": step,
                     **{f"p{q}": _spread(g[f"p{q}"]) for q in PERCENTILES}})
    lines += [markdown_table(pd.DataFrame(rows), index=False), "",
              "Drift of every sigmoid of that layer over training (after step 0): range of its "
              "median / mean 15–85 spread, and range of its 15–85 spread / its mean; mean over "
              "the layer's units, then mean [min, max] over seeds.", ""]
    drift = res.drift.groupby("net", sort=False).agg(
        median_range_over_spread=("median_range_over_spread", _spread),
        spread_range_over_spread=("spread_range_over_spread", _spread))
    lines += [markdown_table(drift), ""]
    if "bc_percentiles.png" in figures:
        lines += ["![bc_percentiles.png](bc_percentiles.png)", ""]
    # (d)
    sw = res.sweep.groupby("lr").agg(final_val_acc=("final_val_acc", _spread),
                                     final_test_acc=("final_test_acc", _spread),
                                     diverged=("diverged_step", lambda s: int(s.notna().sum())))
    lines += ["## (d) Learning rates (§3.3, §4.2.1)", "",
              "The baseline's learning rate: no-BN SGD at each rate of the grid, every seed, "
              f"{cfg.steps} steps; the best maximizes the validation accuracy (rows carved from "
              "the training set) averaged over the last 10% of the evaluations and over the "
              f"seeds: **lr {res.lr_best:g}**.", "",
              markdown_table(sw), "",
              f"Then both networks at ×{', ×'.join(map(str, cfg.multipliers))} that rate. Target "
              "accuracy = the lowest final test accuracy of the baseline's seeds (no BN, ×1), "
              f"{res.target_acc:.3f}, which every baseline seed has reached by its last step; "
              "steps to target = the first evaluation at or above it (resolution "
              f"{cfg.eval_every} steps), mean [min, max] over the seeds that reached it.", ""]
    show = res.lr_table.copy()
    show = show.assign(
        final_test_acc=[_spread_row(r) for _, r in show.iterrows()],
        steps_to_target=[_steps(r) for _, r in show.iterrows()])
    lines += [markdown_table(show[["net", "lr_mult", "lr", "final_test_acc", "steps_to_target",
                                   "reached", "diverged", "saturated_final_mean"]],
                             index=False), "",
              f"Fraction of saturated sigmoids (|z| > {cfg.saturation:g}, all hidden layers, "
              f"test rows, eval mode) over training, mean over {K} seeds:", ""]
    sat = cur[cur.step.isin(steps)].groupby(["net", "lr_mult", "step"], sort=False)[
        "saturated"].mean().unstack("step")
    sat.columns = [f"step {c}" for c in sat.columns]
    lines += [markdown_table(sat), ""]
    if "d_learning_rates.png" in figures:
        lines += ["![d_learning_rates.png](d_learning_rates.png)", ""]
    # (e)
    lines += ["## (e) Inference: population statistics vs training-mode statistics", "",
              f"The BN networks trained at lr {res.lr_best:g} (×1), frozen. Population "
              "statistics re-estimated from R training mini-batches of "
              f"{cfg.batch} (every BN layer in training mode): EMA of momentum a from "
              "running_mean = 0, running_var = 1 (PyTorch's convention, unbiased batch "
              "variance), and Algorithm 2 (cumulative average, `momentum=None`); also the running "
              "statistics kept during training and the statistics of the whole training set as "
              f"one batch. Test accuracy, mean [min, max] over {K} seeds:", ""]
    p = pop.copy()
    p["col"] = ["R = " + str(b) if not (e.startswith("running") or e.startswith("whole"))
                else "" for e, b in zip(p.estimator, p.batches, strict=True)]
    est = p[p.col != ""].groupby(["estimator", "col"], sort=False)["test_acc"].apply(
        _spread).unstack("col")
    lines += [markdown_table(est), ""]
    other = p[p.col == ""].groupby("estimator", sort=False)["test_acc"].apply(_spread)
    lines += ["\n".join(f"- {k}: {v}" for k, v in other.items()), ""]
    n_rows = min(cfg.batch_eval_rows, meta["test_rows"])
    lines += [f"Training-mode statistics at inference: the first {n_rows} test rows "
              "cut into batches of B, each normalized by its own batch statistics (the remainder "
              "rows dropped), against Algorithm 2's population statistics ({big} batches) on the "
              "same rows:".replace("{big}", str(big)), ""]
    bsd = res.batch_size.groupby("batch_size").agg(
        test_rows=("test_rows", "first"), train_mode_acc=("train_mode_acc", _spread),
        population_acc=("population_acc", _spread))
    bsd["gap (population − train mode)"] = (
        res.batch_size.groupby("batch_size")["population_acc"].mean()
        - res.batch_size.groupby("batch_size")["train_mode_acc"].mean())
    lines += [markdown_table(bsd), ""]
    study = study_gap(meta.get("study_gap", STUDY_GAP))
    lines += ["Train–inference gap of the normalized values, as in the accuracy study "
              "(`results/accuracy/report.md`, part c): per channel and test batch "
              "‖x̂_train − x̂_infer‖/‖x̂_infer‖ (x̂_infer with Algorithm 2's statistics), RMS over "
              "channels, batches and seeds; theory √((1 + (κ₄ − 1)/4)/B) with each channel's "
              "kurtosis κ₄ on the training set (RMS over channels), and √(1.5/B) for normal "
              "data" + ("; the last column is the study's measured gap for normal data "
                        "(`results/accuracy/gap.csv`)" if study is not None else "") + ".", ""]
    gp = res.gap.groupby(["batch_size", "layer"])[["gap_rms", "theory_kurtosis"]].mean()
    gp = gp.unstack("layer")
    gp.columns = [f"{a} L{b}" for a, b in gp.columns]
    gp["theory_normal"] = res.gap.groupby("batch_size")["theory_normal"].first()
    if study is not None:
        gp["study_normal"] = [study.get(b, math.nan) for b in gp.index]
    lines += [markdown_table(gp), "",
              "Median kurtosis of the BN inputs per layer: "
              + ", ".join(f"L{l} {v:.2f}" for l, v in
                          res.gap.groupby("layer")["kurtosis_median"].mean().items()) + ".", ""]
    if "e_inference.png" in figures:
        lines += ["![e_inference.png](e_inference.png)", ""]
    if note:
        lines += [f"_{note}_", ""]
    lines += ["## Environment", "", ", ".join(f"{k} {v}" for k, v in meta["env"].items()), ""]
    return "\n".join(lines)


def _spread_row(r) -> str:
    if r["final_acc_min"] == r["final_acc_max"]:
        return f"{r['final_acc_mean']:.3f}"
    return f"{r['final_acc_mean']:.3f} [{r['final_acc_min']:.3f}, {r['final_acc_max']:.3f}]"


def _steps(r) -> str:
    if math.isnan(r["steps_to_target_mean"]):
        return f"never ({r['reached']} seeds)"
    rng = ("" if r["steps_to_target_min"] == r["steps_to_target_max"] else
           f" [{r['steps_to_target_min']:.0f}, {r['steps_to_target_max']:.0f}]")
    return f"{r['steps_to_target_mean']:.0f} steps{rng} ({r['reached']} seeds)"
