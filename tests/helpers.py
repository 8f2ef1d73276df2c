"""Shared test data: awkward on purpose (non-zero means, large offsets, odd sizes)."""

from __future__ import annotations

import numpy as np

from nbbn import reference as ref
from nbbn.tolerances import check_outputs, tolerance


def make_x(shape, dtype, offset=0.0, seed=0):
    """-2.3 + 0.5·randn (Triton's layer-norm test data) shifted by ``offset``, per-channel skew."""
    rng = np.random.default_rng(seed)
    C = shape[1]
    chan = np.linspace(0.5, 2.0, C).reshape((1, C) + (1,) * (len(shape) - 2))
    x = offset - 2.3 + 0.5 * chan * rng.standard_normal(shape)
    return x.astype(dtype)


def make_params(C, seed=1, dtype=np.float64):
    rng = np.random.default_rng(seed)
    gamma = (1.0 + 0.3 * rng.standard_normal(C)).astype(dtype)
    beta = (0.5 * rng.standard_normal(C)).astype(dtype)
    return gamma, beta


def assert_close(op, outputs, references, dtype, scales=None):
    errs = check_outputs(op, outputs, references, scales)
    bad = {n: e for n, e in errs.items() if not e <= tolerance(n, dtype)}
    assert not bad, f"{op}: rel_err above tolerance: {bad} (all: {errs})"
    return errs


def backward_refs(dy, x, save_mean, save_invstd, gamma):
    dx, dg, db = ref.backward(dy, x, save_mean, save_invstd, gamma)
    return (dx, dg, db), {"dx": ref.dx_scale(dy, save_invstd, gamma)}


def exact_backward(dy, x, mean, invstd, gamma, axis=1, relu=False, y=None):
    """The float64 reference gradient at the exact batch mean. At |mean|/std = 1e4 no float64
    number is the batch mean (an ulp of 1e4 is 2e-12·σ away), and with a dy whose mean is far
    from 0, dγ = Σdy·x̂ amplifies that by |Σdy|/|dγ|. Batch norm's gradient is unchanged by a
    shift of x and μ together, so shift x by the float64 mean first (exact: Sterbenz) and pass
    the small remaining mean, which float64 holds to ~u·σ."""
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    xs = np.asarray(x, dtype=np.float64) - np.asarray(mean, np.float64).reshape(shape)
    rest, _ = ref.batch_stats(xs, axis)
    return ref.backward(dy, xs, rest, invstd, gamma, channel_axis=axis, relu=relu, y=y)
