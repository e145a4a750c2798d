r"""Output distributions ``p(y | h)``: moments, spectra, sampler and log-likelihood.

For one input with outputs ``h`` (C of them), score ``s = ∂ℓ/∂h`` and output
Fisher ``Λ = E[s sᵀ]``, and a parameter with output derivatives
``u = ∂h/∂θ_i`` and ``w = ∂²h/∂θ_i²`` (docs/math.md §2):

.. math::

    I = uᵀΛu,\quad v_1 = \operatorname{Var}((sᵀu)^2),\quad v_2 = wᵀΛw,\quad
    c_{12} = -E[(sᵀu)^2 (sᵀw)].

Every family evaluates these in O(C) per parameter from closed forms (no C⁴
tensors), in centred form so that variances cannot come out negative through
cancellation.  Index conventions: n input, c output (C), k parameter or neuron,
m label draw.  ``jac`` and ``diag_hess`` are (n, C, k); results are (n, k).

Reference: Soen & Sun, "Trade-Offs of Diagonal Fisher Information Matrix
Estimators", NeurIPS 2024, §3 (variances) and Theorem 4.1 (spectral bounds).
"""

from __future__ import annotations

import math
from typing import NamedTuple

from array_api_compat import array_namespace, device

from ._numerics import log_softmax, sigmoid, sigmoid_pair, softmax, softplus, unit_roundoff
from ._protocol import Array

__all__ = ["Bernoulli", "Categorical", "Family", "Gaussian", "Moments", "PositionMoments", "Positions", "Spectrum",
           "get_family"]


class Moments(NamedTuple):
    """Exact per-input statistics of one output distribution."""

    fisher: Array  # (n, k)  I = uᵀΛu
    third: Array  # (n, k)   E[(sᵀu)³]
    v1: Array  # (n, k)      Var((sᵀu)²), single-draw variance of Î1
    v2: Array  # (n, k)      wᵀΛw, single-draw variance of Î2
    c12: Array  # (n, k)     Cov(Î1, Î2) for one draw = −E[(sᵀu)²(sᵀw)]


class PositionMoments(NamedTuple):
    """Sums over some positions of a sequence of each position's moments (docs/math.md §12), per input (n, k):
    what the positions of one chunk contribute, merged exactly with the other chunks'
    (:meth:`Positions.merge_moments`) and completed into the sequence's :class:`Moments`
    (:meth:`Positions.complete_moments`).  ``cross`` is ``Σ_{t≠r} I_t I_r`` over the positions summed, each
    term non-negative; the second-order fields are None where there is no w."""

    fisher: Array  # Σ_t I_t
    third: Array  # Σ_t E[a_t³]
    v1: Array  # Σ_t v1_t
    cross: Array  # Σ_{t≠r} I_t I_r
    v2: Array | None  # Σ_t v2_t
    c12: Array | None  # Σ_t c12_t
    pu2: Array  # Σ_t ‖P_t u_t‖²
    pw2: Array | None  # Σ_t ‖P_t w_t‖²


class Spectrum(NamedTuple):
    """Extreme eigenvalues used by the bounds (docs/math.md §4), per input.

    ``lam_*`` bound ``Λ`` on the complement of its fixed null space (the span of
    ``1`` for the softmax); ``m_*`` bound ``𝓜 = Cov(vec(s sᵀ))`` on symmetric
    matrices, restricted the same way.
    """

    lam_min: Array  # (n,)
    lam_max: Array  # (n,)
    m_min: Array  # (n,)
    m_max: Array  # (n,)


class Family:
    """Base class of an output distribution.  Subclasses fill in the formulas."""

    name = "family"

    # -- checks -------------------------------------------------------------
    def check_outputs(self, n_outputs: int) -> None:
        """Raise if the model's output width does not suit the family."""
        if n_outputs < 1:
            raise ValueError(f"model: {self.name} family needs at least one output, got {n_outputs}")

    def check_labels(self, labels, outputs) -> Array:
        """Validate observed labels (n, C) against outputs (n, C); return them."""
        xp = array_namespace(outputs)
        _same_namespace(labels, xp, "labels")
        if tuple(labels.shape) != tuple(outputs.shape):
            raise ValueError(
                f"labels: expected shape {tuple(outputs.shape)} (n, C) for the {self.name} "
                f"family, got {tuple(labels.shape)}"
            )
        labels = xp.astype(labels, outputs.dtype)
        if not bool(xp.all(xp.isfinite(labels))):
            raise ValueError("labels: contains NaN or inf")
        return labels

    # -- sampling -----------------------------------------------------------
    def noise(self, rng, n: int, n_draws: int, n_outputs: int):
        """NumPy random numbers for ``n`` inputs, input-major (so batching never changes them)."""
        return rng.random((n, n_draws, n_outputs))

    def center(self, v: Array) -> Array:
        """Remove the component of ``v`` (…, C, k) along ``Λ``'s fixed null space."""
        return v

    def centred_sq_norm(self, v: Array) -> Array:
        """``‖P v‖²`` over the outputs (axis −2) of v (…, C, k), P = :meth:`center` (the bounds' norms)."""
        xp = array_namespace(v)
        pv = self.center(v)
        return xp.sum(pv * pv, axis=-2)

    @property
    def first_order_moments_supported(self) -> bool:
        """Whether :meth:`moments` takes ``diag_hess=None`` (first order only) and then gives v2 = c12 = None:
        for the built-in families, unless a subclass overrides their :meth:`moments`."""
        return any(type(self).moments is own for own in _FIRST_ORDER_READY)

    def first_order_moments(self, outputs, jac) -> Moments:
        """:meth:`moments` without Hessian diagonals: v2 and c12 are None (the built-in families skip their work;
        a user's family gets zeros for w and its v2, c12 are dropped)."""
        if self.first_order_moments_supported:
            return self.moments(outputs, jac, None)
        xp = array_namespace(outputs, jac)
        return self.moments(outputs, jac, xp.zeros_like(jac))._replace(v2=None, c12=None)

    def moments_with_norms(self, outputs, jac, diag_hess):
        """``(moments, ‖Pu‖², ‖Pw‖²)``: :meth:`moments` (:meth:`first_order_moments` for ``diag_hess=None``, with
        ``‖Pw‖²`` None) and the bounds' squared norms (:meth:`centred_sq_norm`).  A family may compute the norms
        from its moments' centred columns."""
        if diag_hess is None:
            return self.first_order_moments(outputs, jac), self.centred_sq_norm(jac), None
        return self.moments(outputs, jac, diag_hess), self.centred_sq_norm(jac), self.centred_sq_norm(diag_hess)

    # -- to override --------------------------------------------------------
    def moments(self, outputs, jac, diag_hess) -> Moments:  # pragma: no cover - abstract
        raise NotImplementedError

    def fisher(self, outputs, jac) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def spectrum(self, outputs) -> Spectrum:  # pragma: no cover - abstract
        raise NotImplementedError

    def labels_from_noise(self, outputs, noise) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def score(self, outputs, labels) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_likelihood(self, outputs, labels) -> Array:  # pragma: no cover - abstract
        raise NotImplementedError

    # -- identity: the type and the parameters ------------------------------
    def parameters(self) -> tuple:
        """The family's parameters as sorted ``(name, value)`` pairs (its instance attributes).

        Two families are equal, and hash alike, when they have the same type and the same
        parameters: compiled code (JAX) takes the family as a static argument and is reused
        exactly when these agree, whatever ``repr`` says.
        """
        return tuple(sorted(vars(self).items()))

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in self.parameters())
        return f"{type(self).__name__}({params})"

    def __eq__(self, other) -> bool:
        if type(self) is not type(other):
            return False
        if self is other:
            return True
        try:
            return bool(self.parameters() == other.parameters())
        except (TypeError, ValueError):  # parameters whose == is elementwise (arrays): equal only to itself
            return False

    def __hash__(self) -> int:
        try:
            return hash((type(self), self.parameters()))
        except TypeError:  # unhashable parameters: equal families still hash alike
            return hash(type(self))


def _same_namespace(arr, xp, name):
    from ._validation import check_same_namespace

    check_same_namespace(arr, xp, name)


class Categorical(Family):
    r"""Softmax over logits: ``p = softmax(h)``, ``s = e_y − p``, ``Λ = diag(p) − ppᵀ``.

    Every moment is a moment of the scalar ``u_Y`` under ``Y ~ Cat(p)`` (docs/math.md §3.1):
    with ``ū = Σ_c p_c u_c`` and ``d = u − ū``,

    ``I = Σ p d²``, ``E[(sᵀu)³] = Σ p d³``, ``v1 = Σ p (d² − I)²``,
    ``v2 = Σ p (w − w̄)²``, ``c12 = −Σ p (d² − I)(w − w̄)``.

    Labels are integer class indices of shape (n,).
    """

    name = "categorical"

    def check_outputs(self, n_outputs):
        if n_outputs < 2:
            raise ValueError(
                f"model: the categorical family needs at least 2 outputs (logits), got {n_outputs}; "
                "use family='bernoulli' for a single sigmoid output"
            )

    def check_labels(self, labels, outputs):
        xp = array_namespace(outputs)
        _same_namespace(labels, xp, "labels")
        n, C = outputs.shape
        if tuple(labels.shape) != (n,):
            raise ValueError(f"labels: expected class indices of shape ({n},), got {tuple(labels.shape)}")
        if not xp.isdtype(labels.dtype, "integral"):
            raise TypeError(f"labels: expected an integer array of class indices, got dtype {labels.dtype}")
        if n and (bool(xp.any(labels < 0)) or bool(xp.any(labels >= C))):
            lo, hi = int(xp.min(labels)), int(xp.max(labels))
            raise ValueError(f"labels: class indices must lie in [0, {C}), got {lo}..{hi}")
        return labels

    def noise(self, rng, n, n_draws, n_outputs):
        return rng.random((n, n_draws))

    def center(self, v):
        xp = array_namespace(v)
        return v - xp.mean(v, axis=-2, keepdims=True)

    def centred_sq_norm(self, v):
        """``C · var(v)`` over the classes: the library's variance reduction (centred, no centred copy of v)."""
        xp = array_namespace(v)
        return v.shape[-2] * xp.var(v, axis=-2, correction=0)

    def _onehot(self, labels, C, dtype):
        xp = array_namespace(labels)
        classes = xp.arange(C, device=device(labels))
        return xp.astype(labels[..., None] == classes, dtype)

    def fisher(self, outputs, jac):
        xp = array_namespace(outputs, jac)
        p = softmax(outputs, xp)[:, None, :]
        d = jac - xp.matmul(p, jac)
        return xp.matmul(p, d * d)[:, 0, :]

    def moments(self, outputs, jac, diag_hess):
        return self._moments_and_norms(outputs, jac, diag_hess)[0]

    def moments_with_norms(self, outputs, jac, diag_hess):
        """The moments, and ``‖Pu‖² = Σ_c (u_c − mean u)²`` from the p-centred columns ``d = u − ū``:
        ``Σ d² − (Σ d)²/C``.  Both terms are sums over the classes (products with 1, fast), and nothing
        large cancels: ``(Σ d)²/C ≤ C ‖Pu‖²`` (docs/math.md §4), so the rounding is at most ``(C + 1) ε`` of
        ``‖Pu‖²`` — within the spectrum's own slack.  The same for w.  (A subclass that overrides
        :meth:`moments` gets the default: its own moments, and the norms by :meth:`centred_sq_norm`.)"""
        if type(self).moments is not Categorical.moments:
            return Family.moments_with_norms(self, outputs, jac, diag_hess)
        return self._moments_and_norms(outputs, jac, diag_hess)

    def _moments_and_norms(self, outputs, jac, diag_hess):
        xp = array_namespace(outputs, jac)
        p = softmax(outputs, xp)[:, None, :]  # (n, 1, C): E_Y[x] = p @ x, a matmul per input
        ones = xp.ones_like(p)
        both = xp.concat([p, ones], axis=1)  # (n, 2, C): E_Y[x] and Σ_c x in one product, one pass over x
        C = jac.shape[-2]

        def mean(x):
            return xp.matmul(p, x)

        def moment_and_sq_norm(centred, squares):
            """E_Y of the squares, and ``Σ_c x² − (Σ_c x)²/C`` of the p-centred x, clipped at 0."""
            m = xp.matmul(both, squares)
            s = xp.matmul(ones, centred)[:, 0, :]
            out = m[:, 1, :] - s * s / C
            return m[:, :1, :], xp.maximum(out, xp.zeros_like(out))

        d = jac - mean(jac)
        d2 = d * d
        fisher, pu2 = moment_and_sq_norm(d, d2)
        third = mean(d2 * d)[:, 0, :]
        d2 -= fisher  # e = d² − I, in place of d² (no longer needed)
        e = d2
        first = Moments(fisher=fisher[:, 0, :], third=third, v1=mean(e * e)[:, 0, :], v2=None, c12=None)
        if diag_hess is None:
            return first, pu2, None
        wc = diag_hess - mean(diag_hess)
        v2, pw2 = moment_and_sq_norm(wc, wc * wc)
        return first._replace(v2=v2[:, 0, :], c12=-mean(e * wc)[:, 0, :]), pu2, pw2

    def spectrum(self, outputs):
        xp = array_namespace(outputs)
        n, C = outputs.shape
        e = xp.exp(outputs - xp.max(outputs, axis=-1, keepdims=True))
        z = xp.sum(e, axis=-1, keepdims=True)
        p = e / z
        eye = xp.eye(C, dtype=outputs.dtype, device=device(outputs))
        # Λ_cc = p_c (1 − p_c) with 1 − p_c summed from the other classes, not subtracted from 1
        # (for a confident class p_c rounds to 1 and p_c − p_c² to 0).
        rest = xp.matmul(e, 1.0 - eye) / z
        Lam = -(p[:, :, None] * p[:, None, :]) * (1.0 - eye) + eye * (p * rest)[:, None, :]
        lam = xp.linalg.eigvalsh(Lam)
        # eigvalsh is backward stable: each eigenvalue within ~C ε λ_max (Weyl).  The bounds use
        # the spectrum widened by that much (the variances' own rounding remains: docs/math.md §4).
        slack = (4.0 * C * unit_roundoff(outputs.dtype)) * lam[:, -1]
        # 𝓜 = Σ_c p_c (m_c − m̄)(m_c − m̄)ᵀ with m_c = vec(d_c d_cᵀ), d_c = e_c − p: its
        # nonzero spectrum is that of the C×C Gram matrix G below (docs/math.md §4).
        pp = xp.sum(p * p, axis=-1)[:, None, None]
        K = eye - p[:, :, None] - p[:, None, :] + pp  # K[c, c'] = d_cᵀ d_c'
        K2 = K * K  # ⟨m_c, m_c'⟩
        k = xp.sum(K2 * p[:, None, :], axis=-1)  # ⟨m_c, m̄⟩
        s = xp.sum(k * p, axis=-1)[:, None, None]  # ⟨m̄, m̄⟩
        r = xp.sqrt(p)
        G = r[:, :, None] * r[:, None, :] * (K2 - k[:, :, None] - k[:, None, :] + s)
        m_max = xp.linalg.eigvalsh(G)[:, -1]
        zero = xp.zeros_like(m_max)
        m_max = xp.maximum(m_max, zero) * (1.0 + 4.0 * C * C * unit_roundoff(outputs.dtype))
        # Λ1 = 0 exactly, so on 1⊥ the spectrum is eigs[1:] (ascending order).
        return Spectrum(xp.maximum(lam[:, 1] - slack, zero), lam[:, -1] + slack, zero, m_max)

    def labels_from_noise(self, outputs, noise):
        xp = array_namespace(outputs, noise)
        C = outputs.shape[-1]
        cdf = xp.cumulative_sum(softmax(outputs, xp), axis=-1)  # (n, C)
        # class indices in the library's default integer dtype (int64; int32 in JAX without x64, which would
        # warn about an int64 it cannot hold)
        index = xp.asarray(C - 1, device=device(noise))
        below = xp.astype(cdf[None, :, :] <= xp.permute_dims(noise, (1, 0))[:, :, None], index.dtype)
        return xp.minimum(xp.sum(below, axis=-1, dtype=index.dtype), index)

    def score(self, outputs, labels):
        xp = array_namespace(outputs)
        return self._onehot(labels, outputs.shape[-1], outputs.dtype) - softmax(outputs, xp)

    def log_likelihood(self, outputs, labels):
        xp = array_namespace(outputs)
        onehot = self._onehot(labels, outputs.shape[-1], outputs.dtype)
        return xp.sum(onehot * log_softmax(outputs, xp), axis=-1)


class Gaussian(Family):
    r"""Regression: ``y ~ N(h, σ² I)``, ``s = (y − h)/σ²``, ``Λ = I/σ²``.

    Closed forms (docs/math.md §3.2): ``I = ‖u‖²/σ²``, ``v1 = 2 I²``, ``v2 = ‖w‖²/σ²``,
    ``c12 = 0``.  Labels are real targets of shape (n, C).

    ``variance`` must lie in [1e-100, 1e100], where ``σ⁴`` and ``1/σ⁴`` (the bounds' spectrum)
    are finite in float64; in float32 statistics that overflow are reported by ``analyze``.
    """

    name = "gaussian"

    #: The range of σ² for which σ⁴ and 1/σ⁴ are finite in float64.
    VARIANCE_RANGE = (1e-100, 1e100)

    def __init__(self, variance: float = 1.0):
        try:
            variance = float(variance)
        except (TypeError, ValueError) as e:
            raise TypeError(f"variance: expected a positive number, got {variance!r}") from e
        if not (math.isfinite(variance) and variance > 0):
            raise ValueError(f"variance: must be positive and finite, got {variance}")
        lo, hi = self.VARIANCE_RANGE
        if not lo <= variance <= hi:
            raise ValueError(f"variance: must lie in [{lo:g}, {hi:g}] (so that σ⁴ and 1/σ⁴ are finite), "
                             f"got {variance:g}")
        self.variance = variance

    def noise(self, rng, n, n_draws, n_outputs):
        return rng.standard_normal((n, n_draws, n_outputs))

    def fisher(self, outputs, jac):
        xp = array_namespace(outputs, jac)
        return xp.sum(jac * jac, axis=-2) / self.variance

    def moments(self, outputs, jac, diag_hess):
        xp = array_namespace(outputs, jac)
        fisher = self.fisher(outputs, jac)
        zero = xp.zeros_like(fisher)
        if diag_hess is None:
            return Moments(fisher, zero, 2.0 * fisher * fisher, None, None)
        v2 = xp.sum(diag_hess * diag_hess, axis=-2) / self.variance
        return Moments(fisher, zero, 2.0 * fisher * fisher, v2, zero)

    def spectrum(self, outputs):
        xp = array_namespace(outputs)
        one = xp.ones(outputs.shape[:1], dtype=outputs.dtype, device=device(outputs))
        lam, m = one / self.variance, one * (2.0 / self.variance**2)
        return Spectrum(lam, lam, m, m)

    def labels_from_noise(self, outputs, noise):
        xp = array_namespace(outputs, noise)
        return outputs[None, :, :] + math.sqrt(self.variance) * xp.permute_dims(noise, (1, 0, 2))

    def score(self, outputs, labels):
        return (labels - outputs) / self.variance

    def log_likelihood(self, outputs, labels):
        xp = array_namespace(outputs)
        r = labels - outputs
        C = outputs.shape[-1]
        return -xp.sum(r * r, axis=-1) / (2.0 * self.variance) - 0.5 * C * math.log(2.0 * math.pi * self.variance)


class Bernoulli(Family):
    r"""Independent sigmoid per output (multi-label): ``p = σ(h)``, ``s = y − p``, ``Λ = diag(q)``, ``q = p(1 − p)``.

    ``sᵀu`` is a sum of independent centred terms ``u_c s_c``, so with ``a_c = q_c u_c²``
    (docs/math.md §3.3): ``I = Σ a``, ``E[(sᵀu)³] = Σ u³ q (1 − 2p)``,
    ``v1 = Σ_c u_c⁴ q_c (1 − 2p_c)² + 4 Σ_{c'<c} a_c a_c'`` (every term ≥ 0),
    ``v2 = Σ q w²``, ``c12 = −Σ u² w q (1 − 2p)``.  Labels are 0/1 of shape (n, C).
    """

    name = "bernoulli"

    def check_labels(self, labels, outputs):
        xp = array_namespace(outputs)
        labels = super().check_labels(labels, outputs)
        if not bool(xp.all((labels == 0.0) | (labels == 1.0))):
            raise ValueError("labels: Bernoulli labels must be 0 or 1")
        return labels

    def fisher(self, outputs, jac):
        xp = array_namespace(outputs, jac)
        p, r = sigmoid_pair(outputs, xp)
        return xp.sum((p * r)[:, :, None] * jac * jac, axis=-2)

    def moments(self, outputs, jac, diag_hess):
        xp = array_namespace(outputs, jac)
        p, r = sigmoid_pair(outputs, xp)  # p and 1 − p, both exact for saturated outputs
        q = (p * r)[:, :, None]
        tilt = (r - p)[:, :, None]  # 1 − 2p
        skew = q * tilt  # E[s_c³]
        u2 = jac * jac
        a = q * u2
        before = xp.cumulative_sum(a, axis=-2, include_initial=True)[:, :-1, :]  # Σ_{c'<c} a_c'
        first = Moments(
            fisher=xp.sum(a, axis=-2),
            third=xp.sum(skew * u2 * jac, axis=-2),
            v1=xp.sum(u2 * u2 * q * tilt * tilt + 4.0 * a * before, axis=-2),
            v2=None, c12=None,
        )
        if diag_hess is None:
            return first
        return first._replace(v2=xp.sum(q * diag_hess * diag_hess, axis=-2),
                              c12=-xp.sum(skew * u2 * diag_hess, axis=-2))

    def spectrum(self, outputs):
        xp = array_namespace(outputs)
        p, r = sigmoid_pair(outputs, xp)
        q = p * r
        # 𝓜 on symmetric matrices is block diagonal: q_c(1 − 4 q_c) on the diagonal
        # entries, 2 q_c q_c' on each off-diagonal pair {c, c'}.  1 − 4pq = (p − r)²
        # exactly (p + r = 1), which does not cancel when p ≈ ½.
        diag = q * (p - r) * (p - r)
        q = xp.sort(q, axis=-1)
        m_min, m_max = xp.min(diag, axis=-1), xp.max(diag, axis=-1)
        if outputs.shape[-1] > 1:
            m_min = xp.minimum(m_min, 2.0 * q[:, 0] * q[:, 1])
            m_max = xp.maximum(m_max, 2.0 * q[:, -1] * q[:, -2])
        return Spectrum(q[:, 0], q[:, -1], m_min, m_max)

    def labels_from_noise(self, outputs, noise):
        xp = array_namespace(outputs, noise)
        p = sigmoid(outputs, xp)
        return xp.astype(xp.permute_dims(noise, (1, 0, 2)) < p[None, :, :], outputs.dtype)

    def score(self, outputs, labels):
        xp = array_namespace(outputs)
        return labels - sigmoid(outputs, xp)

    def log_likelihood(self, outputs, labels):
        xp = array_namespace(outputs)
        return xp.sum(labels * outputs - softplus(outputs, xp), axis=-1)


class Positions(Family):
    r"""``base`` at each of ``length`` positions: outputs of shape (T, C), one independent label per position.

    For sequence models (a language model's logits over T tokens): ``log p(y|x) =
    Σ_t log p(y_t|h_t)`` with ``y_t ~ base(h_t)`` independent.  The core sees the outputs
    flattened, (n, T·C) position-major; every statistic is per input sequence
    (docs/math.md §12).  With ``a_t = s_tᵀu_t`` (independent, zero mean, ``E[a_t²] = I_t``):

    ``I = Σ_t I_t``, ``E[(Σa_t)³] = Σ_t E[a_t³]``, ``v1 = Σ_t v1_t + 2 Σ_t I_t (I − I_t)``,
    ``v2 = Σ_t v2_t``, ``c12 = Σ_t c12_t``; Λ is block diagonal, so its spectrum is the union
    of the positions', and 𝓜's extreme eigenvalues are those of the positions' blocks and
    ``2 λ_t λ_r`` (t ≠ r) for the cross terms.

    Labels: (n, T) class indices (categorical) or (n, T, C) targets.  A model whose
    outputs have shape (n, T, C) gets its family wrapped so by every entry point; a mask
    of padding positions is passed to :func:`fishercore.analyze` and
    :func:`fishercore.estimate`, not to the family.
    """

    def __init__(self, base, length: int):
        base = get_family(base)
        if isinstance(base, Positions):
            raise TypeError("base: a Positions family cannot be nested")
        if isinstance(length, bool) or not isinstance(length, int) or length < 1:
            raise ValueError(f"length: expected a positive number of positions, got {length!r}")
        self.base, self.length = base, int(length)
        self.name = base.name

    def parameters(self) -> tuple:
        return (("base", self.base), ("length", self.length))

    def __repr__(self) -> str:
        return f"Positions({self.base!r}, length={self.length})"

    # -- reshaping: (n, T·C, ...) <-> (n·T, C, ...) ----------------------------
    def _split(self, x):
        """(n, T·C, ...) → (n·T, C, ...)."""
        xp = array_namespace(x)
        return xp.reshape(x, (x.shape[0] * self.length, x.shape[1] // self.length, *x.shape[2:]))

    def _per_input(self, x, n):
        """(n·T, ...) → (n, T, ...)."""
        xp = array_namespace(x)
        return xp.reshape(x, (n, self.length, *x.shape[1:]))

    def check_outputs(self, n_outputs):
        if n_outputs % self.length:
            raise ValueError(f"model: {n_outputs} outputs do not split into {self.length} positions")
        self.base.check_outputs(n_outputs // self.length)

    def check_labels(self, labels, outputs):
        xp = array_namespace(outputs)
        _same_namespace(labels, xp, "labels")
        n, T = outputs.shape[0], self.length
        C = outputs.shape[1] // T
        want = (n, T) if self.base.name == "categorical" else (n, T, C)
        if tuple(labels.shape) != want:
            raise ValueError(f"labels: expected one label per position, shape {want}, got {tuple(labels.shape)}")
        flat = xp.reshape(labels, (n * T, *labels.shape[2:]))
        return xp.reshape(self.base.check_labels(flat, self._split(outputs)), labels.shape)

    def noise(self, rng, n, n_draws, n_outputs):
        noise = self.base.noise(rng, n, n_draws * self.length, n_outputs // self.length)
        return noise.reshape(n, n_draws, self.length, *noise.shape[2:])

    def center(self, v):
        xp = array_namespace(v)
        *lead, TC, k = v.shape
        split = xp.reshape(v, (*lead, self.length, TC // self.length, k))
        return xp.reshape(self.base.center(split), v.shape)

    def centred_sq_norm(self, v):
        """Σ_t ‖P_t v_t‖² (each position's block centred on its own)."""
        xp = array_namespace(v)
        *lead, TC, k = v.shape
        split = xp.reshape(v, (*lead, self.length, TC // self.length, k))
        return xp.sum(self.base.centred_sq_norm(split), axis=-2)

    def fisher(self, outputs, jac):
        xp = array_namespace(outputs, jac)
        n = outputs.shape[0]
        return xp.sum(self._per_input(self.base.fisher(self._split(outputs), self._split(jac)), n), axis=1)

    @property
    def first_order_moments_supported(self):
        return self.base.first_order_moments_supported

    def moments(self, outputs, jac, diag_hess):
        return self.moments_with_norms(outputs, jac, diag_hess)[0]

    def moments_with_norms(self, outputs, jac, diag_hess):
        """Each position's moments and norms (the base family's), combined into the sequence's (docs/math.md §12)."""
        return self.complete_moments(self.position_moments(outputs, jac, diag_hess))

    def position_moments(self, outputs, jac, diag_hess) -> PositionMoments:
        """The :class:`PositionMoments` of these ``length`` positions: outputs (n, length·C), jac and diag_hess
        (n, length·C, k) — a whole sequence, or a chunk of its positions (whose sums merge with the others')."""
        xp = array_namespace(outputs, jac)
        n = outputs.shape[0]
        base, pu2, pw2 = self.base.moments_with_norms(
            self._split(outputs), self._split(jac), None if diag_hess is None else self._split(diag_hess))
        m = Moments(*(None if x is None else self._per_input(x, n) for x in base))  # each (n, T, k)
        fisher = xp.sum(m.fisher, axis=1)
        # Σ_{t≠r} I_t I_r = Σ_t I_t (I − I_t), each term ≥ 0 (I − I_t clipped at 0 against rounding)
        rest = xp.maximum(fisher[:, None, :] - m.fisher, xp.zeros_like(m.fisher))
        return PositionMoments(
            fisher, xp.sum(m.third, axis=1), xp.sum(m.v1, axis=1), xp.sum(m.fisher * rest, axis=1),
            None if m.v2 is None else xp.sum(m.v2, axis=1), None if m.c12 is None else xp.sum(m.c12, axis=1),
            xp.sum(self._per_input(pu2, n), axis=1), None if pw2 is None else xp.sum(self._per_input(pw2, n), axis=1))

    @staticmethod
    def merge_moments(a: PositionMoments, b: PositionMoments) -> PositionMoments:
        """The :class:`PositionMoments` of two disjoint sets of positions of the same inputs: sums, and
        ``cross_a + cross_b + 2 I_a I_b`` (every term non-negative, nothing cancels)."""
        def add(x, y):
            return None if x is None else x + y

        return PositionMoments(a.fisher + b.fisher, a.third + b.third, a.v1 + b.v1,
                               a.cross + b.cross + 2.0 * (a.fisher * b.fisher), add(a.v2, b.v2),
                               add(a.c12, b.c12), a.pu2 + b.pu2, add(a.pw2, b.pw2))

    @staticmethod
    def complete_moments(p: PositionMoments):
        """The sequence's :class:`Moments` and norms from the sums over all its positions:
        ``v1 = Σ_t v1_t + 2 Σ_{t≠r} I_t I_r``."""
        return Moments(p.fisher, p.third, p.v1 + 2.0 * p.cross, p.v2, p.c12), p.pu2, p.pw2

    def spectrum(self, outputs, positions=None):
        r"""Extreme eigenvalues of the block-diagonal Λ and of 𝓜 over the positions where ``positions``
        (n, T) is true (all by default): those of each position's blocks, and ``2 λ_t λ_r`` (t ≠ r)."""
        xp = array_namespace(outputs)
        n = outputs.shape[0]
        s = Spectrum(*(self._per_input(x, n) for x in self.base.spectrum(self._split(outputs))))  # (n, T)
        inf = xp.full_like(s.lam_min, float("inf"))  # (n, T)
        zero = xp.zeros_like(s.lam_min)
        keep = None if positions is None else xp.astype(positions, xp.bool)

        def lowest(x):
            return x if keep is None else xp.where(keep, x, inf)

        def highest(x):
            return x if keep is None else xp.where(keep, x, zero)

        lam_min, m_min = lowest(s.lam_min), lowest(s.m_min)
        lam_max, m_max = highest(s.lam_max), highest(s.m_max)
        low, high = xp.min(lam_min, axis=1), xp.max(lam_max, axis=1)
        m_lo, m_hi = xp.min(m_min, axis=1), xp.max(m_max, axis=1)
        if self.length > 1:  # the cross blocks t ≠ r: 2 λ_t λ_r, extremes from the two smallest / largest
            lo2, hi2 = xp.sort(lam_min, axis=1)[:, :2], xp.sort(lam_max, axis=1)[:, -2:]
            pair = xp.isfinite(lo2[:, 1])  # False where fewer than two positions are kept: no cross block
            lo2 = xp.where(xp.isfinite(lo2), lo2, xp.zeros_like(lo2))
            m_lo = xp.where(pair, xp.minimum(m_lo, 2.0 * lo2[:, 0] * lo2[:, 1]), m_lo)
            m_hi = xp.maximum(m_hi, 2.0 * hi2[:, 0] * hi2[:, 1])
        finite = xp.isfinite(low)  # False only where every position is masked: no term, bounds 0
        none = xp.zeros_like(low)
        return Spectrum(xp.where(finite, low, none), high, xp.where(finite, m_lo, none), m_hi)

    def labels_from_noise(self, outputs, noise):
        xp = array_namespace(outputs, noise)
        n, M, T = noise.shape[:3]
        flat = xp.reshape(xp.permute_dims(noise, (0, 2, 1, *range(3, noise.ndim))), (n * T, M, *noise.shape[3:]))
        y = self.base.labels_from_noise(self._split(outputs), flat)  # (M, n·T, ...)
        return xp.reshape(y, (M, n, T, *y.shape[2:]))

    def score(self, outputs, labels):
        xp = array_namespace(outputs)
        lead = labels.shape[:-2] if self.base.name != "categorical" else labels.shape[:-1]
        lead = tuple(lead[:-1])  # the draws axis, if any
        n, T = outputs.shape[0], self.length
        flat = xp.reshape(labels, (*lead, n * T, *labels.shape[len(lead) + 2:]))
        s = self.base.score(self._split(outputs), flat)  # (..., n·T, C)
        return xp.reshape(s, (*lead, n, outputs.shape[1]))

    def log_likelihood(self, outputs, labels):
        xp = array_namespace(outputs)
        n, T = outputs.shape[0], self.length
        flat = xp.reshape(labels, (n * T, *labels.shape[2:]))
        return xp.sum(xp.reshape(self.base.log_likelihood(self._split(outputs), flat), (n, T)), axis=1)


# The built-in families whose own moments() takes diag_hess=None (Family.first_order_moments_supported).
_FIRST_ORDER_READY = (Categorical.moments, Gaussian.moments, Bernoulli.moments)

_BY_NAME = {"categorical": Categorical, "gaussian": Gaussian, "bernoulli": Bernoulli}


def get_family(family) -> Family:
    """Resolve ``"categorical"`` / ``"gaussian"`` / ``"bernoulli"`` or a :class:`Family` instance."""
    if isinstance(family, Family):
        return family
    if isinstance(family, str):
        key = family.strip().lower()
        if key in _BY_NAME:
            return _BY_NAME[key]()
        raise ValueError(f"family: unknown family {family!r}; expected one of {sorted(_BY_NAME)} or a Family instance")
    raise TypeError(f"family: expected a family name or a Family instance, got {type(family).__name__}")
