r"""Max and min pooling whose forward-mode derivatives are exact in float64 on GPUs.

JAX's forward-mode rule for ``reduce_window_max``/``reduce_window_min`` (``nn.max_pool``) is
``select_and_gather_add``.  On GPUs XLA has no reduce-window over pairs, so JAX lowers it by packing
the value and its tangent into one 64-bit word; in float64 both are first rounded to 20 mantissa
bits, with only a ``UserWarning`` ("Using reduced precision for gradient of reduce-window min/max
operator").  The column rule takes forward over forward derivatives, so a max-pooling network's
``w`` on a GPU would be right to about 1e-6 only.  (Reverse mode, the first order, is exact: it
transposes the rule into ``select_and_scatter_add``.)

:func:`exact_pooling` wraps a function so that it runs its own jaxpr with every such pooling
rewritten as the same reduction written out: the window's strided slices of the padded input,
stacked, and the first largest (smallest) of each stack taken with ``argmax`` and a gather.  The
values are identical; the derivatives are the gather's, exact in every precision on every device,
and select the same element as ``select_and_gather_add`` wherever the window's maximum is unique.
Calls (``jit``, ``closed_call``, ``remat``) are followed into their bodies; a pooling inside a
control-flow or custom-derivative body is left as it is (JAX's warning then still says so).
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._jax_program import bind, body, flatten, run

__all__ = ["exact_pooling", "needs_exact_pooling"]

_POOLS = {"reduce_window_max": True, "reduce_window_min": False}  # name -> largest


def needs_exact_pooling(device, dtype) -> bool:
    """Whether JAX's own pooling rule loses precision here: 64-bit floats on a GPU."""
    return getattr(device, "platform", "cpu") == "gpu" and np.dtype(dtype).itemsize == 8


def _window_extreme(x, *, window_dimensions, window_strides, padding, base_dilation, window_dilation, largest):
    """``reduce_window_max`` (``largest``) or ``reduce_window_min`` of ``x``, as a gather of its window's slices."""
    fill = -np.inf if largest else np.inf
    padded = lax.pad(x, jnp.asarray(fill, dtype=x.dtype),
                     [(lo, hi, b - 1) for (lo, hi), b in zip(padding, base_dilation)])
    out = [(n - (w - 1) * d - 1) // s + 1
           for n, w, d, s in zip(padded.shape, window_dimensions, window_dilation, window_strides)]
    slices = []
    for offset in itertools.product(*(range(w) for w in window_dimensions)):
        start = [o * d for o, d in zip(offset, window_dilation)]
        limit = [a + (m - 1) * s + 1 for a, m, s in zip(start, out, window_strides)]
        slices.append(lax.slice(padded, start, limit, window_strides))
    stacked = jnp.stack(slices)
    pick = (jnp.argmax if largest else jnp.argmin)(stacked, axis=0)
    return jnp.take_along_axis(stacked, pick[None], axis=0)[0]


def _pooling(eqn) -> bool:
    """A max or min pooling of floats."""
    return eqn.primitive.name in _POOLS and jnp.issubdtype(eqn.invars[0].aval.dtype, jnp.inexact)


def _pools(jaxpr) -> bool:
    """Whether ``jaxpr`` pools floats with max or min, directly or inside an inlinable call."""
    for eqn in jaxpr.eqns:
        inner = body(eqn)
        if _pooling(eqn) or (inner is not None and _pools(inner[0])):
            return True
    return False


def _apply(eqn, values) -> list:
    """One equation's results, with float max/min pooling written out."""
    if _pooling(eqn):
        return [_window_extreme(values[0], largest=_POOLS[eqn.primitive.name], **eqn.params)]
    return bind(eqn, values)


class exact_pooling:  # noqa: N801 (a function wrapper, named as one)
    """``apply_fn`` with its max/min pooling written out (see the module); hashable like ``apply_fn``, since
    compiled code takes it as a static argument."""

    def __init__(self, apply_fn):
        self.apply_fn = apply_fn

    def __call__(self, *args):
        closed, shape = jax.make_jaxpr(self.apply_fn, return_shape=True)(*args)
        if not _pools(closed.jaxpr):
            return self.apply_fn(*args)
        outs = run(flatten(closed), jax.tree_util.tree_leaves(args), apply=_apply)[0]
        return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(shape), outs)

    def __eq__(self, other):
        return isinstance(other, exact_pooling) and other.apply_fn == self.apply_fn

    def __hash__(self):
        return hash((exact_pooling, self.apply_fn))
