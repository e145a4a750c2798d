r"""Which parameters a JAX function is piecewise linear in, read off its jaxpr (docs/math.md §9).

``w_i = ∂²h/∂θ_i²`` is exactly 0 (almost everywhere) when ``h`` is piecewise linear in the single
coordinate ``θ_i``.  Along the function's jaxpr each value carries two sets of parameter leaves:

* ``D`` — the leaves it depends on;
* ``N`` — the leaves in a single coordinate of which it may be curved.

Linear and piecewise-linear primitives (sums, reshapes, slices, ``max``/``min``/``abs``/
``select_n`` — ReLU, max pooling —, reductions by sum or max) pass both on; a product of two
values (``mul``, ``dot_general``, convolutions) is curved in the leaves both factors depend on;
a quotient is curved in its divisor's; piecewise-constant results (comparisons, ``sign``,
``floor``, integers) depend on nothing; calls (``jit``, ``custom_jvp_call`` …) are followed into
their bodies.  Every other primitive — ``tanh``, ``exp``, ``logistic``, ``erf``, ``rsqrt``,
``integer_pow``, control flow — is taken as curved in everything it depends on.  The analysis
can only err towards "curved", which costs time, never exactness: a leaf reported linear has
``w = 0``.
"""

from __future__ import annotations

import jax
import numpy as np

__all__ = ["curved_leaves"]

_LINEAR = frozenset({
    "add", "add_any", "sub", "neg", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims",
    "slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad", "rev", "gather", "scatter-add",
    "scatter_add", "reduce_sum", "reduce_max", "reduce_min", "reduce_precision", "cumsum", "cummax", "cummin",
    "max", "min", "abs", "select_n", "convert_element_type", "copy", "copy_p", "real", "imag", "conj",
    "sort", "clamp", "device_put", "sharding_constraint", "squeeze_p", "split",
})
_PIECEWISE_CONSTANT = frozenset({
    "sign", "floor", "ceil", "round", "stop_gradient", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not",
    "xor", "argmax", "argmin", "iota", "is_finite",
})
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "remat", "checkpoint"})
_EMPTY = frozenset()


def _inexact(var) -> bool:
    aval = getattr(var, "aval", None)
    return aval is not None and np.issubdtype(np.dtype(aval.dtype), np.inexact)


def _body(eqn):
    """The (jaxpr, consts) of a call's body whose inputs are the equation's, or None."""
    for key in ("call_jaxpr", "jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is None:
            continue
        jaxpr, consts = (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, ())
        if len(jaxpr.invars) == len(eqn.invars) and len(jaxpr.outvars) == len(eqn.outvars):
            return jaxpr
    return None


def _walk(jaxpr, inputs):
    """``(D, N)`` of every output of ``jaxpr`` given those of its inputs."""
    env = {}

    def read(v):
        if not hasattr(v, "aval") or type(v).__name__ == "Literal":
            return _EMPTY, _EMPTY
        return env.get(v, (_EMPTY, _EMPTY))

    for var, dn in zip(jaxpr.invars, inputs):
        env[var] = dn
    for eqn in jaxpr.eqns:
        args = [read(v) for v in eqn.invars]
        deps = frozenset().union(*(d for d, _ in args))
        curved = frozenset().union(*(n for _, n in args))
        name = eqn.primitive.name
        if name in _CALLS and _body(eqn) is not None:
            outs = _walk(_body(eqn), args)
        else:
            if name in _LINEAR:
                pass
            elif name in _PIECEWISE_CONSTANT:
                deps, curved = _EMPTY, _EMPTY
            elif name in _BILINEAR and len(args) == 2:
                curved = curved | (args[0][0] & args[1][0])
            elif name == "div" and len(args) == 2:
                curved = curved | args[1][0]
            else:  # anything else may be curved in every leaf it depends on
                curved = curved | deps
            outs = [(deps, curved)] * len(eqn.outvars)
        for var, dn in zip(eqn.outvars, outs):
            env[var] = dn if _inexact(var) else (_EMPTY, _EMPTY)
    return [read(v) for v in jaxpr.outvars]


def curved_leaves(apply_fn, params, example_x) -> frozenset:
    """Indices (in ``jax.tree_util`` leaf order) of the parameter leaves in a single coordinate of which
    ``apply_fn(params, x)`` may be curved; the others enter piecewise linearly, so their ``w = 0``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def flat(leaves, x):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), x)

    closed = jax.make_jaxpr(flat)(leaves, example_x)
    jaxpr = closed.jaxpr
    inputs = [(frozenset({i}), _EMPTY) for i in range(len(leaves))]
    inputs += [(_EMPTY, _EMPTY)] * (len(jaxpr.invars) - len(leaves))
    # constants captured by the function do not depend on the parameters
    curved = frozenset()
    for _, n in _walk(jaxpr, inputs):
        curved |= n
    return curved
