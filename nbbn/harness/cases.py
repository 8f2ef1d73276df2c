"""One configuration's inputs, reference and preallocated outputs (the numbagg pattern).

:func:`point_data` builds the host inputs of a point (op, layout, dtype, N, shape) -- awkward on
purpose: x = −2.3 + 0.5·randn, seeded from the point, so every backend and every run sees the
same data -- together with the float64 reference outputs of :mod:`nbbn.reference`.

:func:`make_case` puts those inputs where a backend's arrays live, preallocates its outputs,
validates the bundle once (:mod:`nbbn.validate`) and returns a :class:`Case`: ``case.call`` is a
zero-argument callable that runs the kernel into the preallocated outputs, so allocation and
validation stay out of the timed region, and ``case.check(result)`` compares a call's outputs with
the reference (:mod:`nbbn.tolerances`).
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from .. import reference, registry, validate
from ..spec import OP_OUTPUTS, Op
from ..tolerances import check_outputs, rel_err, tolerance
from .sweep import Config

EPS = 1e-5
MOMENTUM = 0.1
#: Running statistics carry the batch mean and variance, so they are held to those tolerances.
RUNNING_TOLERANCE_OF = {"running_mean": "save_mean", "running_var": "var"}


@dataclass
class PointData:
    key: tuple
    inputs: dict[str, np.ndarray]
    refs: tuple[np.ndarray, ...]  # float64, OP_OUTPUTS order
    running_refs: dict[str, np.ndarray]  # forward-train: expected running stats after one call
    scales: dict[str, float]  # term scales of outputs that can cancel (nbbn.tolerances)


def point_seed(cfg: Config) -> int:
    return zlib.crc32(repr((str(cfg.op), str(cfg.layout), cfg.dtype, cfg.x_shape)).encode())


def point_data(cfg: Config) -> PointData:
    rng = np.random.default_rng(point_seed(cfg))
    dt = np.dtype(cfg.dtype)
    C = cfg.C

    def randn(shape, loc, scale):
        return (loc + scale * rng.standard_normal(shape, dtype=np.float32)).astype(dt, copy=False)

    x = randn(cfg.x_shape, -2.3, 0.5)
    gamma = randn(C, 1.0, 0.1)
    beta = randn(C, 0.0, 0.1)
    running: dict[str, np.ndarray] = {}
    scales: dict[str, float] = {}
    if cfg.op is Op.FORWARD_TRAIN:
        rm, rv = randn(C, 0.0, 0.1), (1.0 + rng.random(C)).astype(dt)
        inputs = {"x": x, "gamma": gamma, "beta": beta, "running_mean": rm, "running_var": rv}
        y, mean, invstd, var = reference.forward_train(x, gamma, beta, EPS)
        refs = (y, mean, invstd)
        rm1, rv1 = reference.running_update(rm, rv, mean, var, cfg.m, MOMENTUM)
        running = {"running_mean": rm1, "running_var": rv1}
    elif cfg.op is Op.BACKWARD:
        _, mean, invstd, _ = reference.forward_train(x, None, None, EPS)
        save_mean, save_invstd = mean.astype(dt), invstd.astype(dt)
        dy = randn(cfg.x_shape, 0.1, 0.5)
        inputs = {"dy": dy, "x": x, "save_mean": save_mean, "save_invstd": save_invstd,
                  "gamma": gamma}
        refs = reference.backward(dy, x, save_mean, save_invstd, gamma)
        scales = {"dx": reference.dx_scale(dy, save_invstd, gamma)}
    else:
        rm = randn(C, -2.3, 0.05)
        rv = (0.25 * (1.0 + 0.2 * rng.random(C))).astype(dt)
        inputs = {"x": x, "running_mean": rm, "running_var": rv, "gamma": gamma, "beta": beta}
        refs = (reference.inference(x, rm, rv, gamma, beta, EPS),)
    return PointData(cfg.key[1:], inputs, tuple(refs), running, scales)


@dataclass
class Case:
    """``call()`` runs the kernel into preallocated outputs; ``check(result)`` returns
    ``(errors, tolerances, notes)``: rel_err and bound per output name, and remarks."""

    call: Callable[[], tuple]
    check: Callable[[tuple], tuple[dict[str, float], dict[str, float], list[str]]]
    nbytes_x: int


def make_case(cfg: Config, point: PointData, dev) -> Case:
    dt = np.dtype(cfg.dtype)
    # Inputs are shared by every backend of the point; running statistics are updated in place,
    # so each backend gets its own copy.
    arrays = {k: dev.put(v.copy() if k.startswith("running") else v)
              for k, v in point.inputs.items()}
    shapes = {"y": cfg.x_shape, "dx": cfg.x_shape}
    outs = tuple(dev.empty(shapes.get(n, (cfg.C,)), dt) for n in OP_OUTPUTS[cfg.op])
    if cfg.op is Op.FORWARD_TRAIN:
        args = validate.train_args(arrays["x"], arrays["gamma"], arrays["beta"], EPS,
                                   arrays["running_mean"], arrays["running_var"], MOMENTUM, outs)
    elif cfg.op is Op.BACKWARD:
        args = validate.backward_args(arrays["dy"], arrays["x"], arrays["save_mean"],
                                      arrays["save_invstd"], arrays["gamma"], outs)
    else:
        args = validate.infer_args(arrays["x"], arrays["running_mean"], arrays["running_var"],
                                   arrays["gamma"], arrays["beta"], EPS, outs[0])
    fn = registry.select(cfg.backend, cfg.op, cfg.layout).fn

    def call():
        return fn(args)

    def check(result):
        result = tuple(result)
        errors = check_outputs(cfg.op, [dev.to_host(r) for r in result], point.refs,
                               point.scales)
        tols = {n: tolerance(n, dt) for n in errors}
        for name, ref in point.running_refs.items():
            errors[name] = rel_err(dev.to_host(arrays[name]), ref)
            tols[name] = tolerance(RUNNING_TOLERANCE_OF[name], dt)
        notes = []
        if any(r is not o for r, o in zip(result, outs, strict=True)):
            notes.append("kernel did not return its out= arrays: allocation may be timed")
        return errors, tols, notes

    return Case(call, check, int(np.prod(cfg.x_shape)) * dt.itemsize)
