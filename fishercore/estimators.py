r"""Monte-Carlo estimators Î1 (squared score) and Î2 (negative Hessian diagonal).

For labels ``y`` drawn from the model, with score ``s = ∂ℓ/∂h`` (SPEC §2),

.. math::

    Î_1(θ_i) = \operatorname{mean}\,(sᵀu_i)^2,\qquad
    Î_2(θ_i) = \operatorname{mean}\,(u_iᵀΛu_i − sᵀw_i),

the means running over inputs and draws.  These are the per-sample gradients
and Hessian diagonals of the sampled log-likelihood, written through the
output derivatives the model supplies; for a dense weight ``W[a, b]`` both
scale with ``a_b²``, so they reduce to matrix products as in the analysis.

Labels are drawn by inverse transform from NumPy random numbers
(``numpy.random.Generator``), generated input by input, so the same seed gives
the same labels on every backend and for every ``batch_size``.
"""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, device

from . import _validation as V
from ._batching import DEFAULT_MEMORY_BUDGET
from ._progress import Progress
from ._protocol import Array, ColumnBlock, DenseBlock, compiled, weight_flat
from .analysis import check_model_and_data, check_results_finite

__all__ = ["estimate", "sample_labels"]


def _noise(family, rng, h, n_draws):
    """The family's NumPy noise for one batch of outputs h (b, C), in h's library, dtype and device."""
    xp = array_namespace(h)
    noise = family.noise(rng, h.shape[0], n_draws, h.shape[1])
    return xp.asarray(noise, dtype=h.dtype, device=device(h))


def _draw(family, rng, h, n_draws):
    """Labels for one batch of outputs h (b, C): (M, b) or (M, b, C)."""
    return family.labels_from_noise(h, _noise(family, rng, h, n_draws))


def _rng(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
        return np.random.default_rng(seed)
    raise TypeError(f"seed: expected an int, None or numpy.random.Generator, got {type(seed).__name__}")


def sample_labels(model, X: Array, family="categorical", *, n_draws: int = 1, seed=None,
                  batch_size: int | None = None) -> Array:
    """Labels drawn from the model exactly as :func:`estimate` draws them.

    Returns (M, n) class indices for the categorical family, (M, n, C) targets
    for the Gaussian and Bernoulli families, in the model's array library.  Only
    outputs are computed, ``batch_size`` (default 1024) inputs at a time.
    """
    family, X, _ = check_model_and_data(model, X, family, batch_size)
    M = V.check_positive_int(n_draws, "n_draws")
    rng = _rng(seed)
    xp = array_namespace(X)
    parts = []
    size = 1024 if batch_size is None else batch_size
    for a in range(0, X.shape[0], size):
        b = min(a + size, X.shape[0])
        h = model.outputs(X[a:b, ...])
        check_results_finite(h, a, b)
        parts.append(_draw(family, rng, h, M))
    return xp.concat(parts, axis=1)


def _project(score, jac, xp):
    """sᵀu for every draw: score (M, b, C), jac (b, C, k) → (M, b, k)."""
    return xp.matmul(score[:, :, None, :], jac[None, ...])[:, :, 0, :]


def estimate(model, X: Array, family="categorical", *, estimator: str = "i1", n_draws: int = 1, seed=None,
             labels: Array | None = None, batch_size: int | None = None, memory_budget: float = DEFAULT_MEMORY_BUDGET,
             progress: bool = False) -> Array:
    r"""Monte-Carlo estimate of the diagonal Fisher, (P,).

    Parameters
    ----------
    model, X, family
        As in :func:`fishercore.analyze`.
    estimator : {"i1", "i2"}
        ``"i1"``: mean squared score ``(∂ℓ/∂θ_i)²``; ``"i2"``: mean negative Hessian
        diagonal ``−∂²ℓ/∂θ_i²``.  Both unbiased for labels drawn from the model;
        their variances are :meth:`FisherAnalysis.variance`.
    n_draws : int
        Labels ``M`` drawn per input.
    seed : int, None or numpy.random.Generator
        The same seed gives the same labels, hence the same estimate, on every backend.
    labels : array, optional
        Observed labels instead of draws: the *empirical Fisher*.  It is **biased** —
        it estimates ``E_data[∇ℓ∇ℓᵀ]`` rather than the Fisher — and is provided only
        for comparison.  Class indices (n,) for the categorical family, (n, C)
        otherwise.  Incompatible with ``n_draws > 1``.
    batch_size, memory_budget, progress
        As in :func:`fishercore.analyze`.

    Returns
    -------
    (P,) array in the flat parameter order, the model's namespace, dtype and device.
    """
    family, X, batches = check_model_and_data(model, X, family, batch_size, memory_budget)
    est = V.check_choice(estimator, "estimator", ("i1", "i2"))
    M = V.check_positive_int(n_draws, "n_draws")
    xp = array_namespace(X)
    n = X.shape[0]
    if labels is not None:
        if M != 1:
            raise ValueError(f"n_draws: observed labels give one label per input; n_draws must be 1, got {M}")
        if not hasattr(labels, "shape") or labels.ndim < 1 or labels.shape[0] != n:
            raise ValueError(f"labels: expected one label per input ({n}), got shape {getattr(labels, 'shape', None)}")
    else:
        rng = _rng(seed)
    use_pullback = est == "i1" and callable(getattr(model, "pullback", None))
    sums: dict = {}
    with Progress(len(batches), progress, f"estimate {est}") as bar:
        for start, stop in batches:
            Xb = X[start:stop, ...]

            def score(h, start=start, stop=stop):
                check_results_finite(h, start, stop)
                if labels is None:
                    return compiled(_score_from_noise, xp, ("family",))(h, _noise(family, rng, h, M), family=family)
                y = family.check_labels(labels[start:stop, ...], h)[None, ...]
                return family.score(h, y)  # (M, b, C)

            batch = {}
            if use_pullback:  # one backward pass per draw: t = sᵀ ∂h/∂z directly
                d = model.pullback(Xb, score)
                for b in d.blocks:
                    batch.update(_aggregate(b, None, xp))
            else:
                d = model.derivatives(Xb, hessian=est == "i2")
                s = score(d.outputs)
                per_input = compiled(_per_input, xp, ("family", "est"))
                for b in d.blocks:
                    batch.update(_aggregate(b, per_input(d.outputs, s, b.jac, b.diag_hess, family=family, est=est), xp))
            batches.fit(d.blocks, stop - start, model, hessian=est == "i2")
            bar.total = len(batches)
            check_results_finite(batch, start, stop, "estimates")
            for name, value in batch.items():
                sums[name] = sums[name] + value if name in sums else value
            bar.update()
    return xp.concat([sums[g.name] for g in model.groups]) / (n * M)


def _score_from_noise(h, noise, family):
    """Scores (M, b, C) of labels drawn by inverse transform from the noise."""
    return family.score(h, family.labels_from_noise(h, noise))


def _squares(t):
    """Σ over draws of t², (M, b, k) → (b, k)."""
    xp = array_namespace(t)
    return xp.sum(t * t, axis=0)


def _dense_squares(t, inputs, transposed):
    return _dense_aggregate(_squares(t), inputs, transposed)


def _per_input(h, s, jac, diag_hess, family, est):
    """Σ over draws of one draw's estimate, per input and column: (b, k)."""
    xp = array_namespace(h)
    if est == "i1":
        t = _project(s, jac, xp)
        return xp.sum(t * t, axis=0)
    M = s.shape[0]
    return M * family.fisher(h, jac) - xp.sum(_project(s, diag_hess, xp), axis=0)


def _dense_aggregate(per, inputs, transposed):
    xp = array_namespace(per)
    weight = xp.matmul(xp.permute_dims(per, (1, 0)), inputs * inputs)
    return weight_flat(transposed, weight), xp.sum(per, axis=0)


def _aggregate(block, per, xp) -> dict:
    """Sum a per-input, per-column (b, k) quantity over the batch, for every group of the block.

    ``per=None``: the block is a pullback's, and the quantity is Σ over draws of its ``jac`` squared.

    Both estimators scale with a_b² for a dense weight W[a, b] (u and w scale with
    a_b and a_b², and so do (sᵀu)² and uᵀΛu − sᵀw).
    """
    if isinstance(block, DenseBlock):
        if per is None:  # a pullback block: per-input Σ over draws of (sᵀ ∂h/∂z)², fused with the sums
            weight, bias = compiled(_dense_squares, xp, ("transposed",))(block.jac, block.inputs,
                                                                          transposed=block.transposed)
        else:
            weight, bias = compiled(_dense_aggregate, xp, ("transposed",))(per, block.inputs,
                                                                            transposed=block.transposed)
        return {block.weight: weight} if block.bias is None else {block.weight: weight, block.bias: bias}
    if isinstance(block, ColumnBlock):
        return {block.group: xp.sum(compiled(_squares, xp)(block.jac) if per is None else per, axis=0)}
    raise TypeError(f"model: derivative blocks must be DenseBlock or ColumnBlock, got {type(block).__name__}")
