"""One registry keyed by (backend, op, layout, variant).

A backend is one module that calls :func:`register_backend` once (cheaply, at ``import nbbn``)
and :func:`register` for each kernel it provides. Heavy imports (numba-cuda, torch) stay inside
the backend's ``load`` hook, which :func:`select` runs the first time the backend is used, after
its ``availability`` check has passed. Nothing outside this module branches on backend names.

Each kernel's ``fn`` takes the validated argument bundle of its op (:mod:`nbbn.spec`) and returns
the op's outputs as a tuple, in :func:`nbbn.spec.op_outputs` order.

Variants: a backend may register several algorithms for one (op, layout) -- llm.c's numbered
kernel versions, or the CPU's work splits -- each under a name. Every backend names its default
variant (``BackendInfo.default_variant``); :func:`select` without a variant returns it, and the
harness sweeps the others (``nbbn bench --variant all``). Tests force a variant the same way.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .spec import FLOAT_DTYPES, Fusion, Layout, Op


class BackendUnavailable(RuntimeError):
    """A registered backend that cannot run here; the message says why."""


@dataclass(frozen=True)
class BackendInfo:
    name: str
    description: str
    #: Returns None when usable, else a one-line reason ("numba-cuda is not installed", ...).
    availability: Callable[[], str | None]
    #: Imports the backend's kernel module(s), which call register(); run once, lazily.
    load: Callable[[], None] = lambda: None
    #: "kernel" backends serve the public API; "baseline" ones exist for the harness to compare.
    kind: str = "kernel"
    #: Where the backend's arrays live: "cpu" or "cuda" (the harness picks its timer by this).
    device: str = "cpu"
    #: The variant :func:`select` returns when none is named.
    default_variant: str = "default"
    #: Every dtype of x some kernel of this backend runs (declared without loading it, so an
    #: error can say which backend runs a dtype); each KernelSpec says what it runs itself.
    dtypes: tuple = FLOAT_DTYPES


@dataclass(frozen=True)
class KernelSpec:
    backend: str
    op: Op
    layout: Layout
    fn: Callable
    description: str = ""
    variant: str = "default"
    #: dtypes of x this kernel runs (the API raises TypeError for others, naming who runs them).
    dtypes: tuple = FLOAT_DTYPES
    #: Fusions it computes in its passes (:class:`nbbn.spec.Fusion`); others raise ValueError.
    fusions: frozenset = frozenset({Fusion.NONE})
    #: ``bind(args) -> call``: the call of ``fn(args)`` prepared once, for a bundle whose
    #: outputs are preallocated: ``call()`` computes from the bound arrays' contents of the
    #: moment and returns what ``fn(args)`` returns (:func:`nbbn.bind`). None: ``fn(args)``.
    bind: Callable | None = None

    @property
    def key(self) -> tuple[str, Op, Layout, str]:
        return (self.backend, self.op, self.layout, self.variant)


@dataclass
class _State:
    backends: dict[str, BackendInfo] = field(default_factory=dict)
    kernels: dict[tuple[str, Op, Layout, str], KernelSpec] = field(default_factory=dict)
    #: select()'s answers for loaded backends, keyed by the arguments as given (the per-call path)
    fast: dict[tuple, KernelSpec] = field(default_factory=dict)
    loaded: set[str] = field(default_factory=set)
    reasons: dict[str, str | None] = field(default_factory=dict)
    stats: dict[str, Callable] = field(default_factory=dict)
    parts: dict[str, Parts] = field(default_factory=dict)


_STATE = _State()


def _changed() -> None:
    """Forget every cached answer (select's, and the API's per-call cache)."""
    _STATE.fast.clear()
    for hook in _ON_CHANGE:
        hook()


#: Functions called when a backend or kernel is (un)registered (caches elsewhere clear).
_ON_CHANGE: list[Callable[[], None]] = []


def register_backend(info: BackendInfo) -> None:
    _STATE.backends[info.name] = info
    _STATE.reasons.pop(info.name, None)
    _STATE.loaded.discard(info.name)
    _changed()


def register(spec: KernelSpec) -> KernelSpec:
    if spec.backend not in _STATE.backends:
        raise KeyError(f"register backend {spec.backend!r} before its kernels")
    spec = KernelSpec(spec.backend, Op(spec.op), Layout(spec.layout), spec.fn, spec.description,
                      spec.variant, tuple(np.dtype(d) for d in spec.dtypes),
                      frozenset(Fusion(f) for f in spec.fusions), spec.bind)
    _STATE.kernels[spec.key] = spec
    _changed()
    return spec


def register_stats(backend: str, fn: Callable) -> None:
    """Expose the batch-statistics code a backend's forward kernel runs, for the accuracy study.

    ``fn(x) -> (mean, var_biased)``: float64 NumPy arrays of shape (C,) for a host array x of the
    NC/NCL/NCHW family, computed by exactly the algorithm that backend's forward-train uses.
    """
    _STATE.stats[backend] = fn


@dataclass(frozen=True)
class Parts:
    """A backend's forward-train and backward cut at their reductions, so the per-channel sums of
    several processes can be combined between the halves (:mod:`nbbn.distributed`).

    Per-channel arrays crossing this boundary are host float64 NumPy arrays of shape (C,);
    ``m_total`` is the number of values per channel over every process. The argument bundles are
    those of :mod:`nbbn.validate` (``train_args(..., min_m=1)`` for a local slice).

    * ``stats(args) -> (mean, m2)``: this x's batch mean and M2 = Σ(x − mean)², by the backend's
      own statistics code (the same as its forward-train's).
    * ``normalize(args, mean, var, m_total) -> (y, save_mean, save_invstd)``: the forward's
      normalization with given statistics (var biased, over m_total values); updates
      ``args.running_*`` with the unbiased var·m_total/(m_total − 1); honours ``args.out``.
    * ``grad_sums(args) -> (sum_dy, sum_dy_xmu, sum_xmu)``: Σdy, Σdy·(x − save_mean) and
      Σ(x − save_mean) of this x.
    * ``grad_apply(args, sum_dy, sum_dy_xmu, m_total, sum_xmu=None) -> (dx, dgamma, dbeta)``:
      backward's elementwise pass with given (global) sums: dβ = sum_dy, dγ = invstd·sum_dy_xmu.
      With ``sum_xmu``, save_mean's rounding is folded back as in single-process backward (the
      mean used is save_mean + sum_xmu/m_total when that correction is within a few ulps of
      save_mean; otherwise save_mean as given).
    """

    stats: Callable
    normalize: Callable
    grad_sums: Callable
    grad_apply: Callable


def register_parts(backend: str, parts: Parts) -> None:
    _STATE.parts[backend] = parts


def parts(backend: str) -> Parts:
    """The backend's :class:`Parts` (loading it first); ValueError if it registers none."""
    _ensure_loaded(backend)
    try:
        return _STATE.parts[backend]
    except KeyError:
        raise ValueError(f"backend {backend!r} registers no forward/backward parts") from None


def stats_function(backend: str) -> Callable:
    """The registered statistics function of a backend (loading it first)."""
    _ensure_loaded(backend)
    try:
        return _STATE.stats[backend]
    except KeyError:
        raise ValueError(f"backend {backend!r} registers no statistics function") from None


def unregister_backend(name: str) -> None:
    """Remove a backend and its kernels (tests register throwaway backends)."""
    _STATE.backends.pop(name, None)
    _STATE.reasons.pop(name, None)
    _STATE.loaded.discard(name)
    _STATE.stats.pop(name, None)
    _STATE.parts.pop(name, None)
    _changed()
    for key in [k for k in _STATE.kernels if k[0] == name]:
        del _STATE.kernels[key]


def backend_names(kind: str | None = None) -> list[str]:
    """Registered backends (of one kind if given), in registration order."""
    return [n for n, b in _STATE.backends.items() if kind is None or b.kind == kind]


def backend_info(name: str) -> BackendInfo:
    try:
        return _STATE.backends[name]
    except KeyError:
        raise ValueError(
            f"unknown backend {name!r}; registered backends: {', '.join(backend_names())}"
        ) from None


def unavailable_reason(name: str) -> str | None:
    """None if the backend can run here, else why not (cached after the first check)."""
    info = backend_info(name)
    if name not in _STATE.reasons:
        try:
            _STATE.reasons[name] = info.availability()
        except Exception as exc:  # an availability probe must never take the caller down
            _STATE.reasons[name] = f"availability check failed: {exc}"
    return _STATE.reasons[name]


def availability() -> dict[str, str | None]:
    """Every registered backend mapped to None (usable) or the reason it is not."""
    return {name: unavailable_reason(name) for name in backend_names()}


def _ensure_loaded(name: str) -> None:
    reason = unavailable_reason(name)
    if reason is not None:
        raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    if name not in _STATE.loaded:
        backend_info(name).load()
        _STATE.loaded.add(name)


def select(backend: str, op: Op | str, layout: Layout | str,
           variant: str | None = None) -> KernelSpec:
    """The kernel for (backend, op, layout, variant); variant None means the backend's default.

    ValueError if unknown (naming the variants there are), BackendUnavailable (with the reason)
    if the backend cannot run here."""
    spec = _STATE.fast.get((backend, op, layout, variant))
    if spec is not None:
        return spec
    _ensure_loaded(backend)
    name = backend_info(backend).default_variant if variant is None else variant
    key = (backend, Op(op), Layout(layout), name)
    spec = _STATE.kernels.get(key)
    if spec is None:
        there = variants(backend, key[1], key[2])
        if not there:
            raise ValueError(f"backend {backend!r} has no kernel for {key[1]} {key[2]}")
        raise ValueError(f"backend {backend!r} has no variant {name!r} for {key[1]} {key[2]}; "
                         f"its variants: {', '.join(there)}")
    _STATE.fast[(backend, op, layout, variant)] = spec
    return spec


def variants(backend: str, op: Op | str | None = None,
             layout: Layout | str | None = None) -> list[str]:
    """Variant names a (loaded) backend registers, for one op/layout if given; default first."""
    _ensure_loaded(backend)
    names = dict.fromkeys(
        k[3] for k in _STATE.kernels
        if k[0] == backend and (op is None or k[1] == Op(op))
        and (layout is None or k[2] == Layout(layout)))
    default = backend_info(backend).default_variant
    return sorted(names, key=lambda n: (n != default, n))


def kernels(backend: str | None = None) -> list[KernelSpec]:
    """Registered kernels (loading each usable backend first); unusable backends are left out."""
    names = [backend] if backend is not None else backend_names()
    out = []
    for name in names:
        if unavailable_reason(name) is None:
            _ensure_loaded(name)
            out.extend(s for k, s in _STATE.kernels.items() if k[0] == name)
    return out
