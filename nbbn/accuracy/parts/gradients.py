"""Part (e), gradients: the rounding error of dx, dγ, dβ against a double-double reference --
the nbbn backends, the emulated pre-fold nbbn backward, PyTorch autograd and Flax ``jax.vjp`` --
in float32 and float64 over κ and m, dy ~ N(0, 1) (the computation:
:mod:`nbbn.accuracy.gradients`)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from ...tolerances import tolerance
from ..common import RunContext, load_peers_once
from ..figures import clip, grid, near, require_pyplot, save, style
from ..report import implementation_sentence, kappa_name, m_name, markdown_table, short

LETTER = "e"
NAME = "gradients"
TITLE = "Rounding error of the gradients"


def run(ctx: RunContext) -> None:
    from ..gradients import QUICK_SIZES, GradientConfig, breakdown, run_gradients
    from ..rounding import usable_backends

    cfg = GradientConfig(sizes=ctx.sizes or (QUICK_SIZES if ctx.quick else
                                             GradientConfig().sizes), seed=ctx.seed)
    backends, sk = usable_backends(part="gradients")
    ctx.skip(sk)
    peers, sk = load_peers_once(ctx, "gradients")
    ctx.skip(sk)
    with ctx.progress("(e) gradients", cfg.n_configs(), "m × κ × dtype") as step:
        df, sk = run_gradients(cfg, step, backends=backends, peers=peers)
    ctx.skip(sk)
    ctx.save("gradients", df)
    ctx.save("gradients_breakdown", breakdown(df))


def findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    """None among the key findings: the per-implementation sentences open this part's section,
    and the practitioner's findings (:mod:`nbbn.accuracy.summary`) read its table."""
    return []


def report(tables: dict[str, pd.DataFrame]) -> list[str]:
    gr = tables.get("gradients")
    if gr is None or not len(gr):
        return []
    from ..gradients import OLD_NBBN

    m0 = int(gr["m"].min())
    ms = sorted(gr["m"].unique())
    m_mid = int(min(ms, key=lambda m: abs(math.log2(m) - 12)))
    m_max = int(gr["m"].max())
    L = ["x = κ + z and dy, z and dy ~ N(0, 1) (one draw per m; float32 data are the float64 "
         "values rounded once), γ = 1, β = 0. Reference: the exact gradient with the exact "
         "batch statistics, dx = γ·invstd·(dy − dβ/m − x̂·dγ/m), dβ = Σdy, dγ = Σdy·x̂, in "
         "double-double. `tol_err` is the error as `nbbn.tolerances` measures it: dx relative "
         "to max(‖dx‖, ‖γ·invstd·dy‖) (dx nearly vanishes at small m), dγ and dβ relative to "
         "their own value; `rel_err` (relative to ‖out‖ alone) and `rel_err_scale` (relative "
         "to ‖γ·invstd·dy‖, Σ|dy·x̂|, Σ|dy|) are in `gradients.csv`. "
         f"`{OLD_NBBN}` is backward in float64 from save_mean and save_invstd rounded to x's "
         "dtype, x̂ = (x − save_mean)·save_invstd — what nbbn's kernels computed before the "
         "fold; the `cpu`/`cuda` rows are the kernels of this run. Tolerance: 1e-4 float32, "
         "1e-10 float64.", ""]
    for dt in ("float32", "float64"):
        for out, m in (("dx", m0), ("dx", m_mid), ("dgamma", m_mid), ("dx", m_max),
                       ("dgamma", m_max), ("dbeta", m_max)):
            s = gr[(gr["dtype"] == dt) & (gr["output"] == out) & (gr["m"] == m)]
            if s.empty:
                continue
            p = s.pivot_table(index="impl", columns="kappa", values="tol_err",
                              aggfunc="first", sort=False)
            p.columns = [f"κ={kappa_name(k)}" for k in p.columns]
            L += [f"### tol_err({out}), {dt}, m = {m_name(m)}", "", markdown_table(p), ""]
        s = gr[gr["dtype"] == dt]
        first = {}
        for (impl, out, k), g in s.groupby(["impl", "output", "kappa"], sort=False):
            bad = g[~(g["tol_err"] <= g["tolerance"])]
            first[(f"{impl}: {out}", k)] = m_name(int(bad["m"].min())) if len(bad) else "never"
        q = pd.Series(first).unstack()
        q.columns = [f"κ={kappa_name(k)}" for k in q.columns]
        L += [f"### First m where tol_err exceeds the tolerance, {dt}", "", markdown_table(q),
              ""]
    per = gradient_findings(gr)
    L[2:2] = ["### Per implementation", ""] + [f"- {t}" for t in per] + [""]
    return L


def plots(tables: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """``gradients_vs_kappa.png``: dx (at the smallest m and m ≈ 4096) and dγ vs κ;
    ``gradients_vs_m.png``: dx, dγ, dβ vs m at the largest κ."""
    gr = tables.get("gradients")
    if gr is None or not len(gr):
        return []
    plt = require_pyplot()
    d = gr.assign(label=gr["impl"])
    d = d[d["kappa"] >= 0]
    ms = sorted(d["m"].unique())
    m0, m_mid = int(ms[0]), near(ms, 12)
    tols = {(o, dt): tolerance(o, dt) for o in ("dx", "dgamma", "dbeta")
            for dt in ("float32", "float64")}
    paths = [grid(plt, d, [("output", "dx", m0), ("output", "dx", m_mid),
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
                ax.loglog(g["m"], clip(g["tol_err"]), label=lab, color=colors[lab],
                          **style(g["family"].iloc[0]))
            ax.axhline(tols[(o, dt)], color="k", lw=0.8, ls="-.")
            ax.set_title(f"{o}, {dt}, κ = {kappa_name(kmax)}", fontsize=9)
            ax.set_xlabel("m")
            ax.set_ylabel(f"tol_err({o})")
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7, loc="upper left")
    fig.suptitle("Gradients: error vs m at the largest κ (dash-dot: tolerance)", fontsize=10)
    paths.append(save(fig, plt, out / "gradients_vs_m.png"))
    return [p for p in paths if p is not None]


def gradient_findings(gr: pd.DataFrame) -> list[str]:
    from ..gradients import OLD_NBBN, OUTPUTS

    out = []
    f32 = gr[gr["dtype"] == "float32"]
    m0 = int(gr["m"].min())
    big = [k for k in sorted(gr["kappa"].unique()) if abs(k) >= 1e3]
    old = f32[(f32["impl"] == OLD_NBBN) & (f32["m"] == m0) & (f32["output"] == "dx")]
    if len(old) and big:
        rows = []
        for impl, g in f32[(f32["m"] == m0) & (f32["output"] == "dx")].groupby("impl",
                                                                              sort=False):
            vals = ", ".join(f"{short(g[g['kappa'] == k]['tol_err'].max())} at κ = "
                             f"{kappa_name(abs(k))}" for k in big if (g["kappa"] == k).any())
            rows.append(f"{impl} {vals}")
        cpu = f32[(f32["impl"] == "cpu NC") & (f32["m"] == m0) & (f32["output"] == "dx")]
        verdict = ""
        if len(cpu):
            o = old[old["kappa"].isin(big)]["tol_err"].max()
            c = cpu[cpu["kappa"].isin(big)]["tol_err"].max()
            verdict = (" The nbbn kernels in this run fold the residual: their dx is "
                       f"{short(o / c) if c > 0 else 'far'} times closer than the emulated old "
                       "backward." if c < o / 10 else
                       " The nbbn kernels in this run still compute x̂ from the rounded "
                       "save_mean (they match the emulation): the fold has not landed in "
                       "them yet.")
        out.append(f"**dx at m = {m0}, float32, |mean|/std ≥ 1e3** (error relative to "
                   "‖γ·invstd·dy‖, as nbbn.tolerances measures it; tolerance 1e-4): "
                   + "; ".join(rows) + ". `save_mean` is returned in float32, off by up to "
                   "half an ulp of |μ|; a backward that forms x̂ = (x − save_mean)·invstd "
                   "inherits that error." + verdict)
    for impl, g in gr.groupby("impl", sort=False):
        texts = []
        for dt in ("float32", "float64"):
            gd = g[g["dtype"] == dt]
            if len(gd):
                texts.append(f"{dt}: " + implementation_sentence(
                    gd, OUTPUTS, lambda o, dt=dt: tolerance(o, dt), col="tol_err",
                    stat_col="output"))
        out.append(f"**{impl}** gradients: " + ". ".join(texts) + ".")
    return out
