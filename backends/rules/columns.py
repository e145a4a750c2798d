r"""Full derivative columns of any differentiable function, by autodiff (docs/math.md §9).

For one input, ``f(θ) = h ∈ ℝ^C`` with ``θ`` a parameter group (or a perturbation ``δ`` of
a layer's output, or a pytree of them):

* :func:`pullback` — ``cᵀ ∂f/∂θ`` for a stack of cotangents c (K, C), one ``vjp`` and a
  ``vmap`` over the stack.  With the identity as the stack these are the rows of the
  Jacobian, ``u_i = ∂h/∂θ_i``; with score vectors, Î1's per-sample gradients.
* :func:`diag_hessian` — ``w_i = ∂²h/∂θ_i² = d²/dt² f(θ + t e_i)`` at ``t = 0``, forward over
  forward (``jvp`` of a ``jvp``) along each unit vector ``e_i``, ``vmap``-ed over a chunk of
  directions; :func:`unit_directions` makes the chunk and :func:`chunked` runs the chunks
  of a group and lays the result out as (n, C, size).

Everything is written against an ``ops`` object (:mod:`fishercore.backends.ops`): the
torch adapter passes torch.func's transforms, the JAX adapter JAX's.
"""

from __future__ import annotations

from array_api_compat import array_namespace

__all__ = ["chunked", "diag_hessian", "group_hessian", "position_rows", "pullback", "unit_directions"]


def position_rows(model, positions) -> slice:
    """The rows of a sequence model's flat outputs (T·C) that the positions ``(t0, t1)`` hold, t0 .. t1 − 1
    (all for None); refused where the model's blocks do not split by position (``position_chunks`` false)."""
    if positions is None:
        return slice(None)
    if not model.position_chunks:
        raise ValueError("positions: this model's blocks cover every output (it is not a sequence model, has dense "
                         "layers, or has groups whose Hessian diagonals are computed)")
    (T, per), (t0, t1) = model.output_shape, positions
    if not 0 <= t0 < t1 <= T:
        raise ValueError(f"positions: expected 0 <= t0 < t1 <= {T}, got {positions}")
    return slice(t0 * per, t1 * per)


def pullback(ops, f, primal, cotangents):
    """``cᵀ ∂f/∂primal`` for every row c of ``cotangents`` (K, C): a pytree like ``primal``, leaves ``(K, *shape)``.
    """
    _, pull = ops.vjp(f, primal)
    return ops.vmap(lambda c: pull(c)[0])(cotangents)


def diag_hessian(ops, f, primal, directions):
    """``d²/dt² f(primal + t e)`` at ``t = 0`` for every direction e of ``directions``, ``(k, *primal.shape)``:
    (k, C)."""
    def along(e):
        def first(p):
            return ops.jvp(f, (p,), (e,))[1]

        return ops.jvp(first, (primal,), (e,))[1]

    return ops.vmap(along)(directions)


def unit_directions(xp, shape, start: int, k: int, *, dtype, device):
    """The unit vectors ``e_start, ..., e_{start+k−1}`` of a group of the given shape, as ``(k, *shape)``; those past
    the group's size are zero."""
    size = 1
    for s in shape:
        size *= int(s)
    return xp.reshape(xp.eye(k, size, k=start, dtype=dtype, device=device), (k, *shape))


def chunked(size: int, chunk: int, compute):
    """``compute(start, k)`` → (n, k, C) for chunks of ``k = min(chunk, size)`` coordinates, as (n, C, size).

    Every chunk has the same k — the last one runs past the group, where :func:`unit_directions`
    gives zero directions whose results are dropped — so compiled code serves every chunk.
    """
    k = min(chunk, size)
    parts = [compute(start, k) for start in range(0, size, k)]
    xp = array_namespace(*parts)
    out = parts[0] if len(parts) == 1 else xp.concat(parts, axis=1)
    return xp.permute_dims(out[:, :size, :], (0, 2, 1))


def group_hessian(xp, shape, *, hessian: bool, linear: bool, second_order: bool, compute, dtype, device):
    """A group's Hessian diagonals, ``shape`` (n, C, size), as the column rule gives them.

    None when not asked for, or not computed (``second_order`` False: a generic model above its
    ``max_params``); exact zeros where the function is piecewise linear in the group
    (``linear``, read off its traced graph, :mod:`fishercore.backends.rules.linearity`), at any
    size; else ``compute()``, forward over forward along every coordinate.
    """
    if not hessian or not (linear or second_order):
        return None
    return xp.zeros(shape, dtype=dtype, device=device) if linear else compute()
