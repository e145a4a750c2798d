"""Families: closed forms against enumeration of the label space, golden values, spectra, sampler."""

import numpy as np
import pytest

import fishercore as fc
from helpers import brute_M_spectrum, brute_moments, family_obj, label_space

RNG = np.random.default_rng(1234)
CASES = [(name, C, k) for name in ("categorical", "bernoulli") for C in (1, 2, 3, 5) for k in range(3)
         if not (name == "categorical" and C == 1)]


def test_golden_categorical():
    # docs/math.md §7, fact 7: p = (0.7, 0.2, 0.1), u = (1, 0, −1), w = (0.5, −0.5, 2).
    h = np.log(np.array([[0.7, 0.2, 0.1]]))
    u = np.array([1.0, 0.0, -1.0]).reshape(1, 3, 1)
    w = np.array([0.5, -0.5, 2.0]).reshape(1, 3, 1)
    s = fc.fisher_stats(h, u, w, "categorical")
    np.testing.assert_allclose([s.fisher[0, 0], s.v1[0, 0], s.v2[0, 0], s.c12[0, 0]],
                               [0.44, 0.5056, 0.4225, -0.334], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("name,C,k", CASES, ids=[f"{n}-C{C}-{k}" for n, C, k in CASES])
def test_moments_match_enumeration(name, C, k):
    family = fc.get_family(name)
    rng = np.random.default_rng(100 * C + k)
    h = rng.normal(size=(1, C)) * 2
    u = rng.normal(size=(1, C, 4))
    w = rng.normal(size=(1, C, 4))
    m = family.moments(h, u, w)
    for j in range(4):
        want = brute_moments(family, h[0], u[0, :, j], w[0, :, j])
        got = [m.fisher[0, j], m.third[0, j], m.v1[0, j], m.v2[0, j], m.c12[0, j]]
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(family.fisher(h, u), m.fisher, rtol=1e-14)


@pytest.mark.parametrize("name,C,k", CASES, ids=[f"{n}-C{C}-{k}" for n, C, k in CASES])
def test_spectrum_matches_enumeration(name, C, k):
    family = fc.get_family(name)
    h = np.random.default_rng(7 * C + k).normal(size=(1, C)) * 2
    space = label_space(family, h[0])
    Lam = sum(p * np.outer(s, s) for p, s in space)
    spec = family.spectrum(h)
    if name == "categorical":
        ev = np.linalg.eigvalsh(Lam)[1:]  # on 1⊥
    else:
        ev = np.linalg.eigvalsh(Lam)
    np.testing.assert_allclose([spec.lam_min[0], spec.lam_max[0]], [ev.min(), ev.max()], rtol=1e-12, atol=1e-14)
    m_min, m_max = brute_M_spectrum(family, h[0])
    np.testing.assert_allclose(spec.m_max[0], m_max, rtol=1e-10, atol=1e-14)
    if name == "bernoulli":
        np.testing.assert_allclose(spec.m_min[0], m_min, rtol=1e-10, atol=1e-14)
    else:
        assert spec.m_min[0] == 0.0 and m_min >= -1e-12


def test_gaussian_closed_forms():
    g = fc.Gaussian(variance=0.3)
    u, w = RNG.normal(size=(2, 4, 5)), RNG.normal(size=(2, 4, 5))
    m = g.moments(RNG.normal(size=(2, 4)), u, w)
    I = (u**2).sum(1) / 0.3
    np.testing.assert_allclose(m.fisher, I, rtol=1e-14)
    np.testing.assert_allclose(m.v1, 2 * I**2, rtol=1e-14)  # E[X⁴] = 3σ⁴ for X ~ N(0, σ²)
    np.testing.assert_allclose(m.v2, (w**2).sum(1) / 0.3, rtol=1e-14)
    assert np.all(m.c12 == 0) and np.all(m.third == 0)
    spec = g.spectrum(np.zeros((2, 4)))
    np.testing.assert_allclose(spec.m_max, 2 / 0.09)
    np.testing.assert_allclose(spec.lam_min, 1 / 0.3)


@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli"])
def test_score_and_output_fisher_are_derivatives_of_loglik(name):
    """s = ∂ℓ/∂h and −∂²ℓ/∂h² = Λ (independent of y), by finite differences of ℓ."""
    family = family_obj(name)
    C = 3
    h = RNG.normal(size=(1, C))
    rng = np.random.default_rng(5)
    y = family.labels_from_noise(h, family.noise(rng, 1, 1, C))[0]  # one label for one input
    eps = 1e-5
    grad, hess = np.zeros(C), np.zeros((C, C))
    for a in range(C):
        e = np.eye(C)[a] * eps
        grad[a] = (family.log_likelihood(h + e, y) - family.log_likelihood(h - e, y))[0] / (2 * eps)
    np.testing.assert_allclose(family.score(h, y)[0], grad, rtol=1e-8, atol=1e-9)
    eps = 1e-4
    for a in range(C):
        for b in range(C):
            ea, eb = np.eye(C)[a] * eps, np.eye(C)[b] * eps
            f = lambda d: family.log_likelihood(h + d, y)[0]  # noqa: E731
            hess[a, b] = (f(ea + eb) - f(ea - eb) - f(eb - ea) + f(-ea - eb)) / (4 * eps * eps)
    u = np.eye(C)[None]  # I(e_a) = Λ_aa; and Λ from the moments with u = basis vectors
    lam_diag = family.fisher(h, u)[0]
    np.testing.assert_allclose(-np.diag(hess), lam_diag, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("name", ["categorical", "bernoulli"])
def test_loglik_normalised(name):
    family = fc.get_family(name)
    h = RNG.normal(size=(1, 3))
    if name == "categorical":
        total = sum(np.exp(family.log_likelihood(h, np.array([[c]]))[0, 0]) for c in range(3))
    else:
        import itertools

        total = sum(np.exp(family.log_likelihood(h, np.array([[y]], dtype=float))[0, 0])
                    for y in itertools.product((0, 1), repeat=3))
    assert abs(total - 1) < 1e-13


def test_softmax_shift_changes_nothing():
    # docs/math.md §7, fact 6: adding c·1 to u or w changes nothing — statistics and bounds alike.
    h = RNG.normal(size=(3, 4))
    u, w = RNG.normal(size=(3, 4, 6)), RNG.normal(size=(3, 4, 6))
    base = fc.fisher_stats(h, u, w, "categorical")
    shifted = fc.fisher_stats(h, u + 2.5, w - 7.0, "categorical")
    for a, b in zip(base, shifted):
        np.testing.assert_allclose(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.parametrize("name", ["categorical", "gaussian", "bernoulli"])
def test_sampler_frequencies(name):
    """Empirical label moments match the model's p (5 standard errors)."""
    family = family_obj(name)
    h = np.array([[0.3, -1.0, 1.2]])
    M = 40000
    y = family.labels_from_noise(h, family.noise(np.random.default_rng(0), 1, M, 3))
    if name == "categorical":
        p = np.exp(h[0]) / np.exp(h[0]).sum()
        freq = np.bincount(y[:, 0], minlength=3) / M
        se = np.sqrt(p * (1 - p) / M)
        assert np.all(np.abs(freq - p) < 5 * se)
    elif name == "bernoulli":
        p = 1 / (1 + np.exp(-h[0]))
        assert np.all(np.abs(y[:, 0].mean(0) - p) < 5 * np.sqrt(p * (1 - p) / M))
    else:
        r = y[:, 0] - h[0]
        assert np.all(np.abs(r.mean(0)) < 5 * np.sqrt(0.7 / M))
        assert np.all(np.abs(r.var(0) - 0.7) < 5 * 0.7 * np.sqrt(2 / M))


def test_family_resolution_and_repr():
    assert isinstance(fc.get_family("Categorical"), fc.Categorical)
    assert fc.get_family("gaussian") == fc.Gaussian(variance=1.0)
    assert fc.Gaussian(variance=2.0) != fc.Gaussian(variance=1.0)
    assert repr(fc.Gaussian(variance=2.0)) == "Gaussian(variance=2.0)"
