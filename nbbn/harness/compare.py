"""Two bench result files -> each configuration labelled faster, slower or same.

A configuration (backend, op, layout, dtype, N, C, H, W) present and ``ok`` in both files is
``same`` when the new p20–p80 interval overlaps the old one, else ``faster`` (new p80 below old
p20) or ``slower`` (new p20 above old p80). ``ratio`` = old p50 ÷ new p50 (> 1: new is faster).
Configurations in one file only, or not ``ok`` in one, are listed with that label; those timed
in neither file (skipped, failed or raised in both) are labelled ``not timed``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ..report import read_rows
from .report import ROWS_FILE, TABLE_STEM, tidy
from .runner import SCHEMA
from .sweep import KEY_COLUMNS

TIME_COLUMNS = ("time_ms_p20", "time_ms_p50", "time_ms_p80")


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
    needed = ("schema", "status", *KEY_COLUMNS)  # time columns may be absent if none was timed
    missing = [c for c in needed if c not in df.columns]
    if missing or not len(df):
        why = f"missing columns {', '.join(missing)}" if missing else "no rows"
        raise NotOurs(f"{path}: not an nbbn bench result ({why})")
    family = SCHEMA.split("/")[0] + "/"
    if not df["schema"].astype(str).str.startswith(family).all():
        raise NotOurs(f"{path}: not an nbbn bench result (schema is not {SCHEMA})")
    return tidy(df.to_dict("records"))


def compare(old: pd.DataFrame, new: pd.DataFrame) -> pd.DataFrame:
    keys = list(KEY_COLUMNS)
    cols = keys + ["status", *TIME_COLUMNS]
    merged = old[cols].merge(new[cols], on=keys, how="outer", suffixes=("_old", "_new"),
                             indicator=True, sort=False)
    labels, ratios = [], []
    for r in merged.to_dict("records"):
        ratio = None
        if r["_merge"] == "left_only":
            label = "only in old" if r["status_old"] == "ok" else "not timed"
        elif r["_merge"] == "right_only":
            label = "only in new" if r["status_new"] == "ok" else "not timed"
        elif r["status_old"] != "ok" and r["status_new"] != "ok":
            label = "not timed"
        elif r["status_old"] != "ok" or r["status_new"] != "ok":
            label = f"not compared ({r['status_old']} → {r['status_new']})"
        else:
            ratio = r["time_ms_p50_old"] / r["time_ms_p50_new"]
            if r["time_ms_p80_new"] < r["time_ms_p20_old"]:
                label = "faster"
            elif r["time_ms_p20_new"] > r["time_ms_p80_old"]:
                label = "slower"
            else:
                label = "same"
        labels.append(label)
        ratios.append(ratio)
    merged = merged.drop(columns="_merge")
    merged["ratio"] = pd.array(ratios, dtype="Float64")
    merged["label"] = labels
    return merged
