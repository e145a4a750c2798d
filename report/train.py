"""Training for the report, on the chosen backend's own arithmetic.

* ``numpy``: the hand-written MLP's gradients (its closed-form pullback) and Adam steps in NumPy;
* ``torch``: ``torch.nn.Sequential`` with ``torch.optim.Adam``;
* ``jax``: ``jax.grad`` with Adam steps written in ``jax.numpy`` (the update of ``optax.adam``).

Every backend starts from the same weights (drawn with NumPy from the seed), visits the
minibatches in the same order and minimises the same loss, the mean negative
log-likelihood of the family; so the studies agree across backends up to rounding.
"""

from __future__ import annotations

import numpy as np

from fishercore.backends import mlp

from . import ReportError

BACKENDS = ("torch", "jax", "numpy")
ADAM = dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8)


def resolve_backend(name: str) -> str:
    """``auto``: torch if installed, else numpy."""
    import importlib.util

    if name == "auto":
        return "torch" if importlib.util.find_spec("torch") is not None else "numpy"
    if name not in BACKENDS:
        raise ReportError(f"--backend: expected one of auto, {', '.join(BACKENDS)}; got {name!r}")
    module = {"torch": "torch", "jax": "jax"}.get(name)
    if module and importlib.util.find_spec(module) is None:
        raise ReportError(f"--backend {name}: {module} is not installed (pip install '.[{name}]' in "
                          "fishercore's checkout)")
    return name


def init_layers(widths, seed):
    """Glorot-normal weights (out, in) and zero biases, from NumPy."""
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(o, i)) * np.sqrt(2.0 / (i + o)), np.zeros(o)) for i, o in zip(widths[:-1], widths[1:])]


class _Adam:
    """Adam on a list of NumPy arrays (the update rule of torch.optim.Adam and optax.adam)."""

    def __init__(self, params):
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def step(self, params, grads):
        self.t += 1
        b1, b2 = ADAM["b1"], ADAM["b2"]
        for p, g, m, v in zip(params, grads, self.m, self.v):
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            p -= ADAM["lr"] * (m / (1 - b1**self.t)) / (np.sqrt(v / (1 - b2**self.t)) + ADAM["eps"])


class NumpyTrainer:
    def __init__(self, layers, activation, family):
        self.params = [a.copy() for W, b in layers for a in (W, b)]
        self.activation, self.family = activation, family
        self.opt = _Adam(self.params)

    def _layers(self):
        return [(self.params[i], self.params[i + 1]) for i in range(0, len(self.params), 2)]

    def model(self):
        return mlp.MLP(self._layers(), self.activation)

    def as_array(self, X):
        return X

    def step(self, X, y):
        net = self.model()
        pulled = net.pullback(X, lambda h: self.family.score(h, y)[None])  # sᵀ ∂h/∂z per layer, (B, 1, out)
        grads = []
        for block in pulled.blocks:  # loss = −mean ℓ: gradient −(1/B) Σ_x sᵀ ∂h/∂θ
            g = -block.jac[:, 0] / X.shape[0]
            grads += [g.T @ block.inputs, g.sum(0)]
        self.opt.step(self.params, grads)

    def loss(self, X, y):
        return float(-np.mean(self.family.log_likelihood(self.model().outputs(X), y)))

    def outputs(self, X):
        return self.model().outputs(X)


class TorchTrainer:
    def __init__(self, layers, activation, family):
        import torch

        from fishercore.backends.torch import sequential_from_layers

        self.torch = torch
        self.net = sequential_from_layers(layers, activation)
        self.family = family
        self.opt = torch.optim.Adam(self.net.parameters(), lr=ADAM["lr"], betas=(ADAM["b1"], ADAM["b2"]),
                                    eps=ADAM["eps"])

    def model(self):
        from fishercore.backends import torch as fc_torch

        return fc_torch.from_sequential(self.net)

    def as_array(self, X):
        return self.torch.from_numpy(np.ascontiguousarray(X))

    def step(self, X, y):
        self.opt.zero_grad()
        loss = -self.family.log_likelihood(self.net(X), y).mean()
        loss.backward()
        self.opt.step()

    def loss(self, X, y):
        with self.torch.no_grad():
            return float(-self.family.log_likelihood(self.net(X), y).mean())

    def outputs(self, X):
        with self.torch.no_grad():
            return self.net(X).numpy()


class JaxTrainer:
    def __init__(self, layers, activation, family):
        import jax
        import jax.numpy as jnp

        from fishercore.backends import jax as fc_jax

        jax.config.update("jax_enable_x64", True)  # the report runs in float64 on every backend
        self.jax, self.jnp, self.fc_jax = jax, jnp, fc_jax
        self.params = [(jnp.asarray(W), jnp.asarray(b)) for W, b in layers]
        self.activation, self.family = activation, family
        tree_map = jax.tree_util.tree_map
        self.m = tree_map(jnp.zeros_like, self.params)
        self.v = tree_map(jnp.zeros_like, self.params)
        self.t = 0
        forward = fc_jax.mlp_apply(activation)

        def loss(params, x, y):
            return -jnp.mean(family.log_likelihood(forward(params, x), y))

        def update(params, m, v, x, y, t):
            b1, b2, lr, eps = ADAM["b1"], ADAM["b2"], ADAM["lr"], ADAM["eps"]
            g = jax.grad(loss)(params, x, y)
            m = tree_map(lambda mi, gi: b1 * mi + (1 - b1) * gi, m, g)
            v = tree_map(lambda vi, gi: b2 * vi + (1 - b2) * gi * gi, v, g)
            params = tree_map(lambda p, mi, vi: p - lr * (mi / (1 - b1**t)) / (jnp.sqrt(vi / (1 - b2**t)) + eps),
                              params, m, v)
            return params, m, v

        self._forward = jax.jit(forward)
        self._loss = jax.jit(loss)
        self._update = jax.jit(update)

    def model(self):
        return self.fc_jax.from_mlp(self.params, self.activation)

    def as_array(self, X):
        return self.jnp.asarray(X)

    def step(self, X, y):
        self.t += 1
        self.params, self.m, self.v = self._update(self.params, self.m, self.v, X, y, self.t)

    def loss(self, X, y):
        return float(self._loss(self.params, X, y))

    def outputs(self, X):
        return np.asarray(self._forward(self.params, X))


def make_trainer(backend, layers, activation, family):
    return {"numpy": NumpyTrainer, "torch": TorchTrainer, "jax": JaxTrainer}[backend](layers, activation, family)



