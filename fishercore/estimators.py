r"""Monte-Carlo estimators Î1 (squared score) and Î2 (negative Hessian diagonal).

For labels ``y`` drawn from the model, with score ``s = ∂ℓ/∂h`` (docs/math.md §10),

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

from collections.abc import Mapping

import numpy as np
from array_api_compat import array_namespace, device

from fishercore.backends.ops import ops_for

from . import _validation as V
from ._batching import DEFAULT_MEMORY_BUDGET, batches_for, value_itemsize
from ._progress import Progress
from ._protocol import Array, ColumnBlock, DenseBlock, SupportsPullback, weight_flat
from .sums import block_groups, masked_block, position_weights

__all__ = ["draw_costs", "estimate", "sample_labels"]


def _noise(family, rng, h, n_draws, n_inputs=None):
    """The family's NumPy noise for the first ``n_inputs`` (default all) rows of outputs h (b, C), zero for the
    rest (a padded batch's filler), in h's library, dtype and device."""
    xp = array_namespace(h)
    k = h.shape[0] if n_inputs is None else n_inputs
    noise = family.noise(rng, k, n_draws, h.shape[1])
    if k < h.shape[0]:
        noise = np.concatenate([noise, np.zeros((h.shape[0] - k, *noise.shape[1:]), dtype=noise.dtype)])
    return xp.asarray(noise, dtype=h.dtype, device=device(h))


def _draw(family, rng, h, n_draws):
    """Labels for one batch of outputs h (b, C): (M, b) or (M, b, C)."""
    return family.labels_from_noise(h, _noise(family, rng, h, n_draws))


def _rng(seed):
    if isinstance(seed, np.random.Generator):
        return seed
    if seed is None or (isinstance(seed, (int, np.integer)) and not isinstance(seed, bool)):
        if seed is not None and seed < 0:
            raise ValueError(f"seed: must be a non-negative integer, got {seed}")
        return np.random.default_rng(seed)
    raise TypeError(f"seed: expected an int, None or numpy.random.Generator, got {type(seed).__name__}")


def sample_labels(model, X: Array, family="categorical", *, n_draws: int = 1, seed=None,
                  batch_size: int | None = None) -> Array:
    """Labels drawn from the model exactly as :func:`estimate` draws them.

    Returns (M, n) class indices for the categorical family, (M, n, C) targets
    for the Gaussian and Bernoulli families, in the model's array library.  Only
    outputs are computed, ``batch_size`` (default 1024) inputs at a time.
    """
    family, X = V.check_model_and_data(model, X, family)
    batches = batches_for(X, 1024 if batch_size is None else batch_size, DEFAULT_MEMORY_BUDGET)
    M = V.check_positive_int(n_draws, "n_draws")
    rng = _rng(seed)
    ops = ops_for(X)
    parts = []
    with ops.no_grad():
        X = ops.detach(X)
        for a, b in batches:
            h = model.outputs(batches.take(X, a, b)[0])[:b - a, ...]
            V.check_results_finite(h, a, b)
            parts.append(_draw(family, rng, h, M))
    return ops.xp.concat(parts, axis=1)


def _project(score, jac, xp):
    """sᵀu for every draw: score (M, b, C), jac (b, C, k) → (b, M, k), a batched product over inputs
    (broadcasting jac over the draws would copy it per draw in some libraries)."""
    return xp.matmul(xp.permute_dims(score, (1, 0, 2)), jac)


def estimate(model, X: Array, family="categorical", *, estimator: str = "i1", n_draws: int = 1, seed=None,
             labels: Array | None = None, mask: Array | None = None, batch_size: int | None = None,
             memory_budget: float | None = None, progress: bool = False, analysis=None,
             costs: dict | None = None) -> Array:
    r"""Monte-Carlo estimate of the diagonal Fisher, (P,).

    Parameters
    ----------
    model, X, family
        As in :func:`fishercore.analyze`.
    estimator : {"i1", "i2", "optimal", "auto"} or {group: estimator}
        ``"i1"``: mean squared score ``(∂ℓ/∂θ_i)²``; ``"i2"``: mean negative Hessian
        diagonal ``−∂²ℓ/∂θ_i²``.  Both unbiased for labels drawn from the model;
        their variances are :meth:`FisherAnalysis.variance`.  ``"optimal"``: per parameter
        ``α* Î1 + (1 − α*) Î2`` on the same draws, with α* from ``analysis`` (docs/math.md §6):
        unbiased, with variance ``analysis.variance("optimal")``.  ``"auto"``: per group, whichever
        of the three :meth:`FisherAnalysis.choose` picks for ``costs`` — the least variance per
        unit of cost (default: the costs :func:`draw_costs` measures on this model and X).  A mapping
        of every group to one of "i1", "i2", "optimal" (e.g. :attr:`fishercore.plan.Plan.estimators`)
        takes each group's own.
    analysis : FisherAnalysis, optional
        Where α* and the choices of ``"optimal"`` and ``"auto"`` come from (an analysis of the
        same model, on X or a subset of it); analysed on X when not given.
    costs : dict, optional
        ``{"i1": c1, "i2": c2, "optimal": c3}``, the cost of one draw of each, for ``"auto"``.
    n_draws : int
        Labels ``M`` drawn per input.
    seed : int, None or numpy.random.Generator
        The same seed gives the same labels, hence the same estimate, on every backend.
    labels : array, optional
        Observed labels instead of draws: the *empirical Fisher*.  It is **biased** —
        it estimates ``E_data[∇ℓ∇ℓᵀ]`` rather than the Fisher — and is provided only
        for comparison.  Class indices (n,) for the categorical family, (n, C)
        otherwise; (n, T) or (n, T, C) for sequence outputs.  Incompatible with ``n_draws > 1``.
    mask : (n, T) boolean array, optional
        As in :func:`fishercore.analyze`: masked positions drop out of the log-likelihood.
    batch_size, memory_budget, progress
        As in :func:`fishercore.analyze`.  The draws count in the budget: when one input's
        ``n_draws`` draws do not fit, inputs are taken one at a time and their draws in
        chunks (the labels are the same: one input's noise is one stream).

    Returns
    -------
    (P,) array in the flat parameter order, the model's namespace, dtype and device.
    """
    family, X = V.check_model_and_data(model, X, family)
    if isinstance(estimator, Mapping):  # {group: estimator}, e.g. a plan's
        names = [g.name for g in model.groups]
        if set(estimator) != set(names):
            raise ValueError(f"estimator: a mapping must name every parameter group once, {names}; got "
                             f"{sorted(estimator)}")
        choice = {k: V.check_choice(v, f"estimator[{k!r}]", ("i1", "i2", "optimal")) for k, v in estimator.items()}
        est = "per-group"
    else:
        est = V.check_choice(estimator, "estimator", ("i1", "i2", "optimal", "auto"))
    if est in ("i1", "i2"):
        return _estimate(model, X, family, (est,), n_draws=n_draws, seed=seed, labels=labels, mask=mask,
                         batch_size=batch_size, memory_budget=memory_budget, progress=progress)[est]
    if labels is not None:
        raise ValueError(f"labels: estimator={est!r} needs labels drawn from the model (its α* is for them); "
                         "observed labels give the empirical Fisher, with 'i1' only")
    needs_analysis = est in ("optimal", "auto") or "optimal" in choice.values()
    if analysis is None and needs_analysis:
        from .analysis import analyze

        analysis = analyze(model, X, family, mask=mask, batch_size=batch_size, memory_budget=memory_budget)
    if analysis is not None:
        analysis = V.check_analysis_of(analysis, model, family)
    if est == "optimal":
        choice = {g.name: "optimal" for g in model.groups}
    elif est == "auto":
        choice = analysis.choose(draw_costs(model, X, family) if costs is None else costs)
    sums = _estimate(model, X, family, tuple(sorted({"i1", "i2"} if "optimal" in choice.values()
                                                    else set(choice.values()))),
                     n_draws=n_draws, seed=seed, mask=mask, batch_size=batch_size, memory_budget=memory_budget,
                     progress=progress)
    xp = array_namespace(next(iter(sums.values())))
    alpha = analysis.alpha() if "optimal" in choice.values() else None
    parts = []
    for g in model.groups:
        sl = slice(g.offset, g.offset + g.size)
        pick = choice[g.name]
        if pick == "optimal":
            a = xp.asarray(alpha[sl], dtype=sums["i1"].dtype, device=device(sums["i1"]))
            parts.append(a * sums["i1"][sl] + (1.0 - a) * sums["i2"][sl])
        else:
            parts.append(sums[pick][sl])
    return xp.concat(parts)


def _estimate(model, X, family, ests: tuple, *, n_draws, seed, labels=None, mask=None, batch_size=None,
              memory_budget=None, progress=False) -> dict:
    """``{estimator: (P,) estimate}`` for the estimators ``ests`` ("i1", "i2"), all on the same draws, in one
    pass."""
    batches = batches_for(X, batch_size, memory_budget, statistics=False)
    mask = V.check_mask(mask, model, X)
    M = V.check_positive_int(n_draws, "n_draws")
    ops = ops_for(X)
    xp = ops.xp
    n = X.shape[0]
    if labels is not None:
        if M != 1:
            raise ValueError(f"n_draws: observed labels give one label per input; n_draws must be 1, got {M}")
        if not hasattr(labels, "shape") or labels.ndim < 1 or labels.shape[0] != n:
            raise ValueError(f"labels: expected one label per input ({n}), got shape {getattr(labels, 'shape', None)}")
    else:
        rng = _rng(seed)
    # one backward pass per draw (pullback) beats C of them (derivatives) for fewer draws than outputs
    use_pullback = ests == ("i1",) and isinstance(model, SupportsPullback) and M < model.n_outputs
    second = "i2" in ests
    size = value_itemsize(model, X)
    batches.first(model, size, per_draw=M * _draw_bytes(model.n_outputs, model.n_outputs, size))
    sums: dict = {e: {} for e in ests}
    with ops.no_grad(), Progress(len(batches), progress, f"estimate {'+'.join(ests)}") as bar:
        X = ops.detach(X)
        for start, stop in batches:
            Xb, rows = batches.take(X, start, stop)
            positions = None if mask is None else batches.take(mask, start, stop)[0]

            def score(h, m=M, start=start, stop=stop, rows=rows, positions=positions):
                """Scores (m, b, C) of the batch's next m labels; zero on a padded batch's filler rows and at
                masked positions."""
                V.check_results_finite(h, start, stop)
                if labels is None:
                    noise = _noise(family, rng, h, m, stop - start)
                    s = ops.jit(_score_from_noise, ("family",))(h, noise, rows, family=family)
                else:
                    y = family.check_labels(batches.take(labels, start, stop)[0], h)[None, ...]
                    s = _masked_draws(family.score(h, y), rows)
                return s if positions is None else s * position_weights(positions, h)[None, :, :, 0]

            batch: dict = {e: {} for e in ests}
            if use_pullback:  # one backward pass per draw: t = sᵀ ∂h/∂z directly
                d = model.pullback(Xb, score)
                batches.fit(d.blocks, Xb.shape[0], model, hessian=False)
                for b in d.blocks:
                    batch["i1"].update(_aggregate(b, None, ops))
            else:
                d = model.derivatives(Xb, hessian=second)
                if positions is not None:  # Σ_t u_tᵀΛ_t u_t over the kept positions only (Î2's first term)
                    weights = position_weights(positions, d.outputs)
                    d = d._replace(blocks=tuple(masked_block(b, weights) for b in d.blocks))
                if second:
                    _check_hessians(d.blocks)
                width = max(b.jac.shape[-1] for b in d.blocks)
                batches.fit(d.blocks, Xb.shape[0], model, hessian=second, n_draws=M,
                            per_draw=len(ests) * _draw_bytes(d.outputs.shape[1], width, size))
                # draws in chunks only for a batch of one input: its noise is then one stream, as unchunked
                step = batches.draws if batches.draws and stop - start == 1 else M
                per_input = ops.jit(_per_input, ("family", "est"))
                for first in range(0, M, step):
                    s = score(d.outputs, min(step, M - first))
                    for b in d.blocks:
                        for e in ests:
                            _add_into(batch[e], _aggregate(b, per_input(d.outputs, s, b.jac, b.diag_hess, rows,
                                                                        family=family, est=e), ops))
                    del s
            bar.total = len(batches)
            for e in ests:
                V.check_results_finite(batch[e], start, stop, "estimates")
                _add_into(sums[e], batch[e])
            bar.update()
    return {e: xp.concat([sums[e][g.name] for g in model.groups]) / (n * M) for e in ests}


def draw_costs(model, X: Array, family="categorical", *, n_inputs: int = 256, repeat: int = 3) -> dict:
    """Seconds per input and draw of each estimator on this model: ``{"i1": c1, "i2": c2, "optimal": c3}``.

    Measured on the first ``n_inputs`` inputs of X (median of ``repeat`` timed runs of one draw, after a
    warm-up); ``"optimal"`` needs both estimators' per-draw values from one pass with Hessian diagonals.
    What :meth:`FisherAnalysis.choose` and ``estimate(..., estimator="auto")`` weigh the variances by.
    """
    import statistics
    import time

    family, X = V.check_model_and_data(model, X, family)
    Xs = X[:min(V.check_positive_int(n_inputs, "n_inputs"), X.shape[0]), ...]
    out = {}
    for name, ests in (("i1", ("i1",)), ("i2", ("i2",)), ("optimal", ("i1", "i2"))):
        def once(ests=ests):
            _estimate(model, Xs, family, ests, n_draws=1, seed=0)

        once()
        times = []
        for _ in range(V.check_positive_int(repeat, "repeat")):
            t = time.perf_counter()
            once()
            times.append(time.perf_counter() - t)
        out[name] = statistics.median(times) / Xs.shape[0]
    return out


def _add_into(total: dict, part: dict) -> None:
    """Add the per-group sums of ``part`` into ``total`` (name → array)."""
    for name, value in part.items():
        total[name] = total[name] + value if name in total else value


def _check_hessians(blocks) -> None:
    missing = [g for b in blocks if b.diag_hess is None for g in block_groups(b)]
    if missing:
        raise ValueError(f"estimator: Î2 needs per-sample Hessian diagonals, which the model does not compute for "
                         f"the groups {missing} (a generic model with more parameters than its max_params, or a JAX "
                         "function with a custom_vjp between them and the outputs, which forward mode cannot "
                         "differentiate); build it with a larger max_params, or use estimator='i1'")


def _draw_bytes(n_outputs: int, width: int, size: int) -> int:
    """Bytes per input and draw: the NumPy noise (float64), its copy, labels and scores (C each), the
    projections sᵀu and their squares (``width``, the widest block)."""
    return 8 * n_outputs + size * (3 * n_outputs + 3 * width)


def _masked_draws(s, mask):
    """Per-draw values (M, b, ...) with a padded batch's filler rows set to 0."""
    return s if mask is None else s * mask[(None, slice(None)) + (None,) * (s.ndim - 2)]


def _score_from_noise(h, noise, mask, family):
    """Scores (M, b, C) of labels drawn by inverse transform from the noise (0 on filler rows)."""
    return _masked_draws(family.score(h, family.labels_from_noise(h, noise)), mask)


def _squares(t):
    """Σ over draws of t², (b, M, k) → (b, k)."""
    xp = array_namespace(t)
    return xp.sum(t * t, axis=1)


def _dense_squares(t, inputs, transposed):
    return _dense_aggregate(_squares(t), inputs, transposed)


def _per_input(h, s, jac, diag_hess, mask, family, est):
    """Σ over draws of one draw's estimate, per input and column: (b, k) (0 on a padded batch's filler rows)."""
    xp = array_namespace(h)
    if est == "i1":
        t = _project(s, jac, xp)
        return xp.sum(t * t, axis=1)  # s = 0 on filler rows
    M = s.shape[0]
    per = M * family.fisher(h, jac) - _project(xp.sum(s, axis=0, keepdims=True), diag_hess, xp)[:, 0, :]
    return per if mask is None else per * mask[:, None]


def _dense_aggregate(per, inputs, transposed):
    xp = array_namespace(per)
    weight = xp.matmul(xp.permute_dims(per, (1, 0)), inputs * inputs)
    return weight_flat(transposed, weight), xp.sum(per, axis=0)


def _aggregate(block, per, ops) -> dict:
    """Sum a per-input, per-column (b, k) quantity over the batch, for every group of the block.

    ``per=None``: the block is a pullback's, and the quantity is Σ over draws of its ``jac`` squared.

    Both estimators scale with a_b² for a dense weight W[a, b] (u and w scale with
    a_b and a_b², and so do (sᵀu)² and uᵀΛu − sᵀw).
    """
    if isinstance(block, DenseBlock):
        if per is None:  # a pullback block: per-input Σ over draws of (sᵀ ∂h/∂z)², fused with the sums
            weight, bias = ops.jit(_dense_squares, ("transposed",))(block.jac, block.inputs,
                                                                     transposed=block.transposed)
        else:
            weight, bias = ops.jit(_dense_aggregate, ("transposed",))(per, block.inputs, transposed=block.transposed)
        return {block.weight: weight} if block.bias is None else {block.weight: weight, block.bias: bias}
    if isinstance(block, ColumnBlock):
        return {block.group: ops.xp.sum(ops.jit(_squares)(block.jac) if per is None else per, axis=0)}
    raise TypeError(f"model: derivative blocks must be DenseBlock or ColumnBlock, got {type(block).__name__}")
