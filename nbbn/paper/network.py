"""The paper's §4.1 network in NumPy: fully connected, sigmoid hidden layers, softmax output.

Layer l = 1 … L (L = 3 hidden layers of 100 units in the paper), with a₀ = x (N, D):

    h_l = a_{l−1}·W_l              (N, H_l)
    z_l = h_l + b_l                without batch norm
    z_l = BN_l(h_l)                with batch norm (γ, β take the bias's place: b_l is dropped)
    a_l = σ(z_l) = 1/(1 + e^{−z_l})
    logits = a_L·W_{L+1} + b_{L+1};   loss = −(1/N)·Σ_n log softmax(logits_n)[y_n]

Backward: dlogits = (softmax − onehot)/N; dW_{L+1} = a_Lᵀ·dlogits, db_{L+1} = Σ_n dlogits;
da_L = dlogits·W_{L+1}ᵀ; then per hidden layer dz_l = da_l·a_l·(1 − a_l),
dh_l = BN_l.backward(dz_l) (or dz_l, and db_l = Σ_n dz_l), dW_l = a_{l−1}ᵀ·dh_l,
da_{l−1} = dh_l·W_lᵀ. Every batch norm runs on nbbn (:class:`nbbn.BatchNorm`).

Weights start as small Gaussians, W ~ N(0, init_std²); biases at 0; γ = 1, β = 0.
"""

from __future__ import annotations

import numpy as np

from ..layer import BatchNorm


def sigmoid(z: np.ndarray) -> np.ndarray:
    """σ(z) = (1 + tanh(z/2))/2: no overflow for large |z|, keeps z's dtype."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


class MLP:
    """``MLP(n_in, n_classes, hidden=(100, 100, 100), bn=False, init_std=…, rng=…)``.

    ``forward(x)`` returns the logits and keeps what ``backward`` needs; ``z`` (the list of
    sigmoid inputs z_l of the last forward) is what the experiment's percentiles read.
    ``params()`` maps names (W1…, b…, gamma1…, beta1…) to the live arrays, ``grads`` the same
    names to the gradients of the last :meth:`loss_and_grad`.
    """

    def __init__(self, n_in: int, n_classes: int, *, hidden=(100, 100, 100), bn: bool = False,
                 init_std: float = 0.1, rng: np.random.Generator, dtype=np.float32,
                 backend: str = "cpu", momentum: float | None = 0.1, eps: float = 1e-5):
        self.dtype = np.dtype(dtype)
        self.bn = bool(bn)
        sizes = [n_in, *hidden, n_classes]
        self.W = [(rng.standard_normal((a, b)) * init_std).astype(self.dtype)
                  for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
        # Hidden biases only without BN (β replaces them); the output layer always has one.
        self.b = [None if self.bn else np.zeros(h, self.dtype) for h in hidden]
        self.b.append(np.zeros(n_classes, self.dtype))
        self.norms = [BatchNorm(h, momentum=momentum, eps=eps, backend=backend, dtype=self.dtype)
                      for h in hidden] if self.bn else []
        self.grads: dict[str, np.ndarray] = {}
        self.z: list[np.ndarray] = []
        self._a: list[np.ndarray] = []

    @property
    def depth(self) -> int:
        return len(self.W) - 1

    def params(self) -> dict[str, np.ndarray]:
        p = {}
        for i, W in enumerate(self.W, 1):
            p[f"W{i}"] = W
            if self.b[i - 1] is not None:
                p[f"b{i}"] = self.b[i - 1]
        for i, norm in enumerate(self.norms, 1):
            p[f"gamma{i}"] = norm.gamma
            p[f"beta{i}"] = norm.beta
        return p

    def train(self, mode: bool = True) -> MLP:
        for norm in self.norms:
            norm.train(mode)
        return self

    def eval(self) -> MLP:
        return self.train(False)

    def forward(self, x: np.ndarray) -> np.ndarray:
        a = x
        self._a, self.z = [x], []
        for l in range(self.depth):
            h = a @ self.W[l]
            z = self.norms[l](h) if self.bn else h + self.b[l]
            a = sigmoid(z)
            self.z.append(z)
            self._a.append(a)
        return a @ self.W[-1] + self.b[-1]

    def backward(self, dlogits: np.ndarray) -> dict[str, np.ndarray]:
        """Gradients of the last forward (training mode) given dloss/dlogits."""
        g = {}
        L = self.depth
        g[f"W{L + 1}"] = self._a[L].T @ dlogits
        g[f"b{L + 1}"] = dlogits.sum(axis=0)
        da = dlogits @ self.W[L].T
        for l in range(L - 1, -1, -1):
            a = self._a[l + 1]
            dz = da * a * (1.0 - a)
            if self.bn:
                dh = self.norms[l].backward(dz)
                g[f"gamma{l + 1}"] = self.norms[l].dgamma
                g[f"beta{l + 1}"] = self.norms[l].dbeta
            else:
                dh = dz
                g[f"b{l + 1}"] = dz.sum(axis=0)
            g[f"W{l + 1}"] = self._a[l].T @ dh
            if l > 0:
                da = dh @ self.W[l].T
        self.grads = g
        return g

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> float:
        """Mean cross-entropy of the batch (training mode) and the gradients into ``grads``."""
        logits = self.forward(x)
        logp = log_softmax(logits)
        n = len(y)
        loss = -float(logp[np.arange(n), y].mean(dtype=np.float64))
        dlogits = np.exp(logp)
        dlogits[np.arange(n), y] -= 1.0
        dlogits /= n
        self.backward(dlogits)
        return loss

    def sgd_step(self, lr: float) -> None:
        """p ← p − lr·dp for every parameter, in place."""
        for name, p in self.params().items():
            p -= self.dtype.type(lr) * self.grads[name]

    def predict(self, x: np.ndarray, batch: int | None = None) -> np.ndarray:
        """Class predictions in the current mode (eval: population statistics). ``batch``
        splits x into consecutive batches of that size (training mode: each normalized by its
        own statistics)."""
        if batch is None:
            return self.forward(x).argmax(axis=1)
        return np.concatenate([self.forward(x[i:i + batch]).argmax(axis=1)
                               for i in range(0, len(x), batch)])
