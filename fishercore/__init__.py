"""fishercore: how good is your diagonal Fisher estimate?

Exact diagonal Fisher information, the two Monte-Carlo estimators (squared
score Î1 and negative Hessian diagonal Î2), their exact variances, spectral and
moment bounds on those variances, and the sample sizes and estimator choices
that follow — for a real network and data set, on any array-API library.

    >>> import fishercore as fc
    >>> from fishercore.backends import mlp

Modules, one concern each: :mod:`~fishercore.families` (output distributions),
:mod:`~fishercore.stats` (per-input statistics), :mod:`~fishercore.bounds`,
:mod:`~fishercore.sums` (sums over inputs and their exact reduction),
:mod:`~fishercore.result` (:class:`FisherAnalysis`), :mod:`~fishercore.io` (files),
:mod:`~fishercore.analysis` and :mod:`~fishercore.estimators` (the drivers).
"""

from ._protocol import (
    ColumnBlock,
    DeclaresWorkspace,
    DenseBlock,
    Derivatives,
    Model,
    ParamGroup,
    SupportsGroupSelection,
    SupportsPullback,
    make_groups,
)
from .analysis import analyze, analyze_batches
from .bounds import Bounds, variance_bounds
from .estimators import draw_costs, estimate, sample_labels
from .families import Bernoulli, Categorical, Family, Gaussian, Moments, Positions, Spectrum, get_family
from .io import load_analysis
from .result import FisherAnalysis, GroupSummary, Summary
from .stats import PerInputStats, fisher_stats
from .sums import FisherSums, all_reduce_sums

__version__ = "0.1.0"

__all__ = [
    "Bernoulli", "Bounds", "Categorical", "ColumnBlock", "DeclaresWorkspace", "DenseBlock", "Derivatives", "Family",
    "FisherAnalysis", "FisherSums", "Gaussian", "GroupSummary", "Model", "Moments", "ParamGroup", "PerInputStats",
    "Positions", "Spectrum", "Summary", "SupportsGroupSelection", "SupportsPullback", "all_reduce_sums", "analyze",
    "analyze_batches", "draw_costs", "estimate", "fisher_stats", "get_family", "load_analysis", "make_groups",
    "sample_labels", "variance_bounds",
]
