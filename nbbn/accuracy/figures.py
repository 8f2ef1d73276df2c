"""Figures of the peers (part a) and of the gradients (part e): error vs κ per implementation.
Called after :func:`nbbn.accuracy.report.write_plots` found matplotlib usable."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..output import pyplot, save_figure
from .report import (
    _plot_estimators,
    _plot_gap,
    _plot_rounding_vs_kappa,
    _plot_rounding_vs_m,
    _plot_sampling,
    kappa_name,
    m_name,
    with_label,
)

_FLOOR, _CEIL = 1e-18, 1e8


def _plt():
    plt, why = pyplot()
    if plt is None:
        raise ImportError(why)
    return plt


def _clip(v):
    v = np.asarray(v, dtype=float)
    return np.clip(np.where(np.isnan(v), _CEIL, v), _FLOOR, _CEIL)


def _finish(fig, plt, path: Path) -> Path:
    return save_figure(fig, path)


def _style(family: str) -> dict:
    return {"nbbn": dict(ls="-", lw=2.2, marker="o"), "emulation": dict(ls=":", marker="x"),
            }.get(family, dict(ls="--", marker="s", ms=4))


def _near(ms, target_log2: float) -> int:
    return int(min(ms, key=lambda m: abs(math.log2(m) - target_log2)))


def _grid(plt, d: pd.DataFrame, panels, value: str, ylabel, title: str, path: Path,
          tols: dict | None = None) -> Path | None:
    """One row of panels per (what, m), one column per dtype; a line per implementation."""
    dtypes = [dt for dt in ("float32", "float64") if (d["dtype"] == dt).any()]
    if not dtypes or not panels:
        return None
    fig, axes = plt.subplots(len(panels), len(dtypes), figsize=(6 * len(dtypes),
                             3.1 * len(panels)), squeeze=False)
    labels = list(dict.fromkeys(d["label"]))
    colors = {lab: plt.cm.tab20(i % 20) for i, lab in enumerate(labels)}
    for i, (col, what, m) in enumerate(panels):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            p = d[(d[col] == what) & (d["m"] == m) & (d["dtype"] == dt)]
            for lab, g in p.groupby("label", sort=False):
                g = g.sort_values("kappa")
                ax.plot(g["kappa"], _clip(g[value]), label=lab, color=colors[lab],
                        **_style(g["family"].iloc[0]))
            if tols:
                ax.axhline(tols[(what, dt)], color="k", lw=0.8, ls="-.")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_xlim(0, max(1.0, float(d["kappa"].max())) * 1.6)
            ax.set_yscale("log")
            ax.set_title(f"{what}, {dt}, m = {m_name(m)}", fontsize=9)
            ax.set_xlabel("κ = |mean|/std")
            ax.set_ylabel(ylabel(what))
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle(title + f" (clipped to [{_FLOOR:g}, {_CEIL:g}]; NaN at the top)", fontsize=10)
    return _finish(fig, plt, path)


def rounding_plots(out: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """``peers_vs_kappa.png``: var, invstd and y of every peer and nbbn backend vs κ."""
    rnd = tables.get("rounding")
    if rnd is None or not len(rnd) or not (rnd["algorithm"] == "peer").any():
        return []
    from ..tolerances import tolerance

    d = with_label(rnd[rnd["algorithm"].isin(["peer", "nbbn"])])
    d = d.assign(family=np.where(d["algorithm"] == "nbbn", "nbbn", "peer"))
    ms = sorted(d["m"].unique())
    m_mid, m_max = _near(ms, 12), int(ms[-1])
    panels = [("stat", "var", m_mid), ("stat", "y", m_mid), ("stat", "var", m_max),
              ("stat", "y", m_max)]
    names = {"var": "var", "y": "y", "invstd": "save_invstd"}
    tols = {(s, dt): tolerance(names[s], dt) for s in names for dt in ("float32", "float64")}
    path = _grid(_plt(), d, panels, "rel_err", lambda s: f"rel_err({s})",
                 "Peers and nbbn: rounding error vs κ (dash-dot: nbbn's tolerance)",
                 out / "peers_vs_kappa.png", tols)
    return [path] if path else []


def gradient_plots(out: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """``gradients_vs_kappa.png``: dx (at the smallest m and m ≈ 4096) and dγ vs κ;
    ``gradients_vs_m.png``: dx, dγ, dβ vs m at the largest κ."""
    gr = tables.get("gradients")
    if gr is None or not len(gr):
        return []
    from ..tolerances import tolerance

    plt = _plt()
    d = gr.assign(label=gr["impl"])
    d = d[d["kappa"] >= 0]
    ms = sorted(d["m"].unique())
    m0, m_mid = int(ms[0]), _near(ms, 12)
    tols = {(o, dt): tolerance(o, dt) for o in ("dx", "dgamma", "dbeta")
            for dt in ("float32", "float64")}
    paths = [_grid(plt, d, [("output", "dx", m0), ("output", "dx", m_mid),
                            ("output", "dgamma", m_mid)], "tol_err",
                   lambda o: f"tol_err({o})",
                   "Gradients: error vs κ, as nbbn.tolerances measures it (dash-dot: tolerance)",
                   out / "gradients_vs_kappa.png", tols)]
    kmax = float(d["kappa"].max())
    dtypes = [dt for dt in ("float32", "float64") if (d["dtype"] == dt).any()]
    fig, axes = plt.subplots(3, len(dtypes), figsize=(6 * len(dtypes), 9), squeeze=False)
    labels = list(dict.fromkeys(d["label"]))
    colors = {lab: plt.cm.tab20(i % 20) for i, lab in enumerate(labels)}
    for i, o in enumerate(("dx", "dgamma", "dbeta")):
        for j, dt in enumerate(dtypes):
            ax = axes[i][j]
            p = d[(d["output"] == o) & (d["dtype"] == dt) & (d["kappa"] == kmax)]
            for lab, g in p.groupby("label", sort=False):
                g = g.sort_values("m")
                ax.loglog(g["m"], _clip(g["tol_err"]), label=lab, color=colors[lab],
                          **_style(g["family"].iloc[0]))
            ax.axhline(tols[(o, dt)], color="k", lw=0.8, ls="-.")
            ax.set_title(f"{o}, {dt}, κ = {kappa_name(kmax)}", fontsize=9)
            ax.set_xlabel("m")
            ax.set_ylabel(f"tol_err({o})")
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Gradients: error vs m at the largest κ (dash-dot: tolerance)", fontsize=10)
    paths.append(_finish(fig, plt, out / "gradients_vs_m.png"))
    return [p for p in paths if p is not None]


# Each part's figures (its ``Part.plots``); the command checks once that matplotlib is usable.


def rounding_figures(out: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Part (a): rounding error vs m (var, mean, y), vs κ, and the peers' panel."""
    rnd = tables.get("rounding")
    if rnd is None or not len(rnd):
        return []
    plt, _ = pyplot()
    paths = [_plot_rounding_vs_m(plt, out, rnd, stat) for stat in ("var", "mean_in_sd", "y")]
    paths.append(_plot_rounding_vs_kappa(plt, out, rnd))
    return [p for p in paths if p is not None] + rounding_plots(out, tables)


def sampling_figures(out: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Part (b): RMSE of the batch statistics vs m beside theory."""
    smp = tables.get("sampling")
    if smp is None or not len(smp):
        return []
    plt, _ = pyplot()
    return [p for p in [_plot_sampling(plt, out, smp)] if p is not None]


def estimator_figures(out: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """Part (c): the population estimators' bias and RMSE, and the train–inference gap."""
    plt, _ = pyplot()
    paths = []
    est = tables.get("estimators")
    if est is not None and len(est):
        paths += _plot_estimators(plt, out, est)
    gap = tables.get("gap")
    if gap is not None and len(gap):
        paths.append(_plot_gap(plt, out, gap))
    return [p for p in paths if p is not None]
