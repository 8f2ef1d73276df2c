"""The study's outputs: tidy tables to CSV/JSON, Markdown summary, and plots (when matplotlib is
installed). Pivots in the Markdown are derived from the tidy tables, which are always written."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import output as _output
from ..output import save_figure

# -------------------------------------------------------------------------------- tables
# The writers live once, in nbbn.output; these names stay for the study's modules.

_plain = _output.plain


def write_table(df: pd.DataFrame, out: Path, stem: str) -> list[Path]:
    """``stem.csv`` in ``out`` (:func:`nbbn.output.write_tables`)."""
    return _output.write_tables(df, Path(out) / stem)


def markdown_table(df: pd.DataFrame, fmt: str = ".2g", index: bool = True) -> str:
    """A GitHub pipe table (floats with ``fmt``; NaN blank): :func:`nbbn.output.markdown_table`."""
    return _output.markdown_table(df, fmt, index)


def label(row) -> str:
    """An algorithm's display name: the study's own by name, a backend as "<backend> <layout>"."""
    return row["algorithm"] if row["backend"] == "study" else f"{row['backend']} {row['layout']}"


def with_label(df: pd.DataFrame) -> pd.DataFrame:
    return df.assign(label=[label(r) for r in df[["algorithm", "backend", "layout"]]
                            .to_dict(orient="records")])


def kappa_name(k: float) -> str:
    return "0" if k == 0 else (f"{k:g}" if k < 100 else f"1e{round(math.log10(k))}"
                               if math.log10(k).is_integer() else f"{k:g}")


def m_name(m: int) -> str:
    """4096 → 2^12, 16777217 → 2^24+1, others as digits."""
    for e in range(1, 40):
        for off, s in ((0, ""), (1, "+1"), (-1, "-1")):
            if m == 2**e + off and e >= 10:
                return f"2^{e}{s}"
    return str(m)


# -------------------------------------------------------------------------------- plots

_FLOOR, _CEIL = 1e-18, 1e8


def _save(fig, plt, path):
    return save_figure(fig, path)


def _clip(v):
    v = np.asarray(v, dtype=float)
    return np.clip(np.where(np.isnan(v), _CEIL, v), _FLOOR, _CEIL)


def _plot_rounding_vs_m(plt, out, df, stat):
    d = with_label(df[df["stat"] == stat])
    if d.empty:
        return None
    kappas = sorted(d["kappa"].unique())
    dtypes = list(dict.fromkeys(d["dtype"]))
    fig, axes = plt.subplots(len(kappas), len(dtypes), figsize=(5.5 * len(dtypes),
                             2.6 * len(kappas)), squeeze=False, sharex=True)
    labels = list(dict.fromkeys(d["label"]))
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for i, k in enumerate(kappas):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            p = d[(d["kappa"] == k) & (d["dtype"] == dt)]
            for lab, g in p.groupby("label", sort=False):
                g = g.sort_values("m")
                ax.loglog(g["m"], _clip(g["rel_err"]), marker=".", label=lab, color=colors[lab],
                          ls="-" if g["backend"].iloc[0] == "study" else "--")
            s = p.drop_duplicates("m").sort_values("m")
            if s["sampling_rel_rmse"].notna().any():
                ax.loglog(s["m"], s["sampling_rel_rmse"], color="k", ls=":", lw=2,
                          label="sampling RMSE (normal)")
            ax.axvline(2**24, color="grey", lw=0.8, ls="-.")
            ax.set_title(f"{dt}, κ = |mean|/std = {kappa_name(k)}", fontsize=9)
            ax.grid(True, which="major", alpha=0.3)
            if j == 0:
                ax.set_ylabel(f"rel_err({stat})")
            if i == len(kappas) - 1:
                ax.set_xlabel("m (values per channel); dash-dot: 2^24")
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(f"Rounding error of {stat} vs m (clipped to [{_FLOOR:g}, {_CEIL:g}])")
    return _save(fig, plt, out / f"rounding_vs_m_{stat}.png")


def _plot_rounding_vs_kappa(plt, out, df):
    d = with_label(df[df["stat"].isin(["var", "y"])])
    ms = sorted(d["m"].unique())
    if not ms:
        return None
    m_max = ms[-1]
    m_mid = min(ms, key=lambda m: abs(math.log2(m) - 12))
    dtypes = list(dict.fromkeys(d["dtype"]))
    rows = [("var", m_mid), ("var", m_max), ("y", m_max)]
    fig, axes = plt.subplots(len(rows), len(dtypes), figsize=(5.5 * len(dtypes), 3 * len(rows)),
                             squeeze=False)
    labels = list(dict.fromkeys(d["label"]))
    colors = {lab: plt.cm.tab10(i % 10) for i, lab in enumerate(labels)}
    for i, (stat, m) in enumerate(rows):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            p = d[(d["stat"] == stat) & (d["m"] == m) & (d["dtype"] == dt)]
            for lab, g in p.groupby("label", sort=False):
                g = g.sort_values("kappa")
                ax.plot(g["kappa"], _clip(g["rel_err"]), marker="o", label=lab, color=colors[lab],
                        ls="-" if g["backend"].iloc[0] == "study" else "--")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_yscale("log")
            ax.set_title(f"{stat}, {dt}, m = {m_name(int(m))}", fontsize=9)
            ax.set_xlabel("κ = |mean|/std")
            ax.set_ylabel(f"rel_err({stat})")
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return _save(fig, plt, out / "rounding_vs_kappa.png")


def _plot_sampling(plt, out, df):
    syn = df[df["sampling"] == "iid"]
    names = list(dict.fromkeys(df["distribution"]))
    fig, axes = plt.subplots(2, len(names), figsize=(3.6 * len(names), 6.4), squeeze=False)
    for j, name in enumerate(names):
        for i, stat in enumerate(("mean", "var")):
            ax = axes[i][j]
            for sampling, mk in (("iid", "o"), ("images", "s")):
                p = df[(df["distribution"] == name) & (df["stat"] == stat)
                       & (df["sampling"] == sampling)]
                if p.empty:
                    continue
                g = p.groupby("m", as_index=False)[["rel_rmse", "rel_theory"]].mean()
                ax.loglog(g["m"], g["rel_rmse"], mk, ms=4, label=f"measured ({sampling})")
                if sampling == "iid":
                    ax.loglog(g["m"], g["rel_theory"], "k-", lw=1, label="theory (i.i.d.)")
            ax.set_title(f"{name}: {stat}", fontsize=9)
            ax.set_xlabel("m")
            ax.set_ylabel("RMSE / σ" if stat == "mean" else "RMSE / σ²")
            ax.grid(True, alpha=0.3)
    if len(syn):
        axes[0][0].legend(fontsize=7)
    fig.suptitle("Sampling error of batch statistics (channel-averaged for activations)")
    return _save(fig, plt, out / "sampling_vs_m.png")


def _est_label(r) -> str:
    return f"ema {r['momentum']:g}" if r["estimator"] == "ema" else r["estimator"]


def _plot_estimators(plt, out, df):
    name = df["distribution"].iloc[0]
    d = df[df["distribution"] == name]
    d = d.assign(label=[_est_label(r) for r in d[["estimator", "momentum"]]
                        .to_dict(orient="records")])
    ms = sorted(d["m"].unique())
    paths = []
    for what in ("rmse", "bias"):
        fig, axes = plt.subplots(2, len(ms), figsize=(3.6 * len(ms), 6.4), squeeze=False)
        for j, m in enumerate(ms):
            for i, stat in enumerate(("mean", "var")):
                ax = axes[i][j]
                p = d[(d["m"] == m) & (d["stat"] == stat)]
                for k, (lab, g) in enumerate(p.groupby("label", sort=False)):
                    c = plt.cm.tab10(k % 10)
                    sc = g["rmse"] / g["rel_rmse"]
                    if what == "rmse":
                        ax.loglog(g["batches"], g["rel_rmse"], "o-", ms=3, color=c, label=lab)
                        ax.loglog(g["batches"], g["theory_rmse"] / sc, ":", color=c)
                    else:
                        ax.plot(g["batches"], g["rel_bias"], "o-", ms=3, color=c, label=lab)
                        ax.plot(g["batches"], g["theory_bias"] / sc, ":", color=c)
                if what == "bias":
                    ax.set_xscale("log")
                    ax.set_yscale("symlog", linthresh=1e-3)
                ax.set_title(f"{name}, m = {m}: {stat}", fontsize=9)
                ax.set_xlabel("batches seen")
                ax.set_ylabel(f"{what} / " + ("σ" if stat == "mean" else "σ²"))
                ax.grid(True, alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"Population estimators: {what} vs batches (dotted: theory)")
        paths.append(_save(fig, plt, out / f"estimators_{what}_vs_batches.png"))
    return paths


def _plot_gap(plt, out, df):
    d = df[df["inference_stats"] == "population"]
    fig, ax = plt.subplots(figsize=(6, 4.2))
    for k, (name, g) in enumerate(d.groupby("distribution", sort=False)):
        c = plt.cm.tab10(k % 10)
        g = g.sort_values("m")
        ax.loglog(g["m"], g["gap_rms"], "o-", ms=3, color=c, label=name)
        ax.loglog(g["m"], g["theory"], ":", color=c)
    ax.set_xlabel("m")
    ax.set_ylabel("RMS ‖BN_train − BN_infer‖ / ‖BN_infer‖")
    ax.set_title("Train–inference gap (population statistics; dotted: first-order theory)",
                 fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, plt, out / "gap_vs_m.png")
