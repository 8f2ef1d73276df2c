"""The float64 oracle against identities and finite differences (it must earn its authority)."""

import numpy as np
import pytest

from nbbn import reference as ref

SHAPES = [(7, 3), (4, 3, 5), (3, 2, 4, 5)]


@pytest.mark.parametrize("shape", SHAPES)
def test_normalized_output_has_zero_mean_unit_variance(shape):
    rng = np.random.default_rng(0)
    x = 1e3 + 3.0 * rng.standard_normal(shape)
    y, mean, invstd, var = ref.forward_train(x, eps=0.0)
    axes = (0,) + tuple(range(2, len(shape)))
    np.testing.assert_allclose(y.mean(axis=axes), 0.0, atol=1e-12)
    np.testing.assert_allclose(y.var(axis=axes), 1.0, rtol=1e-12)
    np.testing.assert_allclose(invstd, 1.0 / np.sqrt(var), rtol=1e-15)
    np.testing.assert_allclose(mean, x.mean(axis=axes), rtol=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
def test_affine_is_applied_per_channel(shape):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape)
    C = shape[1]
    gamma, beta = rng.standard_normal(C), rng.standard_normal(C)
    y0, *_ = ref.forward_train(x)
    y, *_ = ref.forward_train(x, gamma, beta)
    b = (1, C) + (1,) * (len(shape) - 2)
    np.testing.assert_allclose(y, y0 * gamma.reshape(b) + beta.reshape(b), rtol=1e-14)


@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_central_finite_differences(shape):
    """L(x, γ, β) = Σ w·y; dL/dx, dL/dγ, dL/dβ against (L(θ+h) − L(θ−h))/2h, float64."""
    rng = np.random.default_rng(2)
    x = 0.7 + rng.standard_normal(shape)
    C = shape[1]
    gamma, beta = 1.0 + 0.2 * rng.standard_normal(C), rng.standard_normal(C)
    w = rng.standard_normal(shape)
    eps = 1e-3

    def loss(x_, g_, b_):
        return float(np.sum(w * ref.forward_train(x_, g_, b_, eps)[0]))

    _, mean, invstd, _ = ref.forward_train(x, gamma, beta, eps)
    dx, dgamma, dbeta = ref.backward(w, x, mean, invstd, gamma)
    h = 1e-6

    def fd(theta, f):
        g = np.zeros_like(theta)
        for i in np.ndindex(theta.shape):
            tp, tm = theta.copy(), theta.copy()
            tp[i] += h
            tm[i] -= h
            g[i] = (f(tp) - f(tm)) / (2 * h)
        return g

    np.testing.assert_allclose(dx, fd(x, lambda t: loss(t, gamma, beta)), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(dgamma, fd(gamma, lambda t: loss(x, t, beta)), rtol=1e-6,
                               atol=1e-8)
    np.testing.assert_allclose(dbeta, fd(beta, lambda t: loss(x, gamma, t)), rtol=1e-6,
                               atol=1e-8)


def test_inference_with_batch_statistics_equals_training_forward():
    rng = np.random.default_rng(3)
    x = 5.0 + rng.standard_normal((6, 4, 3, 3))
    gamma, beta = rng.standard_normal(4), rng.standard_normal(4)
    y, mean, _, var = ref.forward_train(x, gamma, beta)
    np.testing.assert_allclose(ref.inference(x, mean, var, gamma, beta), y, rtol=1e-10,
                               atol=1e-12)


def test_running_update_by_hand():
    """x = 1, 2, 3, 4 in one channel: μ = 2.5, σ² = 1.25, unbiased 5/3."""
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    mean, var = ref.batch_stats(x)
    assert mean[0] == 2.5 and var[0] == 1.25
    rm, rv = ref.running_update(np.array([1.0]), np.array([2.0]), mean, var, 4, 0.1)
    assert rm[0] == pytest.approx(0.9 * 1.0 + 0.1 * 2.5, rel=1e-15)
    assert rv[0] == pytest.approx(0.9 * 2.0 + 0.1 * 5.0 / 3.0, rel=1e-15)


def test_reference_imports_no_numba():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(ref))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert "numba" not in names
