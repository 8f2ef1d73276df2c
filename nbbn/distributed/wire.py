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
        self.rows = None  # their exact rows (method "allreduce", nbbn.distributed.exact)

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
    allgather(comm, local.header, headers)
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



# ------------------------------------------------------------------- counting what moves

#: When a list, every collective appends ``(name, bytes_sent, bytes_received)`` for this rank
#: (the message-size test sets it). None: nothing is recorded.
TRAFFIC: list | None = None


def _record(name: str, sent: int, received: int) -> None:
    if TRAFFIC is not None:
        TRAFFIC.append((name, int(sent), int(received)))


def allgather(comm, send: np.ndarray, recv: np.ndarray) -> None:
    """``comm.Allgather`` (float64 buffers), recorded in :data:`TRAFFIC`."""
    comm.Allgather(send, recv)
    _record("Allgather", send.nbytes, recv.nbytes)


def allreduce_sum(comm, send: np.ndarray, recv: np.ndarray) -> None:
    """``comm.Allreduce`` with ``MPI.SUM`` (float64), recorded in :data:`TRAFFIC`."""
    from mpi4py import MPI

    comm.Allreduce(send, recv, op=MPI.SUM)
    _record("Allreduce", send.nbytes, recv.nbytes)


# ------------------------------------------------- one collective: header and data together

#: Header rows of the exact reduction (:mod:`.exact` rows): for each field that must agree,
#: MAX(v) and MAX(−v) of its float64 bits (−MAX(−v) is the MIN; the ranks agree iff MIN = MAX),
#: then MAX(failed), MAX(rows needed), SUM(count).
NH = 2 * NAGREE + 3
_FAILED, _NEEDED, _COUNT = 2 * NAGREE, 2 * NAGREE + 1, 2 * NAGREE + 2
_KEYVAL: list = []


def capacity(comm) -> int:
    """Data rows every rank of ``comm`` sends in the next exact reduction: the most any agreed
    call has needed so far (0 for a new communicator). Kept as an MPI attribute of the
    communicator, so it is the same on every rank (it changes only after a reduction whose
    result every rank holds) and dies with the communicator."""
    if not _KEYVAL:
        from mpi4py import MPI

        _KEYVAL.append(MPI.Comm.Create_keyval())
    v = comm.Get_attr(_KEYVAL[0])
    return 0 if v is None else int(v)


def _exact_allreduce(comm, buf: np.ndarray) -> np.ndarray:
    from . import exact

    op, rowtype = exact.mpi_op_and_type()
    recv = np.empty_like(buf)
    comm.Allreduce([buf, rowtype], [recv, rowtype], op=op)
    _record("Allreduce", buf.nbytes, recv.nbytes)
    return recv


def reduce_call(comm, local: LocalCall, data: np.ndarray | None) -> tuple[np.ndarray, int]:
    """The one collective of a call (``method="allreduce"``): header and data rows reduced
    together by the exact row operation. Returns (the reduced data rows, the global count).

    Every rank sends NH + :func:`capacity` rows, a length that depends only on what every rank
    already holds, never on its own arguments, so a rank with a bad argument or a different C
    still sends what the others expect (a collective of mismatched sizes could hang). If any
    rank failed or the ranks disagree or the global m is too small (seen alike on every rank),
    every rank calls :func:`exchange_header` -- the rare second collective -- which raises the
    same exception with the same message on every rank. If the call needs more rows than the
    capacity (the first call on a communicator, or a larger C), the data is reduced again at
    the new capacity: a second collective, once per new size."""
    from . import exact

    cap = capacity(comm)
    failed = local.error is not None or data is None
    need = 0 if failed else data.shape[0]
    buf = np.zeros((NH + cap, exact.ROW), np.int64)
    bits = (local.header[:NAGREE] + 0.0).view(np.int64)  # + 0.0: −0.0 → 0.0
    buf[:NAGREE, 0] = bits
    buf[NAGREE:2 * NAGREE, 0] = -bits
    buf[_FAILED, 0] = int(failed)
    buf[_NEEDED, 0] = need
    buf[_COUNT, 0] = 0
    buf[_COUNT, 1] = 0 if failed else int(local.header[F["count"]])
    if 0 < need <= cap:
        buf[NH:NH + need] = data
    got = _exact_allreduce(comm, buf)
    agree = (got[:NAGREE, 0] == -got[NAGREE:2 * NAGREE, 0]).all()
    count = int(got[_COUNT, 1])
    min_m = 2 if local.what == "batch_norm_train" else 1
    if got[_FAILED, 0] or not agree or count < min_m:
        exchange_header(comm, local)  # raises on every rank
        raise AssertionError("the reduced header showed a fault the headers do not")
    needed = int(got[_NEEDED, 0])
    if needed > cap:
        comm.Set_attr(_KEYVAL[0], needed)
        got = np.concatenate([got[:NH], _exact_allreduce(comm, np.ascontiguousarray(data))])
    return got[NH:NH + need], count
