"""The batch norms people run, called the way people call them: rows beside nbbn in parts (a)
and (e) of ``nbbn accuracy``.

Each peer is imported only when the study runs and only if installed; a missing one becomes a
skip row with its reason. A peer takes the study's data, a 1-D array ``x`` of one channel's m
values (float32 or float64), lays it out as the named layout, and returns what it computed in
its own precision:

``torch-cpu`` / ``torch-cuda`` (layouts NC = (m, C), NCHW = (N, C, 1, S); C = 1 in part (a))
    Forward: ``torch.nn.functional.batch_norm(x, running_mean, running_var, weight=1, bias=0,
    training=True, momentum=1.0, eps)``. y is its output; the mean is the running mean (with
    momentum 1 and zero initial values it is the batch mean as stored, bit for bit); the biased
    variance is the running (unbiased) variance × (m − 1)/m; invstd is the ``save_invstd`` the
    op saved for backward (``y.grad_fn._saved_result2``; ``torch.native_batch_norm``'s when a
    build does not expose it). Backward: autograd, ``y.backward(dy)``.
    What ATen's CPU kernel (``aten/src/ATen/native/cpu/batch_norm_kernel.cpp``) does, and what
    part (a) shows it costs: a contiguous NCHW input (H·W > 1) is summed per channel
    sequentially in double, the mean is rounded to float and the variance accumulates
    (x − mean)² (float products) in double; an NC input (H·W = 1, "NC11 is also channels last")
    and channels-last inputs take the channels-last path, where each thread adds its rows into a
    per-thread buffer **in the input's dtype** (float32 partial sums of up to m/threads values)
    that are merged in double afterwards. Both paths normalize as y = x·α + β' with
    α = invstd·γ, β' = β − mean·α in the input's dtype, which cancels at large |mean|/std.
    Backward on the channels-last path accumulates Σdy and Σ(x − mean)·dy in per-thread
    input-dtype buffers as well. Results depend on torch's thread count (recorded).
``flax-fast-var`` / ``flax-two-pass`` (layout NC = (m, C), features last as Flax expects)
    ``flax.linen.BatchNorm(use_running_average=False, momentum=0.0, epsilon=eps,
    use_fast_variance=True | False)`` jitted on XLA's CPU backend. ``use_fast_variance=True``
    (Flax's default) is σ² = max(0, E[x²] − E[x]²); False is the two-pass E[(x − E[x])²].
    mean and var are the updated ``batch_stats`` (momentum 0: exactly the batch statistics),
    invstd = ``lax.rsqrt(var + eps)`` as Flax's ``_normalize`` computes it, y the module's
    output. Backward: ``jax.vjp`` with cotangent dy. If Flax is not installed, its
    ``_compute_stats`` and ``_normalize`` are re-implemented in a few lines of ``jax.numpy``
    (``how`` says which ran). float64 needs ``jax_enable_x64``, which loading this peer turns on.
``numpy`` (layouts 1-D, NC = (m, 2), NCHW = (N, 2, 1, S); x in both channels)
    ``a.mean(axis)``, ``a.var(axis)``, invstd = 1/√(var + ε), y = (a − mean)·invstd in the data's
    dtype, as a hand-written NumPy batch norm does. NumPy sums pairwise only along a contiguous
    reduction axis: the 1-D row is pairwise, the NC and NCHW rows reduce over a strided axis and
    accumulate sequentially in float32. Forward only (NumPy has no autograd).
``cupy`` (layout 1-D)
    The NumPy formulas on a CUDA device with CuPy's reductions. Forward only.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


def nchw_shape(m: int) -> tuple[int, int, int, int]:
    """(N, 1, 1, S) with S the largest divisor of m not above min(√m, 1024)."""
    s = 1
    for d in range(1, min(math.isqrt(m), 1024) + 1):
        if m % d == 0:
            s = d
    return (m // s, 1, 1, s)


def to_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """An (m, C) array (column c = channel c's m values) as a C-contiguous array of the layout:
    NC (m, C); NCHW (N, C, 1, S) with (N, S) from :func:`nchw_shape` (value i of a channel at
    n = i // S, s = i % S)."""
    m, C = a.shape
    if layout == "NC":
        return np.ascontiguousarray(a)
    if layout == "NCHW":
        n, _, _, s = nchw_shape(m)
        return np.ascontiguousarray(a.reshape(n, s, C).transpose(0, 2, 1)).reshape(n, C, 1, s)
    raise ValueError(f"unknown layout {layout!r}")


def from_layout(a: np.ndarray, layout: str) -> np.ndarray:
    """Inverse of :func:`to_layout`: back to (m, C)."""
    if layout == "NC":
        return a
    n, C, _, s = a.shape
    return a.reshape(n, C, s).transpose(0, 2, 1).reshape(n * s, C)


@dataclass
class Forward:
    """A forward call's results: mean, biased var and invstd as the peer returns them (floats
    from its own dtype), y as a 1-D array in x's order."""

    mean: float
    var: float
    invstd: float
    y: np.ndarray


@dataclass
class Gradients:
    """A backward call's results for (m, C) data: dx as (m, C), dγ and dβ as (C,)."""

    dx: np.ndarray
    dgamma: float
    dbeta: float


@dataclass
class Peer:
    """One peer implementation: ``forward(x, layout, eps)`` for one channel (x 1-D),
    ``backward(x, dy, layout, eps)`` for (m, C) arrays (or None when it has no autograd), the
    layouts it is run on, and its versions for the report."""

    name: str
    device: str
    layouts: tuple[str, ...]
    forward: Callable[[np.ndarray, str, float], Forward]
    backward: Callable[[np.ndarray, np.ndarray, str, float], Gradients] | None
    how: str
    versions: dict[str, str] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("float32", "float64")


class PeerMissing(Exception):
    """A peer that cannot run here; the message is the skip reason."""


# ----------------------------------------------------------------------------- PyTorch

def _torch_peer(device: str) -> Peer:
    if importlib.util.find_spec("torch") is None:
        raise PeerMissing("torch is not installed (pip install 'nbbn[peers]')")
    import torch
    import torch.nn.functional as F

    if device == "cuda" and not torch.cuda.is_available():
        raise PeerMissing("torch.cuda.is_available() is False (no CUDA build of torch, or no "
                          "GPU); run the study on a GPU machine to include it")
    dev = torch.device(device)

    def tensor(a: np.ndarray, layout: str) -> torch.Tensor:
        """(m, C) data in the layout, on the device."""
        return torch.from_numpy(to_layout(a, layout)).to(dev)

    def params(dtype, C: int, grad: bool):
        w = torch.ones(C, dtype=dtype, device=dev, requires_grad=grad)
        b = torch.zeros(C, dtype=dtype, device=dev, requires_grad=grad)
        return w, b

    def forward(x: np.ndarray, layout: str, eps: float) -> Forward:
        m = x.size
        xt = tensor(x.reshape(m, 1), layout).requires_grad_()  # so the op saves invstd
        rm = torch.zeros(1, dtype=xt.dtype, device=dev)
        rv = torch.zeros(1, dtype=xt.dtype, device=dev)
        w, b = params(xt.dtype, 1, False)
        y = F.batch_norm(xt, rm, rv, w, b, training=True, momentum=1.0, eps=eps)
        invstd = getattr(y.grad_fn, "_saved_result2", None)
        if invstd is None or invstd.numel() != 1:
            with torch.no_grad():
                invstd = torch.native_batch_norm(xt, w, b, None, None, True, 1.0, eps)[2]
        return Forward(mean=float(rm[0]), var=float(rv[0]) * (m - 1) / m,
                       invstd=float(invstd.detach().reshape(-1)[0]),
                       y=from_layout(y.detach().cpu().numpy(), layout).reshape(-1))

    def backward(x: np.ndarray, dy: np.ndarray, layout: str, eps: float) -> Gradients:
        xt = tensor(x, layout).requires_grad_()
        w, b = params(xt.dtype, x.shape[1], True)
        y = F.batch_norm(xt, None, None, w, b, training=True, momentum=0.1, eps=eps)
        y.backward(tensor(dy, layout))
        return Gradients(dx=from_layout(xt.grad.cpu().numpy(), layout),
                         dgamma=w.grad.cpu().numpy(), dbeta=b.grad.cpu().numpy())

    versions = {"torch": torch.__version__}
    if device == "cpu":
        versions["torch_threads"] = str(torch.get_num_threads())
    else:
        versions["torch_cuda"] = str(torch.version.cuda)
        versions["cudnn"] = str(torch.backends.cudnn.version())
        versions["gpu"] = torch.cuda.get_device_name(0)
    return Peer(f"torch-{device}", device, ("NC", "NCHW"), forward, backward,
                "torch.nn.functional.batch_norm (training=True); autograd for backward",
                versions)


# ----------------------------------------------------------------------------- JAX / Flax

def _flax_peer(fast: bool) -> Peer:
    if importlib.util.find_spec("jax") is None:
        raise PeerMissing("jax is not installed (pip install 'nbbn[peers]')")
    try:
        import jax
    except Exception as exc:  # a broken jaxlib must not stop the study
        raise PeerMissing(f"import jax failed: {type(exc).__name__}: {exc}") from None
    jax.config.update("jax_enable_x64", True)  # float64 rows; float32 arrays stay float32
    import jax.numpy as jnp
    from jax import lax

    try:
        cpu = jax.devices("cpu")[0]
    except Exception as exc:
        raise PeerMissing(f"jax has no CPU device: {exc}") from None
    try:
        import flax
        import flax.linen as nn
    except Exception as exc:
        nn, flax, why = None, None, f"{type(exc).__name__}: {exc}"

    cache: dict = {}

    def functions(dtype: np.dtype, eps: float):
        """(forward, backward), jitted, for one dtype and ε: f(scale, bias, x) -> y, mean, var."""
        key = (dtype.name, eps)
        if key in cache:
            return cache[key]
        if nn is not None:
            bn = nn.BatchNorm(use_running_average=False, momentum=0.0, epsilon=eps,
                              use_fast_variance=fast, dtype=dtype, param_dtype=dtype)

            def apply(scale, bias, x):
                C = x.shape[-1]
                stats = {"mean": jnp.zeros(C, dtype), "var": jnp.ones(C, dtype)}
                y, upd = bn.apply({"params": {"scale": scale, "bias": bias},
                                   "batch_stats": stats}, x, mutable=["batch_stats"])
                return y, upd["batch_stats"]["mean"], upd["batch_stats"]["var"]
        else:
            def apply(scale, bias, x):
                # flax.linen.normalization._compute_stats (axes 0, use_mean=True) ...
                mu = x.mean(0)
                if fast:
                    var = jnp.maximum(0.0, lax.square(x).mean(0) - lax.square(mu))
                else:
                    var = lax.square(x - mu[None]).mean(0)
                # ... and _normalize: y = (x − mean)·(rsqrt(var + ε)·scale) + bias
                mul = lax.rsqrt(var + eps) * scale
                return (x - mu[None]) * mul[None] + bias[None], mu, var

        def fwd(scale, bias, x):
            y, mean, var = apply(scale, bias, x)
            return y, mean, var, lax.rsqrt(var + eps)

        def bwd(scale, bias, x, dy):
            _, vjp = jax.vjp(lambda s, b, xx: apply(s, b, xx)[0], scale, bias, x)
            ds, db, dx = vjp(dy)
            return dx, ds, db

        cache[key] = (jax.jit(fwd), jax.jit(bwd))
        return cache[key]

    def put(a: np.ndarray):
        """(m, C) data, features last as Flax expects, on the CPU device."""
        return jax.device_put(np.ascontiguousarray(a), cpu)

    def scale_bias(dtype, C: int):
        return (jax.device_put(np.ones(C, dtype), cpu), jax.device_put(np.zeros(C, dtype), cpu))

    def forward(x: np.ndarray, layout: str, eps: float) -> Forward:
        fwd, _ = functions(x.dtype, eps)
        y, mean, var, invstd = fwd(*scale_bias(x.dtype, 1), put(x.reshape(-1, 1)))
        return Forward(mean=float(mean[0]), var=float(var[0]), invstd=float(invstd[0]),
                       y=np.asarray(y).reshape(-1))

    def backward(x: np.ndarray, dy: np.ndarray, layout: str, eps: float) -> Gradients:
        _, bwd = functions(x.dtype, eps)
        dx, ds, db = bwd(*scale_bias(x.dtype, x.shape[1]), put(x), put(dy))
        return Gradients(dx=np.asarray(dx), dgamma=np.asarray(ds), dbeta=np.asarray(db))

    import jaxlib

    versions = {"jax": jax.__version__, "jaxlib": jaxlib.__version__}
    variance = "E[x²] − E[x]² (use_fast_variance=True, Flax's default)" if fast else \
        "two-pass E[(x − E[x])²] (use_fast_variance=False)"
    if flax is not None:
        versions["flax"] = flax.__version__
        how = f"flax.linen.BatchNorm, {variance}, jitted on XLA CPU; jax.vjp for backward"
    else:
        how = (f"Flax's _compute_stats/_normalize re-implemented in jax.numpy (Flax not "
               f"importable: {why}), {variance}, jitted on XLA CPU; jax.vjp for backward")
    return Peer("flax-fast-var" if fast else "flax-two-pass", "cpu", ("NC",), forward,
                backward, how, versions)


# ----------------------------------------------------------------------------- NumPy / CuPy

def _array_forward(xp, to_device, to_host, layouts) -> Callable:
    """The textbook forward in an array module (NumPy or CuPy): mean, var, invstd, y per
    channel in the data's dtype."""

    def forward(x: np.ndarray, layout: str, eps: float) -> Forward:
        m = x.size
        if layout == "1-D":
            a, axes = to_device(x), None
        elif layout == "NC":
            a, axes = to_device(np.stack([x, x], axis=1)), 0
        elif layout == "NCHW":
            n, _, _, s = nchw_shape(m)
            a, axes = to_device(np.repeat(x.reshape(n, 1, 1, s), 2, axis=1)), (0, 2, 3)
        else:
            raise ValueError(f"unknown layout {layout!r}; expected one of {layouts}")
        t = x.dtype.type
        mean = a.mean(axis=axes, keepdims=True)
        var = a.var(axis=axes, keepdims=True)
        invstd = t(1) / xp.sqrt(var + t(eps))
        y = (a - mean) * invstd
        if layout != "1-D":
            y = y[:, 0]  # channel 0, in x's order
        first = (0,) * mean.ndim
        return Forward(mean=float(mean[first]), var=float(var[first]),
                       invstd=float(invstd[first]), y=to_host(y).reshape(-1))

    return forward


def _numpy_peer() -> Peer:
    layouts = ("1-D", "NC", "NCHW")
    return Peer("numpy", "cpu", layouts,
                _array_forward(np, lambda a: a, lambda a: np.asarray(a), layouts), None,
                "a.mean(axis), a.var(axis), (a − mean)/√(var + ε) in the data's dtype; "
                "forward only (no autograd)", {"numpy": np.__version__})


def _cupy_peer() -> Peer:
    if importlib.util.find_spec("cupy") is None:
        raise PeerMissing("cupy is not installed (a GPU run can add it: pip install "
                          "cupy-cuda12x)")
    try:
        import cupy

        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:
        raise PeerMissing(f"cupy cannot reach a GPU: {type(exc).__name__}: {exc}") from None
    if n < 1:
        raise PeerMissing("cupy sees no CUDA device")
    layouts = ("1-D",)
    return Peer("cupy", "cuda", layouts,
                _array_forward(cupy, cupy.asarray, cupy.asnumpy, layouts), None,
                "cupy mean/var and (a − mean)/√(var + ε) on the GPU; forward only",
                {"cupy": cupy.__version__})


#: name -> loader; each returns a Peer or raises PeerMissing with the reason.
LOADERS: dict[str, Callable[[], Peer]] = {
    "torch-cpu": lambda: _torch_peer("cpu"),
    "flax-fast-var": lambda: _flax_peer(True),
    "flax-two-pass": lambda: _flax_peer(False),
    "numpy": _numpy_peer,
    "torch-cuda": lambda: _torch_peer("cuda"),
    "cupy": _cupy_peer,
}


def load_peers(names=None, part: str = "peers") -> tuple[list[Peer], list[dict]]:
    """The peers that can run here (all of :data:`LOADERS` by default) and a skip row (part,
    item, reason) for each other one."""
    peers, skipped = [], []
    for name in names or LOADERS:
        try:
            peers.append(LOADERS[name]())
        except PeerMissing as exc:
            skipped.append({"part": part, "item": f"peer {name}", "reason": str(exc)})
        except Exception as exc:  # a peer that breaks on import must not stop the study
            skipped.append({"part": part, "item": f"peer {name}",
                            "reason": f"loading failed: {type(exc).__name__}: {exc}"})
    return peers, skipped


def versions(peers: list[Peer]) -> dict[str, str]:
    """Every version the given peers report, merged (``torch``, ``jax``, ``flax``, ...)."""
    out: dict[str, str] = {}
    for p in peers:
        out.update(p.versions)
    return out
