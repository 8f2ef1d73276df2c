"""pytest-benchmark over the harness's case table: thin wrappers, no second table, timer or
bytes model.

Each test is one configuration of a harness sweep planned by :func:`nbbn.bench.run.make_sweep`
(and :func:`nbbn.bench.sweep.make_plan`) -- or the copy of x of a point -- built by
:mod:`nbbn.bench.cases` and checked against the float64 reference before it is timed.
pytest-benchmark times the call; with ``--cache cold`` semantics each call takes the next of the
point's buffer sets (:func:`nbbn.bench.cases.buffer_sets`). ``extra_info`` carries the
configuration and the bytes of :mod:`nbbn.bench.roofline`.

    nox -s bench                                     # autosaves under .benchmarks/
    nox -s bench -- --benchmark-compare              # a local trend, not a gate

Why not compare's rule (nbbn.bench.compare): pytest-benchmark times each
configuration alone, with no pairing, trials or worker processes, so there is no interval that
holds the between-trial and between-run variance for the rule to use, and
``--benchmark-compare-fail=median:10%`` compares two bare medians: on a quiet host it flags
noise. The regression gate is ``nbbn compare OLD NEW --fail-on-slower`` on two ``nbbn bench``
runs.

Environment: ``NBBN_BENCH_SWEEP`` = ``default`` (the default sweep's cpu points), ``quick``, or a
named sweep (``cpu-targets``); ``NBBN_BENCH_BACKENDS`` (default ``cpu,torch-cpu``);
``NBBN_BENCH_CALL`` (``kernel`` or ``api``, default the sweep's); ``NBBN_BENCH_CACHE`` (``cold``
or ``warm``). The pairing and intervals of ``nbbn bench`` are not here: pytest-benchmark times
each configuration apart; use ``nbbn bench`` / ``nbbn compare`` for paired figures.
"""

from __future__ import annotations

import itertools
import os

import numba
import pytest

from nbbn import registry
from nbbn.bench import devices, roofline
from nbbn.bench.cases import BufferSets, buffer_sets, copy_case, make_case, point_data
from nbbn.bench.run import make_sweep
from nbbn.bench.sweep import make_plan

_SWEEP = os.environ.get("NBBN_BENCH_SWEEP", "default")
_KW = {"backends": os.environ.get("NBBN_BENCH_BACKENDS", "cpu,torch-cpu"),
       "calls": os.environ.get("NBBN_BENCH_CALL"), "caches": os.environ.get("NBBN_BENCH_CACHE")}
if _SWEEP == "quick":
    _KW["quick"] = True
elif _SWEEP != "default":
    _KW["sweep"] = _SWEEP


def _cases():
    plan = make_plan(make_sweep(**_KW))
    out = []
    for group in plan.groups:
        if group.device != "cpu" or not group.run:
            continue
        out += [(group.point, cfg) for cfg in group.run] + [(group.point, None)]
    return out


CASES = _cases()


def _group(p) -> str:
    return f"{p.op}-{p.layout}-{'x'.join(map(str, p.dims))}-N{p.N}-{p.call}-{p.cache}"


def _id(case) -> str:
    p, cfg = case
    return _group(p) + "-" + ("copy" if cfg is None else f"{cfg.backend}:{cfg.variant}")


_DATA: dict = {}


def _data(point):
    if point.data_key not in _DATA:
        _DATA.clear()  # one point's arrays at a time
        _DATA[point.data_key] = point_data(point)
    return _DATA[point.data_key]


@pytest.mark.parametrize("case", CASES, ids=[_id(c) for c in CASES])
def test_bench(benchmark, case):
    point, cfg = case
    dev = devices.device("cpu")
    data = _data(point)
    sets = BufferSets(data, dev, buffer_sets(point, data.x_bytes, dev.llc_bytes()))
    if cfg is None:
        c = copy_case(point, sets, dev)
        nbytes = roofline.copy_bytes(data.x_bytes)
    else:
        c = make_case(cfg, data, sets, dev)
        errors, tols, _ = c.check(c.calls[0]())  # check before timing
        bad = {n: e for n, e in errors.items() if not e <= tols[n]}
        if bad:
            pytest.fail(f"outside tolerance, not timed: {bad}")
        nbytes = roofline.bytes_moved(point.op, point.numel, point.C, fusion=point.fusion,
                                      **roofline.itemsizes(point.dtype))
    rotation = itertools.cycle(c.calls)
    benchmark.group = _group(point)
    benchmark.extra_info.update(
        op=str(point.op), layout=str(point.layout), shape=list(point.x_shape), call=point.call,
        cache=point.cache, backend="copy" if cfg is None else cfg.backend,
        variant=None if cfg is None else cfg.variant, bytes=int(nbytes),
        buffer_sets=sets.K, threads=numba.get_num_threads(),
        kind="copy" if cfg is None else registry.backend_info(cfg.backend).kind)
    benchmark.pedantic(lambda: next(rotation)(), rounds=20, iterations=1, warmup_rounds=2)
