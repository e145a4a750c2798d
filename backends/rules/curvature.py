r"""Curvature that comes from elementwise activations alone (docs/math.md §13).

When the only operations of a network that are curved in a parameter θ_i are elementwise
activations ``a_m = φ_m(z_m)`` — everything else between θ_i and the outputs is piecewise
linear in it (sums, products with other parameters, pooling, convolutions, residual additions,
an eval-mode batch norm) — the second derivative of ``h_c`` along θ_i collects one term per
activation:

.. math::

    w_c(θ_i) = \sum_m \sum_q K_m[c, q]\, \Big(\frac{∂z_m[q]}{∂θ_i}\Big)^2,
    \qquad K_m = φ_m''(z_m) ⊙ \frac{∂h_c}{∂a_m}.

``K`` costs the C vector-Jacobian products of first order (with the activations' outputs
among the perturbed values) and ``φ''`` by autodiff; ``∂z_m/∂θ_i`` is one forward-mode
pass per direction, up to the activations only — no second-order pass at all.  An activation
that reads a layer's output ``z`` unchanged (``z_m = z``, e.g. ``tanh`` after a convolution)
needs no pass either: its term is ``Σ_q K_m[c, q] v_i[q]²`` with ``v_i`` the layer's tangent,
which for a convolution is the patch gather of :mod:`.conv` squared (:func:`conv_direct`) and
for a dense layer ``K_m[c, a] · x_b²`` (the dense rule's ``γ``).

Everything here is array-API arithmetic on those factors; the adapters find the activations
and compute the tangents with their framework.
"""

from __future__ import annotations

from array_api_compat import array_namespace

from .conv import ConvSpec, weight_sums

__all__ = ["channel_tangent_squares", "conv_bias_direct", "conv_direct", "factors", "tangent_squares"]


def factors(d2, cotangent):
    """``K = φ''(z) ⊙ ∂h/∂a``: ``d2`` ``(n, *s)``, ``cotangent`` ``(n, C, *s)`` → ``(n, C, ∏s)``."""
    xp = array_namespace(d2, cotangent)
    n, C = cotangent.shape[:2]
    return xp.reshape(cotangent * d2[:, None, ...], (n, C, -1))


def tangent_squares(K, T):
    """``Σ_q K[c, q] T[k, q]²`` per input: ``K`` (n, C, Q), tangents ``T`` (n, k, Q) → (n, C, k)."""
    xp = array_namespace(K, T)
    return xp.matmul(K, xp.matrix_transpose(T * T))


def channel_tangent_squares(K, T):
    """``Σ_q K[c, o, q] T[j, o, q]²`` per input and channel: ``K`` (n, C, O, Q) the factors of an activation whose
    input has O channels, ``T`` (n, J, O, Q) tangents of it that each live in one channel o → (n, C, O, J)."""
    xp = array_namespace(K, T)
    out = xp.matmul(xp.permute_dims(K, (0, 2, 1, 3)), xp.permute_dims(T * T, (0, 2, 3, 1)))  # (n, O, C, J)
    return xp.permute_dims(out, (0, 2, 1, 3))


def conv_direct(D, unf, spec: ConvSpec):
    """``Σ_p D[c, o, p] · x_unf[row(o, i, k), p]²`` for every weight: ``D`` ``(n, C, O, *out_spatial)`` the summed
    ``K`` of the activations that read the layer's output, ``unf`` (n, I·K, P) its patches → (n, C, weights),
    laid out as the framework stores the weight, ``(O, I/g, *kernel)`` (:func:`.conv.weight_sums`)."""
    return weight_sums(D, unf * unf, spec)


def conv_bias_direct(D):
    """``Σ_p D[c, o, p]``: ``(n, C, O, *out_spatial)`` → (n, C, O)."""
    xp = array_namespace(D)
    n, C, O = D.shape[:3]
    return xp.sum(xp.reshape(D, (n, C, O, -1)), axis=-1)

