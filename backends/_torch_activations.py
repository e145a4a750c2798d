"""The curved elementwise activations a torch model calls, found by watching its calls (a ``TorchFunctionMode``).

:mod:`fishercore.backends.rules.curvature` needs, for each activation ``a_m = φ_m(z_m)``, its
input ``z_m``, the cotangent ``∂h/∂a_m`` and ``φ_m''(z_m)``.  :class:`Activations` intercepts
every call of a known curved elementwise function (``torch.tanh``, ``torch.sigmoid``,
``F.gelu``, ``F.silu``, ``F.softplus``, ``F.elu``, ... — hence ``nn.Tanh``, ``nn.GELU``, ...,
and the same functions in a hand-written ``forward``), in call order, and

* records ``(φ, z)`` of each call (``φ`` with the call's other arguments bound);
* adds ``deltas[m]`` to call m's output (so a vjp gives ``∂h/∂a_m``);
* or, with ``identity=True``, returns ``z`` itself: the model with its activations removed,
  whose traced graph tells which parameters are curved through anything else
  (:func:`fishercore.backends._torch_linearity.curved_params`).

Piecewise-linear activations (ReLU, LeakyReLU, hardtanh) are not listed: φ'' = 0.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["CURVED_ELEMENTWISE", "Activations"]

#: Elementwise functions with φ'' ≠ 0 somewhere: the activations the curvature rule knows.
CURVED_ELEMENTWISE = frozenset({
    torch.tanh, torch.Tensor.tanh, torch.sigmoid, torch.Tensor.sigmoid, torch.special.expit, F.gelu, F.silu,
    F.softplus, F.elu, F.selu, F.celu, F.mish, F.logsigmoid, F.softsign, F.tanhshrink, F.hardswish,
})


def _signature(func):
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # builtins without one (torch.tanh): no in-place flag to drop
        return None


_SIGNATURES = {f: _signature(f) for f in CURVED_ELEMENTWISE}


def _bind(func, args, kwargs):
    """``φ(t)``: func with the call's other arguments, never in place (the input z is kept)."""
    sig = _SIGNATURES[func]
    if sig is None or "inplace" not in sig.parameters:
        rest = args[1:]
        return lambda t: func(t, *rest, **kwargs)
    bound = sig.bind(*args, **kwargs)
    bound.arguments.pop("inplace", None)
    first = next(iter(sig.parameters))
    others = {k: v for k, v in bound.arguments.items() if k != first}
    return lambda t: func(t, **others)


class Activations(TorchFunctionMode):
    """Watches a model's curved elementwise activations: records ``(φ, z)`` per call in ``calls``; adds
    ``deltas[m]`` to call m's output; or, with ``identity``, leaves them out (returns z)."""

    def __init__(self, *, deltas=None, identity: bool = False):
        super().__init__()
        self.deltas, self.identity = deltas, identity
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in CURVED_ELEMENTWISE or not args or not isinstance(args[0], torch.Tensor) \
                or not args[0].is_floating_point():
            return func(*args, **kwargs)
        z = args[0]
        if self.identity:
            self.calls.append(None)
            return z
        phi = _bind(func, args, kwargs)
        out = phi(z)
        m = len(self.calls)
        self.calls.append((phi, z))
        if self.deltas is not None:
            if m >= len(self.deltas):
                raise ValueError("X: the model called more activations than when it was built; its structure "
                                 "must not depend on its inputs")
            out = out + self.deltas[m]
        return out
