"""``from_module``: per-neuron factors of any module of ``nn.Linear`` layers, by perturbing each Linear's output.

The column rule (:mod:`fishercore.backends.rules.columns`, docs/math.md §9) differentiates
``f(x, δ) = h`` with ``δ_l`` added to each Linear's output by a forward hook: one ``vjp`` per
output for ``∂h/∂z_l``, forward over forward along each neuron for ``diag ∂²h/∂z_l²``.  It
knows nothing of the graph between the Linear layers, so it is independent of the
dense-chain rule that :func:`~fishercore.backends.torch.from_sequential` uses.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

from fishercore._protocol import Derivatives
from fishercore._validation import check_input_shape

from ._torch_base import MODULE_LOCK, OPS, TorchModel, check_tensor, outputs_width
from .rules import columns, dense

__all__ = ["TorchModule"]


class TorchModule(TorchModel):
    """A ``torch.nn.Module`` whose trainable layers are all ``nn.Linear`` (use :func:`from_module`)."""

    def __init__(self, module: nn.Module, input_shape=None):
        super().__init__(module)
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
        self.input_shape = check_input_shape(input_shape)
        probe = self.input_shape or (self.linears[0][1].in_features,)
        try:
            with MODULE_LOCK, torch.no_grad():
                h = self._call(torch.zeros((1, *probe), dtype=self.dtype, device=self.device))
        except (RuntimeError, ValueError, IndexError, TypeError) as e:
            raise ValueError(f"input_shape: the module cannot run on one input of shape {probe} ({e}); "
                             "pass input_shape=, the shape of one input without the batch axis") from e
        self.n_outputs = outputs_width(h, "module")

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
        outputs_width(h, "module")
        return h, inputs

    def _zero_deltas(self, n):
        return tuple(torch.zeros(n, lin.out_features, dtype=self.dtype, device=self.device) for _, lin in self.linears)

    # -- the protocol -----------------------------------------------------------
    def check_inputs(self, X):
        check_tensor(X, dtype=self.dtype, device=self.device, input_shape=self.input_shape)
        try:
            with MODULE_LOCK, torch.no_grad():
                h = self._call(X[:1])
        except (RuntimeError, ValueError, IndexError) as e:
            raise ValueError(f"X: the module cannot run on inputs of shape {tuple(X.shape)}: {e}") from e
        if outputs_width(h, "module") != self.n_outputs:
            raise ValueError(f"X: the module gives {h.shape[1]} outputs on inputs of shape {tuple(X.shape)}, "
                             f"not the {self.n_outputs} it gave when built; pass input_shape=")
        return X

    def outputs(self, X):
        with MODULE_LOCK, torch.no_grad():
            return self._call(X)

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input the vmapped transforms hold beyond the blocks (used to size batches).

        C cotangents through every layer; the per-neuron Hessian pass: one forward-over-forward
        per neuron of the widest layer, each holding every layer's values three times (primal
        and two tangents).
        """
        outs = [lin.out_features for _, lin in self.linears]
        per_pass = sum(outs) + sum(lin.in_features for _, lin in self.linears)
        second = 3 * max(outs) * per_pass if hessian else 0
        return (2 * self.n_outputs * per_pass + second) * self.dtype.itemsize

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        n = X.shape[0]
        eye = torch.eye(self.n_outputs, dtype=self.dtype, device=self.device)
        with MODULE_LOCK, torch.no_grad():
            h, inputs = self._forward(X)
            deltas = self._zero_deltas(n)
            jac = OPS.vmap(lambda x, ds: columns.pullback(OPS, lambda d: self._single(x, d), ds, eye))(X, deltas)
            hess = [self._diag_hessian(X, deltas, l) for l in range(len(self.linears))] if hessian \
                else [None] * len(self.linears)
        return Derivatives(h, dense.dense_blocks(self._layout(), inputs, jac, hess))

    def _diag_hessian(self, X, deltas, l):
        """diag ∂²h/∂z_l², (n, C, out_l): forward over forward along each neuron of z_l."""
        out = deltas[l].shape[1]

        def neurons(start, k):
            E = columns.unit_directions(OPS.xp, (out,), start, k, dtype=self.dtype, device=self.device)

            def one(x, ds):
                return columns.diag_hessian(OPS, lambda dl: self._single(x, ds[:l] + (dl,) + ds[l + 1:]), ds[l], E)

            return OPS.vmap(one)(X, deltas)  # (n, k, C)

        return columns.chunked(out, out, neurons)

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """``sᵀ ∂h/∂z_l`` (n, M, out) for every draw: one vjp (backward pass) per draw, vmapped."""
        with MODULE_LOCK, torch.no_grad():
            h, inputs = self._forward(X)
            s = cotangent_fn(h).transpose(0, 1)  # (n, M, C)
            grads = OPS.vmap(lambda x, ds, si: columns.pullback(OPS, lambda d: self._single(x, d), ds, si))(
                X, self._zero_deltas(X.shape[0]), s)
        return Derivatives(h, dense.dense_blocks(self._layout(), inputs, list(grads), [None] * len(grads)))
