"""fishercore: how good is your diagonal Fisher estimate?

Exact diagonal Fisher information, the two Monte-Carlo estimators (squared
score Î1 and negative Hessian diagonal Î2), their exact variances, spectral and
moment bounds on those variances, and the sample sizes and estimator choices
that follow — for a real network and data set, on any array-API library.

    >>> import fishercore as fc
    >>> from fishercore.backends import mlp
"""

from ._protocol import ColumnBlock, DenseBlock, Derivatives, Model, ParamGroup, make_groups
from .analysis import (
                       FisherAnalysis,
                       FisherSums,
                       GroupSummary,
                       PerInputStats,
                       Summary,
                       all_reduce_sums,
                       analyze,
                       analyze_batches,
                       fisher_stats,
                       load_analysis,
)
from .bounds import Bounds, variance_bounds
from .estimators import estimate, sample_labels
from .families import Bernoulli, Categorical, Family, Gaussian, Moments, Spectrum, get_family

__version__ = "0.1.0"

__all__ = [
    "Bernoulli", "Bounds", "Categorical", "ColumnBlock", "DenseBlock", "Derivatives", "Family",
    "FisherAnalysis", "FisherSums", "Gaussian", "GroupSummary", "Model", "Moments", "ParamGroup",
    "PerInputStats", "Spectrum", "Summary", "all_reduce_sums", "analyze", "analyze_batches", "estimate",
    "fisher_stats", "get_family", "load_analysis", "make_groups", "sample_labels", "variance_bounds",
]
