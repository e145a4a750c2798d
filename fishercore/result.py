r"""The result of an analysis: per-parameter means, estimator variances, sample sizes, summary.

:class:`FisherAnalysis` holds the sums over inputs (:class:`~fishercore.sums.FisherSums`)
of a data set of ``n_inputs`` inputs, and derives everything else from them
(docs/math.md §5–§6): the means of ``I``, ``v1``, ``v2``, ``c12`` and the bounds,
``var_x``, the variance of an estimator with M draws per input, the sample size for a
relative error, and the least-variance unbiased mix of Î1 and Î2.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from array_api_compat import array_namespace

from . import _validation as V
from ._protocol import Array, ParamGroup
from .families import Family
from .sums import FisherSums, merge_sums

__all__ = ["FisherAnalysis", "GroupSummary", "Summary"]


def _median(x, xp):
    if x.shape[0] == 0:
        return float("nan")
    s = xp.sort(x)
    k = s.shape[0]
    return 0.5 * (float(s[(k - 1) // 2]) + float(s[k // 2]))


class GroupSummary(NamedTuple):
    """Per-group means over its parameters (one row of :class:`Summary`)."""

    group: str
    size: int
    fisher: float  # mean diagonal Fisher
    v1: float
    v2: float
    v1_lower: float
    v1_upper: float
    v2_lower: float
    v2_upper: float
    rel_std_i1: float  # median over parameters with I > 0 of √v1 / I (one draw, one input)
    rel_std_i2: float  # same for Î2
    i2_better: float  # fraction of parameters with v2 < v1


def _cell(value, width, fmt) -> str:
    if isinstance(value, float) and math.isnan(value) and fmt:
        return f"{'–':{width}}"
    return f"{value:{width}{fmt}}"


class Summary(tuple):
    """A tuple of :class:`GroupSummary` rows that prints as a table."""

    _COLS = (("group", "<14", ""), ("size", ">7", "d"), ("fisher", ">10", ".3e"), ("v1", ">10", ".3e"),
             ("v2", ">10", ".3e"), ("rel_std_i1", ">10", ".3g"), ("rel_std_i2", ">10", ".3g"),
             ("i2_better", ">9", ".0%"))

    def __str__(self) -> str:
        lines = [" ".join(f"{name:{width}}" for name, width, _ in self._COLS)]
        for row in self:
            lines.append(" ".join(_cell(getattr(row, name), width, fmt) for name, width, fmt in self._COLS))
        if any(math.isnan(row.v2) for row in self):
            lines.append("– : not computed (no Hessian diagonals for the group; see FisherAnalysis.first_order_only)")
        return "\n".join(lines)

    __repr__ = __str__


class FisherAnalysis(NamedTuple):
    r"""Exact diagonal Fisher, estimator variances and bounds over a data set.

    All per-parameter fields are (P,) arrays in the flat parameter order of
    ``groups``, in the namespace, dtype and device of the model.  Means over
    the ``n_inputs`` inputs; single-draw quantities (one label per input).
    """

    sums: FisherSums
    n_inputs: int
    groups: tuple[ParamGroup, ...]
    family: Family

    # -- per-parameter means (docs/math.md §5) --------------------------------
    @property
    def fisher(self) -> Array:
        """Exact diagonal Fisher ``mean_x uᵀΛu``, (P,)."""
        return self.sums.fisher / self.n_inputs

    @property
    def v1(self) -> Array:
        """Mean single-draw variance of Î1, (P,)."""
        return self.sums.v1 / self.n_inputs

    @property
    def v2(self) -> Array:
        """Mean single-draw variance of Î2, (P,)."""
        return self.sums.v2 / self.n_inputs

    @property
    def c12(self) -> Array:
        """Mean single-draw covariance of Î1 and Î2, (P,)."""
        return self.sums.c12 / self.n_inputs

    @property
    def var_x(self) -> Array:
        """Variance over inputs of ``I(x)``: ``mean I² − (mean I)²``, (P,)."""
        return self.sums.fisher_m2 / self.n_inputs

    @property
    def v1_lower(self) -> Array:
        return self.sums.v1_lower / self.n_inputs

    @property
    def v1_upper(self) -> Array:
        return self.sums.v1_upper / self.n_inputs

    @property
    def v2_lower(self) -> Array:
        return self.sums.v2_lower / self.n_inputs

    @property
    def v2_upper(self) -> Array:
        return self.sums.v2_upper / self.n_inputs

    # -- which groups have second-order statistics ----------------------------
    @property
    def first_order_only(self) -> tuple[str, ...]:
        """The groups whose second-order statistics (v2, c12, v2's bounds) were not computed.

        Their entries of ``v2``, ``c12``, ``v2_lower`` and ``v2_upper`` are NaN — not a number
        because there is none: the model supplied no Hessian diagonals for them (a generic
        model above its ``max_params``, or a JAX function with a ``custom_vjp`` in the way).
        Everything first-order (Fisher, v1, ``var_x``, v1's bounds, Î1's sample sizes) is exact
        for every group.
        """
        xp = array_namespace(self.sums.v2)
        return tuple(g.name for g in self.groups
                     if g.size and bool(xp.all(xp.isnan(self.sums.v2[g.offset:g.offset + g.size]))))

    def _require_second_order(self, what: str) -> None:
        missing = self.first_order_only
        if missing:
            raise ValueError(f"{what} needs second-order statistics (v2, c12), which were not computed for the "
                             f"groups {list(missing)}: the model supplied no Hessian diagonals for them (a generic "
                             "model with more parameters than its max_params, or a JAX function with a custom_vjp "
                             "between them and the outputs, which forward mode cannot differentiate). Build the "
                             "model with a larger max_params, or through an adapter with a layer rule for those "
                             "layers (docs/models.md); Î1 and every first-order field are exact as they are")

    # -- the optimal combination (docs/math.md §6, beyond the paper) ----------
    def alpha(self) -> Array:
        r"""Weight ``α*`` of the least-variance unbiased combination ``α Î1 + (1 − α) Î2``.

        ``α* = (v2 − c12) / (v1 + v2 − 2 c12)`` (means over x).  Where Î1 and Î2
        coincide draw by draw (denominator 0) any α is optimal; 0 is returned.
        """
        self._require_second_order("alpha()")
        xp = array_namespace(self.sums.v1)
        v1, v2, c12 = self.v1, self.v2, self.c12
        den = v1 + v2 - 2.0 * c12
        ok = den > 0
        return xp.where(ok, (v2 - c12) / xp.where(ok, den, xp.ones_like(den)), xp.zeros_like(den))

    def optimal_v(self) -> Array:
        r"""Single-draw variance of the optimal combination, ``(v1 v2 − c12²)/(v1 + v2 − 2c12)``.

        With ``a = v1 − c12``, ``b = v2 − c12`` and ``den = a + b`` three exact forms exist,
        ``ab/den + c12``, ``v2 − b²/den`` and ``v1 − a²/den``, each losing digits where its
        terms nearly cancel (``v1 − a²/den`` when v1 ≫ v2: it rounds to 0 in float32 for
        v1 = 1, v2 = 1e-9).  Each entry takes the form with the smallest rounding scale (the
        sum of its terms' magnitudes), clipped to ``[0, min(v1, v2)]``.  Where ``den = 0``
        (Î1 and Î2 equal draw by draw) the variance is ``min(v1, v2)``.
        """
        self._require_second_order("optimal_v()")
        xp = array_namespace(self.sums.v1)
        v1, v2, c12 = self.v1, self.v2, self.c12
        a, b = v1 - c12, v2 - c12
        den = a + b
        ok = den > 0
        safe = xp.where(ok, den, xp.ones_like(den))
        ab, aa, bb = a * b / safe, a * a / safe, b * b / safe
        forms = ((ab + c12, xp.abs(ab) + xp.abs(c12)), (v2 - bb, v2 + bb), (v1 - aa, v1 + aa))
        best, scale = forms[0]
        for value, s in forms[1:]:
            better = s < scale
            best, scale = xp.where(better, value, best), xp.where(better, s, scale)
        low = xp.minimum(v1, v2)
        out = xp.where(ok, xp.minimum(best, low), low)
        return xp.maximum(out, xp.zeros_like(out))

    def choose(self, costs: dict | None = None) -> dict:
        r"""Per group, the estimator with the least variance per unit of cost: ``{group: "i1" | "i2" | "optimal"}``.

        An estimate with budget B on a full pass has variance ``v / (n B / c)``, so the criterion is
        ``c_e · Σ_i v_e,i / F_i²`` over the group's parameters with ``F_i > 0`` (its summed relative
        variance per draw, times the cost ``c_e`` of a draw).  ``costs`` is
        ``{"i1": c1, "i2": c2, "optimal": c3}`` (e.g. :func:`fishercore.draw_costs`; default 1 each:
        variance alone); the mix, which computes both, costs at least as much as either.  Ties go to
        the cheaper estimator; a group without second order (:attr:`first_order_only`) gets "i1".
        """
        costs = V.check_costs(costs)
        xp = array_namespace(self.sums.v1)
        f = self.fisher
        pos = f > 0
        safe = xp.where(pos, f, xp.ones_like(f))
        second = set(self.first_order_only)
        rel = {e: xp.where(pos, (v / safe) / safe, xp.zeros_like(v)) for e, v in
               (("i1", self.v1),) + ((("i2", self.v2), ("optimal", self.optimal_v())) if len(second) < len(
                   self.groups) else ())}
        out = {}
        order = sorted(rel, key=lambda e: costs[e])  # cheaper first: ties go to it
        for g in self.groups:
            if g.name in second:
                out[g.name] = "i1"
                continue
            sl = slice(g.offset, g.offset + g.size)
            score = {e: costs[e] * float(xp.sum(rel[e][sl])) for e in order}
            out[g.name] = min(order, key=lambda e: score[e])
        return out

    def plan(self, rel_error: float = 0.1, confidence: float = 0.95, coverage: float = 0.95,
             costs: dict | None = None, *, n_inputs: int | None = None):
        r"""Per group, which estimator and how many draws per input (or sampled inputs) so that ``coverage`` of
        its parameters with F > 0 are within ``rel_error`` with probability ``confidence``: a
        :class:`fishercore.plan.Plan`, printed as a table and usable as data.

        Parameters with F = 0 are counted apart (``PlanRow.zero``).  ``costs`` weighs the estimators
        (``{"i1": c1, "i2": c2, "optimal": c3}``, e.g. :func:`fishercore.draw_costs`; default equal).
        ``n_inputs``: the inputs the estimate will pass over, when more than were analysed (an analysis
        of a subset stands in for the whole set's per-input means); default the analysed count.
        ``fishercore.estimate(model, X, estimator=plan.estimators, n_draws=plan.n_draws, analysis=self)``
        carries it out (docs/ewc.md).
        """
        from .plan import make_plan

        return make_plan(self, rel_error, confidence, coverage, costs, n_inputs)

    def draws_per_input(self, estimator: str, rel_error: float = 0.1, confidence: float = 0.95) -> Array:
        """Label draws per input needed on a full pass over the analysed inputs, per parameter:
        ``sample_size(estimator, rel_error, confidence)``, named for what it counts."""
        return self.sample_size(estimator, rel_error, confidence)

    def inputs_needed(self, estimator: str, rel_error: float = 0.1, confidence: float = 0.95, *,
                      n_draws: int = 1) -> Array:
        """Inputs drawn with replacement, ``n_draws`` label draws each, needed per parameter:
        ``sample_size(estimator, rel_error, confidence, n_draws=n_draws)``, named for what it counts."""
        return self.sample_size(estimator, rel_error, confidence, n_draws=V.check_positive_int(n_draws, "n_draws"))

    def _single_draw(self, estimator: str) -> Array:
        estimator = V.check_choice(estimator, "estimator", ("i1", "i2", "optimal"))
        if estimator != "i1":
            self._require_second_order(f"estimator {estimator!r}")
        return {"i1": self.v1, "i2": self.v2}[estimator] if estimator != "optimal" else self.optimal_v()

    # -- what follows for a Monte-Carlo estimate -----------------------------
    def variance(self, estimator: str, n_draws: int = 1, n_inputs: int | None = None) -> Array:
        r"""Variance of an estimator with ``n_draws`` (M) labels drawn per input, (P,).

        * ``n_inputs=None``: a full pass over X (every input once):
          ``Var = mean_x v(x) / (n M)``;
        * ``n_inputs=N``: N inputs drawn uniformly with replacement from X:
          ``Var = var_x / N + mean_x v(x) / (N M)``.

        ``estimator`` is ``"i1"``, ``"i2"`` or ``"optimal"`` (α* Î1 + (1 − α*) Î2).
        """
        v = self._single_draw(estimator)
        M = V.check_positive_int(n_draws, "n_draws")
        if n_inputs is None:
            return v / (self.n_inputs * M)
        N = V.check_positive_int(n_inputs, "n_inputs")
        return self.var_x / N + v / (N * M)

    def sample_size(self, estimator: str, rel_error: float = 0.1, confidence: float = 0.95, *,
                    n_draws: int | None = None) -> Array:
        r"""Samples needed for relative error ``ε`` with probability ``≥ confidence`` (Chebyshev), (P,).

        With ``δ = 1 − confidence`` the requirement is ``Var ≤ δ ε² F²`` (docs/math.md §6):

        * ``n_draws=None``: the smallest number of label draws per input M for a full
          pass over X, ``⌈mean v / (n δ ε² F²)⌉`` (also :meth:`draws_per_input`);
        * ``n_draws=M``: the smallest number of inputs N drawn with replacement, M
          draws each, ``⌈(var_x + mean v / M) / (δ ε² F²)⌉`` (also :meth:`inputs_needed`).

        :meth:`plan` turns these per-parameter numbers into one decision per group.

        Returned as floats: ``inf`` where ``F = 0`` but the estimator varies, 1 where it
        is exact.
        """
        eps = V.check_positive_real(rel_error, "rel_error")
        delta = 1.0 - V.check_probability(confidence, "confidence")
        xp = array_namespace(self.sums.v1)
        v = self._single_draw(estimator)
        if n_draws is None:
            need = v / self.n_inputs
        else:
            need = self.var_x + v / V.check_positive_int(n_draws, "n_draws")
        f = self.fisher
        pos = f > 0
        # (√need / F)² rather than need / F²: F² underflows for confident networks (F ~ 1e-170 and below)
        rel = xp.sqrt(need) / xp.where(pos, f, xp.ones_like(f))
        ratio = rel * rel / (delta * eps * eps)
        inf = xp.full_like(need, float("inf"))
        out = xp.where(pos, xp.ceil(ratio), xp.where(need > 0, inf, xp.ones_like(need)))
        return xp.maximum(out, xp.ones_like(out))

    # -- bookkeeping ---------------------------------------------------------
    def merge(self, other: FisherAnalysis) -> FisherAnalysis:
        """Combine analyses of disjoint input sets (exact: sums add)."""
        if not isinstance(other, FisherAnalysis):
            raise TypeError(f"other: expected a FisherAnalysis, got {type(other).__name__}")
        if other.groups != self.groups:
            raise ValueError("other: parameter groups differ; only analyses of the same model merge")
        if other.family != self.family:
            raise ValueError(f"other: family {other.family!r} differs from {self.family!r}")
        mine, theirs = array_namespace(self.sums.fisher), array_namespace(other.sums.fisher)
        if mine is not theirs or self.sums.fisher.dtype != other.sums.fisher.dtype:
            raise TypeError(f"other: its sums are {theirs.__name__} {other.sums.fisher.dtype}, these "
                            f"{mine.__name__} {self.sums.fisher.dtype}; load or analyse both in one library and dtype")
        return FisherAnalysis(merge_sums(self.sums, self.n_inputs, other.sums, other.n_inputs),
                              self.n_inputs + other.n_inputs, self.groups, self.family)

    __add__ = merge

    def save(self, path) -> None:
        """Write the sums, ``n_inputs``, groups and family to an ``.npz`` file (exact; see :func:`load_analysis`).

        Partial analyses of a long run saved this way can be loaded later and merged with the rest.
        """
        from .io import write

        write(self, path)

    def unflatten(self, values: Array) -> dict:
        """Split a (P,) array into ``{group name: array of the group's shape}``."""
        V.check_floating_array(values, "values", ndim=1)
        xp = array_namespace(values)
        P = sum(g.size for g in self.groups)
        if values.shape[0] != P:
            raise ValueError(f"values: expected one value per parameter ({P}), got {values.shape[0]}")
        return {g.name: xp.reshape(values[g.offset:g.offset + g.size], g.shape) for g in self.groups}

    def summary(self) -> Summary:
        """Per-group table: means, relative std per draw, and where Î2 beats Î1."""
        xp = array_namespace(self.sums.v1)
        fields = {k: getattr(self, k) for k in ("fisher", "v1", "v2", "v1_lower", "v1_upper", "v2_lower", "v2_upper")}
        missing = set(self.first_order_only)
        rows = []
        for g in self.groups:
            sl = {k: v[g.offset:g.offset + g.size] for k, v in fields.items()}
            f = sl["fisher"]
            pos = f > 0
            safe = xp.where(pos, f, xp.ones_like(f))
            rel1 = (xp.sqrt(sl["v1"]) / safe)[pos]
            rel2 = (xp.sqrt(sl["v2"]) / safe)[pos]
            absent = g.name in missing  # no second order: NaN, shown as "–", never a fraction
            rows.append(GroupSummary(
                g.name, g.size, *(float(xp.mean(sl[k])) for k in fields),
                _median(rel1, xp), float("nan") if absent else _median(rel2, xp),
                float("nan") if absent else float(xp.mean(xp.astype(sl["v2"] < sl["v1"], f.dtype))),
            ))
        return Summary(rows)

