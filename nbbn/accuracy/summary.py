"""The Markdown report: the command, the environment, key findings computed from the tidy tables,
compact pivots, skips and figures. Every number here is derived from the CSV tables beside it."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from ..tolerances import tolerance
from .gradients import OLD_NBBN, OUTPUTS
from .parts import Section
from .report import kappa_name, m_name, markdown_table, with_label
from .rounding import NEGLIGIBLE


def _g(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf (NaN result)"
    return f"{v:.2g}"


# -------------------------------------------------------------------------------- findings

def rounding_findings(rnd: pd.DataFrame, cross: pd.DataFrame) -> list[str]:
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
                   f"rel_err {_g(s['rel_err'].min())} to {_g(s['rel_err'].max())} over m = "
                   f"{m_name(int(s['m'].min()))} … {m_name(int(s['m'].max()))}: useless at any "
                   "batch size. In float64 it still loses ≈ κ²·u: worst "
                   f"{_g(sel('naive', 'float64', kmax)['rel_err'].max())}.")
    s = sel("two-pass", "float32")
    if len(s):
        big = s[s["m"] == m_max]
        small = s[s["m"] <= 1024]
        out.append(f"**two-pass with sequential float32 sums**: variance rel_err ≤ "
                   f"{_g(small['rel_err'].max())} for m ≤ 1024 at every κ, but at m = "
                   f"{m_name(m_max)} it reaches {_g(big[big['kappa'] == 0]['rel_err'].max())} "
                   f"(κ = 0) and {_g(big['rel_err'].max())} (worst κ): a float32 running sum "
                   "stops growing once it is 2^24 times its terms, and at large κ the sum "
                   "of x itself rounds away the mean.")
    s = sel("two-pass-corrected", "float32")
    if len(s):
        out.append(f"**corrected two-pass** (σ² = (Σd² − (Σd)²/m)/m) in float32: variance "
                   f"rel_err ≤ {_g(s[s['m'] <= 2**16]['rel_err'].max())} for m ≤ 2^16 at every κ "
                   f"(worst {_g(s['rel_err'].max())} at larger m), but its mean — hence y — "
                   "carries the same float32-sum error as plain two-pass (see `mean_in_sd`, "
                   "`y`).")
    s = sel("welford", "float32")
    if len(s):
        by_k = s.groupby("kappa")["rel_err"].median()
        out.append("**Welford with a float32 running mean**: median variance rel_err "
                   + ", ".join(f"{_g(v)} at κ = {kappa_name(k)}" for k, v in by_k.items())
                   + ": its error grows like κ·u (the running mean is stored to float32 "
                   "precision, about κ·6e-8 of σ), so it is *not* within 1e-5 at κ = 1e4 even for "
                   "small m. Two-pass error grows only like κ²·u² there.")
    s = sel("welford-fcount", "float32")
    if len(s) and m_max > 2**24:
        out.append(f"**Welford with a float32 count**: n + 1 == n from n = 2^24, so at m = "
                   f"{m_name(m_max)} the variance is off by "
                   f"{_g(s[s['m'] == m_max]['rel_err'].median())} (median over κ).")
    s = sel("chan", "float32")
    if len(s):
        out.append(f"**chan (256 chunks × Welford, merged pairwise)** in float32: worst variance "
                   f"rel_err {_g(s['rel_err'].max())} over every κ and m: the tree merge keeps "
                   "sums short, but at κ = 1e4 the per-chunk float32 means still cost ≈ κ·u.")
    for lab in d.loc[d["algorithm"] == "nbbn", "label"].unique():
        parts = []
        for dt in ("float32", "float64"):
            v = var[(var["label"] == lab) & (var["dtype"] == dt)]
            y = d[(d["label"] == lab) & (d["dtype"] == dt) & (d["stat"] == "y")]
            if len(v):
                parts.append(f"{dt}: var ≤ {_g(v['rel_err'].max())}, y ≤ "
                             f"{_g(y['rel_err'].max()) if len(y) else 'n/a'}")
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


# -------------------------------------------------------------------------------- peers

#: part (a) statistic -> the nbbn.tolerances output name whose bound says "broken"
_TOL_NAME = {"var": "var", "invstd": "save_invstd", "y": "y"}

#: why each implementation behaves as it does (from its source; see nbbn/study/peers.py)
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


def _first_over(g: pd.DataFrame, tol: float, col: str = "rel_err") -> tuple | None:
    """(κ, m) of the smallest κ, then smallest m, where ``col`` exceeds ``tol``."""
    bad = g[~(g[col] <= tol)]
    if bad.empty:
        return None
    k = bad["kappa"].min()
    return k, int(bad[bad["kappa"] == k]["m"].min())


def _worst(g: pd.DataFrame, col: str = "rel_err") -> tuple[float, float, int]:
    v = g[col].to_numpy(dtype=float)
    i = int(np.argmax(np.where(np.isnan(v), np.inf, v)))
    r = g.iloc[i]
    return float(v[i]), float(r["kappa"]), int(r["m"])


def _where(k: float, m: int) -> str:
    return f"κ = {kappa_name(k)}, m = {m_name(m)}"


def _implementation_sentence(g: pd.DataFrame, stats, tol_of, col: str = "rel_err",
                             stat_col: str = "stat") -> str:
    parts = []
    for stat in stats:
        s = g[g[stat_col] == stat]
        if s.empty:
            continue
        tol = tol_of(stat)
        w, wk, wm = _worst(s, col)
        first = _first_over(s, tol, col)
        if first is None:
            parts.append(f"{stat} within {tol:g} everywhere (worst {_g(w)})")
        else:
            parts.append(f"{stat} leaves {tol:g} from κ = {kappa_name(first[0])} (there from "
                         f"m = {m_name(first[1])}), worst {_g(w)} at {_where(wk, wm)}")
    return "; ".join(parts)


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
                texts.append(f"{dt}: " + _implementation_sentence(
                    gd, ("var", "invstd", "y"),
                    lambda st, dt=dt: tolerance(_TOL_NAME[st], dt)))
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
                   + ", ".join(f"{lab} {_g(v)}" for lab, v in med.items())
                   + f" (½·ulp({kappa_name(k)})/σ = {_half_ulp32(k):.2g}). nbbn normalizes "
                   "with its float64 mean (CPU) or a two-float mean (CUDA) and keeps y near "
                   "float32's own rounding.")
    return out


def _half_ulp32(v: float) -> float:
    return float(np.spacing(np.float32(v))) / 2 if v else 0.0


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
            tol = tolerance(_TOL_NAME[stat], dt)
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


# -------------------------------------------------------------------------------- gradients

_GRAD_TOL = {"dx": "tol_err", "dgamma": "tol_err", "dbeta": "tol_err"}


def gradient_findings(gr: pd.DataFrame) -> list[str]:
    out = []
    f32 = gr[gr["dtype"] == "float32"]
    m0 = int(gr["m"].min())
    big = [k for k in sorted(gr["kappa"].unique()) if abs(k) >= 1e3]
    old = f32[(f32["impl"] == OLD_NBBN) & (f32["m"] == m0) & (f32["output"] == "dx")]
    if len(old) and big:
        rows = []
        for impl, g in f32[(f32["m"] == m0) & (f32["output"] == "dx")].groupby("impl",
                                                                              sort=False):
            vals = ", ".join(f"{_g(g[g['kappa'] == k]['tol_err'].max())} at κ = "
                             f"{kappa_name(abs(k))}" for k in big if (g["kappa"] == k).any())
            rows.append(f"{impl} {vals}")
        cpu = f32[(f32["impl"] == "cpu NC") & (f32["m"] == m0) & (f32["output"] == "dx")]
        verdict = ""
        if len(cpu):
            o = old[old["kappa"].isin(big)]["tol_err"].max()
            c = cpu[cpu["kappa"].isin(big)]["tol_err"].max()
            verdict = (" The nbbn kernels in this run fold the residual: their dx is "
                       f"{_g(o / c) if c > 0 else 'far'} times closer than the emulated old "
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
                texts.append(f"{dt}: " + _implementation_sentence(
                    gd, OUTPUTS, lambda o, dt=dt: tolerance(o, dt), col="tol_err",
                    stat_col="output"))
        out.append(f"**{impl}** gradients: " + ". ".join(texts) + ".")
    return out


def report_gradients(tables: dict[str, pd.DataFrame]) -> Section:
    gr = tables.get("gradients")
    if gr is None or not len(gr):
        return Section()
    m0 = int(gr["m"].min())
    ms = sorted(gr["m"].unique())
    m_mid = int(min(ms, key=lambda m: abs(math.log2(m) - 12)))
    m_max = int(gr["m"].max())
    L = ["## (e) Rounding error of the gradients", "",
         "x = κ + z and dy, z and dy ~ N(0, 1) (one draw per m; float32 data are the float64 "
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
    L[4:4] = ["### Per implementation", ""] + [f"- {t}" for t in per] + [""]
    return Section([], L)


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
                           f"{_g(x)} at m = {m}" for m, x in med.items())
                       + " — the effective m is m divided by this.")
    return out


def estimator_findings(est: pd.DataFrame, gap: pd.DataFrame | None) -> list[str]:
    out = []
    K = int(est["batches"].max())
    last = est[(est["batches"] == K) & (est["stat"] == "var")]
    for name, g in last.groupby("distribution", sort=False):
        parts = []
        for m, gm in g.groupby("m"):
            a2 = gm[gm["estimator"] == "cumulative-unbiased"].iloc[0]
            bb = gm[gm["estimator"] == "cumulative-biased"].iloc[0]
            parts.append(f"m = {m}: Algorithm 2 {a2['rel_bias']:+.4f} ± {a2['rel_bias_se']:.4f}, "
                         f"biased {bb['rel_bias']:+.4f} (theory −1/m = {-1 / m:+.4f})")
        out.append(f"**Variance bias after {K} batches ({name}, relative to σ²)**: "
                   + "; ".join(parts) + ".")
        break
    e = est[(est["batches"] == K) & (est["estimator"] == "ema")]
    if len(e):
        name = e["distribution"].iloc[0]
        e = e[e["distribution"] == name]
        a2 = est[(est["batches"] == K) & (est["estimator"] == "cumulative-unbiased")
                 & (est["distribution"] == name)]
        m = int(e["m"].median()) if int(e["m"].median()) in set(e["m"]) else int(e["m"].max())
        parts = [f"momentum {r['momentum']:g}: {r['rel_rmse']:.3g}"
                 for _, r in e[(e["m"] == m) & (e["stat"] == "var")].iterrows()]
        r2 = a2[(a2["m"] == m) & (a2["stat"] == "var")]["rel_rmse"]
        out.append(f"**EMA noise floor** ({name}, m = {m}, after {K} batches): variance rel RMSE "
                   + ", ".join(parts) + (f" vs Algorithm 2 {r2.iloc[0]:.3g}" if len(r2) else "")
                   + ". The EMA never averages below a/(2 − a) of one batch's variance; "
                   "momentum 0.01 still carries the init running_var = 1 after 100 batches "
                   "((0.99)^100 = 0.37 of it).")
    dev = est["ema_kernel_dev"].max() if "ema_kernel_dev" in est else math.nan
    impl = est["ema_impl"].iloc[0] if "ema_impl" in est else "?"
    out.append(f"EMA through {'the nbbn kernel' if impl == 'nbbn' else 'nbbn.reference'}: "
               f"largest deviation from the float64 update {_g(dev)} (relative to σ, σ²).")
    if gap is not None and len(gap):
        p = gap[gap["inference_stats"] == "population"]
        name = p["distribution"].iloc[0]
        p = p[p["distribution"] == name].sort_values("m")
        out.append(f"**Train–inference gap** ({name}): ‖BN_train − BN_infer‖/‖BN_infer‖ RMS "
                   + ", ".join(f"{r['gap_rms']:.3g} at m = {int(r['m'])}"
                               for _, r in p.iterrows() if int(r["m"]) in
                               (2, 4, 16, 64, 256, 1024, 4096, 16384))
                   + "; first-order theory √((1 + (μ4/σ⁴ − 1)/4)/m) = √(1.5/m) for normal data "
                   "(it underestimates for m ≲ 8, and is far off for the log-normal's heavy "
                   "tail).")
        q = gap[gap["distribution"] == name].pivot_table(
            index="m", columns="inference_stats", values="gap_rms", aggfunc="first").dropna()
        if len(q) and {"cumulative-biased", "cumulative-unbiased"} <= set(q.columns):
            m0 = int(q.index.min())
            out.append(f"At m = {m0} BN_infer with the *biased* average matches BN_train more "
                       f"closely (gap {q.loc[m0, 'cumulative-biased']:.3g}) than with "
                       f"Algorithm 2's unbiased one ({q.loc[m0, 'cumulative-unbiased']:.3g}) or "
                       f"the exact population ({q.loc[m0, 'population']:.3g}): training "
                       "normalizes by σ²_B, whose mean is (m − 1)/m·σ². Unbiased population "
                       "statistics are the paper's choice, not the one that best reproduces "
                       "training-mode outputs at small m.")
    return out


# -------------------------------------------------------------------------------- markdown

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


def _header(meta: dict, tables: dict[str, pd.DataFrame]) -> list[str]:
    L = ["# nbbn accuracy study", "",
         f"Command: `{meta['command']}`", "",
         f"Run {meta['date']} on {meta['cpu']} ({meta['cpus']} CPUs, {meta['threads']} Numba "
         f"threads), Python {meta['python_version']}, NumPy {meta['numpy_version']}, "
         f"Numba {meta['numba_version']}, nbbn {meta['nbbn_version']}; seed {meta['seed']}; "
         f"wall time {meta['wall_s']:.0f} s ({meta['timings']}).", ""]
    pv = meta.get("peer_versions")
    if pv:
        L += ["Peers: " + ", ".join(f"{k} {v}" for k, v in pv.items()) + ".", ""]
        for name, how in meta.get("peer_how", {}).items():
            L += [f"- `{name}`: {how}"]
        L += [""]
    L += ["Tidy tables beside this file (CSV and JSON, one row per point, environment in every "
          "row): " + ", ".join(f"`{k}.csv`" for k in tables) + ". Formulas: the docstrings of "
          "`nbbn/study/{algorithms,rounding,peers,sampling,estimators,gradients}.py`.", ""]
    return L


def report_rounding(tables: dict[str, pd.DataFrame]) -> Section:
    rnd, cross = tables.get("rounding"), tables.get("rounding_crossover")
    if rnd is None or not len(rnd):
        return Section()
    findings = rounding_findings(rnd, cross)
    m_max = int(rnd["m"].max())
    ms = sorted(rnd["m"].unique())
    m_mid = int(min(ms, key=lambda m: abs(math.log2(m) - 10)))
    L = ["## (a) Rounding error of the statistics", "",
         "Data x = κ + z, z ~ N(0, 1), one draw per m shared by every κ and dtype; float32 "
         "data are those values rounded once. The study's algorithms (`naive`, `two-pass`, "
         "`two-pass-corrected`, `welford`, `welford-fcount`, `chan`) accumulate "
         "sequentially in the data's dtype; "
         "`<backend> <layout>` rows are the nbbn kernels (statistics from the backend's "
         "registered statistics function, invstd and y from its forward-train kernel, on x "
         "viewed as NC (m, 1) and NCHW (N, 1, 1, S)) and the peers (`torch-cpu`, "
         "`flax-fast-var`, `flax-two-pass`, `numpy`, and on a GPU `torch-cuda`, `cupy`; "
         "`nbbn/study/peers.py` says how each is called; NumPy's NC and NCHW rows hold x in "
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
    return Section(findings, L)


def report_sampling(tables: dict[str, pd.DataFrame]) -> Section:
    smp = tables.get("sampling")
    if smp is None or not len(smp):
        return Section()
    iid = smp[(smp["sampling"] == "iid")]
    L = ["## (b) Sampling error of batch statistics", "",
         "RMSE over B batches against the population, beside the i.i.d. theory: σ/√m for "
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
    return Section(sampling_findings(smp), L)


def report_estimators(tables: dict[str, pd.DataFrame]) -> Section:
    est, gap = tables.get("estimators"), tables.get("gap")
    if est is None or not len(est):
        return Section()
    K = int(est["batches"].max())
    e = est[est["batches"] == K].copy()
    e["estimator"] = [f"ema {r['momentum']:g}" if r["estimator"] == "ema" else r["estimator"]
                      for r in e[["estimator", "momentum"]].to_dict(orient="records")]
    L = ["## (c) Population estimators and the train–inference gap", "",
         "EMA in PyTorch's convention (running = (1 − momentum)·running + momentum·batch, "
         "unbiased batch variance, starting from running_mean = 0, running_var = 1), run by "
         "the nbbn forward-train kernel; Algorithm 2 (cumulative average, variance × "
         "m/(m − 1)); the biased cumulative average. Bias and RMSE over independent streams "
         "(relative to σ for the mean, σ² for the variance).", ""]
    first = e["distribution"].iloc[0]
    for name in list(dict.fromkeys(e["distribution"])):
        for stat in ("mean", "var") if name == first else ("var",):
            p = e[(e["distribution"] == name) & (e["stat"] == stat)]
            p = p.assign(cell=[f"{b:+.3g} / {r:.3g}"
                               for b, r in zip(p["rel_bias"], p["rel_rmse"], strict=True)])
            q = p.pivot_table(index="estimator", columns="m", values="cell",
                              aggfunc="first", sort=False)
            q.columns = [f"m={c}" for c in q.columns]
            L += [f"### {name}: bias / RMSE of the {stat} after {K} batches (relative to "
                  + ("σ)" if stat == "mean" else "σ²)"), "", markdown_table(q), ""]
    if gap is not None and len(gap):
        p = gap[gap["inference_stats"] == "population"].pivot_table(
            index="m", columns="distribution", values="gap_rms", aggfunc="first", sort=False)
        t = gap[gap["inference_stats"] == "population"].pivot_table(
            index="m", columns="distribution", values="theory", aggfunc="first", sort=False)
        t.columns = [f"{c} theory" for c in t.columns]
        L += ["### Train–inference gap, RMS of ‖BN_train(x) − BN_infer(x)‖/‖BN_infer(x)‖ "
              "(BN_infer with the exact population statistics)", "",
              markdown_table(pd.concat([p, t], axis=1), ".3g"), ""]
        first = gap["distribution"].iloc[0]
        q = gap[gap["distribution"] == first].pivot_table(
            index="m", columns="inference_stats", values="gap_rms", aggfunc="first",
            sort=False).dropna()
        if len(q):
            L += [f"### {first}: RMS gap when BN_infer uses each estimator after "
                  f"{int(gap['stream_batches'].max())} batches", "",
                  markdown_table(q, ".3g"), ""]
    return Section(estimator_findings(est, gap), L)


def _wst(df: pd.DataFrame, col: str = "rel_err") -> str:
    return _g(_worst(df, col)[0]) if len(df) else "n/a"


def practitioner_findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    """The few things to act on, each from the tables of parts (a) and (e)."""
    rnd, gr = tables.get("rounding"), tables.get("gradients")
    out = []
    d = with_label(rnd[rnd["algorithm"].isin(["peer", "nbbn"])]) if rnd is not None and len(
        rnd) else pd.DataFrame(columns=["label", "algorithm", "dtype", "stat", "kappa", "m",
                                        "rel_err", "value"])
    g = gr if gr is not None and len(gr) else pd.DataFrame(
        columns=["impl", "dtype", "output", "kappa", "m", "tol_err", "family"])

    def a(label, dt, stat, **kw):
        r = d[(d["label"] == label) & (d["dtype"] == dt) & (d["stat"] == stat)]
        for k, v in kw.items():
            r = r[r[k] == v]
        return r

    def e(impl, dt, out_, **kw):
        r = g[(g["impl"] == impl) & (g["dtype"] == dt) & (g["output"] == out_)]
        for k, v in kw.items():
            r = r[r[k] == v]
        return r

    kmax = float(d["kappa"].max()) if len(d) else 1e4
    fv = a("flax-fast-var NC", "float32", "var")
    if len(fv):
        at_k = fv[fv["kappa"] == kmax]
        zero = int((at_k["value"] == 0).sum()) if "value" in at_k else 0
        two = a("flax-two-pass NC", "float32", "var")
        dx = e("flax-fast-var NC", "float32", "dx", kappa=kmax)
        out.append(
            "**Flax `BatchNorm`'s default, `use_fast_variance=True` (E[x²] − E[x]²), is wrong "
            "in float32 once |mean|/std ≳ 100**: variance off by "
            f"{_wst(fv[fv['kappa'] == 1e2])} at κ = 1e2 and {_wst(at_k)} at κ = "
            f"{kappa_name(kmax)} (worst over m; {zero} of {len(at_k)} points at κ = "
            f"{kappa_name(kmax)} come out exactly 0 after Flax's clamp, so invstd = 1/√ε and "
            f"y is off by {_wst(a('flax-fast-var NC', 'float32', 'y', kappa=kmax))})"
            + (f"; dx off by {_wst(dx, 'tol_err')}" if len(dx) else "")
            + ". Even float64 leaves 1e-10 from κ = 1e3 "
            f"({_wst(a('flax-fast-var NC', 'float64', 'var'))} worst). What to do: "
            "`use_fast_variance=False` (two-pass: variance within "
            f"{_wst(two)} everywhere here), or nbbn.")
    tn = a("torch-cpu NC", "float32", "var")
    if len(tn):
        first = _first_over(tn, tolerance("var", "float32"))
        tc = a("torch-cpu NCHW", "float32", "var")
        gd = e("torch-cpu NC", "float32", "dgamma")
        gf = _first_over(gd, 1e-4, "tol_err") if len(gd) else None
        out.append(
            "**PyTorch CPU on (N, C) inputs** (`BatchNorm1d`, and any input with H·W = 1, which "
            "ATen treats as channels-last) sums each thread's rows in a float32 buffer: "
            "variance leaves 1e-5 "
            + (f"from m = {m_name(first[1])} already at κ = {kappa_name(first[0])}"
               if first else "nowhere in the grid")
            + f", worst {_wst(tn)} (κ, m: {_where(*_worst(tn)[1:])})"
            + (f"; dγ leaves 1e-4 from m = {m_name(gf[1])} (κ = {kappa_name(gf[0])})"
               if gf else "")
            + f". The same op on NCHW input sums in double (variance worst {_wst(tc)}). The "
            "error depends on the thread count (m/threads values per float32 sum; "
            "`torch_threads` in the header). What to do: batches of m ≳ 2^18 "
            "per channel in float32 need float64 statistics (or nbbn).")
    nn = a("numpy NC", "float32", "var")
    if len(nn):
        first = _first_over(nn, tolerance("var", "float32"))
        out.append(
            "**NumPy `x.mean(axis=0)`, `x.var(axis=0)` on (N, C) float32** add the rows "
            "sequentially in float32 (pairwise summation only runs along a contiguous axis): "
            "variance leaves 1e-5 "
            + (f"from m = {m_name(first[1])} (κ = {kappa_name(first[0])})" if first else
               "nowhere in the grid")
            + f", worst {_wst(nn)}; on a contiguous 1-D row the same calls stay within "
            f"{_wst(a('numpy 1-D', 'float32', 'var'))}. What to do: `dtype=np.float64` in "
            "the reductions.")
    ys = d[(d["dtype"] == "float32") & (d["stat"] == "y") & (d["kappa"] == kmax)
           & (d["algorithm"] == "peer") & (d["label"] != "flax-fast-var NC")]
    if len(ys):
        med = ys.groupby("label")["rel_err"].median()
        nb = d[(d["dtype"] == "float32") & (d["stat"] == "y") & (d["algorithm"] == "nbbn")]
        out.append(
            "**Every float32 mean costs y up to ½ ulp(|mean|)/std**: the peers normalize with a "
            f"mean stored in float32, so at κ = {kappa_name(kmax)} their y is off by "
            + ", ".join(f"{lab} {_g(v)}" for lab, v in med.items())
            + f" (median over m; ½·ulp({kappa_name(kmax)}) = {_half_ulp32(kmax):.2g}), beyond "
            "nbbn's 1e-5 from κ ≈ 1e3. nbbn subtracts a float64 mean (CPU) or a two-float mean "
            f"(CUDA): y within {_wst(nb)} everywhere.")
    m0 = int(g["m"].min()) if len(g) else None
    if m0 is not None:
        rows = []
        for impl in [OLD_NBBN, "torch-cpu NCHW", "flax-two-pass NC", "cpu NC"]:
            r = e(impl, "float32", "dx", m=m0)
            if len(r):
                rows.append(f"{impl} {_g(r[r['kappa'] == 1e2]['tol_err'].max())} / "
                            f"{_g(r[r['kappa'] == 1e3]['tol_err'].max())} / "
                            f"{_g(r[r['kappa'] == kmax]['tol_err'].max())}")
        old = e(OLD_NBBN, "float32", "dx", m=m0)
        cpu = e("cpu NC", "float32", "dx", m=m0)
        folded = (len(cpu) and len(old) and cpu["tol_err"].max() < old["tol_err"].max() / 10)
        gd = e(OLD_NBBN, "float32", "dgamma")
        out.append(
            f"**Backward from a float32 `save_mean`** (PyTorch, Flax, nbbn before the fold): at "
            f"m = {m0} (64 channels), dx error relative to ‖γ·invstd·dy‖ at κ = 1e2 / 1e3 / "
            f"{kappa_name(kmax)}: " + "; ".join(rows)
            + f" (tolerance 1e-4); dγ up to {_wst(gd, 'tol_err')}. The saved mean is off by up "
            "to ½ ulp(|mean|) — a large fraction of σ when a channel's values lie close "
            "together — and x̂ = (x − save_mean)·invstd inherits it. nbbn's backward folds "
            "the residual Σ(x − save_mean)/m into its mean; "
            + ("in this run its kernels do, and dx stays within "
               f"{_wst(e('cpu NC', 'float32', 'dx'), 'tol_err')}." if folded else
               "the kernels of this run do not yet (they match the emulation)."))
    return out


def _cell_first(g: pd.DataFrame, tol: float, col: str) -> str:
    f = _first_over(g, tol, col)
    return "never" if f is None else f"κ={kappa_name(f[0])}, m={m_name(f[1])}"


def _cell_worst(g: pd.DataFrame, col: str) -> str:
    w, k, m = _worst(g, col)
    return f"{_g(w)} (κ={kappa_name(k)}, m={m_name(m)})"


def practitioner_table(tables: dict[str, pd.DataFrame], dtype: str) -> pd.DataFrame | None:
    """One row per implementation (peers, nbbn backends, the emulated old nbbn): where its
    var and y (part a) and dx and dγ (part e) first leave nbbn's tolerance, and the worst
    error with where it occurs."""
    rnd, gr = tables.get("rounding"), tables.get("gradients")
    rows: dict[str, dict] = {}
    if rnd is not None and len(rnd):
        d = with_label(rnd[rnd["algorithm"].isin(["peer", "nbbn"]) & (rnd["dtype"] == dtype)])
        for lab, g in d.groupby("label", sort=False):
            r = rows.setdefault(lab, {})
            for stat in ("var", "y"):
                gs = g[g["stat"] == stat]
                tol = tolerance(_TOL_NAME[stat], dtype)
                r[f"{stat} > {tol:g} from"] = _cell_first(gs, tol, "rel_err")
                r[f"worst {stat}"] = _cell_worst(gs, "rel_err")
    if gr is not None and len(gr):
        d = gr[(gr["dtype"] == dtype) & (gr["kappa"] >= 0)]
        for impl, g in d.groupby("impl", sort=False):
            r = rows.setdefault(impl, {})
            for out in ("dx", "dgamma"):
                go = g[g["output"] == out]
                tol = tolerance(out, dtype)
                r[f"{out} > {tol:g} from"] = _cell_first(go, tol, "tol_err")
                r[f"worst {out}"] = _cell_worst(go, "tol_err")
    if not rows:
        return None
    df = pd.DataFrame.from_dict(rows, orient="index").fillna("n/a")
    df.index.name = "implementation"
    return df


def _practitioner_lines(tables: dict[str, pd.DataFrame]) -> list[str]:
    L = []
    for dt in ("float32", "float64"):
        t = practitioner_table(tables, dt)
        if t is None:
            continue
        L += [f"### Where each implementation leaves nbbn's tolerance, {dt}", "",
              "First (smallest κ, then smallest m) grid point where the error exceeds nbbn's "
              "own tolerance for that output (var, y: 1e-5 in float32, 1e-10 in float64; dx, "
              "dγ: 1e-4 / 1e-10, measured as nbbn.tolerances does), and the worst error over "
              "the grid. var, y from part (a) (one channel); dx, dγ from part (e); `n/a`: "
              "not measured (forward-only peers, the emulation).", "",
              markdown_table(t), ""]
    return L


def markdown(meta: dict, tables: dict[str, pd.DataFrame], skipped: pd.DataFrame,
             figures: list[str], plot_note: str | None, parts=None) -> str:
    """report.md: header, every part's key findings, every part's section, skips, figures."""
    from . import parts as _parts

    parts = _parts.ordered() if parts is None else parts
    sections = [_parts.load(p.report)(tables) for p in parts if p.report]
    L = _header(meta, tables)
    acts = practitioner_findings(tables)
    findings = [f for sec in sections for f in sec.findings]
    practitioner = _practitioner_lines(tables)
    if acts or findings or practitioner:
        L += ["## Key findings", ""] + [f"- {f}" for f in acts] + [""] + practitioner
        if findings:
            L += (["### Further findings", ""] if acts or practitioner else [])
            L += [f"- {f}" for f in findings] + [""]
    for sec in sections:
        L += sec.lines
    L += ["## Skipped", ""]
    if skipped is not None and len(skipped):
        L += [markdown_table(skipped, index=False), ""]
    else:
        L += ["Nothing was skipped.", ""]
    L += ["## Figures", ""]
    if plot_note:
        L += [plot_note, ""]
    L += [f"![{f}]({f})" for f in figures] + [""]
    return "\n".join(L)
