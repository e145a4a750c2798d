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

import contextlib
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.overrides import TorchFunctionMode

from fishercore._batching import CACHE_BYTES
from fishercore._protocol import ColumnBlock, Derivatives
from fishercore._validation import (
    check_input_dtype,
    check_input_shape,
    check_n_tokens,
    check_positive_int,
    second_order_within,
)

from ._torch_activations import Activations, CallLog, dense_chain
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
from .rules import columns, conv, curvature, dense
from .rules.activations import Autodiff

__all__ = ["DenseLayer", "Perturbed", "TorchModule", "chain_derivatives", "chain_pullback", "largest_value"]

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


class ConvLayer(NamedTuple):
    """A ``nn.Conv1d``/``nn.Conv2d`` applied once per forward pass, whose weight (and bias) appear nowhere else:
    its module, groups, geometry (:class:`.rules.conv.ConvSpec`) and patch index."""

    module: nn.Module
    weight: str
    bias: str | None
    spec: conv.ConvSpec
    index: torch.Tensor


class ConvSite(NamedTuple):
    """How the tangents of a conv layer's output reach the activations after it (found when the model is built,
    docs/math.md §13): which read the output unchanged (``readers``, their terms are direct), which read it
    scaled elementwise (``scaled``: a batch norm between, direct as well) and which others are called after it
    (``others``).  With ``via``, a later conv layer that every other activation's tangent passes through channel
    by channel — the ones before it (``pre``) see a tangent in the channel it started in, and the ones after it see
    ``via``'s tangent from that channel alone (``post_readers`` read ``via``'s output unchanged, ``post_scaled``
    scaled elementwise, ``post_others`` need a pass from there) — so one pass carries every output channel's
    tangents at once."""

    readers: tuple
    others: tuple
    via: int | None = None
    scaled: tuple = ()
    pre: tuple = ()
    post_readers: tuple = ()
    post_scaled: tuple = ()
    post_others: tuple = ()


class _ConvBatch:
    """One batch's conv layers, shared by the groups of a :meth:`TorchModule.derivatives_of` call: each layer's input
    (``inputs``, {k: (n, I, *spatial)}), its patches (made once, for both orders), the groups asked for
    (``wanted``), and the Hessian diagonals that a layer's weight and bias got together, each handed out once."""

    def __init__(self, model, inputs: dict, wanted):
        self.model, self.inputs, self.wanted = model, inputs, set(wanted)
        self._patches: dict = {}
        self.done: dict = {}

    def patches(self, k):
        """Conv layer k's input patches (n, I·K, P) (:func:`.rules.conv.patches`)."""
        if k not in self._patches:
            layer = self.model.convs[k]
            self._patches[k] = conv.patches(self.inputs[k], layer.spec, layer.index)
        return self._patches[k]


def _zero_filled(directions, k: int):
    """A chunk of directions (n, k', *shape) filled up with zeros to k: every chunk of a group has the same size
    (:func:`.rules.columns.chunked` drops the results past its last)."""
    missing = k - directions.shape[1]
    if not missing:
        return directions
    return torch.cat([directions, directions.new_zeros((directions.shape[0], missing, *directions.shape[2:]))], dim=1)


class _Reached(Exception):
    """Raised by a forward pre-hook to end a pass where what it needs has been computed."""


def largest_value(log: CallLog, n: int) -> int:
    """Numbers per input of the largest tensor a model computed (its calls on a batch of n, in ``log``): what one
    of the cotangents of a backward pass holds, per output."""
    return max((out.numel() // n for *_, out in log.calls if out.ndim and out.shape[0] == n), default=0)


def conv_spec(m: nn.Module, x: torch.Tensor, out: torch.Tensor) -> conv.ConvSpec | None:
    """The geometry of a zero-padded ``nn.Conv1d``/``nn.Conv2d`` seen mapping x to out, or None (another padding
    mode, or shapes that are not one batch of channels × positions)."""
    d = x.ndim - 2
    if m.padding_mode != "zeros" or d not in (1, 2) or out.ndim != x.ndim:
        return None
    if m.padding == "valid":
        pad = ((0, 0),) * d
    elif m.padding == "same":
        total = [dil * (k - 1) for dil, k in zip(m.dilation, m.kernel_size)]
        pad = tuple((t // 2, t - t // 2) for t in total)
    else:
        pad = tuple((p, p) for p in m.padding)
    return conv.ConvSpec(m.in_channels, m.out_channels, m.groups, tuple(m.kernel_size), tuple(m.stride), pad,
                         tuple(m.dilation), tuple(x.shape[2:]), tuple(out.shape[2:]))


def chain_derivatives(weights, biases, acts, layout, X, *, hessian: bool = True) -> Derivatives:
    """A torch dense chain's blocks by the dense-chain rule (docs/math.md §8): ``layout`` names each layer's
    groups.  What from_sequential and the chains from_module/from_function detect both run."""
    with torch.no_grad():
        h, inputs, jac, hess = dense.derivatives(weights, biases, X, activations=acts, hessian=hessian)
    return Derivatives(h, dense.dense_blocks(layout, inputs, jac, hess))


def chain_pullback(weights, biases, acts, layout, X, cotangent_fn) -> Derivatives:
    """``sᵀ ∂h/∂z_l`` (n, M, out) of a torch dense chain for every draw: the rule's backpropagation of the scores."""
    with torch.no_grad():
        h, inputs, d1, _ = dense.forward(weights, biases, X, activations=acts, order=1)
        grads = dense.backpropagate(weights, d1, cotangent_fn(h).permute(1, 0, 2))[0]
    return Derivatives(h, dense.dense_blocks(layout, inputs, grads, [None] * len(grads)))


class Perturbed:
    """What from_module and from_function share: ``f(x, δ, θ') = h`` with ``δ_l`` added to each dense layer's
    output (``self.dense``) and ``θ'`` the column groups, differentiated by the column rule.

    A subclass sets ``params``, ``dtype``, ``device``, ``groups``, ``n_outputs``, ``dense``,
    ``column_groups``, ``linear_groups``, ``second_order``, ``chunk``, calls :meth:`_find_curvature`,
    and implements ``_call(X, deltas, params, record, **extra)`` and ``_lock()``; ``_what`` names it in
    messages.  Second order, per group (docs/math.md §9, §13):

    * zeros where the model is piecewise linear in the group (``linear_groups``);
    * the curvature rule (:mod:`.rules.curvature`) where the model's only curved operations in the group
      are elementwise activations (``activation_groups``): no second-order pass at all;
    * else forward over forward: along each neuron of a dense layer, each parameter's tangent of a conv
      layer's output (``_rule_hessian``), or each parameter of a column group (within ``max_params``).
    """

    _what = "module"
    convs: tuple = ()
    #: conv-layer group → (layer index, whether it is the bias), for the layers in ``convs``
    _conv_of: dict = {}
    #: conv layer index → its :class:`ConvSite`, for the layers whose groups the curvature rule takes
    _conv_sites: dict = {}
    #: (flatten, [(weight, bias, activation), ...]) when the whole model is a dense chain (set by _find_chain)
    _chain = None
    #: groups whose curvature comes from elementwise activations alone (set by _find_curvature)
    activation_groups: frozenset = frozenset()
    activation_sizes: tuple = ()

    def _layout(self):
        return tuple((d.weight, d.bias, d.transposed) for d in self.dense)

    def _outputs(self, X, deltas=None, params=None, record=None, acts=None, composite=True, **extra):
        """h (n, C') of the perturbed model (:meth:`_call`), the activations watched by ``acts``; with
        ``composite``, in :func:`composites` (beneath ``acts``, which sees the calls as the model makes them): where
        fishercore differentiates, and only there — the operations around the model run without the mode."""
        with composites() if composite else contextlib.nullcontext(), \
                acts if acts is not None else contextlib.nullcontext():
            return flat_outputs(self._call(X, deltas, params, record, **extra))

    def _single(self, x, deltas, others, act_deltas=None, shifts=None):
        """h (C',) for one input x (unbatched), with one δ per dense layer, the column groups' values ``others``
        and, with ``act_deltas``, one δ per activation's output; ``shifts`` {k: δ} added to conv layers' outputs."""
        acts = None if act_deltas is None else Activations(deltas=tuple(a[None] for a in act_deltas))
        extra = {"shifts": {k: d[None] for k, d in shifts.items()}} if shifts else {}
        return self._outputs(x[None], tuple(d[None] for d in deltas), {**self.params, **others}, acts=acts,
                             **extra)[0]

    def _find_curvature(self, fn, probe):
        """Which curved groups owe their curvature to elementwise activations alone: curved in ``fn(params, x)``
        but not once its activations are left out (both read off the traced graph, docs/math.md §11, §13)."""
        curved = curved_params(fn, self.params, probe)
        watch = Activations()
        with torch.no_grad(), watch:
            fn(self.params, probe)
        self.activation_sizes = tuple(math.prod(z.shape[1:]) for _, z in watch.calls)
        if not watch.calls or self._chain is not None:  # a dense chain's second order is the dense rule's
            return curved
        beyond = curved_params(lambda p, x: _without_activations(fn, p, x), self.params, probe)
        self.activation_groups = frozenset(curved - beyond)
        return curved

    def _find_chain(self, run, probe):
        """Whether the model is a dense chain — linear maps and elementwise activations, each applied to the
        previous result — read off the calls of ``run(probe)``; then the dense-chain rule computes everything
        (docs/math.md §8), as for :func:`~fishercore.backends.torch.from_sequential`.  Models of token ids start
        with a lookup: never a chain."""
        if self.input_dtype is not None:
            return
        log = CallLog()
        with torch.no_grad(), log:
            h = run(probe)
        found = dense_chain(log.calls, probe, h, {id(v): k for k, v in self.params.items()})
        if found is None:
            return
        flatten, layers = found

        def compose(phis):
            if not phis:
                return None

            def phi(t):
                for f, _ in phis:
                    t = f(t)
                return t

            return Autodiff(phi, OPS, all(linear for _, linear in phis))

        self._chain = (flatten, tuple((w, b, compose(phis)) for w, b, phis in layers))

    def _chain_args(self, X):
        """(weights, biases, activations, layout, X as the first linear map sees it) of the detected chain."""
        flatten, layers = self._chain
        weights = tuple(self.params[w] for w, _, _ in layers)
        biases = tuple(None if b is None else self.params[b] for _, b, _ in layers)
        layout = tuple((w, b, False) for w, b, _ in layers)
        return weights, biases, tuple(a for _, _, a in layers), layout, X.reshape(X.shape[0], -1) if flatten else X

    def _chain_derivatives(self, X, groups, hessian):
        """Every dense layer's per-neuron factors by the dense-chain rule (the blocks that own one of ``groups``)."""
        d = chain_derivatives(*self._chain_args(X), hessian=hessian)
        if groups is None:
            return d
        return d._replace(blocks=tuple(b for b in d.blocks if b.weight in groups or b.bias in groups))

    def _forward(self, X, acts=None, **extra):
        record: list = []
        h = self._outputs(X, record=record, acts=acts, **extra)
        inputs = [None] * len(self.dense)
        for i, a in record:
            inputs[i] = a
        for layer, a in zip(self.dense, inputs):
            if a is None or a.ndim != 2 or a.shape[0] != X.shape[0]:
                raise ValueError(f"X: the linear map {layer.name!r} saw inputs of shape "
                                 f"{None if a is None else tuple(a.shape)} for a batch of {X.shape[0]}, unlike when "
                                 f"the model was built; the {self._what}'s structure must not depend on its inputs")
        if acts is not None and len(acts.calls) != len(self.activation_sizes):
            raise ValueError(f"X: the {self._what} called {len(acts.calls)} activations, not the "
                             f"{len(self.activation_sizes)} it called when built; its structure must not depend on "
                             "its inputs")
        return h, inputs

    def _zero_deltas(self, n):
        return tuple(torch.zeros(n, d.out, dtype=self.dtype, device=self.device) for d in self.dense)

    def _others(self):
        return {g.name: self.params[g.name] for g in self.column_groups}

    def outputs(self, X):
        with self._lock(), torch.no_grad():
            return self._outputs(X, composite=False)

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input the vmapped transforms hold beyond the blocks (used to size batches).

        C cotangents through every dense layer, and where there are column groups (their gradients are their
        blocks) of two of the model's values at a time, the largest (``largest_value``); the per-neuron
        Hessian pass: one forward-over-forward per neuron of the widest layer, each holding every
        layer's values three times (primal and two tangents); the curvature rule's cotangents and
        factors of every activation (2 C values each), and ``chunk`` tangents of them where a group's are
        pushed through activations a chunk of parameters at a time; ``chunk`` tangents of a conv layer's output,
        three times, where a conv layer's groups are differentiated along them; a conv channel path's tangents
        (:meth:`_through_conv_size`).
        """
        if self._chain is not None:
            widths = [self.params[w].shape[0] for w, _, _ in self._chain[1]]
            curved = [a is not None and not a.piecewise_linear for _, _, a in self._chain[1]]
            return dense.workspace(widths, curved, self.dtype.itemsize, hessian)
        outs = [d.out for d in self.dense] or [0]
        per_pass = sum(outs) + sum(d.in_ for d in self.dense)
        second = 3 * max(outs) * per_pass if hessian else 0
        if hessian and self.activation_groups:
            chunked = self._chunked_activation_tangents()
            second += (2 * self.n_outputs + 2 * self.chunk * chunked) * sum(self.activation_sizes)
        if hessian and self.convs:
            along = [c.spec.out_channels * c.spec.positions for k, c in enumerate(self.convs)
                     if self._conv_tangents_chunked(k)]
            second += 3 * self.chunk * max(along, default=0) + max(
                (self._through_conv_size(k) for k in self._conv_sites), default=0)
        return (2 * self.n_outputs * self._cotangent_values() + second) * self.dtype.itemsize

    def _curved_conv_groups(self, k):
        """Conv layer k's groups whose Hessian diagonals are computed (not zero, not beyond ``max_params``)."""
        layer, rule = self.convs[k], self._rule_groups()
        return [g for g in (layer.weight, layer.bias)
                if g and g not in self.linear_groups and (self.second_order or g in rule)]

    def _conv_tangents_chunked(self, k) -> bool:
        """Whether conv layer k's groups take ``chunk`` tangents of its output at a time: forward over forward
        (curved beyond activations), or the curvature rule pushing them through activations that neither read
        the output unchanged nor are reached by way of a next conv (:class:`ConvSite`)."""
        site = self._conv_sites.get(k)
        return any(g not in self.activation_groups or site is None or (site.others and site.via is None)
                   for g in self._curved_conv_groups(k))

    def _chunked_activation_tangents(self) -> bool:
        """Whether some group's tangents go through the activations ``chunk`` parameters at a time: a dense layer's
        or a column group's taken by the curvature rule (conv layers' only without a direct or channel path)."""
        curved = {g for d in self.dense for g in (d.weight, d.bias)} | {
            g.name for g in self.column_groups if g.name not in self._conv_of and self.second_order}
        if any(g in self.activation_groups and g not in self.linear_groups for g in curved):
            return True
        return any(site.post_others or (site.others and site.via is None) for k, site in self._conv_sites.items()
                   if self._curved_conv_groups(k))

    def _through_conv_size(self, k) -> int:
        """Numbers per input that conv layer k's channel path holds (:meth:`_through_conv`): its rows' tangents of
        the layer's output, of the ``pre`` activations' inputs and of the next conv's input (and of that conv's
        output with ``post_others``), and their terms (C per row and channel); 0 without a path."""
        site = self._conv_sites[k]
        if site.via is None or not self._curved_conv_groups(k):
            return 0
        spec, via = self.convs[k].spec, self.convs[site.via].spec
        rows = min(spec.weight_size // spec.out_channels + 1, max(1, self.chunk // spec.out_channels))
        pre = sum(self.activation_sizes[m] for m in site.pre) // spec.out_channels
        out = via.out_channels * via.positions if site.post_others else 0
        return rows * spec.out_channels * (spec.positions + pre + math.prod(via.in_spatial) + out + self.n_outputs)

    def _cotangent_values(self) -> int:
        """Numbers that each output's cotangent takes through the model in the first-order vjps: every dense layer's
        input and output, and where there are column groups the largest of the model's values."""
        return (sum(d.out for d in self.dense) + sum(d.in_ for d in self.dense)
                + (self._value_size if self.column_groups else 0))

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        return self.derivatives_of(X, None, hessian=hessian)

    @property
    def position_chunks(self) -> bool:
        """Whether :meth:`derivatives_of` takes ``positions=``: sequence outputs (T, C), no dense layer (whose
        per-neuron factors do not split by position), and no group whose Hessian diagonals are computed (each is
        exactly zero, where the module is piecewise linear in it, or not computed, beyond ``max_params``)."""
        if self._chain is not None or self.dense or len(self.output_shape) != 2:
            return False
        rule = self._rule_groups()
        return all(g.name in self.linear_groups or not (self.second_order or g.name in rule)
                   for g in self.column_groups)

    def position_workspace(self, span: int) -> int:
        """Bytes per input that the derivatives of ``span`` positions hold beyond the blocks: the cotangents of the
        span's outputs through two of the model's values at a time (:meth:`workspace_per_input`'s first order;
        with :attr:`position_chunks` no Hessian pass runs)."""
        return 2 * span * self.output_shape[1] * self._cotangent_values() * self.dtype.itemsize

    def derivatives_of(self, X, groups, *, hessian: bool = True, positions=None) -> Derivatives:
        """The blocks of the named ``groups`` (all for None): the dense layers that own one of them, and their
        column groups; one vjp per output differentiates only those (and, for the curvature rule, the
        activations' outputs).  A dense chain takes the dense-chain rule instead.

        ``positions=(t0, t1)`` (where :attr:`position_chunks`): the blocks of the outputs of positions t0 .. t1 − 1
        only, one vjp per output of theirs; the outputs are the whole sequences'."""
        if self._chain is not None:
            return self._chain_derivatives(X, groups, hessian)
        n = X.shape[0]
        eye = torch.eye(self.n_outputs, dtype=self.dtype, device=self.device)[columns.position_rows(self, positions)]
        rows = eye.shape[0]
        layout = self._layout()
        wanted = None if groups is None else set(groups)
        layers = [l for l, (w, b, _) in enumerate(layout) if wanted is None or w in wanted or b in wanted]
        cols = [g for g in self.column_groups if wanted is None or g.name in wanted]
        # conv layers' groups: their rows from ∂h/∂z of the layer's output and its input patches (§13), not from
        # per-input gradients of the kernel, which vmap computes one input at a time
        convs = sorted({self._conv_of[g.name][0] for g in cols if g.name in self._conv_of})
        by_conv = {g for k in convs for g in (self.convs[k].weight, self.convs[k].bias) if g}
        chosen = {g.name: self.params[g.name] for g in cols if g.name not in by_conv}
        dense_names = {g for l in layers for g in layout[l][:2] if g}
        names = dense_names | {g.name for g in cols}
        # the curvature rule's factors where a group asked for takes them: a dense layer's, or a column group whose
        # second order is computed (not beyond max_params)
        rule = self._rule_groups()
        by_activations = hessian and any(g in dense_names or self.second_order or g in rule
                                         for g in names & self.activation_groups)

        def f(x, ds, das, prim):
            full = list(ds)
            for i, l in enumerate(layers):
                full[l] = prim[0][i]
            return self._single(x, tuple(full), prim[2], prim[1] if by_activations else None,
                                dict(zip(convs, prim[3])))

        with self._lock(), torch.no_grad(), randomness_refused(self._what):
            rec = Activations() if by_activations else None
            calls: dict = {}  # the conv layers' inputs, once for the batch: their patches serve both orders
            h, inputs = self._forward(X, acts=rec, **({"conv_calls": calls} if convs else {}))
            batch = _ConvBatch(self, {k: calls[k][0][0] for k in convs}, (g.name for g in cols))
            deltas = self._zero_deltas(n)
            act_deltas = tuple(torch.zeros_like(z) for _, z in rec.calls) if by_activations else ()
            shifts = tuple(torch.zeros((n, self.convs[k].spec.out_channels, *self.convs[k].spec.out_spatial),
                                       dtype=self.dtype, device=self.device) for k in convs)
            jac_d, jac_a, jac_c, jac_z = OPS.vmap(lambda x, ds, das, zs: columns.pullback(
                OPS, lambda prim: f(x, ds, das, prim), (tuple(ds[l] for l in layers), das, chosen, zs), eye))(
                X, deltas, act_deltas, shifts)
            jac_c = {**jac_c, **self._conv_rows(batch, jac_z, by_conv)}
            # the curvature rule's factors K_m, passed down (never kept on the model: calls may run in parallel)
            K = None
            if by_activations:
                K = [curvature.factors(OPS.elementwise_derivatives(phi, z, 2)[2], ja)
                     for (phi, z), ja in zip(rec.calls, jac_a)]
            hess = [self._layer_hessian(X, deltas, l, hessian, K) for l in layers]
            blocks = dense.dense_blocks([layout[l] for l in layers], [inputs[l] for l in layers], list(jac_d),
                                        hess) + tuple(
                ColumnBlock(g.name, jac_c[g.name].reshape(n, rows, g.size),
                            self._column_hessian(X, g, hessian, K, batch, rows)) for g in cols)
        return Derivatives(h, blocks)

    def _conv_rows(self, batch, jac_z, names) -> dict:
        """Jacobian rows (n, C, size) of the conv layers' groups among ``names``, from ``jac_z`` = ∂h/∂z of each
        layer k of ``batch`` (a :class:`_ConvBatch`, in order) (n, C, O, *spatial): the weight's by
        :func:`.rules.conv.weight_sums` with the layer's input patches, the bias's summed over positions."""
        rows = {}
        for k, G in zip(batch.inputs, jac_z):
            layer = self.convs[k]
            if layer.weight in names:
                rows[layer.weight] = conv.weight_sums(G, batch.patches(k), layer.spec)
            if layer.bias in names:
                rows[layer.bias] = G.reshape(*G.shape[:3], -1).sum(dim=-1)
        return rows

    # -- the curvature rule (docs/math.md §13) ------------------------------------
    def _activation_inputs(self, x, **site):
        """The inputs z_m of every activation for one input x (unbatched), the model perturbed at ``site``
        (``deltas=`` for the dense layers, ``params=`` for a group, ``shifts=`` for conv layers)."""
        watch = Activations()
        if "deltas" in site:
            site["deltas"] = tuple(d[None] for d in site["deltas"])
        self._outputs(x[None], acts=watch, **site)
        return tuple(z[0] for _, z in watch.calls)

    @staticmethod
    def _pushed(X, run, zero, V):
        """The tangents of ``run(x, d)``'s outputs at ``d = zero`` along ``V`` (n, *zero.shape), for each input x of
        X: one forward-mode pass per input, vmapped."""
        return OPS.vmap(lambda x, v: OPS.jvp(lambda d: run(x, d), (zero,), (v,))[1])(X, V)

    def _readers(self, X, run, zero):
        """The activations that read a site unchanged (their input's tangent along a random tangent there is that
        tangent), and those that it reaches: ``run(x, d)`` as in :meth:`_by_activations`."""
        gen = torch.Generator(device=self.device).manual_seed(0)
        V = torch.randn((X.shape[0], *zero.shape), generator=gen, dtype=self.dtype, device=self.device)
        probe = self._pushed(X, run, zero, V)
        readers = [m for m, t in enumerate(probe) if t.shape == V.shape and bool(torch.equal(t, V))]
        return readers, [m for m, t in enumerate(probe) if m not in readers and bool((t != 0).any())]

    def _scaled(self, X, run, zero, candidates):
        """Of the activations ``candidates``, those whose input moves with the site elementwise, ``ż_m = s ⊙ v`` (a
        batch norm's scale, a residual addition, a ReLU between): along two random tangents V, V' of the site their
        tangents t, t' have the site's shape and ``t ⊙ V' = t' ⊙ V`` (to rounding).  ``run`` as in
        :meth:`_by_activations`."""
        if not candidates:
            return ()
        gen = torch.Generator(device=self.device).manual_seed(2)
        V = torch.randn((2, X.shape[0], *zero.shape), generator=gen, dtype=self.dtype, device=self.device)
        t = [self._pushed(X, run, zero, V[i]) for i in range(2)]
        tol = 10 * torch.finfo(self.dtype).eps ** 0.5
        out = []
        for m in candidates:
            if t[0][m].shape != V[0].shape:
                continue
            a, b = t[0][m] * V[1], t[1][m] * V[0]
            if torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max())):
                out.append(m)
        return tuple(out)

    def _scaled_factors(self, X, K, run, zero, scaled):
        """``Σ_m K_m ⊙ s_m²`` (n, C, ∏ zero.shape) over the activations ``scaled`` (:meth:`_scaled`), whose inputs move
        with the site as ``s_m ⊙ v``: s_m their tangent along ones, one pass for the batch."""
        n = X.shape[0]
        S = self._pushed(X, run, zero, torch.ones((n, *zero.shape), dtype=self.dtype, device=self.device))
        return sum(K[m] * (S[m] * S[m]).reshape(n, 1, -1) for m in scaled)

    def _by_activations(self, X, K, run, zero, size, directions, direct=None, split=None, scaled=()):
        """w (n, C, size) by the curvature rule, at a site where ``run(x, d)`` gives the activations' inputs with
        ``d`` (shaped like ``zero``) added; ``directions(start, k)`` → (n, k, *zero.shape) the tangents there of
        ``size`` parameters; ``direct(D)`` → (n, C, size) the terms of the activations that read the site
        unchanged (D their summed factors, (n, C, *zero.shape)), or None to push every activation forward.
        ``K``: the activations' factors (n, C, n_m), from the first-order pass.  ``split``: (readers, others)
        known beforehand (a :class:`ConvSite`'s), else found on X (:meth:`_readers`).  ``scaled``: activations
        whose input moves with the site elementwise (:meth:`_scaled`), ``ż_m = s ⊙ v``: direct too, with
        ``K_m ⊙ s²`` and s their tangent along ones (one pass per batch, not per parameter).
        """
        n = X.shape[0]
        if split is not None:
            readers, others = split
        elif direct is None:
            readers, others = [], list(range(len(K)))
        else:
            readers, others = self._readers(X, run, zero)
        total = None
        if readers or scaled:
            D = sum(K[m] for m in readers) + (self._scaled_factors(X, K, run, zero, scaled) if scaled else 0)
            total = direct(D.reshape(n, self.n_outputs, *zero.shape))
        if others:
            Kcat = torch.cat([K[m] for m in others], dim=2)

            def tangents(x, d):
                zs = run(x, d)
                return torch.cat([zs[m].reshape(-1) for m in others])

            def chunk(start, k):
                T = OPS.vmap(lambda x, V: OPS.vmap(lambda v: OPS.jvp(lambda d: tangents(x, d), (zero,), (v,))[1])(V))(
                    X, directions(start, k))
                return curvature.tangent_squares(Kcat, T).transpose(1, 2)

            part = columns.chunked(size, self.chunk, chunk)
            total = part if total is None else total + part
        return total if total is not None else torch.zeros(n, self.n_outputs, size, dtype=self.dtype,
                                                            device=self.device)

    def _unit_tangents(self, n, shape):
        """``directions(start, k)`` for :meth:`_by_activations`: the unit vectors of a site of ``shape``, the same
        for each of n inputs, (n, k, *shape)."""
        def directions(start, k):
            E = columns.unit_directions(OPS.xp, shape, start, k, dtype=self.dtype, device=self.device)
            return E[None].expand(n, *E.shape)

        return directions

    def _dense_by_activations(self, X, K, l, out):
        zero = torch.zeros(out, dtype=self.dtype, device=self.device)

        def run(x, d):
            ds = [torch.zeros(layer.out, dtype=self.dtype, device=self.device) for layer in self.dense]
            ds[l] = d
            return self._activation_inputs(x, deltas=tuple(ds))

        return self._by_activations(X, K, run, zero, out, self._unit_tangents(X.shape[0], (out,)),
                                    direct=lambda D: D)

    def _layer_hessian(self, X, deltas, l, hessian, K=None):
        """diag ∂²h/∂z_l², (n, C, out): zeros where the module is piecewise linear in the layer's parameters."""
        if not hessian:
            return None
        weight, bias, _ = self._layout()[l]
        out = deltas[l].shape[1]
        if all(g is None or g in self.linear_groups for g in (weight, bias)):
            return torch.zeros(X.shape[0], self.n_outputs, out, dtype=self.dtype, device=self.device)
        if K is not None and all(g is None or g in self.linear_groups or g in self.activation_groups
                                 for g in (weight, bias)):
            return self._dense_by_activations(X, K, l, out)

        def neurons(start, k):
            E = columns.unit_directions(OPS.xp, (out,), start, k, dtype=self.dtype, device=self.device)

            def one(x, ds):
                return columns.diag_hessian(OPS, lambda dl: self._single(x, ds[:l] + (dl,) + ds[l + 1:], {}),
                                            ds[l], E)

            return OPS.vmap(one)(X, deltas)  # (n, k, C)

        return columns.chunked(out, out, neurons)

    def _rule_hessian(self, X, group, K=None, batch=None):
        """A layer rule's computation of a column group's Hessian diagonals (n, C, size), or None: the column
        rule's then (subclasses that recognise layers override this); ``K`` as in :meth:`_by_activations`,
        ``batch`` the batch's conv layers (:class:`_ConvBatch`)."""
        return None

    def _rule_groups(self) -> frozenset:
        """Column groups whose second order a layer rule computes at any size (not limited by max_params)."""
        return frozenset()

    def _column_hessian(self, X, group, hessian, K=None, batch=None, rows=None):
        """A column group's Hessian diagonals by a layer rule where one applies, by the curvature rule where
        its curvature comes from activations alone, else by the column rule
        (:func:`.rules.columns.group_hessian`); ``rows`` outputs (all by default: only zeros or none are asked for
        fewer, :attr:`position_chunks`)."""
        def compute():
            by_rule = self._rule_hessian(X, group, K, batch)
            if by_rule is not None:
                return by_rule
            if K is not None and group.name in self.activation_groups:
                return self._by_activations(
                    X, K, lambda x, p: self._activation_inputs(x, params={**self.params, group.name: p}),
                    self.params[group.name], group.size, self._unit_tangents(X.shape[0], group.shape))
            deltas = self._zero_deltas(1)

            def chunk(start, k):
                E = columns.unit_directions(OPS.xp, group.shape, start, k, dtype=self.dtype, device=self.device)

                def one(x):
                    return columns.diag_hessian(
                        OPS, lambda p: self._single(x, tuple(d[0] for d in deltas), {group.name: p}),
                        self.params[group.name], E)

                return OPS.vmap(one)(X)

            return columns.chunked(group.size, self.chunk, chunk)

        return columns.group_hessian(OPS.xp, (X.shape[0], rows or self.n_outputs, group.size), hessian=hessian,
                                     linear=group.name in self.linear_groups,
                                     second_order=self.second_order or group.name in self._rule_groups(),
                                     compute=compute, dtype=self.dtype, device=self.device)

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """``sᵀ ∂h/∂z_l`` (n, M, out) and ``sᵀ ∂h/∂θ'`` (n, M, p) for every draw: one vjp per draw, vmapped."""
        if self._chain is not None:
            return chain_pullback(*self._chain_args(X), cotangent_fn)
        others = self._others()
        with self._lock(), torch.no_grad(), randomness_refused(self._what):
            h, inputs = self._forward(X)
            s = cotangent_fn(h).transpose(0, 1)  # (n, M, C)
            n, M = s.shape[:2]
            grads, cols = OPS.vmap(lambda x, ds, si: columns.pullback(
                OPS, lambda prim: self._single(x, prim[0], prim[1]), (ds, others), si))(X, self._zero_deltas(n), s)
        blocks = dense.dense_blocks(self._layout(), inputs, list(grads), [None] * len(grads)) + tuple(
            ColumnBlock(g.name, cols[g.name].reshape(n, M, g.size), None) for g in self.column_groups)
        return Derivatives(h, blocks)


def _without_activations(fn, params, x):
    with Activations(identity=True):
        return fn(params, x)


class _LinearCalls(TorchFunctionMode):
    """The linear maps a model calls (``F.linear(x, W, b)``, ``x @ W``).

    With ``params`` (once, when the model is built): counts where each parameter appears
    (``seen``, by identity) and lists every linear map whose weight is a parameter (``calls``).
    With ``weights`` (on every differentiated call): records the inputs of those maps and adds
    ``deltas`` to their outputs — nothing else, since this runs for every operation of the forward.
    """

    def __init__(self, weights=(), deltas=None, record=None, params: dict | None = None):
        super().__init__()
        self.weights = {id(w): i for i, w in enumerate(weights)}
        self.deltas, self.record = deltas, record
        self.ids = None if params is None else {id(v): k for k, v in params.items()}
        self.seen: dict = {}
        self.calls: list = []  # (weight name, input, bias name or None, transposed, output) of every linear map

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.ids is not None:
            for a in (*args, *kwargs.values()):
                if isinstance(a, torch.Tensor) and id(a) in self.ids:
                    self.seen[self.ids[id(a)]] = self.seen.get(self.ids[id(a)], 0) + 1
        if func is F.linear:
            x, w = args[0], args[1] if len(args) > 1 else kwargs.get("weight")
            b, transposed = args[2] if len(args) > 2 else kwargs.get("bias"), False
        elif func in (torch.matmul, torch.Tensor.__matmul__, torch.mm) and len(args) == 2:
            (x, w), b, transposed = args, None, True
        else:
            return out
        if self.ids is not None and id(w) in self.ids:
            self.calls.append((self.ids[id(w)], x, self.ids.get(id(b)) if b is not None else None, transposed, out))
        i = self.weights.get(id(w))
        if i is not None:
            if self.record is not None:
                self.record.append((i, x))
            if self.deltas is not None:
                out = out + self.deltas[i]
        return out


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
        all_convs = [(name, m) for name, m in module.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
        conv_calls: dict = {}
        watch = _LinearCalls(params=self.params)  # counts where each parameter is used
        log = CallLog()
        try:
            with MODULE_LOCK, torch.no_grad(), watch, log:
                h = self._call(probe, record=record, linears=all_linears, convs=all_convs, conv_calls=conv_calls)
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise ValueError(f"input_shape: the module cannot run on inputs of shape {probe_shape} ({e}); "
                             "pass input_shape=, the shape of one input without the batch axis") from e
        self.output_shape = outputs_shape(h, "module")
        self.n_outputs = math.prod(self.output_shape)
        self._value_size = largest_value(log, probe.shape[0])

        def own(name, attr, layer):
            """The layer's parameter's group name, if it is a group used by this layer alone (else False)."""
            key = f"{name}.{attr}" if name else attr
            if getattr(layer, attr, None) is None:
                return None
            return key if key in self.params and watch.seen.get(key) == 1 else False

        # dense layers: applied once per forward pass, to one vector per input
        seen = [[a for i, a in record if i == k] for k in range(len(all_linears))]
        self.linears = [(name, lin) for (name, lin), inputs in zip(all_linears, seen)
                        if len(inputs) == 1 and inputs[0].ndim == 2 and inputs[0].shape[0] == probe.shape[0]
                        and own(name, "weight", lin) and own(name, "bias", lin) is not False]
        self.dense = [DenseLayer(name, own(name, "weight", lin), own(name, "bias", lin), False,
                                 lin.out_features, lin.in_features) for name, lin in self.linears]
        #: convolutions applied once per forward pass, with parameters of their own: the conv rule's layers
        self.convs = []
        for k, (name, m) in enumerate(all_convs):
            calls = conv_calls.get(k, [])
            spec = conv_spec(m, *calls[0]) if len(calls) == 1 else None
            if spec is not None and own(name, "weight", m) and own(name, "bias", m) is not False:
                index = torch.as_tensor(conv.patch_index(spec), device=self.device)
                self.convs.append(ConvLayer(m, own(name, "weight", m), own(name, "bias", m), spec, index))
        self._conv_of = {g: (k, g == c.bias) for k, c in enumerate(self.convs) for g in (c.weight, c.bias) if g}
        owned = {g for w, b, _ in self._layout() for g in (w, b) if g is not None}
        self.column_groups = tuple(g for g in self.groups if g.name not in owned)
        self._find_chain(lambda x: self._call(x), probe)
        curved = self._find_curvature(lambda p, x: self._outputs(x, params=p, composite=False), probe[:1])
        #: Groups the module is piecewise linear in (w = 0 exactly, any size): read off its ATen graph.
        self.linear_groups = tuple(g.name for g in self.groups if g.name not in curved)
        self.second_order = second_order_within(
            [g for g in self.column_groups if g.name in curved and g.name not in self._rule_groups()], max_params)
        if self.input_dtype is None:  # a random probe: the sites' checks hold along it for any input
            probe = torch.rand(probe.shape, generator=torch.Generator(device=self.device).manual_seed(0),
                               dtype=self.dtype, device=self.device)
        self._conv_sites = {}
        if any({c.weight, c.bias} & self.activation_groups for c in self.convs):
            with MODULE_LOCK, composites():
                self._conv_sites = self._find_conv_sites(probe)

    def _lock(self):
        return MODULE_LOCK  # the hooks live on the module: one call at a time

    # -- the conv rule (docs/math.md §13) -----------------------------------------
    def _rule_groups(self) -> frozenset:
        """Conv layers' groups whose curvature comes from activations alone: exact second order at any size."""
        return frozenset(g for g in self._conv_of if g in self.activation_groups)

    def _rule_hessian(self, X, group, K=None, batch=None):
        """A conv layer's weight or bias, along each parameter's tangent of the layer's output (:mod:`.rules.conv`):
        by the curvature rule where the module's curvature in it comes from activations alone, else forward over
        forward from the layer's output — exact whatever follows the layer.  ``batch``: the batch's conv layers
        (:class:`_ConvBatch`).  A layer's weight and bias, when both are asked for and take the same way, are
        computed together, their tangents side by side in one set of passes."""
        if group.name not in self._conv_of:
            return None
        if group.name not in batch.done:
            k = self._conv_of[group.name][0]
            by_activations = K is not None and group.name in self.activation_groups
            names = [g for g in self._curved_conv_groups(k)
                     if g in batch.wanted and (g in self.activation_groups) == by_activations]
            batch.done.update(self._conv_hessians(X, k, names, K if by_activations else None, batch))
        return batch.done.pop(group.name)

    def _conv_hessians(self, X, k, names, K, batch) -> dict:
        """{group: (n, C, size)} for ``names``, conv layer k's weight and/or bias (in that order): the curvature
        rule's with ``K``, else forward over forward."""
        layer = self.convs[k]
        spec, n, zero = layer.spec, X.shape[0], self._site_zero(k)
        weight = layer.weight in names
        unf = batch.patches(k) if weight else None
        sizes = [spec.weight_size] * weight + [spec.out_channels] * (layer.bias in names)
        pieces = [lambda s, m: conv.weight_directions(unf, spec, s, m)] * weight
        if layer.bias in names:  # the same for every input
            pieces.append(lambda s, m: conv.bias_directions(OPS.xp, spec, s, m, dtype=self.dtype,
                                                            dev=self.device)[None].expand(n, m, *zero.shape))

        def tangents(start, size_):
            """The chunk's tangents of the layer's output, (n, size_, O, *spatial): the weights' then the biases',
            zero past the last."""
            parts, off = [], 0
            for size, piece in zip(sizes, pieces):
                lo, hi = max(start, off), min(start + size_, off + size)
                if lo < hi:
                    parts.append(piece(lo - off, hi - lo))
                off += size
            return _zero_filled(parts[0] if len(parts) == 1 else torch.cat(parts, dim=1), size_)

        total = sum(sizes)
        if K is not None:
            def direct(D):
                parts = [curvature.conv_direct(D, unf, spec)] if weight else []
                parts += [curvature.conv_bias_direct(D)] if len(sizes) > weight else []
                return torch.cat(parts, dim=2)

            site = self._conv_sites[k]
            split = (site.readers, () if site.via is not None else site.others)
            w = self._by_activations(X, K, self._site_run(k), zero, total, tangents, direct, split=split,
                                     scaled=site.scaled)
            if site.via is not None:
                w = w + self._through_conv(X, K, k, unf, bias=len(sizes) > weight)
        else:
            def along(x, V):
                """d²h/dt² along each direction (k, O, *spatial) added to the layer's output for one input x: (k, C)."""
                return columns.diag_hessian(
                    OPS, lambda d: self._outputs(x[None], shifts={k: d[None]})[0], zero, V)

            w = columns.chunked(total, self.chunk, lambda start, size_: OPS.vmap(along)(X, tangents(start, size_)))
        return dict(zip(names, torch.split(w, sizes, dim=2)))

    def _site_zero(self, k):
        """A zero of conv layer k's output for one input, (O, *spatial): where its tangents start."""
        spec = self.convs[k].spec
        return torch.zeros((spec.out_channels, *spec.out_spatial), dtype=self.dtype, device=self.device)

    def _site_run(self, k):
        """``run(x, d)`` of :meth:`_by_activations` at conv layer k's output: the activations' inputs for one input x
        with d added there."""
        return lambda x, d: self._activation_inputs(x, shifts={k: d[None]})

    def _through_conv(self, X, K, k, unf=None, bias=False):
        """The terms of conv layer k's ``others`` by way of its site's ``via`` (:class:`ConvSite`), (n, C, size):
        its weights' tangents (patches ``unf``; none for None) and, with ``bias``, its biases' after them, batched as
        one tangent per row of the patches (and one of ones), every output channel o carrying its own parameter's;
        pushed forward to ``via``'s input, where each channel is still one parameter's tangent, then through ``via``
        channel by channel (:func:`.rules.conv.channel_outputs`)."""
        site, spec = self._conv_sites[k], self.convs[k].spec
        via = self.convs[site.via]
        n, C, O = X.shape[0], self.n_outputs, spec.out_channels
        rows_of = []
        if unf is not None:  # weight (o, j): row rows[o, j] of the patches (j: input channel in group, kernel spot)
            rows = torch.as_tensor(conv.weight_layout(spec)[1], device=self.device)
            rows_of.append(unf.index_select(1, rows).reshape(n, O, -1, *spec.out_spatial).transpose(1, 2))
        if bias:  # ones over each channel
            rows_of.append(torch.ones((n, 1, O, *spec.out_spatial), dtype=self.dtype, device=self.device))
        B = rows_of[0] if len(rows_of) == 1 else torch.cat(rows_of, dim=1)
        J_w = B.shape[1] - bias
        K_pre = [K[m].reshape(n, C, O, -1) for m in site.pre]
        zero_via = self._site_zero(site.via)
        D = None
        if site.post_readers or site.post_scaled:  # the activations that read via's output unchanged, or scaled
            D = sum(K[m] for m in site.post_readers) + (self._scaled_factors(
                X, K, self._site_run(site.via), zero_via, site.post_scaled) if site.post_scaled else 0)

        def part(start, J):
            T_pre, U = self._tangents_to(X, k, site.via, site.pre, B[:, start:start + J])
            J = U.shape[1]
            out = torch.zeros((n, C, O, J), dtype=self.dtype, device=self.device)
            for Km, T in zip(K_pre, T_pre):
                out += curvature.channel_tangent_squares(Km, T.reshape(n, J, O, -1))

            def through(a, b, squared):
                """The tangents of via's output for inputs a..b, (b − a, (o, j), O_via · P_via), or their squares
                (squared where the product left them, contiguous; only the one asked for is laid out by input)."""
                T = conv.channel_outputs(U[a:b].reshape((b - a) * J, *U.shape[2:]), self.params[via.weight],
                                         via.spec).reshape(O, via.spec.out_channels, b - a, J, -1)
                return (T * T if squared else T).permute(2, 0, 3, 1, 4).reshape(b - a, O * J, -1)

            if D is not None:  # on the CPU a few inputs at a time, CACHE_BYTES of tangents: the passes stay in cache
                step = max(1, CACHE_BYTES // (O * J * zero_via.numel() * zero_via.element_size())) \
                    if self.device.type == "cpu" else n
                for a in range(0, n, step):
                    b = min(n, a + step)
                    out[a:b] += torch.matmul(D[a:b], through(a, b, True).transpose(1, 2)).reshape(b - a, C, O, J)
            if site.post_others:
                dirs = through(0, n, False).reshape(n, O * J, *zero_via.shape)

                w = self._by_activations(X, K, self._site_run(site.via), zero_via, J * O,
                                         lambda s, m: _zero_filled(dirs[:, s:s + m], m), split=((), site.post_others))
                out += w.reshape(n, C, O, J)
            return out

        step = max(1, self.chunk // O)
        out = torch.cat([part(s, step) for s in range(0, B.shape[1], step)], dim=3)
        weights = out[..., :J_w].reshape(n, C, O * J_w)
        return torch.cat([weights, out[..., J_w]], dim=2) if bias else weights

    def _tangents_to(self, X, k, b, acts, V):
        """The tangents, along ``V`` (n, J, *shape of layer k's output) added to conv layer k's output, of the inputs
        of the activations ``acts`` and of conv layer b: ((n, J, *z_m.shape), ...), (n, J, *b's input shape).

        Forward mode, the J tangents of an input at once (vmapped: the model's values before b are computed once
        per input, not once per tangent), and only up to b: a forward pre-hook on b keeps its input and ends the
        pass, inside the differentiated function, which returns what the hook kept.
        """
        zero = self._site_zero(k)

        def run(x, d):
            watch, got = Activations(), {}

            def reached(m, inputs):
                got["via"] = inputs[0][0]
                raise _Reached

            handle = self.convs[b].module.register_forward_pre_hook(reached)
            try:
                self._outputs(x[None], acts=watch, shifts={k: d[None]})
            except _Reached:
                pass
            finally:
                handle.remove()
            if "via" not in got:
                raise RuntimeError(f"conv layer {b} was not reached from layer {k}, unlike when the model was built")
            return tuple(watch.calls[a][1][0] for a in acts), got["via"]

        return OPS.vmap(lambda x, W: OPS.vmap(lambda v: OPS.jvp(lambda d: run(x, d), (zero,), (v,))[1])(W))(X, V)

    def _find_conv_sites(self, X):
        """A :class:`ConvSite` for each conv layer whose groups the curvature rule takes, read off ``X``: the
        activations called after the layer, those that read its output unchanged, and a ``via`` where one holds —
        the first later conv layer with as many input channels, such that a tangent in one channel of the layer's
        output stays in that channel up to ``via``'s input and in the ``pre`` activations' (checked along random
        tangents on sets of channels, :func:`.rules.conv.channel_sets`), and every later activation's tangent is
        ``via``'s own along ``via``'s map of it (checked along a random tangent, to rounding)."""
        watch, at, order = Activations(), {}, []

        def seen(k):
            def hook(m, inputs, out):
                at.setdefault(k, len(watch.calls))  # activations called before layer k's output exists
                order.append(k)
            return hook

        handles = [c.module.register_forward_hook(seen(k)) for k, c in enumerate(self.convs)]
        try:
            with torch.no_grad(), watch:
                self._call(X)
        finally:
            for h in handles:
                h.remove()
        n_acts, sites, readers = len(watch.calls), {}, {}

        def readers_of(k):
            """(readers, scaled) of layer k's output among the activations called after it."""
            if k not in readers:
                own = tuple(self._readers(X, self._site_run(k), self._site_zero(k))[0])
                readers[k] = own, self._scaled(X, self._site_run(k), self._site_zero(k),
                                               tuple(m for m in range(at[k], n_acts) if m not in own))
            return readers[k]

        with torch.no_grad():
            for k, layer in enumerate(self.convs):
                if not {layer.weight, layer.bias} & self.activation_groups:
                    continue
                own, scaled = readers_of(k)
                others = tuple(m for m in range(at[k], n_acts) if m not in own and m not in scaled)
                site = ConvSite(own, others, scaled=scaled)
                spec = layer.spec
                later = [b for b in order[order.index(k) + 1:] if self.convs[b].spec.in_channels == spec.out_channels
                         and len(self.convs[b].spec.kernel) == len(spec.kernel)]
                if others and later:
                    b = later[0]
                    pre = tuple(m for m in others if m < at[b])
                    post = tuple(m for m in others if m >= at[b])
                    if self._channel_path(X, k, b, pre, post):
                        rb, sb = readers_of(b)
                        site = site._replace(via=b, pre=pre, post_readers=tuple(m for m in post if m in rb),
                                             post_scaled=tuple(m for m in post if m in sb),
                                             post_others=tuple(m for m in post if m not in rb and m not in sb))
                sites[k] = site
        return sites

    def _channel_path(self, X, k, b, pre, post) -> bool:
        """Whether conv layer b can be layer k's site's ``via`` (:meth:`_find_conv_sites`)."""
        gen = torch.Generator(device=self.device).manual_seed(1)
        zero, zero_b = self._site_zero(k), self._site_zero(b)
        n, O = X.shape[0], zero.shape[0]

        def run(x, d):
            watch, calls = Activations(), {}
            self._outputs(x[None], acts=watch, shifts={k: d[None]}, conv_calls=calls)
            return tuple(watch.calls[m][1][0] for m in (*pre, *post)), calls[b][0][0][0]

        # tangents on the channels whose index has bit b set, and on the others (2 log2 O of them, not O: a wide
        # layer would hold O tangents of the whole network): two channels always differ in some bit, so any
        # mixing of channels shows as a tangent outside the set it started on
        eye = torch.as_tensor(conv.channel_sets(O), dtype=self.dtype, device=self.device)  # (s, O)
        E = torch.randn((eye.shape[0], *zero.shape), generator=gen, dtype=self.dtype, device=self.device)
        E = E * eye.reshape(*eye.shape, *([1] * (zero.ndim - 1)))  # direction s lives on the channels of set s
        E = E[None].expand(n, *E.shape)
        T_acts, U = OPS.vmap(lambda x, V: OPS.vmap(lambda v: OPS.jvp(lambda d: run(x, d), (zero,), (v,))[1])(V))(X, E)
        for T in (U, *T_acts[:len(pre)]):
            if T.ndim < 3 or T.shape[2] != O:
                return False
            off = T * (1 - eye).reshape(1, *eye.shape, *([1] * (T.ndim - 3)))
            if bool((off != 0).any()):
                return False
        if not post:
            return True
        V = torch.randn((n, *zero.shape), generator=gen, dtype=self.dtype, device=self.device)
        T_acts, U = self._pushed(X, run, zero, V)
        spec = self.convs[b].spec
        W = conv.channel_outputs(U, self.params[self.convs[b].weight], spec).sum(dim=0).transpose(0, 1)
        via = self._pushed(X, self._site_run(b), zero_b, W.reshape(n, *zero_b.shape))
        tol = 10 * torch.finfo(self.dtype).eps ** 0.5
        for t, m in zip(T_acts[len(pre):], post):
            scale = float(t.abs().max()) if t.numel() else 0.0
            if not torch.allclose(t, via[m], rtol=tol, atol=tol * scale):
                return False
        return True

    # -- the perturbed network f(x, δ, θ') ----------------------------------------
    def _call(self, x, deltas=None, params=None, record=None, linears=None, convs=None, conv_calls=None,
              shifts=None):
        """The module on a batch x with parameters ``params`` (default its own); δ_l added to each dense layer's
        output; the inputs of ``linears`` (default the dense layers) recorded; ``(input, output)`` of ``convs``
        (default the conv rule's layers) recorded in ``conv_calls``; ``shifts = {k: δ}`` adds δ to the output of
        the conv rule's layer k."""
        linears = self.linears if linears is None else linears
        handles = []
        try:
            for i, (_, lin) in enumerate(linears):
                if deltas is not None:
                    handles.append(lin.register_forward_hook(lambda m, inp, out, d=deltas[i]: out + d))
                if record is not None:
                    handles.append(lin.register_forward_pre_hook(
                        lambda m, inp, i=i: record.append((i, inp[0]))))
            if conv_calls is not None:
                for k, c in enumerate([c.module for c in self.convs] if convs is None else [c for _, c in convs]):
                    handles.append(c.register_forward_hook(
                        lambda m, inp, out, k=k: conv_calls.setdefault(k, []).append((inp[0], out))))
            for k, d in (shifts or {}).items():
                handles.append(self.convs[k].module.register_forward_hook(lambda m, inp, out, d=d: out + d))
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

