"""Composite forms of torch operations whose fused kernels torch.func cannot differentiate twice correctly.

In torch 2.13, forward-over-forward differentiation (``jvp`` of ``jvp``, which the column rule
uses for Hessian diagonals, docs/math.md §9) of ``native_layer_norm`` is wrong: the second
derivative of ``layer_norm`` along one input coordinate differs from ``torch.func.hessian`` and
from finite differences by up to 0.5 (``tests/test_torch_backend.py`` checks the composite
against both).  ``scaled_dot_product_attention`` has no forward-mode rule at all on the CPU.
Under ``torch.no_grad()`` (where fishercore differentiates), ``silu``, ``mish`` and
``hardsigmoid`` have no second forward-mode rule ("forward AD with aten::silu_backward"),
``logsigmoid`` warns that it resizes an output under ``vmap``, and ``rrelu`` has no batching
rule.  Inside :func:`composites`, a ``TorchFunctionMode`` computes all of them from elementary
operations (means, ``rsqrt``, ``softmax``, matrix products, ``sigmoid``, ``softplus``, ``clamp``),
whose derivatives of every order are exact; ``tests/test_torch_backend.py`` checks each against
the fused form and ``torch.func.hessian``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["composites", "hardsigmoid", "layer_norm", "logsigmoid", "mish", "rrelu", "scaled_dot_product_attention",
           "silu"]


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):
    """``F.layer_norm`` from means and ``rsqrt``."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    centred = input - input.mean(dims, keepdim=True)
    out = centred * torch.rsqrt((centred * centred).mean(dims, keepdim=True) + eps)
    if weight is not None:
        out = out * weight
    return out if bias is None else out + bias


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """``F.scaled_dot_product_attention`` (without dropout) from a softmax and two matrix products."""
    if dropout_p:
        raise ValueError("module: scaled_dot_product_attention with dropout_p > 0 draws random numbers; call "
                         ".eval() on the module (or pass dropout_p=0 when not training)")
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    scores = (query @ key.transpose(-2, -1)) * scale
    L, S = query.shape[-2], key.shape[-2]
    if is_causal:
        keep = torch.ones(L, S, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    return torch.softmax(scores, dim=-1) @ value


def silu(input, inplace=False):
    return input * torch.sigmoid(input)


def mish(input, inplace=False):
    return input * torch.tanh(F.softplus(input))


def hardsigmoid(input, inplace=False):
    return torch.clamp(input / 6 + 0.5, 0.0, 1.0)


def logsigmoid(input):
    return -F.softplus(-input)


def rrelu(input, lower=1.0 / 8, upper=1.0 / 3, training=False, inplace=False):
    """``F.rrelu`` in evaluation, a leaky ReLU of slope (lower + upper) / 2; in training it draws slopes."""
    if training:
        raise ValueError("module: rrelu in training mode draws random slopes; call .eval() on the module")
    return F.leaky_relu(input, (lower + upper) / 2)


_REPLACED = {F.layer_norm: layer_norm, F.scaled_dot_product_attention: scaled_dot_product_attention,
             F.silu: silu, F.mish: mish, F.hardsigmoid: hardsigmoid, F.logsigmoid: logsigmoid, F.rrelu: rrelu}


class _Composites(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        replacement = _REPLACED.get(func)
        return (replacement or func)(*args, **(kwargs or {}))


def composites():
    """A context in which ``F.layer_norm``, ``F.scaled_dot_product_attention``, ``F.silu``, ``F.mish``,
    ``F.hardsigmoid``, ``F.logsigmoid`` and ``F.rrelu`` (hence their modules) run in composite form."""
    return _Composites()
