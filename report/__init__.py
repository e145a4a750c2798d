"""``fishercore report``: the numerical study of Soen & Sun (NeurIPS 2024) on built-in data.

* :func:`fishercore.report.study.run_fisher_study` — train an MLP and, after every epoch,
  analyse held-out inputs: diagonal Fisher, variances of Î1 and Î2, their bounds, sample
  sizes, per parameter group (the paper's Figure 2/3 style study).
* :func:`fishercore.report.ngd.run_ngd_study` — diagonal natural-gradient descent with Î1,
  Î2 or the exact diagonal on 2-D linear and logistic regression (the paper's Figure 1).

Frameworks, matplotlib and scikit-learn are imported only when a study needs them
(``pip install "fishercore[report]"``).
"""


class ReportError(Exception):
    """A problem with the user's arguments, reported as one line by the command line."""
