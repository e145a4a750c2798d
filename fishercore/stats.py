r"""Per-input diagonal Fisher statistics of one derivative block (docs/math.md §2–§4).

For each input x and each parameter (or neuron) with output derivatives
``u = ∂h/∂θ_i`` and ``w = ∂²h/∂θ_i²``:

.. math::

    I = uᵀΛu,\quad v_1 = E[(sᵀu)^4] − I^2,\quad v_2 = wᵀΛw,\quad c_{12} = −E[(sᵀu)^2 (sᵀw)],

with the family's closed forms (:mod:`fishercore.families`) and the bounds of
:mod:`fishercore.bounds`.  Index conventions: n input, C output, k parameter (or neuron).
"""

from __future__ import annotations

from typing import NamedTuple

from array_api_compat import array_namespace

from . import _validation as V
from ._protocol import Array
from .bounds import variance_bounds
from .families import get_family

__all__ = ["PerInputStats", "fisher_stats", "per_input_stats"]


class PerInputStats(NamedTuple):
    """Exact statistics for each input and parameter (or neuron)."""

    fisher: Array  # (n, k)  I_i(x)
    v1: Array  # (n, k)      single-draw variance of Î1
    v2: Array  # (n, k)      single-draw variance of Î2
    c12: Array  # (n, k)     single-draw covariance of Î1 and Î2
    v1_lower: Array  # (n, k)
    v1_upper: Array  # (n, k)
    v2_lower: Array  # (n, k)
    v2_upper: Array  # (n, k)


def fisher_stats(outputs: Array, jac: Array, diag_hess: Array, family, /, *, spectrum=None) -> PerInputStats:
    r"""Per-input diagonal Fisher statistics.

    Parameters
    ----------
    outputs : (n, C) array
        Network outputs ``h(x)``.
    jac, diag_hess : (n, C, k) arrays
        ``u = ∂h/∂θ_i`` and ``w = ∂²h/∂θ_i²`` for each of k parameters.
    family : Family or str
    spectrum : Spectrum, optional
        ``family.spectrum(outputs)``, when the caller already has it.

    Returns
    -------
    PerInputStats
        ``I = uᵀΛu``, ``v1 = E[(sᵀu)⁴] − I²``, ``v2 = wᵀΛw``,
        ``c12 = −E[(sᵀu)²(sᵀw)]`` and the bounds of docs/math.md §4, each (n, k).

    Examples
    --------
    The golden categorical case of docs/math.md §7 (fact 7):

    >>> import numpy as np, fishercore as fc
    >>> h = np.log([[0.7, 0.2, 0.1]])
    >>> s = fc.fisher_stats(h, np.array([1.0, 0, -1]).reshape(1, 3, 1), np.array([0.5, -0.5, 2]).reshape(1, 3, 1),
    ...                     "categorical")
    >>> [round(float(x[0, 0]), 4) for x in (s.fisher, s.v1, s.v2, s.c12)]
    [0.44, 0.5056, 0.4225, -0.334]
    """
    family = get_family(family)
    V.check_floating_array(outputs, "outputs", ndim=2)
    xp = array_namespace(outputs)
    V.check_floating_array(jac, "jac", xp=xp, ndim=3)
    V.check_floating_array(diag_hess, "diag_hess", xp=xp, ndim=3)
    n, C = outputs.shape
    if tuple(jac.shape[:2]) != (n, C):
        raise ValueError(f"jac: expected shape ({n}, {C}, k) to match outputs {tuple(outputs.shape)}, "
                         f"got {tuple(jac.shape)}")
    if tuple(diag_hess.shape) != tuple(jac.shape):
        raise ValueError(f"diag_hess: expected the shape of jac {tuple(jac.shape)}, got {tuple(diag_hess.shape)}")
    if outputs.dtype != jac.dtype or jac.dtype != diag_hess.dtype:
        raise TypeError(f"jac: dtypes differ (outputs {outputs.dtype}, jac {jac.dtype}, diag_hess {diag_hess.dtype})")
    family.check_outputs(C)
    for a, name in ((outputs, "outputs"), (jac, "jac"), (diag_hess, "diag_hess")):
        V.check_finite(a, name)
    return per_input_stats(outputs, jac, diag_hess, family, spectrum)


#: The statistics that need the Hessian diagonals w; NaN — not computed — where a model has none.
SECOND_ORDER = ("v2", "c12", "v2_lower", "v2_upper")


def per_input_stats(outputs, jac, diag_hess, family, spectrum=None) -> PerInputStats:
    """:func:`fisher_stats` without argument checks (traceable: used inside compiled code).

    ``diag_hess=None``: the model has no Hessian diagonals for this block; the first-order
    statistics are exact and the second-order ones (:data:`SECOND_ORDER`) NaN, "not computed".
    """
    spectrum = family.spectrum(outputs) if spectrum is None else spectrum
    return stats_of_moments(*family.moments_with_norms(outputs, jac, diag_hess), spectrum)


def stats_of_moments(m, pu2, pw2, spectrum) -> PerInputStats:
    """The per-input statistics from the moments, the norms ``‖Pu‖²`` and ``‖Pw‖²`` (None with ``m.v2``: first
    order only, the second-order statistics NaN) and the spectrum: the bounds are added (traceable)."""
    xp = array_namespace(m.fisher)
    if m.v2 is None:  # first order only: no w, no second-order work
        nan = xp.full_like(m.fisher, float("nan"))
        b = variance_bounds(m._replace(v2=nan, c12=nan), spectrum, pu2, nan)
        return PerInputStats(m.fisher, m.v1, nan, nan, b.v1_lower, b.v1_upper, nan, nan)
    b = variance_bounds(m, spectrum, pu2, pw2)
    return PerInputStats(m.fisher, m.v1, m.v2, m.c12, *b)
