"""The one output plumbing of every nbbn command: tidy rows on disk, tables, Markdown, the
environment a run was made in, the command that made it, and the host's load.

Rows are plain dicts, one per measured thing, units in the column names. While a run goes, each
finished row is appended to a JSON-lines file and flushed to disk (``fsync``), so an interrupted
run keeps every finished row, uncorrupted; a torn last line (the process killed mid-write) is
dropped on reading. Summaries (pivots, speed-ups) are derived from the rows and are never the only
copy: the tidy tables are always written next to them (:func:`write_tables`: CSV).

JSON conventions (rows and tables alike): NumPy scalars are unwrapped, NaN is ``null`` and ±inf
is the string ``"inf"`` / ``"-inf"`` (JSON has no infinities).

Environment (:func:`environment`): versions, threads, CPU model and cache sizes, platform -- the
columns every result row of every command carries. :func:`load_average` and
:func:`wait_for_quiet` measure and wait for a quiet host; :func:`command_line` echoes the click
command that made a run (non-default options only).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

# ---------------------------------------------------------------------------------------------
# Rows: the append-only log


def plain(v):
    """JSON-safe scalar: NumPy scalars unwrapped, NaN/NA as None, ±inf as "inf"/"-inf"."""
    if v is None or v is pd.NA or v is pd.NaT:
        return None
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
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
        cells = {k: plain(v) for k, v in row.items()}
        line = json.dumps({k: v for k, v in cells.items() if v is not None}, allow_nan=False)
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


# ---------------------------------------------------------------------------------------------
# Tables and text


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to a temporary name beside ``path``, then rename it into place."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def write_tables(df: pd.DataFrame, stem: str | os.PathLike) -> list[Path]:
    """``stem.csv``, written to a temporary name and then renamed into place. CSV is the one
    format of every committed table (NaN is an empty cell); the JSON-lines row logs are the
    only JSON, where a run appends as it goes."""
    stem = Path(stem)
    csv = stem.with_name(stem.name + ".csv")
    tmp = csv.with_name(csv.name + ".tmp")
    df.to_csv(tmp, index=False)
    os.replace(tmp, csv)
    return [csv]


def _cell(v, fmt: str) -> str:
    if v is None or v is pd.NA:
        return ""
    if isinstance(v, float | np.floating):
        if math.isnan(v):
            return ""
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return format(float(v), fmt)
    return str(v).replace("|", "\\|")


def markdown_table(df: pd.DataFrame, fmt: str = ".3g", index: bool = True) -> str:
    """A GitHub pipe table (no tabulate dependency): floats with ``fmt``, NaN blank; index
    levels become columns."""
    if index:
        df = df.reset_index()
    cols = [" / ".join(str(c) for c in col) if isinstance(col, tuple) else str(col)
            for col in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v, fmt) for v in row) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# The environment


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


_SIZE = re.compile(r"^\s*([\d.]+)\s*([KMG]?)(i?B)?\s*$", re.IGNORECASE)
_UNIT = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def _size_bytes(text: str) -> int | None:
    """"32K", "32768K", "1 MiB", "512 KiB" -> bytes."""
    m = _SIZE.match(text.split("(")[0])
    if not m:
        return None
    return int(float(m[1]) * _UNIT[m[2].upper()])


def cache_sizes() -> dict[str, int | None]:
    """Per-core data-cache sizes in bytes: ``cache_l1d_bytes``, ``cache_l2_bytes`` (what one core
    sees: /sys/devices/system/cpu/cpu0/cache), ``cache_l3_bytes`` (the shared last level), read
    from sysfs, else from ``lscpu`` (whose figures for L1/L2 are totals over the cores, divided
    by their instance count here). Missing levels are None."""
    out: dict[str, int | None] = {"cache_l1d_bytes": None, "cache_l2_bytes": None,
                                  "cache_l3_bytes": None}
    base = Path("/sys/devices/system/cpu/cpu0/cache")
    try:
        for idx in sorted(base.glob("index*")):
            level = (idx / "level").read_text().strip()
            kind = (idx / "type").read_text().strip()
            size = _size_bytes((idx / "size").read_text().strip())
            if kind == "Instruction" or size is None:
                continue
            name = f"cache_l{level}{'d' if level == '1' else ''}_bytes"
            if name in out:
                out[name] = size
    except OSError:
        pass
    if all(v is None for v in out.values()):
        try:
            text = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5).stdout
        except (OSError, subprocess.SubprocessError):
            text = ""
        for line in text.splitlines():
            m = re.match(r"^(L1d|L2|L3) cache:\s*(.+?)(?:\((\d+) instances?\))?\s*$", line.strip())
            if m:
                size = _size_bytes(m[2])
                if size is not None:
                    name = {"L1d": "cache_l1d_bytes", "L2": "cache_l2_bytes",
                            "L3": "cache_l3_bytes"}[m[1]]
                    out[name] = size // int(m[3] or 1) if m[1] != "L3" else size
    return out


def last_level_cache_bytes(sizes: dict | None = None) -> int:
    """The largest cache level known (L3, else L2, else L1d); 32 MiB if none could be read."""
    sizes = cache_sizes() if sizes is None else sizes
    for name in ("cache_l3_bytes", "cache_l2_bytes", "cache_l1d_bytes"):
        if sizes.get(name):
            return int(sizes[name])
    return 32 << 20


def environment() -> dict:
    """Columns shared by every row of a run: versions, threads, CPU, caches, platform.

    ``torch_version`` is the installed distribution (empty if none); ``torch_threads`` is read
    only when torch is already imported (None otherwise), so capturing the environment never
    imports it. ``cudasim``: Numba's CUDA simulator is on."""
    import numba

    from . import __version__

    torch = sys.modules.get("torch")
    return {
        "nbbn_version": __version__,
        "numba_version": numba.__version__,
        "numpy_version": np.__version__,
        "torch_version": _version("torch"),
        "python_version": platform.python_version(),
        "threads": numba.get_num_threads(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "cpu": cpu_model(),
        "cpu_count": os.cpu_count(),
        "platform": f"{platform.system()} {platform.machine()}",
        **cache_sizes(),
        "cudasim": bool(numba.config.ENABLE_CUDASIM),
        "output_pool": _pool_setting(),
    }


def _pool_setting() -> str:
    """The CPU output pool as a run met it (nbbn.pool): allocating calls (``--call api``)
    of at least min_bytes reuse dropped outputs when it is on."""
    from . import pool

    s = pool.stats()
    if not s["enabled"]:
        return "off"
    return f"on (>= {s['min_bytes']} B, max {s['max_bytes']} B)"


# ---------------------------------------------------------------------------------------------
# The host's load


def short_environment() -> dict:
    """The environment columns of the accuracy study's and the paper's rows (a subset of
    :func:`environment` under shorter names)."""
    env = environment()
    return {"nbbn_version": env["nbbn_version"], "numba_version": env["numba_version"],
            "numpy_version": env["numpy_version"], "python_version": env["python_version"],
            "threads": env["threads"], "cpu": env["cpu"], "cpus": env["cpu_count"],
            "cudasim": env["cudasim"]}


def load_average() -> float | None:
    """The host's 1-minute load average now (None where the OS has none)."""
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):
        return None


#: The quiet rule, stated once: a run is quiet when the 1-minute load before it and the CPU
#: that other processes used during it (cores, averaged over the run) are both below this.
QUIET_BELOW = 0.5


def _host_cpu_seconds() -> tuple[float, float] | None:
    """(busy, steal): CPU seconds all CPUs spent busy (user, nice, system, irq, softirq) and
    stolen by the hypervisor since boot, from Linux's /proc/stat (None elsewhere)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        hz = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    if not fields or fields[0] != "cpu" or len(fields) < 9:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[1:9])
    return (user + nice + system + irq + softirq) / hz, steal / hz


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its children that have been waited for (the bench's
    worker processes, once the pool is shut down)."""
    import resource

    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


class OtherCpu:
    """The CPU that other processes used while a run went on, in cores on average: the host's
    busy time from /proc/stat minus this process tree's own, over the wall time. The 1-minute
    load average cannot say this: during a run it counts the run's own threads (~threads), so
    every run read as busy; and steal, the hypervisor's share, is what a shared VM loses.

    ``start()`` before the run; ``stop()`` after every child process has been waited for
    returns {"other_cpu_cores": ..., "steal_cores": ...} (empty off Linux)."""

    def __init__(self):
        self._t0 = self._host0 = self._own0 = None

    def start(self) -> None:
        self._t0, self._host0, self._own0 = (time.monotonic(), _host_cpu_seconds(),
                                             _own_cpu_seconds())

    def stop(self) -> dict:
        host = _host_cpu_seconds()
        if host is None or self._host0 is None:
            return {}
        wall = max(time.monotonic() - self._t0, 1e-9)
        others = (host[0] - self._host0[0]) - (_own_cpu_seconds() - self._own0)
        return {"other_cpu_cores": round(max(others, 0.0) / wall, 3),
                "steal_cores": round((host[1] - self._host0[1]) / wall, 3)}


def is_quiet(meta: dict) -> bool:
    """A run's ``run.json`` by :data:`QUIET_BELOW`: the load before the run, and other
    processes' CPU during it where measured (runs before round 7 have only the load before).
    The loads during and after are not judged: they include the run's own threads."""
    before = meta.get("load_before_1m")
    other = meta.get("other_cpu_cores")
    return before is not None and before < QUIET_BELOW and (other is None or other < QUIET_BELOW)


def load_facts(meta: dict) -> str:
    """What :func:`is_quiet` reads, as text: the load before, other processes' CPU (and the
    hypervisor's steal) during the run."""
    before = meta.get("load_before_1m")
    other = meta.get("other_cpu_cores")
    steal = meta.get("steal_cores")
    parts = [f"1-minute load average before the run {before:g}" if before is not None
             else "1-minute load average before the run -"]
    if other is not None:
        parts.append(f"other processes' CPU during the run {other:.2f} cores"
                     + (f" (hypervisor steal {steal:.2f})" if steal is not None else ""))
    else:
        parts.append("other processes' CPU during the run not measured")
    return "; ".join(parts)


def quiet_verdict(meta: dict) -> tuple[str, bool]:
    """(text, quiet): :func:`load_facts` with :func:`is_quiet`'s verdict."""
    quiet = is_quiet(meta)
    return (f"{load_facts(meta)}: the host was **{'quiet' if quiet else 'NOT quiet'}** "
            f"(quiet: both < {QUIET_BELOW:g})", quiet)


def wait_for_quiet(threshold: float, timeout: float, poll: float = 5.0,
                   echo: Callable[[str], None] | None = None,
                   sleep: Callable[[float], None] = time.sleep) -> tuple[bool, float | None]:
    """Wait (at most ``timeout`` seconds, polling every ``poll``) until the 1-minute load
    average is below ``threshold``. Returns (quiet, last load). A host without a load average
    counts as quiet (nothing can be measured). The 1-minute average decays with a one-minute
    time constant, so after other work stops it takes about 1.6 min to fall from 2.5 to 0.5."""
    start = time.monotonic()
    said = False
    while True:
        load = load_average()
        if load is None or load < threshold:
            return True, load
        waited = time.monotonic() - start
        if waited >= timeout:
            return False, load
        if echo is not None and not said:
            echo(f"Waiting up to {timeout:g} s for a quiet host (1-minute load {load:.2f}, "
                 f"want < {threshold:g}) ...")
            said = True
        sleep(min(poll, max(timeout - waited, 0.0)))


# ---------------------------------------------------------------------------------------------
# The command echo


def command_line(ctx, prog: str = "nbbn") -> str:
    """The command that reproduces a click invocation: ``prog`` and the sub-command's name, then
    every option not left at its default (flags by their own spelling, lists joined by
    commas), then the arguments. A sub-command of a group (``nbbn report targets``) keeps its
    group's name."""
    names, c = [], ctx
    while c.parent is not None:
        names.insert(0, c.info_name or c.command.name)
        c = c.parent
    words = [prog, *(names or [ctx.command.name])]
    for param in ctx.command.params:
        if param.name is None or param.name not in ctx.params:
            continue
        src = ctx.get_parameter_source(param.name)
        if src is None or src.name == "DEFAULT":
            continue
        value = ctx.params[param.name]
        if getattr(param, "param_type_name", "") == "argument":
            values = value if isinstance(value, tuple | list) else (value,)
            words += [str(v) for v in values]
            continue
        if getattr(param, "is_flag", False):
            if getattr(param, "secondary_opts", None) and not value:
                words.append(param.secondary_opts[0])
            elif value:
                words.append(param.opts[0] if len(param.opts[0]) > 2 else param.opts[-1])
            continue
        long = max(param.opts, key=len)
        values = value if getattr(param, "multiple", False) else (value,)
        for v in values:
            if isinstance(v, tuple | list):
                v = ",".join(str(x) for x in v)
            words += [long, str(v)]
    return shlex.join(words)


# ---------------------------------------------------------------------------------------------
# Figures: one plot style for every command


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None with the reason when matplotlib
    is missing or broken (commands then write their tables and say why there are no figures):
    ``plt, why = pyplot()``."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as exc:
        return None, (f"plots skipped: matplotlib is not usable here ({type(exc).__name__}: "
                      f"{exc}; pip install 'nbbn[plot]')")
    return plt, None


def save_figure(fig, path: str | os.PathLike) -> Path:
    """The one figure style: few major ticks and no minor ones on log axes (ticks dominate
    drawing time), a tight layout, PNG at 90 dpi; the figure is closed."""
    from matplotlib import pyplot as plt
    from matplotlib.ticker import LogLocator, NullLocator

    for ax in fig.axes:
        for axis, scale in ((ax.xaxis, ax.get_xscale()), (ax.yaxis, ax.get_yscale())):
            if scale == "log":
                axis.set_major_locator(LogLocator(base=10, numticks=7))
            if scale in ("log", "symlog"):
                axis.set_minor_locator(NullLocator())
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return Path(path)
