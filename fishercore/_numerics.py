"""Numerically stable elementwise functions shared by the families and the layer rules.

Written once against the array API: the softmax family, the sigmoid pair ``(σ(h), σ(−h))``
(both to full relative precision, so ``1 − p`` never cancels) and softplus.
"""

from __future__ import annotations

__all__ = ["log_softmax", "sigmoid", "sigmoid_pair", "softmax", "softplus", "unit_roundoff"]


def softmax(h, xp):
    """``softmax`` over the last axis, shifted by the maximum (no overflow)."""
    e = xp.exp(h - xp.max(h, axis=-1, keepdims=True))
    return e / xp.sum(e, axis=-1, keepdims=True)


def log_softmax(h, xp):
    """``log softmax`` over the last axis, shifted by the maximum."""
    z = h - xp.max(h, axis=-1, keepdims=True)
    return z - xp.log(xp.sum(xp.exp(z), axis=-1, keepdims=True))


def sigmoid_pair(h, xp):
    """``(σ(h), σ(−h))``: p and 1 − p, each to full relative precision (no ``1 − p`` cancellation)."""
    e = xp.exp(-xp.abs(h))
    big, small = 1.0 / (1.0 + e), e / (1.0 + e)
    pos = h >= 0
    return xp.where(pos, big, small), xp.where(pos, small, big)


def sigmoid(h, xp):
    """``σ(h) = 1 / (1 + e^{−h})``, without overflow for any h."""
    return sigmoid_pair(h, xp)[0]


def softplus(h, xp):
    """``log(1 + e^h)`` as ``max(h, 0) + log1p(e^{−|h|})`` (no overflow)."""
    return xp.maximum(h, 0.0 * h) + xp.log1p(xp.exp(-xp.abs(h)))


def unit_roundoff(dtype) -> float:
    """Unit roundoff of a real floating dtype (float32 or float64; any namespace)."""
    return 2.0**-24 if "32" in str(dtype) else 2.0**-53
