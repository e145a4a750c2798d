r"""PyTorch adapter: derivatives from ``torch.func``, not from the closed-form MLP recursion.

* :func:`from_sequential` — ``torch.nn.Sequential`` of ``nn.Linear`` and elementwise
  activations (``Tanh``, ``Sigmoid``, ``ReLU``, ``LeakyReLU``, ``Softplus``, ``GELU``,
  ``ELU``, ``Identity``), optionally starting with ``Flatten``.
* :func:`from_module` — any ``nn.Module`` whose trainable layers are ``nn.Linear``,
  each applied once per input (skip connections, custom ``forward``).
* :func:`from_function` — anything else, ``fn(params, x) -> h``: exact full columns.

For dense layers the adapter hands the core per-neuron factors.  Each Linear's
output ``z_l`` is perturbed, ``z_l + δ_l`` (a forward hook), and with
``f(x, δ) = h``:

* ``∂h/∂z_l = ∂f/∂δ_l`` at ``δ = 0`` — ``jacrev``, C backward passes per input;
* ``diag ∂²h/∂z_l²``: for :func:`from_sequential`, ``φ'`` and ``φ''`` of each block
  of activations by ``jvp`` (elementwise, so a tangent of ones suffices), contracted
  along the chain of Linear weights with the work shared by all C outputs
  (:mod:`fishercore.backends._dense`, the contraction the hand-written MLP uses too);
  for :func:`from_module`, which knows nothing of the graph between the Linear
  layers, ``d²/dt² f(x, δ_l = t e_a)`` — forward-over-forward ``jvp`` along each basis
  vector ``e_a`` of ``z_l`` (independent of any shared code, and slower: one pass
  per neuron);
* for Î1, ``sᵀ ∂h/∂z_l`` — one ``vjp`` (backward pass) per label draw.

Every transform is ``vmap``-ed over inputs (and directions, and draws); there are
no Python loops over samples.  Group names are the module's own parameter names
(``"0.weight"``, ``"0.bias"``, ...), in ``module.parameters()`` order.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, jacrev, jvp, vjp, vmap

from fishercore._protocol import ColumnBlock, DenseBlock, Derivatives, make_groups
from fishercore._validation import check_full_column_budget

from ._dense import chain_workspace, hessian_factors, matmul_shared

__all__ = ["ACTIVATION_MODULES", "ELEMENTWISE", "TorchFunction", "TorchModule", "TorchSequential", "all_reduce",
           "from_function", "from_module", "from_sequential", "sequential_from_layers"]

#: Modules accepted between the Linear layers of :func:`from_sequential`.
ELEMENTWISE = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.Softplus, nn.GELU, nn.ELU, nn.Identity)

DEFAULT_MAX_PARAMS = 20_000

#: The torch module for each activation name of the hand-written MLP (GELU in its tanh form).
ACTIVATION_MODULES = {
    "identity": nn.Identity, "relu": nn.ReLU, "leaky_relu": nn.LeakyReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus, "gelu": lambda: nn.GELU(approximate="tanh"), "elu": nn.ELU,
}


def sequential_from_layers(layers, activation="tanh", *, dtype=torch.float64) -> nn.Sequential:
    """``nn.Sequential(Linear, act, ..., Linear)`` holding the given weights.

    ``layers`` is a list of ``(W, b)`` (NumPy arrays or tensors, ``W`` of shape (out, in), ``b``
    possibly None) as :class:`fishercore.backends.mlp.MLP` takes them; ``activation`` a name of
    :data:`ACTIVATION_MODULES` — the same network as ``mlp.MLP(layers, activation)``.
    """
    if activation not in ACTIVATION_MODULES:
        raise ValueError(f"activation: unknown activation {activation!r}; expected one of {list(ACTIVATION_MODULES)}")
    mods = []
    for i, (W, b) in enumerate(layers):
        lin = nn.Linear(W.shape[1], W.shape[0], bias=b is not None).to(dtype)
        with torch.no_grad():
            lin.weight.copy_(torch.as_tensor(W))
            if b is not None:
                lin.bias.copy_(torch.as_tensor(b))
        mods.append(lin)
        if i < len(layers) - 1:
            mods.append(ACTIVATION_MODULES[activation]())
    return nn.Sequential(*mods)


def _check_tensor(X, name, *, dtype, device):
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor for a torch model, got {type(X).__name__}")
    if not torch.is_floating_point(X):
        raise TypeError(f"{name}: expected a real floating-point tensor, got dtype {X.dtype}")
    if X.dtype != dtype:
        raise TypeError(f"{name}: dtype {X.dtype} differs from the model's {dtype}")
    if X.device != device:
        raise ValueError(f"{name}: device {X.device} differs from the model's {device}")
    if X.ndim < 2:
        raise ValueError(f"{name}: expected a batch of inputs (n, ...), got shape {tuple(X.shape)}")
    return X


def _model_dtype_device(params: Mapping[str, torch.Tensor], what: str):
    if not params:
        raise ValueError(f"{what}: has no parameters")
    dtypes = {p.dtype for p in params.values()}
    devices = {p.device for p in params.values()}
    if len(dtypes) != 1 or len(devices) != 1:
        raise TypeError(f"{what}: parameters must share one dtype and device, got {sorted(map(str, dtypes))} "
                        f"on {sorted(map(str, devices))}")
    (dtype,), (device,) = dtypes, devices
    if not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{what}: parameters must be real floating point, got {dtype}")
    for name, p in params.items():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{what}: parameter {name!r} contains NaN or inf")
    return dtype, device


class TorchModule:
    """A ``torch.nn.Module`` whose trainable layers are all ``nn.Linear`` (use :func:`from_module`)."""

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        hooked = [name or "<root>" for name, m in module.named_modules()
                  if getattr(m, "_backward_hooks", None) or getattr(m, "_backward_pre_hooks", None)]
        if hooked:
            raise ValueError(f"module: submodules {hooked} carry backward hooks (e.g. from backpack.extend), "
                             "which torch.func cannot trace; pass a copy without them (copy.deepcopy before extend)")
        self.module = module
        self.params = {k: v.detach() for k, v in module.named_parameters()}
        self.buffers = {k: v.detach() for k, v in module.named_buffers()}
        self.dtype, self.device = _model_dtype_device(self.params, "module")
        self.linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]
        owned = {}
        for name, lin in self.linears:
            prefix = f"{name}." if name else ""
            owned[f"{prefix}weight"] = name
            if lin.bias is not None:
                owned[f"{prefix}bias"] = name
        for pname in self.params:
            if pname not in owned:
                owner = pname.rsplit(".", 1)[0] if "." in pname else "<root>"
                sub = dict(module.named_modules()).get(owner, module)
                raise ValueError(f"module: parameter {pname!r} belongs to {type(sub).__name__}, not nn.Linear; "
                                 "use fishercore.backends.torch.from_function for other layers")
        self.groups = make_groups([(k, tuple(v.shape)) for k, v in self.params.items()])
        self._names = {name: (f"{name}.weight" if name else "weight",
                              (f"{name}.bias" if name else "bias") if lin.bias is not None else None)
                       for name, lin in self.linears}
        self.n_outputs = None  # known after the first forward pass (check_inputs)

    def __repr__(self) -> str:
        P = sum(g.size for g in self.groups)
        return f"{type(self).__name__}({type(self.module).__name__}, {len(self.linears)} Linear, P={P}, {self.dtype})"

    # -- the perturbed network f(x, δ) ----------------------------------------
    def _call(self, x, deltas=None, record=None):
        """The module on a batch x; δ_l added to each Linear's output; inputs recorded."""
        handles = []
        try:
            for i, (_, lin) in enumerate(self.linears):
                if deltas is not None:
                    handles.append(lin.register_forward_hook(lambda m, inp, out, d=deltas[i]: out + d))
                if record is not None:
                    handles.append(lin.register_forward_pre_hook(
                        lambda m, inp, i=i: record.append((i, inp[0]))))
            return functional_call(self.module, (self.params, self.buffers), (x,))
        finally:
            for h in handles:
                h.remove()

    def _single(self, x, deltas):
        """h for one input x (unbatched), with one δ per Linear output."""
        return self._call(x[None], tuple(d[None] for d in deltas))[0]

    def _forward(self, X):
        record: list = []
        with torch.no_grad():
            h = self._call(X, record=record)
        counts = [sum(1 for i, _ in record if i == k) for k in range(len(self.linears))]
        for (name, _), c in zip(self.linears, counts):
            if c != 1:
                raise ValueError(f"module: nn.Linear {name!r} is applied {c} times per forward pass; "
                                 "per-neuron factors need each Linear applied exactly once (use from_function)")
        inputs = [None] * len(self.linears)
        for i, a in record:
            inputs[i] = a
        for (name, _), a in zip(self.linears, inputs):
            if a.ndim != 2 or a.shape[0] != X.shape[0]:
                raise ValueError(f"module: nn.Linear {name!r} sees inputs of shape {tuple(a.shape)}; "
                                 "per-neuron factors need one input vector per example (use from_function)")
        if h.ndim != 2:
            raise ValueError(f"module: outputs must have shape (n, C), got {tuple(h.shape)}")
        return h, inputs

    def _zero_deltas(self, n):
        return tuple(torch.zeros(n, lin.out_features, dtype=self.dtype, device=self.device) for _, lin in self.linears)

    # -- the protocol -----------------------------------------------------------
    def check_inputs(self, X):
        _check_tensor(X, "X", dtype=self.dtype, device=self.device)
        try:
            with torch.no_grad():
                h = self._call(X[:1])
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"X: the module cannot run on inputs of shape {tuple(X.shape)}: {e}") from e
        if h.ndim != 2:
            raise ValueError(f"module: outputs must have shape (n, C), got {tuple(h.shape)}")
        self.n_outputs = int(h.shape[1])
        return X

    def outputs(self, X):
        with torch.no_grad():
            return self._call(X)

    def _widths(self):
        return [lin.out_features for _, lin in self.linears], [lin.in_features for _, lin in self.linears]

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input the vmapped transforms hold beyond the blocks (used to size batches).

        ``jacrev``: C cotangents through every layer; the per-neuron Hessian pass: one
        forward-over-forward per neuron of the widest layer, each holding every layer's
        values three times (primal and two tangents).
        """
        outs, ins = self._widths()
        per_pass = sum(outs) + sum(ins)
        C = self.n_outputs or outs[-1]
        second = 3 * max(outs) * per_pass if hessian else 0
        return (2 * C * per_pass + second) * self.dtype.itemsize

    def _make_blocks(self, inputs, jac, hess):
        return tuple(DenseBlock(*self._names[name], a, j, g)
                     for (name, _), a, j, g in zip(self.linears, inputs, jac, hess))

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        h, inputs = self._forward(X)
        deltas = self._zero_deltas(X.shape[0])
        with torch.no_grad():
            jac = vmap(jacrev(self._single, argnums=1))(X, deltas)  # per layer (n, C, out)
            hess = [self._diag_hessian(X, deltas, l) for l in range(len(self.linears))] if hessian \
                else [None] * len(self.linears)
        return Derivatives(h, self._make_blocks(inputs, jac, hess))

    def _diag_hessian(self, X, deltas, l):
        """diag ∂²h/∂z_l², (n, C, out_l): forward-over-forward along each basis vector of z_l."""
        out = deltas[l].shape[1]
        basis = torch.eye(out, dtype=self.dtype, device=self.device)

        def along(x, ds, e):
            def f(dl):
                return self._single(x, ds[:l] + (dl,) + ds[l + 1:])

            def df(dl):
                return jvp(f, (dl,), (e,))[1]

            return jvp(df, (ds[l],), (e,))[1]  # (C,)

        per_input = vmap(lambda x, ds: vmap(lambda e: along(x, ds, e))(basis))  # (n, out, C)
        return per_input(X, deltas).transpose(1, 2)

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """``sᵀ ∂h/∂z_l`` for every draw: one vjp (backward pass) per draw, vmapped."""
        h, inputs = self._forward(X)
        s = cotangent_fn(h)  # (M, n, C)
        deltas = self._zero_deltas(X.shape[0])

        def one(x, ds, si):  # si: (M, C) for one input
            _, pull = vjp(lambda d: self._single(x, d), ds)
            return vmap(lambda c: pull(c)[0])(si)  # per layer (M, out)

        with torch.no_grad():
            grads = vmap(one)(X, deltas, s.transpose(0, 1))  # per layer (n, M, out)
        grads = [g.transpose(0, 1) for g in grads]
        return Derivatives(h, self._make_blocks(inputs, grads, [None] * len(grads)))


#: Activation modules whose second derivative vanishes wherever it is defined.
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.Identity)


class TorchSequential(TorchModule):
    """``nn.Sequential(Linear, act, ..., Linear)`` (use :func:`from_sequential`).

    Hessian factors without one pass per neuron: ``φ'`` and ``φ''`` of each block of
    activations between two Linear layers by ``torch.func.jvp`` (the block is
    elementwise, so a tangent of ones gives its derivative), ``∂h/∂z`` by ``jacrev``,
    contracted along the chain of Linear weights (:mod:`fishercore.backends._dense`).
    A Sequential that does not end with a Linear uses :class:`TorchModule`'s
    per-neuron path.
    """

    def __init__(self, module: nn.Sequential):
        super().__init__(module)
        blocks, pre = [], True
        for _, m in module.named_children():
            if isinstance(m, nn.Linear):
                blocks.append((m, []))
                pre = False
            elif not pre:
                blocks[-1][1].append(m)
        self._chain = blocks
        self._structured = not blocks[-1][1]

    def _forward_pull(self, X):
        """One forward pass: outputs, each Linear's inputs, and the vjp in the perturbations δ_l.

        δ_l is (n, out_l): row i of a cotangent reaches only input i, so one pull gives every
        input's ``cᵀ ∂h/∂z_l``.  (A Sequential of Linear and elementwise layers applies each
        Linear once, to (n, in) inputs.)
        """
        def f(ds):
            record: list = []
            h = self._call(X, ds, record=record)
            inputs = [None] * len(self.linears)
            for i, a in record:
                inputs[i] = a
            return h, inputs

        h, pull, inputs = vjp(f, self._zero_deltas(X.shape[0]), has_aux=True)
        return h, inputs, pull

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """``sᵀ ∂h/∂z_l`` for every draw: one vjp of the batched forward per draw."""
        with torch.no_grad():
            h, inputs, pull = self._forward_pull(X)
            s = cotangent_fn(h)  # (M, n, C)
            grads = vmap(lambda c: pull(c)[0])(s)  # per layer (M, n, out)
        return Derivatives(h, self._make_blocks(inputs, list(grads), [None] * len(grads)))

    @staticmethod
    def _jacobians(pull, n, C, like):
        """``∂h/∂z_l`` (n, C, out) for every layer: one batched vjp per output."""
        onehot = torch.eye(C, dtype=like.dtype, device=like.device)[:, None, :].expand(C, n, C)
        return [g.transpose(0, 1) for g in vmap(lambda c: pull(c)[0])(onehot)]

    def workspace_per_input(self, hessian: bool = True) -> int:
        if not self._structured:
            return super().workspace_per_input(hessian)
        outs, ins = self._widths()
        curved = [not all(isinstance(m, PIECEWISE_LINEAR) for m in acts) for _, acts in self._chain]
        C = self.n_outputs or outs[-1]
        return 2 * C * (sum(outs) + sum(ins)) * self.dtype.itemsize + (
            chain_workspace(outs, curved, self.dtype.itemsize) if hessian else 0)

    def _activation_derivatives(self, acts, z):
        """``φ'(z)`` and ``φ''(z)`` (None if piecewise linear) of an elementwise block, by jvp."""
        def phi(t):
            for m in acts:
                t = m(t)
            return t

        ones = torch.ones_like(z)

        def dphi(t):
            return jvp(phi, (t,), (ones,))[1]

        d1 = dphi(z)
        if all(isinstance(m, PIECEWISE_LINEAR) for m in acts):
            return d1, None
        return d1, jvp(dphi, (z,), (ones,))[1]

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        with torch.no_grad():
            h, inputs, pull = self._forward_pull(X)
            jac = self._jacobians(pull, X.shape[0], h.shape[1], h)  # per layer (n, C, out)
            if not hessian:
                return Derivatives(h, self._make_blocks(inputs, jac, [None] * len(jac)))
            if not self._structured:
                deltas = self._zero_deltas(X.shape[0])
                hess = [self._diag_hessian(X, deltas, l) for l in range(len(self.linears))]
                return Derivatives(h, self._make_blocks(inputs, jac, hess))
            Ws = [lin.weight.detach() for lin, _ in self._chain]
            d1, curv = [], []
            for l, (lin, acts) in enumerate(self._chain[:-1]):
                z = nn.functional.linear(inputs[l], Ws[l], None if lin.bias is None else lin.bias.detach())
                g1, g2 = self._activation_derivatives(acts, z)
                d1.append(g1)
                curv.append(None if g2 is None else matmul_shared(jac[l + 1], Ws[l + 1]) * g2[:, None, :])
            hess = hessian_factors(Ws, d1, curv, jac)
        return Derivatives(h, self._make_blocks(inputs, jac, hess))


def from_module(module: nn.Module) -> TorchModule:
    """Adapt any ``nn.Module`` whose trainable layers are ``nn.Linear``, each applied once per input.

    Per-neuron factors come from perturbations of each Linear's output, so skip
    connections and custom ``forward`` methods work; a Linear applied twice, or a
    trainable parameter outside a Linear, is refused (use :func:`from_function`).

    Examples
    --------
    >>> import torch, fishercore as fc
    >>> from fishercore.backends import torch as fc_torch
    >>> class Skip(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.inp, self.hid, self.out = torch.nn.Linear(3, 5), torch.nn.Linear(5, 5), torch.nn.Linear(5, 2)
    ...     def forward(self, x):
    ...         a = torch.tanh(self.inp(x))
    ...         return self.out(a + torch.tanh(self.hid(a)))
    >>> model = fc_torch.from_module(Skip().double())
    >>> fc.analyze(model, torch.randn(8, 3, dtype=torch.float64)).fisher.shape
    torch.Size([62])
    """
    return TorchModule(module)


def from_sequential(module: nn.Sequential) -> TorchModule:
    """Adapt ``nn.Sequential(Linear, act, Linear, ..., Linear)``; ``Flatten`` may come first.

    Activations: ``Tanh``, ``Sigmoid``, ``ReLU``, ``LeakyReLU``, ``Softplus``, ``GELU``,
    ``ELU``, ``Identity``.  Anything else raises a ``ValueError`` naming the layer.

    Examples
    --------
    >>> import torch, fishercore as fc
    >>> from fishercore.backends import torch as fc_torch
    >>> net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    >>> res = fc.analyze(fc_torch.from_sequential(net), torch.randn(10, 4, dtype=torch.float64))
    >>> [g.name for g in res.groups]
    ['0.weight', '0.bias', '2.weight', '2.bias']
    """
    if not isinstance(module, nn.Sequential):
        raise TypeError(f"module: expected a torch.nn.Sequential, got {type(module).__name__}")
    children = list(module.named_children())
    if not any(isinstance(m, nn.Linear) for _, m in children):
        raise ValueError("module: the Sequential has no nn.Linear layer")
    for i, (name, m) in enumerate(children):
        if isinstance(m, nn.Flatten):
            if i != 0:
                raise ValueError(f"module: layer {name!r} (Flatten) is only supported as the first layer")
        elif not isinstance(m, (nn.Linear, *ELEMENTWISE)):
            raise ValueError(f"module: layer {name!r} ({type(m).__name__}) is not supported by from_sequential; "
                             f"supported: Linear, Flatten (first), {', '.join(c.__name__ for c in ELEMENTWISE)}; "
                             "use from_module or from_function")
    return TorchSequential(module)


class TorchFunction:
    """Any function ``fn(params, x) -> h`` of a dict of tensors, with exact full columns.

    ``jac`` per group from ``jacrev``; the Hessian diagonal from forward-over-forward
    ``jvp`` along every parameter's basis vector, ``chunk`` directions at a time.
    """

    def __init__(self, fn: Callable, params: Mapping[str, torch.Tensor], *, max_params: int = DEFAULT_MAX_PARAMS,
                 chunk: int = 256):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable fn(params, x) -> h, got {type(fn).__name__}")
        if not isinstance(params, Mapping) or not all(isinstance(v, torch.Tensor) for v in params.values()):
            raise TypeError("params: expected a mapping of names to torch.Tensor")
        self.fn = fn
        self.params = {str(k): v.detach() for k, v in params.items()}
        self.dtype, self.device = _model_dtype_device(self.params, "params")
        self.groups = make_groups([(k, tuple(v.shape)) for k, v in self.params.items()])
        check_full_column_budget(self.groups, max_params, "from_sequential/from_module")
        self.chunk = int(chunk)
        self.n_outputs = None

    def __repr__(self) -> str:
        return f"TorchFunction(P={sum(g.size for g in self.groups)}, {self.dtype})"

    def _single(self, params, x):
        return self.fn(params, x[None])[0]

    def check_inputs(self, X):
        _check_tensor(X, "X", dtype=self.dtype, device=self.device)
        try:
            with torch.no_grad():
                h = self.fn(self.params, X[:1])
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise ValueError(f"X: fn cannot run on inputs of shape {tuple(X.shape)}: {e}") from e
        if not isinstance(h, torch.Tensor) or h.ndim != 2:
            raise ValueError(f"fn: must return outputs of shape (n, C), got {getattr(h, 'shape', type(h))}")
        self.n_outputs = int(h.shape[1])
        return X

    def outputs(self, X):
        with torch.no_grad():
            return self.fn(self.params, X)

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        n = X.shape[0]
        with torch.no_grad():
            h = self.fn(self.params, X)
            jac = vmap(jacrev(self._single), in_dims=(None, 0))(self.params, X)  # name -> (n, C, *shape)
            blocks = []
            for g in self.groups:
                u = jac[g.name].reshape(n, -1, g.size)
                w = self._diag_hessian(X, g) if hessian else None
                blocks.append(ColumnBlock(g.name, u, w))
        return Derivatives(h, tuple(blocks))

    def _diag_hessian(self, X, group):
        """∂²h/∂θ_i² for every parameter i of a group, (n, C, size), chunked over i."""
        name, size = group.name, group.size
        shape = self.params[name].shape

        def along(x, e):
            def f(p):
                return self._single({**self.params, name: p}, x)

            def df(p):
                return jvp(f, (p,), (e,))[1]

            return jvp(df, (self.params[name],), (e,))[1]  # (C,)

        parts = []
        for start in range(0, size, self.chunk):
            k = min(self.chunk, size - start)
            basis = torch.zeros(k, size, dtype=self.dtype, device=self.device)
            basis[torch.arange(k), torch.arange(start, start + k)] = 1.0
            basis = basis.reshape(k, *shape)
            parts.append(vmap(lambda x, basis=basis: vmap(lambda e: along(x, e))(basis))(X))  # (n, k, C)
        return torch.cat(parts, dim=1).transpose(1, 2)

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """Per-sample gradients of ``Σ_c s_c h_c`` for every draw: one vjp per draw."""
        h = self.outputs(X)
        s = cotangent_fn(h)

        def one(x, si):
            _, pull = vjp(lambda p: self._single(p, x), self.params)
            return vmap(lambda c: pull(c)[0])(si)  # name -> (M, *shape)

        with torch.no_grad():
            grads = vmap(one)(X, s.transpose(0, 1))  # name -> (n, M, *shape)
        n, M = X.shape[0], s.shape[0]
        blocks = tuple(ColumnBlock(g.name, grads[g.name].reshape(n, M, g.size).transpose(0, 1), None)
                       for g in self.groups)
        return Derivatives(h, blocks)


def from_function(fn: Callable, params: Mapping[str, torch.Tensor], *, max_params: int = DEFAULT_MAX_PARAMS,
                  chunk: int = 256) -> TorchFunction:
    """Adapt any ``fn(params, x) -> h`` (x a batch (n, ...), h of shape (n, C)).

    Exact full Jacobian columns and Hessian diagonals per parameter; the cost grows
    with ``P × n``, so models with more than ``max_params`` parameters are refused.
    Group names are the keys of ``params``.

    Examples
    --------
    >>> import torch, fishercore as fc
    >>> from fishercore.backends import torch as fc_torch
    >>> params = {"w": torch.randn(3, 2, dtype=torch.float64), "s": torch.ones(2, dtype=torch.float64)}
    >>> model = fc_torch.from_function(lambda p, x: torch.sin(x @ p["w"]) * p["s"], params)
    >>> fc.analyze(model, torch.randn(6, 3, dtype=torch.float64), "gaussian").fisher.shape
    torch.Size([8])
    """
    return TorchFunction(fn, params, max_params=max_params, chunk=chunk)



def all_reduce(analysis, group=None):
    """The analysis of every process's inputs, from each process's own (``torch.distributed``).

    Call on every rank of an initialised process group (``torchrun`` sets one up; gloo on
    CPUs, NCCL on GPUs) with that rank's :class:`fishercore.FisherAnalysis` of its share of
    the data; every rank gets the same result, equal to one analysis of all the data up to
    rounding.  Two ``all_reduce`` calls carry the sums (see
    :func:`fishercore.analysis.all_reduce_sums`); an ``all_gather_object`` first checks that
    every rank analysed the same parameter groups with the same family.

    The analysis must hold torch tensors (analyse torch inputs) on a device the process
    group's backend serves.
    """
    import torch.distributed as dist

    from fishercore.analysis import FisherAnalysis, all_reduce_sums

    if not isinstance(analysis, FisherAnalysis):
        raise TypeError(f"analysis: expected a fishercore.FisherAnalysis, got {type(analysis).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed: no initialised process group; call "
                           "torch.distributed.init_process_group first (torchrun provides the environment)")
    if not isinstance(analysis.sums.fisher, torch.Tensor):
        raise TypeError(f"analysis: its sums are {type(analysis.sums.fisher).__name__}, not torch tensors; "
                        "analyse torch inputs on every rank")
    key = ([(g.name, g.shape) for g in analysis.groups], repr(analysis.family), str(analysis.sums.fisher.dtype))
    keys = [None] * dist.get_world_size(group)
    dist.all_gather_object(keys, key, group=group)
    if any(k != keys[0] for k in keys):
        bad = next(r for r, k in enumerate(keys) if k != keys[0])
        raise ValueError(f"analysis: rank {bad} analysed other parameter groups, family or dtype than rank 0 "
                         f"({keys[bad][1:]} vs {keys[0][1:]})")
    n = torch.tensor([float(analysis.n_inputs)], dtype=torch.float64, device=analysis.sums.fisher.device)
    dist.all_reduce(n, group=group)
    n_total = int(round(n.item()))

    def reduce_sum(t):
        t = t.clone()
        dist.all_reduce(t, group=group)
        return t

    with torch.no_grad():
        sums = all_reduce_sums(analysis.sums, analysis.n_inputs, n_total, reduce_sum)
    return FisherAnalysis(sums, n_total, analysis.groups, analysis.family)
