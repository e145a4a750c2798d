"""``from_module``: any ``nn.Module``; per-neuron factors where a Linear allows them, full columns elsewhere.

A ``nn.Linear`` applied once per input to a vector (n, in) is a dense layer: its output ``z_l``
is perturbed, ``z_l + δ_l`` (a forward hook), and the column rule
(:mod:`fishercore.backends.rules.columns`, docs/math.md §9) differentiates ``f(x, δ, θ') = h``
— one ``vjp`` per output gives ``∂h/∂z_l`` for these layers and the full columns ``∂h/∂θ'`` of
every other parameter (convolutions, norms, embeddings, attention, a Linear applied at every
token) in the same backward pass.  Second order: forward over forward along each neuron of a
dense layer (``diag ∂²h/∂z_l²``); along each parameter of the other groups while their curved
parameters number at most ``max_params``; exact zeros, at any size, for groups the module is
piecewise linear in (read off its ATen graph, docs/math.md §11); otherwise not computed.  It
knows nothing of the graph between the layers, so it is independent of the dense-chain rule
that :func:`~fishercore.backends.torch.from_sequential` uses.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn
from torch.func import functional_call

from fishercore._protocol import ColumnBlock, Derivatives
from fishercore._validation import (
    check_input_dtype,
    check_input_shape,
    check_n_tokens,
    check_positive_int,
    second_order_within,
)

from ._torch_base import (
    MODULE_LOCK,
    OPS,
    TorchModel,
    check_tensor,
    flat_outputs,
    outputs_shape,
    randomness_refused,
)
from ._torch_composites import composites
from ._torch_linearity import curved_params
from .rules import columns, dense

__all__ = ["DenseLayer", "Perturbed", "TorchModule"]

#: Parameters (of groups the module is curved in, outside dense layers) above which from_module and
#: from_function leave second order out: forward over forward costs one pass per parameter and input.
DEFAULT_MAX_PARAMS = 20_000


class DenseLayer(NamedTuple):
    """A linear map applied once per input to a vector, ``z = W a (+ b)``: the groups of its weight (and bias),
    its widths, and whether the weight is stored (in, out)."""

    name: str
    weight: str
    bias: str | None
    transposed: bool
    out: int
    in_: int


class Perturbed:
    """What from_module and from_function share: ``f(x, δ, θ') = h`` with ``δ_l`` added to each dense layer's
    output (``self.dense``) and ``θ'`` the column groups, differentiated by the column rule.

    A subclass sets ``params``, ``dtype``, ``device``, ``groups``, ``n_outputs``, ``dense``,
    ``column_groups``, ``linear_groups``, ``second_order``, ``chunk`` and implements
    ``_call(X, deltas, params, record)`` and ``_lock()``; ``_what`` names it in messages.
    """

    _what = "module"

    def _layout(self):
        return tuple((d.weight, d.bias, d.transposed) for d in self.dense)

    def _outputs(self, X, deltas=None, params=None, record=None):
        return flat_outputs(self._call(X, deltas, params, record))

    def _single(self, x, deltas, others):
        """h (C',) for one input x (unbatched), with one δ per dense layer and the column groups' values ``others``."""
        return self._outputs(x[None], tuple(d[None] for d in deltas), {**self.params, **others})[0]

    def _forward(self, X):
        record: list = []
        h = self._outputs(X, record=record)
        inputs = [None] * len(self.dense)
        for i, a in record:
            inputs[i] = a
        for layer, a in zip(self.dense, inputs):
            if a is None or a.ndim != 2 or a.shape[0] != X.shape[0]:
                raise ValueError(f"X: the linear map {layer.name!r} saw inputs of shape "
                                 f"{None if a is None else tuple(a.shape)} for a batch of {X.shape[0]}, unlike when "
                                 f"the model was built; the {self._what}'s structure must not depend on its inputs")
        return h, inputs

    def _zero_deltas(self, n):
        return tuple(torch.zeros(n, d.out, dtype=self.dtype, device=self.device) for d in self.dense)

    def _others(self):
        return {g.name: self.params[g.name] for g in self.column_groups}

    def outputs(self, X):
        with self._lock(), torch.no_grad():
            return self._outputs(X)

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input the vmapped transforms hold beyond the blocks (used to size batches).

        C cotangents through every dense layer and the column groups' gradients; the per-neuron
        Hessian pass: one forward-over-forward per neuron of the widest layer, each holding every
        layer's values three times (primal and two tangents).
        """
        outs = [d.out for d in self.dense] or [0]
        per_pass = sum(outs) + sum(d.in_ for d in self.dense)
        second = 3 * max(outs) * per_pass if hessian else 0
        columns_ = sum(g.size for g in self.column_groups)
        return (2 * self.n_outputs * (per_pass + columns_) + second) * self.dtype.itemsize

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        return self.derivatives_of(X, None, hessian=hessian)

    def derivatives_of(self, X, groups, *, hessian: bool = True) -> Derivatives:
        """The blocks of the named ``groups`` (all for None): the dense layers that own one of them, and their
        column groups; one vjp per output differentiates only those."""
        n = X.shape[0]
        eye = torch.eye(self.n_outputs, dtype=self.dtype, device=self.device)
        layout = self._layout()
        wanted = None if groups is None else set(groups)
        layers = [l for l, (w, b, _) in enumerate(layout) if wanted is None or w in wanted or b in wanted]
        cols = [g for g in self.column_groups if wanted is None or g.name in wanted]
        chosen = {g.name: self.params[g.name] for g in cols}

        def f(x, ds, prim):
            full = list(ds)
            for i, l in enumerate(layers):
                full[l] = prim[0][i]
            return self._single(x, tuple(full), prim[1])

        with self._lock(), torch.no_grad(), randomness_refused(self._what), composites():
            h, inputs = self._forward(X)
            deltas = self._zero_deltas(n)
            jac_d, jac_c = OPS.vmap(lambda x, ds: columns.pullback(
                OPS, lambda prim: f(x, ds, prim), (tuple(ds[l] for l in layers), chosen), eye))(X, deltas)
            hess = [self._layer_hessian(X, deltas, l, hessian) for l in layers]
            blocks = dense.dense_blocks([layout[l] for l in layers], [inputs[l] for l in layers], list(jac_d),
                                        hess) + tuple(
                ColumnBlock(g.name, jac_c[g.name].reshape(n, self.n_outputs, g.size),
                            self._column_hessian(X, g, hessian)) for g in cols)
        return Derivatives(h, blocks)

    def _layer_hessian(self, X, deltas, l, hessian):
        """diag ∂²h/∂z_l², (n, C, out): zeros where the module is piecewise linear in the layer's parameters."""
        if not hessian:
            return None
        weight, bias, _ = self._layout()[l]
        if all(g is None or g in self.linear_groups for g in (weight, bias)):
            return torch.zeros(X.shape[0], self.n_outputs, deltas[l].shape[1], dtype=self.dtype, device=self.device)
        out = deltas[l].shape[1]

        def neurons(start, k):
            E = columns.unit_directions(OPS.xp, (out,), start, k, dtype=self.dtype, device=self.device)

            def one(x, ds):
                return columns.diag_hessian(OPS, lambda dl: self._single(x, ds[:l] + (dl,) + ds[l + 1:], {}),
                                            ds[l], E)

            return OPS.vmap(one)(X, deltas)  # (n, k, C)

        return columns.chunked(out, out, neurons)

    def _column_hessian(self, X, group, hessian):
        """A column group's Hessian diagonals by the column rule (:func:`.rules.columns.group_hessian`)."""
        def compute():
            deltas = self._zero_deltas(1)

            def chunk(start, k):
                E = columns.unit_directions(OPS.xp, group.shape, start, k, dtype=self.dtype, device=self.device)

                def one(x):
                    return columns.diag_hessian(
                        OPS, lambda p: self._single(x, tuple(d[0] for d in deltas), {group.name: p}),
                        self.params[group.name], E)

                return OPS.vmap(one)(X)

            return columns.chunked(group.size, self.chunk, chunk)

        return columns.group_hessian(OPS.xp, (X.shape[0], self.n_outputs, group.size), hessian=hessian,
                                     linear=group.name in self.linear_groups, second_order=self.second_order,
                                     compute=compute, dtype=self.dtype, device=self.device)

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """``sᵀ ∂h/∂z_l`` (n, M, out) and ``sᵀ ∂h/∂θ'`` (n, M, p) for every draw: one vjp per draw, vmapped."""
        others = self._others()
        with self._lock(), torch.no_grad(), randomness_refused(self._what), composites():
            h, inputs = self._forward(X)
            s = cotangent_fn(h).transpose(0, 1)  # (n, M, C)
            n, M = s.shape[:2]
            grads, cols = OPS.vmap(lambda x, ds, si: columns.pullback(
                OPS, lambda prim: self._single(x, prim[0], prim[1]), (ds, others), si))(X, self._zero_deltas(n), s)
        blocks = dense.dense_blocks(self._layout(), inputs, list(grads), [None] * len(grads)) + tuple(
            ColumnBlock(g.name, cols[g.name].reshape(n, M, g.size), None) for g in self.column_groups)
        return Derivatives(h, blocks)


class TorchModule(Perturbed, TorchModel):
    """Any ``torch.nn.Module`` mapping a batch to outputs (n, C) or (n, T, C) (use :func:`from_module`)."""

    def __init__(self, module: nn.Module, input_shape=None, *, input_dtype=None, n_tokens=None,
                 max_params: int = DEFAULT_MAX_PARAMS, chunk: int = 256):
        super().__init__(module)
        self.input_shape = check_input_shape(input_shape)
        self.input_dtype = check_input_dtype(input_dtype, OPS.xp)
        embeddings = {m.num_embeddings for m in module.modules() if isinstance(m, nn.Embedding)}
        if n_tokens is None and self.input_dtype is not None and len(embeddings) == 1:
            n_tokens = embeddings.pop()  # ids index the module's one embedding table
        self.n_tokens = check_n_tokens(n_tokens, self.input_dtype, required=True)
        self.chunk = check_positive_int(chunk, "chunk")
        all_linears = self.linears
        if self.input_shape is None and not all_linears:
            raise ValueError("input_shape: required for a module without nn.Linear layers (the shape of one input, "
                             "without the batch axis)")
        probe_shape = self.input_shape or (all_linears[0][1].in_features,)
        probe = torch.zeros((2, *probe_shape), dtype=self.input_dtype or self.dtype, device=self.device)
        record: list = []
        try:
            with MODULE_LOCK, torch.no_grad():
                h = self._call(probe, record=record, linears=all_linears)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise ValueError(f"input_shape: the module cannot run on inputs of shape {probe_shape} ({e}); "
                             "pass input_shape=, the shape of one input without the batch axis") from e
        self.output_shape = outputs_shape(h, "module")
        self.n_outputs = math.prod(self.output_shape)
        # dense layers: applied once per forward pass, to one vector per input
        seen = [[a for i, a in record if i == k] for k in range(len(all_linears))]
        self.linears = [lin for lin, inputs in zip(all_linears, seen)
                        if len(inputs) == 1 and inputs[0].ndim == 2 and inputs[0].shape[0] == probe.shape[0]]
        self.dense = [DenseLayer(name, f"{name}.weight" if name else "weight",
                                 None if lin.bias is None else (f"{name}.bias" if name else "bias"), False,
                                 lin.out_features, lin.in_features) for name, lin in self.linears]
        owned = {g for w, b, _ in self._layout() for g in (w, b) if g is not None}
        self.column_groups = tuple(g for g in self.groups if g.name not in owned)
        curved = curved_params(lambda p, x: self._outputs(x, params=p), self.params, probe[:1])
        #: Groups the module is piecewise linear in (w = 0 exactly, any size): read off its ATen graph.
        self.linear_groups = tuple(g.name for g in self.groups if g.name not in curved)
        self.second_order = second_order_within([g for g in self.column_groups if g.name in curved], max_params)

    def _lock(self):
        return MODULE_LOCK  # the hooks live on the module: one call at a time

    # -- the perturbed network f(x, δ, θ') ----------------------------------------
    def _call(self, x, deltas=None, params=None, record=None, linears=None):
        """The module on a batch x with parameters ``params`` (default its own); δ_l added to each dense layer's
        output; the inputs of ``linears`` (default the dense layers) recorded."""
        linears = self.linears if linears is None else linears
        handles = []
        try:
            for i, (_, lin) in enumerate(linears):
                if deltas is not None:
                    handles.append(lin.register_forward_hook(lambda m, inp, out, d=deltas[i]: out + d))
                if record is not None:
                    handles.append(lin.register_forward_pre_hook(
                        lambda m, inp, i=i: record.append((i, inp[0]))))
            return functional_call(self.module, (self.params if params is None else params, self.buffers), (x,))
        finally:
            for h in handles:
                h.remove()

    # -- the protocol -----------------------------------------------------------
    def check_inputs(self, X):
        check_tensor(X, dtype=self.dtype, device=self.device, input_shape=self.input_shape,
                     input_dtype=self.input_dtype, n_tokens=self.n_tokens)
        try:
            with MODULE_LOCK, torch.no_grad():
                h = self._call(X[:1])
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"X: the module cannot run on inputs of shape {tuple(X.shape)}: {e}") from e
        if outputs_shape(h, "module") != self.output_shape:
            raise ValueError(f"X: the module gives outputs of shape {tuple(h.shape[1:])} on inputs of shape "
                             f"{tuple(X.shape)}, not the {self.output_shape} it gave when built; pass input_shape=")
        return X

