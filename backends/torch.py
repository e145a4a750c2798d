r"""PyTorch adapter: walks a torch model and hands the layer rules ``torch.func``'s operations.

* :func:`from_sequential` — ``torch.nn.Sequential`` of ``nn.Linear`` and elementwise
  activations (``Tanh``, ``Sigmoid``, ``ReLU``, ``LeakyReLU``, ``Softplus``, ``GELU``,
  ``ELU``, ``Identity``), optionally starting with ``Flatten``: the dense-chain rule
  (:mod:`fishercore.backends.rules.dense`), with ``φ'`` and ``φ''`` of each block of
  activations from ``torch.func.jvp`` (docs/math.md §8).
* :func:`from_module` — any ``nn.Module`` whose trainable layers are ``nn.Linear``, each
  applied once per input (skip connections, custom ``forward``): each Linear's output
  ``z_l`` is perturbed, ``z_l + δ_l`` (a forward hook), and the column rule
  (:mod:`fishercore.backends.rules.columns`) differentiates ``f(x, δ) = h`` — one ``vjp``
  per output for ``∂h/∂z_l``, forward over forward along each neuron for
  ``diag ∂²h/∂z_l²`` (docs/math.md §9).  It knows nothing of the graph between the
  Linear layers, and is independent of the dense-chain rule (the cross-backend suite
  relies on that).
* :func:`from_function` — anything else, ``fn(params, x) -> h``: exact full columns by
  the same column rule.

Every transform is ``vmap``-ed over inputs (and directions, and draws); there are no
Python loops over samples.  Group names are the module's own parameter names
(``"0.weight"``, ``"0.bias"``, ...), in ``module.parameters()`` order.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch
from torch import nn

from fishercore._protocol import Derivatives, make_groups
from fishercore._validation import (
    check_input_dtype,
    check_input_shape,
    check_n_tokens,
    check_positive_int,
    second_order_within,
)

from ._torch_activations import CallLog
from ._torch_base import (
    MODULE_LOCK,
    OPS,
    TorchModel,
    check_tensor,
    flat_outputs,
    model_dtype_device,
    outputs_shape,
)
from ._torch_module import (
    DEFAULT_MAX_PARAMS,
    DenseLayer,
    Perturbed,
    TorchModule,
    _LinearCalls,
    chain_derivatives,
    chain_pullback,
    largest_value,
)
from .rules import dense
from .rules.activations import Autodiff

__all__ = ["ACTIVATION_MODULES", "ELEMENTWISE", "TorchFunction", "TorchModule", "TorchSequential", "all_reduce",
           "from_function", "from_module", "from_sequential", "sequential_from_layers"]

#: Modules accepted between the Linear layers of :func:`from_sequential`.
ELEMENTWISE = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.LeakyReLU, nn.Softplus, nn.GELU, nn.ELU, nn.SiLU, nn.Mish, nn.SELU,
               nn.CELU, nn.Hardswish, nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.ReLU6, nn.Hardtanh, nn.Identity)

#: Activation modules whose second derivative vanishes wherever it is defined.
PIECEWISE_LINEAR = (nn.ReLU, nn.LeakyReLU, nn.ReLU6, nn.Hardtanh, nn.Identity)


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


class TorchSequential(TorchModel):
    """``nn.Sequential(Linear, act, ..., Linear)`` (use :func:`from_sequential`).

    The dense-chain rule with the module's own activations: the block of elementwise
    modules after each Linear is one activation whose ``φ'`` and ``φ''`` come from
    ``torch.func.jvp`` (a tangent of ones: the block is elementwise).  No hooks and no
    ``functional_call``: the Linear weights and the activation modules are applied
    directly, so one model is safe to use from several threads.
    """

    def __init__(self, module: nn.Sequential):
        super().__init__(module)  # in eval mode: Dropout is the identity and is left out
        children = [m for _, m in module.named_children() if not isinstance(m, nn.modules.dropout._DropoutNd)]
        self.flatten = isinstance(children[0], nn.Flatten)
        first = next(i for i, m in enumerate(children) if isinstance(m, nn.Linear))
        self._prefix = children[int(self.flatten):first]  # elementwise modules applied to the inputs
        blocks = []
        for m in children[first:]:
            if isinstance(m, nn.Linear):
                blocks.append((m, []))
            else:
                blocks[-1][1].append(m)
        self._chain = [(lin, self._activation(acts)) for lin, acts in blocks]
        self.n_inputs, self.n_outputs = blocks[0][0].in_features, blocks[-1][0].out_features

    @staticmethod
    def _activation(mods):
        if not mods:
            return None

        def phi(t):
            for m in mods:
                t = m(t)
            return t

        return Autodiff(phi, OPS, all(isinstance(m, PIECEWISE_LINEAR) for m in mods))

    def _rule_args(self):
        weights = tuple(lin.weight.detach() for lin, _ in self._chain)
        biases = tuple(None if lin.bias is None else lin.bias.detach() for lin, _ in self._chain)
        return weights, biases, tuple(act for _, act in self._chain)

    def _flat(self, X):
        """The first Linear's inputs: X flattened (after a leading Flatten) and through any modules before it."""
        X = X.reshape(X.shape[0], -1) if self.flatten else X
        for m in self._prefix:
            X = m(X)
        return X

    def check_inputs(self, X):
        check_tensor(X, dtype=self.dtype, device=self.device)
        width = 1
        for s in X.shape[1:]:
            width *= int(s)
        if (X.ndim != 2 and not self.flatten) or width != self.n_inputs:
            raise ValueError(f"X: the module cannot run on inputs of shape {tuple(X.shape)}: its first Linear "
                             f"expects {self.n_inputs} features per input")
        return X

    def outputs(self, X):
        weights, biases, acts = self._rule_args()
        with torch.no_grad():
            return dense.forward(weights, biases, self._flat(X), activations=acts)[0]

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        with torch.no_grad():
            return chain_derivatives(*self._rule_args(), self._layout(), self._flat(X), hessian=hessian)

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """``sᵀ ∂h/∂z_l`` (n, M, out) for every draw: the rule's backpropagation of the scores."""
        with torch.no_grad():
            return chain_pullback(*self._rule_args(), self._layout(), self._flat(X), cotangent_fn)

    def workspace_per_input(self, hessian: bool = True) -> int:
        widths = [lin.out_features for lin, _ in self._chain]
        curved = [act is not None and not act.piecewise_linear for _, act in self._chain]
        return dense.workspace(widths, curved, self.dtype.itemsize, hessian)


def from_module(module: nn.Module, *, input_shape=None, input_dtype=None, n_tokens: int | None = None,
                max_params: int = DEFAULT_MAX_PARAMS, chunk: int = 256) -> TorchModule:
    """Adapt any ``nn.Module`` whose forward maps a batch to outputs (n, C), or (n, T, C) for sequences.

    Put it in ``eval()`` mode first: Dropout is then the identity and BatchNorm uses its running
    statistics (training mode is refused).  A module that is only a dense chain (Linear layers and
    elementwise activations) takes the dense-chain rule of :func:`from_sequential`.  Otherwise every
    ``nn.Linear`` applied once per input to a vector gets per-neuron factors, from perturbations of
    its output (skip connections and custom ``forward`` methods work); every other parameter
    (convolutions, norms, embeddings, attention, a Linear applied at every position) gets full
    columns in the same backward passes.  First order is exact at any size.  Second order
    (docs/math.md §11, §13, docs/convolutional.md) is zero where the module is piecewise linear in
    a group (ReLU, pooling, eval BatchNorm: read off its graph); exact at any size for the dense
    layers, and for ``Conv1d``/``Conv2d`` layers whose curvature comes from elementwise activations
    (the curvature rule); for other conv layers by the conv rule, and along every parameter of the
    other groups, while their curved parameters number at most ``max_params`` (``chunk`` at a
    time); and otherwise NaN, "not computed" (:attr:`fishercore.FisherAnalysis.first_order_only`).

    ``input_shape`` is the shape of one input (without the batch axis); by default the module
    is probed with inputs of its first Linear's width.  ``input_dtype``: an integer dtype (e.g.
    ``torch.long``) for modules that take token ids, which must lie in ``[0, n_tokens)``; by default
    ``n_tokens`` is the size of the module's ``nn.Embedding`` when it has one.

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
    >>> model.n_outputs
    2
    >>> fc.analyze(model, torch.randn(8, 3, dtype=torch.float64)).fisher.shape
    torch.Size([62])
    """
    return TorchModule(module, input_shape, input_dtype=input_dtype, n_tokens=n_tokens, max_params=max_params,
                       chunk=chunk)


def from_sequential(module: nn.Sequential) -> TorchSequential:
    """Adapt ``nn.Sequential(Linear, act, Linear, ..., Linear)``; ``Flatten`` may come first.

    Activations: ``Tanh``, ``Sigmoid``, ``ReLU``, ``LeakyReLU``, ``Softplus``, ``GELU``,
    ``ELU``, ``SiLU``, ``Mish``, ``SELU``, ``CELU``, ``Hardswish``, ``LogSigmoid``, ``Softsign``,
    ``Tanhshrink``, ``ReLU6``, ``Hardtanh``, ``Identity``, one or several between two Linear layers,
    and after the last;
    ``Dropout`` anywhere, in eval mode (where it is the identity; in training mode it is
    refused, saying to call ``module.eval()``).  Anything else raises a ``ValueError`` naming
    the layer.

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
        if isinstance(m, nn.modules.dropout._DropoutNd):
            continue  # the identity in eval mode (TorchModel refuses training mode)
        if isinstance(m, nn.Flatten):
            if i != 0:
                raise ValueError(f"module: layer {name!r} (Flatten) is only supported as the first layer")
        elif not isinstance(m, (nn.Linear, *ELEMENTWISE)):
            raise ValueError(f"module: layer {name!r} ({type(m).__name__}) is not supported by from_sequential; "
                             f"supported: Linear, Flatten (first), {', '.join(c.__name__ for c in ELEMENTWISE)}; "
                             "use from_module or from_function")
    return TorchSequential(module)


class TorchFunction(Perturbed):
    """Any function ``fn(params, x) -> h`` of a dict of tensors.

    Linear maps applied once per input to a vector (``F.linear``, as ``nn.Linear`` calls it, or
    ``x @ W``) whose weight (and bias) appear nowhere else get per-neuron factors, found by
    watching the calls (a ``TorchFunctionMode``); every other parameter gets full columns — one
    vjp per output for all of them — and the Hessian diagonal by forward over forward along
    every parameter's unit vector, ``chunk`` directions at a time
    (:mod:`fishercore.backends.rules.columns`).
    """

    _what = "fn"

    def __init__(self, fn: Callable, params: Mapping[str, torch.Tensor], *, input_shape,
                 max_params: int = DEFAULT_MAX_PARAMS, chunk: int = 256, input_dtype=None, n_tokens=None):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable fn(params, x) -> h, got {type(fn).__name__}")
        if not isinstance(params, Mapping) or not all(isinstance(v, torch.Tensor) for v in params.values()):
            raise TypeError("params: expected a mapping of names to torch.Tensor")
        self.user_fn = fn
        self.params = {str(k): v.detach() for k, v in params.items()}
        self.dtype, self.device = model_dtype_device(self.params, "params")
        self.groups = make_groups([(k, tuple(v.shape)) for k, v in self.params.items()])
        check_positive_int(max_params, "max_params")
        self.chunk = check_positive_int(chunk, "chunk")
        self.input_shape = check_input_shape(input_shape, required_by="from_function")
        self.input_dtype = check_input_dtype(input_dtype, OPS.xp)
        self.n_tokens = check_n_tokens(n_tokens, self.input_dtype, required=True)
        probe = torch.zeros((2, *self.input_shape), dtype=input_dtype or self.dtype, device=self.device)
        watch, log = _LinearCalls(params=self.params), CallLog()
        try:
            with torch.no_grad(), watch, log:
                h = fn(self.params, probe)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise ValueError(f"input_shape: fn cannot run on one input of shape {self.input_shape} ({e})") from e
        #: (C,), or (T, C) for sequence outputs, which the core sees flattened (n, T·C)
        self.output_shape = outputs_shape(h, "fn")
        self.n_outputs = math.prod(self.output_shape)
        self._value_size = largest_value(log, probe.shape[0])
        self.dense = [DenseLayer(w, w, b if b is not None and watch.seen.get(b) == 1 else None, t, out.shape[1],
                                 x.shape[1])
                      for w, x, b, t, out in watch.calls
                      if watch.seen.get(w) == 1 and self.params[w].ndim == 2 and x.ndim == 2 and out.ndim == 2
                      and x.shape[0] == probe.shape[0]]
        owned = {g for d in self.dense for g in (d.weight, d.bias) if g is not None}
        self.column_groups = tuple(g for g in self.groups if g.name not in owned)
        self._find_chain(lambda x: self.user_fn(self.params, x), probe)
        curved = self._find_curvature(self.fn, probe[:1])
        #: Groups the function is piecewise linear in (w = 0 exactly, any size): read off its ATen graph.
        self.linear_groups = tuple(g.name for g in self.groups if g.name not in curved)
        self.second_order = second_order_within([g for g in self.column_groups if g.name in curved], max_params)

    def __repr__(self) -> str:
        return f"TorchFunction(P={sum(g.size for g in self.groups)}, {len(self.dense)} dense, {self.dtype})"

    def _lock(self):
        # torch.func's forward-mode levels are process-wide, not per thread: two threads taking jvps at once
        # crash torch (or corrupt each other's tangents), so differentiation takes the adapters' one lock
        return MODULE_LOCK

    def fn(self, params, X):
        """The function's outputs, flattened to (n, C') (sequence outputs position-major)."""
        return flat_outputs(self.user_fn(params, X))

    def _call(self, X, deltas=None, params=None, record=None):
        """fn on a batch X with ``params`` (default its own); δ_l added to each dense layer's output; their inputs
        recorded."""
        params = self.params if params is None else params
        if deltas is None and record is None:
            return self.user_fn(params, X)
        with _LinearCalls([params[d.weight] for d in self.dense], deltas, record):
            return self.user_fn(params, X)

    def check_inputs(self, X):
        return check_tensor(X, dtype=self.dtype, device=self.device, input_shape=self.input_shape,
                            input_dtype=self.input_dtype, n_tokens=self.n_tokens)


def from_function(fn: Callable, params: Mapping[str, torch.Tensor], *, input_shape=None,
                  max_params: int = DEFAULT_MAX_PARAMS, chunk: int = 256, input_dtype=None,
                  n_tokens: int | None = None) -> TorchFunction:
    """Adapt any ``fn(params, x) -> h`` (x a batch of shape ``(n, *input_shape)``, h of shape (n, C)).

    Exact full Jacobian columns (first order: any size) and, for models of at most
    ``max_params`` parameters, Hessian diagonals per parameter (their cost grows with
    ``P × n``); beyond, the second-order fields are NaN, "not computed"
    (:attr:`fishercore.FisherAnalysis.first_order_only`).  Linear maps applied once to a vector get
    per-neuron factors, groups whose curvature comes from elementwise activations the curvature
    rule (docs/math.md §13), and a function that is only a dense chain (``F.linear`` and elementwise
    activations, e.g. ``functional_call`` of an MLP) the dense-chain rule — all found by watching
    the calls the function makes.
    ``input_dtype``: an integer dtype (e.g. ``torch.long``) for models that take token ids
    (embeddings); inputs must then have it, with values in ``[0, n_tokens)`` (``n_tokens``, the
    number of ids, is then required).  Outputs may be (n, T, C): one label per position
    (:class:`fishercore.Positions`).  Group names are the keys of ``params``;
    ``input_shape`` (the shape of one input,
    without the batch axis) is required: one call on it gives the output width.

    Examples
    --------
    >>> import torch, fishercore as fc
    >>> from fishercore.backends import torch as fc_torch
    >>> params = {"w": torch.randn(3, 2, dtype=torch.float64), "s": torch.ones(2, dtype=torch.float64)}
    >>> model = fc_torch.from_function(lambda p, x: torch.sin(x @ p["w"]) * p["s"], params, input_shape=(3,))
    >>> fc.analyze(model, torch.randn(6, 3, dtype=torch.float64), "gaussian").fisher.shape
    torch.Size([8])
    """
    return TorchFunction(fn, params, input_shape=input_shape, max_params=max_params, chunk=chunk,
                         input_dtype=input_dtype, n_tokens=n_tokens)


def all_reduce(analysis, group=None):
    """The analysis of every process's inputs, from each process's own (``torch.distributed``).

    Call on every rank of an initialised process group (``torchrun`` sets one up; gloo on
    CPUs, NCCL on GPUs) with that rank's :class:`fishercore.FisherAnalysis` of its share of
    the data; every rank gets the same result, equal to one analysis of all the data up to
    rounding.  Two ``all_reduce`` calls carry the sums (:func:`fishercore.all_reduce_sums`,
    the reduction every analysis uses); an ``all_gather_object`` first checks that every
    rank analysed the same parameter groups with the same family.

    The analysis must hold torch tensors (analyse torch inputs) on a device the process
    group's backend serves.
    """
    import torch.distributed as dist

    from fishercore.result import FisherAnalysis
    from fishercore.sums import all_reduce_sums

    if not isinstance(analysis, FisherAnalysis):
        raise TypeError(f"analysis: expected a fishercore.FisherAnalysis, got {type(analysis).__name__}")
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed: no initialised process group; call "
                           "torch.distributed.init_process_group first (torchrun provides the environment)")
    if not isinstance(analysis.sums.fisher, torch.Tensor):
        raise TypeError(f"analysis: its sums are {type(analysis.sums.fisher).__name__}, not torch tensors; "
                        "analyse torch inputs on every rank")
    key = ([(g.name, g.shape) for g in analysis.groups], analysis.family, str(analysis.sums.fisher.dtype))
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
