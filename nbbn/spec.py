"""What nbbn computes, as data: the ops, the layouts, and the argument bundles every backend takes.

Layouts: the channel axis is always axis 1.

* ``NC``   -- ``x.shape == (N, C)``; statistics over N, so m = N.
* ``NCHW`` -- ``x.shape == (N, C, H, W)`` or ``(N, C, L)``; statistics over N·H·W (or N·L)
  per channel.

Kernels see the NCHW family as a 3-D ``(N, C, S)`` view with ``S = H·W`` (or ``L``).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import numpy as np


class Op(str, enum.Enum):
    FORWARD_TRAIN = "forward-train"
    BACKWARD = "backward"
    INFERENCE = "inference"

    def __str__(self) -> str:
        return self.value


class Layout(str, enum.Enum):
    NC = "NC"
    NCHW = "NCHW"

    def __str__(self) -> str:
        return self.value


#: Names of each op's array inputs and outputs, in the order the public API takes and returns them.
OP_INPUTS = {
    Op.FORWARD_TRAIN: ("x", "gamma", "beta"),
    Op.BACKWARD: ("dy", "x", "save_mean", "save_invstd", "gamma"),
    Op.INFERENCE: ("x", "running_mean", "running_var", "gamma", "beta"),
}
OP_OUTPUTS = {
    Op.FORWARD_TRAIN: ("y", "save_mean", "save_invstd"),
    Op.BACKWARD: ("dx", "dgamma", "dbeta"),
    Op.INFERENCE: ("y",),
}

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


@dataclass(frozen=True)
class Geometry:
    """Shape facts of one call, derived once from ``x`` by :mod:`nbbn.validate`."""

    layout: Layout
    shape: tuple[int, ...]  # x's shape as given
    N: int
    C: int
    S: int  # elements per (n, c) row: H·W, L, or 1 for NC
    dtype: np.dtype

    @property
    def m(self) -> int:
        """Values per channel that the statistics run over."""
        return self.N * self.S

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape kernels index: (N, C) for NC, (N, C, S) for the NCHW family."""
        return (self.N, self.C) if self.layout is Layout.NC else (self.N, self.C, self.S)


@dataclass
class TrainArgs:
    geom: Geometry
    x: Any
    gamma: Any | None
    beta: Any | None
    eps: float
    running_mean: Any | None
    running_var: Any | None
    momentum: float
    out: tuple[Any, Any, Any] | None


@dataclass
class BackwardArgs:
    geom: Geometry
    dy: Any
    x: Any
    save_mean: Any
    save_invstd: Any
    gamma: Any | None
    out: tuple[Any, Any, Any] | None


@dataclass
class InferArgs:
    geom: Geometry
    x: Any
    running_mean: Any
    running_var: Any
    gamma: Any | None
    beta: Any | None
    eps: float
    out: Any | None
