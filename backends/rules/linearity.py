r"""Which parameters a traced function is piecewise linear in: the propagation rule both frameworks use
(docs/math.md §11).

``w_i = ∂²h/∂θ_i²`` is exactly 0 (almost everywhere) when ``h`` is piecewise linear in the single
coordinate ``θ_i``.  Along a traced graph (JAX's jaxpr, torch's ATen graph) every value carries two
sets of parameters:

* ``D`` — the parameters it depends on;
* ``N`` — the parameters in a single coordinate of which it may be curved.

Each operation falls in one kind (the adapters map their primitives' names to kinds):

* ``"linear"`` — sums, reshapes, slices, ``max``/``min``/``abs``/``where`` (ReLU, max pooling),
  reductions by sum or max, lookups: both sets pass on;
* ``"constant"`` — comparisons, ``sign``, ``floor``, integer results: piecewise constant, depend
  on nothing;
* ``"product"`` — ``mul``, matrix products, convolutions, an eval-mode batch norm's scale: curved
  in the parameters both factors depend on (``W @ W``, ``q · k``);
* ``"quotient"`` — curved in the divisor's parameters;
* ``"normalise"`` — a layer norm: curved in its input's parameters (its scale and shift enter
  linearly);
* anything else — ``tanh``, ``exp``, ``logistic``, ``erf``, ``rsqrt``, powers, control flow:
  curved in everything it depends on.

The rule can only err towards "curved", which costs time, never exactness: a parameter reported
linear has ``w = 0``.
"""

from __future__ import annotations

__all__ = ["EMPTY", "propagate"]

EMPTY = frozenset()


def propagate(kind: str | None, args, factors=(0, 1)):
    """``(D, N)`` of an operation's result from its arguments' ``[(D, N), ...]``; ``factors`` are the positions
    of a product's two factors."""
    deps = frozenset().union(*(d for d, _ in args)) if args else EMPTY
    curved = frozenset().union(*(n for _, n in args)) if args else EMPTY
    if kind == "linear":
        return deps, curved
    if kind == "constant":
        return EMPTY, EMPTY
    if kind == "product" and len(args) > max(factors):
        return deps, curved | (args[factors[0]][0] & args[factors[1]][0])
    if kind == "quotient" and len(args) == 2:
        return deps, curved | args[1][0]
    if kind == "normalise" and args:
        return deps, curved | args[0][0]
    return deps, curved | deps
