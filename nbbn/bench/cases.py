"""The one case table: a point's inputs, float64 reference and the calls to time (numbagg's
pattern: every case does its set-up and returns zero-argument callables).

:func:`point_data` builds the host inputs of a point -- awkward on purpose: x = −2.3 + 0.5·randn,
seeded from the point, so every backend and every run sees the same data -- and the float64
reference outputs of :mod:`nbbn.reference`, computed over blocks of channels (each channel's
statistics are independent), so a 512 MiB input never needs several GiB of float64 temporaries.

:class:`BufferSets` puts K copies of the x-shaped inputs on the device. With ``--cache cold``
the calls rotate through them -- every call of the point, whatever its backend, takes the next
set -- and K is chosen so that K sets hold at least twice the last-level cache
(:func:`buffer_sets`): by the time a set comes round again, the other sets' traffic has evicted
it, so each call starts from DRAM. ``--cache warm`` uses one set (K = 1): the same buffers every
call, cache-resident when they fit.

:func:`make_case` builds, for one configuration, one zero-argument call per buffer set:

* ``--call kernel``: the registered kernel ``fn(args)`` on arguments validated once
  (:mod:`nbbn.validate`) with preallocated outputs -- allocation and validation are not timed;
* ``--call api``: the whole allocating call a user makes: ``nbbn.batch_norm_train(x, γ, β, ...)``
  for a kernel backend's default variant (another variant: validation and the registry's kernel
  with no ``out=``, the same work without the API's dispatch), a baseline's own allocating call
  (:func:`nbbn.bench.baselines.api_call`: PyTorch's allocating ATen ops).

``case.check(result)`` compares a call's outputs (and the running statistics it updated) with
the reference (:mod:`nbbn.tolerances`).
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import api, reference, registry, validate
from ..spec import Fusion, Op, op_outputs
from ..tolerances import tolerance
from . import baselines
from .sweep import Config, Point

EPS = 1e-5
MOMENTUM = 0.1
#: Running statistics carry the batch mean and variance, so they are held to those tolerances.
RUNNING_TOLERANCE_OF = {"running_mean": "save_mean", "running_var": "var"}
#: dz = dy·[y > 0] is exact; it is held to dx's bound.
TOLERANCE_OF = {"dz": "dx"}
#: Reference block size, in elements per channel block.
CHUNK = 1 << 22
#: Most buffer sets a cold point rotates through (tiny points would want hundreds of thousands).
MAX_SETS = 1024
X_INPUTS = ("x", "dy", "residual", "y")
#: Outputs of x's shape and dtype; the others are per-channel, in validate.channel_dtype.
X_OUTPUTS = ("y", "dx", "dz")


@dataclass
class PointData:
    key: tuple
    point: Point
    inputs: dict[str, np.ndarray]
    refs: tuple[np.ndarray, ...]  # float64, op_outputs order
    running_refs: dict[str, np.ndarray] = field(default_factory=dict)
    scales: dict[str, float] = field(default_factory=dict)

    @property
    def x_bytes(self) -> int:
        return self.inputs["x"].nbytes


def point_seed(p: Point) -> int:
    return zlib.crc32(repr((str(p.op), str(p.layout), str(p.fusion), p.dtype, p.x_shape))
                      .encode())


def _channel_blocks(p: Point):
    """Slices of the channel axis, each block holding about CHUNK elements."""
    per_channel = max(1, p.numel // p.C)
    step = max(1, CHUNK // per_channel)
    ax = 1 if p.channel_axis == 1 else len(p.x_shape) - 1
    for c0 in range(0, p.C, step):
        c1 = min(p.C, c0 + step)
        idx = [slice(None)] * len(p.x_shape)
        idx[ax] = slice(c0, c1)
        yield slice(c0, c1), tuple(idx)


def point_data(p: Point, reference_outputs: bool = True) -> PointData:
    """Inputs and float64 reference of a point (see the module docstring). A worker process
    that only times (``--isolate workers``) passes ``reference_outputs=False``: the same inputs
    (same seed; a backward's saved statistics still come from the reference forward), no
    reference outputs (``refs`` then hold uninitialized arrays)."""
    rng = np.random.default_rng(point_seed(p))
    dt = validate.storage_dtype(p.dtype)
    cd = validate.channel_dtype(dt)  # per-channel inputs: x's dtype, float32 for a half x
    C, ca = p.C, p.channel_axis
    fusion = Fusion(p.fusion)

    def randn(shape, loc, scale, dtype=dt):
        return (loc + scale * rng.standard_normal(shape, dtype=np.float32)).astype(dtype,
                                                                                    copy=False)

    x = randn(p.x_shape, -2.3, 0.5)
    gamma = randn(C, 1.0, 0.1, cd)
    beta = randn(C, 0.0, 0.1, cd)
    residual = randn(p.x_shape, 0.2, 1.0) if fusion.residual and p.op is not Op.BACKWARD \
        else None
    names = op_outputs(p.op, fusion)
    full = {n: np.empty(p.x_shape) for n in names if n in X_OUTPUTS}
    vec = {n: np.empty(C) for n in names if n not in full}
    running: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    if p.op is Op.FORWARD_TRAIN:
        rm, rv = randn(C, 0.0, 0.1, cd), (1.0 + rng.random(C)).astype(cd)
        inputs = {"x": x, "gamma": gamma, "beta": beta, "running_mean": rm, "running_var": rv}
        var = np.empty(C)
        for cs, xs in _channel_blocks(p) if reference_outputs else ():
            y, mean, invstd, v = reference.forward_train(
                x[xs], gamma[cs], beta[cs], EPS, channel_axis=ca, relu=fusion.relu,
                residual=None if residual is None else residual[xs])
            full["y"][xs], vec["save_mean"][cs], vec["save_invstd"][cs], var[cs] = \
                y, mean, invstd, v
        if reference_outputs:
            rm1, rv1 = reference.running_update(rm, rv, vec["save_mean"], var, p.m, MOMENTUM)
            running = {"running_mean": rm1, "running_var": rv1}
    elif p.op is Op.BACKWARD:
        dy = randn(p.x_shape, 0.1, 0.5)
        save_mean, save_invstd = np.empty(C, cd), np.empty(C, cd)
        y_in = np.empty(p.x_shape, dt) if fusion.relu else None
        scale2 = 0.0
        for cs, xs in _channel_blocks(p):
            yb, mean, invstd, _ = reference.forward_train(x[xs], gamma[cs], beta[cs], EPS,
                                                          channel_axis=ca, relu=fusion.relu)
            save_mean[cs], save_invstd[cs] = mean, invstd
            if y_in is not None:
                y_in[xs] = yb
            if not reference_outputs:
                continue
            kw = {"channel_axis": ca, "relu": fusion.relu,
                  "y": None if y_in is None else y_in[xs]}
            outs = reference.backward(dy[xs], x[xs], save_mean[cs], save_invstd[cs], gamma[cs],
                                      **kw)
            full["dx"][xs], vec["dgamma"][cs], vec["dbeta"][cs] = outs[:3]
            if fusion.relu:
                full["dz"][xs] = outs[3]
            scale2 += reference.dx_scale(dy[xs], save_invstd[cs], gamma[cs], **kw) ** 2
        inputs = {"dy": dy, "x": x, "save_mean": save_mean, "save_invstd": save_invstd,
                  "gamma": gamma}
        if y_in is not None:
            inputs["y"] = y_in
        scales = {"dx": math.sqrt(scale2)}
    else:
        rm = randn(C, -2.3, 0.05, cd)
        rv = (0.25 * (1.0 + 0.2 * rng.random(C))).astype(cd)
        inputs = {"x": x, "running_mean": rm, "running_var": rv, "gamma": gamma, "beta": beta}
        for cs, xs in _channel_blocks(p) if reference_outputs else ():
            full["y"][xs] = reference.inference(
                x[xs], rm[cs], rv[cs], gamma[cs], beta[cs], EPS, channel_axis=ca,
                relu=fusion.relu, residual=None if residual is None else residual[xs])
    if residual is not None:
        inputs["residual"] = residual
    refs = tuple(full[n] if n in full else vec[n] for n in names)
    return PointData(p.data_key, p, inputs, refs, running, scales)


# ---------------------------------------------------------------------------------------------
# Buffer sets (cold / warm)


def buffer_sets(point: Point, x_bytes: int, llc_bytes: int) -> int:
    """How many input/output sets a point rotates through: 1 when warm; when cold, the fewest
    K with K·(2·x_bytes) >= 2·llc_bytes -- 2·x_bytes being the smallest set any call of the
    point touches (the copy's x and destination) -- at most MAX_SETS."""
    if point.cache == "warm":
        return 1
    return int(min(MAX_SETS, max(1, math.ceil(2 * llc_bytes / (2 * x_bytes)))))


class BufferSets:
    """K device copies of the point's x-shaped inputs, stacked in one (K, ...) array per input
    (set k is a view of row k); per-channel inputs are shared (they are C values, read by every
    call of a real network too)."""

    def __init__(self, data: PointData, dev, K: int):
        self.K = K
        self.dev = dev
        shared = {k: dev.put(v) for k, v in data.inputs.items() if k not in X_INPUTS}
        stacked = {}
        for k, v in data.inputs.items():
            if k in X_INPUTS:
                if K == 1:
                    stacked[k] = [dev.put(v)]
                else:
                    host = np.empty((K,) + v.shape, v.dtype)
                    host[...] = v
                    big = dev.put(host)
                    stacked[k] = [big[i] for i in range(K)]
        self.sets = [{**shared, **{k: views[i] for k, views in stacked.items()}}
                     for i in range(K)]
        self.input_bytes = sum(v.nbytes for k, v in data.inputs.items() if k in X_INPUTS)

    def empty(self, shape, dtype) -> list:
        """K preallocated output arrays (views of one (K, ...) array)."""
        if self.K == 1:
            return [self.dev.empty(shape, dtype)]
        big = self.dev.empty((self.K,) + tuple(shape), dtype)
        return [big[i] for i in range(self.K)]


# ---------------------------------------------------------------------------------------------
# Cases


@dataclass
class CallInputs:
    """One buffer set's arrays and the constants of a call (what API builders get)."""

    op: Op
    fusion: Fusion
    channel_axis: int
    eps: float
    momentum: float
    arrays: dict

    @property
    def relu(self) -> bool:
        return self.fusion.relu


@dataclass
class Case:
    """``calls[k]()`` runs the configuration on buffer set k; ``check(result)`` returns
    ``(errors, tolerances, notes)``: rel_err and bound per output name, and remarks;
    ``set_bytes``: bytes one call reads and writes (its inputs and outputs)."""

    name: str
    calls: list[Callable[[], tuple]]
    check: Callable[[tuple], tuple[dict[str, float], dict[str, float], list[str]]]
    set_bytes: int
    description: str = ""


def _bundle(op: Op, a: dict, fusion: Fusion, ca: int, out):
    relu = fusion.relu
    if op is Op.FORWARD_TRAIN:
        return validate.train_args(a["x"], a["gamma"], a["beta"], EPS, a["running_mean"],
                                   a["running_var"], MOMENTUM, out, ca, relu, a.get("residual"))
    if op is Op.BACKWARD:
        return validate.backward_args(a["dy"], a["x"], a["save_mean"], a["save_invstd"],
                                      a["gamma"], out, ca, relu, a.get("y"))
    return validate.infer_args(a["x"], a["running_mean"], a["running_var"], a["gamma"],
                               a["beta"], EPS, out, ca, relu, a.get("residual"))


def _public_call(backend: str, op: Op, a: dict, fusion: Fusion, ca: int):
    """The public API call a user makes, allocating its outputs."""
    relu = fusion.relu
    if op is Op.FORWARD_TRAIN:
        x, g, b, rm, rv, res = (a["x"], a["gamma"], a["beta"], a["running_mean"],
                                a["running_var"], a.get("residual"))
        return lambda: api.batch_norm_train(x, g, b, eps=EPS, running_mean=rm, running_var=rv,
                                            momentum=MOMENTUM, channel_axis=ca, relu=relu,
                                            residual=res, backend=backend)
    if op is Op.BACKWARD:
        dy, x, sm, si, g, y = (a["dy"], a["x"], a["save_mean"], a["save_invstd"], a["gamma"],
                               a.get("y"))
        return lambda: api.batch_norm_backward(dy, x, sm, si, g, channel_axis=ca, relu=relu,
                                               y=y, backend=backend)
    x, rm, rv, g, b, res = (a["x"], a["running_mean"], a["running_var"], a["gamma"], a["beta"],
                            a.get("residual"))
    return lambda: (api.batch_norm_infer(x, rm, rv, g, b, eps=EPS, channel_axis=ca, relu=relu,
                                         residual=res, backend=backend),)


def _rel_err(out, ref: np.ndarray, scale: float = 0.0) -> float:
    """:func:`nbbn.tolerances.rel_err`, accumulated over blocks of rows (bounded memory)."""
    out = np.asarray(out)
    if out.shape != ref.shape:
        raise ValueError(f"shape mismatch: {out.shape} vs {ref.shape}")
    rows = out.reshape(out.shape[0], -1) if out.ndim > 1 else out.reshape(1, -1)
    refr = ref.reshape(rows.shape)
    step = max(1, CHUNK // max(1, rows.shape[1]))
    num = den = 0.0
    for r0 in range(0, rows.shape[0], step):
        o = rows[r0:r0 + step].astype(np.float64)
        f = refr[r0:r0 + step]
        fin = np.isfinite(f)
        if (~np.isfinite(o) & fin).any():
            return float("inf")
        num += float(np.sum(np.where(fin, o - f, 0.0) ** 2))
        den += float(np.sum(np.where(fin, f, 0.0) ** 2))
    return math.sqrt(num) / max(math.sqrt(den), scale, np.finfo(np.float64).tiny)


def make_case(cfg: Config, data: PointData, sets: BufferSets, dev) -> Case:
    """The calls of one configuration on every buffer set, and its check (see the module)."""
    p = cfg.point
    dt = validate.storage_dtype(p.dtype)
    cd = validate.channel_dtype(dt)  # per-channel outputs: float32 for a half x
    fusion, ca, op = Fusion(p.fusion), p.channel_axis, p.op
    info = registry.backend_info(cfg.backend)
    spec = registry.select(cfg.backend, op, p.layout, cfg.variant)
    names = op_outputs(op, fusion)
    # Running statistics are updated in place: each backend gets its own (shared by its sets).
    running = {k: dev.put(data.inputs[k].copy()) for k in ("running_mean", "running_var")
               if k in data.inputs}
    convert = None
    outs_by_set: list[tuple | None] = []
    calls = []
    prepare = baselines.prepare_hook(cfg.backend)
    if p.call == "kernel":
        # Outputs per set; arguments validated once (set 0) and re-pointed at each set's arrays
        # (same shapes, dtypes and strides, so the validation holds for every set).
        per_name = [sets.empty(p.x_shape, dt) if n in X_OUTPUTS else sets.empty((p.C,), cd)
                    for n in names]
        args0 = None
        for k, s in enumerate(sets.sets):
            outs = tuple(arrs[k] for arrs in per_name)
            out = outs[0] if op is Op.INFERENCE else outs
            a = {**s, **running}
            if args0 is None:
                args0 = args = _bundle(op, a, fusion, ca, out)
            else:
                fields = {f: a[f] for f in X_INPUTS if hasattr(args0, f) and
                          getattr(args0, f) is not None}
                args = dataclasses.replace(args0, out=out, **fields)
            if prepare is not None:
                prepare(args, EPS)
            # a backend's bound call where it has one (nbbn.bind; ONNX Runtime's IOBinding
            # is its prepare): what a caller on these same buffers would run
            calls.append(spec.bind(args) if spec.bind is not None
                         else (lambda fn=spec.fn, args=args: fn(args)))
            outs_by_set.append(outs)
    else:
        builder = baselines.api_call(cfg.backend) if info.kind != "kernel" else None
        for s in sets.sets:
            a = {**s, **running}
            if builder is not None:
                call, convert = builder(CallInputs(op, fusion, ca, EPS, MOMENTUM, a))
            elif info.kind == "kernel" and cfg.variant == info.default_variant:
                call = _public_call(cfg.backend, op, a, fusion, ca)
            else:
                def call(a=a, fn=spec.fn):
                    return fn(_bundle(op, a, fusion, ca, None))
            calls.append(call)
            outs_by_set.append(None)
    out_bytes = sum(p.numel * dt.itemsize if n in X_OUTPUTS else p.C * cd.itemsize
                    for n in names)

    def check(result):
        result = tuple(convert(result) if convert is not None else result)
        host = [dev.to_host(r) for r in result]
        errors, tols = {}, {}
        if len(host) != len(names):
            raise ValueError(f"returned {len(host)} outputs, expected {len(names)} {names}")
        for n, o, r in zip(names, host, data.refs, strict=True):
            errors[n] = _rel_err(o, r, data.scales.get(n, 0.0))
            tols[n] = tolerance(TOLERANCE_OF.get(n, n), dt)
        for name, ref in data.running_refs.items():
            errors[name] = _rel_err(dev.to_host(running[name]), ref)
            tols[name] = tolerance(RUNNING_TOLERANCE_OF[name], dt)
        notes = [spec.fn.bias_note] if getattr(spec.fn, "bias_note", None) else []
        outs = outs_by_set[0]
        if outs is not None and any(r is not o for r, o in zip(result, outs, strict=False)):
            notes.append("kernel did not return its out= arrays: allocation may be timed")
        return errors, tols, notes

    return Case(f"{cfg.backend}:{cfg.variant}", calls, check, sets.input_bytes + out_bytes,
                spec.description)


def copy_case(p: Point, sets: BufferSets, dev) -> Case:
    """The copy of x on every buffer set: into a preallocated destination per set
    (``--call kernel``) or allocating (``--call api``); a half x as its raw bits
    (:func:`.limits.bits`: the same bytes)."""
    from .limits import bits

    calls = []
    dsts = sets.empty(p.x_shape, validate.storage_dtype(p.dtype)) if p.call == "kernel" \
        else [None] * sets.K
    for s, dst in zip(sets.sets, dsts, strict=True):
        calls.append(dev.copy_call(bits(s["x"]), None if dst is None else bits(dst)))
    nbytes = sets.sets[0]["x"].nbytes
    return Case("copy", calls, lambda r: ({}, {}, []), 2 * nbytes, "copy of x")
