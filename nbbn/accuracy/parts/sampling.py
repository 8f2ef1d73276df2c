"""Part (b), sampling: the RMSE of the batch mean and variance against the population, beside
the i.i.d. theory, for synthetic populations and real activations (the computation:
:mod:`nbbn.accuracy.sampling`)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..common import RunContext
from ..figures import require_pyplot, save
from ..report import markdown_table, short

LETTER = "b"
NAME = "sampling"
TITLE = "Sampling error of batch statistics"


def run(ctx: RunContext) -> None:
    from ..sampling import QUICK_BATCHES, QUICK_SIZES, SamplingConfig, run_sampling

    cfg = SamplingConfig(distributions=ctx.distributions, activations=ctx.activations,
                         seed=ctx.seed)
    if ctx.quick:
        cfg.sizes, cfg.batches = list(QUICK_SIZES), QUICK_BATCHES
    if ctx.sizes:
        cfg.sizes = ctx.sizes
    todo, _ = cfg.plan()
    with ctx.progress("(b) sampling", len(todo), "population × m") as step:
        df, sk = run_sampling(cfg, step)
    ctx.skip(sk)
    ctx.save("sampling", df)


def findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    smp = tables.get("sampling")
    if smp is None or not len(smp):
        return []
    return sampling_findings(smp)


def report(tables: dict[str, pd.DataFrame]) -> list[str]:
    smp = tables.get("sampling")
    if smp is None or not len(smp):
        return []
    iid = smp[(smp["sampling"] == "iid")]
    L = ["RMSE over B batches against the population, beside the i.i.d. theory: σ/√m for "
         "the mean; for the biased variance RMSE² = σ⁴/m² + ((m−1)/m)²·(μ4 − σ⁴(m−3)/(m−1))/m."
         " For NCHW m = N·H·W, and for i.i.d. values only m matters, not how it splits into "
         "N and H·W; real activations (`--activations`, 3-D/4-D) are also sampled as whole "
         "images to show what spatial correlation does. `rmse_rel_se` in the CSV is the "
         "standard error of each RMSE (≈ 1/√(2B) for normal errors).", ""]
    for stat in ("mean", "var"):
        p = iid[iid["stat"] == stat].pivot_table(index="m", columns="distribution",
                                                 values="ratio", aggfunc="mean", sort=False)
        L += [f"### RMSE / theory, batch {stat} (activations: mean over channels)", "",
              markdown_table(p, ".3f"), ""]
    img = smp[smp["sampling"] == "images"]
    if len(img):
        p = img.pivot_table(index="m", columns="stat", values="ratio", aggfunc="median")
        L += ["### Activations sampled as whole images: RMSE / i.i.d. theory (median over "
              "channels)", "", markdown_table(p, ".3f"), ""]
    return L


def plots(tables: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """RMSE of the batch statistics vs m beside theory."""
    smp = tables.get("sampling")
    if smp is None or not len(smp):
        return []
    return [p for p in [_plot_sampling(require_pyplot(), out, smp)] if p is not None]


def sampling_findings(smp: pd.DataFrame) -> list[str]:
    out = []
    iid = smp[smp["sampling"] == "iid"]
    for stat, th in (("mean", "σ/√m"), ("var", "√(bias² + Var)")):
        parts = []
        for name, g in iid[iid["stat"] == stat].groupby("distribution", sort=False):
            parts.append(f"{name} {g['ratio'].min():.2f}–{g['ratio'].max():.2f}")
        out.append(f"**Sampling RMSE of the batch {stat} / theory {th}**: " + ", ".join(parts)
                   + f" (over m = {int(iid['m'].min())} … {int(iid['m'].max())}; "
                   f"{int(iid['batches'].min())}–{int(iid['batches'].max())} batches each).")
    heavy = iid[(iid["stat"] == "var") & (iid["pop_kurtosis"] > 5)]
    if len(heavy):
        out.append("For heavy-tailed populations (Student-t 5, log-normal) the variance's RMSE "
                   "estimate is itself unreliable (t5 has no finite 8th moment): a few extreme "
                   "batches dominate the theory, and most finite samples fall below it.")
    img = smp[smp["sampling"] == "images"]
    if len(img):
        v = img.merge(iid[["distribution", "channel", "m", "stat", "rmse"]],
                      on=["distribution", "channel", "m", "stat"], suffixes=("", "_iid"))
        if len(v):
            deff = (v["rmse"] / v["rmse_iid"]) ** 2
            v = v.assign(deff=deff)
            med = v[v["stat"] == "mean"].groupby("m")["deff"].median()
            out.append("**Activations, whole images vs i.i.d. values** (same m): median design "
                       "effect (RMSE ratio²) of the mean " + ", ".join(
                           f"{short(x)} at m = {m}" for m, x in med.items())
                       + " — the effective m is m divided by this.")
    return out


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
    return save(fig, plt, out / "sampling_vs_m.png")
