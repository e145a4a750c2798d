r"""A jaxpr as a flat program, and an interpreter for it: what the JAX rules that read a function's
operations share (:mod:`._jax_curvature`, :mod:`._jax_pooling`).

:func:`flatten` inlines calls (``jit``, ``closed_call``, ``remat``) into one list of operations over
integer value ids; :func:`run` evaluates it, optionally perturbing operations' results, standing in
values for others, or applying some operations another way.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import jax

__all__ = ["Program", "bind", "body", "flatten", "run", "trace"]

_INLINE = frozenset({"jit", "pjit", "closed_call", "core_call", "remat", "checkpoint"})


class Lit(NamedTuple):
    """A literal operand."""

    val: Any


class Op(NamedTuple):
    eqn: Any
    ins: tuple  # value ids (int) or Lit
    outs: tuple


class Program(NamedTuple):
    """A jaxpr with its calls inlined: operations over integer value ids."""

    ops: tuple
    inputs: tuple
    outputs: tuple
    consts: dict


def body(eqn):
    """(jaxpr, consts) of an inlinable call's body, or None."""
    if eqn.primitive.name not in _INLINE:
        return None
    for key in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None:
            return (sub.jaxpr, sub.consts) if hasattr(sub, "jaxpr") else (sub, ())
    return None


def bind(eqn, values) -> list:
    """Apply one jaxpr equation to ``values``: its results, as a list."""
    bound = eqn.primitive.get_bind_params(eqn.params)  # (subfuns, params) before JAX 0.10, params since
    subfuns, params = bound if isinstance(bound, tuple) else ((), bound)
    with eqn.ctx.manager:
        outs = eqn.primitive.bind(*subfuns, *values, **params)
    return outs if eqn.primitive.multiple_results else [outs]


def flatten(closed) -> Program:
    """A closed jaxpr with ``jit`` and similar calls inlined; inputs are its invars."""
    ops, consts, ids = [], {}, itertools.count()

    def scope(jaxpr, const_values, arg_ids):
        env = {}

        def ref(v):
            return Lit(v.val) if type(v).__name__ == "Literal" else env[v]

        for v, c in zip(jaxpr.constvars, const_values):
            env[v] = next(ids)
            consts[env[v]] = c
        env.update(zip(jaxpr.invars, arg_ids))
        for eqn in jaxpr.eqns:
            ins = tuple(ref(v) for v in eqn.invars)
            inner = body(eqn)
            if inner is not None and len(inner[0].invars) == len(ins):
                outs = scope(inner[0], inner[1], ins)
            else:
                outs = tuple(next(ids) for _ in eqn.outvars)
                ops.append(Op(eqn, ins, outs))
            env.update(zip(eqn.outvars, outs))
        return tuple(ref(v) for v in jaxpr.outvars)

    inputs = tuple(next(ids) for _ in closed.jaxpr.invars)
    outputs = scope(closed.jaxpr, closed.consts, inputs)
    return Program(tuple(ops), inputs, outputs, consts)


def trace(fn, *args) -> Program:
    """``fn(*args)``'s program (:func:`flatten`); inputs are ``args``'s leaves."""
    return flatten(jax.make_jaxpr(fn)(*args))


def run(program: Program, args, *, perturb=None, replace=None, keep=(), apply=bind):
    """The outputs, and the values ``keep``; ``perturb`` {op index: array} is added to those operations' results,
    ``replace`` {value id: array} stands for those values, ``apply(eqn, values)`` computes each operation."""
    env = dict(program.consts)
    env.update(zip(program.inputs, args))
    env.update(replace or {})

    def value(a):
        return a.val if isinstance(a, Lit) else env[a]

    for j, op in enumerate(program.ops):
        outs = apply(op.eqn, [value(a) for a in op.ins])
        if perturb is not None and j in perturb:
            outs = [outs[0] + perturb[j]]
        env.update(zip(op.outs, outs))
        if replace:
            env.update((o, replace[o]) for o in op.outs if o in replace)
    return [value(a) for a in program.outputs], [value(a) for a in keep]
