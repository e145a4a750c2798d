r"""A hand-written MLP with closed-form derivatives, on any array-API namespace.

``z_l = W_l a_{l−1} + b_l``, ``a_l = φ(z_l)`` for ``l < L``, ``h = z_L``, ``a_0 = x``
(``W_l``: (out, in), as ``torch.nn.Linear`` stores it).  The model supplies the closed
forms of its activations' ``φ'`` and ``φ''`` (:mod:`fishercore.backends.rules.activations`)
to the dense-chain rule (:mod:`fishercore.backends.rules.dense`, docs/math.md §8), the
same rule the torch and JAX adapters use with their frameworks' autodiff.  It hands the
core per-neuron factors and the layer inputs (:class:`fishercore.DenseBlock`); it never
forms the (n, C, P) Jacobian.  On JAX arrays the rule is compiled once per structure
(activations, dtype and shapes), not per instance.

Index conventions: n input, C output, k/a neuron.
"""

from __future__ import annotations

from collections.abc import Sequence

from array_api_compat import array_namespace, device, is_array_api_obj

from fishercore import _validation as V
from fishercore._protocol import Derivatives, make_groups

from .ops import ops_for
from .rules import dense
from .rules.activations import ACTIVATIONS, get_activation

__all__ = ["ACTIVATIONS", "MLP"]


def _itemsize(dtype) -> int:
    size = getattr(dtype, "itemsize", None)
    return int(size) if size else (4 if "32" in str(dtype) else 8)


class MLP:
    r"""A dense network given by its weights, with exact first and second derivatives.

    Parameters
    ----------
    layers : sequence of (W, b)
        ``W`` of shape (out, in) as ``torch.nn.Linear`` stores it, ``b`` of shape
        (out,) or ``None`` for a layer without bias.  All arrays of one array-API
        library, one real floating dtype and one device.
    activation : str or sequence of str
        One of :data:`ACTIVATIONS` for every hidden layer, or one name per hidden
        layer.  ``"gelu"`` is the tanh form (``torch.nn.GELU(approximate="tanh")``).
    negative_slope : float
        Slope of ``leaky_relu`` for negative inputs (torch's default 0.01).
    alpha : float
        Scale of ``elu`` for negative inputs (torch's default 1.0).

    Notes
    -----
    Parameter groups are named as in the equivalent
    ``torch.nn.Sequential(Linear, act, Linear, act, ..., Linear)``:
    ``"0.weight", "0.bias", "2.weight", ...``; the flat order is that of
    ``Sequential.parameters()``.

    Examples
    --------
    >>> import numpy as np
    >>> from fishercore.backends import mlp
    >>> rng = np.random.default_rng(0)
    >>> net = mlp.MLP([(rng.normal(size=(5, 3)), np.zeros(5)), (rng.normal(size=(2, 5)), None)], "relu")
    >>> [g.name for g in net.groups], net.n_outputs
    (['0.weight', '0.bias', '2.weight'], 2)
    """

    def __init__(self, layers: Sequence, activation="tanh", *, negative_slope: float = 0.01, alpha: float = 1.0):
        if is_array_api_obj(layers) or not isinstance(layers, Sequence) or len(layers) == 0:
            raise TypeError("layers: expected a non-empty sequence of (W, b) pairs")
        xp = dtype = dev = None
        checked, named_shapes = [], []
        for i, pair in enumerate(layers):
            if not isinstance(pair, Sequence) or len(pair) != 2:
                raise TypeError(f"layers[{i}]: expected a (W, b) pair, got {type(pair).__name__}")
            W, b = pair
            V.check_floating_array(W, f"layers[{i}] weight", xp=xp, ndim=2)
            if xp is None:
                xp, dtype, dev = array_namespace(W), W.dtype, device(W)
            if W.dtype != dtype:
                raise TypeError(f"layers[{i}] weight: dtype {W.dtype} differs from layers[0]'s {dtype}")
            if device(W) != dev:
                raise ValueError(f"layers[{i}] weight: device {device(W)} differs from layers[0]'s {dev}")
            if checked and W.shape[1] != checked[-1][0].shape[0]:
                raise ValueError(f"layers[{i}] weight: expects {W.shape[1]} inputs but layers[{i - 1}] has "
                                 f"{checked[-1][0].shape[0]} outputs")
            V.check_finite(W, f"layers[{i}] weight")
            if b is not None:
                V.check_floating_array(b, f"layers[{i}] bias", xp=xp, ndim=1)
                if b.shape[0] != W.shape[0]:
                    raise ValueError(f"layers[{i}] bias: expected shape ({W.shape[0]},), got {tuple(b.shape)}")
                if b.dtype != dtype:
                    raise TypeError(f"layers[{i}] bias: dtype {b.dtype} differs from the weights' {dtype}")
                V.check_finite(b, f"layers[{i}] bias")
            checked.append((W, b))
            named_shapes.append((f"{2 * i}.weight", tuple(W.shape)))
            if b is not None:
                named_shapes.append((f"{2 * i}.bias", tuple(b.shape)))
        n_hidden = len(checked) - 1
        names = [activation] * n_hidden if isinstance(activation, str) else list(activation)
        if len(names) != n_hidden:
            raise ValueError(f"activation: expected one name or {n_hidden} names (one per hidden layer), "
                             f"got {len(names)}")
        slope = V.check_positive_real(negative_slope, "negative_slope") if negative_slope != 0 else 0.0
        alpha = V.check_positive_real(alpha, "alpha")
        self.ops = ops_for(checked[0][0])
        self.layers = tuple(checked)
        self.activations = tuple(get_activation(a, slope, alpha) for a in names)
        self.xp, self.dtype, self.device = xp, dtype, dev
        self.groups = make_groups(named_shapes)
        self.layout = tuple((f"{2 * i}.weight", f"{2 * i}.bias" if b is not None else None, False)
                            for i, (_, b) in enumerate(checked))
        self.n_inputs = int(checked[0][0].shape[1])
        self.n_outputs = int(checked[-1][0].shape[0])

    def __repr__(self) -> str:
        widths = [self.n_inputs] + [int(W.shape[0]) for W, _ in self.layers]
        acts = sorted({a.name for a in self.activations}) or ["-"]
        return f"MLP({'-'.join(map(str, widths))}, activation={'/'.join(acts)}, {self.xp.__name__}, {self.dtype})"

    # -- the rule's arguments: arrays, and the structure (static for compiled code) -----------
    @property
    def _weights(self):
        return tuple(W for W, _ in self.layers)

    @property
    def _biases(self):
        return tuple(b for _, b in self.layers)

    @property
    def _chain_activations(self):
        return self.activations + (None,)  # the last layer is linear: h = z_L

    # -- the protocol --------------------------------------------------------
    def check_inputs(self, X):
        """``X`` must be (n, d_in), of the model's library, dtype and device."""
        return V.check_inputs(X, xp=self.xp, dtype=self.dtype, device=self.device, input_shape=(self.n_inputs,))

    def outputs(self, X):
        """``h(X)``, shape (n, C)."""
        forward = self.ops.jit(dense.forward, ("activations", "order"))
        return forward(self._weights, self._biases, X, activations=self._chain_activations, order=0)[0]

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        """Outputs and per-layer factors ``(a_{l−1}, ∂h/∂z_l, diag ∂²h/∂z_l²)``.

        ``hessian=False`` skips the second-order factors (``diag_hess`` is None).
        """
        derivs = self.ops.jit(dense.derivatives, ("activations", "hessian"))
        h, inputs, jac, hess = derivs(self._weights, self._biases, X, activations=self._chain_activations,
                                      hessian=hessian)
        return Derivatives(h, dense.dense_blocks(self.layout, inputs, jac, hess))

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """Per-draw ``sᵀ ∂h/∂z_l`` (n, M, n_l) for the scores ``s = cotangent_fn(h)`` (M, n, C): one backward
        pass per draw."""
        forward = self.ops.jit(dense.forward, ("activations", "order"))
        h, inputs, d1, _ = forward(self._weights, self._biases, X, activations=self._chain_activations, order=1)
        s = self.xp.permute_dims(cotangent_fn(h), (1, 0, 2))
        grads = self.ops.jit(dense.backpropagate)(self._weights, d1, s)[0]
        return Derivatives(h, dense.dense_blocks(self.layout, inputs, grads, [None] * len(grads)))

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input :meth:`derivatives` holds beyond its blocks (used to size batches)."""
        widths = [int(W.shape[0]) for W, _ in self.layers]
        curved = [not a.piecewise_linear for a in self.activations] + [False]
        return dense.workspace(widths, curved, _itemsize(self.dtype), hessian)

    # -- conveniences --------------------------------------------------------
    def parameters(self):
        """The parameter arrays in flat order (weight, bias, weight, ...)."""
        return [p for W, b in self.layers for p in ((W,) if b is None else (W, b))]

    def with_parameters(self, flat):
        """A copy of this MLP with the parameters taken from a flat (P,) vector."""
        xp = self.xp
        V.check_floating_array(flat, "flat", xp=xp, ndim=1)
        P = sum(g.size for g in self.groups)
        if flat.shape[0] != P:
            raise ValueError(f"flat: expected {P} parameters, got {flat.shape[0]}")
        arrays = {g.name: xp.reshape(flat[g.offset:g.offset + g.size], g.shape) for g in self.groups}
        layers = [(arrays[f"{2 * i}.weight"], arrays.get(f"{2 * i}.bias")) for i in range(len(self.layers))]
        new = object.__new__(MLP)
        new.__dict__.update(self.__dict__)
        new.layers = tuple(layers)
        return new

    def flat_parameters(self):
        """All parameters as one (P,) vector in flat order."""
        return self.xp.concat([self.xp.reshape(p, (-1,)) for p in self.parameters()])
