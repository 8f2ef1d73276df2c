"""Baselines, registered in the same registry as the kernels (kind ``"baseline"``).

Each baseline's kernel functions take the validated bundles of :mod:`nbbn.spec` and return the
op's outputs in :func:`nbbn.spec.op_outputs` order, writing into ``args.out`` when it is given,
exactly like a kernel backend; so the runner calls ``registry.select(...).fn(args)`` for every
backend alike. The public API refuses them (:func:`nbbn.api._kernel_backend`).

* ``torch-cpu``    -- ``torch.ops.aten.native_batch_norm[_backward]`` on ``torch.from_numpy``
                      views (zero-copy; NHWC data is a ``channels_last`` NCHW tensor), with
                      PyTorch's own CPU thread pool; fusion as PyTorch users write it: the
                      normalization, then ``add_`` / ``relu_`` in place (see
                      :mod:`.torch_baseline`).
* ``torch-cuda``   -- the same ATen ops on CUDA arrays, wrapped zero-copy through
                      ``__cuda_array_interface__``; available when ``torch.cuda.is_available()``.
* ``numpy``        -- vectorized NumPy, statistics accumulated in float64 (the two-pass formulas
                      of :mod:`nbbn.reference`, written as a NumPy user would, with ``out=``);
                      fusion by ``np.add`` / ``np.maximum`` in place.
* ``nbbn-unfused`` -- nbbn's own ``cpu`` kernels without fusion, followed by ``np.add`` /
                      ``np.maximum`` in place (backward: dz = dy·[y > 0] by ``np.multiply``, then
                      the unfused backward on dz): what fusion saves. Planned only for fused
                      configurations (:func:`fusion_only`).

Half x (float16, bfloat16): ``cpu``, ``cpu-slowed`` and the torch baselines run it (PyTorch's
mixed-precision path: float32 per-channel tensors); ``numpy``, ``nbbn-unfused`` and the peers
register float32 and float64 only (KernelSpec's default ``dtypes``), so the plan skips them with
the reason "... does not run bfloat16 (it runs float32, float64)" (:func:`.sweep.skip_reason`).

The harness's ``--call api`` (the whole allocating call a user makes) needs each baseline's own
allocating call: :func:`api_call` returns it (PyTorch: the allocating ATen ops; the others: their
registered function with no ``out=``).
"""

from __future__ import annotations

import importlib.util
import time
from collections.abc import Callable

import numpy as np

from .. import registry, validate
from ..registry import BackendInfo, KernelSpec
from ..spec import BackwardArgs, InferArgs, Layout, Op, TrainArgs, inverse_perm
from . import peers

# ---------------------------------------------------------------------------------------------
# NumPy


def _view(args) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Reduction axes of the kernel-shaped view and the broadcast shape of a per-channel
    vector: NC and NHWC views are (rows, C); NCHW is (N, C, S)."""
    g = args.geom
    if g.layout is Layout.NCHW:
        return (0, 2), (1, g.C, 1)
    return (0,), (1, g.C)


def _kernel_view(a, g):
    """The kernel-shaped view of an x-shaped array (a copy only if its memory needs one)."""
    return np.ascontiguousarray(np.transpose(a, g.perm)).reshape(g.kernel_shape)


def _alloc_like_x(g):
    """An array of x's shape in the memory order the kernels use (``g.perm``)."""
    return np.empty(g.memory_shape, g.dtype).transpose(inverse_perm(g.perm))


def _vec(v, C: int, default: float) -> np.ndarray:
    return np.full(C, default) if v is None else np.asarray(v, dtype=np.float64)


def _fuse(args, yk) -> None:
    """y += residual, then y = max(y, 0), in place on the kernel-shaped view of y."""
    g = args.geom
    if args.residual is not None:
        np.add(yk, _kernel_view(args.residual, g), out=yk)
    if args.relu:
        np.maximum(yk, 0, out=yk)


def np_forward_train(args: TrainArgs):
    """μ = mean(x), σ² = mean((x − μ)²) in float64; y = (x − μ)·(γ·invstd) + β in x's dtype."""
    g = args.geom
    dt = g.dtype
    axes, bshape = _view(args)
    x = _kernel_view(args.x, g)
    if args.out is None:
        y, save_mean, save_invstd = _alloc_like_x(g), np.empty(g.C, dt), np.empty(g.C, dt)
    else:
        y, save_mean, save_invstd = args.out
    yk = np.transpose(y, g.perm).reshape(g.kernel_shape)  # a view: y has the kernels' layout
    mean = x.mean(axis=axes, dtype=np.float64)
    np.subtract(x, mean.astype(dt).reshape(bshape), out=yk)  # d = x − μ, kept in y
    var = np.einsum("ncs,ncs->c" if len(axes) == 2 else "nc,nc->c", yk, yk,
                    dtype=np.float64) / g.m
    invstd = 1.0 / np.sqrt(var + args.eps)
    scale = _vec(args.gamma, g.C, 1.0) * invstd
    np.multiply(yk, scale.astype(dt).reshape(bshape), out=yk)
    if args.beta is not None:
        np.add(yk, np.asarray(args.beta, dtype=dt).reshape(bshape), out=yk)
    _fuse(args, yk)
    save_mean[...] = mean
    save_invstd[...] = invstd
    if args.running_mean is not None:
        mo = args.momentum
        rm, rv = args.running_mean, args.running_var
        rm[...] = (1.0 - mo) * rm + mo * mean
        rv[...] = (1.0 - mo) * rv + mo * var * (g.m / (g.m - 1))
    return y, save_mean, save_invstd


def np_backward(args: BackwardArgs):
    """dβ = Σ dy, dγ = Σ dy·x̂ (float64 sums); dx = a·dy + b·x̂ + c with a = γ·invstd,
    b = −a·dγ/m, c = −a·dβ/m. With relu, dy is first replaced by dz = dy·[y > 0]."""
    g = args.geom
    dt = g.dtype
    axes, bshape = _view(args)
    x = _kernel_view(args.x, g)
    dy = _kernel_view(args.dy, g)
    n_out = 4 if args.relu else 3
    if args.out is None:
        outs = (_alloc_like_x(g), np.empty(g.C, dt), np.empty(g.C, dt))
        outs += (_alloc_like_x(g),) if args.relu else ()
    else:
        outs = tuple(args.out)[:n_out]
    dx, dgamma, dbeta = outs[:3]
    if args.relu:
        dzk = np.transpose(outs[3], g.perm).reshape(g.kernel_shape)
        np.multiply(dy, _kernel_view(args.y, g) > 0, out=dzk)
        dy = dzk
    dxk = np.transpose(dx, g.perm).reshape(g.kernel_shape)
    mean = np.asarray(args.save_mean, dtype=np.float64)
    invstd = np.asarray(args.save_invstd, dtype=np.float64)
    np.subtract(x, mean.astype(dt).reshape(bshape), out=dxk)
    np.multiply(dxk, invstd.astype(dt).reshape(bshape), out=dxk)  # x̂, kept in dx
    sub = "ncs,ncs->c" if len(axes) == 2 else "nc,nc->c"
    db = dy.sum(axis=axes, dtype=np.float64)
    dg = np.einsum(sub, dy, dxk, dtype=np.float64)
    a = _vec(args.gamma, g.C, 1.0) * invstd
    b = -a * dg / g.m
    c = -a * db / g.m
    np.multiply(dxk, b.astype(dt).reshape(bshape), out=dxk)
    dxk += c.astype(dt).reshape(bshape)
    dxk += dy * a.astype(dt).reshape(bshape)
    dgamma[...] = dg
    dbeta[...] = db
    return outs


def np_inference(args: InferArgs):
    """α = γ/√(σ²_pop + ε), β' = β − μ_pop·α (float64, C values); y = α·x + β'."""
    g = args.geom
    dt = g.dtype
    _, bshape = _view(args)
    x = _kernel_view(args.x, g)
    y = _alloc_like_x(g) if args.out is None else args.out
    alpha = _vec(args.gamma, g.C, 1.0) / np.sqrt(_vec(args.running_var, g.C, 0.0) + args.eps)
    shift = _vec(args.beta, g.C, 0.0) - _vec(args.running_mean, g.C, 0.0) * alpha
    yk = np.transpose(y, g.perm).reshape(g.kernel_shape)
    np.multiply(x, alpha.astype(dt).reshape(bshape), out=yk)
    np.add(yk, shift.astype(dt).reshape(bshape), out=yk)
    _fuse(args, yk)
    return (y,)


_NUMPY_FNS = {Op.FORWARD_TRAIN: np_forward_train, Op.BACKWARD: np_backward,
              Op.INFERENCE: np_inference}


def _register_numpy() -> None:
    for op, fn in _NUMPY_FNS.items():
        for layout in Layout:
            registry.register(KernelSpec("numpy", op, layout, fn, "vectorized NumPy"))


# ---------------------------------------------------------------------------------------------
# nbbn-unfused: nbbn's cpu kernels, then the fusion in NumPy


def _unfused(op: Op, layout: Layout) -> Callable:
    def forward(args):
        kernel = registry.select("cpu", op, layout).fn
        outs = kernel(_plain_bundle(args))
        g = args.geom
        yk = np.transpose(outs[0], g.perm).reshape(g.kernel_shape)
        _fuse(args, yk)
        return outs

    def backward(args):
        kernel = registry.select("cpu", op, layout).fn
        g = args.geom
        if not args.relu:
            return kernel(args)
        dz = args.out[3] if args.out is not None else _alloc_like_x(g)
        np.multiply(args.dy, args.y > 0, out=dz)
        plain = BackwardArgs(g, dz, args.x, args.save_mean, args.save_invstd, args.gamma,
                             None if args.out is None else tuple(args.out)[:3])
        return tuple(kernel(plain)) + (dz,)

    return backward if op is Op.BACKWARD else forward


def _plain_bundle(args):
    """The same bundle without fusion (relu False, no residual)."""
    if isinstance(args, TrainArgs):
        return TrainArgs(args.geom, args.x, args.gamma, args.beta, args.eps, args.running_mean,
                         args.running_var, args.momentum, args.out)
    return InferArgs(args.geom, args.x, args.running_mean, args.running_var, args.gamma,
                     args.beta, args.eps, args.out)


def _register_unfused() -> None:
    for op in Op:
        for layout in Layout:
            registry.register(KernelSpec("nbbn-unfused", op, layout, _unfused(op, layout),
                                         "nbbn cpu kernels, then np.add / np.maximum"))


# ---------------------------------------------------------------------------------------------
# PyTorch (the module that imports torch is loaded only when a torch baseline is selected)


def _torch_missing() -> str | None:
    if importlib.util.find_spec("torch") is None:
        return "torch is not installed (pip install 'nbbn[torch]')"
    return None


def _torch_cuda_availability() -> str | None:
    reason = _torch_missing()
    if reason is not None:
        return reason
    import torch

    if not torch.cuda.is_available():
        return "torch.cuda.is_available() is False (no CUDA build of torch, or no GPU)"
    if torch.cuda.current_stream().cuda_stream != 0:
        return ("torch's current CUDA stream is not the legacy default stream, on which the "
                "harness records its events")
    return None


def _load_torch(name: str):
    def load() -> None:
        from . import torch_baseline

        torch_baseline.register_kernels(name)

    return load


def _cpu_availability() -> str | None:
    return registry.unavailable_reason("cpu")


# ---------------------------------------------------------------------------------------------
# cpu-slowed: the A/B experiment's backend (opt-in: never in a default sweep)

#: The slowdown cpu-slowed adds to every call, as a fraction of the call's own time.
SLOWDOWN = 0.15


def _slowed(fn: Callable) -> Callable:
    """``fn`` followed by a busy-wait of SLOWDOWN × the time ``fn`` just took (perf_counter_ns
    before and after the call): every call is 1.15× the cpu kernel's time of that very call,
    so no calibration run is needed and the host's state moves both alike. The wait spins on
    one core (the clock read costs ~50 ns, the granularity of the added time). Checked in every
    run that times it beside ``cpu``: the ratio record cpu-slowed over cpu should be 1.15 (its
    interval is in ratios.csv; scripts/bench_reliability.sh prints it)."""
    pc = time.perf_counter_ns

    def call(args):
        t0 = pc()
        r = fn(args)
        t1 = pc()
        end = t1 + int((t1 - t0) * SLOWDOWN)
        while pc() < end:
            pass
        return r

    return call


def _slowed_bind(bind: Callable | None) -> Callable | None:
    """cpu's bound call (:func:`nbbn.bind`), slowed as :func:`_slowed` slows its call."""
    if bind is None:
        return None

    def bind_slowed(args):
        call = bind(args)  # bound once, as cpu's
        slowed = _slowed(lambda _: call())
        return lambda: slowed(None)
    return bind_slowed


def _register_slowed() -> None:
    for op in Op:
        for layout in Layout:
            spec = registry.select("cpu", op, layout)
            registry.register(KernelSpec("cpu-slowed", op, layout, _slowed(spec.fn),
                                         f"cpu ({spec.variant}) + busy-wait of "
                                         f"{SLOWDOWN:.0%} of the call's own time",
                                         variant=spec.variant, dtypes=spec.dtypes,
                                         fusions=spec.fusions, bind=_slowed_bind(spec.bind)))


BASELINES = (
    BackendInfo(name="torch-cpu", description="PyTorch ATen native_batch_norm on the CPU",
                availability=_torch_missing, load=_load_torch("torch-cpu"), kind="baseline",
                device="cpu", dtypes=validate.STORAGE_DTYPES),
    BackendInfo(name="torch-cuda", description="PyTorch ATen native_batch_norm on a CUDA GPU",
                availability=_torch_cuda_availability, load=_load_torch("torch-cuda"),
                kind="baseline", device="cuda", dtypes=validate.STORAGE_DTYPES),
    BackendInfo(name="numpy", description="vectorized NumPy (float64 statistics)",
                availability=lambda: None, load=_register_numpy, kind="baseline", device="cpu"),
    BackendInfo(name="nbbn-unfused",
                description="nbbn cpu kernels without fusion, then np.add / np.maximum",
                availability=_cpu_availability, load=_register_unfused, kind="baseline",
                device="cpu"),
    *peers.PEERS,
    BackendInfo(name="cpu-slowed",
                description=f"cpu kernels made {SLOWDOWN:.0%} slower (A/B test of compare)",
                availability=_cpu_availability, load=_register_slowed, kind="baseline",
                device="cpu", default_variant="auto"),
)

#: Baselines planned only when named with --backend.
_OPT_IN = {"cpu-slowed"}


def peer_names() -> frozenset[str]:
    """The peers users would pick instead of PyTorch (:mod:`.peers`): left out of --quick."""
    return frozenset(b.name for b in peers.PEERS)


def opt_in() -> frozenset[str]:
    """Backends never in a default sweep (name them with --backend)."""
    return frozenset(_OPT_IN)


def prepare_hook(backend: str) -> Callable | None:
    """A baseline's set-up ``prepare(args, eps)`` for one call's arguments (device copies,
    sessions, bindings), run when the case is built so that it is not timed; None for most."""
    return peers.PREPARE.get(backend)

#: Baselines that only mean something for fused configurations.
_FUSION_ONLY = {"nbbn-unfused"}


def fusion_only() -> frozenset[str]:
    """Backends planned only for fused configurations (their unfused call is another
    backend's)."""
    return frozenset(_FUSION_ONLY)


def api_call(backend: str) -> Callable | None:
    """A baseline's own allocating-call builder, ``make(call_inputs) -> (call, convert)``: a
    zero-argument callable and the conversion of its result into the user's axes (see
    :func:`nbbn.bench.cases.make_case`); or None: then the harness validates the arguments
    and calls the registered function with no ``out=`` on every call."""
    if backend in ("torch-cpu", "torch-cuda"):
        from . import torch_baseline

        return torch_baseline.api_call
    return None


for _info in BASELINES:
    if _info.name not in registry.backend_names():
        registry.register_backend(_info)
