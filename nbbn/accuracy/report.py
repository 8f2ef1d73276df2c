"""What every part's report shares: tidy tables to CSV, Markdown tables, display names (labels,
κ, m), and the phrases the findings are written with (numbers to two digits, where a column
first leaves a tolerance, its worst value). Every number in report.md is read off the tidy
tables, which are always written."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from .. import output as _output

# -------------------------------------------------------------------------------- tables
# The writers live once, in nbbn.output; these names stay for the study's modules.


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


# -------------------------------------------------------------------------------- findings

def short(v: float) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    if isinstance(v, float) and math.isinf(v):
        return "inf (NaN result)"
    return f"{v:.2g}"


#: part (a) statistic -> the nbbn.tolerances output name whose bound says "broken"
TOL_NAME = {"var": "var", "invstd": "save_invstd", "y": "y"}


def first_over(g: pd.DataFrame, tol: float, col: str = "rel_err") -> tuple | None:
    """(κ, m) of the smallest κ, then smallest m, where ``col`` exceeds ``tol``."""
    bad = g[~(g[col] <= tol)]
    if bad.empty:
        return None
    k = bad["kappa"].min()
    return k, int(bad[bad["kappa"] == k]["m"].min())


def worst(g: pd.DataFrame, col: str = "rel_err") -> tuple[float, float, int]:
    v = g[col].to_numpy(dtype=float)
    i = int(np.argmax(np.where(np.isnan(v), np.inf, v)))
    r = g.iloc[i]
    return float(v[i]), float(r["kappa"]), int(r["m"])


def where(k: float, m: int) -> str:
    return f"κ = {kappa_name(k)}, m = {m_name(m)}"


def implementation_sentence(g: pd.DataFrame, stats, tol_of, col: str = "rel_err",
                            stat_col: str = "stat") -> str:
    parts = []
    for stat in stats:
        s = g[g[stat_col] == stat]
        if s.empty:
            continue
        tol = tol_of(stat)
        w, wk, wm = worst(s, col)
        first = first_over(s, tol, col)
        if first is None:
            parts.append(f"{stat} within {tol:g} everywhere (worst {short(w)})")
        else:
            parts.append(f"{stat} leaves {tol:g} from κ = {kappa_name(first[0])} (there from "
                         f"m = {m_name(first[1])}), worst {short(w)} at {where(wk, wm)}")
    return "; ".join(parts)


def half_ulp32(v: float) -> float:
    return float(np.spacing(np.float32(v))) / 2 if v else 0.0
