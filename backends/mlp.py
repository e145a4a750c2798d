r"""A hand-written MLP with closed-form derivatives, on any array-API namespace.

``z_l = W_l a_{l−1} + b_l``, ``a_l = φ(z_l)`` for ``l < L``, ``h = z_L``, ``a_0 = x``
(``W_l``: (out, in), as ``torch.nn.Linear`` stores it).  With ``B_l = ∂h/∂z_l``
(C × n_l), ``B_L = I`` and ``B_l = B_{l+1} W_{l+1} diag φ'(z_l)``.  The diagonal
of the output Hessians with respect to ``z_l`` is (SPEC §5)

.. math::

    γ_l[c, a] = \sum_{m=l}^{L-1} \sum_k φ''(z_m)_k\,(B_{m+1} W_{m+1})[c, k]\,
                \big((∂z_m/∂z_l)[k, a]\big)^2 ,

each nonlinearity contributing its own curvature, carried to ``z_l`` by the
Jacobian ``∂z_m/∂z_l`` (propagated forward from ``∂z_l/∂z_l = I``).  The model
hands the core these per-neuron factors and the layer inputs
(:class:`fishercore.DenseBlock`); it never forms the (n, C, P) Jacobian.

Index conventions: n input, C output, k/a neuron.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

from array_api_compat import array_namespace, device, is_array_api_obj

from fishercore import _validation as V
from fishercore._protocol import DenseBlock, Derivatives, make_groups

from ._dense import chain_workspace, hessian_factors, matmul_shared

__all__ = ["ACTIVATIONS", "MLP"]


class Activation(NamedTuple):
    name: str
    fn: Callable  # z, xp -> (φ(z), φ'(z), φ''(z))
    piecewise_linear: bool  # φ'' = 0 wherever defined


def _identity(z, xp):
    return z, xp.ones_like(z), xp.zeros_like(z)


def _relu(z, xp):
    pos = z > 0
    return xp.where(pos, z, 0.0 * z), xp.astype(pos, z.dtype), xp.zeros_like(z)


def _leaky_relu(slope):
    def fn(z, xp):
        pos = z > 0
        return xp.where(pos, z, slope * z), xp.where(pos, xp.ones_like(z), slope * xp.ones_like(z)), xp.zeros_like(z)
    return fn


def _tanh(z, xp):
    t = xp.tanh(z)
    d = 1.0 - t * t
    return t, d, -2.0 * t * d


def _sigmoid(z, xp):
    e = xp.exp(-xp.abs(z))
    s = xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    d = s * (1.0 - s)
    return s, d, d * (1.0 - 2.0 * s)


def _softplus(z, xp):
    e = xp.exp(-xp.abs(z))
    s = xp.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
    return xp.maximum(z, 0.0 * z) + xp.log1p(e), s, s * (1.0 - s)


_GELU_K = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu(z, xp):
    """GELU, tanh form: ``½ z (1 + tanh(k (z + A z³)))`` as ``torch.nn.GELU(approximate="tanh")``."""
    z2 = z * z
    t = xp.tanh(_GELU_K * (z + _GELU_A * z2 * z))
    sech2 = 1.0 - t * t
    du = _GELU_K * (1.0 + 3.0 * _GELU_A * z2)  # u'
    ddu = _GELU_K * 6.0 * _GELU_A * z  # u''
    f = 0.5 * z * (1.0 + t)
    df = 0.5 * (1.0 + t) + 0.5 * z * sech2 * du
    ddf = sech2 * (du + 0.5 * z * (ddu - 2.0 * t * du * du))
    return f, df, ddf


def _elu(alpha):
    def fn(z, xp):
        pos = z > 0
        e = alpha * xp.exp(xp.minimum(z, 0.0 * z))  # α e^z on the negative side, never overflows
        return xp.where(pos, z, e - alpha), xp.where(pos, xp.ones_like(z), e), xp.where(pos, xp.zeros_like(z), e)
    return fn


#: Activation names accepted by :class:`MLP`.
ACTIVATIONS = ("identity", "relu", "leaky_relu", "tanh", "sigmoid", "softplus", "gelu", "elu")


def _activation(name, negative_slope: float, alpha: float) -> Activation:
    if not isinstance(name, str) or name.lower() not in ACTIVATIONS:
        raise ValueError(f"activation: unknown activation {name!r}; expected one of {list(ACTIVATIONS)}")
    name = name.lower()
    table = {
        "identity": (_identity, True), "relu": (_relu, True), "leaky_relu": (_leaky_relu(negative_slope), True),
        "tanh": (_tanh, False), "sigmoid": (_sigmoid, False), "softplus": (_softplus, False),
        "gelu": (_gelu, False), "elu": (_elu(alpha), False),
    }
    fn, linear = table[name]
    return Activation(name, fn, linear)


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
        self.layers = tuple(checked)
        self.activations = tuple(_activation(a, slope, alpha) for a in names)
        self.xp, self.dtype, self.device = xp, dtype, dev
        self.groups = make_groups(named_shapes)
        self.n_inputs = int(checked[0][0].shape[1])
        self.n_outputs = int(checked[-1][0].shape[0])

    def __repr__(self) -> str:
        widths = [self.n_inputs] + [int(W.shape[0]) for W, _ in self.layers]
        acts = sorted({a.name for a in self.activations}) or ["-"]
        return f"MLP({'-'.join(map(str, widths))}, activation={'/'.join(acts)}, {self.xp.__name__}, {self.dtype})"

    # -- the protocol --------------------------------------------------------
    def check_inputs(self, X):
        """``X`` must be (n, d_in), of the model's library, dtype and device."""
        V.check_floating_array(X, "X", xp=self.xp, ndim=2)
        if X.shape[1] != self.n_inputs:
            raise ValueError(f"X: expected {self.n_inputs} features per input, got shape {tuple(X.shape)}")
        if X.dtype != self.dtype:
            raise TypeError(f"X: dtype {X.dtype} differs from the model's {self.dtype}")
        if device(X) != self.device:
            raise ValueError(f"X: device {device(X)} differs from the model's {self.device}")
        return X

    def _forward(self, X):
        """Layer inputs a_{l−1}, and φ', φ'' at every hidden pre-activation."""
        xp = self.xp
        a, inputs, d1, d2 = X, [], [], []
        for (W, b), act in zip(self.layers[:-1], self.activations):
            inputs.append(a)
            z = xp.matmul(a, xp.matrix_transpose(W))
            if b is not None:
                z = z + b
            a, g1, g2 = act.fn(z, xp)
            d1.append(g1)
            d2.append(None if act.piecewise_linear else g2)
        inputs.append(a)
        W, b = self.layers[-1]
        h = xp.matmul(a, xp.matrix_transpose(W))
        return (h + b if b is not None else h), inputs, d1, d2

    def outputs(self, X):
        """``h(X)``, shape (n, C)."""
        return self._forward(X)[0]

    def derivatives(self, X, *, hessian: bool = True) -> Derivatives:
        """Outputs and per-layer factors ``(a_{l−1}, ∂h/∂z_l, diag ∂²h/∂z_l²)``.

        ``hessian=False`` skips the second-order factors (``diag_hess`` is None).
        """
        xp = self.xp
        h, inputs, d1, d2 = self._forward(X)
        n, C, L = X.shape[0], self.n_outputs, len(self.layers)
        Ws = [W for W, _ in self.layers]
        # Backward: BW[m] = B_{m+1} W_{m+1} (n, C, n_m), B[m] = BW[m] * φ'(z_m).
        eye = xp.eye(C, dtype=self.dtype, device=self.device)
        jac = [None] * L
        jac[L - 1] = xp.broadcast_to(eye, (n, C, C))
        curv = [None] * (L - 1)  # K_m = φ''(z_m) ⊙ (B_{m+1} W_{m+1})
        for m in range(L - 2, -1, -1):
            BW = matmul_shared(jac[m + 1], Ws[m + 1])
            jac[m] = BW * d1[m][:, None, :]
            if d2[m] is not None:
                curv[m] = BW * d2[m][:, None, :]
        hess = hessian_factors(Ws, d1, curv, jac) if hessian else [None] * L
        return Derivatives(h, self._blocks(inputs, jac, hess))

    def workspace_per_input(self, hessian: bool = True) -> int:
        """Bytes per input :meth:`derivatives` holds beyond its blocks (used to size batches)."""
        if not hessian:
            return 0
        widths = [int(W.shape[0]) for W, _ in self.layers]
        curved = [not a.piecewise_linear for a in self.activations] + [False]
        return chain_workspace(widths, curved, _itemsize(self.dtype))

    def _blocks(self, inputs, jac, hess):
        blocks = []
        for i in range(len(self.layers)):
            bias = f"{2 * i}.bias" if self.layers[i][1] is not None else None
            blocks.append(DenseBlock(f"{2 * i}.weight", bias, inputs[i], jac[i], hess[i]))
        return tuple(blocks)

    def pullback(self, X, cotangent_fn) -> Derivatives:
        """Per-draw ``sᵀ ∂h/∂z_l`` (M, n, n_l) for the scores ``s = cotangent_fn(h)`` (M, n, C).

        Backpropagation of each draw's score, ``g_L = s``,
        ``g_l = (g_{l+1} W_{l+1}) ⊙ φ'(z_l)``: one backward pass per draw.
        """
        xp = self.xp
        h, inputs, d1, _ = self._forward(X)
        g = cotangent_fn(h)
        L = len(self.layers)
        grads = [None] * L
        grads[L - 1] = g
        for m in range(L - 2, -1, -1):
            g = xp.matmul(g, self.layers[m + 1][0]) * d1[m][None, :, :]
            grads[m] = g
        return Derivatives(h, self._blocks(inputs, grads, [None] * L))

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
