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

__all__ = ["CURVED_ELEMENTWISE", "PIECEWISE_ELEMENTWISE", "Activations", "CallLog", "dense_chain"]

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


_SIGNATURES: dict = {}


def _bind(func, args, kwargs):
    """``φ(t)``: func with the call's other arguments, never in place (the input z is kept)."""
    if func not in _SIGNATURES:
        _SIGNATURES[func] = _signature(func)
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


#: Elementwise functions that are piecewise linear (φ'' = 0): allowed in a dense chain, no curvature.
PIECEWISE_ELEMENTWISE = frozenset({F.relu, torch.relu, torch.Tensor.relu, F.leaky_relu, F.hardtanh, F.relu6})
_FLATTEN = frozenset({torch.flatten, torch.Tensor.flatten})


class CallLog(TorchFunctionMode):
    """Every call a model makes that returns a tensor: ``(func, args, kwargs, out)``, in order."""

    def __init__(self):
        super().__init__()
        self.calls: list = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if isinstance(out, torch.Tensor):
            self.calls.append((func, args, kwargs, out))
        return out


def dense_chain(calls, x, h, names: dict):
    """The model as a dense chain, if that is all it is: ``(flatten, [(weight, bias, [φ, ...]), ...])`` with the
    parameter names of each ``F.linear`` and the elementwise functions applied after it; None otherwise.

    The calls (a :class:`CallLog` of one forward pass on ``x`` giving ``h``) must be, in order: an optional
    flatten of ``x``, then ``F.linear`` of the previous result with parameters (``names``: id → name) as
    weight and bias, each followed by elementwise activations of the previous result (or eval-mode dropout);
    the last result is ``h``.  Anything else — a call on another tensor, a parameter used twice — is not a chain.
    """
    cur, flatten, layers, used = x, False, [], set()
    for func, args, kwargs, out in calls:
        first = args[0] if args else kwargs.get("input")
        if first is not cur:
            return None
        if func is F.linear:
            w = args[1] if len(args) > 1 else kwargs.get("weight")
            b = args[2] if len(args) > 2 else kwargs.get("bias")
            wn, bn = names.get(id(w)), None if b is None else names.get(id(b))
            if wn is None or (b is not None and bn is None) or {wn, bn} & used or w.ndim != 2 or cur.ndim != 2:
                return None
            used |= {wn, bn}
            layers.append((wn, bn, []))
        elif func in CURVED_ELEMENTWISE or func in PIECEWISE_ELEMENTWISE:
            if not layers:
                return None
            layers[-1][2].append((_bind(func, args, kwargs), func in PIECEWISE_ELEMENTWISE))
        elif func is F.dropout and not (args[2] if len(args) > 2 else kwargs.get("training", True)):
            pass  # the identity in evaluation
        elif func in _FLATTEN and not layers and cur is x and out.ndim == 2:
            flatten = True
        else:
            return None
        cur = out
    return (flatten, layers) if layers and cur is h and used >= set(names.values()) - {None} else None

