r"""Spectral and moment bounds on the single-draw variances (docs/math.md §4).

Per input and parameter, with ``P`` the projection that removes ``Λ``'s fixed
null space (``u ↦ u − mean_c u`` for the softmax, identity otherwise) — ``v1``
and ``v2`` do not change under it, so the bounds may use the shorter vectors:

.. math::

    λ_{min}(Λ)\,‖Pw‖² ≤ v_2 ≤ λ_{max}(Λ)\,‖Pw‖²,\qquad
    \max\big(λ_{min}(𝓜)\,‖Pu‖⁴,\ E[(sᵀu)³]²/I\big) ≤ v_1 ≤ λ_{max}(𝓜)\,‖Pu‖⁴.

The last lower bound is Cauchy–Schwarz on ``E[X (X² − I)] = E[X³]`` with
``X = sᵀu``.  Reference: Soen & Sun (NeurIPS 2024), Theorem 4.1.
"""

from __future__ import annotations

from typing import NamedTuple

from array_api_compat import array_namespace

from ._protocol import Array
from .families import Moments, Spectrum

__all__ = ["Bounds", "variance_bounds"]


class Bounds(NamedTuple):
    """Two-sided bounds on v1 and v2, per input and parameter."""

    v1_lower: Array  # (n, k)
    v1_upper: Array  # (n, k)
    v2_lower: Array  # (n, k)
    v2_upper: Array  # (n, k)


def variance_bounds(moments: Moments, spectrum: Spectrum, jac_sq_norm: Array, hess_sq_norm: Array, /) -> Bounds:
    """Bounds from the projected squared norms ``‖Pu‖²`` and ``‖Pw‖²`` (each (n, k))."""
    _check_shapes(moments, spectrum, jac_sq_norm, hess_sq_norm)
    xp = array_namespace(jac_sq_norm, hess_sq_norm)
    u4 = jac_sq_norm * jac_sq_norm
    fisher = moments.fisher
    positive = fisher > 0
    safe = xp.where(positive, fisher, xp.ones_like(fisher))
    cauchy_schwarz = xp.where(positive, moments.third * moments.third / safe, xp.zeros_like(fisher))
    return Bounds(
        v1_lower=xp.maximum(spectrum.m_min[:, None] * u4, cauchy_schwarz),
        v1_upper=spectrum.m_max[:, None] * u4,
        v2_lower=spectrum.lam_min[:, None] * hess_sq_norm,
        v2_upper=spectrum.lam_max[:, None] * hess_sq_norm,
    )


def _check_shapes(moments, spectrum, jac_sq_norm, hess_sq_norm):
    from ._validation import check_floating_array

    if not isinstance(moments, Moments):
        raise TypeError(f"moments: expected fishercore.Moments, got {type(moments).__name__}")
    if not isinstance(spectrum, Spectrum):
        raise TypeError(f"spectrum: expected fishercore.Spectrum, got {type(spectrum).__name__}")
    check_floating_array(jac_sq_norm, "jac_sq_norm", ndim=2)
    shape = tuple(jac_sq_norm.shape)
    check_floating_array(hess_sq_norm, "hess_sq_norm", ndim=2)
    if tuple(hess_sq_norm.shape) != shape:
        raise ValueError(f"hess_sq_norm: expected the shape of jac_sq_norm {shape}, got {tuple(hess_sq_norm.shape)}")
    for name in ("fisher", "third"):
        if tuple(getattr(moments, name).shape) != shape:
            raise ValueError(f"moments: {name} has shape {tuple(getattr(moments, name).shape)}, expected {shape}")
    for name in Spectrum._fields:
        if tuple(getattr(spectrum, name).shape) != shape[:1]:
            raise ValueError(f"spectrum: {name} has shape {tuple(getattr(spectrum, name).shape)}, "
                             f"expected ({shape[0]},)")
