"""What nbbn computes, as data: the ops, the memory layouts, and the argument bundles every
backend takes.

Channel axis and memory layout
------------------------------
The public functions take ``channel_axis=1`` (channels first: ``(N, C)``, ``(N, C, L)``,
``(N, C, H, W)``) or ``channel_axis=-1`` (channels last: ``(N, C)``, ``(N, L, C)``,
``(N, H, W, C)``); statistics run over every other axis. Kernels do not see the axes the user
named but the **memory layout** of the array, one of three:

* ``NC``   -- ``(N, C)`` with C contiguous; statistics over the N rows, m = N. A 3-/4-D input
  whose spatial size H·W is 1 is this layout too (its memory is the same).
* ``NCHW`` -- channels first in memory: kernels index an ``(N, C, S)`` view, S = H·W (or L), so
  channel c is N runs of S contiguous values; m = N·S.
* ``NHWC`` -- channels last in memory: kernels index an ``(N·S, C)`` view -- NC with m = N·S rows.

The memory layout comes from the strides, not from ``channel_axis``: an ``(N, C, H, W)`` array whose
memory is channels-last (a PyTorch ``channels_last`` tensor seen through NumPy, C with the smallest
stride) runs on the NHWC kernels with no copy, and its outputs are allocated in the same memory
format. ``channel_axis`` only says which axis is C.

:class:`Geometry` holds both views of one call: the user's shape and channel axis, and the
kernel layout with the axis permutation ``perm`` that puts the user's axes in memory order
(``x.transpose(perm)`` is C-contiguous when no copy is needed).

Fusion
------
Forward-train and inference take ``relu`` and ``residual``: y = max(BN(x) + residual, 0) with
``relu=True``, BN(x) + residual without. Backward takes ``relu`` and the forward's ``y`` (whose
sign is the ReLU mask) and then returns a fourth output dz = dy·[y > 0], the gradient of the
pre-activation (and of the residual).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np


class _Named(str, enum.Enum):
    """A str enum whose members print as their values and hash as them: Enum's own hash is
    the member's name hashed by a Python method (~0.1 µs, and unlike the hash of the equal
    str), and these members key the caches that every call looks up (round 10)."""

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


class Op(_Named):
    FORWARD_TRAIN = "forward-train"
    BACKWARD = "backward"
    INFERENCE = "inference"


class Layout(_Named):
    """Memory layout the kernels see (see the module docstring)."""

    NC = "NC"
    NCHW = "NCHW"
    NHWC = "NHWC"


class Fusion(_Named):
    """What follows the normalization in the same pass (forward) or precedes it (backward)."""

    NONE = "none"
    RELU = "relu"  # y = max(BN(x), 0)
    ADD = "add"  # y = BN(x) + residual
    ADD_RELU = "add-relu"  # y = max(BN(x) + residual, 0)

    @property
    def relu(self) -> bool:
        return self in (Fusion.RELU, Fusion.ADD_RELU)

    @property
    def residual(self) -> bool:
        return self in (Fusion.ADD, Fusion.ADD_RELU)

    @classmethod
    def of(cls, relu: bool, residual: bool) -> Fusion:
        return {(False, False): cls.NONE, (True, False): cls.RELU, (False, True): cls.ADD,
                (True, True): cls.ADD_RELU}[(bool(relu), bool(residual))]


#: Names of each op's array inputs and outputs, in the order the public API takes and returns them
#: (without fusion: a fused call adds ``residual`` to the forward inputs, ``y`` to backward's and
#: ``dz`` to backward's outputs, see :func:`op_outputs`).
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


def op_outputs(op: Op, fusion: Fusion = Fusion.NONE) -> tuple[str, ...]:
    """Output names of ``op`` under ``fusion``: backward with a ReLU also returns dz."""
    names = OP_OUTPUTS[Op(op)]
    if Op(op) is Op.BACKWARD and Fusion(fusion).relu:
        names = names + ("dz",)
    return names


FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


class Geometry(NamedTuple):
    """Shape and memory facts of one call, derived once from ``x`` by :mod:`nbbn.validate`
    (a NamedTuple: built on every call, so it must be cheap)."""

    layout: Layout  # the memory layout the kernels see
    shape: tuple[int, ...]  # x's shape as given
    channel_axis: int  # x's channel axis, normalized to 1 or ndim − 1
    N: int
    C: int
    S: int  # elements per (n, c) pair: H·W, L, or 1 for NC
    dtype: np.dtype
    #: Axes of ``shape`` in memory order: ``x.transpose(perm)`` is the memory-order view.
    perm: tuple[int, ...]
    #: ``perm`` is the identity (x's axes are already in memory order).
    identity_perm: bool = True

    @property
    def m(self) -> int:
        """Values per channel that the statistics run over."""
        return self.N * self.S

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def kernel_shape(self) -> tuple[int, ...]:
        """The shape kernels index: (N, C) for NC, (N, C, S) for NCHW, (N·S, C) for NHWC."""
        if self.layout is Layout.NCHW:
            return (self.N, self.C, self.S)
        if self.layout is Layout.NHWC:
            return (self.N * self.S, self.C)
        return (self.N, self.C)

    @property
    def memory_shape(self) -> tuple[int, ...]:
        """``shape`` permuted into memory order (the shape of an array to allocate)."""
        return tuple(self.shape[a] for a in self.perm)

    @property
    def numel(self) -> int:
        return self.N * self.C * self.S


def inverse_perm(perm: tuple[int, ...]) -> tuple[int, ...]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return tuple(inv)


@dataclass(slots=True)
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
    relu: bool = False
    residual: Any | None = None

    @property
    def fusion(self) -> Fusion:
        return Fusion.of(self.relu, self.residual is not None)


@dataclass(slots=True)
class BackwardArgs:
    geom: Geometry
    dy: Any
    x: Any
    save_mean: Any
    save_invstd: Any
    gamma: Any | None
    out: tuple[Any, ...] | None
    relu: bool = False
    y: Any | None = None  # the forward's output; its sign is the ReLU mask (relu only)

    @property
    def fusion(self) -> Fusion:
        return Fusion.RELU if self.relu else Fusion.NONE


@dataclass(slots=True)
class InferArgs:
    geom: Geometry
    x: Any
    running_mean: Any
    running_var: Any
    gamma: Any | None
    beta: Any | None
    eps: float
    out: Any | None
    relu: bool = False
    residual: Any | None = None

    @property
    def fusion(self) -> Fusion:
        return Fusion.of(self.relu, self.residual is not None)
