r"""JAX adapter: walks a JAX model and hands the layer rules JAX's operations, compiled once per structure.

* :func:`from_mlp` — an MLP given as a parameter pytree: a list of ``(W, b)`` pairs
  with ``W`` of shape (out, in), or a list of ``{"kernel": (in, out), "bias": (out,)}``
  as Flax's ``Dense`` stores them — with an activation name.  The dense-chain rule
  (:mod:`fishercore.backends.rules.dense`, docs/math.md §8), with ``φ'`` and ``φ''`` of each
  activation from ``jax.jvp``.
* :func:`from_function` — any pure ``apply_fn(params, x) -> h`` of a parameter pytree:
  exact full columns by the column rule (:mod:`fishercore.backends.rules.columns`,
  docs/math.md §9), chunked.

Compilation: the rules are module-level functions jit-compiled with the model's
*structure* (activations, layout, ``apply_fn``, the pytree structure) as static
arguments and its arrays as ordinary ones, so a new model of the same structure,
dtype and shapes reuses the compiled code — models are compiled once per structure,
not once per instance.

Group names come from the pytree paths, keys joined by dots (``"0.0"``/``"0.1"`` for
``(W, b)`` pairs, ``"0.kernel"``/``"0.bias"`` for Flax layers), in the pytree's leaf
order; results are laid out in each parameter's own shape (a kernel comes back
(in, out)).  Nothing global is switched on import (``jax_enable_x64`` is the
caller's choice).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from array_api_compat import device

from fishercore._protocol import ColumnBlock, Derivatives, make_groups
from fishercore._validation import (
    check_input_dtype,
    check_input_shape,
    check_inputs,
    check_n_tokens,
    check_positive_int,
    check_positive_real,
    check_supported_dtype,
    second_order_within,
)

from . import _jax_chain as jax_chain
from . import _jax_curvature as curvature_rule
from . import _jax_program as jax_program
from ._jax_linearity import curved_leaves
from ._jax_pooling import exact_pooling, needs_exact_pooling
from .ops import namespace_ops
from .rules import columns, dense
from .rules.activations import ACTIVATIONS, PIECEWISE_LINEAR, Autodiff

__all__ = ["ACTIVATIONS", "JaxFunction", "JaxMLP", "analyze_sharded", "from_function", "from_mlp", "mlp_apply"]

DEFAULT_MAX_PARAMS = 20_000

OPS = namespace_ops(jnp)


@functools.cache
def _activation_fn(name, negative_slope, alpha):
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {name!r}; expected one of {list(ACTIVATIONS)}")
    return {
        "identity": lambda z: z,
        "relu": jax.nn.relu,
        "leaky_relu": functools.partial(jax.nn.leaky_relu, negative_slope=negative_slope),
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
        "softplus": jax.nn.softplus,
        "gelu": functools.partial(jax.nn.gelu, approximate=True),
        "elu": functools.partial(jax.nn.elu, alpha=alpha),
    }[name.lower()]


@functools.cache
def _activation(name, negative_slope, alpha) -> Autodiff:
    """The rule's activation for a name: ``jax.nn``'s function, differentiated by ``jax.jvp`` (one object per name)."""
    return Autodiff(_activation_fn(name, negative_slope, alpha), OPS, name.lower() in PIECEWISE_LINEAR)


@functools.cache
def mlp_apply(activation="tanh", *, negative_slope: float = 0.01, alpha: float = 1.0):
    """``apply(params, x)`` of an MLP given as ``(W, b)`` pairs (W: (out, in)), in plain ``jax.numpy``.

    A pure function for ``jax.grad``, ``jax.jit`` or :func:`from_function`; the same network as
    ``from_mlp(params, activation)``.  The same arguments give the same function (so compiled
    code is shared).
    """
    act = _activation_fn(activation, negative_slope, alpha)

    def apply(params, x):
        a = x
        for i, (W, b) in enumerate(params):
            z = a @ W.T + b
            a = act(z) if i < len(params) - 1 else z
        return a

    return apply


def _key_name(entry) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(entry, attr):
            return str(getattr(entry, attr))
    return str(entry)


def _named_leaves(params):
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [".".join(_key_name(k) for k in path) for path, _ in leaves_with_path]
    return names, [leaf for _, leaf in leaves_with_path], treedef


def _check_leaves(names, leaves, what):
    dtypes = set()
    for name, leaf in zip(names, leaves):
        if not isinstance(leaf, jax.Array):
            raise TypeError(f"{what}: leaf {name!r} is a {type(leaf).__name__}, expected a jax.Array")
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"{what}: leaf {name!r} has dtype {leaf.dtype}, expected real floating point")
        if not bool(jnp.all(jnp.isfinite(leaf))):
            raise ValueError(f"{what}: leaf {name!r} contains NaN or inf")
        dtypes.add(leaf.dtype)
    if not leaves:
        raise ValueError(f"{what}: has no parameters")
    if len(dtypes) != 1:
        raise TypeError(f"{what}: leaves must share one dtype, got {sorted(map(str, dtypes))}")
    dtype = dtypes.pop()
    check_supported_dtype(dtype, what)
    return dtype


class JaxMLP:
    """An MLP as a parameter pytree (use :func:`from_mlp`)."""

    def __init__(self, params: Sequence, activation="tanh", *, negative_slope: float = 0.01, alpha: float = 1.0):
        if not isinstance(params, (list, tuple, dict)) or not params:
            raise TypeError("params: expected a non-empty list of (W, b) pairs or of {'kernel', 'bias'} dicts")
        names, leaves, _ = _named_leaves(params)
        named = isinstance(params, dict)  # {layer name: {"kernel", "bias"}}, in layer order (from _mlp_layers)
        items = list(params.items()) if named else list(enumerate(params))
        self.dtype = _check_leaves(names, leaves, "params")
        self.device = device(leaves[0])
        self.params = params
        negative_slope = check_positive_real(negative_slope, "negative_slope") if negative_slope != 0 else 0.0
        alpha = check_positive_real(alpha, "alpha")
        Ws, bs, layout = [], [], []
        for j, (i, layer) in enumerate(items):
            where = f"params[{i!r}]"
            if isinstance(layer, dict):
                extra = set(layer) - {"kernel", "bias"}
                if "kernel" not in layer or extra:
                    raise ValueError(f"{where}: a dict layer needs 'kernel' (and optionally 'bias'), "
                                     f"got keys {sorted(layer)}")
                K, b = layer["kernel"], layer.get("bias")
                if K.ndim != 2:
                    raise ValueError(f"{where}: kernel must be (in, out), got shape {tuple(K.shape)}")
                W, transposed, wname, bname = K.T, True, f"{i}.kernel", f"{i}.bias"
            elif isinstance(layer, (list, tuple)) and len(layer) == 2 and not named:
                W, b = layer
                if W.ndim != 2:
                    raise ValueError(f"{where}: weight must be (out, in), got shape {tuple(W.shape)}")
                transposed, wname, bname = False, f"{i}.0", f"{i}.1"
            else:
                raise TypeError(f"{where}: expected a (W, b) pair or a {{'kernel', 'bias'}} dict")
            if b is not None and tuple(b.shape) != (W.shape[0],):
                raise ValueError(f"{where}: bias must have shape ({W.shape[0]},), got {tuple(b.shape)}")
            if Ws and W.shape[1] != Ws[-1].shape[0]:
                raise ValueError(f"{where}: expects {W.shape[1]} inputs but params[{items[j - 1][0]!r}] has "
                                 f"{Ws[-1].shape[0]} outputs")
            Ws.append(W)
            bs.append(b)
            layout.append((wname, bname if b is not None else None, transposed))
        n_hidden = len(Ws) - 1
        acts = [activation] * n_hidden if isinstance(activation, str) else list(activation)
        if len(acts) != n_hidden:
            raise ValueError(f"activation: expected one name or {n_hidden} names (one per hidden layer), "
                             f"got {len(acts)}")
        self.activations = tuple(_activation(a, float(negative_slope), float(alpha)) for a in acts) + (None,)
        self.Ws, self.bs, self.layout = tuple(Ws), tuple(bs), tuple(layout)
        self.groups = make_groups([(n, tuple(leaf.shape)) for n, leaf in zip(names, leaves)])
        self.n_inputs, self.n_outputs = int(Ws[0].shape[1]), int(Ws[-1].shape[0])

    def __repr__(self) -> str:
        widths = [self.n_inputs] + [int(W.shape[0]) for W in self.Ws]
        return f"JaxMLP({'-'.join(map(str, widths))}, {self.dtype})"

    def _forward(self, X, order):
        return OPS.jit(dense.forward, ("activations", "order"))(self.Ws, self.bs, X, activations=self.activations,
                                                                 order=order)

    # -- the protocol -----------------------------------------------------------
    def check_inputs(self, X):
        return check_inputs(X, xp=jnp, dtype=self.dtype, device=self.device, input_shape=(self.n_inputs,))

    def outputs(self, X):
        return self._forward(X, 0)[0]

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        derivs = OPS.jit(dense.derivatives, ("activations", "hessian"))
        h, inputs, jac, hess = derivs(self.Ws, self.bs, X, activations=self.activations, hessian=hessian)
        return Derivatives(h, dense.dense_blocks(self.layout, inputs, jac, hess))

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """``sᵀ ∂h/∂z_l`` (n, M, out) for every draw: the rule's backpropagation of the scores."""
        h, inputs, d1, _ = self._forward(X, 1)
        grads = OPS.jit(dense.backpropagate)(self.Ws, d1, jnp.swapaxes(cotangent_fn(h), 0, 1))[0]
        return Derivatives(h, dense.dense_blocks(self.layout, inputs, grads, [None] * len(grads)))

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input the compiled derivatives hold beyond the blocks (used to size batches)."""
        widths = [int(W.shape[0]) for W in self.Ws]
        curved = [act is not None and not act.piecewise_linear for act in self.activations]
        return dense.workspace(widths, curved, jnp.dtype(self.dtype).itemsize, hessian)


def from_mlp(params, activation="tanh", *, negative_slope: float = 0.01, alpha: float = 1.0) -> JaxMLP:
    """Adapt an MLP pytree: ``[(W, b), ...]`` (W: (out, in)) or ``[{"kernel": (in, out), "bias": (out,)}, ...]``,
    or Flax's own containers of such layers as they come:

    * a linen ``params`` dict, ``{"Dense_0": {"kernel", "bias"}, "Dense_1": ...}``, or the variables
      ``{"params": ...}`` that ``Module.init`` returns (layers named ``<name>_<i>`` in the order of i,
      others in the dict's order);
    * an NNX state, ``nnx.state(model, nnx.Param)`` (layers in attribute order).

    Groups are then named by the layers (``Dense_0.kernel``).  ``activation``: one name of
    :data:`ACTIVATIONS` for all hidden layers, or one per hidden layer (``"gelu"`` is the tanh
    form), or the ``jax.nn`` / ``jax.numpy`` function itself (``jax.nn.relu``, ``jnp.tanh``, ...).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, fishercore as fc
    >>> from fishercore.backends import jax as fc_jax
    >>> k1, k2, k3 = jax.random.split(jax.random.PRNGKey(0), 3)
    >>> params = [{"kernel": jax.random.normal(k1, (4, 8)), "bias": jnp.zeros(8)},
    ...           {"kernel": jax.random.normal(k2, (8, 3)), "bias": jnp.zeros(3)}]
    >>> res = fc.analyze(fc_jax.from_mlp(params, "tanh"), jax.random.normal(k3, (10, 4)))
    >>> [(g.name, g.shape) for g in res.groups]
    [('0.bias', (8,)), ('0.kernel', (4, 8)), ('1.bias', (3,)), ('1.kernel', (8, 3))]
    >>> res.unflatten(res.fisher)["0.kernel"].shape
    (4, 8)
    """
    return JaxMLP(_mlp_layers(params), _activation_names(activation), negative_slope=negative_slope, alpha=alpha)


def _mlp_layers(params):
    """A list of layers as given, or Flax's containers of named layers as ``{name: {"kernel", "bias"}}``, in layer
    order (an ordered plain dict, which JaxMLP names its groups by)."""
    if isinstance(params, (list, tuple)):
        return params
    if not hasattr(params, "items"):  # a dict, a linen FrozenDict or an nnx.State (whose leaves hold .value)
        raise TypeError(f"params: expected a list of (W, b) pairs or of {{'kernel', 'bias'}} dicts, a Flax params "
                        f"dict or an NNX state, got {type(params).__name__}")
    params = dict(params.items())
    if "params" in params:  # linen variables
        others = sorted(k for k, v in params.items() if k != "params" and v)
        if others:
            raise ValueError(f"params: the variables hold the collections {others} besides 'params'; an MLP has only "
                             "parameters (use from_function for a network with batch statistics)")
        params = dict(params["params"].items())
    layers = {}
    for n, layer in params.items():
        if not hasattr(layer, "items"):
            raise TypeError(f"params[{n!r}]: expected a layer {{'kernel', 'bias'}}, got {type(layer).__name__}")
        layers[str(n)] = {k: _array_of(v) for k, v in layer.items()}
    order = _chain_order(layers)
    return {n: layers[n] for n in order}


def _array_of(leaf):
    """An array leaf as it is; an NNX Variable's array (``get_value()``, or ``.value`` in older Flax)."""
    if isinstance(leaf, jax.Array):
        return leaf
    get = getattr(leaf, "get_value", None)
    return get() if callable(get) else getattr(leaf, "value", leaf)


def _chain_order(layers: dict) -> list:
    """The layers' order, read off their kernels' shapes (in, out): the dict's own order, or the numbered names'
    (``Dense_0``, ``Dense_1``, ... are numbered in construction order, which need not be the call order), or the one
    chain the shapes allow; a ValueError when the shapes leave it open."""
    def widths(n):
        K = layers[n].get("kernel")
        return tuple(K.shape) if K is not None and getattr(K, "ndim", 0) == 2 else (None, None)

    def chains(order):
        return all(widths(a)[1] == widths(b)[0] for a, b in zip(order, order[1:]))

    names = list(layers)
    candidates = [names]
    numbered = [re.fullmatch(r"(.*)_(\d+)", n) for n in names]
    if names and all(numbered):
        candidates.append(sorted(names, key=lambda n: int(n.rsplit("_", 1)[1])))
    for order in candidates:
        if chains(order):
            return order
    firsts = [n for n in names if not any(widths(o)[1] == widths(n)[0] for o in names if o != n)]
    if len(firsts) == 1:
        order, left = firsts, set(names) - set(firsts)
        while left:
            nxt = [o for o in left if widths(o)[0] == widths(order[-1])[1]]
            if len(nxt) != 1:
                break
            order.append(nxt[0])
            left.discard(nxt[0])
        if not left:
            return order
    raise ValueError(f"params: the layers {names} with kernels {[widths(n) for n in names]} do not form one chain "
                     "in any order their names or shapes tell; pass them as a list in layer order")


_NAMED_ACTIVATIONS = {jax.nn.relu: "relu", jax.nn.leaky_relu: "leaky_relu", jnp.tanh: "tanh", jax.nn.tanh: "tanh",
                      jax.nn.sigmoid: "sigmoid", jax.nn.softplus: "softplus", jax.nn.gelu: "gelu", jax.nn.elu: "elu"}


def _activation_names(activation):
    """Names for activations given as jax functions (``jax.nn.gelu`` is its default tanh form); names as they are."""
    def name(a):
        if isinstance(a, str):
            return a
        if callable(a) and a in _NAMED_ACTIVATIONS:
            return _NAMED_ACTIVATIONS[a]
        raise ValueError(f"activation: {getattr(a, '__name__', a)!r} is not one of the known functions "
                         f"({', '.join(sorted({f.__name__ for f in _NAMED_ACTIVATIONS}))}) or names "
                         f"{list(ACTIVATIONS)}; use from_function for any other")
    if isinstance(activation, (list, tuple)):
        return [name(a) for a in activation]
    return name(activation)


# -- any function: the column rule, compiled once per (apply_fn, pytree structure, shapes) ----
def _single(apply_fn, params, x):
    return apply_fn(params, x[None])[0]


def _program(apply_fn, treedef, leaves, x):
    """The flat program (:mod:`._jax_program`) of one input's flattened outputs as a function of the leaves and x;
    its inputs are the leaves, then x."""
    return jax_program.trace(lambda ls, x: _single(apply_fn, jax.tree_util.tree_unflatten(treedef, ls), x).reshape(-1),
                             list(leaves), x)


def _function_outputs(leaves, X, *, apply_fn, treedef):
    return apply_fn(jax.tree_util.tree_unflatten(treedef, leaves), X)


def _function_jacobian(leaves, X, eye, *, apply_fn, treedef, indices=None, interpret=True, chunk=None):
    """Per leaf (n, C, *shape): the Jacobian columns of the leaves ``indices`` (all for None), the others held; a leaf
    used once in a convolution or dense layer by that layer's ``∂h/∂z`` (``interpret``: the function's jaxpr could
    be traced, :func:`._jax_curvature.jacobian`, ``chunk`` outputs at a time), the others by vjp."""
    chosen = tuple(range(len(leaves))) if indices is None else indices

    if interpret:
        return OPS.vmap(lambda x: curvature_rule.jacobian(_program(apply_fn, treedef, leaves, x), [*leaves, x], chosen,
                                                          eye, chunk))(X)

    def f(sel, x):
        full = list(leaves)
        for i, leaf in zip(chosen, sel):
            full[i] = leaf
        return _single(apply_fn, jax.tree_util.tree_unflatten(treedef, full), x)

    return OPS.vmap(lambda x: columns.pullback(OPS, lambda sel: f(sel, x), [leaves[i] for i in chosen], eye))(X)


def _function_hessian(leaves, X, directions, *, apply_fn, treedef, index):
    def one(x):
        def f(p):
            return _single(apply_fn, jax.tree_util.tree_unflatten(treedef, leaves[:index] + [p] + leaves[index + 1:]),
                           x)

        return columns.diag_hessian(OPS, f, leaves[index], directions)

    return OPS.vmap(one)(X)  # (n, k, C)


def _function_curvature(leaves, X, *, apply_fn, treedef, index, chunk, via=None):
    """(n, C, size): the Hessian diagonals of leaf ``index`` operation by operation (:mod:`._jax_curvature`); ``via``:
    the two convolutions of its channel-by-channel path, where it was found to hold."""
    def one(x):
        program = _program(apply_fn, treedef, leaves, x)
        return curvature_rule.group_hessian(program, curvature_rule.group_plan(program, index), [*leaves, x], index,
                                            chunk=chunk, via=via)

    return OPS.vmap(one)(X)


def _function_pullback(leaves, X, s, *, apply_fn, treedef):
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    grads = OPS.vmap(lambda x, si: columns.pullback(OPS, lambda p: _single(apply_fn, p, x), params, si))(X, s)
    return jax.tree_util.tree_leaves(grads)  # per leaf (n, M, *shape)


def _pass_size(jaxpr) -> tuple:
    """``(S, M)`` of :func:`._jax_curvature.value_sizes` for a jaxpr whose calls are not inlined: its results and
    those of its calls' and control flow's bodies."""
    total, largest = 0, 0
    for eqn in jaxpr.eqns:
        for v in eqn.outvars:
            if hasattr(v.aval, "dtype") and jnp.issubdtype(v.aval.dtype, jnp.inexact):
                total, largest = total + math.prod(v.aval.shape), max(largest, math.prod(v.aval.shape))
        for sub in eqn.params.values():
            for j in sub if isinstance(sub, (tuple, list)) else (sub,):
                inner = getattr(j, "jaxpr", j)
                if hasattr(inner, "eqns"):
                    S, M = _pass_size(inner)
                    total, largest = total + S, max(largest, M)
    return total, largest


def _chain_arrays(chain, leaves):
    """``(weights (out, in), biases, activations)`` of a dense chain's layers (:func:`._jax_chain.dense_chain`), or
    three Nones where the shapes are not those of dense layers."""
    weights, biases, acts = [], [], []
    for layer in chain:
        W = leaves[layer.weight].T if layer.transposed else leaves[layer.weight]
        b = None if layer.bias is None else leaves[layer.bias]
        if (b is not None and tuple(b.shape) != (W.shape[0],)) or (weights and weights[-1].shape[0] != W.shape[1]):
            return None, None, None
        weights.append(W)
        biases.append(b)
        acts.append(None if layer.activation is None else
                    Autodiff(jax_chain.activation_fn(layer.activation), OPS, layer.activation[2]))
    return tuple(weights), tuple(biases), tuple(acts)


def _chain_layers(apply_fn, treedef, leaves, x):
    """The dense chain's arrays (:func:`_chain_arrays`), read off the function's program for one input x."""
    chain = jax_chain.dense_chain(_program(apply_fn, treedef, leaves, x), len(leaves))
    weights, biases, acts = (None, None, None) if chain is None else _chain_arrays(chain, leaves)
    if weights is None:
        raise ValueError("apply_fn: its program is no longer the dense chain it was when the model was built; its "
                         "structure must not depend on its inputs")
    return weights, biases, acts


def _chain_derivatives(leaves, X, *, apply_fn, treedef, hessian):
    """``(h, inputs, ∂h/∂z, diag ∂²h/∂z²)`` of a dense chain by the dense-chain rule (docs/math.md §8)."""
    weights, biases, acts = _chain_layers(apply_fn, treedef, leaves, X[0])
    return dense.derivatives(weights, biases, X.reshape(X.shape[0], -1), activations=acts, hessian=hessian)


def _chain_forward(leaves, X, *, apply_fn, treedef):
    """``(h, inputs, φ'(z), weights)`` of a dense chain's forward pass, what its backpropagation of scores needs."""
    weights, biases, acts = _chain_layers(apply_fn, treedef, leaves, X[0])
    h, inputs, d1, _ = dense.forward(weights, biases, X.reshape(X.shape[0], -1), activations=acts, order=1)
    return h, inputs, d1, weights


class _Flat:
    """``apply_fn`` with sequence outputs (n, T, C) flattened to (n, T·C), position-major; hashable like
    ``apply_fn`` (compiled code takes it as a static argument)."""

    def __init__(self, apply_fn):
        self.apply_fn = apply_fn

    def __call__(self, params, X):
        h = self.apply_fn(params, X)
        return h.reshape(h.shape[0], -1)

    def __eq__(self, other):
        return isinstance(other, _Flat) and other.apply_fn == self.apply_fn

    def __hash__(self):
        return hash((_Flat, self.apply_fn))


class JaxFunction:
    """Any pure ``apply_fn(params, x) -> h`` of a parameter pytree, with exact full columns."""

    def __init__(self, apply_fn: Callable, params, *, input_shape, max_params: int = DEFAULT_MAX_PARAMS,
                 chunk: int = 256, input_dtype=None, n_tokens=None):
        if not callable(apply_fn):
            raise TypeError(f"apply_fn: expected a callable apply_fn(params, x) -> h, got {type(apply_fn).__name__}")
        names, leaves, treedef = _named_leaves(params)
        self.dtype = _check_leaves(names, leaves, "params")
        self.device = device(leaves[0])
        self.apply_fn, self.params, self.leaves, self.treedef = apply_fn, params, leaves, treedef
        self.groups = make_groups([(n, tuple(leaf.shape)) for n, leaf in zip(names, leaves)])
        check_positive_int(max_params, "max_params")
        self.chunk = check_positive_int(chunk, "chunk")
        self.input_shape = check_input_shape(input_shape, required_by="from_function")
        input_dtype = check_input_dtype(input_dtype, jnp)
        self.input_dtype = None if input_dtype is None else np.dtype(input_dtype)  # comparable with X.dtype
        self.n_tokens = check_n_tokens(n_tokens, self.input_dtype, required=True)
        in_dtype = self.dtype if self.input_dtype is None else self.input_dtype
        try:
            h = jax.eval_shape(apply_fn, params, jax.ShapeDtypeStruct((1, *self.input_shape), in_dtype))
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"input_shape: apply_fn cannot run on one input of shape {self.input_shape} ({e})") from e
        if len(getattr(h, "shape", ())) not in (2, 3):
            raise ValueError("apply_fn: must return outputs of shape (n, C), or (n, T, C) for sequences, got "
                             f"{getattr(h, 'shape', type(h))}")
        #: (C,), or (T, C) for sequence outputs, which the core sees flattened (n, T·C)
        self.output_shape = tuple(int(d) for d in h.shape[1:])
        self.n_outputs = math.prod(self.output_shape)
        apply_fn = _Flat(apply_fn) if len(self.output_shape) == 2 else apply_fn
        self._static = {"apply_fn": apply_fn, "treedef": treedef}
        # forward over forward through JAX's max pooling is float32-exact only on GPUs: write the pooling out there
        self._hessian_static = {"apply_fn": exact_pooling(apply_fn) if needs_exact_pooling(self.device, self.dtype)
                                else apply_fn, "treedef": treedef}
        example = jnp.zeros((1, *self.input_shape), dtype=in_dtype)
        curved = curved_leaves(apply_fn, params, example)
        #: Groups the function is piecewise linear in (w = 0 exactly, any size): read off its jaxpr.
        self.linear_groups = tuple(g.name for i, g in enumerate(self.groups) if i not in curved)
        plans, neurons, blocked = self._plans(apply_fn, treedef, example[0], curved)
        #: Curved groups behind a custom_vjp function, which forward mode cannot pass: second order not computed.
        self.blocked_groups = tuple(g.name for i, g in enumerate(self.groups) if i in blocked)
        #: Curved groups with exact second order at any size (docs/math.md §14): their curved operations are all
        #: elementwise right after the group's own conv or dense layer (no pass per parameter), or the group is a
        #: dense W applied to one input row (a pass per output neuron, not per weight).
        #: A dense chain (:mod:`._jax_chain`) has all its groups by the dense-chain rule (docs/math.md §8).
        self.rule_groups = tuple(g.name for i, g in enumerate(self.groups) if i in curved and (
            self._chain is not None or (plans.get(i) is not None and i not in blocked
                                        and (i in neurons or i in self._via or curvature_rule.passes(plans[i]) == 0))))
        # operation by operation where it pays: no pass per parameter, or more parameters than outputs (its
        # C vector-Jacobian products cost about what forward over forward of the whole function costs for C of them)
        self._by_operation = frozenset(i for i, g in enumerate(self.groups) if plans.get(i) is not None and (
            g.name in self.rule_groups or g.size > self.n_outputs) and self._chain is None)
        self.second_order = second_order_within(
            [g for i, g in enumerate(self.groups) if i in curved and g.name not in self.rule_groups], max_params)

    def _plans(self, apply_fn, treedef, x, curved) -> dict:
        """Per curved leaf, its curved operations (:func:`._jax_curvature.group_plan`); the leaves that are a dense
        W applied to one row (:func:`._jax_curvature.per_neuron`), and those behind a custom_vjp function
        (:func:`._jax_curvature.forward_blocked`); none for a function whose jaxpr the interpreter cannot take
        (forward over forward of the whole function then)."""
        self._interpret, self._plan_sizes, self._layer_outputs, self._chain, self._via = False, {}, 0, None, {}
        try:
            program = _program(apply_fn, treedef, self.leaves, x)
            #: Numbers in one pass over the function for one input (and below, in the curved results of each plan,
            #: and in the outputs of the layers whose ∂h/∂z gives their parameter's first order)
            self._pass_size = curvature_rule.value_sizes(program)
            layers = {curvature_rule.first_order_layer(program, i) for i in range(len(self.leaves))} - {None}
            layer_outputs = sum(math.prod(program.ops[j].eqn.outvars[0].aval.shape) for j in layers)
            plans = {i: curvature_rule.group_plan(program, i) for i in curved}
            neurons = frozenset(i for i in curved if curvature_rule.per_neuron(program, i) is not None)
            blocked = frozenset(i for i in curved if curvature_rule.forward_blocked(program, i))
            chain = jax_chain.dense_chain(program, len(self.leaves))
        except Exception:  # noqa: BLE001 - any construct the interpreter does not know: the column rule, exact
            self._pass_size = _pass_size(jax.make_jaxpr(lambda ls: _single(
                apply_fn, jax.tree_util.tree_unflatten(treedef, ls), x))(list(self.leaves)).jaxpr)
            return {}, frozenset(), frozenset()
        self._layer_outputs = layer_outputs
        self._plan_sizes = {i: curvature_rule.plan_size(program, p) for i, p in plans.items() if p is not None}
        self._passes = {i: curvature_rule.passes(p) for i, p in plans.items() if p is not None}
        #: kernels whose curvature through the next convolution takes §13's channel-by-channel path (checked on a
        #: random input): a pass per row of the patches, not per coordinate, so exact at any size
        self._via = {}
        probe, second = None, self._hessian_static["apply_fn"]
        # the operations as the second order sees them (max pooling may be written out there): what via indexes
        hprogram = program if second is apply_fn else _program(second, treedef, self.leaves, x)
        for i, p in plans.items():
            p = p if hprogram is program or p is None else curvature_rule.group_plan(hprogram, i)
            via = None if p is None or i in blocked else curvature_rule.channel_via(hprogram, i, p)
            if via is not None:
                if probe is None:
                    probe = [*self.leaves, jax.random.uniform(jax.random.PRNGKey(0), x.shape, dtype=x.dtype)
                             if jnp.issubdtype(x.dtype, jnp.inexact) else x]
                if curvature_rule.channel_local(hprogram, probe, via):  # its passes (one per row) hold what
                    self._via[i] = via  # those per coordinate would: the workspace counts them still
        self._interpret = True
        self._chain = None if chain is None else self._chain_of(chain)
        return plans, neurons, blocked

    def _chain_of(self, chain):
        """``(layout, widths, curved)`` of the dense chain's layers — per layer its groups and weight layout, its
        output width, whether its activation is curved — or None where the shapes are not those of dense layers (a
        bias that is not one per output).  The layers themselves are read again inside the compiled code
        (:func:`_chain_layers`), which is keyed by ``apply_fn`` as the general rules are."""
        weights, _, acts = _chain_arrays(chain, self.leaves)
        if weights is None:
            return None
        layout = tuple((self.groups[layer.weight].name, None if layer.bias is None else self.groups[layer.bias].name,
                        layer.transposed) for layer in chain)
        return layout, tuple(int(W.shape[0]) for W in weights), tuple(a is not None and not a.piecewise_linear
                                                                      for a in acts)

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input the compiled derivatives hold beyond the blocks (used to size batches and to split the
        groups over passes).  With ``S`` the numbers of one pass over the function, ``M`` its largest value and ``L``
        the results of a group's curved operations (:func:`._jax_curvature.plan_size`):

        * first order, for ``R = min(C, chunk)`` outputs at a time: the pass's residuals, R cotangents of a value
          at a time and of the outputs ``Z`` of the layers whose parameters take their rows from them
          (:func:`._jax_curvature.first_order_layer`), ``S + R (M + Z)``;
        * a group's second order operation by operation, R outputs at a time: the residuals, R cotangents of a
          value at a time, and the cotangents ``λ`` and factors ``K`` of its curved operations, ``S + R (M + 2 L)``;
          where it needs a forward pass per coordinate, ``chunk`` of them, each with tangents of two values at a
          time and of the curved operations' inputs and ``Q``, ``chunk (2 M + 2 L)`` more;
        * by forward over forward of the whole function: ``chunk`` passes, each with a tangent and a second-order
          tangent of a value at a time, ``S + 2 chunk M``.

        The groups' second order is computed one group at a time, after the first order: the largest of these.
        Measured against it (a tanh layer at each of 64 positions, H = 512, C = 640, float64): 114 of 193 MiB for
        the first layer's kernel, 49 of 193 MiB for its bias (both operation by operation, with no pass).
        """
        if self._chain is not None:
            _, widths, curved = self._chain
            return dense.workspace(list(widths), list(curved), jnp.dtype(self.dtype).itemsize, hessian)
        (S, M), R = self._pass_size, min(self.n_outputs, self.chunk)
        need = self._first_order_size(self.n_outputs)
        for i, g in enumerate(self.groups) if hessian else ():
            if g.name in self.linear_groups or not self._second_order_of(g.name):
                continue
            if i in self._by_operation:
                L = self._plan_sizes[i]
                need = max(need, S + R * (M + 2 * L) + self.chunk * self._passes[i] * (2 * M + 2 * L))
            else:
                need = max(need, S + 2 * self.chunk * M)
        return need * jnp.dtype(self.dtype).itemsize

    @property
    def position_chunks(self) -> bool:
        """Whether :meth:`derivatives_of` takes ``positions=``: sequence outputs (T, C), not a dense chain, and no
        group whose Hessian diagonals are computed (each is exactly zero, or not computed, beyond ``max_params``)."""
        if self._chain is not None or len(self.output_shape) != 2:
            return False
        return all(g.name in self.linear_groups or not self._second_order_of(g.name) for g in self.groups)

    def _first_order_size(self, outputs: int) -> int:
        """Numbers per input that the first order of ``outputs`` outputs holds beyond the blocks: the pass's residuals
        and ``min(outputs, chunk)`` cotangents of a value and of the layer outputs (:meth:`workspace_per_input`)."""
        (S, M), R = self._pass_size, min(outputs, self.chunk)
        return S + R * (M + self._layer_outputs)

    def position_workspace(self, span: int) -> int:
        """Bytes per input that the first order of ``span`` positions holds beyond the blocks."""
        return self._first_order_size(span * self.output_shape[1]) * jnp.dtype(self.dtype).itemsize

    def _second_order_of(self, name: str) -> bool:
        """Whether the group's Hessian diagonals are computed: by a rule at any size, or within ``max_params`` and
        not behind a custom_vjp."""
        return (self.second_order and name not in self.blocked_groups) or name in self.rule_groups

    def __repr__(self) -> str:
        return f"JaxFunction(P={sum(g.size for g in self.groups)}, {self.dtype})"

    def check_inputs(self, X):
        return check_inputs(X, xp=jnp, dtype=self.dtype, device=self.device, input_shape=self.input_shape,
                            input_dtype=self.input_dtype, n_tokens=self.n_tokens)

    def outputs(self, X):
        return OPS.jit(_function_outputs, ("apply_fn", "treedef"))(self.leaves, X, **self._static)

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        return self.derivatives_of(X, None, hessian=hessian)

    def derivatives_of(self, X, groups, *, hessian: bool = True, positions=None) -> Derivatives:
        """The blocks of the named ``groups`` (all for None), compiled once per choice of groups; a dense chain's
        layers whole, by the dense-chain rule.  ``positions=(t0, t1)`` (where :attr:`position_chunks`): the
        blocks of the outputs of positions t0 .. t1 − 1 only; the outputs are the whole sequences'."""
        n = X.shape[0]
        rows = columns.position_rows(self, positions)
        if self._chain is not None:
            h, inputs, jac, hess = OPS.jit(_chain_derivatives, ("apply_fn", "treedef", "hessian"))(
                self.leaves, X, hessian=hessian, **self._static)
            blocks = dense.dense_blocks(self._chain[0], inputs, jac, hess)
            chosen = None if groups is None else set(groups)
            return Derivatives(h, tuple(b for b in blocks if chosen is None or {b.weight, b.bias} & chosen))
        eye = jnp.eye(self.n_outputs, dtype=self.dtype)[rows]
        indices = None if groups is None else tuple(i for i, g in enumerate(self.groups) if g.name in set(groups))
        jacobian = OPS.jit(_function_jacobian, ("apply_fn", "treedef", "indices", "interpret", "chunk"))
        jac = jacobian(self.leaves, X, eye, indices=indices, interpret=self._interpret, chunk=self.chunk,
                       **self._static)
        hess = OPS.jit(_function_hessian, ("apply_fn", "treedef", "index"))
        by_operation = OPS.jit(_function_curvature, ("apply_fn", "treedef", "index", "chunk", "via"))
        blocks = []
        for j, i in enumerate(range(len(self.groups)) if indices is None else indices):
            g = self.groups[i]

            def chunk(start, k, i=i, g=g):
                E = columns.unit_directions(jnp, g.shape, start, k, dtype=self.dtype, device=self.device)
                return hess(self.leaves, X, E, index=i, **self._hessian_static)

            def compute(i=i, g=g, chunk=chunk):
                if i in self._by_operation:
                    return by_operation(self.leaves, X, index=i, chunk=self.chunk, via=self._via.get(i),
                                        **self._hessian_static)
                return columns.chunked(g.size, self.chunk, chunk)

            w = columns.group_hessian(jnp, (n, eye.shape[0], g.size), hessian=hessian,
                                      linear=g.name in self.linear_groups, second_order=self._second_order_of(g.name),
                                      compute=compute, dtype=self.dtype, device=self.device)
            blocks.append(ColumnBlock(g.name, jac[j].reshape(n, -1, g.size), w))
        return Derivatives(self.outputs(X), tuple(blocks))

    def pullback(self, X, cotangent_fn) -> Derivatives:
        if self._chain is not None:  # the dense-chain rule's backpropagation of the scores, as from_mlp's
            h, inputs, d1, weights = OPS.jit(_chain_forward, ("apply_fn", "treedef"))(self.leaves, X, **self._static)
            grads = OPS.jit(dense.backpropagate)(weights, d1, jnp.swapaxes(cotangent_fn(h), 0, 1))[0]
            return Derivatives(h, dense.dense_blocks(self._chain[0], inputs, grads, [None] * len(grads)))
        h = self.outputs(X)
        s = jnp.swapaxes(cotangent_fn(h), 0, 1)  # (n, M, C)
        grads = OPS.jit(_function_pullback, ("apply_fn", "treedef"))(self.leaves, X, s, **self._static)
        n, M = s.shape[:2]
        return Derivatives(h, tuple(ColumnBlock(g.name, grads[i].reshape(n, M, g.size), None)
                                    for i, g in enumerate(self.groups)))


def from_function(apply_fn: Callable, params, *, input_shape=None, max_params: int = DEFAULT_MAX_PARAMS,
                  chunk: int = 256, input_dtype=None, n_tokens: int | None = None) -> JaxFunction:
    """Adapt any pure ``apply_fn(params, x) -> h`` (x a batch of shape ``(n, *input_shape)``, h of shape (n, C)).

    Exact full Jacobian columns (first order: any size), and Hessian diagonals per
    parameter, jit-compiled and chunked over ``chunk`` parameters at a time, for models of at
    most ``max_params`` parameters; beyond, the second-order fields are NaN, "not computed"
    (:attr:`fishercore.FisherAnalysis.first_order_only`).  ``input_shape`` (the shape of one
    input, without the batch axis) is required: ``jax.eval_shape`` on it gives the output width
    when the model is built.  ``input_dtype``: an integer dtype (e.g. ``jnp.int32``) for models
    that take token ids (embeddings); inputs must then have it, with values in ``[0, n_tokens)``
    (``n_tokens`` is then required: JAX clamps an index out of range instead of failing).  Outputs
    may be (n, T, C): one label per position (:class:`fishercore.Positions`).

    Examples
    --------
    >>> import jax, jax.numpy as jnp, fishercore as fc
    >>> from fishercore.backends import jax as fc_jax
    >>> params = {"w": jnp.ones((3, 2)), "s": jnp.ones(2)}
    >>> model = fc_jax.from_function(lambda p, x: jnp.sin(x @ p["w"]) * p["s"], params, input_shape=(3,))
    >>> fc.analyze(model, jnp.ones((5, 3)), "gaussian").fisher.shape
    (8,)
    """
    return JaxFunction(apply_fn, params, input_shape=input_shape, max_params=max_params, chunk=chunk,
                       input_dtype=input_dtype, n_tokens=n_tokens)


def analyze_sharded(model, X, family="categorical", *, batch_size: int = 256, devices=None, mask=None):
    """:func:`fishercore.analyze` with the inputs sharded over JAX devices (``shard_map`` + ``psum``).

    Each step hands ``batch_size`` inputs to each of the D devices (``devices``, default
    ``jax.devices()``: the GPUs of a host, or CPU devices made with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=D``); every device computes the sums of
    its share and ``jax.lax.psum`` reduces them with :func:`fishercore.all_reduce_sums`, the
    reduction every analysis uses.  Steps are accumulated as batches are; inputs left over
    after the last full step are analysed on the default device.  The result equals
    ``analyze(model, X, family)`` up to rounding.

    ``model`` is any JAX-traceable fishercore model: :func:`from_mlp`, :func:`from_function`, or
    the hand-written MLP on JAX arrays.  ``mask``: for sequence outputs, the boolean (n, T)
    padding mask of :func:`fishercore.analyze`, sharded with the inputs.
    """
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from fishercore import _validation as V
    from fishercore.analysis import analysis_of, analyze
    from fishercore.sums import Accumulator, all_reduce_sums, derivative_sums

    family, X = V.check_model_and_data(model, X, family)
    mask = V.check_mask(mask, model, X)
    B = V.check_positive_int(batch_size, "batch_size")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: empty")
    if not all(isinstance(d, jax.Device) for d in devices):
        bad = next(d for d in devices if not isinstance(d, jax.Device))
        raise TypeError(f"devices: expected jax devices (e.g. jax.devices()), got {bad!r}")
    mesh = Mesh(np.array(devices), ("data",))
    step = B * len(devices)

    def shard(Xs, Ms=None):
        sums = derivative_sums(model.derivatives(Xs), family, positions=Ms)
        return {k: all_reduce_sums(s, B, step, lambda t: jax.lax.psum(t, "data")) for k, s in sums.items()}

    # check_vma=False: the model's rules use arrays built inside (one-hots, zeros) that do not
    # vary over the mesh axis; the psum makes every output replicated, as out_specs says.
    specs = P("data") if mask is None else (P("data"), P("data"))
    run = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False))
    home = device(X)  # the replicated sums come back to X's device, where the remainder is analysed
    sharding = NamedSharding(mesh, P("data"))
    acc = Accumulator()
    for start in range(0, (X.shape[0] // step) * step, step):
        parts = [X[start:start + step]] + ([] if mask is None else [mask[start:start + step]])
        s = jax.device_put(run(*(jax.device_put(a, sharding) for a in parts)), home)
        V.check_results_finite(s, start, start + step, "statistics")
        acc.add(s, step)
    if acc.n_inputs < X.shape[0]:
        rest = analyze(model, X[acc.n_inputs:], family, batch_size=B,
                       mask=None if mask is None else mask[acc.n_inputs:])
        return rest if acc.n_inputs == 0 else analysis_of(model, acc, family).merge(rest)
    return analysis_of(model, acc, family)
