r"""Hessian diagonals of any JAX function from first-order quantities, operation by operation (docs/math.md §14).

Along a coordinate θ_i, every value ``y`` of the program moves with a tangent ``ẏ = ∂y/∂θ_i``,
and the chain rule for second derivatives splits ``w_c = ∂²h_c/∂θ_i²`` over the operations:

.. math::

    w_c(θ_i) = \sum_m \big\langle λ_m[c],\ Q_m \big\rangle, \qquad
    λ_m = \frac{∂h_c}{∂y_m}, \qquad Q_m = \frac{d^2}{dt^2}\, {\rm op}_m(u_m + t\,\dot u_m)\Big|_{t=0},

over the operations ``m`` curved in the inputs ``u_m`` that move with θ_i.  Everything linear
(sums, reshapes, pooling, convolutions, products with one moving factor) has ``Q = 0``, and
which operations are curved is read off the jaxpr as in :mod:`._jax_linearity`.  ``λ`` are C
vector-Jacobian products per input for all operations at once (their outputs perturbed), as
in first order.  Then per operation:

* **elementwise regions**: a value computed elementwise from one value ``u`` (``tanh``,
  ``logistic``, ``jax.nn.gelu``'s ``x·tanh(…x³…)``, ``silu``'s ``x·σ(x)``, a custom-jvp
  ``softplus``, a scale between a layer and its activation) has input tangents ``a ⊙ u̇``, so
  ``Q = q ⊙ u̇²`` with ``q`` computed once per input, and the region's terms are the engine's
  curvature rule ``Σ_q K_u[c, q] u̇[q]²``.
* a region whose ``u`` is **the output of the parameter's own convolution or dense layer**
  (``tanh(conv(x, W) + b)``, the input x not moving with W): ``u̇`` along each weight is the
  weight's input patch, so the term is :func:`.rules.curvature.conv_direct` (the patches of
  :mod:`.rules.conv`) or ``Σ K[c, …, a] x[…, b]²`` — one matrix product for the whole group, no
  pass per coordinate.
* a region whose ``u`` is **the parameter copied** (a bias broadcast to a layer's output): ``u̇`` is 1
  at its copies and 0 elsewhere, so the term is the copying's transpose applied to ``K_u`` — again no
  pass per coordinate.
* anything else (a product of two moving factors, a softmax's normalisation, a control-flow
  body): ``Q`` by forward over forward of that operation alone, along its inputs' tangents.

``u̇`` for the operations not read directly is one forward-mode pass per coordinate, up to
those operations.  A group whose curved operations are all read directly costs no pass per
coordinate at all, so it is exact at any size.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from ._jax_linearity import _body, _inexact, _kind, _walk
from ._jax_program import Lit as _Lit
from ._jax_program import Op as _Op
from ._jax_program import Program, bind, run
from .rules import conv, curvature
from .rules.linearity import EMPTY, propagate

__all__ = ["channel_local", "channel_via", "first_order_layer", "forward_blocked", "group_hessian", "group_plan",
           "jacobian", "passes", "per_neuron", "plan_size", "value_sizes"]

_ELEMENTWISE = frozenset({
    "tanh", "logistic", "exp", "exp2", "log", "log1p", "expm1", "sin", "cos", "tan", "asin", "acos", "atan", "sinh",
    "cosh", "asinh", "acosh", "atanh", "erf", "erfc", "erf_inv", "lgamma", "digamma", "sqrt", "rsqrt", "cbrt",
    "integer_pow", "pow", "square", "atan2", "div", "mul", "add", "sub", "neg", "max", "min", "abs", "sign",
    "select_n", "convert_element_type", "copy", "copy_p", "ne", "eq", "gt", "ge", "lt", "le", "and", "or", "not",
    "is_finite", "stop_gradient", "clamp", "floor", "ceil", "round", "nextafter", "logaddexp",
})


def jacobian(program: Program, args, positions, eye, chunk: int | None = None):
    """Per parameter ``args[i]``, i in ``positions``, its Jacobian rows ``cᵀ ∂h/∂θ`` for the rows c of ``eye``
    (C, *shape).  A parameter used once, in a layer (:func:`first_order_layer`), takes ``∂h/∂z`` of the layer's
    output z and the layer's input (:func:`.rules.conv.weight_sums`); the others their vector-Jacobian product.
    One vjp serves all: per-input gradients of a convolution's kernel are slow to vectorise, ∂h/∂z is not.
    The rows are taken ``chunk`` at a time (:func:`by_rows`), so that only that many ``∂h/∂z`` are held."""
    layers = {i: first_order_layer(program, i) for i in positions}
    by_vjp = [i for i in positions if layers[i] is None]
    by_layer = [i for i in positions if layers[i] is not None]
    inputs = [program.ops[layers[i]].ins[0] for i in by_layer]

    def h(sel, eps):
        full = list(args)
        for i, v in zip(by_vjp, sel):
            full[i] = v
        out, kept = run(program, full, perturb={layers[i]: e for i, e in zip(by_layer, eps)}, keep=inputs)
        return out[0].reshape(-1), kept

    outs = [program.ops[layers[i]].eqn.outvars[0].aval for i in by_layer]
    zeros = [jnp.zeros(a.shape, dtype=a.dtype) for a in outs]
    _, pull, kept = jax.vjp(h, [args[i] for i in by_vjp], zeros, has_aux=True)

    def of(E):
        rows_vjp, rows_z = jax.vmap(pull)(E)
        rows = dict(zip(by_vjp, rows_vjp))
        for i, G, x in zip(by_layer, rows_z, kept):
            rows[i] = _layer_sums(program.ops[layers[i]], G, x, squared=False).reshape(E.shape[0], *args[i].shape)
        return [rows[i] for i in positions]

    return by_rows(of, eye, chunk)


def by_rows(f, eye, chunk: int | None):
    """``f(eye)`` — arrays whose first axis follows the rows of ``eye`` — computed ``chunk`` rows at a time (one at a
    time through ``jax.lax.map``, the last piece filled up with zero rows), or at once for ``chunk=None`` or no more
    rows than that."""
    C = eye.shape[0]
    if chunk is None or C <= chunk:
        return f(eye)
    pieces = -(-C // chunk)
    E = jnp.concatenate([eye, jnp.zeros((pieces * chunk - C, *eye.shape[1:]), dtype=eye.dtype)])
    out = jax.lax.map(f, E.reshape(pieces, chunk, *eye.shape[1:]))
    return jax.tree_util.tree_map(lambda a: a.reshape(pieces * chunk, *a.shape[2:])[:C], out)


# -- which operations are curved in one input, and how each is read --------------------------------------------
class _Node(NamedTuple):
    op: int
    moving: tuple  # positions of the inputs that move with the parameter
    base: Any  # elementwise in one value u (its inputs elementwise functions of u): u's id, so Q = q(u) ⊙ u̇²
    direct: Any  # the base is the parameter's conv/dense layer's output (plus terms that do not move): (kind, op)


def _elementwise_body(jaxpr) -> bool:
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name in _ELEMENTWISE:
            continue
        if name == "broadcast_in_dim" and not eqn.invars[0].aval.shape:
            continue
        inner = _body(eqn)
        if inner is not None and _elementwise_body(inner):
            continue
        return False
    return True


def _curved(op: _Op, moving) -> bool:
    """Whether the operation's result is curved in its moving inputs (the rule of :mod:`.rules.linearity`)."""
    eqn = op.eqn
    inputs = [(frozenset({0}) if p in moving else EMPTY, EMPTY) for p in range(len(op.ins))]
    body = _body(eqn)
    if body is not None:
        return any(n for _, n in _walk(body, inputs))
    return bool(propagate(_kind(eqn.primitive.name), inputs)[1])


#: Operations that copy their one input's elements (each result element one input element, as it is): along a
#: coordinate of the parameter, the tangents of their results are 1 at its copies and 0 elsewhere.
_COPIES = frozenset({"broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose"})


def _copies(program, producer, value_id, leaf_id):
    """The op indices, in order, of a chain of copying operations (:data:`_COPIES`) from the parameter to
    ``value_id`` (a bias broadcast over a layer's output; none for the parameter itself), or None."""
    chain = []
    while value_id != leaf_id:
        j = producer.get(value_id)
        if j is None:
            return None
        op = program.ops[j]
        ins = [a for a in op.ins if not isinstance(a, _Lit)]
        if op.eqn.primitive.name not in _COPIES or len(ins) != 1 or len(op.outs) != 1:
            return None
        chain.append(j)
        value_id = ins[0]
    return tuple(reversed(chain))


def _layer(program, producer, value_id, leaf_id, moving_ids):
    """("conv_general_dilated"|"dot_general", op) when ``value_id`` is the output of a convolution or dense product of
    the parameter itself with an input that does not move; ("copies", ops) when it is the parameter copied
    (:func:`_copies`: a bias, which the elementwise region adds to a layer's output); else None."""
    copies = _copies(program, producer, value_id, leaf_id)
    if copies is not None:
        return ("copies", copies)
    j = producer.get(value_id)
    if j is None:
        return None
    op = program.ops[j]
    name = op.eqn.primitive.name
    if name not in ("conv_general_dilated", "dot_general"):
        return None
    lhs, rhs = op.ins[:2]
    if rhs != leaf_id or isinstance(lhs, _Lit) or lhs in moving_ids:
        return None
    return (name, j) if _layer_op(op) else None


def _layer_op(op: _Op) -> bool:
    """A convolution the engine's rule takes (no input dilation or batch groups, padding ≥ 0), or a dense product
    ``x @ W`` (x's last axis against W's first, W two-dimensional)."""
    p, name = op.eqn.params, op.eqn.primitive.name
    if name == "conv_general_dilated":
        pads = [x for pair in p["padding"] for x in pair]
        return all(d == 1 for d in p["lhs_dilation"]) and p["batch_group_count"] == 1 and min(pads) >= 0
    if name == "dot_general":
        (lc, rc), (lb, rb) = p["dimension_numbers"]
        return (tuple(lc) == (op.eqn.invars[0].aval.ndim - 1,) and tuple(rc) == (0,) and not lb and not rb
                and op.eqn.invars[1].aval.ndim == 2)
    return False


def _elementwise(op: _Op, moving) -> bool:
    """One result, of the shape of every moving input, each element a function of the same elements of them."""
    eqn = op.eqn
    if len(op.outs) != 1 or any(eqn.invars[p].aval.shape != eqn.outvars[0].aval.shape for p in moving):
        return False
    inner = _body(eqn)
    return eqn.primitive.name in _ELEMENTWISE or (inner is not None and _elementwise_body(inner))


def group_plan(program: Program, leaf_position: int):
    """The curved operations along the parameter ``program.inputs[leaf_position]``, as :class:`_Node`; None
    where one has several results (the column rule then)."""
    leaf_id = program.inputs[leaf_position]
    base, producer, nodes = {leaf_id: leaf_id}, {}, []  # every moving value: the value it is elementwise in
    for j, op in enumerate(program.ops):
        for o in op.outs:
            producer[o] = j
        moving = tuple(p for p, a in enumerate(op.ins) if not isinstance(a, _Lit) and a in base)
        if not moving or _kind(op.eqn.primitive.name) == "constant":
            continue
        bases = {base[op.ins[p]] for p in moving}
        common = bases.pop() if len(bases) == 1 and _elementwise(op, moving) else None
        for o, v in zip(op.outs, op.eqn.outvars):
            if _inexact(v):
                base[o] = o if common is None else common
        if not _curved(op, moving):
            continue
        if len(op.outs) != 1:
            return None
        direct = None if common is None else _layer(program, producer, common, leaf_id, set(base))
        nodes.append(_Node(j, moving, common, direct))
    return tuple(nodes)


def value_sizes(program: Program) -> tuple:
    """``(S, M)``: the numbers of every operation's inexact results in one pass over the program (the residuals a
    vector-Jacobian product keeps), and of the largest one (a pass's cotangents or tangents live a few at a time)."""
    sizes = [math.prod(v.aval.shape) for op in program.ops for v in op.eqn.outvars if _inexact(v)]
    return sum(sizes), max(sizes, default=0)


def plan_size(program: Program, nodes) -> int:
    """Numbers of the results of a plan's curved operations: :func:`group_hessian` holds C cotangents ``λ`` of each,
    and at most as many factors ``K`` of their bases."""
    return sum(math.prod(program.ops[n.op].eqn.outvars[0].aval.shape) for n in nodes)


def passes(nodes) -> int:
    """1 where the plan needs a forward pass per coordinate (an operation not read directly), else 0."""
    return int(any(n.base is None or not n.direct for n in nodes))


def _moving(program: Program, leaf_position: int):
    """The operations that take a value moving with the parameter (in order), and every such value."""
    moving, ops = {program.inputs[leaf_position]}, []
    for op in program.ops:
        if any(not isinstance(a, _Lit) and a in moving for a in op.ins):
            ops.append(op)
            moving.update(op.outs)
    return ops, moving


def forward_blocked(program: Program, leaf_position: int) -> bool:
    """Whether a ``custom_vjp`` function lies between the parameter and the outputs: forward mode cannot pass it, so
    no second order along the parameter (reverse mode, the first order, can)."""
    return any(op.eqn.primitive.name.startswith("custom_vjp") for op in _moving(program, leaf_position)[0])


def per_neuron(program: Program, leaf_position: int):
    """The op index of the dense product ``x @ W`` that is W's only use, when x is one row (an MLP's layer on one
    input): then the tangents along ``W[a, b]`` are ``x_b`` times those along the output ``z[a]``, and a pass per
    output neuron serves all its weights.  Else None."""
    j = first_order_layer(program, leaf_position)
    if j is None or program.ops[j].eqn.primitive.name != "dot_general":
        return None
    return j if math.prod(program.ops[j].eqn.invars[0].aval.shape[:-1]) == 1 else None


# -- the terms ------------------------------------------------------------------------------------------------
def _second(g, primals, tangents):
    """d²/dt² g(primals + t·tangents) at t = 0."""
    return jax.jvp(lambda *p: jax.jvp(g, p, tangents)[1], primals, tangents)[1]


def _op_fn(op: _Op, values, moving):
    """The operation as a function of its moving inputs, the others held at ``values``."""
    def g(*moved):
        args = list(values)
        for p, m in zip(moving, moved):
            args[p] = m
        return bind(op.eqn, args)[0]
    return g


def _conv_geometry(op: _Op, x):
    """The engine's geometry (:class:`.rules.conv.ConvSpec`) of a ``conv_general_dilated``, and its input's patches
    (N, I·K, P) from ``x`` (its input, in the op's layout)."""
    p, eqn = op.eqn.params, op.eqn
    lhs_spec, rhs_spec, out_spec = p["dimension_numbers"]
    lhs_shape, rhs_shape, out_shape = eqn.invars[0].aval.shape, eqn.invars[1].aval.shape, eqn.outvars[0].aval.shape
    spec = conv.ConvSpec(in_channels=lhs_shape[lhs_spec[1]], out_channels=rhs_shape[rhs_spec[0]],
                         groups=p["feature_group_count"], kernel=tuple(rhs_shape[d] for d in rhs_spec[2:]),
                         stride=tuple(p["window_strides"]), padding=tuple(tuple(pair) for pair in p["padding"]),
                         dilation=tuple(p["rhs_dilation"]), in_spatial=tuple(lhs_shape[d] for d in lhs_spec[2:]),
                         out_spatial=tuple(out_shape[d] for d in out_spec[2:]))
    return spec, conv.patches(jnp.transpose(x, lhs_spec), spec, jnp.asarray(conv.patch_index(spec)))


def _layer_sums(op: _Op, D, x, *, squared: bool):
    """``Σ_q D[c, q] · v[q]`` (``squared``: ``v[q]²``) for every weight of the layer's parameter, ``v`` its tangent of
    the layer's output (the weight's input patch, or input): D (C, *output shape), x the layer's input → (C, size)
    in the parameter's layout.  Convolution: :func:`.rules.conv.weight_sums`; dense ``x @ W``: ``Σ D[c, …, a]
    x[…, b]``."""
    C = D.shape[0]
    if op.eqn.primitive.name == "dot_general":
        rows = x * x if squared else x
        return jnp.einsum("cra,rb->cba", D.reshape(C, -1, D.shape[-1]), rows.reshape(-1, x.shape[-1])).reshape(C, -1)
    spec, unf = _conv_geometry(op, x)
    _, rhs_spec, out_spec = op.eqn.params["dimension_numbers"]
    # (N, C, O, *out): N the convolution's own batch (1, or more where the function folds an input into several)
    Dt = jnp.swapaxes(jnp.transpose(D, (0, *(1 + d for d in out_spec))), 0, 1)
    sums = curvature.conv_direct(Dt, unf, spec) if squared else conv.weight_sums(Dt, unf, spec)
    w = jnp.sum(sums, axis=0)  # the kernel is shared by the batch: (C, weights) in (O, I/g, *kernel)
    w = w.reshape(C, spec.out_channels, spec.in_channels // spec.groups, *spec.kernel)
    order = np.argsort(rhs_spec)  # the parameter's axis a holds the (O, I, *kernel) axis rhs_spec.index(a)
    return jnp.transpose(w, (0, *(1 + int(o) for o in order))).reshape(C, -1)


def _copied_sums(program: Program, chain, D, leaf):
    """``Σ_q D[c, q] u̇[q]²`` for every coordinate of a parameter copied to the shape of D's rows by the operations
    ``chain`` (:func:`_copies`), where u̇ is 1 at its copies and 0 elsewhere: the transpose of the copying applied to
    each row of D (r, *shape) → (r, size)."""
    def copy(p):
        for j in chain:
            op = program.ops[j]
            p = bind(op.eqn, [a.val if isinstance(a, _Lit) else p for a in op.ins])[0]
        return p

    _, pull = jax.vjp(copy, leaf)
    return jax.vmap(lambda d: pull(d)[0])(D).reshape(D.shape[0], -1)


def channel_via(program: Program, leaf_position: int, nodes):
    """``(j0, j1)`` where the parameter is the kernel of convolution j0 and every curved operation not read directly
    is elementwise in the output of one later convolution j1 — whose input moves with the parameter, whose kernel
    does not, with one group and one image — so that §13's channel-by-channel path may serve (whether the tangents
    stay in their channels up to j1 is checked on values, :func:`channel_local`).  Else None."""
    j0 = first_order_layer(program, leaf_position)
    if not nodes or j0 is None or program.ops[j0].eqn.primitive.name != "conv_general_dilated":
        return None
    rest = {n.base for n in nodes if not n.direct}
    if len(rest) != 1 or None in rest:
        return None
    (base,) = rest
    j1 = next((j for j, op in enumerate(program.ops) if base in op.outs), None)
    if j1 is None or j1 <= j0:
        return None
    op0, op1 = program.ops[j0], program.ops[j1]
    if op1.eqn.primitive.name != "conv_general_dilated" or not _layer_op(op1) \
            or any(isinstance(a, _Lit) for a in op1.ins[:2]):
        return None
    p0, p1 = op0.eqn.params, op1.eqn.params
    out0, lhs1 = op0.eqn.outvars[0].aval.shape, op1.eqn.invars[0].aval.shape
    if p1["feature_group_count"] != 1 or lhs1[p1["dimension_numbers"][0][0]] != 1 \
            or out0[p0["dimension_numbers"][2][0]] != 1:
        return None
    if out0[p0["dimension_numbers"][2][1]] != lhs1[p1["dimension_numbers"][0][1]]:
        return None
    moving = _moving(program, leaf_position)[1]
    return (j0, j1) if op1.ins[0] in moving and op1.ins[1] not in moving else None


def _to_input(program: Program, args, via):
    """``e ↦`` the tangent of convolution j1's input along ``e`` added to convolution j0's output (``via`` = (j0,
    j1)): one forward-mode pass of the program."""
    j0, j1 = via
    out0 = program.ops[j0].eqn.outvars[0].aval
    zero = jnp.zeros(out0.shape, dtype=out0.dtype)
    lhs = program.ops[j1].ins[0]
    return lambda e: jax.jvp(lambda d: run(program, args, perturb={j0: d}, keep=[lhs])[1][0], (zero,), (e,))[1]


def channel_local(program: Program, args, via) -> bool:
    """Whether a tangent of convolution j0's output that lives in one output channel reaches convolution j1's input
    in that channel alone, checked along random tangents on sets of channels at ``args``
    (:func:`.rules.conv.channel_sets`; ``via`` = (j0, j1))."""
    j0, j1 = via
    op0, op1 = program.ops[j0], program.ops[j1]
    out0 = op0.eqn.outvars[0].aval
    axis0, axis1 = op0.eqn.params["dimension_numbers"][2][1], op1.eqn.params["dimension_numbers"][0][1]
    O = out0.shape[axis0]
    eye = jnp.asarray(conv.channel_sets(O), dtype=out0.dtype)  # (s, O): 2 log2 O tangents, not O
    E = jax.random.normal(jax.random.PRNGKey(1), (eye.shape[0], *out0.shape), dtype=out0.dtype)
    mask = jnp.moveaxis(eye.reshape(*eye.shape, *([1] * (out0.ndim - 1))), 1, 1 + axis0)
    U = jax.vmap(_to_input(program, args, via))(E * mask)  # (s, *j1's input)
    off = jnp.moveaxis((1 - eye).reshape(*eye.shape, *([1] * (U.ndim - 2))), 1, 1 + axis1)
    return bool(jnp.all(U * off == 0)) and bool(jnp.any(U != 0))


def _channel_terms(program: Program, via, args, values, K, chunk: int):
    """``Σ_q K[c, q] u̇[q]²`` (r, size) for every kernel coordinate of convolution j0, ``u̇`` its tangent of
    convolution j1's output, by §13's channel-by-channel path: one tangent per row of j0's patches, every output
    channel at once, forward to j1's input (``chunk`` rows at a time), then through j1 channel by channel
    (:func:`.rules.conv.channel_outputs`).  ``K`` (r, *j1's output) summed over the activations that read it."""
    j0, j1 = via
    op0, op1 = program.ops[j0], program.ops[j1]
    spec0, unf = _conv_geometry(op0, values[op0.ins[0]])  # unf (1, I·K, P)
    spec1, _ = _conv_geometry(op1, values[op1.ins[0]])
    lhs1, rhs1, out1 = op1.eqn.params["dimension_numbers"]
    _, rhs0, out0 = op0.eqn.params["dimension_numbers"]
    O, P = spec0.out_channels, spec0.positions
    _, rows = conv.weight_layout(spec0)
    J = spec0.weight_size // O
    B = unf[0][jnp.asarray(rows)].reshape(O, J, P).transpose(1, 0, 2)  # (J, O, P): row (o, j) in channel o
    # channel-first (1, O, *spatial) → the op's own layout
    to_op = np.argsort(out0)
    B = jnp.transpose(B.reshape(J, 1, O, *spec0.out_spatial), (0, *(1 + int(a) for a in to_op)))
    k = min(chunk, J)
    pieces = -(-J // k)
    Bp = jnp.concatenate([B, jnp.zeros((pieces * k - J, *B.shape[1:]), dtype=B.dtype)])
    U = jax.lax.map(jax.vmap(_to_input(program, args, via)), Bp.reshape(pieces, k, *B.shape[1:]))
    U = U.reshape(pieces * k, *U.shape[2:])[:J]
    U = jnp.transpose(U, (0, *(1 + d for d in lhs1)))[:, 0]  # (J, I1 = O, *spatial) channel first
    W1 = jnp.transpose(values[op1.ins[1]], rhs1)  # (O1, I1, *kernel)
    T = conv.channel_outputs(U, W1, spec1)  # (O, O1, J, P1)
    r = K.shape[0]
    Kc = jnp.transpose(K, (0, *(1 + d for d in out1)))[:, 0].reshape(r, spec1.out_channels, -1)  # (r, O1, P1)
    w = jnp.einsum("cqp,oqjp->coj", Kc, T * T)  # (r, O, J): the weight (o, j) in the layout (O, I/g, *kernel)
    w = w.reshape(r, O, spec0.in_channels // spec0.groups, *spec0.kernel)
    order = np.argsort(rhs0)
    return jnp.transpose(w, (0, *(1 + int(o) for o in order))).reshape(r, -1)


def first_order_layer(program: Program, leaf_position: int):
    """The op index of the convolution or dense product ``x @ W`` that is the parameter's only use (its Jacobian rows
    then come from ``∂h/∂z`` of that layer's output and the layer's input), or None."""
    leaf_id = program.inputs[leaf_position]
    uses = [(j, p) for j, op in enumerate(program.ops) for p, a in enumerate(op.ins) if a == leaf_id]
    if len(uses) != 1 or uses[0][1] != 1:
        return None
    j = uses[0][0]
    return j if _layer_op(program.ops[j]) else None


def group_hessian(program: Program, nodes, args, leaf_position: int, *, chunk: int, via=None):
    """``w`` (C, size) of one input along every coordinate of the parameter ``args[leaf_position]``.  The outputs are
    taken ``chunk`` at a time (:func:`by_rows`): the cotangents ``λ`` and factors ``K`` of C outputs can outgrow
    everything else (a sequence model's T·C outputs, each with a cotangent of every curved value).  ``via``: the
    convolutions (j0, j1) of :func:`channel_via`, checked by :func:`channel_local`, whose channel-by-channel path
    gives the terms not read directly, instead of a pass per coordinate."""
    leaf = args[leaf_position]
    size = math.prod(leaf.shape)
    neuron = per_neuron(program, leaf_position)
    keep = sorted({a for n in nodes for a in program.ops[n.op].ins if not isinstance(a, _Lit)}
                  | {program.ops[n.direct[1]].ins[0] for n in nodes if n.direct and n.direct[0] != "copies"}
                  | ({program.ops[neuron].ins[0]} if neuron is not None else set())
                  | {n.base for n in nodes if n.base is not None}
                  | ({program.ops[via[0]].ins[0], *program.ops[via[1]].ins[:2]} if via is not None else set()))

    def perturbed(eps):
        h, kept = run(program, args, perturb={n.op: e for n, e in zip(nodes, eps)}, keep=keep)
        return h[0].reshape(-1), kept

    zeros = [jnp.zeros(program.ops[n.op].eqn.outvars[0].aval.shape, dtype=leaf.dtype) for n in nodes]
    h, pull, kept = jax.vjp(perturbed, zeros, has_aux=True)
    values = dict(zip(keep, kept))
    C = h.shape[0]
    # q_m of each elementwise node along u̇ = 1 of its base u: K_u = Σ λ_m ⊙ q_m
    by_base = {}
    for n in nodes:
        if n.base is not None:
            by_base.setdefault(n.base, []).append(n)
    q = {}
    for b, members in by_base.items():
        ids = sorted({program.ops[n.op].ins[p] for n in members for p in n.moving})
        u = values[b]
        _, along_ones = jax.jvp(lambda ub, b=b, ids=ids: run(program, args, replace={b: ub}, keep=ids)[1], (u,),
                                (jnp.ones_like(u),))
        a = dict(zip(ids, along_ones))
        for n in members:
            op = program.ops[n.op]
            ins = [x.val if isinstance(x, _Lit) else values[x] for x in op.ins]
            q[n.op] = _second(_op_fn(op, ins, n.moving), tuple(ins[p] for p in n.moving),
                              tuple(a[op.ins[p]] for p in n.moving))
    layers = {}
    for n in nodes:
        if n.direct:
            layers.setdefault(n.direct, set()).add(n.base)
    passed = [n for n in nodes if n.base is None]
    bases = sorted({n.base for n in nodes if n.base is not None and not n.direct})
    tangent_ids = sorted({program.ops[n.op].ins[p] for n in passed for p in n.moving} | set(bases))
    general = [(n, [x.val if isinstance(x, _Lit) else values[x] for x in program.ops[n.op].ins]) for n in passed]
    if neuron is not None:  # tangents along z[a] of x @ W; W[a, b]'s are x_b times them, and Q is quadratic
        z = program.ops[neuron].eqn.outvars[0].aval
        zero = jnp.zeros(z.shape, dtype=z.dtype)

        def forward(e):
            return run(program, args, perturb={neuron: e}, keep=tangent_ids)[1]
    else:
        zero = leaf

        def forward(p):
            full = list(args)
            full[leaf_position] = p
            return run(program, full, keep=tangent_ids)[1]
    count = math.prod(zero.shape)

    def rows(E):
        """w (r, size) for the outputs E (r, C) picks."""
        r = E.shape[0]
        lam = dict(zip([n.op for n in nodes], jax.vmap(lambda c: pull(c)[0])(E)))  # per node (r, *shape)
        K = {}
        for b, members in by_base.items():
            for n in members:
                K[b] = K.get(b, 0) + lam[n.op] * q[n.op][None]
        w = jnp.zeros((r, size), dtype=leaf.dtype)
        for (kind, j), bs in layers.items():
            D = sum(K[b] for b in bs)
            if kind == "copies":  # u̇ is 1 at the parameter's copies, 0 elsewhere: the copying's transpose of D
                w = w + _copied_sums(program, j, D, leaf)
            else:
                op = program.ops[j]
                w = w + _layer_sums(op, D, values[op.ins[0]], squared=True)
        if not passed and not bases:
            return w
        if via is not None:  # the one base is the output of convolution j1
            return w + _channel_terms(program, via, args, values, K[bases[0]], chunk)

        def along(e):
            _, tangents = jax.jvp(forward, (zero,), (e.reshape(zero.shape),))
            t = dict(zip(tangent_ids, tangents))
            total = jnp.zeros((r,), dtype=leaf.dtype)
            for b in bases:
                total = total + jnp.einsum("c...,...->c", K[b], t[b] * t[b])
            for n, ins in general:
                op = program.ops[n.op]
                Q = _second(_op_fn(op, ins, n.moving), tuple(ins[p] for p in n.moving),
                            tuple(t[op.ins[p]] for p in n.moving))
                total = total + jnp.einsum("c...,...->c", lam[n.op], Q)
            return total

        k = min(chunk, count)
        starts = jnp.arange(0, count, k)
        blocks = jax.lax.map(lambda s: jax.vmap(along)(jax.nn.one_hot(s + jnp.arange(k), count, dtype=leaf.dtype)),
                             starts)
        per = blocks.reshape(-1, r)[:count].T  # (r, count)
        if neuron is None:
            return w + per
        x = values[program.ops[neuron].ins[0]].reshape(-1)  # the layer's one input row
        return w + (per[:, None, :] * (x * x)[None, :, None]).reshape(r, -1)

    return by_rows(rows, jnp.eye(C, dtype=h.dtype), chunk)
