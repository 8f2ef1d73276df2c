"""The sweep as data: shapes that carry their layout, presets, named target sweeps, the axes, and
the plan.

Shapes
------
A shape item says its memory layout (:class:`ShapeSpec`): ``NC`` takes ``(C,)`` (x is (N, C));
``NCHW`` and ``NHWC`` take ``(C, H, W)`` -- x is (N, C, H, W) for NCHW and (N, H, W, C) with
``channel_axis=-1`` for NHWC. Presets are sets of such dims: a preset of ``(C,)`` items runs in
NC, one of ``(C, H, W)`` items in each selected spatial layout (NCHW, NHWC). On the command line
a custom shape names its layout (``NHWC:256,14,14``, ``NC:512``); a bare ``512`` is NC and a bare
``256,14,14`` runs in every selected spatial layout, like a preset; ``NHWC:resnet50`` restricts a
preset to one layout.

Configurations and points
-------------------------
A configuration (:class:`Config`) is one row of the results: backend × variant × op × layout ×
fusion × call × cache × dtype × N × dims. The configurations that differ only in (backend,
variant) and share a device form a *point* (:class:`Point`): they are checked and then timed
together, round-robin in one loop with a copy of the same bytes (:mod:`nbbn.bench.runner`).

The plan holds only valid configurations: backward with a residual (``add``, ``add-relu``) is the
same call as without (the residual's gradient is dz) and is not planned; a fusion-only baseline
(``nbbn-unfused``) is planned only for fused configurations. Configurations are skipped only for
real reasons, each stated: backend unavailable here (and why), CUDA simulator (not a timing
target), m = 1 in training, no kernel of that variant for the op and layout, dtype not run by
the kernel.

Nothing here branches on a backend's name: what a backend is comes from its
:class:`nbbn.registry.BackendInfo` and from :mod:`nbbn.bench.baselines`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .. import registry
from ..spec import Fusion, Layout, Op
from ..validate import storage_dtype
from . import baselines

SPATIAL = (Layout.NCHW, Layout.NHWC)
CALLS = ("kernel", "api")
CACHES = ("cold", "warm")


class SweepError(ValueError):
    """Malformed sweep input; the message is one line, fit for click.UsageError."""


# ---------------------------------------------------------------------------------------------
# Shapes

Dims = tuple[int, ...]

#: Every batch-norm layer of torchvision's ResNet-50 (v1.5, stride on the 3×3 conv) at 224²
#: input, as distinct (C, H, W): the stem, then per stage the 1×1/3×3 widths and the expansion.
RESNET50: tuple[Dims, ...] = (
    (64, 112, 112),                                   # stem bn1
    (64, 56, 56), (256, 56, 56),                      # layer1
    (128, 56, 56), (128, 28, 28), (512, 28, 28),      # layer2
    (256, 28, 28), (256, 14, 14), (1024, 14, 14),     # layer3
    (512, 14, 14), (512, 7, 7), (2048, 7, 7),         # layer4
)

PRESETS: dict[str, tuple[Dims, ...]] = {
    "resnet50": RESNET50,
    # One early, one middle and one late ResNet-50 layer: big H·W, balanced, many channels.
    "resnet50-small": ((64, 56, 56), (256, 14, 14), (2048, 7, 7)),
    # Hidden widths of MLPs and transformer feed-forward blocks (NC layout, m = N).
    "mlp": ((256,), (512,), (1024,), (2048,), (4096,), (8192,)),
    "mlp-small": ((256,), (1024,), (4096,)),
    # Odd sizes for smoke tests: C odd, H·W not a power of two.
    "tiny": ((3,), (17,), (5, 3, 7), (16, 9, 9)),
}

DEFAULT_SHAPES = ("resnet50-small", "mlp-small")
QUICK_SHAPES = ("tiny",)
#: Batch sizes when --batch-sizes is not given, per layout family: NC needs many rows to be a
#: batch-norm workload (m = N), the spatial layouts have m = N·H·W.
DEFAULT_BATCH_SIZES = {"NC": (64, 1024), "spatial": (1, 8, 32)}
QUICK_BATCH_SIZES = {"NC": (4, 16), "spatial": (2, 8)}


def layout_rank(layout: Layout) -> int:
    """Number of dims a shape item of this layout has: 1 for NC, 3 for NCHW and NHWC."""
    return 1 if Layout(layout) is Layout.NC else 3


@dataclass(frozen=True)
class ShapeSpec:
    layout: Layout
    dims: Dims  # (C,) for NC, (C, H, W) for NCHW and NHWC

    @property
    def label(self) -> str:
        return f"{self.layout}:{','.join(map(str, self.dims))}"


@dataclass(frozen=True)
class PointSpec:
    """A shape at a batch size; ``min_rounds`` overrides the timing's for this point (per-call
    costs want >= 2000 calls), ``tag`` marks it for reports (``tiny``: a per-call cost)."""

    layout: Layout
    dims: Dims
    N: int
    min_rounds: int | None = None
    tag: str = ""


def _dims(text: str, item: str) -> Dims:
    parts = re.split(r"[,x]", text)
    if not all(re.fullmatch(r"\d+", p) for p in parts) or len(parts) not in (1, 3):
        raise SweepError(
            f"bad shape {item!r}: use a preset ({', '.join(PRESETS)}), C, C,H,W, or LAYOUT:dims "
            "(NC:512, NCHW:64,56,56, NHWC:256,14,14) with positive integers")
    dims = tuple(int(p) for p in parts)
    if min(dims) < 1:
        raise SweepError(f"bad shape {item!r}: sizes must be >= 1")
    return dims


def parse_shapes(items, layouts=tuple(Layout)) -> tuple[ShapeSpec, ...]:
    """Preset names and custom shapes -> distinct :class:`ShapeSpec` in the order given.

    Items are separated by ``;`` or spaces within one value, and the option may be repeated.
    ``layouts`` (the --layout selection) filters presets and bare shapes; an item with a layout
    prefix (``NHWC:256,14,14``, ``NHWC:resnet50``) runs in that layout only."""
    layouts = tuple(Layout(x) for x in layouts)
    out: list[ShapeSpec] = []
    for value in items:
        for item in re.split(r"[;\s]+", value.strip()):
            if not item:
                continue
            pinned = None
            body = item
            if ":" in item:
                head, body = item.split(":", 1)
                try:
                    pinned = Layout(head.upper())
                except ValueError:
                    raise SweepError(f"bad shape {item!r}: unknown layout {head!r}; use NC, "
                                     "NCHW or NHWC") from None
            dims_list = PRESETS[body] if body in PRESETS else (_dims(body, item),)
            for dims in dims_list:
                if pinned is not None:
                    if len(dims) != layout_rank(pinned):
                        want = "C" if pinned is Layout.NC else "C,H,W"
                        raise SweepError(f"bad shape {item!r}: {pinned} takes {want}")
                    cands = (pinned,)
                elif len(dims) == 1:
                    cands = tuple(x for x in layouts if x is Layout.NC)
                else:
                    cands = tuple(x for x in layouts if x in SPATIAL)
                for lay in cands:
                    s = ShapeSpec(lay, dims)
                    if s not in out:
                        out.append(s)
    if not out:
        raise SweepError("no shapes for the selected layouts "
                         f"({', '.join(map(str, layouts))}): a C shape is NC, a C,H,W shape "
                         "is NCHW or NHWC")
    return tuple(out)


def parse_int_list(text: str, what: str = "batch sizes") -> tuple[int, ...]:
    """``"1,2,8"`` -> (1, 2, 8); positive integers, duplicates dropped, order kept."""
    parts = [p for p in re.split(r"[,\s]+", str(text).strip()) if p]
    if not parts or not all(re.fullmatch(r"\d+", p) and int(p) > 0 for p in parts):
        raise SweepError(f"bad {what} {text!r}: give positive integers separated by commas, "
                         "e.g. 1,2,8,32")
    return tuple(dict.fromkeys(int(p) for p in parts))


def points_from(shapes: tuple[ShapeSpec, ...], batch_sizes=None,
                defaults=DEFAULT_BATCH_SIZES) -> tuple[PointSpec, ...]:
    """Shapes × batch sizes (``batch_sizes`` for all, else ``defaults`` per layout family)."""
    out = []
    for s in shapes:
        family = "NC" if s.layout is Layout.NC else "spatial"
        for n in (batch_sizes or defaults[family]):
            out.append(PointSpec(s.layout, s.dims, int(n)))
    return tuple(out)


def dims_label(dims: Dims) -> str:
    return "x".join(str(s) for s in dims)


# ---------------------------------------------------------------------------------------------
# Named target sweeps


@dataclass(frozen=True)
class NamedSweep:
    """A fixed point set with default axes (explicit options still win)."""

    name: str
    description: str
    points: tuple[PointSpec, ...]
    defaults: dict = field(default_factory=dict)


def _cpu_targets() -> tuple[PointSpec, ...]:
    pts = [PointSpec(lay, d, 32) for lay in SPATIAL for d in RESNET50]
    tiny = {(16, 8), (256, 256)}
    for C in (256, 1024, 4096):
        for N in (256, 4096, 32768):
            pts.append(PointSpec(Layout.NC, (C,), N, *((2000, "tiny") if (C, N) in tiny
                                                       else ())))
    pts.append(PointSpec(Layout.NC, (16,), 8, 2000, "tiny"))
    return tuple(pts)


def _cuda_targets() -> tuple[PointSpec, ...]:
    pts = [PointSpec(Layout.NCHW, d, N) for N in (32, 256) for d in RESNET50]
    pts += [PointSpec(Layout.NC, (C,), N) for C in (256, 1024, 4096) for N in (256, 4096, 65536)]
    return tuple(pts)


NAMED_SWEEPS: dict[str, NamedSweep] = {s.name: s for s in (
    NamedSweep(
        "cpu-targets",
        "issue #9's shape set: ResNet-50's 12 BN shapes at N = 32 in NCHW and NHWC, NC "
        "C in {256, 1024, 4096} x N in {256, 4096, 32768}, the tiny calls NC 8x16 and 256x256 "
        "(>= 2000 rounds); cpu vs torch-cpu, allocating API calls, cold caches",
        _cpu_targets(),
        {"backends": ("cpu", "torch-cpu"), "calls": ("api",), "caches": ("cold",),
         "dtypes": ("float32",)}),
    NamedSweep(
        "cuda-targets",
        "issue #11's shape set: ResNet-50's 12 BN shapes at N = 32 and 256 (NCHW), NC C in "
        "{256, 1024, 4096} x N in {256, 4096, 65536}; cuda vs torch-cuda, every kernel version, "
        "preallocated outputs, cold L2",
        _cuda_targets(),
        {"backends": ("cuda", "torch-cuda"), "variants": "all", "calls": ("kernel",),
         "caches": ("cold",), "dtypes": ("float32",)}),
)}


# ---------------------------------------------------------------------------------------------
# Configurations, points and the plan


@dataclass(frozen=True)
class Point:
    """What the configurations timed together share (everything but backend and variant)."""

    op: Op
    layout: Layout
    fusion: Fusion
    call: str
    cache: str
    dtype: str
    N: int
    dims: Dims
    min_rounds: int | None = field(default=None, compare=False)
    tag: str = field(default="", compare=False)

    @property
    def C(self) -> int:
        return self.dims[0]

    @property
    def H(self) -> int:
        return self.dims[1] if len(self.dims) == 3 else 1

    @property
    def W(self) -> int:
        return self.dims[2] if len(self.dims) == 3 else 1

    @property
    def m(self) -> int:
        return self.N * self.H * self.W

    @property
    def channel_axis(self) -> int:
        return -1 if self.layout is Layout.NHWC else 1

    @property
    def x_shape(self) -> tuple[int, ...]:
        """The array the user passes: (N, C), (N, C, H, W), or (N, H, W, C) for NHWC."""
        if self.layout is Layout.NC:
            return (self.N, self.C)
        if self.layout is Layout.NHWC:
            return (self.N, self.H, self.W, self.C)
        return (self.N, self.C, self.H, self.W)

    @property
    def numel(self) -> int:
        return math.prod(self.x_shape)

    @property
    def data_key(self) -> tuple:
        """What the inputs and the reference depend on (shared over call and cache modes)."""
        return (str(self.op), str(self.layout), str(self.fusion), self.dtype, self.N, self.dims)

    def columns(self) -> dict:
        return {"op": str(self.op), "layout": str(self.layout), "fusion": str(self.fusion),
                "call": self.call, "cache": self.cache, "dtype": self.dtype, "N": self.N,
                "C": self.C, "H": self.H, "W": self.W, "shape": dims_label(self.dims),
                "x_shape": dims_label(self.x_shape), "m": self.m, "tag": self.tag or None}


@dataclass(frozen=True)
class Config:
    backend: str
    variant: str
    point: Point

    @property
    def key(self) -> tuple:
        """What identifies a configuration in result files (resume, compare)."""
        p = self.point
        return config_key(self.backend, self.variant, p.op, p.layout, p.fusion, p.call, p.cache,
                          p.dtype, p.N, p.C, p.H, p.W)

    def columns(self) -> dict:
        return {"backend": self.backend, "variant": self.variant, **self.point.columns()}


KEY_COLUMNS = ("backend", "variant", "op", "layout", "fusion", "call", "cache", "dtype", "N",
               "C", "H", "W")


def config_key(backend, variant, op, layout, fusion, call, cache, dtype, N, C, H, W) -> tuple:
    return (str(backend), str(variant), str(op), str(layout), str(fusion), str(call), str(cache),
            str(dtype), int(N), int(C), int(H), int(W))


@dataclass
class Sweep:
    """The axes, declared once. ``variants``: "default", "all", or a tuple of names (see
    :func:`resolve_variants`)."""

    backends: tuple[str, ...]
    points: tuple[PointSpec, ...]
    ops: tuple[Op, ...] = tuple(Op)
    dtypes: tuple[str, ...] = ("float32",)
    fusions: tuple[Fusion, ...] = (Fusion.NONE,)
    calls: tuple[str, ...] = ("kernel",)
    caches: tuple[str, ...] = ("cold",)
    variants: str | tuple[str, ...] = "default"

    def points_iter(self):
        """Every valid Point, in run order: dtype, op, fusion, shape × N, call, cache (so a
        point's inputs and reference are built once for its call and cache modes)."""
        for dtype in self.dtypes:
            for op in self.ops:
                for fusion in self.fusions:
                    if Op(op) is Op.BACKWARD and Fusion(fusion).residual:
                        continue  # the same call as without the residual: not a configuration
                    for ps in self.points:
                        for call in self.calls:
                            for cache in self.caches:
                                yield Point(Op(op), Layout(ps.layout), Fusion(fusion), call,
                                            cache, storage_dtype(dtype).name, ps.N, ps.dims,
                                            ps.min_rounds, ps.tag)


def simulator_reason(info: registry.BackendInfo) -> str | None:
    """CUDA backends under NUMBA_ENABLE_CUDASIM are available but not benchmark targets."""
    if info.device != "cuda":
        return None
    from numba import config

    return "CUDA simulator: not timed" if config.ENABLE_CUDASIM else None


def backend_reason(name: str, allow_simulator: bool = False) -> str | None:
    """Why a backend cannot be timed here (unavailable, simulator, fails to load), else None."""
    reason = registry.unavailable_reason(name)
    if reason is not None:
        return f"backend unavailable: {reason}"
    if not allow_simulator:
        reason = simulator_reason(registry.backend_info(name))
        if reason is not None:
            return reason
    try:
        registry.kernels(name)  # runs the backend's load hook once
    except Exception as exc:
        return f"backend failed to load: {type(exc).__name__}: {exc}"
    return None


def check_variants(variants, backends, reasons: dict[str, str | None]) -> None:
    """SweepError for a variant name that no usable selected backend registers."""
    if isinstance(variants, str):
        return
    known = {b: registry.variants(b) for b in backends if reasons.get(b) is None}
    everywhere = {v for names in known.values() for v in names}
    for v in variants:
        if v not in everywhere:
            there = "; ".join(f"{b}: {', '.join(n)}" for b, n in known.items()) or "none"
            raise SweepError(f"unknown variant {v!r}; the selected backends have: {there}")


def resolve_variants(backend: str, op: Op, layout: Layout, variants,
                     usable: bool) -> list[tuple[str, str | None]]:
    """(variant, skip reason or None) of one backend for one op and layout.

    * ``"default"``: the backend's default variant (``BackendInfo.default_variant``);
    * ``"all"``: every variant it registers for (op, layout), default first;
    * names: those of the names the backend registers (for any op and layout; one missing for
      this op and layout is skipped with its reason); a backend that registers none of them
      runs its default (baselines keep their place in the loop).
    """
    info = registry.backend_info(backend)
    if not usable:
        names = [info.default_variant] if isinstance(variants, str) else list(variants)
        return [(v, None) for v in names]
    here = registry.variants(backend, op, layout)
    if variants == "default":
        return [(info.default_variant,
                 None if info.default_variant in here else f"no kernel for {op} {layout}")]
    if variants == "all":
        return [(v, None) for v in here] or [(info.default_variant,
                                              f"no kernel for {op} {layout}")]
    mine = [v for v in variants if v in registry.variants(backend)]
    if not mine:
        return [(info.default_variant,
                 None if info.default_variant in here else f"no kernel for {op} {layout}")]
    return [(v, None if v in here else f"no variant {v!r} for {op} {layout}") for v in mine]


def skip_reason(cfg: Config, reasons: dict[str, str | None]) -> str | None:
    """Why this configuration is skipped, or None when it runs. Checked in this order."""
    p = cfg.point
    reason = reasons.get(cfg.backend)
    if reason is not None:
        return reason
    if p.op in (Op.FORWARD_TRAIN, Op.BACKWARD) and p.m < 2:
        return "m = 1 in training: the unbiased variance needs more than 1 value per channel"
    spec = registry.select(cfg.backend, p.op, p.layout, cfg.variant)
    if storage_dtype(p.dtype) not in spec.dtypes:
        return (f"{cfg.backend} {cfg.variant} does not run {p.dtype} (it runs "
                f"{', '.join(str(d) for d in spec.dtypes)})")
    return None


@dataclass
class PointPlan:
    """The configurations of one point on one device: timed together in one loop."""

    point: Point
    device: str
    run: list[Config] = field(default_factory=list)
    skipped: list[tuple[Config, str]] = field(default_factory=list)
    done: list[Config] = field(default_factory=list)


@dataclass
class Plan:
    groups: list[PointPlan]

    @property
    def run(self) -> list[Config]:
        return [c for g in self.groups for c in g.run]

    @property
    def skipped(self) -> list[tuple[Config, str]]:
        return [s for g in self.groups for s in g.skipped]

    @property
    def done(self) -> list[Config]:
        return [c for g in self.groups for c in g.done]

    @property
    def total(self) -> int:
        return len(self.run) + len(self.skipped) + len(self.done)

    def skip_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, reason in self.skipped:
            counts[reason] = counts.get(reason, 0) + 1
        return counts


def make_plan(sweep: Sweep, done_keys=frozenset(), previous_skips=None,
              allow_simulator: bool = False) -> Plan:
    """Sort the sweep's configurations into points; in each, run / skipped / done.

    ``done_keys``: configurations already checked (and timed) in the result file; a point all of
    whose runnable configurations are done is not run again, otherwise the whole point runs
    again (its ratios must come from one loop). ``previous_skips``: key -> skip reason already
    recorded; a configuration skipped again for the same reason is done (not written twice).
    """
    previous_skips = previous_skips or {}
    reasons = {b: backend_reason(b, allow_simulator) for b in sweep.backends}
    check_variants(sweep.variants, sweep.backends, reasons)
    fusion_only = baselines.fusion_only()
    groups: list[PointPlan] = []
    for point in sweep.points_iter():
        by_device: dict[str, PointPlan] = {}
        for backend in sweep.backends:
            if backend in fusion_only and point.fusion is Fusion.NONE:
                continue  # an unfused baseline of a call that has nothing to fuse
            info = registry.backend_info(backend)
            group = by_device.setdefault(info.device, PointPlan(point, info.device))
            usable = reasons[backend] is None
            for variant, why in resolve_variants(backend, point.op, point.layout,
                                                 sweep.variants, usable):
                cfg = Config(backend, variant, point)
                reason = why or skip_reason(cfg, reasons)
                if reason is None:
                    group.run.append(cfg)
                elif previous_skips.get(cfg.key) == reason:
                    group.done.append(cfg)
                else:
                    group.skipped.append((cfg, reason))
        for group in by_device.values():
            if group.run and all(c.key in done_keys for c in group.run):
                group.done += group.run
                group.run = []
            groups.append(group)
    return Plan(groups)
