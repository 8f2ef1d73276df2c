"""The sweep as data: axes, shape presets, parsing, and the plan.

A configuration is one point of ``backend × op × layout × dtype × batch size × shape``. The plan
lists every configuration of the product; each one either runs or carries the reason it is
skipped (m = 1 in training, backend unavailable, layout/shape mismatch, CUDA simulator, no
kernel for the pair). Nothing here branches on a backend's name: what a backend is comes from
its :class:`nbbn.registry.BackendInfo`.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field

import numpy as np

from .. import registry
from ..spec import Layout, Op

# ---------------------------------------------------------------------------------------------
# Shapes

#: A shape item: (C,) for the NC layout (an MLP's features) or (C, H, W) for NCHW.
Shape = tuple[int, ...]

#: Every batch-norm layer of torchvision's ResNet-50 (v1.5, stride on the 3×3 conv) at 224²
#: input, as distinct (C, H, W): the stem, then per stage the 1×1/3×3 widths and the expansion.
RESNET50: tuple[Shape, ...] = (
    (64, 112, 112),                                   # stem bn1
    (64, 56, 56), (256, 56, 56),                      # layer1
    (128, 56, 56), (128, 28, 28), (512, 28, 28),      # layer2
    (256, 28, 28), (256, 14, 14), (1024, 14, 14),     # layer3
    (512, 14, 14), (512, 7, 7), (2048, 7, 7),         # layer4
)

PRESETS: dict[str, tuple[Shape, ...]] = {
    "resnet50": RESNET50,
    # One early, one middle and one late ResNet-50 layer: big H·W, balanced, many channels.
    "resnet50-small": ((64, 56, 56), (256, 14, 14), (2048, 7, 7)),
    # Hidden widths of MLPs and transformer feed-forward blocks (NC layout, m = N).
    "mlp": ((256,), (512,), (1024,), (2048,), (4096,), (8192,)),
    "mlp-small": ((256,), (1024,), (4096,)),
    # Odd sizes for smoke tests: C odd, H·W not a power of two.
    "tiny": ((3,), (17,), (5, 3, 7), (16, 9, 9)),
}

#: What ``--shapes`` means when it is not given.
DEFAULT_SHAPES = ("resnet50-small", "mlp-small")
DEFAULT_BATCH_SIZES = (1, 8, 32)
QUICK_SHAPES = ("tiny",)
QUICK_BATCH_SIZES = (2, 8)


class SweepError(ValueError):
    """Malformed sweep input; the message is one line, fit for click.UsageError."""


def parse_shapes(items) -> tuple[Shape, ...]:
    """Preset names and custom shapes -> distinct shapes in the order given.

    Each item is a preset name, ``C`` (NC) or ``C,H,W`` / ``CxHxW`` (NCHW); items are separated
    by ``;`` or spaces within one value, and the option may be repeated.
    """
    out: list[Shape] = []
    for value in items:
        for item in re.split(r"[;\s]+", value.strip()):
            if not item:
                continue
            if item in PRESETS:
                shapes = PRESETS[item]
            else:
                parts = re.split(r"[,x]", item)
                if not all(re.fullmatch(r"\d+", p) for p in parts) or len(parts) not in (1, 3):
                    raise SweepError(
                        f"bad shape {item!r}: use a preset ({', '.join(PRESETS)}), C, or C,H,W "
                        "with positive integers")
                shape = tuple(int(p) for p in parts)
                if min(shape) < 1:
                    raise SweepError(f"bad shape {item!r}: sizes must be >= 1")
                shapes = (shape,)
            out.extend(s for s in shapes if s not in out)
    if not out:
        raise SweepError("no shapes given")
    return tuple(out)


def parse_int_list(text: str, what: str = "batch sizes") -> tuple[int, ...]:
    """``"1,2,8"`` -> (1, 2, 8); positive integers, duplicates dropped, order kept."""
    parts = [p for p in re.split(r"[,\s]+", text.strip()) if p]
    if not parts or not all(re.fullmatch(r"\d+", p) and int(p) > 0 for p in parts):
        raise SweepError(f"bad {what} {text!r}: give positive integers separated by commas, "
                         "e.g. 1,2,8,32")
    return tuple(dict.fromkeys(int(p) for p in parts))


def shape_label(shape: Shape) -> str:
    return "x".join(str(s) for s in shape)


# ---------------------------------------------------------------------------------------------
# Configurations and the plan


@dataclass(frozen=True)
class Config:
    backend: str
    op: Op
    layout: Layout
    dtype: str
    N: int
    shape: Shape  # (C,) or (C, H, W) as given

    @property
    def C(self) -> int:
        return self.shape[0]

    @property
    def H(self) -> int:
        return self.shape[1] if len(self.shape) == 3 else 1

    @property
    def W(self) -> int:
        return self.shape[2] if len(self.shape) == 3 else 1

    @property
    def m(self) -> int:
        return self.N * self.H * self.W

    @property
    def x_shape(self) -> tuple[int, ...]:
        return (self.N, self.C) if self.layout is Layout.NC else (self.N, self.C, self.H, self.W)

    @property
    def numel(self) -> int:
        return self.N * self.C * self.H * self.W

    @property
    def key(self) -> tuple:
        """What identifies a configuration in result files (resume, compare)."""
        return config_key(self.backend, self.op, self.layout, self.dtype, self.N, self.C,
                          self.H, self.W)

    def columns(self) -> dict:
        return {"backend": self.backend, "op": str(self.op), "layout": str(self.layout),
                "dtype": self.dtype, "N": self.N, "C": self.C, "H": self.H, "W": self.W,
                "shape": shape_label(self.shape), "m": self.m}


KEY_COLUMNS = ("backend", "op", "layout", "dtype", "N", "C", "H", "W")


def config_key(backend, op, layout, dtype, N, C, H, W) -> tuple:
    return (str(backend), str(op), str(layout), str(dtype), int(N), int(C), int(H), int(W))


@dataclass
class Sweep:
    """The axes, declared once. Order of iteration: the backend varies fastest, so a point's
    inputs and reference are built once and shared by every backend."""

    backends: tuple[str, ...]
    ops: tuple[Op, ...] = tuple(Op)
    layouts: tuple[Layout, ...] = (Layout.NC, Layout.NCHW)  # NHWC: harness round 2 (#10)
    dtypes: tuple[str, ...] = ("float32",)
    batch_sizes: tuple[int, ...] = DEFAULT_BATCH_SIZES
    shapes: tuple[Shape, ...] = field(default_factory=lambda: parse_shapes(DEFAULT_SHAPES))

    def axes(self) -> dict[str, tuple]:
        return {"dtype": self.dtypes, "op": self.ops, "layout": self.layouts,
                "shape": self.shapes, "N": self.batch_sizes, "backend": self.backends}

    def configs(self):
        for dtype, op, layout, shape, N, backend in itertools.product(*self.axes().values()):
            yield Config(backend, Op(op), Layout(layout), str(np.dtype(dtype)), N, shape)


def simulator_reason(info: registry.BackendInfo) -> str | None:
    """CUDA backends under NUMBA_ENABLE_CUDASIM are available but not benchmark targets."""
    if info.device != "cuda":
        return None
    from numba import config

    return "CUDA simulator: not timed" if config.ENABLE_CUDASIM else None


def backend_reason(name: str) -> str | None:
    """Why a backend cannot be timed here (unavailable, simulator), else None."""
    reason = registry.unavailable_reason(name)
    if reason is not None:
        return f"backend unavailable: {reason}"
    reason = simulator_reason(registry.backend_info(name))
    if reason is not None:
        return reason
    try:
        registry.kernels(name)  # runs the backend's load hook once
    except Exception as exc:
        return f"backend failed to load: {type(exc).__name__}: {exc}"
    return None


def skip_reason(cfg: Config, backend_reasons: dict[str, str | None]) -> str | None:
    """Why this configuration is skipped, or None when it runs. Checked in this order."""
    if cfg.layout is Layout.NC and len(cfg.shape) != 1:
        return "layout/shape mismatch: NC takes shapes given as C, not C,H,W"
    if cfg.layout is Layout.NCHW and len(cfg.shape) != 3:
        return "layout/shape mismatch: NCHW takes shapes given as C,H,W, not C"
    if cfg.op in (Op.FORWARD_TRAIN, Op.BACKWARD) and cfg.m < 2:
        return "m = 1 in training: the unbiased variance needs more than 1 value per channel"
    reason = backend_reasons.get(cfg.backend)
    if reason is not None:
        return reason
    try:
        registry.select(cfg.backend, cfg.op, cfg.layout)
    except Exception as exc:  # no kernel for this pair, or the backend failed to load
        return f"no kernel: {exc}"
    return None


@dataclass
class Plan:
    run: list[Config]
    skipped: list[tuple[Config, str]]
    done: list[Config]  # already in the result file (--resume)

    @property
    def total(self) -> int:
        return len(self.run) + len(self.skipped) + len(self.done)

    def skip_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, reason in self.skipped:
            counts[reason] = counts.get(reason, 0) + 1
        return counts


def make_plan(sweep: Sweep, done_keys=frozenset(), previous_skips=None) -> Plan:
    """Sort the sweep's configurations into run / skipped / done.

    ``done_keys``: configurations already checked (and timed) in the result file; they are not
    run again. ``previous_skips``: key -> skip reason already recorded there; a configuration
    skipped again for the same reason counts as done (its row is not written twice).
    """
    previous_skips = previous_skips or {}
    reasons = {b: backend_reason(b) for b in sweep.backends}
    plan = Plan([], [], [])
    for cfg in sweep.configs():
        if cfg.key in done_keys:
            plan.done.append(cfg)
            continue
        reason = skip_reason(cfg, reasons)
        if reason is None:
            plan.run.append(cfg)
        elif previous_skips.get(cfg.key) == reason:
            plan.done.append(cfg)
        else:
            plan.skipped.append((cfg, reason))
    return plan
