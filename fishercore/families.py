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

__all__ = ["Bernoulli", "Categorical", "Family", "Gaussian", "Moments", "Spectrum", "get_family"]


class Moments(NamedTuple):
    """Exact per-input statistics of one output distribution."""

    fisher: Array  # (n, k)  I = uᵀΛu
    third: Array  # (n, k)   E[(sᵀu)³]
    v1: Array  # (n, k)      Var((sᵀu)²), single-draw variance of Î1
    v2: Array  # (n, k)      wᵀΛw, single-draw variance of Î2
    c12: Array  # (n, k)     Cov(Î1, Î2) for one draw = −E[(sᵀu)²(sᵀw)]


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
    try:
        other = array_namespace(arr)
    except TypeError as e:
        raise TypeError(f"{name}: expected an array of the model's array library, got {type(arr).__name__}") from e
    if other is not xp:
        raise TypeError(f"{name}: array library {other.__name__} differs from the model's ({xp.__name__})")


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
        xp = array_namespace(outputs, jac, diag_hess)
        p = softmax(outputs, xp)[:, None, :]  # (n, 1, C): E_Y[x] = p @ x, a matmul per input

        def mean(x):
            return xp.matmul(p, x)

        d = jac - mean(jac)
        d2 = d * d
        fisher = mean(d2)
        e = d2 - fisher
        wc = diag_hess - mean(diag_hess)
        return Moments(
            fisher=fisher[:, 0, :],
            third=mean(d2 * d)[:, 0, :],
            v1=mean(e * e)[:, 0, :],
            v2=mean(wc * wc)[:, 0, :],
            c12=-mean(e * wc)[:, 0, :],
        )

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
        below = xp.astype(cdf[None, :, :] <= xp.permute_dims(noise, (1, 0))[:, :, None], xp.int64)
        return xp.minimum(xp.sum(below, axis=-1), xp.asarray(C - 1, dtype=xp.int64, device=device(noise)))

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
        xp = array_namespace(outputs, jac, diag_hess)
        fisher = self.fisher(outputs, jac)
        zero = xp.zeros_like(fisher)
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
        xp = array_namespace(outputs, jac, diag_hess)
        p, r = sigmoid_pair(outputs, xp)  # p and 1 − p, both exact for saturated outputs
        q = (p * r)[:, :, None]
        tilt = (r - p)[:, :, None]  # 1 − 2p
        skew = q * tilt  # E[s_c³]
        u2 = jac * jac
        a = q * u2
        before = xp.cumulative_sum(a, axis=-2, include_initial=True)[:, :-1, :]  # Σ_{c'<c} a_c'
        return Moments(
            fisher=xp.sum(a, axis=-2),
            third=xp.sum(skew * u2 * jac, axis=-2),
            v1=xp.sum(u2 * u2 * q * tilt * tilt + 4.0 * a * before, axis=-2),
            v2=xp.sum(q * diag_hess * diag_hess, axis=-2),
            c12=-xp.sum(skew * u2 * diag_hess, axis=-2),
        )

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
