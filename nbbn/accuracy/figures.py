"""What the parts' figures share (drawn after the command found matplotlib usable): clipping to a
log axis, saving, and the grid of error-vs-κ panels, one line per implementation, that parts
(a) and (e) draw of the peers and nbbn."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..output import pyplot, save_figure
from .report import m_name

FLOOR, CEIL = 1e-18, 1e8


def require_pyplot():
    plt, why = pyplot()
    if plt is None:
        raise ImportError(why)
    return plt


def clip(v):
    v = np.asarray(v, dtype=float)
    return np.clip(np.where(np.isnan(v), CEIL, v), FLOOR, CEIL)


def save(fig, plt, path: Path) -> Path:
    """``path`` written by :func:`nbbn.output.save_figure`."""
    return save_figure(fig, path)


def style(family: str) -> dict:
    return {"nbbn": dict(ls="-", lw=2.2, marker="o"), "emulation": dict(ls=":", marker="x"),
            }.get(family, dict(ls="--", marker="s", ms=4))


def near(ms, target_log2: float) -> int:
    return int(min(ms, key=lambda m: abs(math.log2(m) - target_log2)))


def grid(plt, d: pd.DataFrame, panels, value: str, ylabel, title: str, path: Path,
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
                ax.plot(g["kappa"], clip(g[value]), label=lab, color=colors[lab],
                        **style(g["family"].iloc[0]))
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
    fig.suptitle(title + f" (clipped to [{FLOOR:g}, {CEIL:g}]; NaN at the top)", fontsize=10)
    return save(fig, plt, path)
