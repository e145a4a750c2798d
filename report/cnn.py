"""A small CNN for 8×8 images, written in torch and in Flax linen with the same parameters.

``conv(1→8, 3×3, same) → act → pool(2) → conv(8→16, 3×3, same) → act → pool(2) → flatten → dense(64→10)``,
optionally with an eval-mode batch norm after each convolution.  :func:`torch_model` and
:func:`flax_function` compute the same function of the same weights (:func:`init_params`, NumPy, in
torch's layout and names), so fishercore's two backends can be compared on it
(``tests/test_cnn.py``); :func:`torch_layout` maps a JAX analysis onto torch's names and layouts.
``fishercore report --model cnn`` (:mod:`fishercore.report.vision`) trains it on the built-in digits.
"""

from __future__ import annotations

import dataclasses

import numpy as np

ACTIVATIONS = ("tanh", "sigmoid", "gelu", "silu", "softplus", "relu")


@dataclasses.dataclass(frozen=True)
class Config:
    channels: tuple = (8, 16)
    kernel: int = 3
    activation: str = "tanh"
    pool: str = "max"  # or "avg"
    batchnorm: bool = False
    classes: int = 10
    image: int = 8
    in_channels: int = 1

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation: expected one of {list(ACTIVATIONS)}, got {self.activation!r}")
        if self.pool not in ("max", "avg"):
            raise ValueError(f"pool: expected 'max' or 'avg', got {self.pool!r}")
        if self.kernel % 2 != 1:
            raise ValueError(f"kernel: expected an odd size (same padding), got {self.kernel}")
        if self.image % 2 ** len(self.channels):
            raise ValueError(f"image: {self.image} is not divisible by 2 ** {len(self.channels)} (one pool per conv)")

    @property
    def flat(self) -> int:
        return self.channels[-1] * (self.image // 2 ** len(self.channels)) ** 2

    def names_and_shapes(self) -> list:
        """Torch's parameter names and shapes, in its order."""
        out, cin = [], self.in_channels
        for i, c in enumerate(self.channels):
            out += [(f"conv{i}.weight", (c, cin, self.kernel, self.kernel)), (f"conv{i}.bias", (c,))]
            if self.batchnorm:
                out += [(f"bn{i}.weight", (c,)), (f"bn{i}.bias", (c,))]
            cin = c
        return out + [("head.weight", (self.classes, self.flat)), ("head.bias", (self.classes,))]


def init_params(config: Config, seed: int = 0, perturb: float = 0.0) -> dict:
    """Parameters (and batch-norm running statistics) as NumPy float64 arrays under torch's names: torch's default
    uniform ±1/√fan_in for convolutions and the head; batch norms at scale 1, shift 0, mean 0, variance 1, each
    moved by ``perturb`` times a random amount (tests use this so the batch norm is not the identity)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in config.names_and_shapes():
        if name.startswith("bn"):
            base = 1.0 if name.endswith("weight") else 0.0
            out[name] = base + perturb * rng.normal(size=shape)
        else:
            layer = name.rsplit(".", 1)[0]
            w_shape = dict(config.names_and_shapes())[f"{layer}.weight"]
            bound = 1.0 / np.sqrt(int(np.prod(w_shape[1:])))
            out[name] = rng.uniform(-bound, bound, size=shape)
    if config.batchnorm:
        for i, c in enumerate(config.channels):
            out[f"bn{i}.running_mean"] = perturb * rng.normal(size=c)
            out[f"bn{i}.running_var"] = 1.0 + perturb * rng.uniform(0.0, 1.0, size=c)
    return out


def group_kind(name: str) -> str:
    """The kind of layer a group belongs to, for the report: convolution, batch norm or dense head."""
    layer, what = name.rsplit(".", 1)
    kind = {"conv": "conv", "bn": "batch norm", "head": "dense"}[layer.rstrip("0123456789")]
    return f"{kind} {'bias' if what == 'bias' else 'weight'}"


# -- torch -------------------------------------------------------------------------
def torch_model(config: Config, params: dict | None = None, dtype=None):
    """``nn.Sequential`` with modules conv0, (bn0,) act0, pool0, ..., flatten, head; in eval mode."""
    from collections import OrderedDict

    import torch
    from torch import nn

    act = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "silu": nn.SiLU, "softplus": nn.Softplus,
           "relu": nn.ReLU}[config.activation]
    pool = nn.MaxPool2d if config.pool == "max" else nn.AvgPool2d
    layers, cin = OrderedDict(), config.in_channels
    for i, c in enumerate(config.channels):
        layers[f"conv{i}"] = nn.Conv2d(cin, c, config.kernel, padding=config.kernel // 2)
        if config.batchnorm:
            layers[f"bn{i}"] = nn.BatchNorm2d(c)
        layers[f"act{i}"], layers[f"pool{i}"] = act(), pool(2)
        cin = c
    layers["flatten"], layers["head"] = nn.Flatten(), nn.Linear(config.flat, config.classes)
    net = nn.Sequential(layers)
    if dtype is not None:
        net = net.to(dtype)
    if params is not None:
        state = net.state_dict()
        with torch.no_grad():
            for k, v in params.items():
                state[k].copy_(torch.as_tensor(v))
    return net.eval()


# -- Flax linen --------------------------------------------------------------------
def flax_module(config: Config):
    """The same network as a Flax linen module over NCHW inputs (transposed to NHWC inside, and back before the
    flatten, so the head sees torch's order)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    act = {"tanh": jnp.tanh, "sigmoid": jax.nn.sigmoid, "gelu": lambda z: jax.nn.gelu(z, approximate=False),
           "silu": jax.nn.silu, "softplus": jax.nn.softplus, "relu": jax.nn.relu}[config.activation]

    class CNN(nn.Module):
        @nn.compact
        def __call__(self, x):
            a = jnp.transpose(x, (0, 2, 3, 1))
            for i, c in enumerate(config.channels):
                a = nn.Conv(c, (config.kernel, config.kernel), padding=config.kernel // 2, name=f"conv{i}")(a)
                if config.batchnorm:
                    a = nn.BatchNorm(use_running_average=True, epsilon=1e-5, name=f"bn{i}")(a)
                a = act(a)
                a = (nn.max_pool if config.pool == "max" else nn.avg_pool)(a, (2, 2), strides=(2, 2))
            a = jnp.transpose(a, (0, 3, 1, 2)).reshape(a.shape[0], -1)
            return nn.Dense(config.classes, name="head")(a)

    return CNN()


_FLAX_NAMES = {"weight": "kernel", "bias": "bias"}


def flax_variables(config: Config, params: dict) -> dict:
    """Torch-layout parameters as Flax variables: ``{"params": ..., "batch_stats": ...}`` (NumPy leaves)."""
    p, stats = {}, {}
    for name, value in params.items():
        layer, what = name.rsplit(".", 1)
        v = np.asarray(value)
        if layer.startswith("conv") and what == "weight":
            p.setdefault(layer, {})["kernel"] = v.transpose(2, 3, 1, 0)  # (O, I, kh, kw) → (kh, kw, I, O)
        elif layer == "head" and what == "weight":
            p.setdefault(layer, {})["kernel"] = v.T
        elif layer.startswith("bn") and what in ("running_mean", "running_var"):
            stats.setdefault(layer, {})["mean" if what == "running_mean" else "var"] = v
        elif layer.startswith("bn"):
            p.setdefault(layer, {})["scale" if what == "weight" else "bias"] = v
        else:
            p.setdefault(layer, {})[what] = v
    return {"params": p, "batch_stats": stats} if stats else {"params": p}


def flax_function(config: Config, variables: dict):
    """``(fn, params)`` for :func:`fishercore.backends.jax.from_function`: ``fn(p, x)`` applies the Flax module
    with the batch statistics of ``variables`` fixed."""
    module = flax_module(config)
    stats = variables.get("batch_stats")

    def fn(p, x):
        return module.apply({"params": p, **({"batch_stats": stats} if stats else {})}, x)

    return fn, variables["params"]


def torch_layout(name: str, values: np.ndarray, shape: tuple) -> tuple[str, np.ndarray]:
    """A JAX group's name (``conv0.kernel``) and per-parameter values of it (flat, Flax layout ``shape``) as torch's
    name and flat layout."""
    layer, what = name.rsplit(".", 1)
    v = np.asarray(values).reshape(shape)
    if what == "kernel":
        v = v.transpose(3, 2, 0, 1) if v.ndim == 4 else v.T
        what = "weight"
    elif what == "scale":
        what = "weight"
    return f"{layer}.{what}", v.reshape(-1)
