"""Bytes each op must move, for GB/s and the copy comparison.

Per element of x (S = itemsize bytes), with C per-channel vectors of S bytes each on top:

=============  =============================  =================================================
op             minimal model (``bytes``)      two-pass model (``bytes_2pass``)
=============  =============================  =================================================
inference      read x, write y: 2S            2S (one pass is all it needs)
forward-train  read x, write y: 2S            3S: x read again when a channel's data leaves
                                              the cache between statistics and normalization
backward       read dy, x, write dx: 3S       5S: dy and x read once for dγ, dβ, again for dx
=============  =============================  =================================================

Per-channel vectors counted (reads + writes): inference 4 (μ_pop, σ²_pop, γ, β); forward-train
8 (γ, β, running mean/var read and written, saved mean and invstd written); backward 5 (saved
mean and invstd, γ read; dγ, dβ written).

``gbps`` in the rows is always the minimal model; ``gbps_2pass`` is the same time against the
two-pass traffic. The copy reference moves 2 bytes per byte of x (one read, one write).
"""

from __future__ import annotations

from ..spec import Op

ELEMENT_TRAFFIC = {Op.INFERENCE: 2, Op.FORWARD_TRAIN: 2, Op.BACKWARD: 3}
ELEMENT_TRAFFIC_2PASS = {Op.INFERENCE: 2, Op.FORWARD_TRAIN: 3, Op.BACKWARD: 5}
VECTOR_TRAFFIC = {Op.INFERENCE: 4, Op.FORWARD_TRAIN: 8, Op.BACKWARD: 5}


def bytes_moved(op: Op, numel: int, C: int, itemsize: int, two_pass: bool = False) -> int:
    per_element = (ELEMENT_TRAFFIC_2PASS if two_pass else ELEMENT_TRAFFIC)[Op(op)]
    return itemsize * (per_element * numel + VECTOR_TRAFFIC[Op(op)] * C)


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("nan")
