"""What tests/test_distributed.py runs under ``mpiexec -n K python -m tests.mpi_worker SCENARIO``.

Every rank runs the same script; rank 0 prints one JSON object per case on stdout (prefixed
``RESULT``) and the test reads them. Scenarios:

* ``agree``: synchronized forward and backward on the rank slices of one global batch (row
  counts per rank from :data:`COUNTS`, some 0 or 1), every layout, float32 at |mean|/std = 1e4
  and float64; rank 0 compares with single-process nbbn and the float64 reference on the
  concatenated batch, and checks that the per-channel outputs are bit-identical on every rank.
* ``errors``: calls that must raise the same exception on every rank (a global m of 1,
  disagreeing C / dtype / channel axis / eps, a bad argument on one rank, a mismatched save_mean,
  ranks making different calls), then one good call to show the communicator is still in step.
* ``warm``: one process, no MPI: compile (and cache) the cpu kernels the other scenarios use.
"""

from __future__ import annotations

import hashlib
import json
import sys

import numpy as np

#: Row counts per rank, by number of ranks: uneven, with empty ranks and m = 1 per rank.
COUNTS = {1: [(7,), (2,)], 2: [(5, 0), (1, 1), (3, 12)], 3: [(5, 0, 17), (1, 0, 1), (4, 4, 4)],
          4: [(5, 0, 17, 2), (1, 0, 0, 1), (3, 3, 3, 3)]}
KAPPA = 1e4  # |mean|/std of the data

#: layout name -> (per-row shape, channel_axis, channels-last memory for a channels-first shape)
LAYOUTS = {
    "NC": ((7,), 1, False),
    "NCHW": ((3, 5, 4), 1, False),
    "NHWC": ((5, 4, 3), -1, False),
    "NCHW-channels-last": ((3, 5, 4), 1, True),
}


def global_batch(layout: str, rows: int, dtype, seed: int):
    """(x, dy) of the whole batch, the same on every rank: per-channel scale s_c in [0.5, 2],
    mean κ·s_c; dy with a non-zero mean."""
    tail, axis, cl = LAYOUTS[layout]
    shape = (rows,) + tail
    ax = axis % len(shape)
    C = shape[ax]
    rng = np.random.default_rng(seed)
    bshape = [1] * len(shape)
    bshape[ax] = C
    s = np.linspace(0.5, 2.0, C).reshape(bshape)
    x = (KAPPA * s + s * rng.standard_normal(shape)).astype(dtype)
    dy = (0.3 + rng.standard_normal(shape)).astype(dtype)
    if cl:  # (N, C, H, W) with channels-last memory
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
        dy = np.ascontiguousarray(dy.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    gamma = (1.0 + 0.3 * rng.standard_normal(C)).astype(np.float32)
    beta = (0.5 * rng.standard_normal(C)).astype(np.float32)
    return x, dy, gamma, beta, axis, C


def _same_layout(a, x, axis) -> bool:
    """a (an output like x) is laid out in memory as x (an empty slice: has x's shape)."""
    from nbbn import validate

    if x.shape[0] == 0:
        return a.shape == x.shape
    perm = validate.geometry(x, axis).perm
    return a.shape == x.shape and validate.contiguous_in(validate.array_meta(a, "a"), perm)


def _emit(obj) -> None:
    print("RESULT " + json.dumps(obj), flush=True)


def agree(comm, method: str = "allreduce") -> None:
    import nbbn
    import nbbn.distributed as nbd
    from nbbn import reference as ref
    from nbbn.tolerances import rel_err
    from tests.helpers import exact_backward

    K, rank = comm.Get_size(), comm.Get_rank()
    cases = [(layout, counts, dt) for counts in COUNTS[K] for layout in LAYOUTS
             for dt in (np.float32,)]
    cases += [(layout, COUNTS[K][0], np.float64) for layout in ("NC", "NCHW")]
    for i, (layout, counts, dtype) in enumerate(cases):
        rows = sum(counts)
        x, dy, gamma, beta, axis, C = global_batch(layout, rows, dtype, seed=100 + i)
        lo = sum(counts[:rank])
        xs, dys = x[lo:lo + counts[rank]], dy[lo:lo + counts[rank]]
        rm, rv = np.full(C, 0.25, np.float32), np.full(C, 2.0, np.float32)
        y, sm, si = nbd.batch_norm_train(xs, gamma, beta, comm=comm, running_mean=rm,
                                         running_var=rv, momentum=0.3, channel_axis=axis,
                                         method=method)
        dx, dg, db = nbd.batch_norm_backward(dys, xs, sm, si, gamma, comm=comm,
                                             channel_axis=axis, method=method)
        mine = {"layout_kept": _same_layout(y, xs, axis) and _same_layout(dx, xs, axis),
                "y": y, "dx": dx, "save_mean": sm, "save_invstd": si, "running_mean": rm,
                "running_var": rv, "dgamma": dg, "dbeta": db}
        everyone = comm.gather(mine, root=0)
        if rank != 0:
            continue
        shared = ("save_mean", "save_invstd", "running_mean", "running_var", "dgamma", "dbeta")
        identical = all(np.array_equal(o[k], everyone[0][k]) and o[k].dtype == everyone[0][k].dtype
                        for o in everyone for k in shared)
        shapes_ok = all(o["y"].shape == (c,) + x.shape[1:] and o["dx"].shape == o["y"].shape
                        for o, c in zip(everyone, counts, strict=True))
        got = dict(everyone[0])
        got["y"] = np.concatenate([o["y"] for o in everyone])
        got["dx"] = np.concatenate([o["dx"] for o in everyone])
        # Single process, the same batch.
        srm, srv = np.full(C, 0.25, np.float32), np.full(C, 2.0, np.float32)
        y1, sm1, si1 = nbbn.batch_norm_train(x, gamma, beta, running_mean=srm, running_var=srv,
                                             momentum=0.3, channel_axis=axis)
        dx1, dg1, db1 = nbbn.batch_norm_backward(dy, x, sm1, si1, gamma, channel_axis=axis)
        single = {"y": y1, "dx": dx1, "save_mean": sm1, "save_invstd": si1,
                  "running_mean": srm, "running_var": srv, "dgamma": dg1, "dbeta": db1}
        # The float64 oracle.
        ry, rmean, rinv, _ = ref.forward_train(x, gamma, beta, channel_axis=axis)
        mean64, var64 = ref.batch_stats(x, channel_axis=axis)
        rrm, rrv = ref.running_update(np.full(C, 0.25), np.full(C, 2.0), mean64, var64,
                                      ref.count_per_channel(x, axis), 0.3)
        # the gradient at the exact batch mean (tests/helpers.exact_backward)
        rdx, rdg, rdb = exact_backward(dy, x, rmean, rinv, gamma, axis)
        scale = ref.dx_scale(dy, si, gamma, channel_axis=axis)
        oracle = {"y": ry, "save_mean": rmean, "save_invstd": rinv, "running_mean": rrm,
                  "running_var": rrv, "dx": rdx, "dgamma": rdg, "dbeta": rdb}
        digest = hashlib.sha256()
        for k in shared:
            digest.update(np.ascontiguousarray(got[k]).tobytes())
        _emit({
            "scenario": "agree", "ranks": K, "layout": layout, "counts": list(counts),
            "method": method, "bits": digest.hexdigest(),
            "dtype": np.dtype(dtype).name, "identical": bool(identical),
            "shapes_ok": bool(shapes_ok),
            "layout_kept": all(o["layout_kept"] for o in everyone),
            "vs_single": {k: rel_err(got[k], single[k]) for k in single},
            "vs_reference": {k: rel_err(got[k], oracle[k], scale if k == "dx" else 0.0)
                             for k in oracle},
        })


def _error_cases(rank: int):
    """name -> (callable for this rank, expected exception type name, words in the message)."""
    import nbbn.distributed as nbd

    rng = np.random.default_rng(rank)

    def x_of(n, C=4, dtype=np.float32, tail=(3,)):
        return (5.0 + rng.standard_normal((n, C) + tail)).astype(dtype)

    def fwd(x, **kw):
        return lambda comm: nbd.batch_norm_train(x, comm=comm, **kw)

    def bwd_with(save_mean):
        x = x_of(2)
        si = np.ones(4, np.float32)
        return lambda comm: nbd.batch_norm_backward(x, x, save_mean, si, comm=comm)

    C4 = np.ones(4, np.float32)
    return {
        "global m = 1": (fwd(x_of(1 if rank == 0 else 0, tail=())), "ValueError",
                         ["more than 1 value per channel", "m = 1"]),
        "C differs": (fwd(x_of(2, C=5 if rank == 1 else 4)), "ValueError",
                      ["C = 4", "C = 5", "rank 1"]),
        "dtype differs": (fwd(x_of(2, dtype=np.float64 if rank == 1 else np.float32)),
                          "TypeError", ["float64", "float32"]),
        "channel axis differs": (fwd(x_of(2, tail=(4, 4)), channel_axis=-1 if rank == 0 else 1),
                                 "ValueError", ["channel_axis", "rank 0"]),
        "eps differs": (fwd(x_of(2), eps=1e-3 if rank == 1 else 1e-5), "ValueError", ["eps"]),
        "bad eps on one rank": (fwd(x_of(2), eps=-1.0 if rank == 1 else 1e-5), "ValueError",
                                ["eps must be finite", "rank 1"]),
        "bad gamma on one rank": (fwd(x_of(2), gamma=np.ones(3 if rank == 1 else 4)),
                                  "ValueError", ["gamma must have shape (4,)", "rank 1"]),
        "not an array on one rank": (fwd([[1.0, 2.0]] if rank == 0 else x_of(2)), "TypeError",
                                     ["x must be a NumPy array", "rank 0"]),
        "unknown backend on one rank": (fwd(x_of(2), backend="nope" if rank == 1 else "cpu"),
                                        "ValueError", ["unknown backend", "rank 1"]),
        "save_mean differs": (bwd_with(C4 * (2.0 if rank == 1 else 1.0)), "ValueError",
                              ["save_mean", "checksum"]),
        "different calls": (bwd_with(C4) if rank == 0 else fwd(x_of(2)), "RuntimeError",
                            ["batch_norm_train", "batch_norm_backward"]),
        # Raised locally on every rank before any collective (there is no communicator).
        "comm is not a communicator": (lambda comm: nbd.batch_norm_train(x_of(2), comm="world"),
                                       "TypeError", ["intracommunicator"]),
    }


def errors(comm) -> None:
    import nbbn.distributed as nbd

    rank = comm.Get_rank()
    for name, (call, expect, words) in _error_cases(rank).items():
        try:
            call(comm)
            got = None
        except Exception as exc:  # noqa: BLE001 - what each rank raised is the result
            got = (type(exc).__name__, str(exc))
        everyone = comm.gather(got, root=0)
        if rank == 0:
            _emit({"scenario": "errors", "case": name, "ranks": comm.Get_size(),
                   "raised": everyone, "expect": expect, "words": words})
    # The communicator is still in step: a good call after all of that.
    x = (3.0 + np.arange(8, dtype=np.float32).reshape(2, 4)) * (rank + 1)
    y, sm, si = nbd.batch_norm_train(x, comm=comm)
    means = comm.gather(sm, root=0)
    if rank == 0:
        _emit({"scenario": "errors", "case": "good call afterwards", "ranks": comm.Get_size(),
               "identical": all(np.array_equal(m, means[0]) for m in means)})


def traffic(comm) -> None:
    """Bytes each collective moves on each rank, per call, for both methods (C = 64, NC):
    the warm-up calls (a new communicator's first exact call also sets its capacity) are not
    counted; then one forward and one backward per method are."""
    import nbbn.distributed as nbd
    from nbbn.distributed import wire

    rank, K = comm.Get_rank(), comm.Get_size()
    C = 64
    rng = np.random.default_rng(rank)
    x = (3.0 + rng.standard_normal((4, C))).astype(np.float32)
    dy = rng.standard_normal((4, C)).astype(np.float32)
    for method in ("allreduce", "allgather"):
        for counted in (False, True):
            wire.TRAFFIC = [] if counted else None
            _, sm, si = nbd.batch_norm_train(x, comm=comm, method=method)
            fwd = list(wire.TRAFFIC or [])
            if counted:
                wire.TRAFFIC = []
            nbd.batch_norm_backward(dy, x, sm, si, comm=comm, method=method)
            bwd = list(wire.TRAFFIC or [])
        wire.TRAFFIC = None
        everyone = comm.gather({"forward": fwd, "backward": bwd}, root=0)
        if rank == 0:
            _emit({"scenario": "traffic", "ranks": K, "C": C, "method": method,
                   "per_rank": everyone})


def warm() -> None:
    """Compile the cpu Parts for the layouts and dtypes above (Numba caches them on disk)."""
    from nbbn import registry, validate

    parts = registry.parts("cpu")
    for layout in LAYOUTS:
        for dtype in (np.float32, np.float64):
            x, dy, gamma, beta, axis, C = global_batch(layout, 3, dtype, seed=0)
            a = validate.train_args(x, gamma, beta, 1e-5, None, None, 0.1, None, axis, min_m=1)
            mean, m2 = parts.stats(a)
            _, sm, si = parts.normalize(a, mean, m2 / 3, 3)
            b = validate.backward_args(dy, x, sm, si, gamma, None, axis)
            s1, s2, s3 = parts.grad_sums(b)
            parts.grad_apply(b, s1, s2, 3, s3)
    import nbbn

    for dtype in (np.float32, np.float64):
        for layout in LAYOUTS:
            x, dy, gamma, beta, axis, C = global_batch(layout, 3, dtype, seed=0)
            rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
            _, sm, si = nbbn.batch_norm_train(x, gamma, beta, running_mean=rm, running_var=rv,
                                              channel_axis=axis)
            nbbn.batch_norm_backward(dy, x, sm, si, gamma, channel_axis=axis)
    from nbbn.distributed import exact  # the exact rows' kernels

    rows = exact.forward_rows(3, np.ones(2), np.ones(2))
    exact.combine_rows(rows, rows.copy(), rows.copy())
    exact.mean_var(rows[:2], rows[2:], 6)
    exact.to_float(exact.deposit(np.ones((1, 2))))
    print("RESULT " + json.dumps({"scenario": "warm"}), flush=True)


def main(argv: list[str]) -> None:
    """Run the scenarios named in argv[0], comma-separated, in order (one launch can serve
    several tests: every rank process costs seconds of imports and kernel loading)."""
    scenarios = (argv[0] if argv else "agree").split(",")
    if scenarios == ["warm"]:
        warm()
        return
    from mpi4py import MPI

    for scenario in scenarios:
        if scenario == "agree-allgather":
            agree(MPI.COMM_WORLD, "allgather")
        else:
            {"agree": agree, "errors": errors, "traffic": traffic}[scenario](MPI.COMM_WORLD)


if __name__ == "__main__":
    main(sys.argv[1:])
