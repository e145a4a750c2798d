r"""Sums over inputs, and their exact reduction over batches, processes and devices (docs/math.md §5).

An analysis keeps, per parameter, *sums* over inputs of the per-input statistics and the
centred sum of squares of ``I(x)``.  Sums over disjoint input sets combine exactly, and
one reduction does it everywhere: each share contributes its plain sums and its term
``M2_r + n_r (Ī_r − Ī)²`` about the global mean — :func:`all_reduce_sums` with a collective
``reduce_sum`` (``torch.distributed.all_reduce`` across ranks, ``jax.lax.psum`` across
devices), :func:`merge_sums` for two shares in one process (batches, and
:meth:`FisherAnalysis.merge <fishercore.FisherAnalysis.merge>`).

Dense layers never need per-parameter columns: for ``W[a, b]`` with layer input
``a_b``, ``I(W_ab) = a_b² I(b_a)`` and ``v1, v2, c12`` and every bound scale with
``a_b⁴`` (docs/math.md §7, fact 5), so the sums over inputs are matrix products
``statᵀ @ inputs**k``.
"""

from __future__ import annotations

from typing import NamedTuple

from array_api_compat import array_namespace

from fishercore.backends.ops import ops_for

from ._batching import itemsize
from ._protocol import Array, ColumnBlock, DenseBlock, weight_flat
from .stats import SECOND_ORDER, PerInputStats, per_input_stats, stats_of_moments

__all__ = ["Accumulator", "FisherSums", "all_reduce_sums", "block_sums", "chunked_sums", "derivative_sums",
           "masked_block", "merge_sums", "position_weights"]


class FisherSums(NamedTuple):
    """Sums over inputs of the per-input statistics, per parameter."""

    fisher: Array  # (P,)  Σ_x I(x)
    fisher_m2: Array  # (P,)  Σ_x (I(x) − Ī)², centred
    v1: Array  # (P,)
    v2: Array  # (P,)
    c12: Array  # (P,)
    v1_lower: Array  # (P,)
    v1_upper: Array  # (P,)
    v2_lower: Array  # (P,)
    v2_upper: Array  # (P,)


# Power of the layer input a_b by which each sum of a dense weight W[a, b] scales
# (fisher_m2 is not a plain power sum; it is computed separately).
_WEIGHT_POWER = FisherSums(2, None, 4, 4, 4, 4, 4, 4, 4)


# -- one batch ---------------------------------------------------------------------------
# ``mask`` (n,) weighs the rows of a padded batch: 1 for an input, 0 for filler (None: every row
# is an input).  Filler rows are copies of an input, so every statistic on them is finite; the
# mask removes them from every sum, and the means divide by the number of inputs.
def _rows(x, mask):
    """x (n, k) with the filler rows set to 0."""
    return x if mask is None else x * mask[:, None]


def _count(x, mask, xp):
    return x.shape[0] if mask is None else xp.sum(mask)


def _centred_ss(x, xp, mask=None):
    """Σ over the inputs (axis 0) of (x − mean)²."""
    d = _rows(x - xp.sum(_rows(x, mask), axis=0, keepdims=True) / _count(x, mask, xp), mask)
    return xp.sum(d * d, axis=0)


def _sums_over_inputs(stats: PerInputStats, mask=None) -> FisherSums:
    xp = array_namespace(stats.fisher)
    return FisherSums(xp.sum(_rows(stats.fisher, mask), axis=0), _centred_ss(stats.fisher, xp, mask),
                      *(xp.sum(_rows(s, mask), axis=0) for s in stats[1:]))


def _product_centred_ss(F, G, xp, mask=None):
    r"""``Σ_x (F_a(x) G_b(x) − m_ab)²`` for all (a, b) by matrix products; ``F, G ≥ 0`` (docs/math.md §5).

    Two exact expressions, each losing digits in a different regime:

    * raw: ``S2 − n m²`` with ``S2 = Σ (F G)² = (F²)ᵀ(G²)``; rounding ``≈ ε S2``,
      bad when the products barely vary;
    * centred: with batch means ``F̄, Ḡ``, deviations ``δF, δG`` and ``C = δFᵀδG / n``,
      ``F̄² ΣδG² + Ḡ² ΣδF² + (δF²)ᵀ(δG²) − n C² + 2 n F̄ Ḡ C + 2 F̄ δFᵀ(δG²) + 2 Ḡ (δF²)ᵀδG``;
      rounding ``≈ ε × Σ|terms|``, bad when F and G are strongly anti-correlated.

    Each entry takes the expression with the smaller rounding scale, clipped to
    ``[0, S2]`` (so products that vanish on every input give exactly 0).  With a ``mask``,
    ``G`` and the deviations are zeroed on filler rows, so every sum runs over the inputs.
    """
    n = _count(F, mask, xp)
    Gw = _rows(G, mask)
    Ft = xp.permute_dims(F, (1, 0))
    S1 = xp.matmul(Ft, Gw)
    S2 = xp.matmul(Ft * Ft, Gw * G)
    raw = S2 - S1 * S1 / n
    Fm, Gm = xp.sum(_rows(F, mask), axis=0) / n, xp.sum(Gw, axis=0) / n
    dF, dG = _rows(F - Fm, mask), _rows(G - Gm, mask)
    dF2, dG2 = dF * dF, dG * dG
    dFt, dF2t = xp.permute_dims(dF, (1, 0)), xp.permute_dims(dF2, (1, 0))
    C = xp.matmul(dFt, dG) / n
    Fm, Gm = Fm[:, None], Gm[None, :]
    terms = (Fm * Fm * xp.sum(dG2, axis=0)[None, :], Gm * Gm * xp.sum(dF2, axis=0)[:, None],
             xp.matmul(dF2t, dG2), -n * C * C, 2.0 * n * Fm * Gm * C,
             2.0 * Fm * xp.matmul(dFt, dG2), 2.0 * Gm * xp.matmul(dF2t, dG))
    centred = terms[0]
    scale = xp.abs(terms[0])
    for t in terms[1:]:
        centred = centred + t
        scale = scale + xp.abs(t)
    out = xp.where(scale < S2, centred, raw)
    return xp.minimum(xp.maximum(out, xp.zeros_like(out)), S2)


def _dense_weight_sums(stats: PerInputStats, inputs: Array, mask=None) -> FisherSums:
    """Σ_x stat_a(x) a_b(x)^k for every W[a, b] of the rows a that ``stats`` holds: each (rows, in)."""
    xp = array_namespace(inputs)
    sq = inputs * inputs
    powers = {2: _rows(sq, mask), 4: _rows(sq * sq, mask)}
    sums = [None if k is None else xp.matmul(xp.permute_dims(s, (1, 0)), powers[k])
            for s, k in zip((stats.fisher, None) + tuple(stats[1:]), _WEIGHT_POWER)]
    sums[1] = _product_centred_ss(stats.fisher, sq, xp, mask)
    return FisherSums(*sums)


def _dense_stats(outputs, jac, diag_hess, spectrum, mask, family):
    """Per-neuron statistics (n, out) of a dense block and their sums over inputs (the bias's)."""
    stats = per_input_stats(outputs, jac, diag_hess, family, spectrum)
    return stats, _sums_over_inputs(stats, mask)


def _dense_sums(outputs, jac, diag_hess, inputs, spectrum, mask, family, transposed):
    stats, bias = _dense_stats(outputs, jac, diag_hess, spectrum, mask, family)
    weight = _dense_weight_sums(stats, inputs, mask)
    return FisherSums(*(weight_flat(transposed, w) for w in weight)), bias


def _column_sums(outputs, jac, diag_hess, spectrum, mask, family):
    return _sums_over_inputs(per_input_stats(outputs, jac, diag_hess, family, spectrum), mask)


def _spectrum(outputs, family, positions=None):
    return family.spectrum(outputs) if positions is None else family.spectrum(outputs, positions)


def position_weights(positions, outputs):
    """(b, T·C, 1): 1 at the outputs of the positions ``positions`` (b, T) keeps, 0 at the masked ones."""
    xp = array_namespace(outputs)
    n, T = positions.shape
    w = xp.broadcast_to(xp.astype(positions, outputs.dtype)[:, :, None], (n, T, outputs.shape[1] // T))
    return xp.reshape(w, (n, outputs.shape[1], 1))


def masked_block(block, weights):
    """The block with ``∂h/∂θ`` and ``∂²h/∂θ²`` zero at masked positions' outputs: those positions drop out
    of every statistic (docs/math.md §12).  ``weights``: :func:`position_weights`, or None (no mask)."""
    if weights is None:
        return block
    return block._replace(jac=block.jac * weights,
                          diag_hess=None if block.diag_hess is None else block.diag_hess * weights)


#: Arrays of one dense chunk's (rows, in) size alive at once while its sums are computed and
#: merged: the nine sums, the centred sum of squares' temporaries, the merged copy.
CHUNK_TEMPORARIES = 32


def chunk_rows(block, budget: float) -> int:
    """Rows of a dense block's weight whose sums are computed at once, so that their temporaries
    (:data:`CHUNK_TEMPORARIES` arrays of (rows, in)) take at most ``budget`` bytes (at least one row)."""
    out = block.jac.shape[-1]
    if budget == float("inf"):
        return out
    per_row = CHUNK_TEMPORARIES * block.inputs.shape[1] * itemsize(block.inputs)
    return max(1, min(out, int(budget // per_row)))


def column_chunk(block, budget: float) -> int:
    """Columns of a column block whose statistics are computed at once, so that their temporaries (the core's
    :data:`~fishercore._batching.CORE_TEMPORARIES` arrays of (n, C, columns)) take at most ``budget`` bytes."""
    from ._batching import CORE_TEMPORARIES

    k = block.jac.shape[-1]
    if budget == float("inf"):
        return k
    per_column = CORE_TEMPORARIES * block.jac.shape[0] * block.jac.shape[1] * itemsize(block.jac)
    return max(1, min(k, int(budget // per_column)))


def cache_chunk(block) -> int:
    """Columns of a column block whose statistics eager CPU code computes at once: a piece of about
    :data:`~fishercore._batching.CACHE_BYTES` per (n, C, k) array, so that the core's passes over it stay in
    cache.  All columns for compiled code (which fuses the passes) and accelerators."""
    from ._batching import CACHE_BYTES

    ops, k = ops_for(block.jac), block.jac.shape[-1]
    if ops.compiles or ops.prefers_large_batches(block.jac):
        return k
    per_column = block.jac.shape[0] * block.jac.shape[1] * itemsize(block.jac)
    return max(1, min(k, CACHE_BYTES // max(per_column, 1)))


def _in_pieces(block, k: int, fn):
    """``fn(jac, diag_hess)`` of a column block's columns k at a time, its results (NamedTuples of (..., k) arrays,
    or None fields) side by side."""
    size = block.jac.shape[-1]
    pieces = [fn(block.jac[..., a:a + k], None if block.diag_hess is None else block.diag_hess[..., a:a + k])
              for a in range(0, size, k)]
    if len(pieces) == 1:
        return pieces[0]
    xp = array_namespace(block.jac)
    return type(pieces[0])(*(None if f[0] is None else xp.concat(f, axis=-1) for f in zip(*pieces)))


def block_sums(outputs: Array, block, family, spectrum=None, mask=None) -> dict:
    """Sums over the batch's inputs (rows where ``mask`` is 1, or all) for every group of one derivative block:
    name → FisherSums."""
    ops = ops_for(outputs)
    if spectrum is None:
        spectrum = ops.jit(_spectrum, ("family",))(outputs, family=family)
    if isinstance(block, DenseBlock):
        weight, bias = ops.jit(_dense_sums, ("family", "transposed"))(
            outputs, block.jac, block.diag_hess, block.inputs, spectrum, mask, family=family,
            transposed=block.transposed)
        return {block.weight: weight} if block.bias is None else {block.weight: weight, block.bias: bias}
    if isinstance(block, ColumnBlock):  # in pieces of cache_chunk columns, their sums side by side
        column_sums = ops.jit(_column_sums, ("family",))
        return {block.group: _in_pieces(block, cache_chunk(block), lambda jac, hess: column_sums(
            outputs, jac, hess, spectrum, mask, family=family))}
    raise TypeError(f"model: derivative blocks must be DenseBlock or ColumnBlock, got {type(block).__name__}")


def derivative_sums(d, family, mask=None, positions=None) -> dict:
    """Sums over one batch for every group of its :class:`~fishercore.Derivatives`: name → FisherSums (traceable).

    ``positions`` (b, T): the positions of sequence outputs that count, as in :func:`chunked_sums`."""
    ops = ops_for(d.outputs)
    spectrum = ops.jit(_spectrum, ("family",))(d.outputs, positions=positions, family=family)
    weights = None if positions is None else ops.jit(position_weights)(positions, d.outputs)
    sums = {}
    for block in d.blocks:
        sums.update(block_sums(d.outputs, masked_block(block, weights), family, spectrum, mask))
    return sums


def block_groups(block) -> tuple:
    """The names of the groups a derivative block covers."""
    if isinstance(block, DenseBlock):
        return (block.weight,) if block.bias is None else (block.weight, block.bias)
    return (block.group,)


def chunked_sums(d, family, mask=None, chunk_budget: float = float("inf"), positions=None, column_chunks=None):
    """The sums of :func:`derivative_sums`, one piece at a time: ``(group, start, transposed, FisherSums)``.

    A dense weight comes in chunks of :func:`chunk_rows` rows ``start:start + rows`` of its
    (out, in) matrix, each (rows, in); a column group in chunks of :func:`column_chunk`
    parameters ``start:start + k`` of its flat order; every other group whole (``start`` 0,
    flat).  Only one chunk's temporaries are alive at once, so a batch's working memory does not
    grow with the size of the largest layer.  ``positions`` (b, T): the positions of sequence
    outputs that count (:class:`~fishercore.Positions`), or None for all.  ``column_chunks``: a
    dict kept across the batches of one call, so that a column group is cut at the same places in
    every batch (its pieces merge), as the first batch's sizes say.
    """
    ops = ops_for(d.outputs)
    spectrum = ops.jit(_spectrum, ("family",))(d.outputs, positions=positions, family=family)
    weights = None if positions is None else ops.jit(position_weights)(positions, d.outputs)
    for block in d.blocks:
        block = masked_block(block, weights)
        if isinstance(block, DenseBlock):
            stats, bias = ops.jit(_dense_stats, ("family",))(d.outputs, block.jac, block.diag_hess, spectrum, mask,
                                                               family=family)
            if block.bias is not None:
                yield block.bias, 0, False, bias
            rows, out = chunk_rows(block, chunk_budget), block.jac.shape[-1]
            weight_sums = ops.jit(_dense_weight_sums)
            for a in range(0, out, rows):
                part = stats if rows >= out else PerInputStats(*(s[:, a:a + rows] for s in stats))
                yield block.weight, a, block.transposed, weight_sums(part, block.inputs, mask)
        else:  # full columns, a few at a time when their temporaries would exceed the chunk budget
            memo = {} if column_chunks is None else column_chunks
            k, size = memo.setdefault(block.group, column_chunk(block, chunk_budget)), block.jac.shape[-1]
            for a in range(0, size, k):
                hess = None if block.diag_hess is None else block.diag_hess[..., a:a + k]
                part = block if k >= size else block._replace(jac=block.jac[..., a:a + k], diag_hess=hess)
                for name, sums in block_sums(d.outputs, part, family, spectrum, mask).items():
                    yield name, a, False, sums


# -- sequence outputs a few positions at a time ---------------------------------------------
def _position_moments(outputs, jac, diag_hess, family):
    return family.position_moments(outputs, jac, diag_hess)


def add_positions(held: dict, d, family, span, chunk_budget: float = float("inf"), positions=None) -> None:
    """Merge into ``held`` (group → :class:`~fishercore.families.PositionMoments`, per input) what the positions
    ``span = (t0, t1)`` of sequence outputs contribute, from derivatives ``d`` whose column blocks cover those
    positions' outputs only (rows t0·C .. t1·C) and whose ``outputs`` are the whole sequences' (docs/math.md
    §12: every per-sequence moment is a sum over positions, the cross term merges exactly).  ``positions``
    (b, T): the positions that count, or None for all.  Columns a cache-sized piece at a time, at most
    :func:`column_chunk` of them."""
    from .families import Positions

    ops = ops_for(d.outputs)
    t0, t1 = span
    C = d.outputs.shape[1] // family.length
    outputs, chunk = d.outputs[:, t0 * C:t1 * C], Positions(family.base, t1 - t0)
    weights = None if positions is None else ops.jit(position_weights)(positions[:, t0:t1], outputs)
    moments = ops.jit(_position_moments, ("family",))
    for block in d.blocks:
        if not isinstance(block, ColumnBlock) or block.jac.shape[1] != outputs.shape[1]:
            raise TypeError(f"model: derivatives of positions {t0}..{t1 - 1} must be column blocks of their "
                            f"{outputs.shape[1]} outputs, got {type(block).__name__} of {block.jac.shape[1]}")
        block = masked_block(block, weights)
        k = min(cache_chunk(block), column_chunk(block, chunk_budget))
        m = _in_pieces(block, k, lambda jac, hess: moments(outputs, jac, hess, family=chunk))
        held[block.group] = m if block.group not in held else Positions.merge_moments(held[block.group], m)


def _sums_of_moments(p, spectrum, mask):
    from .families import Positions

    return _sums_over_inputs(stats_of_moments(*Positions.complete_moments(p), spectrum), mask)


def position_sums(held: dict, outputs, family, mask=None, positions=None):
    """``(group, FisherSums)`` for every group of ``held`` (:func:`add_positions`, every position merged): the
    per-sequence statistics with the bounds of the whole sequences' spectrum, summed over the inputs (rows
    where ``mask`` is 1, or all)."""
    ops = ops_for(outputs)
    spectrum = ops.jit(_spectrum, ("family",))(outputs, positions=positions, family=family)
    sums = ops.jit(_sums_of_moments)
    for group, p in held.items():
        yield group, sums(p, spectrum, mask)


# -- the reduction -------------------------------------------------------------------------
def _centred_term(sums: FisherSums, n, mean):
    """One share's term ``M2_r + n_r (Ī_r − Ī)²`` of the centred sum of squares about the global mean ``Ī``."""
    d = sums.fisher / n - mean
    return sums.fisher_m2 + n * (d * d)


def all_reduce_sums(sums: FisherSums, n_local, n_total, reduce_sum) -> FisherSums:
    r"""Sums over the inputs of every share, from each share's own sums — the one reduction.

    ``reduce_sum(array)`` sums an array over the shares: the collective of a distributed
    engine (``torch.distributed.all_reduce``, ``jax.lax.psum``).  Every field but the centred
    one is a plain sum, reduced in one call.  The centred sum of squares uses the global mean
    ``Ī`` (after the first call) and one more reduction of each share's
    ``M2_r + n_r (Ī_r − Ī)²`` — every term non-negative, so nothing cancels (docs/math.md §5).
    :func:`merge_sums` is the same algebra for two shares held in one process.
    """
    xp = array_namespace(sums.fisher)
    plain = [f for f in FisherSums._fields if f != "fisher_m2"]
    total = reduce_sum(xp.stack([getattr(sums, f) for f in plain]))
    out = {f: total[i, ...] for i, f in enumerate(plain)}
    out["fisher_m2"] = reduce_sum(_centred_term(sums, n_local, out["fisher"] / n_total))
    return FisherSums(**out)


def merge_sums(a: FisherSums, na, b: FisherSums, nb) -> FisherSums:
    """The sums over the union of two disjoint input sets (the reduction of :func:`all_reduce_sums` over two
    shares; traceable: the counts may be arrays)."""
    fisher = a.fisher + b.fisher
    mean = fisher / (na + nb)
    return FisherSums(fisher, _centred_term(a, na, mean) + _centred_term(b, nb, mean),
                      *(x + y for x, y in zip(a[2:], b[2:])))


def _merge_into(held: list, na, b: FisherSums, nb) -> None:
    """:func:`merge_sums` of the fields ``held`` (updated in place) and b."""
    a = FisherSums(*held)
    mean = (a.fisher + b.fisher) / (na + nb)
    m2 = _centred_term(a, na, mean)
    m2 += _centred_term(b, nb, mean)
    held[1][...] = m2
    del m2, mean
    for i in (0, *range(2, len(held))):
        held[i] += b[i]


class Accumulator:
    """Sums of a stream of batches, kept in pieces: ``add(...)`` per batch, then ``flat(groups)``.

    A piece is a group, or a chunk of a dense weight's rows (:func:`chunked_sums`).  Each
    batch's piece is merged into the held one by :func:`merge_sums` as soon as it exists (one
    compiled merge per piece shape where the library compiles), so a batch never holds more
    than one piece's sums beside the running total.  ``add_piece`` for each piece of a batch,
    then ``count(n)``; ``add(sums, n)`` does both for whole groups.
    """

    def __init__(self):
        self.pieces: dict = {}  # (group, start) → list of the FisherSums fields
        self.transposed: dict = {}  # group → stored (in, out)
        self.n_inputs = 0
        self._batch: set = set()

    def add_piece(self, group: str, start: int, transposed: bool, sums: FisherSums, n: int) -> None:
        """Merge one piece of the current batch (of n inputs) into the total."""
        key = (group, start)
        held = self.pieces.get(key)
        if held is None:
            if self.n_inputs:
                raise RuntimeError(f"model: a batch's derivative blocks cover the group {group!r}, "
                                   f"which earlier batches did not")
            self.pieces[key], self.transposed[group] = list(sums), transposed
        else:
            ops = ops_for(sums.fisher)
            if ops.mutable:  # in place: the running sums stay where they are, and memory does not fragment
                _merge_into(held, self.n_inputs, sums, n)
            else:
                held[:] = ops.jit(merge_sums)(FisherSums(*held), self.n_inputs, sums, n)
        self._batch.add(key)

    def count(self, n: int) -> None:
        """Close the current batch, of n inputs."""
        if self._batch != set(self.pieces):
            missing = sorted({g for g, _ in set(self.pieces) - self._batch})
            raise RuntimeError(f"model: a batch's derivative blocks do not cover the groups {missing}, "
                               f"which earlier batches did")
        self._batch = set()
        self.n_inputs += n

    def add(self, sums: dict, n: int) -> None:
        """Fold in the sums (name → FisherSums, flat) of n more inputs."""
        for name, s in sums.items():
            self.add_piece(name, 0, False, s, n)
        self.count(n)

    def by_group(self, first_order_only=()) -> dict:
        """group → the arrays of all its pieces (for a check); only the first-order sums of the groups in
        ``first_order_only``, whose second-order sums are NaN: not computed."""
        out: dict = {}
        keep = [i for i, f in enumerate(FisherSums._fields) if f not in SECOND_ORDER]
        for (g, _), fields in self.pieces.items():
            out.setdefault(g, []).extend([fields[i] for i in keep] if g in first_order_only else fields)
        return out

    def flat(self, groups) -> FisherSums:
        """The sums of every group concatenated in flat parameter order (consumes the pieces, one field at a
        time, so that the total is held about once)."""
        starts: dict = {}
        for g, a in self.pieces:
            starts.setdefault(g, []).append(a)
        missing = [g.name for g in groups if g.name not in starts]
        if missing:
            raise RuntimeError(f"model: derivative blocks do not cover the groups {missing}")
        first = self.pieces[(groups[0].name, 0)][0]
        xp = array_namespace(first)
        fields = []
        for i in range(len(FisherSums._fields)):
            parts = []
            for g in groups:
                chunks = [self.pieces[(g.name, a)] for a in sorted(starts[g.name])]
                if len(chunks) == 1 and chunks[0][i].ndim == 1:
                    parts.append(chunks[0][i])
                else:
                    whole = chunks[0][i] if len(chunks) == 1 else xp.concat([c[i] for c in chunks], axis=0)
                    parts.append(weight_flat(self.transposed[g.name], whole))
                for c in chunks:
                    c[i] = None
            fields.append(xp.concat(parts))
            del parts
        self.pieces = {}
        return FisherSums(*fields)
