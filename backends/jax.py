r"""JAX adapter: derivatives from ``jax`` (``jacrev``, ``jvp``, ``vjp``, ``vmap``), jit-compiled.

* :func:`from_mlp` — an MLP given as a parameter pytree: a list of ``(W, b)`` pairs
  with ``W`` of shape (out, in), or a list of ``{"kernel": (in, out), "bias": (out,)}``
  as Flax's ``Dense`` stores them — with an activation name.
* :func:`from_function` — any pure ``apply_fn(params, x) -> h`` of a parameter pytree:
  exact full columns, chunked.

Dense layers hand the core per-neuron factors, computed as in the torch adapter's
``from_sequential``: perturb each pre-activation ``z_l + δ_l`` (δ of shape (n, out),
one row per input, which reaches only that input's outputs); ``∂h/∂z_l`` takes one
``vjp`` of the batched forward per output; ``φ'`` and ``φ''`` of each activation come
from ``jvp`` with a tangent of ones and are contracted along the chain of weights into
the diagonal of ``∂²h/∂z_l²`` (:mod:`fishercore.backends._dense`); Î1 uses one ``vjp``
per label draw.
:func:`from_function` differentiates per parameter (forward-over-forward ``jvp``).

Group names come from the pytree paths, keys joined by dots (``"0.0"``/``"0.1"`` for
``(W, b)`` pairs, ``"0.kernel"``/``"0.bias"`` for Flax layers), in the pytree's leaf
order; results are laid out in each parameter's own shape (a kernel comes back
(in, out)).  Nothing global is switched on import (``jax_enable_x64`` is the
caller's choice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import jax
import jax.numpy as jnp
from array_api_compat import device

from fishercore._protocol import ColumnBlock, DenseBlock, Derivatives, make_groups
from fishercore._validation import check_full_column_budget

from ._dense import chain_workspace, hessian_factors, matmul_shared

__all__ = ["ACTIVATIONS", "JaxFunction", "JaxMLP", "analyze_sharded", "from_function", "from_mlp", "mlp_apply"]

#: Activation names accepted by :func:`from_mlp` (the same as the hand-written MLP's).
ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "softplus", "gelu", "elu")

#: Activations whose second derivative vanishes wherever it is defined.
PIECEWISE_LINEAR = ("identity", "relu", "leaky_relu")

DEFAULT_MAX_PARAMS = 20_000


def _activation(name, negative_slope, alpha):
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {name!r}; expected one of {list(ACTIVATIONS)}")
    return {
        "identity": lambda z: z,
        "relu": jax.nn.relu,
        "leaky_relu": partial(jax.nn.leaky_relu, negative_slope=negative_slope),
        "tanh": jnp.tanh,
        "sigmoid": jax.nn.sigmoid,
        "softplus": jax.nn.softplus,
        "gelu": partial(jax.nn.gelu, approximate=True),
        "elu": partial(jax.nn.elu, alpha=alpha),
    }[name.lower()]


def mlp_apply(activation="tanh", *, negative_slope: float = 0.01, alpha: float = 1.0):
    """``apply(params, x)`` of an MLP given as ``(W, b)`` pairs (W: (out, in)), in plain ``jax.numpy``.

    A pure function for ``jax.grad``, ``jax.jit`` or :func:`from_function`; the same network as
    ``from_mlp(params, activation)``.
    """
    act = _activation(activation, negative_slope, alpha)

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
    return dtypes.pop()


def _check_inputs(X, dtype, dev):
    if not isinstance(X, jax.Array):
        raise TypeError(f"X: expected a jax.Array for a JAX model, got {type(X).__name__}")
    if not jnp.issubdtype(X.dtype, jnp.floating):
        raise TypeError(f"X: expected a real floating-point array, got dtype {X.dtype}")
    if X.dtype != dtype:
        raise TypeError(f"X: dtype {X.dtype} differs from the model's {dtype}")
    if device(X) != dev:
        raise ValueError(f"X: device {device(X)} differs from the model's {dev}")
    if X.ndim < 2:
        raise ValueError(f"X: expected a batch of inputs (n, ...), got shape {tuple(X.shape)}")
    return X


def _basis_second_derivative(f, x0, e):
    """d²/dt² f(x0 + t e) at t = 0, forward over forward."""
    return jvp(lambda p: jvp(f, (p,), (e,))[1], (x0,), (e,))[1]


jvp, jacrev, vjp, vmap = jax.jvp, jax.jacrev, jax.vjp, jax.vmap


class JaxMLP:
    """An MLP as a parameter pytree (use :func:`from_mlp`)."""

    def __init__(self, params: Sequence, activation="tanh", *, negative_slope: float = 0.01, alpha: float = 1.0):
        if not isinstance(params, (list, tuple)) or not params:
            raise TypeError("params: expected a non-empty list of (W, b) pairs or of {'kernel', 'bias'} dicts")
        names, leaves, _ = _named_leaves(params)
        self.dtype = _check_leaves(names, leaves, "params")
        self.device = device(leaves[0])
        self.params = params
        Ws, bs, layout = [], [], []
        for i, layer in enumerate(params):
            if isinstance(layer, dict):
                extra = set(layer) - {"kernel", "bias"}
                if "kernel" not in layer or extra:
                    raise ValueError(f"params[{i}]: a dict layer needs 'kernel' (and optionally 'bias'), "
                                     f"got keys {sorted(layer)}")
                K, b = layer["kernel"], layer.get("bias")
                if K.ndim != 2:
                    raise ValueError(f"params[{i}]: kernel must be (in, out), got shape {tuple(K.shape)}")
                W, transposed, wname, bname = K.T, True, f"{i}.kernel", f"{i}.bias"
            elif isinstance(layer, (list, tuple)) and len(layer) == 2:
                W, b = layer
                if W.ndim != 2:
                    raise ValueError(f"params[{i}]: weight must be (out, in), got shape {tuple(W.shape)}")
                transposed, wname, bname = False, f"{i}.0", f"{i}.1"
            else:
                raise TypeError(f"params[{i}]: expected a (W, b) pair or a {{'kernel', 'bias'}} dict")
            if b is not None and tuple(b.shape) != (W.shape[0],):
                raise ValueError(f"params[{i}]: bias must have shape ({W.shape[0]},), got {tuple(b.shape)}")
            if Ws and W.shape[1] != Ws[-1].shape[0]:
                raise ValueError(f"params[{i}]: expects {W.shape[1]} inputs but params[{i - 1}] has "
                                 f"{Ws[-1].shape[0]} outputs")
            Ws.append(W)
            bs.append(b)
            layout.append((wname, bname if b is not None else None, transposed))
        n_hidden = len(Ws) - 1
        acts = [activation] * n_hidden if isinstance(activation, str) else list(activation)
        if len(acts) != n_hidden:
            raise ValueError(f"activation: expected one name or {n_hidden} names (one per hidden layer), "
                             f"got {len(acts)}")
        self.activations = tuple(_activation(a, negative_slope, alpha) for a in acts)
        self.piecewise_linear = tuple(a.lower() in PIECEWISE_LINEAR for a in acts)
        self.Ws, self.bs, self.layout = tuple(Ws), tuple(bs), tuple(layout)
        self.groups = make_groups([(n, tuple(leaf.shape)) for n, leaf in zip(names, leaves)])
        self.n_inputs, self.n_outputs = int(Ws[0].shape[1]), int(Ws[-1].shape[0])
        self._derivs = jax.jit(self._derivs_impl, static_argnames="hessian")
        self._pull = jax.jit(self._pull_impl)
        self._fwd = jax.jit(lambda X: self._forward(X, None))

    def __repr__(self) -> str:
        widths = [self.n_inputs] + [int(W.shape[0]) for W in self.Ws]
        return f"JaxMLP({'-'.join(map(str, widths))}, {self.dtype})"

    def _forward(self, X, deltas):
        """Batched forward; δ_l added to z_l.  Returns h and the layer inputs."""
        a, inputs = X, []
        for l, (W, b) in enumerate(zip(self.Ws, self.bs)):
            inputs.append(a)
            z = a @ W.T
            if b is not None:
                z = z + b
            if deltas is not None:
                z = z + deltas[l]
            a = self.activations[l](z) if l < len(self.Ws) - 1 else z
        return a, inputs

    def _zeros(self, n, dtype):
        return tuple(jnp.zeros((n, W.shape[0]), dtype) for W in self.Ws)

    def _derivs_impl(self, X, hessian):
        deltas = self._zeros(X.shape[0], X.dtype)
        h, inputs = self._forward(X, None)
        # The batch's δ_l (n, out) reaches only its own input's outputs, so one vjp of the
        # batched forward per output c gives every input's row of ∂h_c/∂z_l.
        C = self.n_outputs
        onehot = jnp.broadcast_to(jnp.eye(C, dtype=X.dtype)[:, None, :], (C, X.shape[0], C))
        pull = vjp(lambda ds: self._forward(X, ds)[0], deltas)[1]
        jac = [jnp.swapaxes(g, 0, 1) for g in vmap(lambda c: pull(c)[0])(onehot)]  # per layer (n, C, out)
        if not hessian:
            return h, inputs, jac, [None] * len(self.Ws)
        # φ', φ'' of each hidden activation by jvp with a tangent of ones (φ is elementwise),
        # contracted along the chain of weights with the work shared by all outputs.
        d1, curv = [], []
        for l, act in enumerate(self.activations):
            z = inputs[l] @ self.Ws[l].T
            if self.bs[l] is not None:
                z = z + self.bs[l]
            ones = jnp.ones_like(z)

            def dphi(t, act=act, ones=ones):
                return jvp(act, (t,), (ones,))[1]

            d1.append(dphi(z))
            curv.append(None if self.piecewise_linear[l] else
                        matmul_shared(jac[l + 1], self.Ws[l + 1]) * jvp(dphi, (z,), (ones,))[1][:, None, :])
        hess = hessian_factors(self.Ws, d1, curv, jac)
        return h, inputs, jac, hess

    def _pull_impl(self, X, s):
        """Per-input ``sᵀ ∂h/∂z_l`` for each draw: one vjp of the batched forward per draw (M, n, out)."""
        pull = vjp(lambda ds: self._forward(X, ds)[0], self._zeros(X.shape[0], X.dtype))[1]
        return list(vmap(lambda c: pull(c)[0])(s))

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input the compiled derivatives hold beyond the blocks (used to size batches)."""
        outs = [int(W.shape[0]) for W in self.Ws]
        per_pass = sum(outs) + sum(int(W.shape[1]) for W in self.Ws)
        curved = [not pl for pl in self.piecewise_linear] + [False]
        itemsize = jnp.dtype(self.dtype).itemsize
        return 2 * self.n_outputs * per_pass * itemsize + (chain_workspace(outs, curved, itemsize) if hessian else 0)

    def _blocks(self, inputs, jac, hess):
        return tuple(DenseBlock(w, b, a, j, g, t) for (w, b, t), a, j, g in zip(self.layout, inputs, jac, hess))

    # -- the protocol -----------------------------------------------------------
    def check_inputs(self, X):
        _check_inputs(X, self.dtype, self.device)
        if X.ndim != 2 or X.shape[1] != self.n_inputs:
            raise ValueError(f"X: expected {self.n_inputs} features per input, got shape {tuple(X.shape)}")
        return X

    def outputs(self, X):
        return self._fwd(X)[0]

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        h, inputs, jac, hess = self._derivs(X, hessian=hessian)
        return Derivatives(h, self._blocks(inputs, jac, hess))

    def pullback(self, X, cotangent_fn) -> Derivatives:
        h, inputs = self._fwd(X)
        grads = self._pull(X, cotangent_fn(h))
        return Derivatives(h, self._blocks(inputs, grads, [None] * len(grads)))


def from_mlp(params: Sequence, activation="tanh", *, negative_slope: float = 0.01, alpha: float = 1.0) -> JaxMLP:
    """Adapt an MLP pytree: ``[(W, b), ...]`` (W: (out, in)) or ``[{"kernel": (in, out), "bias": (out,)}, ...]``.

    ``activation``: one name of :data:`ACTIVATIONS` for all hidden layers, or one per
    hidden layer (``"gelu"`` is the tanh form).

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
    return JaxMLP(params, activation, negative_slope=negative_slope, alpha=alpha)


class JaxFunction:
    """Any pure ``apply_fn(params, x) -> h`` of a parameter pytree, with exact full columns."""

    def __init__(self, apply_fn: Callable, params, *, max_params: int = DEFAULT_MAX_PARAMS, chunk: int = 256):
        if not callable(apply_fn):
            raise TypeError(f"apply_fn: expected a callable apply_fn(params, x) -> h, got {type(apply_fn).__name__}")
        names, leaves, treedef = _named_leaves(params)
        self.dtype = _check_leaves(names, leaves, "params")
        self.device = device(leaves[0])
        self.apply_fn, self.params, self.leaves, self.treedef = apply_fn, params, leaves, treedef
        self.groups = make_groups([(n, tuple(leaf.shape)) for n, leaf in zip(names, leaves)])
        check_full_column_budget(self.groups, max_params, "from_mlp")
        self.chunk = int(chunk)
        self.n_outputs = None
        self._jac = jax.jit(vmap(jacrev(self._single), in_axes=(None, 0)))
        self._hess = jax.jit(self._hess_impl, static_argnames="index")
        self._pull = jax.jit(self._pull_impl)
        self._out = jax.jit(apply_fn)

    def __repr__(self) -> str:
        return f"JaxFunction(P={sum(g.size for g in self.groups)}, {self.dtype})"

    def _single(self, params, x):
        return self.apply_fn(params, x[None])[0]

    def check_inputs(self, X):
        _check_inputs(X, self.dtype, self.device)
        try:
            h = self.apply_fn(self.params, X[:1])
        except (TypeError, ValueError, IndexError) as e:
            raise ValueError(f"X: apply_fn cannot run on inputs of shape {tuple(X.shape)}: {e}") from e
        if getattr(h, "ndim", None) != 2:
            raise ValueError(f"apply_fn: must return outputs of shape (n, C), got {getattr(h, 'shape', type(h))}")
        self.n_outputs = int(h.shape[1])
        return X

    def outputs(self, X):
        return self._out(self.params, X)

    def _hess_impl(self, leaves, X, basis, index):
        def along(x, e):
            def f(p):
                params = jax.tree_util.tree_unflatten(self.treedef, leaves[:index] + [p] + leaves[index + 1:])
                return self._single(params, x)

            return _basis_second_derivative(f, leaves[index], e)

        return vmap(lambda x: vmap(lambda e: along(x, e))(basis))(X)  # (n, k, C)

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        n = X.shape[0]
        h = self.outputs(X)
        jac = jax.tree_util.tree_leaves(self._jac(self.params, X))
        blocks = []
        for i, g in enumerate(self.groups):
            u = jac[i].reshape(n, -1, g.size)
            w = None
            if hessian:
                parts = []
                for start in range(0, g.size, self.chunk):
                    k = min(self.chunk, g.size - start)
                    basis = jnp.eye(k, g.size, k=start, dtype=self.dtype).reshape(k, *g.shape)
                    parts.append(self._hess(self.leaves, X, basis, index=i))
                w = jnp.concatenate(parts, axis=1).transpose(0, 2, 1)
            blocks.append(ColumnBlock(g.name, u, w))
        return Derivatives(h, tuple(blocks))

    def _pull_impl(self, params, X, s):
        def one(x, si):
            pull = vjp(lambda p: self._single(p, x), params)[1]
            return vmap(lambda c: pull(c)[0])(si)

        return vmap(one)(X, jnp.swapaxes(s, 0, 1))  # pytree of (n, M, *shape)

    def pullback(self, X, cotangent_fn) -> Derivatives:
        h = self.outputs(X)
        s = cotangent_fn(h)
        grads = jax.tree_util.tree_leaves(self._pull(self.params, X, s))
        n, M = X.shape[0], s.shape[0]
        blocks = tuple(ColumnBlock(g.name, jnp.swapaxes(grads[i].reshape(n, M, g.size), 0, 1), None)
                       for i, g in enumerate(self.groups))
        return Derivatives(h, blocks)


def from_function(apply_fn: Callable, params, *, max_params: int = DEFAULT_MAX_PARAMS, chunk: int = 256) -> JaxFunction:
    """Adapt any pure ``apply_fn(params, x) -> h`` (x a batch (n, ...), h of shape (n, C)).

    Exact full Jacobian columns and Hessian diagonals per parameter, jit-compiled and
    chunked over ``chunk`` parameters at a time; more than ``max_params`` parameters
    are refused.

    Examples
    --------
    >>> import jax, jax.numpy as jnp, fishercore as fc
    >>> from fishercore.backends import jax as fc_jax
    >>> params = {"w": jnp.ones((3, 2)), "s": jnp.ones(2)}
    >>> model = fc_jax.from_function(lambda p, x: jnp.sin(x @ p["w"]) * p["s"], params)
    >>> fc.analyze(model, jnp.ones((5, 3)), "gaussian").fisher.shape
    (8,)
    """
    return JaxFunction(apply_fn, params, max_params=max_params, chunk=chunk)


def analyze_sharded(model, X, family="categorical", *, batch_size: int = 256, devices=None):
    """:func:`fishercore.analyze` with the inputs sharded over JAX devices (``shard_map`` + ``psum``).

    Each step hands ``batch_size`` inputs to each of the D devices (``devices``, default
    ``jax.devices()``: the GPUs of a host, or CPU devices made with
    ``XLA_FLAGS=--xla_force_host_platform_device_count=D``); every device computes the sums of
    its share and ``jax.lax.psum`` reduces them (:func:`fishercore.analysis.all_reduce_sums`).
    Steps are merged as batches are; inputs left over after the last full step are analysed on
    the default device.  The result equals ``analyze(model, X, family)`` up to rounding.

    ``model`` is any JAX-traceable fishercore model: :func:`from_mlp`, :func:`from_function`, or
    the hand-written MLP on JAX arrays.
    """
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from fishercore.analysis import (
        _combine,
        all_reduce_sums,
        analyze,
        assemble,
        check_model_and_data,
        check_results_finite,
        derivative_sums,
    )

    family, X, _ = check_model_and_data(model, X, family, batch_size)
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices: empty")
    mesh = Mesh(np.array(devices), ("data",))
    B, D = int(batch_size), len(devices)
    step = B * D

    def shard(Xs):
        sums = derivative_sums(model.derivatives(Xs), family, jnp)
        return {k: all_reduce_sums(s, B, step, lambda t: jax.lax.psum(t, "data")) for k, s in sums.items()}

    # check_vma=False: the model's vjps pull back cotangents built inside (one-hots, zeros) that
    # do not vary over the mesh axis; the psum makes every output replicated, as out_specs says.
    run = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=P("data"), out_specs=P(), check_vma=False))
    n, full = X.shape[0], (X.shape[0] // step) * step
    sums, done = None, 0
    for start in range(0, full, step):
        s = run(jax.device_put(X[start:start + step], NamedSharding(mesh, P("data"))))
        check_results_finite(s, start, start + step, "statistics")
        sums = s if sums is None else {k: _combine(sums[k], done, s[k], step) for k in sums}
        done += step
    result = None if sums is None else assemble(model, sums, done, family)
    if done < n:
        rest = analyze(model, X[done:], family, batch_size=B)
        result = rest if result is None else result.merge(rest)
    return result
