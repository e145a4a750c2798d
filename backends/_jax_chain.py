"""A JAX function that is a dense chain, read off its program: then the dense-chain rule computes everything.

A multilayer perceptron written in Flax (``nn.Dense`` and activations) or by hand (``x @ W + b``)
is, for one input, a program of this shape only: the input reshaped to a row, then per layer a
product ``a @ W`` (W a parameter, stored (in, out), or ``Wᵀ`` of one stored (out, in)), an optional
bias parameter added to it, and elementwise operations of the result (the activation, any
composition: ``tanh``, GELU's polynomial, a ``custom_jvp`` ReLU), the last result reshaped to the
outputs.  Every parameter is used once.  :func:`dense_chain` recognises such a program and returns
its layers; the activations become elementwise functions differentiated by JAX
(:class:`.rules.activations.Autodiff`), and the dense-chain rule (docs/math.md §8) computes the
first and second order of every layer from per-neuron factors, as :func:`~fishercore.backends.jax.from_mlp`
does.  Anything else — a skip connection, a parameter used twice, a reduction such as a softmax —
is not a chain, and the function keeps the general rules.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax

from ._jax_curvature import _curved, _elementwise
from ._jax_program import Lit, Program, run

__all__ = ["ChainLayer", "activation_fn", "dense_chain"]

#: Operations that only reshape one value (when they keep its size).
_SHAPE = frozenset({"reshape", "broadcast_in_dim", "squeeze", "expand_dims", "convert_element_type", "copy",
                    "copy_p"})


class ChainLayer(NamedTuple):
    """One layer: the positions of its weight and bias among the program's inputs, whether the weight is stored
    (in, out), and its activation (None for none): ``(program, base shape, piecewise linear)``."""

    weight: int
    bias: int | None
    transposed: bool
    activation: Any


def _size(var) -> int:
    return math.prod(var.aval.shape)


def _reshapes(op, value) -> bool:
    """Whether the operation only reshapes ``value`` (its one non-literal input), keeping its size."""
    ins = [a for a in op.ins if not isinstance(a, Lit)]
    return (op.eqn.primitive.name in _SHAPE and ins == [value] and len(op.outs) == 1
            and _size(op.eqn.outvars[0]) == _size(op.eqn.invars[op.ins.index(value)]))


def dense_chain(program: Program, n_leaves: int):
    """The layers (:class:`ChainLayer`) of a one-input program (inputs: the ``n_leaves`` parameters, then x) that
    is a dense chain, every parameter used once; None for any other program."""
    leaves = {program.inputs[i]: i for i in range(n_leaves)}
    const = set(program.consts)  # values that depend on neither x nor a parameter
    const_ops = []
    # a parameter, transposed or reshaped: (position, transposed, reshaped); a weight may be transposed, a bias reshaped
    param = {v: (i, False, False) for v, i in leaves.items()}
    used: set = set()
    # [weight, bias, transposed, base, (region ops, its last value), the product's shape (the base's, a bias added)]
    layers: list = []
    row = program.inputs[n_leaves]  # before the first layer: x, reshaped to a row
    ops, values = [], set()  # after a layer: the operations of its activation region and their values
    for op in program.ops:
        name, eqn = op.eqn.primitive.name, op.eqn
        ids = [a for a in op.ins if not isinstance(a, Lit)]
        if name.startswith("custom_vjp"):
            return None
        if all(a in const for a in ids):
            const.update(op.outs)
            const_ops.append(op)
        elif len(ids) == 1 and ids[0] in param:  # a parameter reshaped or transposed
            i, t, r = param[ids[0]]
            if _reshapes(op, ids[0]):
                param[op.outs[0]] = (i, t, r or eqn.outvars[0].aval.shape != eqn.invars[0].aval.shape)
            elif name == "transpose" and eqn.invars[0].aval.ndim == 2 and tuple(eqn.params["permutation"]) == (1, 0):
                param[op.outs[0]] = (i, not t, r)
            else:
                return None
        elif row is not None and _reshapes(op, row):
            row = op.outs[0]
        elif name == "dot_general":
            lhs, rhs = op.ins
            a, w = eqn.invars
            if (lhs != row and lhs not in values) or rhs not in param or param[rhs][0] in used or param[rhs][2]:
                return None
            if (tuple(map(tuple, eqn.params["dimension_numbers"][0])) != ((a.aval.ndim - 1,), (0,))
                    or tuple(map(tuple, eqn.params["dimension_numbers"][1])) != ((), ()) or w.aval.ndim != 2
                    or math.prod(a.aval.shape[:-1]) != 1):
                return None
            if layers:
                layers[-1][4] = (ops, lhs)
            i, t, _ = param[rhs]
            used.add(i)
            # used as is, the weight is stored (in, out): the dense rule's "transposed" layout
            layers.append([i, None, not t, op.outs[0], None, tuple(eqn.outvars[0].aval.shape)])
            row, ops, values = None, [], {op.outs[0]}
        elif not layers:
            return None
        elif (name == "add" and not ops and layers[-1][1] is None and len(ids) == 2 and layers[-1][3] in ids
              and all(a in param or a == layers[-1][3] for a in ids)):  # the bias, right after the product
            other = ids[1] if ids[0] == layers[-1][3] else ids[0]
            i, t, _ = param[other]
            if i in used or t or eqn.invars[op.ins.index(other)].aval.shape != eqn.outvars[0].aval.shape:
                return None
            used.add(i)
            layers[-1][1], layers[-1][3] = i, op.outs[0]
            values = {op.outs[0]}
        elif (len(ids) == 1 and ids[0] in values and _reshapes(op, ids[0])) or (
                all(a in values or a in const for a in ids)
                and _elementwise(op, tuple(p for p, a in enumerate(op.ins) if not isinstance(a, Lit) and a in values))):
            ops.append(op)
            values.add(op.outs[0])
        else:
            return None
    if not layers or len(used) != n_leaves or len(program.outputs) != 1 or program.outputs[0] not in values:
        return None
    layers[-1][4] = (ops, program.outputs[0])
    chain = []
    for i, b, transposed, base, (region, last), shape in layers:
        act = None
        if any(not _reshapes(op, op.ins[0]) for op in region):  # more than a reshape: an activation
            sub = Program(tuple(const_ops) + tuple(region), (base,), (last,), program.consts)
            curved = any(_curved(op, tuple(p for p, a in enumerate(op.ins) if not isinstance(a, Lit)
                                           and a not in const)) for op in region)
            act = (sub, shape, not curved)
        chain.append(ChainLayer(i, b, transposed, act))
    return tuple(chain)


def activation_fn(activation):
    """The elementwise function ``φ`` of a layer's activation, for pre-activations of shape (n, width)."""
    sub, shape, _ = activation

    def phi(z):
        return jax.vmap(lambda row: run(sub, [row.reshape(shape)])[0][0].reshape(-1))(z)

    return phi
