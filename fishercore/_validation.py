"""Argument checks shared by the public entry points.

Every message starts with the argument's name, so a user sees at once which
argument is wrong and why.
"""

from __future__ import annotations

import numbers

from array_api_compat import array_namespace, is_array_api_obj

__all__ = ["check_choice", "check_finite", "check_floating_array", "check_full_column_budget", "check_positive_int",
           "check_positive_real", "check_probability"]


def check_floating_array(x, name: str, *, xp=None, ndim: int | None = None):
    """``x`` must be a real floating array of the namespace ``xp`` (when given)."""
    if not is_array_api_obj(x):
        raise TypeError(f"{name}: expected an array, got {type(x).__name__}")
    x_xp = array_namespace(x)
    if xp is not None and x_xp is not xp:
        raise TypeError(f"{name}: array library {x_xp.__name__} differs from the model's ({xp.__name__}); "
                        "mixed array libraries are not supported")
    if not x_xp.isdtype(x.dtype, "real floating"):
        raise TypeError(f"{name}: expected a real floating-point array, got dtype {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_finite(x, name: str) -> None:
    xp = array_namespace(x)
    if not bool(xp.all(xp.isfinite(x))):
        raise ValueError(f"{name}: contains NaN or inf")


def check_positive_int(n, name: str) -> int:
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"{name}: expected a positive integer, got {n!r}")
    if n < 1:
        raise ValueError(f"{name}: must be at least 1, got {n}")
    return int(n)


def check_choice(value, name: str, choices) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ValueError(f"{name}: expected one of {sorted(choices)}, got {value!r}")
    return value.lower()


def check_full_column_budget(groups, max_params: int, alternative: str) -> int:
    """The exact full-column path costs P × n forward passes: refuse more than ``max_params``."""
    P = sum(g.size for g in groups)
    if P > max_params:
        raise ValueError(f"params: {P} parameters exceed the exact full-column path's limit of {max_params} "
                         f"(its cost grows with P × n forward passes); raise max_params, or use {alternative}, "
                         "whose cost grows with the layer widths")
    return P


def check_probability(x, name: str) -> float:
    """A number strictly between 0 and 1."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a number in (0, 1), got {x!r}")
    if not 0.0 < float(x) < 1.0:
        raise ValueError(f"{name}: must lie in (0, 1), got {x}")
    return float(x)


def check_positive_real(x, name: str) -> float:
    """A finite number > 0."""
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"{name}: expected a positive number, got {x!r}")
    if not (0.0 < float(x) < float("inf")):
        raise ValueError(f"{name}: must be positive and finite, got {x}")
    return float(x)
