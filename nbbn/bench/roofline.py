"""The one bytes model: bytes each op must move, for GB/s and the comparison with a copy.

Per element of x (S = itemsize bytes: 2 for float16 and bfloat16), with C per-channel vectors
on top, of V bytes each (``vector_itemsize``: the per-channel dtype,
:func:`nbbn.validate.channel_dtype` -- x's own, so V = S, except float32 (V = 4) for a half x):

=============  =============================  =================================================
op             minimal model (``bytes``)      two-pass model (``bytes_2pass``)
=============  =============================  =================================================
inference      read x, write y: 2S            2S (one pass is all it needs)
forward-train  read x, write y: 2S            3S: x read again when a channel's data leaves
                                              the cache between statistics and normalization
backward       read dy, x, write dx: 3S       5S: dy and x read once for dγ, dβ, again for dx
=============  =============================  =================================================

Fusion adds, per element, to both models:

* ``add`` / ``add-relu`` (forward-train, inference): read the residual, +S;
* ``relu`` (backward): read the forward's y (the ReLU mask) and write dz, +2S (the two-pass
  model reads y twice, once per pass: +3S);
* ``relu`` in the forward: nothing (max(·, 0) on the value being written).

Per-channel vectors counted (reads + writes): inference 4 (μ_pop, σ²_pop, γ, β); forward-train
8 (γ, β, running mean/var read and written, saved mean and invstd written); backward 5 (saved
mean and invstd, γ read; dγ, dβ written).

``gbps`` in the rows is always the minimal model; ``gbps_2pass`` is the same time against the
two-pass traffic. The copy the harness times beside every kernel reads and writes x's bytes:
:func:`copy_bytes` = 2·x.nbytes.
"""

from __future__ import annotations

from .. import validate
from ..spec import Fusion, Op

ELEMENT_TRAFFIC = {Op.INFERENCE: 2, Op.FORWARD_TRAIN: 2, Op.BACKWARD: 3}
ELEMENT_TRAFFIC_2PASS = {Op.INFERENCE: 2, Op.FORWARD_TRAIN: 3, Op.BACKWARD: 5}
VECTOR_TRAFFIC = {Op.INFERENCE: 4, Op.FORWARD_TRAIN: 8, Op.BACKWARD: 5}


def fusion_traffic(op: Op, fusion: Fusion, two_pass: bool = False) -> int:
    """Extra element traffic (in units of S) that ``fusion`` adds to ``op``."""
    op, fusion = Op(op), Fusion(fusion)
    if op is Op.BACKWARD:
        return (3 if two_pass else 2) if fusion.relu else 0
    return 1 if fusion.residual else 0


def itemsizes(dtype) -> dict:
    """S and V of x's ``dtype`` (a name or a dtype) as keyword arguments of
    :func:`bytes_moved` and :func:`read_write_bytes`: ``itemsize`` and ``vector_itemsize``."""
    dt = validate.storage_dtype(dtype)
    return {"itemsize": dt.itemsize, "vector_itemsize": validate.channel_dtype(dt).itemsize}


def bytes_moved(op: Op, numel: int, C: int, itemsize: int, two_pass: bool = False,
                fusion: Fusion = Fusion.NONE, vector_itemsize: int | None = None) -> int:
    """S·(elements' traffic)·numel + V·(vectors' traffic)·C (V = S unless given)."""
    per_element = (ELEMENT_TRAFFIC_2PASS if two_pass else ELEMENT_TRAFFIC)[Op(op)]
    per_element += fusion_traffic(op, fusion, two_pass)
    v = itemsize if vector_itemsize is None else vector_itemsize
    return itemsize * per_element * numel + v * VECTOR_TRAFFIC[Op(op)] * C


def copy_bytes(x_nbytes: int) -> int:
    """Bytes a copy of x moves: one read and one write."""
    return 2 * x_nbytes


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds and seconds > 0 else float("nan")


def read_write_bytes(op: Op, numel: int, C: int, itemsize: int,
                     fusion: Fusion = Fusion.NONE,
                     vector_itemsize: int | None = None) -> tuple[int, int]:
    """(read, write) bytes of the minimal model (``bytes_moved`` is their sum): inference and
    forward-train read x (and a residual) and write y; backward reads dy and x (and y with a
    ReLU) and writes dx (and dz). Per-channel vectors are counted as reads."""
    op, fusion = Op(op), Fusion(fusion)
    if op is Op.BACKWARD:
        r, w = 2, 1
        if fusion.relu:
            r, w = 3, 2
    else:
        r, w = 1 + (1 if fusion.residual else 0), 1
    total = bytes_moved(op, numel, C, itemsize, fusion=fusion, vector_itemsize=vector_itemsize)
    write = itemsize * w * numel
    assert itemsize * (r + w) * numel <= total
    return total - write, write
