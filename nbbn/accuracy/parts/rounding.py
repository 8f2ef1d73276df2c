"""Part (a), rounding: the error of the batch mean, var, invstd and y against a double-double
reference -- the textbook float algorithms, every nbbn backend and the peers -- in float32 and
float64 over κ = |mean|/std and m (the computation: :mod:`nbbn.accuracy.rounding`)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from ...tolerances import tolerance
from ..common import RunContext, load_peers_once
from ..figures import CEIL, FLOOR, clip, grid, near, require_pyplot, save
from ..report import (
    TOL_NAME,
    half_ulp32,
    implementation_sentence,
    kappa_name,
    m_name,
    markdown_table,
    short,
    with_label,
)

LETTER = "a"
NAME = "rounding"
TITLE = "Rounding error of the statistics"


def run(ctx: RunContext) -> None:
    from ..rounding import (
        PEER_MAX_M,
        QUICK_SIZES,
        RoundingConfig,
        crossover,
        run_rounding,
        usable_backends,
    )

    cfg = RoundingConfig(sizes=ctx.sizes or (QUICK_SIZES if ctx.quick else
                                             RoundingConfig().sizes), seed=ctx.seed,
                         peer_max_m=None if ctx.sizes else PEER_MAX_M,
                         half_backends=not ctx.quick)
    backends, sk = usable_backends()
    ctx.skip(sk)
    ctx.echo("(a) statistics backends: " + (", ".join(b.name for b in backends) or "none")
             + "".join(f"; skipped {s['item']}: {s['reason']}" for s in sk))
    peers, sk = load_peers_once(ctx, "rounding")
    ctx.skip(sk)
    with ctx.progress("(a) rounding", cfg.n_configs(), "m × κ × dtype") as step:
        df, sk = run_rounding(cfg, step, backends=backends, peers=peers)
    ctx.skip(sk)
    ctx.save("rounding", df)
    ctx.save("rounding_crossover", crossover(df))


def findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    rnd = tables.get("rounding")
    if rnd is None or not len(rnd):
        return []
    return rounding_findings(rnd, tables.get("rounding_crossover"))


def report(tables: dict[str, pd.DataFrame]) -> list[str]:
    rnd, cross = tables.get("rounding"), tables.get("rounding_crossover")
    if rnd is None or not len(rnd):
        return []
    from ..rounding import NEGLIGIBLE

    m_max = int(rnd["m"].max())
    ms = sorted(rnd["m"].unique())
    m_mid = int(min(ms, key=lambda m: abs(math.log2(m) - 10)))
    L = ["Data x = κ + z, z ~ N(0, 1), one draw per m shared by every κ and dtype; float32 "
         "data are those values rounded once. The study's algorithms (`naive`, `two-pass`, "
         "`two-pass-corrected`, `welford`, `welford-fcount`, `chan`) accumulate "
         "sequentially in the data's dtype; "
         "`<backend> <layout>` rows are the nbbn kernels (statistics from the backend's "
         "registered statistics function, invstd and y from its forward-train kernel, on x "
         "viewed as NC (m, 1) and NCHW (N, 1, 1, S)) and the peers (`torch-cpu`, "
         "`flax-fast-var`, `flax-two-pass`, `numpy`, and on a GPU `torch-cuda`, `cupy`; "
         "`nbbn/accuracy/peers.py` says how each is called; NumPy's NC and NCHW rows hold x in "
         "both of 2 channels so that the reduction axis is strided, as in real data). "
         "Reference: double-double (≈106-bit) sums, deviations and squares of the same data, "
         "checked against exact rational arithmetic in the tests. ε = 1e-5. `mean_in_sd` is "
         "|μ̂ − μ|/σ. inf = NaN result.", ""]
    per = peer_findings(rnd)
    if per:
        L += ["### Per implementation", ""] + [f"- {t}" for t in per] + [""]
    L += _peer_tables(rnd)
    for dt in ("float32", "float64"):
        for stat in ("var", "y"):
            for m in (m_mid, m_max):
                L += [f"### rel_err({stat}), {dt}, m = {m_name(m)}", "",
                      _pivot_rounding(rnd, stat, dt, m), ""]
    if cross is not None and len(cross):
        L += [f"### First m where rounding is no longer negligible (> {NEGLIGIBLE:g} × "
              "sampling RMSE of normal data), float32", ""]
        for stat in ("var", "mean_in_sd", "y"):
            L += [f"{stat}:", "", _pivot_cross(cross, "float32", stat), ""]
        L += ["float64, var:", "", _pivot_cross(cross, "float64", "var"), ""]
    return L


def plots(tables: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """Rounding error vs m (var, mean, y), vs κ, and the peers' panel."""
    rnd = tables.get("rounding")
    if rnd is None or not len(rnd):
        return []
    plt = require_pyplot()
    paths = [_plot_rounding_vs_m(plt, out, rnd, stat) for stat in ("var", "mean_in_sd", "y")]
    paths.append(_plot_rounding_vs_kappa(plt, out, rnd))
    return [p for p in paths if p is not None] + _peers_vs_kappa(out, tables)


# -------------------------------------------------------------------------------- findings


def rounding_findings(rnd: pd.DataFrame, cross: pd.DataFrame) -> list[str]:
    from ..rounding import NEGLIGIBLE

    out = []
    d = with_label(rnd)
    var = d[d["stat"] == "var"]
    m_max = int(d["m"].max())
    kmax = float(d["kappa"].max())

    def sel(lab, dt, kappa=None, stat="var"):
        s = d[(d["label"] == lab) & (d["dtype"] == dt) & (d["stat"] == stat)]
        return s if kappa is None else s[s["kappa"] == kappa]

    s = sel("naive", "float32", kmax)
    if len(s):
        out.append(f"**naive E[x²] − E[x]² in float32 at κ = {kappa_name(kmax)}**: variance "
                   f"rel_err {short(s['rel_err'].min())} to {short(s['rel_err'].max())} over m = "
                   f"{m_name(int(s['m'].min()))} … {m_name(int(s['m'].max()))}: useless at any "
                   "batch size. In float64 it still loses ≈ κ²·u: worst "
                   f"{short(sel('naive', 'float64', kmax)['rel_err'].max())}.")
    s = sel("two-pass", "float32")
    if len(s):
        big = s[s["m"] == m_max]
        small = s[s["m"] <= 1024]
        out.append(f"**two-pass with sequential float32 sums**: variance rel_err ≤ "
                   f"{short(small['rel_err'].max())} for m ≤ 1024 at every κ, but at m = "
                   f"{m_name(m_max)} it reaches {short(big[big['kappa'] == 0]['rel_err'].max())} "
                   f"(κ = 0) and {short(big['rel_err'].max())} (worst κ): a float32 running sum "
                   "stops growing once it is 2^24 times its terms, and at large κ the sum "
                   "of x itself rounds away the mean.")
    s = sel("two-pass-corrected", "float32")
    if len(s):
        out.append(f"**corrected two-pass** (σ² = (Σd² − (Σd)²/m)/m) in float32: variance "
                   f"rel_err ≤ {short(s[s['m'] <= 2**16]['rel_err'].max())} for m ≤ 2^16 at "
                   "every κ "
                   f"(worst {short(s['rel_err'].max())} at larger m), but its mean — hence y — "
                   "carries the same float32-sum error as plain two-pass (see `mean_in_sd`, "
                   "`y`).")
    s = sel("welford", "float32")
    if len(s):
        by_k = s.groupby("kappa")["rel_err"].median()
        out.append("**Welford with a float32 running mean**: median variance rel_err "
                   + ", ".join(f"{short(v)} at κ = {kappa_name(k)}" for k, v in by_k.items())
                   + ": its error grows like κ·u (the running mean is stored to float32 "
                   "precision, about κ·6e-8 of σ), so it is *not* within 1e-5 at κ = 1e4 even for "
                   "small m. Two-pass error grows only like κ²·u² there.")
    s = sel("welford-fcount", "float32")
    if len(s) and m_max > 2**24:
        out.append(f"**Welford with a float32 count**: n + 1 == n from n = 2^24, so at m = "
                   f"{m_name(m_max)} the variance is off by "
                   f"{short(s[s['m'] == m_max]['rel_err'].median())} (median over κ).")
    s = sel("chan", "float32")
    if len(s):
        out.append(f"**chan (256 chunks × Welford, merged pairwise)** in float32: worst variance "
                   f"rel_err {short(s['rel_err'].max())} over every κ and m: the tree merge keeps "
                   "sums short, but at κ = 1e4 the per-chunk float32 means still cost ≈ κ·u.")
    for lab in d.loc[d["algorithm"] == "nbbn", "label"].unique():
        parts = []
        for dt in ("float32", "float64"):
            v = var[(var["label"] == lab) & (var["dtype"] == dt)]
            y = d[(d["label"] == lab) & (d["dtype"] == dt) & (d["stat"] == "y")]
            if len(v):
                parts.append(f"{dt}: var ≤ {short(v['rel_err'].max())}, y ≤ "
                             f"{short(y['rel_err'].max()) if len(y) else 'n/a'}")
        out.append(f"**nbbn {lab}** (its registered statistics and forward-train kernel), worst "
                   "over every κ and m: " + "; ".join(parts) + ".")
    if cross is not None and len(cross):
        c = with_label(cross[(cross["stat"] == "var") & (cross["dtype"] == "float32")
                             & (cross["algorithm"] != "peer")])
        kmax_c = float(c["kappa"].max()) if len(c) else math.nan

        def first(cc) -> str:
            f = cc["first_m_not_negligible"]
            return f"never (to {m_name(m_max)})" if f.isna().all() else m_name(int(f.min()))

        items = [f"{lab}: {first(cc[cc['kappa'] <= 1])} at κ ≤ 1, "
                 f"{first(cc[cc['kappa'] == kmax_c])} at κ = {kappa_name(kmax_c)}"
                 for lab, cc in c.groupby("label", sort=False)]
        out.append(f"**Rounding vs sampling** (float32 variance; negligible = below {NEGLIGIBLE:g} "
                   "of the sampling RMSE √(2m − 1)/m of normal data, a theory part (b) confirms): "
                   "the first m where rounding is no longer negligible — " + "; ".join(items)
                   + ". Below those m the batch's sampling error dominates and the float32 "
                   "algorithm does not matter; the table below gives every κ and also the mean "
                   "and y (peers included).")
    return out


#: why each implementation behaves as it does (from its source; see nbbn/accuracy/peers.py)
MECHANISM = {
    "torch-cpu NC": "ATen's CPU kernel sends every (N, C) input down its channels-last path, "
                    "where each thread adds its rows into a per-thread buffer in the input's "
                    "dtype (a float32 running sum of m/threads values), merged in double only "
                    "at the end",
    "torch-cpu NCHW": "sums each channel sequentially in double, but rounds the mean to float32 "
                      "before the variance pass and forms y = x·α + β' (β' = β − mean·α) in "
                      "float32, where x·α and β' cancel when |mean| ≫ std",
    "torch-cuda NC": "PyTorch on the GPU (cuDNN or ATen's CUDA kernel)",
    "torch-cuda NCHW": "PyTorch on the GPU (cuDNN or ATen's CUDA kernel)",
    "flax-fast-var NC": "Flax's default use_fast_variance=True computes max(0, E[x²] − E[x]²) in "
                        "float32: the two terms agree to about κ²·u and the difference is "
                        "rounding noise, clamped at 0 (invstd = 1/√ε) when it goes negative",
    "flax-two-pass NC": "use_fast_variance=False: XLA's float32 reductions are tree-shaped and "
                        "accurate, but y = (x − mean)·rsqrt(var + ε) uses the float32 mean",
    "numpy 1-D": "np.mean/np.var sum a contiguous axis pairwise (error ~ u·log m), but y uses "
                 "the float32 mean",
    "numpy NC": "x.mean(axis=0) on an (N, C) array reduces along a strided axis: a plain "
                "sequential float32 sum per channel",
    "numpy NCHW": "x.mean(axis=(0, 2, 3)) is pairwise within each H·W row but adds the rows "
                  "sequentially in float32",
    "cupy 1-D": "CuPy's float32 reductions on the GPU",
}


def peer_findings(rnd: pd.DataFrame) -> list[str]:
    """One paragraph per peer and nbbn backend: where it leaves nbbn's tolerance, how far."""
    d = with_label(rnd[rnd["algorithm"].isin(["peer", "nbbn"])])
    if d.empty:
        return []
    out = []
    peers = d[d["algorithm"] == "peer"]
    if len(peers):
        out.append("'leaves' = first exceeds nbbn's own tolerance (1e-5 in float32, 1e-10 in "
                   "float64) at some m of the grid; κ ascending, then m.")
    for lab, g in d.groupby("label", sort=False):
        texts = []
        for dt in ("float32", "float64"):
            gd = g[g["dtype"] == dt]
            if len(gd):
                texts.append(f"{dt}: " + implementation_sentence(
                    gd, ("var", "invstd", "y"),
                    lambda st, dt=dt: tolerance(TOL_NAME[st], dt)))
        why = MECHANISM.get(lab)
        kind = "nbbn" if g["algorithm"].iloc[0] == "nbbn" else "peer"
        head = f"**{lab}**" + (" (nbbn)" if kind == "nbbn" else "")
        out.append(f"{head}: " + ". ".join(texts) + "." + (f" Why: {why}." if why else ""))
    f32 = d[(d["dtype"] == "float32") & (d["algorithm"] == "peer") & (d["stat"] == "y")]
    if len(f32) and f32["kappa"].max() >= 1e3:
        k = f32["kappa"].max()
        med = f32[f32["kappa"] == k].groupby("label")["rel_err"].median()
        out.append(f"**Any float32 mean costs y up to half an ulp of |μ| over σ**: median y "
                   f"rel_err at κ = {kappa_name(k)} — "
                   + ", ".join(f"{lab} {short(v)}" for lab, v in med.items())
                   + f" (½·ulp({kappa_name(k)})/σ = {half_ulp32(k):.2g}). nbbn normalizes "
                   "with its float64 mean (CPU) or a two-float mean (CUDA) and keeps y near "
                   "float32's own rounding.")
    return out


# -------------------------------------------------------------------------------- tables


def _peer_tables(rnd: pd.DataFrame) -> list[str]:
    d = with_label(rnd[rnd["algorithm"].isin(["peer", "nbbn"])])
    if d.empty or not (d["algorithm"] == "peer").any():
        return []
    L = ["### Peers beside nbbn", "",
         "Worst rel_err over every m of the grid, per κ (first table per dtype), and the first "
         "m where the error exceeds nbbn's tolerance (1e-5 float32, 1e-10 float64; `never` = "
         "not within the grid).", ""]
    for dt in ("float32", "float64"):
        for stat in ("var", "invstd", "y"):
            s = d[(d["dtype"] == dt) & (d["stat"] == stat)]
            if s.empty:
                continue
            p = s.pivot_table(index="label", columns="kappa", values="rel_err",
                              aggfunc="max", sort=False)
            p.columns = [f"κ={kappa_name(k)}" for k in p.columns]
            tol = tolerance(TOL_NAME[stat], dt)
            first = {}
            for (lab, k), g in s.groupby(["label", "kappa"], sort=False):
                bad = g[~(g["rel_err"] <= tol)]
                first[(lab, k)] = m_name(int(bad["m"].min())) if len(bad) else "never"
            q = pd.Series(first).unstack()
            q = q.reindex(index=p.index)
            q.columns = [f"κ={kappa_name(k)}" for k in q.columns]
            L += [f"#### {stat}, {dt}: worst rel_err over m", "", markdown_table(p), "",
                  f"#### {stat}, {dt}: first m over {tol:g}", "", markdown_table(q), ""]
    return L


def _pivot_rounding(rnd: pd.DataFrame, stat: str, dtype: str, m: int) -> str:
    d = with_label(rnd[(rnd["stat"] == stat) & (rnd["dtype"] == dtype) & (rnd["m"] == m)])
    if d.empty:
        return "(no rows)"
    p = d.pivot_table(index="label", columns="kappa", values="rel_err", aggfunc="first",
                      sort=False)
    p.columns = [f"κ={kappa_name(k)}" for k in p.columns]
    return markdown_table(p)


def _pivot_cross(cross: pd.DataFrame, dtype: str, stat: str) -> str:
    c = with_label(cross[(cross["stat"] == stat) & (cross["dtype"] == dtype)])
    if c.empty:
        return "(no rows)"
    c = c.assign(cell=[("never" if pd.isna(f) else m_name(int(f)))
                       for f in c["first_m_not_negligible"]])
    p = c.pivot_table(index="label", columns="kappa", values="cell", aggfunc="first", sort=False)
    p.columns = [f"κ={kappa_name(k)}" for k in p.columns]
    return markdown_table(p)


# -------------------------------------------------------------------------------- figures


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
                ax.loglog(g["m"], clip(g["rel_err"]), marker=".", label=lab, color=colors[lab],
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
    fig.suptitle(f"Rounding error of {stat} vs m (clipped to [{FLOOR:g}, {CEIL:g}])")
    return save(fig, plt, out / f"rounding_vs_m_{stat}.png")


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
                ax.plot(g["kappa"], clip(g["rel_err"]), marker="o", label=lab, color=colors[lab],
                        ls="-" if g["backend"].iloc[0] == "study" else "--")
            ax.set_xscale("symlog", linthresh=1)
            ax.set_yscale("log")
            ax.set_title(f"{stat}, {dt}, m = {m_name(int(m))}", fontsize=9)
            ax.set_xlabel("κ = |mean|/std")
            ax.set_ylabel(f"rel_err({stat})")
            ax.grid(True, alpha=0.3)
    axes[0][-1].legend(fontsize=7)
    return save(fig, plt, out / "rounding_vs_kappa.png")


def _peers_vs_kappa(out: Path, tables: dict[str, pd.DataFrame]) -> list[Path]:
    """``peers_vs_kappa.png``: var, invstd and y of every peer and nbbn backend vs κ."""
    rnd = tables.get("rounding")
    if rnd is None or not len(rnd) or not (rnd["algorithm"] == "peer").any():
        return []
    d = with_label(rnd[rnd["algorithm"].isin(["peer", "nbbn"])])
    d = d.assign(family=np.where(d["algorithm"] == "nbbn", "nbbn", "peer"))
    ms = sorted(d["m"].unique())
    m_mid, m_max = near(ms, 12), int(ms[-1])
    panels = [("stat", "var", m_mid), ("stat", "y", m_mid), ("stat", "var", m_max),
              ("stat", "y", m_max)]
    names = {"var": "var", "y": "y", "invstd": "save_invstd"}
    tols = {(s, dt): tolerance(names[s], dt) for s in names for dt in ("float32", "float64")}
    path = grid(require_pyplot(), d, panels, "rel_err", lambda s: f"rel_err({s})",
                "Peers and nbbn: rounding error vs κ (dash-dot: nbbn's tolerance)",
                out / "peers_vs_kappa.png", tols)
    return [path] if path else []
