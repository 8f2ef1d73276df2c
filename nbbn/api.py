"""The three public functions. Each validates (:mod:`nbbn.validate`), selects the kernel for
(backend, op, memory layout) from the registry, and calls it. The formulas are in
:mod:`nbbn.reference`; layouts and fusion in :mod:`nbbn.spec`.
"""

from __future__ import annotations

from . import registry, validate
from .spec import Op

_KERNEL_BACKENDS: set[str] = set()


def _kernel_backend(backend: str) -> str:
    if backend in _KERNEL_BACKENDS:
        return backend
    info = registry.backend_info(backend)  # ValueError listing the registered ones if unknown
    if info.kind != "kernel":
        raise ValueError(
            f"backend {backend!r} is a benchmark baseline, not an nbbn kernel backend; choose "
            f"from {', '.join(registry.backend_names('kernel'))}"
        )
    _KERNEL_BACKENDS.add(backend)
    return backend


#: Each op's validation; its parameters have the public function's names, which is how
#: :func:`bind` passes it the bound arguments.
_VALIDATE = {Op.FORWARD_TRAIN: validate.train_args, Op.BACKWARD: validate.backward_args,
             Op.INFERENCE: validate.infer_args}

_CHECKED: dict[tuple, object] = {}
registry._ON_CHANGE.append(_CHECKED.clear)


def _kernel(backend: str, op: Op, args):
    """The kernel function for a validated bundle: the registry's default variant for its memory
    layout, after checking that it runs x's dtype and the fusion asked for (the answer is cached
    per (backend, op, layout, dtype, fusion): this runs on every call)."""
    geom = args.geom
    residual = getattr(args, "residual", None) is not None
    key = (backend, op, geom.layout, geom.dtype, args.relu, residual)
    fn = _CHECKED.get(key)
    if fn is not None:
        return fn
    spec = registry.select(backend, op, geom.layout)
    if args.fusion not in spec.fusions:
        raise ValueError(f"backend {backend!r} does not fuse {args.fusion} into {op} "
                         f"(it fuses: {', '.join(sorted(str(f) for f in spec.fusions))})")
    if geom.dtype not in spec.dtypes:
        who = [b for b in registry.backend_names("kernel")
               if geom.dtype in registry.backend_info(b).dtypes]
        raise TypeError(
            f"backend {backend!r} does not run {geom.dtype} x (it runs "
            f"{', '.join(str(d) for d in spec.dtypes)})"
            + (f"; {geom.dtype} runs on backend {', '.join(repr(b) for b in who)}" if who else ""))
    _CHECKED[key] = spec.fn
    return spec.fn


def batch_norm_train(x, gamma=None, beta=None, *, eps=1e-5, running_mean=None, running_var=None,
                     momentum=0.1, channel_axis=1, relu=False, residual=None, backend="cpu",
                     out=None):
    """Training-mode batch norm: normalize each channel by its batch mean and biased variance.

    Returns ``(y, save_mean, save_invstd)``: y like x (same shape and memory layout);
    ``save_mean`` = μ and ``save_invstd`` = 1/√(σ²_biased + eps), shape (C,), in x's dtype.

    ``channel_axis``: 1 (channels first, the default) or -1 (channels last: (N, C), (N, L, C),
    (N, H, W, C)). The memory layout is read from x's strides: a channels-last (N, C, H, W) array
    is computed in place by the channels-last kernels and y comes back channels-last too.

    ``gamma``/``beta`` None mean γ = 1, β = 0. ``running_mean``/``running_var``, if given, are
    updated in place (PyTorch convention): ``r ← (1 − momentum)·r + momentum·batch``, the running
    variance from the unbiased batch variance σ²·m/(m−1).

    Fusion: ``residual`` (x's shape and dtype) is added after the affine transform and ``relu``
    applies max(·, 0) last: y = max(γ·x̂ + β + residual, 0) in one pass.

    ``out=(y, save_mean, save_invstd)`` writes into preallocated arrays of the returned shapes,
    dtype and memory layout instead of allocating; the same arrays are returned. An output may
    be the very same array as x or as the residual (``out=(x, ...)``: in place); any other
    memory shared between an output (or a running statistic) and another argument -- a partial
    overlap such as ``x = buf[:-1]``, ``y = buf[1:]`` -- raises ValueError naming both, rather
    than being computed through a hidden temporary (see :mod:`nbbn.validate`, "Overlap rule").

    ``eps`` and ``momentum`` are real numbers (not bool, not str): TypeError otherwise.
    """
    b = _kernel_backend(backend)
    args = validate.train_args(x, gamma, beta, eps, running_mean, running_var, momentum, out,
                               channel_axis, relu, residual)
    return _kernel(b, Op.FORWARD_TRAIN, args)(args)


def batch_norm_backward(dy, x, save_mean, save_invstd, gamma=None, *, channel_axis=1,
                        relu=False, y=None, backend="cpu", out=None):
    """Gradients of training-mode batch norm: returns ``(dx, dgamma, dbeta)``.

    ``save_mean``/``save_invstd`` are what :func:`batch_norm_train` returned. dγ and dβ are
    returned even when ``gamma`` is None (γ = 1).

    With ``relu=True`` (the forward ran with ``relu=True``), ``y`` -- the forward's output -- is
    required: dz = dy·[y > 0] is the gradient of the pre-activation (and of the forward's
    residual), and the call returns ``(dx, dgamma, dbeta, dz)``.

    ``out=(dx, dgamma, dbeta[, dz])`` as in :func:`batch_norm_train`; dx (or, with relu, dz)
    may be the very same array as dy (in place); other shared memory raises ValueError.
    """
    b = _kernel_backend(backend)
    args = validate.backward_args(dy, x, save_mean, save_invstd, gamma, out, channel_axis, relu, y)
    return _kernel(b, Op.BACKWARD, args)(args)


def batch_norm_infer(x, running_mean, running_var, gamma=None, beta=None, *, eps=1e-5,
                     channel_axis=1, relu=False, residual=None, backend="cpu", out=None):
    """Inference-mode batch norm with population statistics, folded into y = α·x + β'
    (then ``+ residual`` and ``max(·, 0)`` with ``relu``, in the same pass).

    ``out=y`` writes into a preallocated array of x's shape, dtype and memory layout; it may be
    the very same array as x or the residual (in place); other shared memory raises ValueError.
    """
    b = _kernel_backend(backend)
    args = validate.infer_args(x, running_mean, running_var, gamma, beta, eps, out, channel_axis,
                               relu, residual)
    (y,) = _kernel(b, Op.INFERENCE, args)(args)
    return y


_OPS = {batch_norm_train: Op.FORWARD_TRAIN, batch_norm_backward: Op.BACKWARD,
        batch_norm_infer: Op.INFERENCE}


def bind(fn, *args, **kwargs):
    """A bound call: ``fn`` (:func:`batch_norm_train`, :func:`batch_norm_backward` or
    :func:`batch_norm_infer`) with these arguments, validated and prepared once; calling the
    result computes from the arrays' contents of the moment into the same ``out=`` arrays, and
    returns what ``fn`` returns. For a loop that calls batch norm on the same buffers again and
    again (a server at batch 1): ONNX Runtime's IOBinding, cuDNN's plans. ``out=`` is required.

        y = np.empty_like(x)
        infer = nbbn.bind(nbbn.batch_norm_infer, x, mean, var, gamma, beta, out=y)
        for batch in requests:
            x[...] = batch
            infer()  # y holds the result

    What it saves: a call re-derives from its arguments what the kernel takes (validation,
    views, the plan, per-channel vectors in the kernel's dtype): ~10 µs of validation and ~5
    µs of preparation on the cpu backend, which a bound call pays once. The arrays stay bound:
    rebinding is needed for other arrays, and replacing the bound arrays' contents (``x[...] =
    ...``) is how new data enter. A bound call's scratch is its own, so two bound calls can run
    in two threads; one bound call must not run in two threads at once (it writes its outputs
    and scratch). Where the cpu backend would copy an input (a layout or dtype its kernels
    cannot view), the bound call repeats that preparation each time."""
    op = _OPS.get(fn)
    if op is None:
        raise TypeError("nbbn.bind binds nbbn.batch_norm_train, batch_norm_backward or "
                        f"batch_norm_infer, not {getattr(fn, '__name__', fn)!r}")
    import inspect

    bound = inspect.signature(fn).bind(*args, **kwargs)
    bound.apply_defaults()
    a = bound.arguments
    if a["out"] is None:
        raise ValueError(f"nbbn.bind({fn.__name__}, ...) needs out=: a bound call writes into "
                         "the same preallocated outputs every time")
    b = _kernel_backend(a["backend"])
    check = _VALIDATE[op]
    bundle = check(**{n: a[n] for n in inspect.signature(check).parameters if n in a})
    kernel = _kernel(b, op, bundle)  # the dtype and fusion checks of a call
    spec = registry.select(b, op, bundle.geom.layout)
    call = spec.bind(bundle) if spec.bind is not None else (lambda: kernel(bundle))
    if op is Op.INFERENCE:
        return lambda: call()[0]
    return call
