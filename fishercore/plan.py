r"""From an analysis to a plan: per group, which estimator and how many draws, so that enough parameters meet an error.

For relative error ε with probability 1 − δ, Chebyshev's inequality asks ``Var ≤ δ ε² F²`` of each
parameter's estimate (docs/math.md §6).  A full pass over the n analysed inputs with M label draws
each has ``Var = v / (n M)``, so parameter i needs

.. math::

    M_i = \Big\lceil \frac{v_i}{n\,δ\,ε^2 F_i^2} \Big\rceil

draws per input, and N inputs drawn with replacement, one draw each, need
``N_i = ⌈(var_x,i + v_i) / (δ ε² F_i²)⌉`` (one draw per input is the cheapest way to spend draws
on sampled inputs: ``N M`` grows with M).  Per group, :func:`make_plan` takes the ``coverage``
quantile of ``M_i`` over the parameters with ``F > 0`` (those with ``F = 0`` are counted apart:
every unbiased estimator is exact there or the relative error is undefined), for each estimator,
and picks the one with the least cost ``c_e · M``.  One ``estimate`` call then serves every group
with the largest group's M.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from array_api_compat import array_namespace

from . import _validation as V

__all__ = ["Plan", "PlanRow", "make_plan"]


class PlanRow(NamedTuple):
    group: str
    size: int
    positive: int  # parameters with F > 0, the ones the coverage counts
    zero: int  # parameters with F = 0
    estimator: str  # "i1", "i2" or "optimal"
    n_draws: int  # draws per input on a full pass over the analysed inputs
    n_inputs: int  # or: inputs drawn with replacement, one draw each
    meets: float  # fraction of the positive parameters within the error at n_draws (≥ coverage)
    cost: float  # n · n_draws · cost of one draw of the estimator (n: the inputs the estimate passes over)


class Plan(tuple):
    """A tuple of :class:`PlanRow` that prints as a table, with what one ``estimate`` call needs.

    ``estimators`` ({group: estimator}) and ``n_draws`` (the largest group's) go straight into
    ``fishercore.estimate(model, X, estimator=plan.estimators, n_draws=plan.n_draws, analysis=...)``;
    ``total_draws`` is the cost of that call in draws, ``n_inputs * n_draws``.
    """

    def __new__(cls, rows, *, n_inputs: int, rel_error: float, confidence: float, coverage: float, costs: dict):
        self = super().__new__(cls, rows)
        self.n_inputs, self.rel_error, self.confidence, self.coverage = n_inputs, rel_error, confidence, coverage
        self.costs = dict(costs)
        return self

    @property
    def estimators(self) -> dict:
        return {r.group: r.estimator for r in self}

    @property
    def n_draws(self) -> int:
        return max((r.n_draws for r in self), default=1)

    @property
    def total_draws(self) -> int:
        return self.n_inputs * self.n_draws

    def __str__(self) -> str:
        head = (f"plan: {100 * self.rel_error:g} % relative error at {100 * self.confidence:g} % confidence for "
                f"{100 * self.coverage:g} % of each group's parameters with F > 0")
        cols = (("group", "<14"), ("size", ">8"), ("F = 0", ">7"), ("estimator", ">9"), ("draws/input", ">11"),
                ("or inputs", ">10"), ("meets", ">7"))
        lines = [head, " ".join(f"{name:{w}}" for name, w in cols)]
        for r in self:
            lines.append(" ".join((f"{r.group:<14}", f"{r.size:>8d}", f"{r.zero:>7d}", f"{r.estimator:>9}",
                                   f"{r.n_draws:>11,d}", f"{r.n_inputs:>10,d}", f"{r.meets:>7.1%}")))
        if len(set(self.costs.values())) > 1:  # measured costs (not the default, equal ones): say what they were
            lines.append("cost of one draw per input: " + ", ".join(
                f"{e} {self.costs[e] * 1e6:.3g} µs" if self.costs[e] < 1e-3 else f"{e} {self.costs[e]:.3g}"
                for e in ("i1", "i2", "optimal")))
        lines.append(f"one call: estimate(..., estimator=plan.estimators, n_draws={self.n_draws:,}) on "
                     f"{self.n_inputs:,} inputs: {self.total_draws:,} draws in all ('or inputs': inputs drawn with "
                     "replacement, one draw each, for that group alone)")
        return "\n".join(lines)

    __repr__ = __str__


def make_plan(analysis, rel_error: float = 0.1, confidence: float = 0.95, coverage: float = 0.95,
              costs: dict | None = None, n_inputs: int | None = None) -> Plan:
    """The :class:`Plan` of :meth:`fishercore.FisherAnalysis.plan`."""
    eps = V.check_positive_real(rel_error, "rel_error")
    conf = V.check_probability(confidence, "confidence")
    cover = V.check_probability(coverage, "coverage")
    costs = V.check_costs(costs)
    xp = array_namespace(analysis.sums.v1)
    n = analysis.n_inputs if n_inputs is None else V.check_positive_int(n_inputs, "n_inputs")
    delta = 1.0 - conf
    f = analysis.fisher
    pos = f > 0
    safe = xp.where(pos, f, xp.ones_like(f))
    absent = set(analysis.first_order_only)
    singles = {"i1": analysis.v1}
    if len(absent) < len(analysis.groups):
        singles.update(i2=analysis.v2, optimal=analysis.optimal_v())

    def need(values, sl):  # (√v / F)² / (δ ε²), per parameter of the slice
        rel = xp.sqrt(values[sl]) / safe[sl]
        return rel * rel / (delta * eps * eps)

    rows = []
    for g in analysis.groups:
        sl = slice(g.offset, g.offset + g.size)
        keep = pos[sl]
        k = int(xp.sum(xp.astype(keep, xp.int32)))
        best = None
        for e, v in singles.items():
            if e != "i1" and g.name in absent:
                continue
            draws = _quantile(xp, need(v, sl)[keep] / n, cover, k)
            cost = costs[e] * n * draws
            if best is None or cost < best[2]:
                best = (e, draws, cost)
        e, draws, cost = best
        met = need(singles[e], sl)[keep] / n
        meets = float(xp.mean(xp.astype(met <= draws, f.dtype))) if k else 1.0
        inputs = _quantile(xp, need(analysis.var_x + singles[e], sl)[keep], cover, k)
        rows.append(PlanRow(g.name, g.size, k, g.size - k, e, draws, inputs, meets, cost))
    return Plan(rows, n_inputs=n, rel_error=eps, confidence=conf, coverage=cover, costs=costs)


def _quantile(xp, values, coverage: float, k: int) -> int:
    """The least integer m ≥ 1 with at least ``coverage`` of ``values`` (k of them) at most m."""
    if k == 0:
        return 1
    order = xp.sort(values)
    idx = max(0, min(k - 1, math.ceil(coverage * k) - 1))
    top = float(order[idx])
    if not math.isfinite(top):
        raise ValueError(f"coverage: {coverage:g} of the parameters need infinitely many draws (their estimator "
                         "varies where F is below float range); lower coverage")
    return max(1, math.ceil(top))
