"""The three public functions. Each validates (nbbn.validate), selects the kernel for
(backend, op, layout) from the registry, and calls it. The formulas are in :mod:`nbbn.reference`.
"""

from __future__ import annotations

from . import registry, validate
from .spec import Op


def _kernel_backend(backend: str) -> str:
    info = registry.backend_info(backend)  # ValueError listing the registered ones if unknown
    if info.kind != "kernel":
        raise ValueError(
            f"backend {backend!r} is a benchmark baseline, not an nbbn kernel backend; choose "
            f"from {', '.join(registry.backend_names('kernel'))}"
        )
    return backend


def batch_norm_train(x, gamma=None, beta=None, *, eps=1e-5, running_mean=None, running_var=None,
                     momentum=0.1, backend="cpu", out=None):
    """Training-mode batch norm: normalize each channel by its batch mean and biased variance.

    Returns ``(y, save_mean, save_invstd)``: y like x; ``save_mean`` = μ and
    ``save_invstd`` = 1/√(σ²_biased + eps), shape (C,), in x's dtype.

    ``gamma``/``beta`` None mean γ = 1, β = 0. ``running_mean``/``running_var``, if given, are
    updated in place (PyTorch convention): ``r ← (1 − momentum)·r + momentum·batch``, the running
    variance from the unbiased batch variance σ²·m/(m−1).

    ``out=(y, save_mean, save_invstd)`` writes into preallocated C-contiguous arrays of the
    returned shapes and dtype instead of allocating; the same arrays are returned.
    """
    b = _kernel_backend(backend)
    args = validate.train_args(x, gamma, beta, eps, running_mean, running_var, momentum, out)
    return registry.select(b, Op.FORWARD_TRAIN, args.geom.layout).fn(args)


def batch_norm_backward(dy, x, save_mean, save_invstd, gamma=None, *, backend="cpu", out=None):
    """Gradients of training-mode batch norm: returns ``(dx, dgamma, dbeta)``.

    ``save_mean``/``save_invstd`` are what :func:`batch_norm_train` returned. dγ and dβ are
    returned even when ``gamma`` is None (γ = 1). ``out=(dx, dgamma, dbeta)`` as in
    :func:`batch_norm_train`.
    """
    b = _kernel_backend(backend)
    args = validate.backward_args(dy, x, save_mean, save_invstd, gamma, out)
    return registry.select(b, Op.BACKWARD, args.geom.layout).fn(args)


def batch_norm_infer(x, running_mean, running_var, gamma=None, beta=None, *, eps=1e-5,
                     backend="cpu", out=None):
    """Inference-mode batch norm with population statistics, folded into y = α·x + β'.

    ``out=y`` writes into a preallocated array of x's shape and dtype.
    """
    b = _kernel_backend(backend)
    args = validate.infer_args(x, running_mean, running_var, gamma, beta, eps, out)
    (y,) = registry.select(b, Op.INFERENCE, args.geom.layout).fn(args)
    return y
