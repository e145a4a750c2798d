r"""Elementwise activations: ``φ(z)``, ``φ'(z)`` and ``φ''(z)``, from closed forms or from autodiff.

Every activation the layer rules see has one method,
``derivatives(z, xp, order) -> (φ(z), φ'(z) or None, φ''(z) or None)``, and the flag
``piecewise_linear`` (``φ'' = 0`` wherever it is defined: then ``φ''`` is None and the
rules skip its curvature, docs/math.md §7 fact 3).

* :class:`Activation` — the closed forms of the hand-written MLP (:data:`ACTIVATIONS`);
* :class:`Autodiff` — any elementwise function of a framework, differentiated by the
  framework (``Ops.elementwise_derivatives``: ``jvp`` with a tangent of ones — φ is
  elementwise, so ``jvp(φ, z, 1) = φ'(z)``, and once more for ``φ''`` — or, for torch,
  reverse mode on ``Σ φ(z)``, whose gradient is ``φ'(z)``).

Both are hashable (compiled JAX code takes them as static arguments), and
:func:`get_activation` returns the same object for the same arguments, so a new model
of the same structure reuses compiled code.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

from fishercore._numerics import sigmoid_pair, softplus

__all__ = ["ACTIVATIONS", "PIECEWISE_LINEAR", "Activation", "Autodiff", "get_activation"]

#: Names of the closed-form activations (``"gelu"`` is the tanh form).
ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "softplus", "gelu", "elu")

#: The names among them whose second derivative vanishes wherever it is defined.
PIECEWISE_LINEAR = ("identity", "relu", "leaky_relu")


def _select(triple, order):
    f, d1, d2 = triple
    return f, (d1 if order >= 1 else None), (d2 if order >= 2 else None)


class Activation(NamedTuple):
    """A closed-form activation: ``fn(z, xp) -> (φ, φ', φ'')``."""

    name: str
    fn: Callable
    piecewise_linear: bool

    def derivatives(self, z, xp, order: int = 2):
        f, d1, d2 = _select(self.fn(z, xp), order)
        return f, d1, None if self.piecewise_linear else d2


class Autodiff(NamedTuple):
    """An elementwise framework function ``fn(z)``, differentiated by the framework
    (``ops.elementwise_derivatives``: ``jvp`` with a tangent of ones, or reverse mode on ``Σ φ(z)``)."""

    fn: Callable
    ops: Any  # fishercore.backends.ops.Ops of a framework with autodiff (torch, JAX)
    piecewise_linear: bool

    def derivatives(self, z, xp, order: int = 2):
        return self.ops.elementwise_derivatives(self.fn, z, order, not self.piecewise_linear)


def _identity(z, xp):
    return z, xp.ones_like(z), xp.zeros_like(z)


def _relu(z, xp):
    pos = z > 0
    return xp.where(pos, z, 0.0 * z), xp.astype(pos, z.dtype), xp.zeros_like(z)


def _leaky_relu(slope):
    def fn(z, xp):
        pos = z > 0
        return xp.where(pos, z, slope * z), xp.where(pos, xp.ones_like(z), slope * xp.ones_like(z)), xp.zeros_like(z)
    return fn


def _tanh(z, xp):
    t = xp.tanh(z)
    d = 1.0 - t * t
    return t, d, -2.0 * t * d


def _sigmoid(z, xp):
    s, r = sigmoid_pair(z, xp)  # σ(z), σ(−z) = 1 − σ(z) without cancellation
    d = s * r
    return s, d, d * (r - s)


def _softplus(z, xp):
    s, r = sigmoid_pair(z, xp)
    return softplus(z, xp), s, s * r


_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu(z, xp):
    """GELU, tanh form: ``½ z (1 + tanh(k (z + A z³)))`` as ``torch.nn.GELU(approximate="tanh")``."""
    z2 = z * z
    t = xp.tanh(_GELU_K * (z + _GELU_A * z2 * z))
    sech2 = 1.0 - t * t
    du = _GELU_K * (1.0 + 3.0 * _GELU_A * z2)  # u'
    ddu = _GELU_K * 6.0 * _GELU_A * z  # u''
    f = 0.5 * z * (1.0 + t)
    df = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
    ddf = sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du))
    return f, df, ddf


def _elu(alpha):
    def fn(z, xp):
        pos = z > 0
        e = alpha * xp.exp(xp.minimum(z, 0.0 * z))  # α e^z on the negative side, never overflows
        return xp.where(pos, z, e - alpha), xp.where(pos, xp.ones_like(z), e), xp.where(pos, xp.zeros_like(z), e)
    return fn


@functools.cache
def get_activation(name, negative_slope: float = 0.01, alpha: float = 1.0) -> Activation:
    """The closed-form activation called ``name`` (one of :data:`ACTIVATIONS`); the same object for the same
    arguments."""
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {name!r}; expected one of {list(ACTIVATIONS)}")
    name = name.lower()
    fn = {"identity": _identity, "relu": _relu, "leaky_relu": _leaky_relu(negative_slope), "tanh": _tanh,
          "sigmoid": _sigmoid, "softplus": _softplus, "gelu": _gelu, "elu": _elu(alpha)}[name]
    return Activation(name, fn, name in PIECEWISE_LINEAR)
