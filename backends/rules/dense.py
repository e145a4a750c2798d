r"""Dense chains: ``z_l = W_l a_{l−1} + b_l``, ``a_l = φ_l(z_l)``, ``h = a_{L−1}`` (docs/math.md §8).

The one rule every backend uses for a stack of dense layers and elementwise activations
(the hand-written MLP, torch's ``from_sequential``, JAX's ``from_mlp``):

* :func:`forward` — outputs, each layer's inputs ``a_{l−1}``, and ``φ_l'(z_l)``, ``φ_l''(z_l)``;
* :func:`backpropagate` — cotangents of ``h`` pulled back to every pre-activation,
  ``B_l = (B_{l+1} W_{l+1}) ⊙ φ_l'`` — with one-hot cotangents this is ``∂h/∂z_l``, with
  score vectors it is ``sᵀ∂h/∂z_l`` (Î1's per-sample gradients);
* :func:`hessian_factors` — the diagonal of ``∂²h_c/∂z_l²`` from the curvature of every
  activation above ``z_l``, with the work shared by all C outputs;
* :func:`derivatives` and :func:`workspace` — all of it for one batch, and its memory.

Activations are objects with ``derivatives(z, xp, order)`` (:mod:`.activations`): closed
forms from the hand-written MLP, the framework's ``jvp`` from the adapters.  ``None``
stands for no activation (the identity; usually the last layer).  The functions are
pure and take the activations as a keyword, so JAX adapters compile them once per
structure with ``ops.jit(..., static_argnames=("activations", ...))``.

Index conventions: n input, C output (or K cotangents), n_l width of layer l.
"""

from __future__ import annotations

from array_api_compat import array_namespace, device

from fishercore._protocol import DenseBlock

__all__ = ["backpropagate", "dense_blocks", "derivatives", "forward", "hessian_factors", "matmul_shared",
           "workspace"]


def matmul_shared(A, W):
    """``A @ W`` for a stack A (n, r, k) and one matrix W (k, m), as a single (n·r) × k product."""
    xp = array_namespace(A, W)
    n, r, k = A.shape
    return xp.reshape(xp.matmul(xp.reshape(A, (n * r, k)), W), (n, r, W.shape[1]))


def _times(a, g):
    """``a ⊙ g`` broadcast over the middle axis of a (n, r, k); ``g`` (n, k) or None (the identity's 1)."""
    return a if g is None else a * g[:, None, :]


def forward(weights, biases, X, *, activations, order: int = 0):
    """``(h, inputs, d1, d2)``: outputs (n, C), layer inputs ``a_{l−1}`` (n, n_{l−1}), and per layer
    ``φ_l'(z_l)`` (if order ≥ 1) and ``φ_l''(z_l)`` (if order = 2 and φ_l is curved), (n, n_l) or None."""
    xp = array_namespace(X, *weights)
    a, inputs, d1, d2 = X, [], [], []
    for W, b, act in zip(weights, biases, activations):
        inputs.append(a)
        z = xp.matmul(a, xp.matrix_transpose(W))
        if b is not None:
            z = z + b
        a, g1, g2 = (z, None, None) if act is None else act.derivatives(z, xp, order)
        d1.append(g1)
        d2.append(g2)
    return a, inputs, d1, d2


def backpropagate(weights, d1, top, d2=None):
    r"""Cotangents ``top`` (n, K, C) of ``h`` pulled back to every pre-activation ``z_l``.

    ``G_{L−1} = top``, ``G_l = B_{l+1} W_{l+1}`` (the cotangent of ``a_l``), ``B_l = G_l ⊙ φ_l'``.
    Returns the lists ``B`` (n, K, n_l) and, with ``d2``, the curvature factors
    ``K_l = G_l ⊙ φ_l''`` (None where φ_l is piecewise linear).
    """
    L = len(weights)
    B, K = [None] * L, [None] * L
    G = top
    for l in range(L - 1, -1, -1):
        if l < L - 1:
            G = matmul_shared(B[l + 1], weights[l + 1])
        B[l] = _times(G, d1[l])
        if d2 is not None and d2[l] is not None:
            K[l] = G * d2[l][:, None, :]
    return B, K


def hessian_factors(weights, d1, curv, jac):
    r"""``γ_l = diag ∂²h/∂z_l²`` for every layer l, each (n, C, n_l) (docs/math.md §8).

    .. math::

        γ_l = K_l + \sum_{m > l} K_m \,@\, \big(∂z_m/∂z_l\big)^{2},
        \qquad K_m = φ_m''(z_m) ⊙ (∂h/∂a_m),

    every curved activation m contributing its curvature, carried down to ``z_l`` by the
    Jacobian between the layers.  Work is organised by the curvature's source m:

    * ``m = l + 1``: ``∂z_m/∂z_l = W_m diag φ'(z_l)``, so the term is
      ``(K_m @ W_m²) ⊙ φ'(z_l)²`` — one matrix product with the shared weight;
    * ``m ≥ l + 2``: the per-input Jacobian carried down from m,
      ``∂z_m/∂z_l = ((∂z_m/∂z_{l+1}) @ W_{l+1}) ⊙ φ'(z_l)``, each step one
      (n·n_m) × n_{l+1} product with the shared weight, squared and contracted with K_m.

    Memory beyond the inputs: the largest per-input Jacobian, n × n_m × n_l, and only for
    chains with two or more curved activations above a layer (:func:`workspace`).

    Parameters
    ----------
    weights : sequence of L arrays (n_l, n_{l−1})
    d1 : sequence of L arrays (n, n_l) or None
        ``φ_l'(z_l)``; None for the identity.
    curv : sequence of L arrays (n, C, n_l) or None
        ``K_l``; None where φ_l is piecewise linear.
    jac : sequence of L arrays (n, C, n_l)
        ``∂h/∂z_l`` (only their shapes and dtype are used, for the zeros).
    """
    xp = array_namespace(*jac)
    L = len(weights)
    gamma = [curv[l] if curv[l] is not None else xp.zeros_like(jac[l]) for l in range(L)]
    for m in range(1, L):
        K = curv[m]
        if K is None:
            continue
        W, g = weights[m], d1[m - 1]
        gamma[m - 1] = gamma[m - 1] + _times(matmul_shared(K, W * W), None if g is None else g * g)
        if m >= 2:
            n = K.shape[0]
            J = _times(xp.broadcast_to(W[None, :, :], (n, *W.shape)), g)  # ∂z_m/∂z_{m−1}, (n, n_m, n_{m−1})
            for l in range(m - 2, -1, -1):
                J = _times(matmul_shared(J, weights[l + 1]), d1[l])
                gamma[l] = gamma[l] + xp.matmul(K, J * J)
    return gamma


def derivatives(weights, biases, X, *, activations, hessian: bool = True):
    """``(h, inputs, jac, hess)`` of a chain for a batch X: ``∂h/∂z_l`` and ``diag ∂²h/∂z_l²``, each (n, C, n_l)
    (hess is a list of None without ``hessian``)."""
    xp = array_namespace(X, *weights)
    h, inputs, d1, d2 = forward(weights, biases, X, activations=activations, order=2 if hessian else 1)
    n, C = h.shape
    top = xp.broadcast_to(xp.eye(C, dtype=h.dtype, device=device(h)), (n, C, C))
    jac, curv = backpropagate(weights, d1, top, d2 if hessian else None)
    hess = hessian_factors(weights, d1, curv, jac) if hessian else [None] * len(weights)
    return h, inputs, jac, hess


def dense_blocks(layout, inputs, jac, hess) -> tuple:
    """:class:`~fishercore.DenseBlock` per layer; ``layout`` holds ``(weight name, bias name or None, transposed)``."""
    return tuple(DenseBlock(w, b, a, j, g, t) for (w, b, t), a, j, g in zip(layout, inputs, jac, hess))


def workspace(widths, curved, itemsize: int, hessian: bool = True) -> int:
    """Bytes per input that :func:`hessian_factors` holds beyond its inputs and outputs.

    ``widths[l]`` is layer l's output width, ``curved[m]`` whether activation m has
    curvature; the carried Jacobian ∂z_m/∂z_l (m ≥ l + 2) and its square are the largest
    temporaries.
    """
    if not hessian:
        return 0
    largest = 0
    for m in range(2, len(widths)):
        if curved[m]:
            largest = max(largest, max(widths[m] * widths[l] for l in range(m - 1)))
    return 2 * largest * itemsize
