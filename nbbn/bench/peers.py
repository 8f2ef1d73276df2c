"""Peers users pick instead of nbbn, as bench baselines (each optional; ``pip install
'nbbn[peers]'``). Both are checked against the float64 reference before timing, like every
backend (:mod:`nbbn.bench.runner`).

* ``onnxruntime`` -- inference only: a one-node ``BatchNormalization`` model (opset 15, built
  with ``onnx.helper``; ``epsilon`` the harness's ε, inference mode) run by an
  ``InferenceSession`` on the CPU execution provider, ``intra_op_num_threads`` = Numba's thread
  count (``--threads``), ``inter_op_num_threads`` = 1, sequential execution. Input and output
  are bound zero-copy to the harness's NumPy buffers (``IOBinding`` by pointer, one binding per
  buffer set, made when the case is built, so the timed call is ``run_with_iobinding``).
  Layouts: NCHW and NC ((N, C)) are what the operator takes. **NHWC** has no channels-last form
  in ONNX's BatchNormalization, so the model is ``Transpose(0,3,1,2) → BatchNormalization →
  Transpose(0,2,3,1)`` and the two transposes are *inside* the timed call: that is what an ORT
  user with channels-last data pays (rows say so in ``notes`` via the description).
* ``jax`` -- ``jax.jit`` of the textbook formulas, arrays in the user's axes (NC, NCHW, NHWC
  natively: the reduction runs over every axis but the channel one): forward-train
  μ = mean(x), σ² = mean((x − μ)²), y = (x − μ)·γ/√(σ² + ε) + β (and the running statistics);
  backward = ``jax.vjp`` of that forward at (x, γ, β) applied to dy (so it recomputes μ and σ²
  from x, as a JAX user's backward does, with the harness's ε); inference
  y = (x − μ_pop)·γ/√(σ²_pop + ε) + β. The NumPy inputs are put on the device
  (``jax.device_put``) when the case is built, not in the timed call; outputs are XLA's own
  new arrays (it has no out=), waited for with ``block_until_ready``. float64 points run
  with ``jax_enable_x64`` on, float32 points with it off. XLA's CPU thread pool is its own
  (all cores): ``--threads`` does not reach it.
"""

from __future__ import annotations

import importlib.util
import weakref

import numpy as np

from .. import registry
from ..registry import BackendInfo, KernelSpec
from ..spec import Layout, Op

DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def _missing(*mods: str) -> str | None:
    for m in mods:
        if importlib.util.find_spec(m) is None:
            return f"{m} is not installed (pip install 'nbbn[peers]')"
    return None


def _vec(v, C, default, dt):
    return np.full(C, default, dt) if v is None else np.ascontiguousarray(v, dtype=dt)


def _layout_of(x, channel_axis: int) -> str:
    if x.ndim == 2:
        return "NC"
    return "NHWC" if channel_axis == x.ndim - 1 else "NCHW"


# ---------------------------------------------------------------------------------------------
# ONNX Runtime

_SESSIONS: dict = {}
_BINDINGS: dict = {}


def _threads() -> int:
    import numba

    return int(numba.get_num_threads())


def ort_session(shape, dtype, layout: str, eps: float, threads: int):
    """The (cached) session of the one-node model for x of ``shape`` (user axes)."""
    key = (tuple(shape), np.dtype(dtype).str, layout, float(eps), threads)
    if key in _SESSIONS:
        return _SESSIONS[key]
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    elem = TensorProto.FLOAT if np.dtype(dtype) == np.float32 else TensorProto.DOUBLE
    C = shape[-1] if layout == "NHWC" else shape[1]
    vec = [helper.make_tensor_value_info(n, elem, [C]) for n in ("scale", "B", "mean", "var")]
    x = helper.make_tensor_value_info("x", elem, list(shape))
    y = helper.make_tensor_value_info("y", elem, list(shape))
    if layout == "NHWC":
        nodes = [helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 3, 1, 2]),
                 helper.make_node("BatchNormalization", ["xt", "scale", "B", "mean", "var"],
                                  ["yt"], epsilon=float(eps)),
                 helper.make_node("Transpose", ["yt"], ["y"], perm=[0, 2, 3, 1])]
    else:
        nodes = [helper.make_node("BatchNormalization", ["x", "scale", "B", "mean", "var"],
                                  ["y"], epsilon=float(eps))]
    graph = helper.make_graph(nodes, "nbbn_bn", [x, *vec], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    if len(_SESSIONS) > 64:
        _SESSIONS.clear()
    _SESSIONS[key] = sess
    return sess


def _ort_binding(args):
    """The IOBinding of one call's arrays (cached while the arrays live)."""
    g = args.geom
    x = np.ascontiguousarray(args.x)
    dt = x.dtype
    y = args.out if args.out is not None else np.empty(x.shape, dt)
    key = (id(args.x), id(y), id(args.running_mean), id(args.gamma))
    hit = _BINDINGS.get(key)
    if hit is not None and hit[0]() is args.x and hit[1]() is y:
        return hit[5], hit[2], y
    layout = _layout_of(x, g.channel_axis)
    sess = ort_session(x.shape, dt, layout, args.eps, _threads())
    vecs = {"scale": _vec(args.gamma, g.C, 1.0, dt), "B": _vec(args.beta, g.C, 0.0, dt),
            "mean": _vec(args.running_mean, g.C, 0.0, dt),
            "var": _vec(args.running_var, g.C, 1.0, dt)}
    io = sess.io_binding()
    for name, a in (("x", x), *vecs.items()):
        io.bind_input(name, "cpu", 0, dt, list(a.shape), a.ctypes.data)
    io.bind_output("y", "cpu", 0, dt, list(y.shape), y.ctypes.data)
    dead = [k for k, v in _BINDINGS.items() if v[0]() is None or v[1]() is None]
    for k in dead:
        del _BINDINGS[k]
    # x itself is held weakly (a strong reference would keep every trial's buffers alive);
    # a contiguous copy made here, and the vectors, must live as long as the binding
    _BINDINGS[key] = (weakref.ref(args.x), weakref.ref(y), io, x if x is not args.x else None,
                      vecs, sess)
    return sess, io, y


def ort_inference(args):
    """y = BatchNormalization(x, γ, β, μ_pop, σ²_pop; ε) by ONNX Runtime (module docstring)."""
    sess, io, y = _ort_binding(args)
    sess.run_with_iobinding(io)
    return (y,)


def prepare_ort(args, eps: float) -> None:
    """Build the session and the binding before timing (the case's set-up)."""
    _ort_binding(args)


# ---------------------------------------------------------------------------------------------
# JAX / XLA

_PUT: dict = {}
_JIT: dict = {}


def _jax(dtype):
    import jax

    jax.config.update("jax_enable_x64", np.dtype(dtype) == np.float64)
    return jax


def _put(a):
    """The device copy of a NumPy array, cached while the array lives (made at set-up)."""
    if a is None:
        return None
    hit = _PUT.get(id(a))
    if hit is not None and hit[0]() is a:
        return hit[1]
    import jax

    d = jax.device_put(a)
    for k in [k for k, v in _PUT.items() if v[0]() is None]:
        del _PUT[k]
    try:
        _PUT[id(a)] = (weakref.ref(a), d)
    except TypeError:  # not weak-referenceable: not cached
        pass
    return d


def _jit_fns(ndim: int, channel_axis: int, dtype, eps: float, momentum: float, m: int):
    key = (ndim, channel_axis, np.dtype(dtype).str, eps, momentum, m)
    if key in _JIT:
        return _JIT[key]
    jax = _jax(dtype)
    import jax.numpy as jnp

    axes = tuple(a for a in range(ndim) if a != channel_axis)
    bshape = tuple(-1 if a == channel_axis else 1 for a in range(ndim))

    def fwd(x, g, b):
        mean = jnp.mean(x, axis=axes, keepdims=True)
        var = jnp.mean(jnp.square(x - mean), axis=axes, keepdims=True)
        invstd = jax.lax.rsqrt(var + eps)
        y = (x - mean) * invstd * g.reshape(bshape) + b.reshape(bshape)
        return y, mean.reshape(-1), var.reshape(-1), invstd.reshape(-1)

    def train(x, g, b, rm, rv):
        y, mean, var, invstd = fwd(x, g, b)
        rm1 = (1 - momentum) * rm + momentum * mean
        rv1 = (1 - momentum) * rv + momentum * var * (m / (m - 1))
        return y, mean, invstd, rm1, rv1

    def backward(dy, x, g, b):
        _, vjp = jax.vjp(lambda x_, g_, b_: fwd(x_, g_, b_)[0], x, g, b)
        return vjp(dy)

    def infer(x, rm, rv, g, b):
        alpha = g * jax.lax.rsqrt(rv + eps)
        return (x - rm.reshape(bshape)) * alpha.reshape(bshape) + b.reshape(bshape)

    fns = {Op.FORWARD_TRAIN: jax.jit(train), Op.BACKWARD: jax.jit(backward),
           Op.INFERENCE: jax.jit(infer)}
    _JIT[key] = fns
    return fns


def _jax_call(op: Op):
    def call(args):
        g = args.geom
        dt = g.dtype
        # backward's bundle carries no ε: its vjp recomputes the forward with the harness's
        # (given to prepare_jax), else PyTorch's default
        eps = getattr(args, "eps", None)
        if eps is None:
            eps = _EPS.get(id(args), 1e-5)
        fns = _jit_fns(args.x.ndim, g.channel_axis, dt, eps,
                       getattr(args, "momentum", 0.0), g.m)
        v = {}
        for name in ("gamma", "beta", "running_mean", "running_var"):
            if hasattr(args, name):
                default = 1.0 if name in ("gamma", "running_var") else 0.0
                a = getattr(args, name)
                v[name] = _put(a) if a is not None and np.asarray(a).dtype == dt else \
                    _put(_cached_vec(a, g.C, default, dt))
        if op is Op.FORWARD_TRAIN:
            y, mean, invstd, rm1, rv1 = fns[op](_put(args.x), v["gamma"], v["beta"],
                                                v["running_mean"], v["running_var"])
            y.block_until_ready()
            if args.running_mean is not None:
                np.copyto(args.running_mean, np.asarray(rm1))
                np.copyto(args.running_var, np.asarray(rv1))
            return y, mean, invstd
        if op is Op.BACKWARD:
            gamma = v.get("gamma")
            if gamma is None:
                gamma = _put(_cached_vec(None, g.C, 1.0, dt))
            dx, dg, db = fns[op](_put(args.dy), _put(args.x), gamma,
                                 _put(_cached_vec(None, g.C, 0.0, dt)))
            dx.block_until_ready()
            return dx, dg, db
        y = fns[op](_put(args.x), v["running_mean"], v["running_var"], v["gamma"], v["beta"])
        y.block_until_ready()
        return (y,)

    return call


_VECS: dict = {}


def _cached_vec(a, C, default, dt):
    key = (id(a), C, default, np.dtype(dt).str)
    if key not in _VECS:
        _VECS[key] = _vec(a, C, default, dt)
    return _VECS[key]


_EPS: dict = {}


def prepare_jax(args, eps: float) -> None:
    """Put the call's arrays on the device before timing (the case's set-up); remember ε for
    a backward bundle (which carries none)."""
    _jax(args.geom.dtype)
    if not hasattr(args, "eps"):
        if len(_EPS) > 4096:
            _EPS.clear()
        _EPS[id(args)] = eps
    for name in ("x", "dy", "gamma", "beta", "running_mean", "running_var"):
        a = getattr(args, name, None)
        if a is not None:
            _put(a)


# ---------------------------------------------------------------------------------------------
# Registration


def _load_ort() -> None:
    for layout in Layout:
        registry.register(KernelSpec("onnxruntime", Op.INFERENCE, layout, ort_inference,
                                     "ONNX Runtime BatchNormalization, CPU EP"
                                     + (" (NHWC: Transpose, BN, Transpose in the call)"
                                        if layout is Layout.NHWC else ""), dtypes=DTYPES))


def _load_jax() -> None:
    for op in Op:
        for layout in Layout:
            registry.register(KernelSpec("jax", op, layout, _jax_call(op),
                                         "jax.jit of the textbook formulas (XLA CPU)"
                                         + (", backward by jax.vjp" if op is Op.BACKWARD
                                            else ""), dtypes=DTYPES))


PEERS = (
    BackendInfo(name="onnxruntime", description="ONNX Runtime BatchNormalization (inference)",
                availability=lambda: _missing("onnxruntime", "onnx"), load=_load_ort,
                kind="baseline", device="cpu", dtypes=DTYPES),
    BackendInfo(name="jax", description="JAX/XLA jax.jit of the textbook batch norm",
                availability=lambda: _missing("jax", "jaxlib"), load=_load_jax,
                kind="baseline", device="cpu", dtypes=DTYPES),
)

PREPARE = {"onnxruntime": prepare_ort, "jax": prepare_jax}
