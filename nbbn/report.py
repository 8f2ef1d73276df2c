"""Tidy result rows: an append-only log on disk, then DataFrames, CSV, JSON and Markdown.

Rows are plain dicts, one per (kernel, point), units in the column names. While a run goes, each
finished row is appended to a JSON-lines file and flushed to disk (``fsync``), so an interrupted
run keeps every finished row, uncorrupted; a torn last line (the process killed mid-write) is
dropped on reading. Summaries (pivots, speed-ups) are derived from these rows and are never the
only copy: the tidy rows are always written next to them.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
import pandas as pd


def _plain(v):
    """JSON-safe scalar: NumPy scalars unwrapped, NaN/Inf as None."""
    if v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


class RowLog:
    """Append-only JSON-lines file, one row per line, flushed and fsync'ed after each row."""

    def __init__(self, path: str | os.PathLike, resume: bool = False):
        self.path = Path(path)
        if resume and self.path.exists():
            drop_torn_tail(self.path)
            self._f = open(self.path, "a", encoding="utf-8")
        else:
            self._f = open(self.path, "w", encoding="utf-8")

    def write(self, row: dict) -> None:
        """One line per row; empty (None/NaN) cells are left out (:func:`frame` restores them)."""
        plain = {k: _plain(v) for k, v in row.items()}
        line = json.dumps({k: v for k, v in plain.items() if v is not None}, allow_nan=False)
        self._f.write(line + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def drop_torn_tail(path: Path) -> None:
    """Cut the file after its last complete line (a write interrupted by a kill)."""
    data = path.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """Rows of a JSON-lines file; a torn final line is skipped, any other bad line raises."""
    rows = []
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"line {i + 1} is not JSON") from None
        if not isinstance(row, dict):
            raise ValueError(f"line {i + 1} is not a JSON object")
        rows.append(row)
    return rows


def frame(rows: list[dict], columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Rows -> DataFrame with ``columns`` first (missing ones added empty), others after."""
    df = pd.DataFrame(rows)
    for c in columns:
        if c not in df.columns:
            df[c] = None
    rest = [c for c in df.columns if c not in columns]
    return df[list(columns) + rest]


def write_tables(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """``stem.csv`` and ``stem.json`` (a list of records, empty cells left out), each written to
    a temporary name and then renamed."""
    stem = Path(stem)
    paths = []
    def to_json(p):
        records = [{k: _plain(v) for k, v in rec.items()} for rec in df.to_dict("records")]
        records = [{k: v for k, v in rec.items() if v is not None} for rec in records]
        p.write_text(json.dumps(records, allow_nan=False) + "\n", encoding="utf-8")

    for suffix, write in ((".csv", lambda p: df.to_csv(p, index=False)), (".json", to_json)):
        path = stem.with_suffix(suffix)
        tmp = path.with_name(path.name + ".tmp")
        write(tmp)
        os.replace(tmp, path)
        paths.append(path)
    return paths


def _cell(v, floatfmt: str) -> str:
    if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
        return ""
    if isinstance(v, float | np.floating):
        return format(float(v), floatfmt)
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, floatfmt: str = ".3g", index: bool = True) -> str:
    """A GitHub Markdown table (no tabulate dependency); index levels become columns."""
    if index:
        df = df.reset_index()
    cols = [" / ".join(map(str, c)) if isinstance(c, tuple) else str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |",
             "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, floatfmt) for v in row) + " |")
    return "\n".join(lines)
