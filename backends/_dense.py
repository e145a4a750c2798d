r"""Diagonal output Hessians of a chain of dense layers, from per-layer factors (SPEC §5).

For ``z_l = W_l a_{l−1} + b_l``, ``a_l = φ_l(z_l)`` (φ elementwise) and outputs
``h = z_{L−1}``, the diagonal of ``∂²h_c/∂z_l²`` is

.. math::

    γ_l = \sum_{m=l}^{L-2} K_m \,@\, \big(∂z_m/∂z_l\big)^{2},
    \qquad K_m = φ_m''(z_m) ⊙ (∂h/∂a_m),

every curved nonlinearity m contributing its curvature, carried down to ``z_l`` by the
Jacobian between the layers.  The hand-written MLP, the torch adapter's
``from_sequential`` and the JAX adapter's ``from_mlp`` all hand this function their
own ``φ'``, ``K`` and ``∂h/∂z`` (closed forms for the MLP, autodiff for the adapters);
it does the contraction, with the work shared by all C outputs.

Index conventions: n input, C output, n_l width of layer l.
"""

from __future__ import annotations

from array_api_compat import array_namespace

__all__ = ["hessian_factors", "matmul_shared"]


def matmul_shared(A, W):
    """``A @ W`` for a stack A (n, r, k) and one matrix W (k, m), as a single (n·r) × k product."""
    xp = array_namespace(A, W)
    n, r, k = A.shape
    return xp.reshape(xp.matmul(xp.reshape(A, (n * r, k)), W), (n, r, W.shape[1]))


def hessian_factors(Ws, d1, curv, jac):
    r"""``γ_l`` for every layer l, each (n, C, n_l); the last is zero (h is linear in z_{L−1}).

    Parameters
    ----------
    Ws : sequence of L arrays (n_l, n_{l−1})
        The layers' weights, as ``torch.nn.Linear`` stores them.
    d1 : sequence of L − 1 arrays (n, n_l)
        ``φ_l'(z_l)`` of each hidden layer.
    curv : sequence of L − 1 arrays (n, C, n_l) or None
        ``K_l = φ_l''(z_l) ⊙ ∂h/∂a_l``; None where φ_l is piecewise linear.
    jac : sequence of L arrays (n, C, n_l)
        ``∂h/∂z_l`` (only their shapes and dtype are used, for the zeros).

    Notes
    -----
    Work is organised by the curvature's source m:

    * ``m = l``: ``K_l`` itself;
    * ``m = l + 1``: ``∂z_m/∂z_l = W_m diag φ'(z_l)``, so the term is
      ``(K_m @ W_m²) ⊙ φ'(z_l)²`` — one matrix product with the shared weight,
      no per-input Jacobian;
    * ``m ≥ l + 2``: the per-input Jacobian carried down from m,
      ``∂z_m/∂z_l = ((∂z_m/∂z_{l+1}) @ W_{l+1}) ⊙ φ'(z_l)``, each step one
      (n·n_m) × n_{l+1} product with the shared weight, squared and contracted with K_m.

    Memory beyond the inputs: the largest per-input Jacobian, n × n_m × n_l, and only
    for nets with two or more curved hidden layers above a layer.
    """
    xp = array_namespace(*jac)
    L = len(Ws)
    gamma = [curv[l] if curv[l] is not None else xp.zeros_like(jac[l]) for l in range(L - 1)]
    gamma.append(xp.zeros_like(jac[L - 1]))
    for m in range(1, L - 1):
        K = curv[m]
        if K is None:
            continue
        W, g = Ws[m], d1[m - 1]
        gamma[m - 1] = gamma[m - 1] + matmul_shared(K, W * W) * (g * g)[:, None, :]
        if m >= 2:
            J = W[None, :, :] * g[:, None, :]  # ∂z_m/∂z_{m−1}, (n, n_m, n_{m−1})
            for l in range(m - 2, -1, -1):
                J = matmul_shared(J, Ws[l + 1]) * d1[l][:, None, :]
                gamma[l] = gamma[l] + xp.matmul(K, J * J)
    return gamma


def chain_workspace(widths, curved, itemsize: int) -> int:
    """Bytes per input that :func:`hessian_factors` holds beyond its inputs and outputs.

    ``widths[l]`` is layer l's output width, ``curved[m]`` whether hidden layer m has
    curvature; the carried Jacobian ∂z_m/∂z_l (m ≥ l + 2) and its square are the
    largest temporaries.
    """
    largest = 0
    for m in range(2, len(widths) - 1):
        if curved[m]:
            largest = max(largest, max(widths[m] * widths[l] for l in range(m - 1)))
    return 2 * largest * itemsize
