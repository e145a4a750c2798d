r"""Which parameters a JAX function is piecewise linear in, read off its jaxpr.

The rule is :mod:`fishercore.backends.rules.linearity`'s; this module maps JAX's primitives to
its kinds and follows calls (``jit``, ``custom_jvp_call`` …) into their bodies.
"""

from __future__ import annotations

import jax
import numpy as np

from .rules.linearity import EMPTY, propagate

__all__ = ["curved_leaves"]

_LINEAR = frozenset({
    "add", "add_any", "sub", "neg", "reshape", "broadcast_in_dim", "transpose", "squeeze", "expand_dims",
    "slice", "dynamic_slice", "dynamic_update_slice", "concatenate", "pad", "rev", "gather", "scatter-add",
    "scatter_add", "reduce_sum", "reduce_max", "reduce_min", "reduce_precision", "cumsum", "cummax", "cummin",
    "max", "min", "abs", "select_n", "convert_element_type", "copy", "copy_p", "real", "imag", "conj",
    "sort", "clamp", "device_put", "sharding_constraint", "squeeze_p", "split",
    "reduce_window_sum", "reduce_window_max", "reduce_window_min",  # average, max and min pooling
})
_PIECEWISE_CONSTANT = frozenset({
    "sign", "floor", "ceil", "round", "stop_gradient", "eq", "ne", "lt", "le", "gt", "ge", "and", "or", "not",
    "xor", "argmax", "argmin", "iota", "is_finite",
})
_BILINEAR = frozenset({"mul", "dot_general", "conv_general_dilated"})
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "custom_jvp_call", "custom_vjp_call",
                    "custom_vjp_call_jaxpr", "remat", "checkpoint"})


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


def _kind(name: str) -> str | None:
    if name in _LINEAR:
        return "linear"
    if name in _PIECEWISE_CONSTANT:
        return "constant"
    if name in _BILINEAR:
        return "product"
    return "quotient" if name == "div" else None


def _walk(jaxpr, inputs):
    """``(D, N)`` of every output of ``jaxpr`` given those of its inputs."""
    env = {}

    def read(v):
        if not hasattr(v, "aval") or type(v).__name__ == "Literal":
            return EMPTY, EMPTY
        return env.get(v, (EMPTY, EMPTY))

    for var, dn in zip(jaxpr.invars, inputs):
        env[var] = dn
    for eqn in jaxpr.eqns:
        args = [read(v) for v in eqn.invars]
        name = eqn.primitive.name
        if name in _CALLS and _body(eqn) is not None:
            outs = _walk(_body(eqn), args)
        else:
            outs = [propagate(_kind(name), args)] * len(eqn.outvars)
        for var, dn in zip(eqn.outvars, outs):
            env[var] = dn if _inexact(var) else (EMPTY, EMPTY)
    return [read(v) for v in jaxpr.outvars]


def curved_leaves(apply_fn, params, example_x) -> frozenset:
    """Indices (in ``jax.tree_util`` leaf order) of the parameter leaves in a single coordinate of which
    ``apply_fn(params, x)`` may be curved; the others enter piecewise linearly, so their ``w = 0``."""
    leaves, treedef = jax.tree_util.tree_flatten(params)

    def flat(leaves, x):
        return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), x)

    closed = jax.make_jaxpr(flat)(leaves, example_x)
    jaxpr = closed.jaxpr
    inputs = [(frozenset({i}), EMPTY) for i in range(len(leaves))]
    inputs += [(EMPTY, EMPTY)] * (len(jaxpr.invars) - len(leaves))
    # constants captured by the function do not depend on the parameters
    curved = frozenset()
    for _, n in _walk(jaxpr, inputs):
        curved |= n
    return curved
