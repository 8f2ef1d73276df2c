"""An α–β cost model of synchronized BN, fitted on this host, extrapolated to clusters:
``nbbn distributed costmodel``.

Model (Hockney's α–β with the usual collective algorithms, Thakur, Rabenseifner & Gropp 2005).
One collective whose every rank contributes ``m`` bytes on P ranks costs::

    t = t0 + α·⌈log2 P⌉ + β·m·f(P)

    allgather  f(P) = P − 1          (ring or recursive doubling: each rank receives (P−1)·m)
    allreduce  f(P) = 2·(P − 1)/P    (Rabenseifner / ring: reduce-scatter then allgather)

t0 is the per-call software cost (mpi4py, Python, buffer set-up; measured at P = 1), α the
latency per step, β the time per byte. The exact allreduce (``allreduce_exact``: nbbn's rows
and its user operation, a Python function around a Numba kernel) adds γ·m·⌈log2 P⌉, the
combine's time per byte at each step (measured in-process here: an upper bound for ring
algorithms, which combine ~m bytes in all).

Fitting: per family, non-negative least squares of the measured median times (the slowest
rank's, per call) on the three columns (1, ⌈log2 P⌉, m·f(P)). The host's shared-memory path is
no interconnect: the fit checks the model's *shape* (does allgather's cost grow as (P−1)·m and
allreduce's not) and gives t0 and γ; the cluster extrapolation takes α and β from published
figures (:data:`INTERCONNECTS`).

Extrapolation: per training step, every one of ResNet-50's 53 BN layers (:data:`RESNET50_BN`)
does one synchronized forward and one backward; the collectives of each design
(:data:`DESIGNS`) are costed with the interconnect's α, β (and t0 = 0: the software cost is
the same for every design and not the interconnect's) at P = 8 … 4096.
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

#: Channel counts of ResNet-50's 53 BN layers (torchvision resnet50, in order): the stem, then
#: per bottleneck block bn1, bn2 (width), bn3 (4·width), and a downsample BN in each stage's
#: first block. The shapes in nbbn/bench/sweep.py's RESNET50 are the distinct (C, H, W).
RESNET50_BN: tuple[int, ...] = (
    (64,)
    + (64, 64, 256, 256) + (64, 64, 256) * 2
    + (128, 128, 512, 512) + (128, 128, 512) * 3
    + (256, 256, 1024, 1024) + (256, 256, 1024) * 5
    + (512, 512, 2048, 2048) + (512, 512, 2048) * 2
)

#: Published interconnect figures: (α seconds per step, β seconds per byte), assumptions:
#: InfiniBand NDR: 400 Gb/s per port = 50 GB/s (NVIDIA ConnectX-7 / Quantum-2 data sheets);
#: MPI point-to-point latency ~1–2 µs (OSU micro-benchmarks on NDR report ~1 µs; we take 1.5).
#: 100 GbE (RoCE v2): 12.5 GB/s line rate; 5–10 µs MPI latency (we take 7.5).
INTERCONNECTS = {
    "InfiniBand NDR 400 Gb/s": (1.5e-6, 1 / 50e9),
    "100 GbE": (7.5e-6, 1 / 12.5e9),
}

FAMILIES = ("allgather", "allreduce", "allreduce_exact")


def parse_ranks(text: str) -> list[int]:
    """``--ranks 1,2,4`` as a list of integers ≥ 1 (a one-line usage error otherwise)."""
    try:
        rank_list = [int(r) for r in text.split(",") if r.strip()]
    except ValueError:
        raise click.BadParameter(f"{text!r}: comma-separated integers",
                                 param_hint="--ranks") from None
    if not rank_list or min(rank_list) < 1:
        raise click.BadParameter(f"{text!r}: integers ≥ 1", param_hint="--ranks")
    return rank_list


def steps(P) -> np.ndarray:
    return np.ceil(np.log2(np.maximum(np.asarray(P, dtype=float), 1.0)))


def volume(family: str, P, m) -> np.ndarray:
    """m·f(P): bytes a rank moves in a collective of the family (see the module docstring)."""
    P = np.asarray(P, dtype=float)
    m = np.asarray(m, dtype=float)
    if family == "allgather":
        return m * (P - 1)
    return m * 2 * (P - 1) / P


def model_time(family: str, params: dict, P, m, gamma: float = 0.0) -> np.ndarray:
    """t0 + α·⌈log2 P⌉ + β·m·f(P) (+ γ·m·⌈log2 P⌉ for allreduce_exact), seconds."""
    t = (params.get("t0", 0.0) + params["alpha"] * steps(P)
         + params["beta"] * volume(family, P, m))
    if family == "allreduce_exact":
        t = t + gamma * np.asarray(m, dtype=float) * steps(P)
    return t


def fit(df) -> dict:
    """{family: {t0, alpha, beta, rms_rel}} from rows (family, ranks, bytes, time_s) by
    non-negative least squares on (1, ⌈log2 P⌉, m·f(P)); rms_rel is the fit's RMS relative
    residual."""
    from scipy.optimize import nnls

    out = {}
    for family, g in df.groupby("family"):
        A = np.column_stack([np.ones(len(g)), steps(g["ranks"]),
                             volume(family, g["ranks"], g["bytes"])])
        t = g["time_s"].to_numpy(float)
        w = 1.0 / t  # relative residuals: small messages count as much as large ones
        coef, _ = nnls(A * w[:, None], t * w)
        pred = A @ coef
        out[family] = {"t0": float(coef[0]), "alpha": float(coef[1]), "beta": float(coef[2]),
                       "rms_rel": float(np.sqrt(np.mean(((pred - t) / t) ** 2)))}
    return out


def design_collectives(design: str, C: int, op: str) -> list[tuple[str, int]]:
    """(family, bytes per rank) of each collective one call makes, for a BN layer of C
    channels. The exact rows: :mod:`.exact` (ROW int64 = 40 bytes), NH header rows, capacity
    3·C rows (the backward's; one communicator per layer -- with one communicator for every
    layer the capacity is that of the widest layer)."""
    from .exact import ROW
    from .wire import FIELDS, NH

    header = len(FIELDS) * 8
    if design == "nbbn allgather (first design)":
        return ([("allgather", header), ("allgather", 16 * C)] if op == "forward" else
                [("allgather", header), ("allreduce", 24 * C)])
    if design == "nbbn exact allreduce":
        return [("allreduce_exact", (NH + 3 * C) * ROW * 8)]
    if design == "PyTorch SyncBatchNorm":
        # forward: all_gather of (mean, invstd, count) in float32; backward: all_reduce of
        # (Σdy, Σdy·(x − μ)) in float32 (torch/nn/modules/_functions.py)
        return ([("allgather", (2 * C + 1) * 4)] if op == "forward" else
                [("allreduce", 2 * C * 4)])
    raise ValueError(design)


DESIGNS = ("nbbn allgather (first design)", "nbbn exact allreduce", "PyTorch SyncBatchNorm")
P_EXTRAPOLATE = tuple(2 ** k for k in range(3, 13))  # 8 … 4096


def extrapolate(interconnects: dict, gamma: float, ranks=P_EXTRAPOLATE) -> list[dict]:
    """Per-step synchronized-BN time of ResNet-50 (53 layers, forward + backward) per design,
    interconnect and P; t0 = 0 (see the module docstring)."""
    rows = []
    for net, (alpha, beta) in interconnects.items():
        params = {"t0": 0.0, "alpha": alpha, "beta": beta}
        for P in ranks:
            for design in DESIGNS:
                t = nbytes = n_coll = 0.0
                for C in RESNET50_BN:
                    for op in ("forward", "backward"):
                        for family, m in design_collectives(design, C, op):
                            t += float(model_time(family, params, P, m, gamma))
                            nbytes += float(volume(family, P, m))
                            n_coll += 1
                rows.append({"interconnect": net, "ranks": P, "design": design,
                             "step_ms": 1e3 * t, "mib_per_rank_per_step": nbytes / 2 ** 20,
                             "collectives_per_step": int(n_coll)})
    return rows


# ------------------------------------------------------------------- measuring on this host


def _worker(sizes, reps: int, budget_s: float, out_json: str) -> None:
    """Under mpiexec: time each family at each size (bytes per rank); rank 0 writes rows."""
    from mpi4py import MPI

    from . import exact

    comm = MPI.COMM_WORLD
    P = comm.Get_size()
    op, rowtype = exact.mpi_op_and_type()
    rows = []
    for family in FAMILIES:
        for m in sizes:
            if family == "allreduce_exact":
                n_rows = max(1, m // (exact.ROW * 8))
                send = exact.deposit(np.ones((1, n_rows)))
                recv = np.empty_like(send)

                def call(send=send, recv=recv):
                    comm.Allreduce([send, rowtype], [recv, rowtype], op=op)
            elif family == "allreduce":
                send = np.ones(max(1, m // 8))
                recv = np.empty_like(send)

                def call(send=send, recv=recv):
                    comm.Allreduce(send, recv, op=MPI.SUM)
            else:
                send = np.ones(max(1, m // 8))
                recv = np.empty(P * send.size)

                def call(send=send, recv=recv):
                    comm.Allgather(send, recv)
            for _ in range(3):
                call()
            t_start = time.perf_counter()
            times = []
            while len(times) < reps:
                comm.Barrier()
                t0 = time.perf_counter()
                call()
                times.append(time.perf_counter() - t0)
                done = comm.bcast(time.perf_counter() - t_start > budget_s and len(times) >= 10,
                                  root=0)
                if done:
                    break
            every = comm.gather(times, root=0)
            if comm.Get_rank() == 0:
                slowest = np.max(np.array(every), axis=0)
                rows.append({"family": family, "ranks": P, "bytes": int(send.nbytes),
                             "reps": len(times), "time_s": float(np.median(slowest)),
                             "time_s_p10": float(np.percentile(slowest, 10)),
                             "time_s_p90": float(np.percentile(slowest, 90))})
    if comm.Get_rank() == 0:
        Path(out_json).write_text(json.dumps(rows), encoding="utf-8")


def combine_seconds_per_byte(n_rows: int = 4096, reps: int = 20) -> float:
    """γ: the exact rows' combine (the user op's body), seconds per byte, in-process."""
    from . import exact

    a = exact.deposit(np.linspace(1, 2, n_rows)[None, :])
    b = a.copy()
    best = math.inf
    for _ in range(reps):
        t0 = time.perf_counter()
        exact.combine_rows(a, b, b)
        best = min(best, time.perf_counter() - t0)
    return best / a.nbytes


QUICK_SIZES = (64, 4096)
DEFAULT_SIZES = (64, 1024, 16384, 131072, 1048576)


def _plot(ext_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    df = pd.DataFrame(ext_rows)
    nets = list(dict.fromkeys(df["interconnect"]))
    fig, axes = plt.subplots(1, len(nets), figsize=(6 * len(nets), 4.2), squeeze=False)
    for ax, net in zip(axes[0], nets, strict=True):
        for design, g in df[df["interconnect"] == net].groupby("design", sort=False):
            ax.loglog(g["ranks"], g["step_ms"], marker="o", label=design)
        ax.set_title(f"ResNet-50 sync BN per step, {net}")
        ax.set_xlabel("ranks P")
        ax.set_ylabel("collective time per step (ms, model)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _markdown(meas, fits, gamma, ext, meta) -> str:
    from ..output import markdown_table

    fit_rows = [{"family": f, "t0_us": 1e6 * p["t0"], "alpha_us": 1e6 * p["alpha"],
                 "beta_ns_per_byte": 1e9 * p["beta"], "rms_rel_residual": p["rms_rel"]}
                for f, p in fits.items()]
    import pandas as pd

    ext_df = pd.DataFrame(ext)
    wide = ext_df.pivot_table(index=["interconnect", "ranks"], columns="design",
                              values="step_ms", sort=False).reset_index()
    mib = ext_df.pivot_table(index=["interconnect", "ranks"], columns="design",
                             values="mib_per_rank_per_step", sort=False).reset_index()
    return "\n".join([
        "# Synchronized BN: an α–β cost model, fitted here, extrapolated to clusters",
        "",
        f"Command: `{meta['command']}`",
        "",
        f"Measured {meta['date']} on {meta['host']} ({meta['cpu_count']} CPUs, **shared "
        f"cores**: the ranks are oversubscribed with `--oversubscribe`, other work may run), "
        f"{meta['mpi_library']}; host load (1-min average) {meta['load_before']:.2f} before, "
        f"{meta['load_after']:.2f} after; wall time {meta['wall_s']:.0f} s.",
        "",
        "Model: t = t0 + α·⌈log2 P⌉ + β·m·f(P), f = P − 1 (allgather), 2(P − 1)/P (allreduce); "
        "the exact allreduce adds γ·m·⌈log2 P⌉ (its combine, the user op). Method and sources: the "
        "docstring of `nbbn/distributed/costmodel.py`, and docs/distributed.md.",
        "",
        "## Measured (median of the slowest rank's time per call)",
        "",
        markdown_table(meas, ".4g", index=False),
        "",
        "## Fit on this host (shared-memory path)",
        "",
        markdown_table(pd.DataFrame(fit_rows), ".4g", index=False),
        "",
        f"γ (exact combine, in-process) = {1e9 * gamma:.3g} ns per byte.",
        "",
        "## ResNet-50, 53 BN layers, forward + backward: collective time per step (ms)",
        "",
        "Interconnect α, β from published figures (t0 = 0): "
        + "; ".join(f"{k}: α = {1e6 * a:.3g} µs, 1/β = {1e-9 / b:.3g} GB/s"
                    for k, (a, b) in INTERCONNECTS.items()) + ".",
        "",
        markdown_table(wide, ".4g", index=False),
        "",
        "MiB each rank moves per step:",
        "",
        markdown_table(mib, ".4g", index=False),
        "",
        "![model](costmodel.png)",
        "",
    ])


@click.command("costmodel")
@click.option("--ranks", default="1,2,3,4,5,6,7,8", show_default=True,
              help="Numbers of ranks to measure, comma-separated.")
@click.option("--reps", default=200, show_default=True, type=click.IntRange(min=10),
              help="Most timed calls per (family, size, ranks).")
@click.option("--budget", default=2.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds per (family, size) at most (at least 10 calls).")
@click.option("--quick", is_flag=True, help="Ranks 1,2, two sizes, 10 calls: a smoke test.")
@click.option("--timeout", default=1800, show_default=True, type=click.IntRange(min=1))
@click.option("--out", default="results/distributed-cost", show_default=True,
              help="Folder for measured.csv, fit.csv, extrapolation.csv, costmodel.md/.png.")
@click.pass_context
def costmodel(ctx, ranks, reps, budget, quick, timeout, out):
    """Measure Allgather vs Allreduce here, fit α–β, extrapolate ResNet-50 sync BN to 4096
    ranks."""
    import pandas as pd

    from ..output import command_line
    from .launch import mpiexec_command, rank_environment

    rank_list = parse_ranks(ranks)
    sizes = DEFAULT_SIZES
    if quick:
        rank_list, sizes, reps, budget = [1, 2], QUICK_SIZES, 10, 0.05
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"{len(rank_list) * len(sizes) * len(FAMILIES)} configurations (ranks "
               f"{rank_list} × {len(sizes)} sizes × {len(FAMILIES)} collectives)", err=True)
    load_before = os.getloadavg()[0]
    t_start = time.perf_counter()
    meas = []
    for P in rank_list:
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "rows.json")
            cmd = mpiexec_command(P) + [sys.executable, "-m", "nbbn.distributed.costmodel",
                                        "_worker", json.dumps(list(sizes)), str(reps),
                                        str(budget), path]
            click.echo(f"ranks {P}: {shlex.join(cmd)}", err=True)
            try:
                proc = subprocess.run(cmd, env=rank_environment(1), timeout=timeout,
                                      capture_output=True, text=True)
            except subprocess.TimeoutExpired:
                raise click.ClickException(f"mpiexec -n {P} did not finish in {timeout} s") \
                    from None
            if proc.returncode != 0 or not os.path.exists(path):
                tail = (proc.stdout + proc.stderr).strip().splitlines()[-1:] or [""]
                raise click.ClickException(f"mpiexec -n {P} failed (exit {proc.returncode}): "
                                           f"{tail[0]}")
            meas += json.loads(Path(path).read_text(encoding="utf-8"))
    gamma = combine_seconds_per_byte()
    load_after = os.getloadavg()[0]
    mdf = pd.DataFrame(meas)
    fits = fit(mdf)
    ext = extrapolate(INTERCONNECTS, gamma)
    from mpi4py import MPI

    from ..output import environment

    env = {**environment(), "mpi_library": MPI.Get_library_version().split(",")[0].strip()}
    meta = {**env, "load_before": load_before, "load_after": load_after,
            "wall_s": time.perf_counter() - t_start, "host": platform.node(),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "command": command_line(ctx)}
    mdf["load_before"], mdf["load_after"] = load_before, load_after
    mdf.to_csv(out_dir / "measured.csv", index=False)
    pd.DataFrame([{"family": f, **p, "gamma_s_per_byte": gamma} for f, p in fits.items()]) \
        .to_csv(out_dir / "fit.csv", index=False)
    pd.DataFrame(ext).to_csv(out_dir / "extrapolation.csv", index=False)
    _plot(ext, out_dir / "costmodel.png")
    (out_dir / "costmodel.md").write_text(
        _markdown(mdf.drop(columns=["load_before", "load_after"]), fits, gamma, ext, meta),
        encoding="utf-8")
    click.echo(f"wrote {out_dir}/costmodel.md, measured.csv, fit.csv, extrapolation.csv, "
               f"costmodel.png in {meta['wall_s']:.0f} s", err=True)


if __name__ == "__main__":
    # The worker each rank runs under mpiexec (an internal entry point, not a user command).
    _sizes, _reps, _budget, _out = sys.argv[2:6]
    _worker(json.loads(_sizes), int(_reps), float(_budget), _out)
