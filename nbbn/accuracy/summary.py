"""report.md, assembled: the command and the environment, the practitioner's findings and table
(read across parts (a) and (e)), every part's key findings and section (each part's
``findings`` and ``report``), skips and figures. Every number here is derived from the CSV
tables beside it."""

from __future__ import annotations

import pandas as pd

from ..tolerances import tolerance
from .gradients import OLD_NBBN
from .parts import PARTS
from .report import (
    TOL_NAME,
    first_over,
    half_ulp32,
    kappa_name,
    m_name,
    markdown_table,
    short,
    where,
    with_label,
    worst,
)


def markdown(meta: dict, tables: dict[str, pd.DataFrame], skipped: pd.DataFrame,
             figures: list[str], plot_note: str | None, parts=PARTS) -> str:
    """report.md: header, the practitioner's findings and table, every part's key findings, every
    part's section (headed ``## (LETTER) TITLE``; none when its ``report`` returns no lines),
    skips, figures. ``parts``: the part modules that ran, in report order."""
    sections = []
    for p in parts:
        lines = p.report(tables)
        if lines:
            sections += [f"## ({p.LETTER}) {p.TITLE}", ""] + lines
    L = _header(meta, tables)
    acts = practitioner_findings(tables)
    findings = [f for p in parts for f in p.findings(tables)]
    practitioner = _practitioner_lines(tables)
    if acts or findings or practitioner:
        L += ["## Key findings", ""] + [f"- {f}" for f in acts] + [""] + practitioner
        if findings:
            L += (["### Further findings", ""] if acts or practitioner else [])
            L += [f"- {f}" for f in findings] + [""]
    L += sections
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
    L += ["Tidy tables beside this file (CSV, one row per point, environment in every "
          "row): " + ", ".join(f"`{k}.csv`" for k in tables) + ". Formulas: the docstrings of "
          "`nbbn/accuracy/{algorithms,rounding,peers,sampling,estimators,gradients}.py`.", ""]
    return L


# -------------------------------------------------------------------------------- practitioner


def _wst(df: pd.DataFrame, col: str = "rel_err") -> str:
    return short(worst(df, col)[0]) if len(df) else "n/a"


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
        first = first_over(tn, tolerance("var", "float32"))
        tc = a("torch-cpu NCHW", "float32", "var")
        gd = e("torch-cpu NC", "float32", "dgamma")
        gf = first_over(gd, 1e-4, "tol_err") if len(gd) else None
        out.append(
            "**PyTorch CPU on (N, C) inputs** (`BatchNorm1d`, and any input with H·W = 1, which "
            "ATen treats as channels-last) sums each thread's rows in a float32 buffer: "
            "variance leaves 1e-5 "
            + (f"from m = {m_name(first[1])} already at κ = {kappa_name(first[0])}"
               if first else "nowhere in the grid")
            + f", worst {_wst(tn)} (κ, m: {where(*worst(tn)[1:])})"
            + (f"; dγ leaves 1e-4 from m = {m_name(gf[1])} (κ = {kappa_name(gf[0])})"
               if gf else "")
            + f". The same op on NCHW input sums in double (variance worst {_wst(tc)}). The "
            "error depends on the thread count (m/threads values per float32 sum; "
            "`torch_threads` in the header). What to do: batches of m ≳ 2^18 "
            "per channel in float32 need float64 statistics (or nbbn).")
    nn = a("numpy NC", "float32", "var")
    if len(nn):
        first = first_over(nn, tolerance("var", "float32"))
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
            + ", ".join(f"{lab} {short(v)}" for lab, v in med.items())
            + f" (median over m; ½·ulp({kappa_name(kmax)}) = {half_ulp32(kmax):.2g}), beyond "
            "nbbn's 1e-5 from κ ≈ 1e3. nbbn subtracts a float64 mean (CPU) or a two-float mean "
            f"(CUDA): y within {_wst(nb)} everywhere.")
    m0 = int(g["m"].min()) if len(g) else None
    if m0 is not None:
        rows = []
        for impl in [OLD_NBBN, "torch-cpu NCHW", "flax-two-pass NC", "cpu NC"]:
            r = e(impl, "float32", "dx", m=m0)
            if len(r):
                rows.append(f"{impl} {short(r[r['kappa'] == 1e2]['tol_err'].max())} / "
                            f"{short(r[r['kappa'] == 1e3]['tol_err'].max())} / "
                            f"{short(r[r['kappa'] == kmax]['tol_err'].max())}")
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
    f = first_over(g, tol, col)
    return "never" if f is None else f"κ={kappa_name(f[0])}, m={m_name(f[1])}"


def _cell_worst(g: pd.DataFrame, col: str) -> str:
    w, k, m = worst(g, col)
    return f"{short(w)} (κ={kappa_name(k)}, m={m_name(m)})"


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
                tol = tolerance(TOL_NAME[stat], dtype)
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
