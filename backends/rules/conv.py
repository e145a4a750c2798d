r"""Convolutions: the tangent each weight gives the layer's output, for the Hessian diagonal (docs/math.md §13).

A convolution ``z[o, p] = Σ_{i,k} W[o, i, k] · x_pad[i, p·s + k·d] + b[o]`` is linear in its
parameters, and they reach the outputs ``h`` only through ``z``.  So along one weight's unit
vector the output moves by a fixed tangent ``v`` of ``z`` — the weight's input patch, in its
output channel:

.. math::

    v(W[o, i, k])[o', p] = [o' = o]\, x_{\rm unf}[i, k, p], \qquad v(b[o])[o', p] = [o' = o],

and ``w(θ) = ∂²h/∂θ² = vᵀ (∂²h/∂z²) v``, the second derivative of ``h`` along ``v``, starting
at ``z`` rather than at the weights.  This holds whatever follows the layer (pooling, batch
norm, residual additions, any activation), and it needs the curvature across positions of an
output channel, which a diagonal of ``∂²h/∂z²`` (the dense rule's) does not give.

The functions here build those tangents on any array-API namespace: :func:`patches` gathers
``x_unf`` (n, I·K, P) with an index computed once per layer (:func:`patch_index`), and
:func:`weight_directions` / :func:`bias_directions` place them in their channels.  Adapters
differentiate along them with their framework's forward over forward
(:func:`fishercore.backends.rules.columns.diag_hessian`).

Index conventions: ``n`` inputs, ``I``/``O`` input/output channels, ``K`` kernel positions, ``P``
output positions; a weight's flat index is ``(o, i', k)`` row-major with ``i'`` counted within
its group of ``I / groups`` channels, as frameworks store ``(O, I/groups, *kernel)``.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import numpy as np
from array_api_compat import array_namespace, device

__all__ = ["ConvSpec", "bias_directions", "channel_outputs", "channel_sets", "patch_index", "patches",
           "weight_directions", "weight_sums"]


class ConvSpec(NamedTuple):
    """A convolution's geometry: channels, per-axis kernel, stride, padding (before, after), dilation, and the
    input and output spatial shapes."""

    in_channels: int
    out_channels: int
    groups: int
    kernel: tuple
    stride: tuple
    padding: tuple  # ((before, after), ...) per spatial axis
    dilation: tuple
    in_spatial: tuple
    out_spatial: tuple

    @property
    def weight_size(self) -> int:
        return self.out_channels * (self.in_channels // self.groups) * math.prod(self.kernel)

    @property
    def positions(self) -> int:
        return math.prod(self.out_spatial)


def patch_index(spec: ConvSpec) -> np.ndarray:
    """(I·K, P) indices into an input padded by ``spec.padding`` and flattened to (I·∏ padded spatial):
    ``x_unf[i·K + k, p]`` is the input that kernel position k meets at output position p."""
    padded = [s + lo + hi for s, (lo, hi) in zip(spec.in_spatial, spec.padding)]
    K, P = math.prod(spec.kernel), spec.positions
    offset = np.zeros((K, P), dtype=np.int64)
    ks = np.indices(spec.kernel).reshape(len(spec.kernel), K)
    ps = np.indices(spec.out_spatial).reshape(len(spec.out_spatial), P)
    stride_len = 1
    for axis in range(len(padded) - 1, -1, -1):
        coord = ps[axis][None, :] * spec.stride[axis] + ks[axis][:, None] * spec.dilation[axis]
        offset += coord * stride_len
        stride_len *= padded[axis]
    channel = np.arange(spec.in_channels)[:, None, None] * stride_len
    return (channel + offset[None]).reshape(spec.in_channels * K, P)


def patches(x, spec: ConvSpec, index):
    """``x_unf`` (n, I·K, P) of a batch x ``(n, I, *in_spatial)``; ``index`` from :func:`patch_index` on x's
    namespace and device."""
    xp = array_namespace(x)
    n = x.shape[0]
    flat = xp.reshape(_padded(x, spec), (n, -1))
    rows, P = index.shape
    return xp.reshape(xp.take(flat, xp.reshape(index, (-1,)), axis=1), (n, rows, P))


def _padded(x, spec: ConvSpec):
    """x ``(a, b, *in_spatial)`` with the layer's zero padding around its spatial axes."""
    xp = array_namespace(x)
    for axis, (lo, hi) in enumerate(spec.padding):
        if lo or hi:
            shape = list(x.shape)
            parts = []
            for width in (lo, hi):
                shape[2 + axis] = width
                parts.append(xp.zeros(tuple(shape), dtype=x.dtype, device=device(x)))
            x = xp.concat([parts[0], x, parts[1]], axis=2 + axis)
    return x


def weight_sums(D, rows, spec: ConvSpec):
    """``Σ_p D[c, o, p] · rows[n, row(o, i, k), p]`` for every weight: ``D`` ``(n, C, O, *out_spatial)``, ``rows``
    (n, I·K, P) → (n, C, weights) in the weight's layout ``(O, I/g, *kernel)``.

    With ``D = ∂h/∂z`` and the patches as ``rows`` these are the weights' Jacobian rows, ``u``; with the
    curvature rule's ``K`` and the squared patches, their Hessian diagonals (:func:`.curvature.conv_direct`).
    One matrix product per group of channels: ``D (O/g × P) @ rowsᵀ (P × I/g·K)``.
    """
    xp = array_namespace(D, rows)
    n, C = D.shape[:2]
    g, P, O = spec.groups, spec.positions, spec.out_channels
    r = xp.reshape(rows, (n, g, -1, P))  # (n, g, I/g·K, P)
    # every output and channel of a group in one product: (C·O/g × P) @ (P × I/g·K), the patches not repeated per
    # output (a broadcast over C would copy them C times); the permutations move a size-1 axis when g = 1
    Dg = xp.reshape(xp.permute_dims(xp.reshape(D, (n, C, g, O // g, P)), (0, 2, 1, 3, 4)), (n, g, C * (O // g), P))
    out = xp.reshape(xp.matmul(Dg, xp.matrix_transpose(r)), (n, g, C, O // g, -1))
    return xp.reshape(xp.permute_dims(out, (0, 2, 1, 3, 4)), (n, C, spec.weight_size))


def weight_layout(spec: ConvSpec):
    """Per flat weight index: its output channel and its row of ``x_unf``."""
    per_group_in = spec.in_channels // spec.groups
    per_group_out = spec.out_channels // spec.groups
    K = math.prod(spec.kernel)
    o, i, k = np.unravel_index(np.arange(spec.weight_size), (spec.out_channels, per_group_in, K))
    return o, ((o // per_group_out) * per_group_in + i) * K + k


def weight_directions(unf, spec: ConvSpec, start: int, k: int):
    """The tangents of z along weights ``start .. start+k−1``, ``(n, k, O, *out_spatial)``; zero past the last
    weight (so every chunk has the same k)."""
    xp = array_namespace(unf)
    n, _, P = unf.shape
    o, rows = weight_layout(spec)
    idx = np.arange(start, start + k)
    valid = idx < spec.weight_size
    idx = np.where(valid, idx, 0)
    # one-hot of each direction's output channel, times its patch row: (n, k, O, P)
    onehot = np.zeros((k, spec.out_channels), dtype=bool)
    onehot[np.arange(k), o[idx]] = valid
    mask = xp.asarray(onehot, dtype=unf.dtype, device=device(unf))
    rows_x = xp.asarray(rows[idx], device=device(unf))
    sel = xp.take(unf, rows_x, axis=1)  # (n, k, P)
    out = sel[:, :, None, :] * mask[None, :, :, None]
    return xp.reshape(out, (n, k, spec.out_channels, *spec.out_spatial))


def bias_directions(xp, spec: ConvSpec, start: int, k: int, *, dtype, dev):
    """The tangents of z along biases ``start .. start+k−1``, ``(k, O, *out_spatial)``: ones over each bias's channel;
    zero past the last bias."""
    eye = xp.eye(k, spec.out_channels, k=start, dtype=dtype, device=dev)
    ones = xp.ones((1, 1, spec.positions), dtype=dtype, device=dev)
    return xp.reshape(eye[:, :, None] * ones, (k, spec.out_channels, *spec.out_spatial))


def channel_outputs(U, weight, spec: ConvSpec):
    """The layer's output from each input channel alone, without bias: ``U`` (m, I, *in_spatial) (tangents of
    its input) → (I, O, m, P), ``Σ_k W[o, i, k] · U_unf[i, k, p]``, whose sum over I is the layer's linear map.
    Channel first, as one matrix product per channel gives it.

    A tangent that lives in one channel of the input until here (it came from one output channel of an earlier
    layer, through channel-wise operations) is mapped by this layer along that channel's weights alone; so one
    tangent per (input row, kernel position) of the earlier layer, every channel of it at once, gives the tangents
    of all its weights at this layer's output (docs/math.md §13).  With ``groups`` > 1 an input channel reaches
    its group's outputs only: the weight is laid out densely with zeros across groups.
    """
    xp = array_namespace(U, weight)
    m, g = U.shape[0], spec.groups
    I, O, K, P = spec.in_channels, spec.out_channels, math.prod(spec.kernel), spec.positions
    W = xp.reshape(weight, (g, O // g, I // g, K))
    if g > 1:
        zero = xp.zeros((O // g, I // g, K), dtype=weight.dtype, device=device(weight))
        rows = [xp.concat([W[a] if b == a else zero for b in range(g)], axis=1) for a in range(g)]
        W = xp.concat(rows, axis=0)  # (O, I, K)
    W = xp.permute_dims(xp.reshape(W, (O, I, K)), (1, 0, 2))  # (I, O, K)
    # the patches (I, K, m·P): one gather from the unpadded input with a zero appended, which the padding reads
    n_in = math.prod(spec.in_spatial)
    x = xp.reshape(xp.permute_dims(U, (1, 0, *range(2, U.ndim))), (I, m, n_in))
    x = xp.concat([x, xp.zeros((I, m, 1), dtype=U.dtype, device=device(U))], axis=2)
    unf = xp.take(x, xp.asarray(_source_index(spec), device=device(U)), axis=2)  # (I, m, K·P)
    unf = xp.reshape(xp.permute_dims(xp.reshape(unf, (I, m, K, P)), (0, 2, 1, 3)), (I, K, m * P))
    return xp.reshape(xp.matmul(W, unf), (I, O, m, P))  # one product per channel, not m·I small ones


@functools.lru_cache(maxsize=64)
def _source_index(spec: ConvSpec) -> np.ndarray:
    """(K·P,) flat indices into one channel of an unpadded input (∏ in_spatial), kernel position major: the input
    that kernel position k meets at output position p, or ∏ in_spatial (one past the end) where it meets padding."""
    padded = [s + lo + hi for s, (lo, hi) in zip(spec.in_spatial, spec.padding)]
    K = math.prod(spec.kernel)
    at = np.unravel_index(patch_index(spec)[:K].reshape(-1), padded)  # channel 0's rows: offsets in one channel
    coords = [a - lo for a, (lo, _) in zip(at, spec.padding)]
    inside = np.logical_and.reduce([(c >= 0) & (c < s) for c, s in zip(coords, spec.in_spatial)])
    flat = np.ravel_multi_index([np.where(inside, c, 0) for c in coords], spec.in_spatial)
    return np.where(inside, flat, math.prod(spec.in_spatial))


def channel_sets(channels: int) -> np.ndarray:
    """(2·⌈log2 channels⌉, channels) 0/1 rows: per bit b, the channels whose index has b set, and the others.

    Random tangents on these sets show whether a map keeps every channel to itself: any two channels differ in
    some bit, so a map that sends anything of channel o into channel o' ≠ o gives, along the tangent on the set
    that holds o and not o', a tangent in a channel outside that set — where a channel-wise map gives zero.  That
    takes 2 log2 O tangents, where one per channel would take O.
    """
    bits = max(1, (channels - 1).bit_length())
    index = np.arange(channels)
    rows = [((index >> b) & 1) == v for b in range(bits) for v in (1, 0)]
    return np.asarray([r for r in rows if r.any()], dtype=np.float64)
