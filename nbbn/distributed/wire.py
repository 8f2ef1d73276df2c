"""The header every synchronized call exchanges before any data: its fields, one rank's view of
a call (:class:`LocalCall`), and :func:`exchange_header`, which raises the same exception on every
rank when any rank failed its local checks or the ranks disagree (so a bad argument never hangs).
"""

from __future__ import annotations

import numpy as np

from .. import registry, validate

#: Fields of the header every rank sends before any data (float64: the integers stay exact).
#: The first NAGREE must hold the same value on every rank.
FIELDS = ("op", "C", "dtype", "ndim", "axis", "eps", "momentum", "running", "checksum", "ok",
           "count")
F = {name: i for i, name in enumerate(FIELDS)}
NAGREE = F["ok"]
OPS = {1.0: "batch_norm_train", 2.0: "batch_norm_backward"}
OP_CODE = {v: k for k, v in OPS.items()}
#: Exceptions re-raised by type on every rank; anything else becomes a RuntimeError.
EXCEPTIONS = {c.__name__: c for c in (ValueError, TypeError, NotImplementedError,
                                       registry.BackendUnavailable)}


class LocalCall:
    """One rank's view of a call before the header: what it holds, or what went wrong."""

    def __init__(self, what: str):
        self.header = np.zeros(len(FIELDS))
        self.header[F["op"]] = OP_CODE[what]
        self.what = what
        self.error: BaseException | None = None
        self.args = None  # the validated argument bundle, None for an empty slice
        self.geom = None  # (shape, dtype, on_device) of x
        self.sums = None  # (2, C) float64: the local statistics or gradient sums

    def describe(self, shape, dtype, channel_axis, count):
        ndim = len(shape)
        ax = validate.channel_axis_value(channel_axis, ndim)
        h = self.header
        h[F["C"]] = shape[ax]
        h[F["dtype"]] = validate.STORAGE_DTYPES.index(np.dtype(dtype)) + 1
        h[F["ndim"]] = ndim
        h[F["axis"]] = 1 if (ax == 1 or ndim == 2) else -1
        h[F["count"]] = count


def communicator(comm):
    from mpi4py import MPI

    if comm is None:
        return MPI.COMM_WORLD
    if not isinstance(comm, MPI.Intracomm):
        raise TypeError(f"comm must be an mpi4py intracommunicator (e.g. MPI.COMM_WORLD), "
                        f"got {type(comm).__name__}")
    return comm


def _ranks(rs) -> str:
    rs = [int(r) for r in rs]
    return ("rank " if len(rs) == 1 else "ranks ") + ", ".join(map(str, rs))


def _disagree(headers, field: str, name: str, show) -> str | None:
    """'name = a on ranks 0, 2; name = b on rank 1' when the ranks hold different values."""
    col = headers[:, F[field]]
    values = list(dict.fromkeys(col.tolist()))
    if len(values) == 1:
        return None
    return "; ".join(f"{name} {show(v)} on {_ranks(np.flatnonzero(col == v))}" for v in values)


def exchange_header(comm, local: LocalCall) -> np.ndarray:
    """The collective every call starts with; raises the same exception on every rank when any
    rank failed its local checks or the ranks disagree."""
    local.header[F["ok"]] = 0.0 if local.error is not None else 1.0
    headers = np.empty((comm.Get_size(), len(FIELDS)))
    comm.Allgather(local.header, headers)
    what = local.what
    ok = headers[:, F["ok"]]
    if not ok.all():
        bad = np.flatnonzero(ok == 0)
        # Every rank saw the same flags, so every rank joins this (rare) second collective.
        info = comm.allgather(None if local.error is None else
                              (type(local.error).__name__, str(local.error)))
        name, message = info[bad[0]]
        cls = EXCEPTIONS.get(name, RuntimeError)
        also = f" (and failed on {_ranks(bad[1:])})" if bad.size > 1 else ""
        kind = "" if name in EXCEPTIONS else f"{name}: "
        raise cls(f"{what} on {_ranks(bad[:1])} of {len(headers)}{also}: {kind}{message}")
    if not (headers[:, :NAGREE] == headers[0, :NAGREE]).all():
        _raise_disagreement(headers, what)
    counts = headers[:, F["count"]]
    m_total = float(counts.sum())
    need = 2 if what == "batch_norm_train" else 1
    if m_total < need:
        per = ", ".join(str(int(c)) for c in counts)
        raise ValueError(
            f"{what}: expected more than 1 value per channel when training, got m = "
            f"{int(m_total)} over {len(counts)} ranks (per-rank m: {per})" if need == 2 else
            f"{what}: the global batch is empty (per-rank m: {per})")
    return headers


def _raise_disagreement(headers, what: str):
    """The ranks' headers differ in a field that must agree: say which, on every rank."""
    op = _disagree(headers, "op", "called", lambda v: OPS[v])
    if op:
        raise RuntimeError(f"the ranks made different calls: {op}")
    dtype = _disagree(headers, "dtype", "x has dtype",
                      lambda v: str(validate.STORAGE_DTYPES[int(v) - 1]))
    if dtype:
        raise TypeError(f"{what}: every rank must pass x of one dtype; {dtype}")
    checks = [("C", "x has C =", lambda v: str(int(v))),
              ("ndim", "x is", lambda v: f"{int(v)}-D"),
              ("axis", "channel_axis is", lambda v: "1 (channels first)" if v == 1
               else "-1 (channels last)"),
              ("eps", "eps =", repr),
              ("momentum", "momentum =", repr),
              ("running", "running statistics are", lambda v: "given" if v else "not given"),
              ("checksum", "save_mean/save_invstd have checksum", lambda v: f"{int(v):08x}")]
    for field, name, show in checks:
        msg = _disagree(headers, field, name, show)
        if msg:
            hint = (" (pass the save_mean/save_invstd that nbd.batch_norm_train returned: they "
                    "are identical on every rank)" if field == "checksum" else "")
            raise ValueError(f"{what}: the ranks disagree: {msg}{hint}")
    raise AssertionError("headers differ in no known field")  # pragma: no cover

