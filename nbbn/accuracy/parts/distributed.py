"""Part (d), distributed: batch statistics across processes -- per-rank vs synchronized
(:mod:`nbbn.distributed`), count-weighted merge vs equal-weight pmean, (mean, invstd) vs
(count, mean, M2) exchange. Its tables, method and figures go to ``distributed.md``, which
:func:`run` writes itself (the computation and that report: :mod:`nbbn.accuracy.across_ranks`);
report.md gets its key findings and a link."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..common import RunContext

LETTER = "d"
NAME = "distributed"
TITLE = "Statistics across processes"


def run(ctx: RunContext) -> None:
    """Part (d) (:mod:`nbbn.accuracy.across_ranks`): its three tables, plus distributed.md and its
    figures, which it writes itself."""
    import time

    from ..across_ranks import DistributedConfig, run_part, write_outputs

    t0 = time.perf_counter()
    cfg = (DistributedConfig.quick if ctx.quick else DistributedConfig)(seed=ctx.seed)
    with ctx.progress("(d) distributed", cfg.n_configs(), "ranks × m, counts, σ²") as step:
        part_tables = run_part(cfg, step)
    for name, df in part_tables.items():
        ctx.save(name, df)
    meta = {k: v for k, v in ctx.meta.items() if not k.startswith("_")}
    write_outputs(ctx.out, {**meta, "wall_s": time.perf_counter() - t0}, part_tables,
                  ctx.plots)


def findings(tables: dict[str, pd.DataFrame]) -> list[str]:
    if tables.get("distributed_ranks") is None:
        return []
    from ..across_ranks import findings as _findings

    return _findings(tables)


def report(tables: dict[str, pd.DataFrame]) -> list[str]:
    """A link: this part's tables and figures are in distributed.md."""
    if tables.get("distributed_ranks") is None:
        return []
    return ["Tables, method and figures: [distributed.md](distributed.md).", ""]


def plots(tables: dict[str, pd.DataFrame], out: Path) -> list[Path]:
    """None for report.md: :func:`run` draws this part's figures into distributed.md."""
    return []
