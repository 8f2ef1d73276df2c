"""The ``run`` functions of the study's parts (see :mod:`nbbn.accuracy.parts`): each turns the
command's options into its part's configuration, runs it with a progress bar and saves its
tables."""

from __future__ import annotations

from .parts import RunContext


def _peers(ctx: RunContext, part: str):
    """The peers to run (loaded once per command) and their skip rows."""
    if not ctx.peers:
        return [], [{"part": part, "item": "peers", "reason": "--no-peers"}]
    if "_peers" not in ctx.meta:
        from .peers import load_peers, versions

        peers, skipped = load_peers(part="peers")
        ctx.meta["_peers"] = (peers, skipped)
        ctx.meta["peer_versions"] = versions(peers)
        ctx.meta["peer_how"] = {p.name: p.how for p in peers}
        ctx.skip(skipped)
        ctx.echo("peers: " + (", ".join(p.name for p in peers) or "none")
                 + "".join(f"; skipped {s['item']}: {s['reason']}" for s in skipped))
    return ctx.meta["_peers"][0], []


def run_rounding_part(ctx: RunContext) -> None:
    from .rounding import (
        PEER_MAX_M,
        QUICK_SIZES,
        RoundingConfig,
        crossover,
        run_rounding,
        usable_backends,
    )

    cfg = RoundingConfig(sizes=ctx.sizes or (QUICK_SIZES if ctx.quick else
                                             RoundingConfig().sizes), seed=ctx.seed,
                         peer_max_m=None if ctx.sizes else PEER_MAX_M,
                         half_backends=not ctx.quick)
    backends, sk = usable_backends()
    ctx.skip(sk)
    ctx.echo("(a) statistics backends: " + (", ".join(b.name for b in backends) or "none")
             + "".join(f"; skipped {s['item']}: {s['reason']}" for s in sk))
    peers, sk = _peers(ctx, "rounding")
    ctx.skip(sk)
    with ctx.progress("(a) rounding", cfg.n_configs(), "m × κ × dtype") as step:
        df, sk = run_rounding(cfg, step, backends=backends, peers=peers)
    ctx.skip(sk)
    ctx.save("rounding", df)
    ctx.save("rounding_crossover", crossover(df))


def run_sampling_part(ctx: RunContext) -> None:
    from .sampling import QUICK_BATCHES, QUICK_SIZES, SamplingConfig, run_sampling

    cfg = SamplingConfig(distributions=ctx.distributions, activations=ctx.activations,
                         seed=ctx.seed)
    if ctx.quick:
        cfg.sizes, cfg.batches = list(QUICK_SIZES), QUICK_BATCHES
    if ctx.sizes:
        cfg.sizes = ctx.sizes
    todo, _ = cfg.plan()
    with ctx.progress("(b) sampling", len(todo), "population × m") as step:
        df, sk = run_sampling(cfg, step)
    ctx.skip(sk)
    ctx.save("sampling", df)


def run_estimators_part(ctx: RunContext) -> None:
    from .estimators import EstimatorConfig, run_estimators

    cfg = (EstimatorConfig.quick if ctx.quick else EstimatorConfig)(
        distributions=ctx.distributions, seed=ctx.seed)
    if ctx.sizes:
        cfg.sizes = cfg.gap_sizes = ctx.sizes
    todo, _ = cfg.plan()
    with ctx.progress("(c) estimators", len(todo),
                      f"population × m; {cfg.streams} streams × {cfg.batches} batches") as step:
        est, gap, sk = run_estimators(cfg, step)
    ctx.skip(sk)
    ctx.save("estimators", est)
    ctx.save("gap", gap)


def run_gradients_part(ctx: RunContext) -> None:
    from .gradients import QUICK_SIZES, GradientConfig, breakdown, run_gradients
    from .rounding import usable_backends

    cfg = GradientConfig(sizes=ctx.sizes or (QUICK_SIZES if ctx.quick else
                                             GradientConfig().sizes), seed=ctx.seed)
    backends, sk = usable_backends(part="gradients")
    ctx.skip(sk)
    peers, sk = _peers(ctx, "gradients")
    ctx.skip(sk)
    with ctx.progress("(e) gradients", cfg.n_configs(), "m × κ × dtype") as step:
        df, sk = run_gradients(cfg, step, backends=backends, peers=peers)
    ctx.skip(sk)
    ctx.save("gradients", df)
    ctx.save("gradients_breakdown", breakdown(df))


def run_distributed_part(ctx: RunContext) -> None:
    """Part (d) (:mod:`nbbn.accuracy.across_ranks`): its three tables, plus distributed.md and its
    figures, which it writes itself."""
    import time

    from .across_ranks import DistributedConfig, run_part, write_outputs

    t0 = time.perf_counter()
    cfg = (DistributedConfig.quick if ctx.quick else DistributedConfig)(seed=ctx.seed)
    with ctx.progress("(d) distributed", cfg.n_configs(), "ranks × m, counts, σ²") as step:
        part_tables = run_part(cfg, step)
    for name, df in part_tables.items():
        ctx.save(name, df)
    meta = {k: v for k, v in ctx.meta.items() if not k.startswith("_")}
    write_outputs(ctx.out, {**meta, "wall_s": time.perf_counter() - t0}, part_tables,
                  ctx.plots)


def report_distributed(tables):
    """Part (d)'s findings in report.md; its own tables and figures are in distributed.md."""
    from .across_ranks import findings
    from .parts import Section

    if tables.get("distributed_ranks") is None:
        return Section()
    return Section(findings(tables), ["## (d) Statistics across processes", "",
                                      "Tables, method and figures: "
                                      "[distributed.md](distributed.md).", ""])
