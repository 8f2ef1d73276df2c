"""``BatchNorm``: a stateful batch-norm layer for NumPy code, over the three public functions.

Training mode normalizes each channel by its batch statistics (:func:`nbbn.batch_norm_train`)
and, when ``track_running_stats``, updates the running statistics in place in PyTorch's
convention::

    running ← (1 − a)·running + a·batch        (the variance from the unbiased σ²_B·m/(m − 1))

with a = ``momentum``, or a = 1/k at the k-th training batch when ``momentum=None``: then the
running statistics are the cumulative averages of the batch means and of the unbiased batch
variances, the population estimate of Ioffe & Szegedy's Algorithm 2 (PyTorch's ``momentum=None``
does the same). Eval mode normalizes by the running statistics (:func:`nbbn.batch_norm_infer`),
or by the batch's own statistics when ``track_running_stats=False`` (PyTorch's semantics).

``backward(dy)`` takes what the last training-mode ``forward`` saved (x, by reference, and the
batch mean and 1/√(σ²_B + ε)) and returns dx; dγ and dβ are stored as ``dgamma``/``dbeta``.

Fusion (issue 14): ``BatchNorm(C, relu=True)`` computes y = max(BN(x), 0), and
``forward(x, residual=z)`` y = [max](BN(x) + z, 0) -- a ResNet block's tail -- in the same pass
over x. Backward then takes the ReLU's mask from the saved y (no recomputation) and stores the
residual's gradient as ``dresidual`` (dz = dy·[y > 0], or dy itself without a ReLU).

Half storage (float16, bfloat16; issue #24): ``BatchNorm(C, dtype=np.float16)`` works as
PyTorch's mixed-precision batch norm (a half ``nn.BatchNorm2d`` under autocast, or with float32
parameters): x, y, dy, dx and the residual and its gradient in the half dtype; γ, β and the
running statistics kept in float32, and dγ, dβ float32 (:func:`nbbn.validate.channel_dtype`).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from . import registry, validate
from .api import batch_norm_backward, batch_norm_infer, batch_norm_train


class BatchNorm:
    """Batch normalization over ``num_features`` channels (Ioffe & Szegedy 2015).

    Parameters
    ----------
    num_features: C, the length of x's channel axis.
    eps: added to the variance before the square root (> 0).
    momentum: weight a of the new batch in the running statistics, in [0, 1]; ``None`` for the
        cumulative average (Algorithm 2), kept with the batch counter ``num_batches_tracked``.
    affine: learn γ (``gamma``, ones) and β (``beta``, zeros); without it both are ``None`` and
        so are ``dgamma``/``dbeta``.
    track_running_stats: keep ``running_mean`` (zeros) and ``running_var`` (ones) and use them
        in eval mode; without it both are ``None`` and eval mode uses batch statistics.
    channel_axis: 1 (channels first: (N, C), (N, C, L), (N, C, H, W)) or -1 (channels last).
    backend: an nbbn kernel backend ("cpu", "cuda").
    dtype: the dtype of x and dy (and of y, dx): float32 or float64 -- then every parameter and
        statistic has it too -- or float16 or bfloat16 (ml_dtypes' dtype), half storage as
        PyTorch's mixed precision: the parameters and running statistics are kept in float32,
        and dγ, dβ are float32 (``param_dtype``). An input of another dtype raises TypeError
        (no silent casts).
    relu: apply max(·, 0) to the output, fused into the kernels (forward and backward).

    Attributes ``gamma``, ``beta``, ``running_mean``, ``running_var`` are plain (C,) arrays of
    ``param_dtype`` -- ``dtype`` itself for float32 and float64, float32 for a half ``dtype``
    (assign into them with ``[...] =``, or use :meth:`load_state_dict`);
    ``training`` is True after :meth:`train`, False after :meth:`eval`.
    """

    def __init__(self, num_features: int, *, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, channel_axis: int = 1,
                 backend: str = "cpu", dtype=np.float32, relu: bool = False):
        if isinstance(num_features, bool) or not isinstance(num_features, int | np.integer) \
                or num_features < 1:
            raise ValueError(f"num_features must be a positive integer, got {num_features!r}")
        eps = validate.eps_value(eps)  # the functions' rule: TypeError unless a real number
        if momentum is not None:  # None: the cumulative average
            momentum = validate.momentum_value(momentum)
        if isinstance(channel_axis, bool) or channel_axis not in (1, -1):
            raise ValueError(f"channel_axis must be 1 or -1, got {channel_axis!r}")
        try:
            dt = validate.storage_dtype(dtype)
        except ValueError as exc:  # the one message that names the choices
            raise TypeError(str(exc)) from None
        info = registry.backend_info(backend)  # ValueError listing the registered backends
        if info.kind != "kernel":
            raise ValueError(
                f"backend {backend!r} is a benchmark baseline, not an nbbn kernel backend; "
                f"choose from {', '.join(registry.backend_names('kernel'))}")
        C = int(num_features)
        self.num_features = C
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.channel_axis = int(channel_axis)
        self.backend = backend
        self.dtype = dt
        #: dtype of the parameters, the running statistics and dγ, dβ: float32 for a half x.
        self.param_dtype = pd = validate.channel_dtype(dt)
        self.relu = bool(relu)
        self.gamma = np.ones(C, pd) if self.affine else None
        self.beta = np.zeros(C, pd) if self.affine else None
        self.running_mean = np.zeros(C, pd) if self.track_running_stats else None
        self.running_var = np.ones(C, pd) if self.track_running_stats else None
        #: Training-mode batches that updated the running statistics (the k of momentum=None).
        self.num_batches_tracked = 0
        self.training = True
        self.dgamma = None
        self.dbeta = None
        #: Gradient of the last training forward's ``residual`` (None when it had none).
        self.dresidual = None
        #: (x, save_mean, save_invstd, y or None, had_residual) of the last training forward
        self._saved = None
        self._last_forward = None  # "train" | "eval" | None

    # ------------------------------------------------------------------------------ modes

    def train(self, mode: bool = True) -> BatchNorm:
        """Training mode (``mode=True``) or eval mode; returns the layer."""
        self.training = bool(mode)
        return self

    def eval(self) -> BatchNorm:
        """Eval mode: population statistics (batch statistics without running ones)."""
        return self.train(False)

    # ------------------------------------------------------------------------------ compute

    def _check_input(self, a, name: str) -> None:
        dt = getattr(a, "dtype", None)
        if dt is None:
            return  # not an array: the functional API raises TypeError naming it
        if np.dtype(dt) != self.dtype:
            raise TypeError(f"{name} has dtype {np.dtype(dt)} but the layer's dtype is "
                            f"{self.dtype}; convert it (e.g. {name}.astype({self.dtype.name!r})) "
                            f"or build the layer with dtype={np.dtype(dt).name!r}")
        shape = getattr(a, "shape", ())
        if len(shape) >= 2 and shape[self.channel_axis] != self.num_features:
            raise ValueError(
                f"{name} has {shape[self.channel_axis]} channels on axis {self.channel_axis} "
                f"(shape {tuple(shape)}) but the layer has num_features={self.num_features}")

    def forward(self, x, residual=None):
        """Training mode: y = γ·(x − μ_B)/√(σ²_B + ε) + β, running statistics updated, and x,
        μ_B, 1/√(σ²_B + ε) kept for :meth:`backward`. Eval mode: y = γ·(x − μ)/√(σ² + ε) + β
        with the running statistics (batch statistics when ``track_running_stats=False``).
        ``residual`` (x's shape and dtype) is added to y, then the layer's ReLU, if any, applies;
        both fused into the same pass."""
        self._check_input(x, "x")
        if residual is not None:
            self._check_input(residual, "residual")
        common = dict(eps=self.eps, channel_axis=self.channel_axis, backend=self.backend,
                      relu=self.relu, residual=residual)
        if self.training:
            if self.track_running_stats:
                k = self.num_batches_tracked + 1
                a = 1.0 / k if self.momentum is None else self.momentum
                y, mean, invstd = batch_norm_train(
                    x, self.gamma, self.beta, running_mean=self.running_mean,
                    running_var=self.running_var, momentum=a, **common)
                self.num_batches_tracked = k
            else:
                y, mean, invstd = batch_norm_train(x, self.gamma, self.beta, **common)
            self._saved = (x, mean, invstd, y if self.relu else None, residual is not None)
            self._last_forward = "train"
            return y
        self._saved = None
        self._last_forward = "eval"
        if self.track_running_stats:
            return batch_norm_infer(x, self.running_mean, self.running_var, self.gamma,
                                    self.beta, **common)
        y, _, _ = batch_norm_train(x, self.gamma, self.beta, **common)
        return y

    __call__ = forward

    def backward(self, dy):
        """dx of the last training-mode forward; stores ``dgamma`` = Σ g·x̂ and ``dbeta`` =
        Σ g (None when ``affine=False``), dx = γ·invstd·(g − dβ/m − x̂·dγ/m), with g = dy, or
        g = dy·[y > 0] with the layer's ReLU; and ``dresidual`` = g when forward had a
        residual (None otherwise)."""
        if self._saved is None:
            if self._last_forward == "eval":
                raise RuntimeError(
                    "backward() needs a training-mode forward, but the last forward ran in eval "
                    "mode (population statistics, nothing saved); call .train() and forward "
                    "again")
            raise RuntimeError("backward() called before forward(): there is nothing saved to "
                               "differentiate; call forward(x) in training mode first")
        self._check_input(dy, "dy")
        x, mean, invstd, y, had_residual = self._saved
        common = dict(channel_axis=self.channel_axis, backend=self.backend)
        if self.relu:
            dx, dgamma, dbeta, dz = batch_norm_backward(dy, x, mean, invstd, self.gamma,
                                                        relu=True, y=y, **common)
        else:
            dx, dgamma, dbeta = batch_norm_backward(dy, x, mean, invstd, self.gamma, **common)
            dz = dy
        self.dresidual = dz if had_residual else None
        if self.affine:
            self.dgamma, self.dbeta = dgamma, dbeta
        return dx

    # ------------------------------------------------------------------------------ state

    def _state_names(self) -> list[str]:
        names = []
        if self.affine:
            names += ["gamma", "beta"]
        if self.track_running_stats:
            names += ["running_mean", "running_var", "num_batches_tracked"]
        return names

    def state_dict(self) -> dict[str, np.ndarray]:
        """Copies of the parameters and statistics as plain arrays, ``np.savez``-able: gamma,
        beta (affine), running_mean, running_var and num_batches_tracked (a 0-d int64 array;
        tracking running statistics)."""
        state = {}
        for name in self._state_names():
            if name == "num_batches_tracked":
                state[name] = np.array(self.num_batches_tracked, dtype=np.int64)
            else:
                state[name] = np.array(getattr(self, name), copy=True)
        return state

    def load_state_dict(self, state: Mapping) -> None:
        """Copy a :meth:`state_dict` (or an ``np.load``-ed ``.npz`` of one) into the layer.

        Every key must be present and none extra (ValueError naming the missing and unexpected
        keys); vectors must have shape (num_features,) (ValueError) and the layer's
        ``param_dtype`` (TypeError); num_batches_tracked a non-negative integer scalar.
        Nothing is changed unless everything passes."""
        expected = self._state_names()
        keys = list(state.keys())
        missing = [k for k in expected if k not in keys]
        unexpected = [k for k in keys if k not in expected]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append("missing key(s) " + ", ".join(repr(k) for k in missing))
            if unexpected:
                parts.append("unexpected key(s) " + ", ".join(repr(k) for k in unexpected))
            raise ValueError(f"state does not match {self!r}: " + "; ".join(parts))
        values = {}
        for name in expected:
            v = np.asarray(state[name])
            if name == "num_batches_tracked":
                if v.shape != () or v.dtype.kind not in "iu" or int(v) < 0:
                    raise ValueError(f"num_batches_tracked must be a non-negative integer "
                                     f"scalar, got shape {v.shape} dtype {v.dtype}")
                values[name] = int(v)
                continue
            if v.shape != (self.num_features,):
                raise ValueError(f"{name} has shape {v.shape}, expected ({self.num_features},)")
            if v.dtype != self.param_dtype:
                raise TypeError(f"{name} has dtype {v.dtype} but the layer keeps its parameters "
                                f"and statistics in {self.param_dtype}")
            values[name] = v
        for name, v in values.items():
            if name == "num_batches_tracked":
                self.num_batches_tracked = v
            else:
                np.copyto(getattr(self, name), v)

    def __repr__(self) -> str:
        extra = "" if self.channel_axis == 1 else f", channel_axis={self.channel_axis}"
        extra += ", relu=True" if self.relu else ""
        return (f"BatchNorm({self.num_features}, eps={self.eps:g}, momentum={self.momentum!r}, "
                f"affine={self.affine}, track_running_stats={self.track_running_stats}{extra}, "
                f"backend={self.backend!r}, dtype={self.dtype}, "
                f"mode={'train' if self.training else 'eval'})")
