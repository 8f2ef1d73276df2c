"""Two bench results -> each configuration labelled faster, slower, same or ambiguous, from the
intervals each run measured (nvbench-compare style).

What is compared (``metric``), for a configuration ``ok`` in both files -- always a time-like
quantity, larger = slower, with the 95% interval its run measured:

* ``copy`` (default): ``time_over_copy``, the paired median of the configuration's time over
  the copy of x timed in the same loop. A machine that is slower or busier as a whole (memory
  bandwidth, frequency, a neighbour) slows the copy too, so this is what survives between runs.
* ``baseline``: time over the reference baseline's time, 1/``speedup`` (interval
  [1/speedup_ci_hi, 1/speedup_ci_lo]); rows without a baseline (the baselines themselves) are
  "no interval".
* ``time``: ``time_ms_p50`` with its own interval [time_ms_ci_lo, time_ms_ci_hi].

With old value a ∈ [a_lo, a_hi] and new value b ∈ [b_lo, b_hi] -- each a 95% interval built
over the run's trials (:mod:`nbbn.bench.stats`, so it holds the between-trial variance) -- the
change is taken in logs, and the variance *between runs* that no run's trials can see (the
host's state minutes apart, measured by ``nbbn report variance``) is added as ``run_sd``, the
standard deviation of log(metric) between runs:

    d    = log(b / a)
    se_x = (log x_hi − log x_lo) / (2·1.96)                        for x = a, b
    se_d = sqrt(se_a² + se_b² + 2·run_sd²)
    D    = [d − 1.96·se_d, d + 1.96·se_d]          (the change's 95% interval, in logs)

and with the equivalence ``margin`` m (default 0.05) the band is E = [−log(1 + m), log(1 + m)]:

* ``slower``    : D lies above E (D_lo > log(1 + m)): a change larger than the margin, certain;
* ``faster``    : D lies below E (D_hi < −log(1 + m));
* ``same``      : D lies within E: whatever the truth within D, the change is at most m;
* ``ambiguous`` : D overlaps E's edge: too uncertain to call either way.

So an A/A pair (nothing changed) is called ``slower`` only when an honest 95% interval misses
the truth by more than the margin, and a change of size c is called with power
Φ((log(1 + c) − log(1 + m))/se_d − 1.96). ``change``, ``change_lo``, ``change_hi`` are
exp(d), exp(D). ``--fail-on-slower`` fails on ``slower`` only, by this rule.

Configurations not compared: ``only in old`` / ``only in new`` (timed in one file only),
``not timed`` (in neither), ``not compared (ok → failed)`` and the like, ``no interval`` (the
metric is missing in one file).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from ..output import read_rows
from .report import ROWS_FILE, TABLE_STEM, tidy
from .runner import SCHEMA
from .sweep import KEY_COLUMNS

METRICS = ("copy", "baseline", "time")
LABELS = ("faster", "slower", "same", "ambiguous")
#: Equivalence margin: changes within ±5% are "the same".
DEFAULT_MARGIN = 0.05
DEFAULT_THRESHOLD = DEFAULT_MARGIN  # the option's old name
#: Between-run sd of log(metric) beyond the trials' (a fraction, ≈ %/100). A placeholder until
#: the variance study on the host gives it (``nbbn report variance``: the ``run`` level);
#: scripts/bench_reliability.sh passes the measured one.
DEFAULT_RUN_SD = 0.02
Z = 1.959964


class NotOurs(ValueError):
    """A file that is not an nbbn bench result; the message is one line."""


def load_results(path: str | Path) -> pd.DataFrame:
    """A bench result: an output folder, rows.jsonl, bench.csv or bench.json."""
    p = Path(path)
    if p.is_dir():
        for name in (ROWS_FILE, f"{TABLE_STEM}.csv", f"{TABLE_STEM}.json"):
            if (p / name).is_file():
                p = p / name
                break
        else:
            raise NotOurs(f"{path}: no {ROWS_FILE}, {TABLE_STEM}.csv or {TABLE_STEM}.json in "
                          "this folder")
    if not p.is_file():
        raise NotOurs(f"{path}: no such file")
    try:
        if p.suffix == ".csv":
            df = pd.read_csv(p)
        elif p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise NotOurs(f"{path}: not a JSON list of rows, so not an nbbn bench result")
            df = pd.DataFrame(data)
        else:
            df = pd.DataFrame(read_rows(p))
    except NotOurs:
        raise
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NotOurs(f"{path}: cannot be read as a bench result ({first})") from None
    if "schema" not in df.columns or not len(df):
        raise NotOurs(f"{path}: not an nbbn bench result "
                      f"({'no rows' if not len(df) else 'missing column schema'})")
    family = SCHEMA.split("/")[0] + "/"
    schemas = set(df["schema"].astype(str))
    if not all(s.startswith(family) for s in schemas):
        raise NotOurs(f"{path}: not an nbbn bench result (schema is not {SCHEMA})")
    if schemas != {SCHEMA}:
        old = ", ".join(sorted(schemas - {SCHEMA}))
        raise NotOurs(f"{path}: rows of schema {old} carry no intervals; run nbbn bench again "
                      f"to compare ({SCHEMA})")
    missing = [c for c in ("status", *KEY_COLUMNS) if c not in df.columns]
    if missing:
        raise NotOurs(f"{path}: not an nbbn bench result (missing columns {', '.join(missing)})")
    return tidy(df.to_dict("records"))


def metric_columns(df: pd.DataFrame, metric: str) -> pd.DataFrame:
    """(value, lo, hi) of ``metric`` per row (time-like: larger = slower)."""
    def num(c):
        return pd.to_numeric(df[c], errors="coerce") if c in df.columns else \
            pd.Series(np.nan, index=df.index)

    if metric == "copy":
        v, lo, hi = num("time_over_copy"), num("time_over_copy_ci_lo"), num("time_over_copy_ci_hi")
    elif metric == "time":
        v, lo, hi = num("time_ms_p50"), num("time_ms_ci_lo"), num("time_ms_ci_hi")
    elif metric == "baseline":
        v, lo, hi = 1 / num("speedup"), 1 / num("speedup_ci_hi"), 1 / num("speedup_ci_lo")
    else:
        raise ValueError(f"unknown metric {metric!r}; choose from {', '.join(METRICS)}")
    return pd.DataFrame({"value": v, "lo": lo, "hi": hi})


def label_change(a, a_lo, a_hi, b, b_lo, b_hi, margin: float = DEFAULT_MARGIN,
                 run_sd: float = DEFAULT_RUN_SD):
    """(label, change, change_lo, change_hi) of one configuration (see the module docstring)."""
    vals = (a, a_lo, a_hi, b, b_lo, b_hi)
    if any(v is None or not np.isfinite(v) or v <= 0 for v in vals):
        return "no interval", np.nan, np.nan, np.nan
    d = np.log(b / a)
    se_a = (np.log(a_hi) - np.log(a_lo)) / (2 * Z)
    se_b = (np.log(b_hi) - np.log(b_lo)) / (2 * Z)
    se = float(np.sqrt(se_a ** 2 + se_b ** 2 + 2 * run_sd ** 2))
    lo, hi = d - Z * se, d + Z * se
    e = np.log1p(margin)
    if lo > e:
        lab = "slower"
    elif hi < -e:
        lab = "faster"
    elif -e <= lo and hi <= e:
        lab = "same"
    else:
        lab = "ambiguous"
    return lab, float(np.exp(d)), float(np.exp(lo)), float(np.exp(hi))


def compare(old: pd.DataFrame, new: pd.DataFrame, metric: str = "copy",
            margin: float = DEFAULT_MARGIN, run_sd: float = DEFAULT_RUN_SD,
            rename: dict | None = None) -> pd.DataFrame:
    """Label every configuration (module docstring). ``rename`` maps NEW's backend names onto
    OLD's (``{"cpu-slowed": "cpu"}``: the A/B experiment compares one backend with another)."""
    if rename:
        new = new[~new["backend"].isin(set(rename.values()))].copy()  # the renamed ones replace
        new["backend"] = new["backend"].replace(rename)
    keys = list(KEY_COLUMNS)
    a = old[keys + ["status"]].join(metric_columns(old, metric))
    b = new[keys + ["status"]].join(metric_columns(new, metric))
    for frame_, src in ((a, old), (b, new)):
        for c in ("time_ms_p50", "speedup"):
            frame_[c] = pd.to_numeric(src[c], errors="coerce") if c in src.columns else np.nan
    merged = a.merge(b, on=keys, how="outer", suffixes=("_old", "_new"), indicator=True,
                     sort=False)
    out = []
    for r in merged.to_dict("records"):
        rho = lo = hi = np.nan
        so, sn = r.get("status_old"), r.get("status_new")
        if r["_merge"] == "left_only":
            lab = "only in old" if so == "ok" else "not timed"
        elif r["_merge"] == "right_only":
            lab = "only in new" if sn == "ok" else "not timed"
        elif so != "ok" and sn != "ok":
            lab = "not timed"
        elif so != "ok" or sn != "ok":
            lab = f"not compared ({so} → {sn})"
        else:
            lab, rho, lo, hi = label_change(r["value_old"], r["lo_old"], r["hi_old"],
                                            r["value_new"], r["lo_new"], r["hi_new"], margin,
                                            run_sd)
        out.append((lab, rho, lo, hi))
    merged = merged.drop(columns="_merge")
    merged["metric"] = metric
    merged["change"] = [o[1] for o in out]
    merged["change_lo"] = [o[2] for o in out]
    merged["change_hi"] = [o[3] for o in out]
    merged["label"] = [o[0] for o in out]
    return merged


def counts_line(table: pd.DataFrame) -> str:
    counts = table["label"].value_counts()
    labels = list(LABELS) + [lb for lb in counts.index if lb not in LABELS]
    return ", ".join(f"{counts.get(lb, 0)} {lb}" for lb in labels)
