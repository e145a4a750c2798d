r"""The drivers: :func:`analyze` over an array of inputs, :func:`analyze_batches` over a data loader.

:func:`analyze` hands the model one batch at a time, reduces each batch's derivative
blocks to sums over its inputs (:mod:`fishercore.sums`) and folds them into an
:class:`~fishercore.sums.Accumulator`; :func:`analyze_batches` analyses each batch of a
loader so and merges the analyses (the same :func:`~fishercore.sums.merge_sums`), with
checkpoints.  Results never depend on the batching (docs/math.md §5).
"""

from __future__ import annotations

from array_api_compat import array_namespace

from fishercore.backends.ops import ops_for

from . import _validation as V
from ._batching import batches_for, group_plan, position_plan, value_itemsize
from ._progress import Progress
from ._protocol import Array
from .io import load_analysis, read, write
from .result import FisherAnalysis
from .sums import Accumulator, add_positions, block_groups, chunked_sums, position_sums

__all__ = ["analyze", "analyze_batches", "analysis_of"]


def analyze(model, X: Array, family="categorical", *, mask: Array | None = None, batch_size: int | None = None,
            memory_budget: float | None = None, progress: bool = False) -> FisherAnalysis:
    r"""Exact diagonal Fisher, variances of Î1 and Î2, and their bounds over a data set.

    Parameters
    ----------
    model : Model
        A fishercore model, e.g. :class:`fishercore.backends.mlp.MLP`.
    X : (n, d) array
        Inputs, in the model's array library, dtype and device.
    family : {"categorical", "gaussian", "bernoulli"} or Family
        Output distribution ``p(y | h)``.  For a model with sequence outputs (n, T, C) it is the
        distribution at each position, with one independent label per position
        (:class:`~fishercore.Positions`, docs/math.md §12); every statistic is then per input
        sequence.
    mask : (n, T) boolean array, optional
        For sequence outputs: True at the positions that count, False at padding, which drops
        out of every statistic.  In X's library.
    batch_size : int, optional
        Inputs per batch.  By default batches are sized to ``memory_budget`` (after a
        first batch of up to 32 inputs that measures the per-input footprint), and hold at
        most 512 inputs on the CPU (any library), where larger batches are not
        faster, and no more than keep a group's full columns within 12 MiB there
        (``fishercore._batching.CPU_BLOCK_BYTES``: larger blocks go back to the system when
        freed and are faulted in again each batch).  Results do not depend on the batching.
    memory_budget : float, optional
        Bytes of working memory when ``batch_size`` is None: batches, and the chunks in which a
        large layer's sums are taken, are sized so that what the call allocates besides its
        result (9 numbers per parameter) stays within it.  By default 512 MiB for arrays in host
        memory, and a quarter of the memory free on the device for arrays on a GPU (torch CUDA,
        CuPy, JAX), where a host-sized budget would cut the work into many small launches.  The
        model, X, and memory the C allocator keeps after it is freed are outside it (see
        docs/performance.md, "Memory").  A budget too small for one input raises
        ValueError saying what would do.
    progress : bool
        Show a progress bar over batches (only on a terminal).

    Returns
    -------
    FisherAnalysis

    Examples
    --------
    >>> import numpy as np, fishercore as fc
    >>> from fishercore.backends import mlp
    >>> rng = np.random.default_rng(0)
    >>> model = mlp.MLP([(rng.normal(size=(4, 3)), np.zeros(4)), (rng.normal(size=(2, 4)), np.zeros(2))], "tanh")
    >>> res = fc.analyze(model, rng.normal(size=(10, 3)))
    >>> res.fisher.shape, res.n_inputs
    ((26,), 10)
    >>> bool(np.all(res.v2[-10:] == 0))   # last layer: Î2 is exact
    True
    """
    family, X = V.check_model_and_data(model, X, family)
    mask = V.check_mask(mask, model, X)
    batches = batches_for(X, batch_size, memory_budget)
    ops = ops_for(X)
    acc = Accumulator()
    # a model whose columns for one input exceed the budget: one input at a time, a few positions of its sequence
    # outputs at a time (every group each time), or else a few groups at a time
    size = value_itemsize(model, X)
    spans = position_plan(model, family, size, batches.budget) if batches.auto else None
    plan = group_plan(model, size, batches.budget) if batches.auto and spans is None else None
    if plan is None and spans is None:
        batches.first(model, size)
    else:
        batches.one_at_a_time()
    resident = 2 * sum(g.size for g in model.groups) * size  # the final concatenation, one field
    first_order: set = set()
    column_chunks: dict = {}  # where each column group is cut, the same in every batch
    with ops.no_grad(), Progress(len(batches), progress, "analyze") as bar:
        X = ops.detach(X)
        for start, stop in batches:
            Xb, rows = batches.take(X, start, stop)
            positions = None if mask is None else batches.take(mask, start, stop)[0]
            if spans is not None:
                first_order |= _by_positions(model, Xb, spans, family, rows, positions, batches, acc, start, stop)
            for groups in () if spans is not None else plan or (None,):
                d = model.derivatives(Xb) if groups is None else model.derivatives_of(Xb, groups, hessian=True)
                batches.fit(d.blocks, Xb.shape[0], model, hessian=True, resident=resident)
                bar.total = len(batches)
                V.check_results_finite(d.outputs, start, stop)
                for group, first, transposed, sums in chunked_sums(d, family, rows, batches.chunk_budget, positions,
                                                                   column_chunks):
                    acc.add_piece(group, first, transposed, sums, stop - start)
                first_order |= {g for b in d.blocks if b.diag_hess is None for g in block_groups(b)}
                del d
            V.check_results_finite(acc.by_group(first_order), start, stop, "statistics")
            acc.count(stop - start)
            bar.update()
    return analysis_of(model, acc, family)


def _by_positions(model, Xb, spans, family, rows, positions, batches, acc, start, stop) -> set:
    """One batch's sums, its sequence outputs' positions a span at a time (:func:`~fishercore._batching.position_plan`),
    merged per group and completed once every position is in; the groups that have no Hessian diagonals."""
    held, first_order, outputs = {}, set(), None
    for span in spans:
        d = model.derivatives_of(Xb, None, hessian=True, positions=span)
        V.check_results_finite(d.outputs, start, stop)
        add_positions(held, d, family, span, batches.chunk_budget, positions)
        first_order |= {b.group for b in d.blocks if b.diag_hess is None}
        outputs = d.outputs
        del d
    for group, sums in position_sums(held, outputs, family, rows, positions):
        acc.add_piece(group, 0, False, sums, stop - start)
    return first_order


def analysis_of(model, acc: Accumulator, family) -> FisherAnalysis:
    """The :class:`FisherAnalysis` of the sums an :class:`~fishercore.sums.Accumulator` holds for the model's groups."""
    return FisherAnalysis(acc.flat(model.groups), acc.n_inputs, tuple(model.groups), family)


def analyze_batches(model, batches, family="categorical", *, checkpoint=None, checkpoint_every: int = 1,
                    memory_budget: float | None = None, progress: bool = False,
                    mask_at: int | None = None) -> FisherAnalysis:
    r""":func:`analyze` over an iterable of batches (a data loader), resumable from a checkpoint.

    Parameters
    ----------
    model, family, memory_budget
        As in :func:`analyze`.
    batches : iterable
        Batches of inputs: arrays (n_b, d), or tuples/lists whose first element is the
        inputs — a ``torch.utils.data.DataLoader`` yielding ``(x, y)`` works as it is.  To
        resume, the iterable must yield the same batches in the same order again.
    checkpoint : str or path-like, optional
        A file for the partial sums.  If it exists, the analysis it holds (of the first k
        batches) is loaded — refused if its parameter groups are not the model's — and the
        first k batches are skipped without computing, each checked against the size and two
        sums the checkpoint recorded for it (other or reordered batches are refused).  It is
        rewritten (atomically) every ``checkpoint_every`` batches, at the end, and when an
        error or interrupt stops the run, so finished batches are never lost.
    checkpoint_every : int
        Batches between checkpoints.
    mask_at : int, optional
        For sequence outputs: the position, in each batch tuple, of its boolean (n_b, T) padding
        mask (as :func:`analyze`'s ``mask``), e.g. 1 for a loader yielding ``(ids, mask)``.

    Returns
    -------
    FisherAnalysis
        Of all the batches' inputs; the same as :func:`analyze` on their concatenation.
    """
    import os

    family = V.model_family(model, family)
    every = V.check_positive_int(checkpoint_every, "checkpoint_every")
    if checkpoint is not None:
        try:
            checkpoint = os.fspath(checkpoint)
        except TypeError as e:
            raise TypeError(f"checkpoint: expected a file path, got {type(checkpoint).__name__}") from e
        folder = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"checkpoint: cannot write to folder {folder}")
    try:
        iterator = iter(batches)
    except TypeError as e:
        raise TypeError(f"batches: expected an iterable of input batches, got {type(batches).__name__}") from e

    if mask_at is not None and (isinstance(mask_at, bool) or not isinstance(mask_at, int) or mask_at < 1):
        raise ValueError(f"mask_at: expected the position (≥ 1) of the mask in each batch tuple, got {mask_at!r}")

    def inputs(batch, i):
        X = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not hasattr(X, "shape"):
            raise TypeError(f"batches: batch {i} is a {type(X).__name__}, not an array (or a tuple starting with one)")
        return X

    def mask_of(batch, i):
        if mask_at is None:
            return None
        if not isinstance(batch, (tuple, list)) or len(batch) <= mask_at:
            raise ValueError(f"mask_at: batch {i} has no element {mask_at} (expected a tuple holding the mask there)")
        return batch[mask_at]

    def checkpoint_error(e):
        return ValueError(f"checkpoint: {str(e).removeprefix('path: ')}")

    result, records, saved = None, [], [0]  # records: one per finished batch (its fingerprint when checkpointing)

    def save():
        if checkpoint is not None and result is not None and len(records) > saved[0]:
            write(result, checkpoint, batches=len(records), fingerprints=records)
            saved[0] = len(records)

    expected = []  # the fingerprints of the batches a checkpoint holds
    if checkpoint is not None and os.path.exists(checkpoint):
        try:
            meta = read(checkpoint)[0]
        except ValueError as e:
            raise checkpoint_error(e) from e
        expected = meta.get("fingerprints")
        if not isinstance(meta.get("batches"), int) or not isinstance(expected, list) \
                or len(expected) != meta["batches"]:
            raise ValueError(f"checkpoint: {checkpoint} is a saved FisherAnalysis but not a checkpoint of "
                             "analyze_batches (it records no finished batches)")
        saved[0] = len(expected)
    seen = 0
    with Progress(0, progress, "analyze") as bar:
        try:
            for i, batch in enumerate(iterator):
                X = inputs(batch, i)
                seen = i + 1
                if i < len(expected):  # finished before the checkpoint: checked, not recomputed
                    if not _same_batch(_fingerprint(X), expected[i]):
                        raise ValueError(f"batches: batch {i} ({X.shape[0]} inputs) is not the batch the checkpoint "
                                         f"{checkpoint} recorded ({expected[i][0]} inputs, other values): resume "
                                         "with the same batches in the same order, or delete the checkpoint")
                    records.append(expected[i])
                    if i == len(expected) - 1:
                        try:
                            loaded = load_analysis(checkpoint, model, like=X)
                        except ValueError as e:
                            raise checkpoint_error(e) from e
                        if loaded.family != family:
                            raise ValueError(f"checkpoint: {checkpoint} holds a {loaded.family!r} analysis, "
                                             f"not {family!r}")
                        result = loaded
                    continue
                part = analyze(model, X, family, mask=mask_of(batch, i), memory_budget=memory_budget)
                result = part if result is None else result.merge(part)
                records.append(_fingerprint(X) if checkpoint is not None else None)
                bar.update()
                if len(records) % every == 0:
                    save()
        except BaseException:
            save()  # keep every finished batch, then report the error
            raise
    if seen < len(expected):
        raise ValueError(f"batches: the checkpoint records {len(expected)} finished batches but the iterable "
                         f"yields only {seen}")
    if result is None:
        raise ValueError("batches: no batches (an empty iterable)")
    save()
    return result


def _fingerprint(X) -> list:
    """A batch's size and two sums, ``[n, Σ|x|, Σx²]``: cheap, and different for other or reordered batches."""
    xp = array_namespace(X)
    X = ops_for(X).detach(X)
    return [int(X.shape[0]), float(xp.sum(xp.abs(X))), float(xp.sum(X * X))]


def _same_batch(got, recorded) -> bool:
    """Equal sizes, and sums equal up to rounding (1e-9 relative: the same data give the same sums)."""
    if not (isinstance(recorded, list) and len(recorded) == 3) or got[0] != recorded[0]:
        return False
    return all(abs(a - b) <= 1e-9 * max(abs(a), abs(b)) for a, b in zip(got[1:], recorded[1:]))
