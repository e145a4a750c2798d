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

__all__ = ["FisherAnalysis", "FisherSums", "PerInputStats", "Summary", "analyze", "fisher_stats", "load_analysis"]

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
    xp = array_namespace(outputs, jac, diag_hess)
    family = get_family(family)
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
    stats = fisher_stats(outputs, jac, diag_hess, family, spectrum=spectrum)
    return _dense_weight_sums(stats, inputs, transposed), _sums_over_inputs(stats)


def _column_sums(outputs, jac, diag_hess, spectrum, family):
    return _sums_over_inputs(fisher_stats(outputs, jac, diag_hess, family, spectrum=spectrum))


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


def _combine(a: FisherSums, na: int, b: FisherSums, nb: int) -> FisherSums:
    """Sums over the union of two disjoint input sets (Chan et al. for the centred term)."""
    d = a.fisher / na - b.fisher / nb
    m2 = a.fisher_m2 + b.fisher_m2 + d * d * (na * nb / (na + nb))
    return FisherSums(*(m2 if f == "fisher_m2" else x + y for f, x, y in zip(FisherSums._fields, a, b)))


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
        budget = delta * eps * eps * f * f
        pos = budget > 0
        ratio = need / xp.where(pos, budget, xp.ones_like(budget))
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
        import json

        import numpy as np

        arrays = {f"sums_{k}": _host(v) for k, v in zip(FisherSums._fields, self.sums)}
        meta = {"format": "fishercore.FisherAnalysis/1", "n_inputs": int(self.n_inputs),
                "groups": [[g.name, list(g.shape), g.offset] for g in self.groups],
                "family": self.family.name, "variance": getattr(self.family, "variance", None)}
        np.savez(path, meta=np.array(json.dumps(meta)), **arrays)

    def unflatten(self, values: Array) -> dict:
        """Split a (P,) array into ``{group name: array of the group's shape}``."""
        xp = array_namespace(values)
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


def _host(x):
    """A NumPy copy of any array-API array (via DLPack, moved to the CPU first when needed)."""
    import numpy as np
    from array_api_compat import to_device

    try:
        return np.from_dlpack(x).copy()
    except (RuntimeError, TypeError, ValueError, BufferError):
        return np.asarray(to_device(x, "cpu"))


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
    groups = tuple(ParamGroup(n, tuple(s), o) for n, s, o in meta["groups"])
    if model is not None and tuple(model.groups) != groups:
        mine = [(g.name, g.shape) for g in model.groups]
        theirs = [(g.name, g.shape) for g in groups]
        raise ValueError(f"path: {path} holds an analysis of other parameter groups {theirs} than the model's {mine}")
    family = get_family(meta["family"]) if meta["variance"] is None else get_family(meta["family"]).__class__(
        variance=meta["variance"])
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
            spectrum = _spectrum(d.outputs, family, xp)
            batch = {}
            for block in d.blocks:
                batch.update(block_sums(d.outputs, block, family, spectrum))
            check_results_finite(batch, start, stop, "statistics")
            for name, s in batch.items():
                sums[name] = _combine(sums[name], start, s, stop - start) if name in sums else s
            bar.update()
    missing = [g.name for g in model.groups if g.name not in sums]
    if missing:
        raise RuntimeError(f"model: derivative blocks do not cover the groups {missing}")
    flat = FisherSums(*(xp.concat([sums[g.name][i] for g in model.groups]) for i in range(len(FisherSums._fields))))
    return FisherAnalysis(flat, n, tuple(model.groups), family)
