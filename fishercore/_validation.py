"""Argument checks shared by the public entry points.

Every message starts with the argument's name, so a user sees at once which
argument is wrong and why.
"""

from __future__ import annotations

import math
import numbers

from array_api_compat import array_namespace, is_array_api_obj

__all__ = ["check_choice", "check_finite", "check_floating_array", "check_input_dtype", "check_input_shape",
           "check_inputs", "check_mask", "check_model_and_data", "check_n_tokens", "check_positive_int",
           "check_positive_real", "check_probability", "check_results_finite", "check_same_namespace",
           "check_supported_dtype", "model_family"]


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
    check_supported_dtype(x.dtype, name, x_xp)
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dimensions, got shape {tuple(x.shape)}")
    return x


def check_inputs(X, *, xp, dtype, device, input_shape=None, name: str = "X", input_dtype=None, n_tokens=None):
    """A batch of inputs for a model: an array of the model's library ``xp``, real floating, of its ``dtype``
    and ``device``, of shape ``(n, *input_shape)`` (at least ``(n, ...)`` when ``input_shape`` is None).

    ``input_dtype``: an integer dtype the model takes instead (token ids), which X must have, with values in
    ``[0, n_tokens)`` (``n_tokens`` None: only ``≥ 0`` is checked)."""
    from array_api_compat import device as device_of

    if input_dtype is not None:
        if not is_array_api_obj(X) or array_namespace(X) is not xp:
            check_floating_array(X, name, xp=xp)  # the library's own message
        if X.dtype != input_dtype:
            raise TypeError(f"{name}: dtype {X.dtype} differs from the model's input_dtype {input_dtype} (ids)")
        if math.prod(X.shape):
            lo, hi = int(xp.min(X)), int(xp.max(X))
            if lo < 0 or (n_tokens is not None and hi >= n_tokens):
                raise ValueError(f"{name}: token ids must lie in [0, {'n_tokens' if n_tokens is None else n_tokens}), "
                                 f"got {lo}..{hi}")
    else:
        check_floating_array(X, name, xp=xp)
        if X.dtype != dtype:
            raise TypeError(f"{name}: dtype {X.dtype} differs from the model's {dtype}")
    if device_of(X) != device:
        raise ValueError(f"{name}: device {device_of(X)} differs from the model's {device}")
    if X.ndim < 2:
        raise ValueError(f"{name}: expected a batch of inputs (n, ...), got shape {tuple(X.shape)}")
    if input_shape is not None and tuple(X.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name}: expected inputs of shape (n, {', '.join(map(str, input_shape))}), "
                         f"got {tuple(X.shape)}")
    return X


def check_supported_dtype(dtype, name: str, xp=None) -> None:
    """fishercore computes in float32 or float64: half precision (float16, bfloat16) has no eigensolver in
    NumPy or torch and too few digits for fourth moments, extended precision (longdouble) none in any
    accelerated library.  Anything else is refused up front."""
    names = ("float32", "float64")
    ok = any(dtype == getattr(xp, n) for n in names) if xp is not None else str(dtype).split(".")[-1] in names
    if not ok:
        raise TypeError(f"{name}: dtype {dtype} is not supported; fishercore computes in float32 or float64 "
                        "(convert the model and inputs, e.g. with .astype / .to / .double())")


def check_input_shape(input_shape, *, required_by: str | None = None):
    """The shape of one input (without the batch axis) as a tuple of positive ints; None stays None unless
    ``required_by`` names the entry point that needs it."""
    if input_shape is None:
        if required_by is None:
            return None
        raise TypeError(f"input_shape: {required_by} needs the shape of one input (without the batch axis), "
                        "e.g. input_shape=(784,), to learn the output width when the model is built")
    try:
        shape = tuple(int(s) for s in input_shape)
    except (TypeError, ValueError) as e:
        raise TypeError(f"input_shape: expected the shape of one input (a tuple of ints), got {input_shape!r}") from e
    if any(s < 1 for s in shape):
        raise ValueError(f"input_shape: every dimension must be at least 1, got {shape}")
    return shape


#: Numbers checked at once by :func:`check_finite` (its temporaries: a copy of that many, in some
#: libraries, e.g. torch's ``isfinite`` takes ``abs``): large inputs are checked in row chunks.
FINITE_CHUNK = 2**20


def check_finite(x, name: str) -> None:
    xp = array_namespace(x)
    row = 1
    for s in x.shape[1:]:
        row *= int(s)
    step = max(1, FINITE_CHUNK // max(row, 1)) if x.ndim else 1
    if x.ndim == 0 or x.shape[0] <= step:
        ok = bool(xp.all(xp.isfinite(x)))
    else:
        ok = all(bool(xp.all(xp.isfinite(x[a:a + step, ...]))) for a in range(0, x.shape[0], step))
    if not ok:
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


def check_input_dtype(input_dtype, xp):
    """None (inputs of the parameters' floating dtype) or an integer dtype of the library ``xp`` (token ids)."""
    if input_dtype is None:
        return None
    try:
        integral = bool(xp.isdtype(input_dtype, "integral"))
    except (TypeError, ValueError, AttributeError):
        integral = False
    if not integral:
        raise TypeError(f"input_dtype: expected None (inputs of the parameters' dtype) or an integer dtype for "
                        f"token ids (e.g. torch.long, jnp.int32), got {input_dtype!r}")
    return input_dtype


def check_n_tokens(n_tokens, input_dtype, *, required: bool):
    """The number of distinct token ids (ids lie in [0, n_tokens)), for integer inputs; None otherwise.

    ``required``: the model cannot find it itself (a function of parameters: JAX clamps an id out of range
    instead of failing, so an unchecked id would silently give another token's numbers)."""
    if input_dtype is None:
        if n_tokens is not None:
            raise ValueError("n_tokens: only for integer inputs (token ids); pass input_dtype as well")
        return None
    if n_tokens is None:
        if required:
            raise TypeError("n_tokens: an integer input_dtype needs n_tokens, the number of token ids (ids lie in "
                            "[0, n_tokens)), so that ids out of range are refused rather than clamped")
        return None
    return check_positive_int(n_tokens, "n_tokens")


def second_order_within(groups, max_params) -> bool:
    """Whether a generic model computes Hessian diagonals: forward over forward along every parameter costs
    P passes per input, so only up to ``max_params`` parameters (a positive int); beyond, second order
    is left out (NaN, "not computed") and everything first-order stays exact."""
    max_params = check_positive_int(max_params, "max_params")
    return sum(g.size for g in groups) <= max_params


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


def check_model_and_data(model, X, family):
    """The checks every entry point makes of its model, data and family; returns ``(family, X)``.

    ``model`` must implement :class:`~fishercore.Model` with a positive ``n_outputs`` that suits
    the family; ``X`` must be a non-empty, finite batch the model accepts.
    """
    from ._protocol import Model

    if not isinstance(model, Model):
        raise TypeError("model: expected a fishercore model (e.g. fishercore.backends.mlp.MLP), "
                        f"got {type(model).__name__}")
    C = model.n_outputs
    if isinstance(C, bool) or not isinstance(C, numbers.Integral) or C < 1:
        raise TypeError(f"model: n_outputs must be a positive integer known when the model is built, got {C!r}")
    family = model_family(model, family)
    family.check_outputs(int(C))
    X = model.check_inputs(X)
    if X.shape[0] == 0:
        raise ValueError("X: empty data set (0 inputs)")
    check_finite(X, "X")
    return family, X


def _output_shape(model) -> tuple:
    """One input's outputs: the model's ``output_shape`` ((T, C) for sequences), else ``(n_outputs,)``."""
    return tuple(getattr(model, "output_shape", None) or (getattr(model, "n_outputs", None),))


def model_family(model, family):
    """The family as the model's outputs need it: ``family`` at each position (:class:`~fishercore.Positions`)
    for a model whose ``output_shape`` is (T, C), itself otherwise."""
    from .families import Positions, get_family

    family = get_family(family)
    shape = _output_shape(model)
    if len(shape) not in (1, 2):
        raise ValueError(f"model: outputs of shape (n, {', '.join(map(str, shape))}) are not supported; "
                         "expected (n, C), or (n, T, C) for sequences")
    if len(shape) == 1:
        if isinstance(family, Positions):
            raise ValueError(f"family: {family!r} is for outputs with positions (n, T, C); the model's are (n, C)")
        return family
    if isinstance(family, Positions):
        if family.length != shape[0]:
            raise ValueError(f"family: {family!r} has {family.length} positions; the model's outputs have {shape[0]}")
        return family
    return Positions(family, int(shape[0]))


def check_same_namespace(arr, xp, name: str, whose: str = "the model's") -> None:
    """``arr`` must be an array of the library ``xp``."""
    try:
        other = array_namespace(arr)
    except TypeError as e:
        raise TypeError(f"{name}: expected an array of {whose} array library, got {type(arr).__name__}") from e
    if other is not xp:
        raise TypeError(f"{name}: array library {other.__name__} differs from {whose} ({xp.__name__})")


def check_mask(mask, model, X):
    """A boolean (n, T) mask of the positions that count, for a model with sequence outputs; or None."""
    if mask is None:
        return None
    shape = _output_shape(model)
    if len(shape) != 2:
        raise ValueError(f"mask: the model's outputs (n, {shape[0]}) have no positions to mask; a mask is for "
                         "sequence outputs (n, T, C)")
    xp = array_namespace(X)
    if not hasattr(mask, "shape"):
        raise TypeError(f"mask: expected a boolean array of shape ({X.shape[0]}, {shape[0]}), got "
                        f"{type(mask).__name__}")
    check_same_namespace(mask, xp, "mask", "X's")
    if tuple(mask.shape) != (X.shape[0], shape[0]):
        raise ValueError(f"mask: expected shape ({X.shape[0]}, {shape[0]}) (inputs, positions), "
                         f"got {tuple(mask.shape)}")
    if mask.dtype != xp.bool:
        raise TypeError(f"mask: expected a boolean array (True where a position counts), got dtype {mask.dtype}")
    return mask


def _all_finite(*arrays):
    xp = array_namespace(*arrays)
    return xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays]))


def check_results_finite(values, start, stop, what="outputs"):
    """Raise FloatingPointError naming the inputs (and group) when a batch's results are not finite.

    ``values``: one array, or a dict name → array or tuple of arrays (checked with one
    device synchronisation; the culprit is looked up only on failure).
    """
    from fishercore.backends.ops import ops_for

    def finite(arrays):
        return bool(ops_for(*arrays).jit(_all_finite)(*arrays))

    def flat(v):
        return list(v) if isinstance(v, (tuple, list)) else [v]

    if not isinstance(values, dict):
        values = {None: values}
    if finite([a for v in values.values() for a in flat(v)]):
        return
    name = next(k for k, v in values.items() if not finite(flat(v)))
    label = what if name is None else f"{what} of {name!r}"
    raise FloatingPointError(f"model: {label} are NaN or inf for inputs {start}..{stop - 1} "
                             "(overflow; check the weights, the input scale and the family's parameters)")


def check_analysis_of(analysis, model, family):
    """An analysis of this model's parameter groups with this family (for α* and estimator choices)."""
    from .result import FisherAnalysis

    if not isinstance(analysis, FisherAnalysis):
        raise TypeError(f"analysis: expected a fishercore.FisherAnalysis, got {type(analysis).__name__}")
    mine = [(g.name, tuple(g.shape)) for g in model.groups]
    theirs = [(g.name, tuple(g.shape)) for g in analysis.groups]
    if mine != theirs:
        raise ValueError("analysis: its parameter groups differ from the model's; analyse this model")
    if analysis.family != family:
        raise ValueError(f"analysis: its family {analysis.family!r} differs from {family!r}")
    return analysis


def check_costs(costs) -> dict:
    """The cost of one draw of each estimator, ``{"i1", "i2", "optimal"}`` (default 1 each); the mix computes
    both estimators, so it costs at least as much as either."""
    if costs is None:
        return {"i1": 1.0, "i2": 1.0, "optimal": 1.0}
    missing = {"i1", "i2", "optimal"} - set(costs)
    if missing:
        raise ValueError(f"costs: expected a cost for each of 'i1', 'i2', 'optimal'; missing {sorted(missing)}")
    out = {k: check_positive_real(costs[k], f"costs[{k!r}]") for k in ("i1", "i2", "optimal")}
    out["optimal"] = max(out.values())
    return out
