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

**A/B in one run** (:func:`compare_in_run`, ``nbbn compare RUN --pair NEW=OLD``). Two runs
differ by the run level no trial sees (σ_run ≈ 4.9% on the project's host), so one run against
one run cannot resolve 15% (results/reliability/README.md). Two configurations timed *in the
same run* -- the same rounds, in random order, the same processes and buffer sets -- share
that level, and it cancels in their paired ratio r = time(NEW)/time(OLD), whose 95% interval
[r_lo, r_hi] the run already recorded (ratios.jsonl: the record with ``backend`` OLD and
``vs_backend`` NEW has ``speedup`` = time(vs)/time(backend) = time(NEW)/time(OLD)). So

    d    = log r
    se_d = sqrt(se_r² + run_sd²),   se_r = (log r_hi − log r_lo) / (2·1.96)

with ``run_sd`` 0 by default (both sides share the run and its processes; give one to allow
for a level the pairing does not cancel), and the same rule labels D = d ± 1.96·se_d
(:func:`label_log_change`, stated above once for both paths).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..output import read_rows
from .report import RATIO_KEY, RATIOS_FILE, RATIOS_STEM, ROWS_FILE, TABLE_STEM, tidy, tidy_ratios
from .runner import SCHEMA
from .sweep import KEY_COLUMNS

METRICS = ("copy", "baseline", "time")
LABELS = ("faster", "slower", "same", "ambiguous")
#: Equivalence margin: changes within ±5% are "the same".
DEFAULT_MARGIN = 0.05
DEFAULT_THRESHOLD = DEFAULT_MARGIN  # the option's old name
#: Between-run sd of log(metric) beyond the trials' (a fraction, ≈ %/100): the ``run`` level
#: that ``nbbn report variance`` measured on this project's 2-core host (median over points of
#: log(cpu/torch-cpu), results/reliability/variance: 4.9%). Another host measures its own and
#: passes it (``--run-sd``); round 3's placeholder 0.02 made cross-run compare cry wolf there.
DEFAULT_RUN_SD = 0.049
Z = 1.959964
RESULT_FILES = (ROWS_FILE, f"{TABLE_STEM}.csv", f"{TABLE_STEM}.json")
RATIO_FILES = (RATIOS_FILE, f"{RATIOS_STEM}.csv", f"{RATIOS_STEM}.json")
#: The columns that name a point (a configuration less its backend and variant).
POINT_COLUMNS = tuple(c for c in KEY_COLUMNS if c not in ("backend", "variant"))


class NotOurs(ValueError):
    """A file that is not an nbbn bench result; the message is one line."""


def _read(p: Path, path, what: str) -> pd.DataFrame:
    """A CSV, JSON list or JSON-lines file of rows -> DataFrame, checked for the bench schema;
    NotOurs (one line) otherwise. ``what`` names the file kind in messages."""
    if not p.is_file():
        raise NotOurs(f"{path}: no such file")
    try:
        if p.suffix == ".csv":
            df = pd.read_csv(p)
        elif p.suffix == ".json":
            data = json.loads(p.read_text(encoding="utf-8"))
            if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
                raise NotOurs(f"{path}: not a JSON list of rows, so not an nbbn {what}")
            df = pd.DataFrame(data)
        else:
            df = pd.DataFrame(read_rows(p))
    except NotOurs:
        raise
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NotOurs(f"{path}: cannot be read as an nbbn {what} ({first})") from None
    if "schema" not in df.columns or not len(df):
        raise NotOurs(f"{path}: not an nbbn {what} "
                      f"({'no rows' if not len(df) else 'missing column schema'})")
    family = SCHEMA.split("/")[0] + "/"
    schemas = set(df["schema"].astype(str))
    if not all(s.startswith(family) for s in schemas):
        raise NotOurs(f"{path}: not an nbbn {what} (schema is not {SCHEMA})")
    if schemas != {SCHEMA}:
        old = ", ".join(sorted(schemas - {SCHEMA}))
        raise NotOurs(f"{path}: rows of schema {old} carry no intervals; run nbbn bench again "
                      f"to compare ({SCHEMA})")
    return df


def _find(path, names: tuple[str, ...]) -> Path:
    """``path`` itself, or in a folder the first of ``names`` there."""
    p = Path(path)
    if p.is_dir():
        for name in names:
            if (p / name).is_file():
                return p / name
        raise NotOurs(f"{path}: no {', '.join(names[:-1])} or {names[-1]} in this folder")
    return p


def load_results(path: str | Path) -> pd.DataFrame:
    """A bench result: an output folder, rows.jsonl, bench.csv or bench.json."""
    df = _read(_find(path, RESULT_FILES), path, "bench result")
    missing = [c for c in ("status", *KEY_COLUMNS) if c not in df.columns]
    if missing:
        raise NotOurs(f"{path}: not an nbbn bench result (missing columns {', '.join(missing)})")
    return tidy(df.to_dict("records"))


def load_ratios(path: str | Path) -> pd.DataFrame:
    """A run's ratio records (every ordered pair of configurations at a point): an output
    folder, its ratios.jsonl, ratios.csv or ratios.json."""
    df = _read(_find(path, RATIO_FILES), path, "ratio file")
    missing = [c for c in RATIO_KEY + ("speedup", "speedup_ci_lo", "speedup_ci_hi")
               if c not in df.columns]
    if missing:
        raise NotOurs(f"{path}: not an nbbn ratio file (missing columns {', '.join(missing)})")
    return tidy_ratios(df.to_dict("records"))


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


def se_of(lo, hi) -> float:
    """Standard error of a log quantity from its 95% interval [lo, hi]:
    (log hi − log lo)/(2·1.96)."""
    return float((np.log(hi) - np.log(lo)) / (2 * Z))


def _positive(*vals) -> bool:
    return all(v is not None and np.isfinite(v) and v > 0 for v in vals)


def label_log_change(d: float, se: float, margin: float = DEFAULT_MARGIN):
    """(label, change, change_lo, change_hi) of a change d = log(new/old) with standard error
    ``se``: the one rule of the module docstring, D = d ± 1.96·se against ±log(1 + margin)."""
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


def label_change(a, a_lo, a_hi, b, b_lo, b_hi, margin: float = DEFAULT_MARGIN,
                 run_sd: float = DEFAULT_RUN_SD):
    """(label, change, change_lo, change_hi) of one configuration in two runs (the module
    docstring): se² = se_a² + se_b² + 2·run_sd²."""
    if not _positive(a, a_lo, a_hi, b, b_lo, b_hi):
        return "no interval", np.nan, np.nan, np.nan
    se = float(np.sqrt(se_of(a_lo, a_hi) ** 2 + se_of(b_lo, b_hi) ** 2 + 2 * run_sd ** 2))
    return label_log_change(float(np.log(b / a)), se, margin)


def label_ratio(r, r_lo, r_hi, margin: float = DEFAULT_MARGIN, run_sd: float = 0.0):
    """(label, change, change_lo, change_hi) of an in-run paired ratio r = time(NEW)/time(OLD)
    with its 95% interval (module docstring, "A/B in one run"): se² = se_r² + run_sd², run_sd
    0 unless given (both sides share the run)."""
    if not _positive(r, r_lo, r_hi):
        return "no interval", np.nan, np.nan, np.nan
    se = float(np.sqrt(se_of(r_lo, r_hi) ** 2 + run_sd ** 2))
    return label_log_change(float(np.log(r)), se, margin)


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


class PairError(ValueError):
    """A --pair that cannot be compared in this run; the message is one line."""


@dataclass(frozen=True)
class Side:
    """One side of an in-run pair: a backend and, optionally, one of its variants."""

    backend: str
    variant: str | None = None

    def __str__(self) -> str:
        return self.backend if self.variant is None else f"{self.backend}:{self.variant}"


def parse_pair(text: str) -> tuple[Side, Side]:
    """``NEW=OLD``, each ``BACKEND`` or ``BACKEND:VARIANT`` -> (new, old); PairError if
    malformed."""
    new, sep, old = str(text).partition("=")
    sides = []
    for part in (new, old):
        b, colon, v = part.strip().partition(":")
        if not b.strip() or (colon and not v.strip()) or "=" in part:
            sides = None
            break
        sides.append(Side(b.strip(), v.strip() if colon else None))
    if not sep or sides is None:
        raise PairError(f"bad --pair {text!r}: use NEW=OLD, each BACKEND or BACKEND:VARIANT "
                        "(e.g. cpu-slowed=cpu)")
    return sides[0], sides[1]


def _key(v) -> str:
    """A point column's value as a join key (3 and 3.0 alike, as CSV and JSON read them)."""
    if isinstance(v, float | np.floating) and np.isfinite(v) and float(v).is_integer():
        return str(int(v))
    return str(v)


def _pick(df: pd.DataFrame, side: Side, column: str = "backend",
          vcolumn: str = "variant") -> pd.DataFrame:
    sel = df[column].astype(str) == side.backend
    if side.variant is not None:
        sel &= df[vcolumn].astype(str) == side.variant
    return df[sel]


def compare_in_run(ratios: pd.DataFrame, new: Side, old: Side, margin: float = DEFAULT_MARGIN,
                   run_sd: float = 0.0, rows: pd.DataFrame | None = None) -> pd.DataFrame:
    """Label each point's paired ratio time(NEW)/time(OLD) of one run (module docstring, "A/B
    in one run"; :func:`label_ratio`). ``ratios``: the run's ratio records; ``rows``: its bench
    rows, if at hand, so that a point where one side was not timed says why.

    Sides without a variant pair each variant of NEW with the same variant of OLD; a side that
    names one pairs it with every matching variant of the other. The record with backend OLD
    and vs_backend NEW is used as it is (its speed-up is time(NEW)/time(OLD)); without it, the
    reverse record inverted. PairError (one line) for a backend or variant not in the run or a
    pair never timed together."""
    pair = f"{new}={old}"
    if new == old:
        raise PairError(f"--pair {pair}: compares a configuration with itself")
    both = pd.concat([ratios[["backend", "variant"]], ratios[["vs_backend", "vs_variant"]]
                      .set_axis(["backend", "variant"], axis=1)]).astype(str)
    there = sorted(set(ratios["backend"].astype(str)))
    for side in (new, old):
        if side.backend not in set(both["backend"]):
            raise PairError(f"--pair {pair}: backend {side.backend!r} was not timed in this run; "
                            f"its backends: {', '.join(there)}")
        if side.variant is not None and not len(_pick(both, side)):
            variants = sorted(set(_pick(both, Side(side.backend))["variant"]))
            raise PairError(f"--pair {pair}: {side.backend} has no variant {side.variant!r} in "
                            f"this run; its variants: {', '.join(variants)}")
    same_variant = new.variant is None and old.variant is None
    found: dict[tuple, tuple] = {}
    for direct in (False, True):  # the direct record wins: written last
        if direct:
            recs = _pick(_pick(ratios, old), new, "vs_backend", "vs_variant")
        else:
            recs = _pick(_pick(ratios, new), old, "vs_backend", "vs_variant")
        for r in recs.to_dict("records"):
            nv, ov = (r["vs_variant"], r["variant"]) if direct else (r["variant"], r["vs_variant"])
            if same_variant and str(nv) != str(ov):
                continue
            s, lo, hi = (pd.to_numeric(pd.Series([r["speedup"], r["speedup_ci_lo"],
                                                  r["speedup_ci_hi"]]), errors="coerce"))
            if not direct:  # time(OLD)/time(NEW) -> its inverse, interval flipped
                s, lo, hi = 1 / s, 1 / hi, 1 / lo
            point = tuple(_key(r[c]) for c in POINT_COLUMNS)
            found[(point, str(nv), str(ov))] = (r, s, lo, hi)
    if not found:
        raise PairError(f"--pair {pair}: {new} and {old} were never timed at the same point in "
                        "this run" + (" with the same variant (name one, e.g. "
                                      f"{new.backend}:VARIANT)" if same_variant else ""))
    out = []
    for (_point, nv, ov), (r, s, lo, hi) in found.items():
        lab, change, clo, chi = label_ratio(s, lo, hi, margin, run_sd)
        out.append({**{c: r[c] for c in POINT_COLUMNS}, "backend": new.backend, "variant": nv,
                    "vs_backend": old.backend, "vs_variant": ov, "trials": r.get("trials"),
                    "rounds": r.get("rounds"), "ratio": s, "ratio_lo": lo, "ratio_hi": hi,
                    "change": change, "change_lo": clo, "change_hi": chi, "label": lab})
    if rows is not None and len(rows):  # points where the pair was not timed together
        rn, ro = _pick(rows, new), _pick(rows, old)
        on = list(POINT_COLUMNS) + (["variant"] if same_variant else [])
        a = rn.assign(**{c: rn[c].map(_key) for c in POINT_COLUMNS})
        b = ro.assign(**{c: ro[c].map(_key) for c in POINT_COLUMNS})
        merged = a[on + (["variant"] if not same_variant else []) + ["status"]].merge(
            b[on + (["variant"] if not same_variant else []) + ["status"]], on=on, how="outer",
            suffixes=("_new", "_old"))
        for m in merged.to_dict("records"):
            nv = str(m.get("variant_new", m.get("variant")))
            ov = str(m.get("variant_old", m.get("variant")))
            point = tuple(m[c] for c in POINT_COLUMNS)
            if (point, nv, ov) in found:
                continue
            sn, so = m.get("status_new"), m.get("status_old")
            sn = sn if isinstance(sn, str) else "absent"
            so = so if isinstance(so, str) else "absent"
            lab = "not timed" if "ok" not in (sn, so) else f"not compared ({so} → {sn})"
            out.append({**{c: m[c] for c in POINT_COLUMNS}, "backend": new.backend,
                        "variant": nv, "vs_backend": old.backend, "vs_variant": ov,
                        "change": np.nan, "change_lo": np.nan, "change_hi": np.nan,
                        "label": lab})
    table = pd.DataFrame(out)
    table.insert(0, "metric", "time in run")
    return table


def counts_line(table: pd.DataFrame) -> str:
    counts = table["label"].value_counts()
    labels = list(LABELS) + [lb for lb in counts.index if lb not in LABELS]
    return ", ".join(f"{counts.get(lb, 0)} {lb}" for lb in labels)
