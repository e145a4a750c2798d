r"""Exact diagonal Fisher statistics: per input → data-set sums → :class:`FisherAnalysis`.

For a data set X of n inputs the analysis reports, per parameter, the means over
x of ``I``, ``v1``, ``v2``, ``c12`` and the bounds, and
``var_x = mean_x I(x)² − (mean_x I(x))²`` (SPEC §4).  It keeps *sums* over
inputs, so partial results over batches, processes or machines merge exactly by
addition (:meth:`FisherAnalysis.merge`).

Dense layers never need per-parameter columns: for ``W[a, b]`` with layer input
``a_b`` (SPEC §4, fact 5) ``I(W_ab) = a_b² I(b_a)`` and ``v1, v2, c12`` and every
bound scale with ``a_b⁴``, so the sums over inputs are matrix products
``statᵀ @ inputs**k``.
"""

from __future__ import annotations

from typing import NamedTuple

from array_api_compat import array_namespace, device

from . import _validation as V
from ._batching import DEFAULT_MEMORY_BUDGET, Batches, auto_cap, check_batching
from ._progress import Progress
from ._protocol import Array, ColumnBlock, DenseBlock, ParamGroup, compiled, weight_flat
from .bounds import variance_bounds
from .families import Family, get_family

__all__ = ["FisherAnalysis", "FisherSums", "PerInputStats", "Summary", "all_reduce_sums", "analyze", "analyze_batches",
           "fisher_stats", "load_analysis"]

class PerInputStats(NamedTuple):
    """Exact statistics for each input and parameter (or neuron)."""

    fisher: Array  # (n, k)  I_i(x)
    v1: Array  # (n, k)      single-draw variance of Î1
    v2: Array  # (n, k)      single-draw variance of Î2
    c12: Array  # (n, k)     single-draw covariance of Î1 and Î2
    v1_lower: Array  # (n, k)
    v1_upper: Array  # (n, k)
    v2_lower: Array  # (n, k)
    v2_upper: Array  # (n, k)


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


def fisher_stats(outputs: Array, jac: Array, diag_hess: Array, family, /, *, spectrum=None) -> PerInputStats:
    r"""Per-input diagonal Fisher statistics.

    Index conventions: n input, C output, k parameter (or neuron).

    Parameters
    ----------
    outputs : (n, C) array
        Network outputs ``h(x)``.
    jac, diag_hess : (n, C, k) arrays
        ``u = ∂h/∂θ_i`` and ``w = ∂²h/∂θ_i²`` for each of k parameters.
    family : Family or str
    spectrum : Spectrum, optional
        ``family.spectrum(outputs)``, when the caller already has it.

    Returns
    -------
    PerInputStats
        ``I = uᵀΛu``, ``v1 = E[(sᵀu)⁴] − I²``, ``v2 = wᵀΛw``,
        ``c12 = −E[(sᵀu)²(sᵀw)]`` and the bounds of SPEC §3, each (n, k).
    """
    family = get_family(family)
    V.check_floating_array(outputs, "outputs", ndim=2)
    xp = array_namespace(outputs)
    V.check_floating_array(jac, "jac", xp=xp, ndim=3)
    V.check_floating_array(diag_hess, "diag_hess", xp=xp, ndim=3)
    n, C = outputs.shape
    if tuple(jac.shape[:2]) != (n, C):
        raise ValueError(f"jac: expected shape ({n}, {C}, k) to match outputs {tuple(outputs.shape)}, "
                         f"got {tuple(jac.shape)}")
    if tuple(diag_hess.shape) != tuple(jac.shape):
        raise ValueError(f"diag_hess: expected the shape of jac {tuple(jac.shape)}, got {tuple(diag_hess.shape)}")
    if outputs.dtype != jac.dtype or jac.dtype != diag_hess.dtype:
        raise TypeError(f"jac: dtypes differ (outputs {outputs.dtype}, jac {jac.dtype}, diag_hess {diag_hess.dtype})")
    family.check_outputs(C)
    for a, name in ((outputs, "outputs"), (jac, "jac"), (diag_hess, "diag_hess")):
        V.check_finite(a, name)
    return _fisher_stats(outputs, jac, diag_hess, family, spectrum)


def _fisher_stats(outputs, jac, diag_hess, family, spectrum=None) -> PerInputStats:
    """:func:`fisher_stats` without argument checks (traceable: used inside jit-compiled code)."""
    xp = array_namespace(outputs, jac, diag_hess)
    m = family.moments(outputs, jac, diag_hess)
    pu, pw = family.center(jac), family.center(diag_hess)
    spectrum = family.spectrum(outputs) if spectrum is None else spectrum
    b = variance_bounds(m, spectrum, xp.sum(pu * pu, axis=-2), xp.sum(pw * pw, axis=-2))
    return PerInputStats(m.fisher, m.v1, m.v2, m.c12, *b)


def _centred_ss(x, xp):
    """Σ over axis 0 of (x − mean)²."""
    d = x - xp.mean(x, axis=0, keepdims=True)
    return xp.sum(d * d, axis=0)


def _sums_over_inputs(stats: PerInputStats) -> FisherSums:
    xp = array_namespace(stats.fisher)
    return FisherSums(xp.sum(stats.fisher, axis=0), _centred_ss(stats.fisher, xp),
                      *(xp.sum(s, axis=0) for s in stats[1:]))


def _product_centred_ss(F, G, xp):
    r"""``Σ_x (F_a(x) G_b(x) − m_ab)²`` for all (a, b) by matrix products; ``F, G ≥ 0``.

    Two exact expressions, each losing digits in a different regime:

    * raw: ``S2 − n m²`` with ``S2 = Σ (F G)² = (F²)ᵀ(G²)``; rounding ``≈ ε S2``,
      bad when the products barely vary;
    * centred: with batch means ``F̄, Ḡ``, deviations ``δF, δG`` and ``C = δFᵀδG / n``,
      ``F̄² ΣδG² + Ḡ² ΣδF² + (δF²)ᵀ(δG²) − n C² + 2 n F̄ Ḡ C + 2 F̄ δFᵀ(δG²) + 2 Ḡ (δF²)ᵀδG``;
      rounding ``≈ ε × Σ|terms|``, bad when F and G are strongly anti-correlated.

    Each entry takes the expression with the smaller rounding scale, clipped to
    ``[0, S2]`` (so products that vanish on every input give exactly 0).
    """
    n = F.shape[0]
    Ft = xp.permute_dims(F, (1, 0))
    S1 = xp.matmul(Ft, G)
    S2 = xp.matmul(Ft * Ft, G * G)
    raw = S2 - S1 * S1 / n
    Fm, Gm = xp.mean(F, axis=0), xp.mean(G, axis=0)
    dF, dG = F - Fm, G - Gm
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


def _dense_weight_sums(stats: PerInputStats, inputs: Array, transposed: bool) -> FisherSums:
    """Σ_x stat_a(x) a_b(x)^k for every W[a, b], flattened in the group's order."""
    xp = array_namespace(inputs)
    sq = inputs * inputs
    powers = {2: sq, 4: sq * sq}
    sums = [None if k is None else weight_flat(transposed, xp.matmul(xp.permute_dims(s, (1, 0)), powers[k]))
            for s, k in zip((stats.fisher, None) + tuple(stats[1:]), _WEIGHT_POWER)]
    sums[1] = weight_flat(transposed, _product_centred_ss(stats.fisher, sq, xp))
    return FisherSums(*sums)


def _dense_sums(outputs, jac, diag_hess, inputs, spectrum, family, transposed):
    stats = _fisher_stats(outputs, jac, diag_hess, family, spectrum)
    return _dense_weight_sums(stats, inputs, transposed), _sums_over_inputs(stats)


def _column_sums(outputs, jac, diag_hess, spectrum, family):
    return _sums_over_inputs(_fisher_stats(outputs, jac, diag_hess, family, spectrum))


def _family_spectrum(outputs, family):
    return family.spectrum(outputs)


def _spectrum(outputs, family, xp):
    # Compiled as a plain function with the family static: a jit of the bound method
    # family.spectrum would be keyed on a short-lived object and recompile every call.
    return compiled(_family_spectrum, xp, ("family",))(outputs, family=family)


def block_sums(outputs: Array, block, family: Family, spectrum=None) -> dict:
    """Sums over the batch for every group of one derivative block: name → FisherSums."""
    xp = array_namespace(outputs)
    spectrum = _spectrum(outputs, family, xp) if spectrum is None else spectrum
    if isinstance(block, DenseBlock):
        weight, bias = compiled(_dense_sums, xp, ("family", "transposed"))(
            outputs, block.jac, block.diag_hess, block.inputs, spectrum, family=family, transposed=block.transposed)
        return {block.weight: weight} if block.bias is None else {block.weight: weight, block.bias: bias}
    if isinstance(block, ColumnBlock):
        return {block.group: compiled(_column_sums, xp, ("family",))(outputs, block.jac, block.diag_hess, spectrum,
                                                                      family=family)}
    raise TypeError(f"model: derivative blocks must be DenseBlock or ColumnBlock, got {type(block).__name__}")


def derivative_sums(d, family: Family, xp) -> dict:
    """Sums over one batch for every group of its :class:`Derivatives`: name → FisherSums (traceable)."""
    spectrum = _spectrum(d.outputs, family, xp)
    sums = {}
    for block in d.blocks:
        sums.update(block_sums(d.outputs, block, family, spectrum))
    return sums


def _combine(a: FisherSums, na: int, b: FisherSums, nb: int) -> FisherSums:
    """Sums over the union of two disjoint input sets (Chan et al. for the centred term)."""
    d = a.fisher / na - b.fisher / nb
    m2 = a.fisher_m2 + b.fisher_m2 + d * d * (na * nb / (na + nb))
    return FisherSums(*(m2 if f == "fisher_m2" else x + y for f, x, y in zip(FisherSums._fields, a, b)))


def all_reduce_sums(sums: FisherSums, n_local: int, n_total, reduce_sum) -> FisherSums:
    r"""Sums over the inputs of every process, from each process's own sums.

    ``reduce_sum(array)`` is the collective of a distributed engine that sums an array
    over all processes (``torch.distributed.all_reduce``, ``jax.lax.psum``); every field
    but the centred one is a plain sum, reduced in one call.  The centred sum of squares
    uses the global mean ``Ī`` (after the first call) and one more reduction of
    ``M2_r + n_r (Ī_r − Ī)²`` — every term non-negative, so nothing cancels.
    """
    xp = array_namespace(sums.fisher)
    plain = [f for f in FisherSums._fields if f != "fisher_m2"]
    total = reduce_sum(xp.stack([getattr(sums, f) for f in plain]))
    out = {f: total[i, ...] for i, f in enumerate(plain)}
    d = sums.fisher / n_local - out["fisher"] / n_total
    out["fisher_m2"] = reduce_sum(sums.fisher_m2 + n_local * (d * d))
    return FisherSums(**out)


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


class Summary(tuple):
    """A tuple of :class:`GroupSummary` rows that prints as a table."""

    _COLS = (("group", "<14", ""), ("size", ">7", "d"), ("fisher", ">10", ".3e"), ("v1", ">10", ".3e"),
             ("v2", ">10", ".3e"), ("rel_std_i1", ">10", ".3g"), ("rel_std_i2", ">10", ".3g"),
             ("i2_better", ">9", ".0%"))

    def __str__(self) -> str:
        lines = [" ".join(f"{name:{width}}" for name, width, _ in self._COLS)]
        for row in self:
            lines.append(" ".join(f"{getattr(row, name):{width}{fmt}}" for name, width, fmt in self._COLS))
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

    # -- per-parameter means (SPEC §4) ---------------------------------------
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

    # -- the optimal combination (SPEC §4, beyond the paper) -----------------
    def alpha(self) -> Array:
        r"""Weight ``α*`` of the least-variance unbiased combination ``α Î1 + (1 − α) Î2``.

        ``α* = (v2 − c12) / (v1 + v2 − 2 c12)`` (means over x).  Where Î1 and Î2
        coincide draw by draw (denominator 0) any α is optimal; 0 is returned.
        """
        xp = array_namespace(self.sums.v1)
        v1, v2, c12 = self.v1, self.v2, self.c12
        den = v1 + v2 - 2.0 * c12
        ok = den > 0
        return xp.where(ok, (v2 - c12) / xp.where(ok, den, xp.ones_like(den)), xp.zeros_like(den))

    def optimal_v(self) -> Array:
        r"""Single-draw variance of the optimal combination, ``(v1 v2 − c12²)/(v1 + v2 − 2c12)``.

        Evaluated as ``min(v2 − (v2 − c12)²/den, v1 − (v1 − c12)²/den)`` so it can never
        exceed ``min(v1, v2)`` through rounding; clipped at 0.
        """
        xp = array_namespace(self.sums.v1)
        v1, v2, c12 = self.v1, self.v2, self.c12
        den = v1 + v2 - 2.0 * c12
        ok = den > 0
        safe = xp.where(ok, den, xp.ones_like(den))
        a, b = v2 - c12, v1 - c12
        out = xp.minimum(v2 - xp.where(ok, a * a / safe, 0.0 * den), v1 - xp.where(ok, b * b / safe, 0.0 * den))
        return xp.maximum(out, xp.zeros_like(out))

    def _single_draw(self, estimator: str) -> Array:
        estimator = V.check_choice(estimator, "estimator", ("i1", "i2", "optimal"))
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

        With ``δ = 1 − confidence`` the requirement is ``Var ≤ δ ε² F²`` (SPEC §4):

        * ``n_draws=None``: the smallest number of label draws per input M for a full
          pass over X, ``⌈mean v / (n δ ε² F²)⌉``;
        * ``n_draws=M``: the smallest number of inputs N drawn with replacement, M
          draws each, ``⌈(var_x + mean v / M) / (δ ε² F²)⌉``.

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
        return FisherAnalysis(_combine(self.sums, self.n_inputs, other.sums, other.n_inputs),
                              self.n_inputs + other.n_inputs, self.groups, self.family)

    __add__ = merge

    def save(self, path) -> None:
        """Write the sums, ``n_inputs``, groups and family to an ``.npz`` file (exact; see :func:`load_analysis`).

        Partial analyses of a long run saved this way can be loaded later and merged with the rest.
        """
        _write(self, path)

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
        rows = []
        for g in self.groups:
            sl = {k: v[g.offset:g.offset + g.size] for k, v in fields.items()}
            f = sl["fisher"]
            pos = f > 0
            safe = xp.where(pos, f, xp.ones_like(f))
            rel1 = (xp.sqrt(sl["v1"]) / safe)[pos]
            rel2 = (xp.sqrt(sl["v2"]) / safe)[pos]
            rows.append(GroupSummary(
                g.name, g.size, *(float(xp.mean(sl[k])) for k in fields),
                _median(rel1, xp), _median(rel2, xp),
                float(xp.mean(xp.astype(sl["v2"] < sl["v1"], f.dtype))),
            ))
        return Summary(rows)


def _write(analysis: FisherAnalysis, path, **extra) -> None:
    """The .npz of :meth:`FisherAnalysis.save`, with ``extra`` entries in its metadata."""
    import json

    import numpy as np

    arrays = {f"sums_{k}": _host(v) for k, v in zip(FisherSums._fields, analysis.sums)}
    meta = {"format": "fishercore.FisherAnalysis/1", "n_inputs": int(analysis.n_inputs),
            "groups": [[g.name, list(g.shape), g.offset] for g in analysis.groups],
            "family": analysis.family.name, "variance": getattr(analysis.family, "variance", None), **extra}
    try:
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    except OSError as e:
        raise ValueError(f"path: cannot write {path} ({e.strerror or e})") from e


def _read(path) -> tuple[dict, dict]:
    """The metadata and sums of a :meth:`FisherAnalysis.save` file (ValueError naming ``path`` otherwise)."""
    import json

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            sums = {k: f[f"sums_{k}"] for k in FisherSums._fields}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"path: {path} is not a saved FisherAnalysis ({e})") from e
    if meta.get("format") != "fishercore.FisherAnalysis/1":
        raise ValueError(f"path: {path} has an unknown format {meta.get('format')!r}")
    return meta, sums


def _host(x):
    """A NumPy copy of any array-API array: DLPack on the CPU, else each library's own copy to the host."""
    import numpy as np
    from array_api_compat import is_cupy_array, is_torch_array

    try:
        return np.from_dlpack(x).copy()
    except (RuntimeError, TypeError, ValueError, BufferError):
        pass
    if is_cupy_array(x):
        return x.get()
    if is_torch_array(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)  # JAX (any device), array_api_strict, ...


def load_analysis(path, model=None, *, like=None) -> FisherAnalysis:
    """Read a :meth:`FisherAnalysis.save` file back, bit for bit.

    Parameters
    ----------
    path : str or path-like
        An ``.npz`` written by :meth:`FisherAnalysis.save`.
    model : Model, optional
        When given, the file's parameter groups must be the model's (name, shape and order),
        so that a partial analysis is only ever merged with analyses of the same model.
    like : array, optional
        Return arrays in this array's library and on its device (NumPy by default).
    """
    meta, sums = _read(path)
    groups = tuple(ParamGroup(n, tuple(s), o) for n, s, o in meta["groups"])
    if model is not None and tuple(model.groups) != groups:
        mine = [(g.name, g.shape) for g in model.groups]
        theirs = [(g.name, g.shape) for g in groups]
        raise ValueError(f"path: {path} holds an analysis of other parameter groups {theirs} than the model's {mine}")
    family = get_family(meta["family"])
    if meta["variance"] is not None:
        family = type(family)(variance=meta["variance"])
    if like is not None:
        xp = array_namespace(like)
        sums = {k: xp.asarray(v, dtype=getattr(xp, str(v.dtype)), device=device(like)) for k, v in sums.items()}
    return FisherAnalysis(FisherSums(**sums), int(meta["n_inputs"]), groups, family)


def check_model_and_data(model, X, family, batch_size, memory_budget=DEFAULT_MEMORY_BUDGET):
    """Shared argument checks of :func:`analyze` and :func:`estimate`."""
    from ._protocol import Model

    if not isinstance(model, Model):
        raise TypeError("model: expected a fishercore model (e.g. fishercore.backends.mlp.MLP), "
                        f"got {type(model).__name__}")
    family = get_family(family)
    batch_size, memory_budget = check_batching(batch_size, memory_budget)
    X = model.check_inputs(X)
    family.check_outputs(model.n_outputs)
    if X.shape[0] == 0:
        raise ValueError("X: empty data set (0 inputs)")
    V.check_finite(X, "X")
    return family, X, Batches(X.shape[0], batch_size, memory_budget, auto_cap(X))


def _all_finite(*arrays):
    xp = array_namespace(*arrays)
    return xp.all(xp.stack([xp.all(xp.isfinite(a)) for a in arrays]))


def check_results_finite(values, start, stop, what="outputs"):
    """Raise FloatingPointError naming the inputs (and group) when a batch's results are not finite.

    ``values``: one array, or a dict name → array or tuple of arrays (checked with one
    device synchronisation; the culprit is looked up only on failure).
    """
    def finite(arrays):
        return bool(compiled(_all_finite, array_namespace(*arrays))(*arrays))

    def flat(v):
        return list(v) if isinstance(v, (tuple, list)) else [v]

    if not isinstance(values, dict):
        values = {None: values}
    if finite([a for v in values.values() for a in flat(v)]):
        return
    name = next(k for k, v in values.items() if not finite(flat(v)))
    label = what if name is None else f"{what} of {name!r}"
    raise FloatingPointError(f"model: {label} are NaN or inf for inputs {start}..{stop - 1} "
                             "(overflow in the network; check the weights and input scale)")


def analyze(model, X: Array, family="categorical", *, batch_size: int | None = None,
            memory_budget: float = DEFAULT_MEMORY_BUDGET, progress: bool = False) -> FisherAnalysis:
    r"""Exact diagonal Fisher, variances of Î1 and Î2, and their bounds over a data set.

    Parameters
    ----------
    model : Model
        A fishercore model, e.g. :class:`fishercore.backends.mlp.MLP`.
    X : (n, d) array
        Inputs, in the model's array library, dtype and device.
    family : {"categorical", "gaussian", "bernoulli"} or Family
        Output distribution ``p(y | h)``.
    batch_size : int, optional
        Inputs per batch.  By default batches are sized to ``memory_budget`` (after a
        first batch of 32 inputs that measures the per-input footprint), and hold at
        most 512 inputs for NumPy and torch on the CPU, where larger batches are not
        faster.  Results do not depend on the batching.
    memory_budget : float
        Bytes of working memory per batch when ``batch_size`` is None (512 MiB by
        default); an estimate, not a hard limit.
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
    family, X, batches = check_model_and_data(model, X, family, batch_size, memory_budget)
    n = X.shape[0]
    xp = array_namespace(X)
    sums: dict = {}
    with Progress(len(batches), progress, "analyze") as bar:
        for start, stop in batches:
            d = model.derivatives(X[start:stop, ...])
            batches.fit(d.blocks, stop - start, model, hessian=True)
            bar.total = len(batches)
            check_results_finite(d.outputs, start, stop)
            batch = derivative_sums(d, family, xp)
            check_results_finite(batch, start, stop, "statistics")
            for name, s in batch.items():
                sums[name] = _combine(sums[name], start, s, stop - start) if name in sums else s
            bar.update()
    return assemble(model, sums, n, family)


def assemble(model, sums: dict, n: int, family) -> FisherAnalysis:
    """A :class:`FisherAnalysis` from per-group sums ``{name: FisherSums}`` over n inputs."""
    missing = [g.name for g in model.groups if g.name not in sums]
    if missing:
        raise RuntimeError(f"model: derivative blocks do not cover the groups {missing}")
    xp = array_namespace(sums[model.groups[0].name].fisher)
    flat = FisherSums(*(xp.concat([sums[g.name][i] for g in model.groups]) for i in range(len(FisherSums._fields))))
    return FisherAnalysis(flat, n, tuple(model.groups), family)


def analyze_batches(model, batches, family="categorical", *, checkpoint=None, checkpoint_every: int = 1,
                    memory_budget: float = DEFAULT_MEMORY_BUDGET, progress: bool = False) -> FisherAnalysis:
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
        first k batches are skipped without computing.  It is rewritten (atomically) every
        ``checkpoint_every`` batches, at the end, and when an error or interrupt stops the
        run, so finished batches are never lost.
    checkpoint_every : int
        Batches between checkpoints.

    Returns
    -------
    FisherAnalysis
        Of all the batches' inputs; the same as :func:`analyze` on their concatenation.
    """
    import os

    family = get_family(family)
    every = V.check_positive_int(checkpoint_every, "checkpoint_every")
    done, result = 0, None
    if checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        folder = os.path.dirname(os.path.abspath(checkpoint))
        if not os.path.isdir(folder) or not os.access(folder, os.W_OK):
            raise ValueError(f"checkpoint: cannot write to folder {folder}")
    try:
        iterator = iter(batches)
    except TypeError as e:
        raise TypeError(f"batches: expected an iterable of input batches, got {type(batches).__name__}") from e

    def inputs(batch, i):
        X = batch[0] if isinstance(batch, (tuple, list)) else batch
        if not hasattr(X, "shape"):
            raise TypeError(f"batches: batch {i} is a {type(X).__name__}, not an array (or a tuple starting with one)")
        return X

    saved = [0]  # batches the checkpoint file holds

    def save():
        if checkpoint is not None and result is not None and done > saved[0]:
            tmp = f"{checkpoint}.tmp"
            _write(result, tmp, batches=done)
            os.replace(tmp, checkpoint)
            saved[0] = done

    skip = 0
    if checkpoint is not None and os.path.exists(checkpoint):
        try:
            meta = _read(checkpoint)[0]
        except ValueError as e:
            raise ValueError(f"checkpoint: {str(e).removeprefix('path: ')}") from e
        skip = saved[0] = int(meta.get("batches", -1))
        if skip < 0:
            raise ValueError(f"checkpoint: {checkpoint} is a saved FisherAnalysis but not a checkpoint of "
                             "analyze_batches (it records no batch count)")
    with Progress(0, progress, "analyze") as bar:
        try:
            for i, batch in enumerate(iterator):
                X = inputs(batch, i)
                if i < skip:  # finished before the checkpoint: consumed, not recomputed
                    if i == skip - 1:
                        try:
                            loaded = load_analysis(checkpoint, model, like=X)
                        except ValueError as e:
                            raise ValueError(f"checkpoint: {str(e).removeprefix('path: ')}") from e
                        if loaded.family != family:
                            raise ValueError(f"checkpoint: {checkpoint} holds a {loaded.family!r} analysis, "
                                             f"not {family!r}")
                        result, done = loaded, skip
                    continue
                part = analyze(model, X, family, memory_budget=memory_budget)
                result = part if result is None else result.merge(part)
                done = i + 1
                bar.update()
                if done % every == 0:
                    save()
        except BaseException:
            save()  # keep every finished batch, then report the error
            raise
    if done < skip:
        raise ValueError(f"batches: the checkpoint records {skip} finished batches but the iterable "
                         f"yields only {done}")
    if result is None:
        raise ValueError("batches: no batches (an empty iterable)")
    save()
    return result
