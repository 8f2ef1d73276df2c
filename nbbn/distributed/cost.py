"""What synchronized batch norm costs: ``nbbn distributed bench``.

For each number of ranks K (``--ranks 1,2``) the command starts ``mpiexec -n K`` on this
machine; every rank holds the same per-rank shape (weak scaling) and times, on the same data:

* ``local``: :func:`nbbn.batch_norm_train` / :func:`nbbn.batch_norm_backward` (no collective);
* ``sync``: :func:`nbbn.distributed.batch_norm_train` / ``batch_norm_backward``;
* ``sync_allgather``: the same call with ``method="allgather"`` (the first design);
* ``exchange``: the first design's collectives alone -- header ``Allgather`` + ``Allgather`` of
  (μ_r, M2_r) + the rank-order merge (forward), header + ``Allreduce`` of 2·C float64 (backward).

The calls are paired and interleaved (local, sync in alternating order), each after a
``Barrier``; an iteration's time is the slowest rank's, as a training step waits for it. The
overhead of synchronizing is the median of the paired differences sync − local, with a 95%
distribution-free interval (order statistics of the differences), and its share is overhead /
median(sync). Numba runs ``--threads`` threads per rank (default 1: ranks share the cores).

Time it on a quiet machine; the report states the host load before and after.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import click
import numpy as np

from .costmodel import costmodel, parse_ranks

#: Per-rank shapes: NC (N, C) and NCHW (N, C, H, W), channels first.
DEFAULT_SHAPES = ("NC:64x64", "NC:1024x256", "NC:8192x1024",
                  "NCHW:8x64x14x14", "NCHW:32x256x14x14", "NCHW:16x64x56x56")
QUICK_SHAPES = ("NC:64x16", "NCHW:4x8x6x6")


def parse_shapes(text) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for item in (text.split(",") if isinstance(text, str) else text):
        item = item.strip()
        if not item:
            continue
        try:
            layout, dims = item.split(":")
            shape = tuple(int(d) for d in dims.lower().split("x"))
        except ValueError:
            raise click.BadParameter(f"{item!r}: write LAYOUT:NxC or LAYOUT:NxCxHxW") from None
        layout = layout.upper()
        if (layout, len(shape)) not in (("NC", 2), ("NCHW", 4)) or min(shape) < 1:
            raise click.BadParameter(f"{item!r}: NC takes N x C, NCHW takes N x C x H x W, "
                                     "all ≥ 1")
        out.append((layout, shape))
    if not out:
        raise click.BadParameter("no shapes")
    return out


def _interval(d: np.ndarray) -> tuple[float, float]:
    """95% distribution-free interval of the median of d (binomial order statistics)."""
    s = np.sort(d)
    n = len(s)
    half = 1.96 * math.sqrt(n) / 2
    lo = max(0, int(math.floor(n / 2 - half)))
    hi = min(n - 1, int(math.ceil(n / 2 + half)))
    return float(s[lo]), float(s[hi])


# ------------------------------------------------------------------------------ the worker


def _calls(comm, shape, rank: int) -> dict:
    """The six timed calls on one rank's data of ``shape`` (float32, channels first)."""
    from mpi4py import MPI

    import nbbn

    from . import sync as nbd
    from .sync import merge_stats
    from .wire import F, LocalCall, exchange_header

    rng = np.random.default_rng(1000 + rank)
    K, C = comm.Get_size(), shape[1]
    x = (3.0 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    gamma, beta = np.ones(C, np.float32), np.zeros(C, np.float32)
    m = x.size // C
    payload, gathered, total = np.zeros(2 * C), np.empty((K, 2 * C)), np.empty(2 * C)
    saved = {}

    def local_fwd():
        saved["local"] = nbbn.batch_norm_train(x, gamma, beta)

    def sync_fwd():
        saved["sync"] = nbd.batch_norm_train(x, gamma, beta, comm=comm)

    def ag_fwd():
        saved["ag"] = nbd.batch_norm_train(x, gamma, beta, comm=comm, method="allgather")

    def ag_bwd():
        nbd.batch_norm_backward(dy, x, saved["ag"][1], saved["ag"][2], gamma, comm=comm,
                                method="allgather")

    def local_bwd():
        nbbn.batch_norm_backward(dy, x, saved["local"][1], saved["local"][2], gamma)

    def sync_bwd():
        nbd.batch_norm_backward(dy, x, saved["sync"][1], saved["sync"][2], gamma, comm=comm)

    def exch_fwd():
        loc = LocalCall("batch_norm_train")
        loc.describe(shape, np.float32, 1, m)
        headers = exchange_header(comm, loc)
        comm.Allgather(payload, gathered)
        merge_stats(headers[:, F["count"]], gathered[:, :C], gathered[:, C:])

    def exch_bwd():
        loc = LocalCall("batch_norm_backward")
        loc.describe(shape, np.float32, 1, m)
        exchange_header(comm, loc)
        comm.Allreduce(payload, total, op=MPI.SUM)

    return {"local_fwd": local_fwd, "sync_fwd": sync_fwd, "local_bwd": local_bwd,
            "sync_bwd": sync_bwd, "exch_fwd": exch_fwd, "exch_bwd": exch_bwd,
            "ag_fwd": ag_fwd, "ag_bwd": ag_bwd}


def _time_shape(comm, layout: str, shape, reps: int, budget_s: float) -> list[dict]:
    """Paired, interleaved timings of one per-rank shape; the rows on rank 0, [] elsewhere."""
    from mpi4py import MPI

    perf = time.perf_counter
    calls = _calls(comm, shape, comm.Get_rank())
    pairs = (("local_fwd", "sync_fwd"), ("local_bwd", "sync_bwd"))

    def timed(name):
        comm.Barrier()
        t0 = perf()
        calls[name]()
        return perf() - t0

    for name in calls:  # compile / load on first use
        timed(name)
    t0 = perf()
    for _ in range(3):
        for name in calls:
            timed(name)
    per_iter = comm.allreduce((perf() - t0) / 3, op=MPI.MAX)
    n = int(comm.bcast(max(10, min(reps, int(budget_s / max(per_iter, 1e-9)))), root=0))
    times = {k: np.empty(n) for k in calls}
    for i in range(n):
        for a, b in pairs:
            first, second = (a, b) if i % 2 == 0 else (b, a)
            times[first][i] = timed(first)
            times[second][i] = timed(second)
        for e in ("exch_fwd", "exch_bwd", "ag_fwd", "ag_bwd"):
            times[e][i] = timed(e)
    every = comm.gather(times, root=0)
    if every is None:
        return []
    slowest = {k: np.max([t[k] for t in every], axis=0) for k in calls}
    rows = []
    for op, (a, b), e, g in (("forward-train", pairs[0], "exch_fwd", "ag_fwd"),
                             ("backward", pairs[1], "exch_bwd", "ag_bwd")):
        loc, syn = slowest[a], slowest[b]
        d = syn - loc
        lo, hi = _interval(d)
        rows.append({
            "ranks": comm.Get_size(), "op": op, "layout": layout,
            "shape_per_rank": "x".join(map(str, shape)), "C": shape[1],
            "m_per_rank": int(np.prod(shape)) // shape[1], "dtype": "float32", "reps": n,
            "local_us_p50": 1e6 * float(np.median(loc)),
            "sync_us_p50": 1e6 * float(np.median(syn)),
            "overhead_us_p50": 1e6 * float(np.median(d)),
            "overhead_us_lo95": 1e6 * lo, "overhead_us_hi95": 1e6 * hi,
            "overhead_share": float(np.median(d) / np.median(syn)),
            "exchange_us_p50": 1e6 * float(np.median(slowest[e])),
            "sync_allgather_us_p50": 1e6 * float(np.median(slowest[g])),
        })
    return rows


def _worker(shapes, reps: int, budget_s: float, out_json: str) -> None:
    """Runs on every rank under mpiexec; rank 0 writes the rows."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rows = []
    for layout, shape in shapes:
        rows += _time_shape(comm, layout, shape, reps, budget_s)
    if comm.Get_rank() == 0:
        Path(out_json).write_text(json.dumps(rows), encoding="utf-8")


# ------------------------------------------------------------------------------ the command


def _environment(threads: int) -> dict:
    import mpi4py
    from mpi4py import MPI

    from ..output import cpu_model as _cpu_model
    from ..output import environment

    env = environment()
    env["threads"] = threads
    env["mpi4py_version"] = mpi4py.__version__
    env["mpi_library"] = MPI.Get_library_version().split(",")[0].strip()
    env["cpu_model"] = _cpu_model()
    return env


def _markdown(df, meta: dict) -> str:
    from ..output import markdown_table

    cols = ["ranks", "op", "layout", "shape_per_rank", "local_us_p50", "sync_us_p50",
            "overhead_us_p50", "overhead_us_lo95", "overhead_us_hi95", "overhead_share",
            "exchange_us_p50", "sync_allgather_us_p50", "reps"]
    t = df[cols].copy()
    t["overhead_share"] = (100 * t["overhead_share"]).map(lambda v: f"{v:.1f}%")
    lines = [
        "# Synchronized batch norm over MPI: what the collectives cost",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Run {meta['date']} on {meta['cpu_model']} ({meta['cpu_count']} CPUs), "
        f"{meta['mpi_library']}, mpi4py {meta['mpi4py_version']}, Python "
        f"{meta['python_version']}, NumPy {meta['numpy_version']}, Numba "
        f"{meta['numba_version']}, nbbn {meta['nbbn_version']}; {meta['threads']} Numba "
        f"thread(s) per rank; host load (1-min average) {meta['load_before']:.2f} before, "
        f"{meta['load_after']:.2f} after; wall time {meta['wall_s']:.0f} s.",
        "",
        "Per-rank shapes (every rank holds the same; float32, channels first). `local`: nbbn's "
        "own call on the rank's slice, no communication; `sync`: `nbbn.distributed` on the "
        "same data (default method: one exact `Allreduce` carrying header and data, + the "
        "local passes); `sync_allgather`: the same call with `method=\"allgather\"` (the "
        "first design: header `Allgather` + data collective); `overhead` = "
        "median of the paired differences sync − local with its 95% interval; share = "
        "overhead / sync; `exchange`: the first design's collectives (and merge) alone. Times "
        "are the "
        "slowest rank's per iteration, in µs. Method: the docstring of "
        "`nbbn/distributed/cost.py`.",
        "",
        markdown_table(t, ".4g", index=False),
        "",
    ]
    return "\n".join(lines)


@click.group("distributed", context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Synchronized batch norm over MPI (nbbn.distributed)."""


def _check_out(out: str) -> Path:
    """The report's path, checked before any rank starts: a file path (not a folder) whose folder
    exists or can be made and is writable."""
    path = Path(out)
    if path.exists() and path.is_dir():
        raise click.BadParameter(f"{out!r} is a folder; give the report's file name, "
                                 "e.g. results/distributed.md", param_hint="--out")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise click.BadParameter(f"cannot make {str(path.parent)!r}: {e.strerror}",
                                 param_hint="--out") from None
    if not os.access(path.parent, os.W_OK):
        raise click.BadParameter(f"{str(path.parent)!r} is not writable", param_hint="--out")
    return path


@cli.command("bench")
@click.option("--ranks", default="1,2", show_default=True, help="Numbers of ranks, e.g. 1,2,4.")
@click.option("--shapes", default=None,
              help="Per-rank shapes, LAYOUT:NxC or LAYOUT:NxCxHxW, comma-separated "
                   f"[default: {','.join(DEFAULT_SHAPES)}; with --quick: "
                   f"{','.join(QUICK_SHAPES)}].")
@click.option("--reps", default=300, show_default=True, type=click.IntRange(min=10),
              help="Most paired iterations per shape.")
@click.option("--budget", default=8.0, show_default=True,
              type=click.FloatRange(min=0, min_open=True, max=1e6),
              help="Seconds of timed iterations per shape at most (at least 10 iterations).")
@click.option("--threads", default=1, show_default=True, type=click.IntRange(min=1),
              help="Numba threads per rank.")
@click.option("--quick", is_flag=True,
              help="Two tiny shapes (unless --shapes), 20 iterations: a smoke test.")
@click.option("--timeout", default=1800, show_default=True, type=click.IntRange(min=1),
              help="Seconds before an mpiexec run is killed.")
@click.option("--out", default="results/distributed.md", show_default=True,
              help="Markdown report; the rows go beside it as .csv (and .rows.jsonl while the "
                   "run goes, one line per finished row).")
@click.pass_context
def bench(ctx, ranks, shapes, reps, budget, threads, quick, timeout, out):
    """Time synchronized forward/backward against the local calls at each number of ranks."""
    from ..output import RowLog, command_line, frame, read_rows, write_tables
    from .launch import mpiexec_command, rank_environment

    shape_list = parse_shapes(shapes if shapes is not None
                              else ",".join(QUICK_SHAPES if quick else DEFAULT_SHAPES))
    if quick:
        reps, budget = 20, 0.5
    rank_list = parse_ranks(ranks)
    out_path = _check_out(out)
    try:
        launcher = {K: mpiexec_command(K) for K in rank_list}
    except FileNotFoundError as e:
        raise click.ClickException(str(e)) from None
    n_cfg = len(rank_list) * len(shape_list) * 2
    click.echo(f"{n_cfg} configurations (ranks {rank_list} × {len(shape_list)} shapes × "
               "forward-train, backward), float32", err=True)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    # Every rank count's rows go straight into a log beside the report (never only into a
    # temporary place), so a failure at K ranks keeps the rows of the counts before it.
    log_path = out_path.with_suffix(".rows.jsonl")
    spec = json.dumps([[lay, list(s)] for lay, s in shape_list])
    with RowLog(log_path) as log:
        for K in rank_list:
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "rows.json")
                cmd = launcher[K] + [sys.executable, "-m", "nbbn.distributed.cost", "_worker",
                                     spec, str(reps), str(budget), path]
                click.echo(f"ranks {K}: {shlex.join(cmd)}", err=True)
                try:
                    proc = subprocess.run(cmd, env=rank_environment(threads), timeout=timeout,
                                          capture_output=True, text=True)
                except subprocess.TimeoutExpired:
                    raise click.ClickException(f"mpiexec -n {K} did not finish in {timeout} s; "
                                               f"finished rows are in {log_path}") from None
                if proc.returncode != 0 or not os.path.exists(path):
                    tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
                    raise click.ClickException(
                        f"mpiexec -n {K} failed (exit {proc.returncode}): {tail[0]}; finished "
                        f"rows are in {log_path}")
                for row in json.loads(Path(path).read_text(encoding="utf-8")):
                    log.write(row)
    rows = read_rows(log_path)
    meta = {**_environment(threads), "load_before": load_before,
            "load_after": os.getloadavg()[0], "wall_s": time.perf_counter() - t_start,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line(ctx),
            "host": platform.node()}
    env_cols = {k: meta[k] for k in ("nbbn_version", "numba_version", "numpy_version",
                                     "python_version", "threads", "cpu_count", "platform",
                                     "cpu_model", "mpi_library", "mpi4py_version")}
    df = frame([{**r, **env_cols, "load_before": load_before, "load_after": meta["load_after"]}
                for r in rows])
    write_tables(df, out_path.with_suffix(""))
    out_path.write_text(_markdown(df, meta), encoding="utf-8")
    log_path.unlink()
    click.echo(f"wrote {out_path} (+ .csv): {len(df)} rows in {meta['wall_s']:.0f} s",
               err=True)


cli.add_command(costmodel)  # `nbbn distributed costmodel` (nbbn/distributed/costmodel.py)


if __name__ == "__main__":
    # The worker each rank runs under mpiexec (an internal entry point, not a user command).
    _spec, _reps, _budget, _out = sys.argv[2:6]
    _worker([(lay, tuple(s)) for lay, s in json.loads(_spec)], int(_reps), float(_budget), _out)
