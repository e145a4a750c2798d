"""The model protocol: what a backend hands the core.

A backend adapts a network (a hand-written MLP, a ``torch.nn.Module``, a JAX
function of a parameter pytree) to one small interface.  The core never asks for
parameters themselves, only for derivatives of the outputs ``h`` (``C`` of them)
with respect to the parameters, one batch of inputs at a time.

Two kinds of derivative blocks cover every parameter group:

* :class:`DenseBlock` for a dense layer ``z = W a + b`` (``W``: (out, in)).  The
  block hands *per-neuron* factors, never per-parameter columns: the layer
  inputs ``a`` (n, in), ``∂h/∂z`` (n, C, out) and the diagonal of ``∂²h/∂z²``
  (n, C, out).  Then ``u(W[a, b]) = ∂h/∂z[:, a] · a_b`` and
  ``w(W[a, b]) = diag∂²h/∂z²[:, a] · a_b²`` (docs/math.md §8), which the core
  combines with matrix products.
* :class:`ColumnBlock` for any other parameter group: the full columns
  ``u_i = ∂h/∂θ_i`` and ``w_i = ∂²h/∂θ_i²``, each (n, C, p).

Every model implements :class:`Model`.  Two capabilities are optional, each a
declared protocol that the core checks with ``isinstance``:

* :class:`SupportsPullback` — ``pullback(X, cotangent_fn)``: the vector-Jacobian
  products ``sᵀ ∂h/∂z`` for a batch of score vectors, one backward pass per label
  draw — all that Î1 needs;
* :class:`DeclaresWorkspace` — ``workspace_per_input(hessian)``: bytes per input the
  model holds beyond its derivative blocks, used to size batches to a memory budget;
* :class:`SupportsGroupSelection` — ``derivatives_of(X, groups, hessian)``: the blocks of some
  groups only, so that a model whose full columns for one input exceed the budget is analysed
  a few groups at a time (or, with sequence outputs and ``position_chunks``, a few positions at a
  time).

Index conventions: n input, C output, p parameter of the group, m label draw.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol, runtime_checkable

Array = Any  # any array-API array

__all__ = [
    "Array",
    "ColumnBlock",
    "DeclaresWorkspace",
    "DenseBlock",
    "Derivatives",
    "Model",
    "ParamGroup",
    "SupportsGroupSelection",
    "SupportsPullback",
    "make_groups",
    "weight_flat",
]


class ParamGroup(NamedTuple):
    """One parameter group (a weight matrix, a bias vector, ...).

    Its parameters occupy ``flat[offset : offset + size]`` of the flat parameter
    vector, in row-major order of ``shape``.
    """

    name: str  # the framework's own name, e.g. "0.weight"
    shape: tuple[int, ...]  # the parameter's own shape, e.g. (out, in)
    offset: int  # start in the flat (P,) vector

    @property
    def size(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


def make_groups(named_shapes: Sequence[tuple[str, tuple[int, ...]]]) -> tuple[ParamGroup, ...]:
    """Lay groups out one after another in the given order."""
    groups, offset = [], 0
    names = set()
    for name, shape in named_shapes:
        if name in names:
            raise ValueError(f"parameter group names must be unique; {name!r} appears twice")
        names.add(name)
        g = ParamGroup(str(name), tuple(int(s) for s in shape), offset)
        groups.append(g)
        offset += g.size
    return tuple(groups)


class DenseBlock(NamedTuple):
    """Per-neuron derivative factors of one dense layer ``z = W a + b``.

    In a :meth:`SupportsPullback.pullback` result, ``jac`` holds ``sᵀ ∂h/∂z`` instead,
    shape (n, M, out), and ``diag_hess`` is None.
    """

    weight: str  # group name of W, shape (out, in); (in, out) when transposed
    bias: str | None  # group name of b, shape (out,), or None without bias
    inputs: Array  # (n, in)     layer inputs a
    jac: Array  # (n, C, out)    ∂h/∂z
    diag_hess: Array  # (n, C, out)  diagonal of ∂²h/∂z², one per output c (None if not asked for)
    transposed: bool = False  # True: the weight group is stored (in, out), as Flax's Dense kernel


class ColumnBlock(NamedTuple):
    """Full derivative columns of one parameter group (any architecture).

    In a :meth:`SupportsPullback.pullback` result, ``jac`` holds ``sᵀ ∂h/∂θ`` (n, M, p)
    and ``diag_hess`` is None.
    """

    group: str  # group name
    jac: Array  # (n, C, p)       u_i = ∂h/∂θ_i, p = group size, row-major
    diag_hess: Array  # (n, C, p)  w_i = ∂²h/∂θ_i² (None if not asked for)


class Derivatives(NamedTuple):
    """Everything the core needs about one batch of inputs."""

    outputs: Array  # (n, C)  h(x)
    blocks: tuple  # DenseBlock | ColumnBlock, covering every group once


def weight_flat(transposed: bool, per_weight: Array) -> Array:
    """Flatten a per-weight (out, in) array in the group's own row-major order."""
    from array_api_compat import array_namespace

    xp = array_namespace(per_weight)
    if transposed:
        per_weight = xp.permute_dims(per_weight, (1, 0))
    return xp.reshape(per_weight, (-1,))


@runtime_checkable
class Model(Protocol):
    """What every backend implements.

    Attributes
    ----------
    groups : tuple of ParamGroup
        Every parameter group, in flat order (``torch.nn.Module.parameters()``
        order for torch models).
    n_outputs : int
        ``C``, the width of ``h``; known when the model is built.
    """

    groups: tuple[ParamGroup, ...]
    n_outputs: int

    def check_inputs(self, X: Array, /) -> Array:
        """Validate a batch of inputs (shape, dtype, namespace) and return it."""

    def outputs(self, X: Array, /) -> Array:
        """``h(X)``, shape (n, C)."""

    def derivatives(self, X: Array, /, *, hessian: bool = True) -> Derivatives:
        """Outputs and derivative blocks for a batch ``X``.

        With ``hessian=False`` the blocks' ``diag_hess`` may be ``None`` (first
        derivatives suffice for Î1), which saves the model the second-order work.
        """


@runtime_checkable
class SupportsPullback(Protocol):
    """A model that backpropagates score vectors directly (used by ``estimate(..., "i1")``)."""

    def pullback(self, X: Array, cotangent_fn, /) -> Derivatives:
        """``h = h(X)``; ``s = cotangent_fn(h)`` of shape (M, n, C); blocks whose ``jac`` is
        ``sᵀ ∂h/∂z`` (n, M, out) for dense blocks or ``sᵀ ∂h/∂θ`` (n, M, p) for columns:
        per-sample gradients of ``Σ_c s_c h_c``, one backward pass per draw."""


@runtime_checkable
class DeclaresWorkspace(Protocol):
    """A model that says how much memory its derivative computation holds (used to size batches)."""

    def workspace_per_input(self, hessian: bool, /) -> int:
        """Bytes per input held beyond the derivative blocks themselves."""


@runtime_checkable
class SupportsGroupSelection(Protocol):
    """A model that computes the derivative blocks of chosen groups only (used by ``analyze`` under a memory budget).

    A model with sequence outputs (T, C) may also set ``position_chunks = True`` and take
    ``derivatives_of(X, groups, hessian=..., positions=(t0, t1))``: column blocks of the outputs of positions
    t0 .. t1 − 1 only, (n, (t1 − t0)·C, p), with ``outputs`` the whole sequences' (n, T·C).  ``analyze`` then
    takes a sequence whose columns exceed the budget a span of positions at a time, every group each time, and
    merges the per-sequence moments (docs/math.md §12) — each output's backward pass runs once, where a plan of
    groups runs them once per set of groups.  ``position_workspace(span)``, optional: bytes per input such a call
    holds beyond its blocks (else the span's share of ``workspace_per_input``).
    """

    def derivatives_of(self, X: Array, groups, /, *, hessian: bool = True) -> Derivatives:
        """:meth:`Model.derivatives` restricted to the blocks that cover the named ``groups`` (a dense block whole
        when any of its groups is named); the same numbers as the full call for those groups."""
