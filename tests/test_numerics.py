"""Numerics under stress: confident networks, saturated units, float32.

References are independent of the code under test: per-input moments recomputed with
Python's ``decimal`` at 60 digits from the same outputs and derivatives (so rounding in
the softmax or sigmoid cannot hide), exact zeros the math predicts, and the float64 run
for float32.

Stated float32 tolerance (moderately confident nets, logits up to ±8): every field within
1e-4 of its float64 value (the cross-backend float32 tolerance; 4e-6 measured), relative to
the field's largest magnitude in the group (a lower bound: relative to its upper bound's,
since the spectrum's smallest eigenvalue carries the absolute rounding of the largest);
bounds hold up to 1e-5 of the upper bound.
"""

import decimal
from decimal import Decimal

import numpy as np
import pytest

import fishercore as fc
from fishercore.backends import mlp
from helpers import FIELDS

decimal.getcontext().prec = 60


def _decimal_moments(h, u, w, family):
    """I, v1, v2, c12 for one input and one parameter column, in 60-digit decimal arithmetic.

    Enumerates the labels: categorical y ∈ {0..C−1} with p = softmax(h); Bernoulli, each of C
    outputs independent with p_c = σ(h_c) (a sum of independent per-output terms).
    """
    h = [Decimal(float(x)) for x in h]
    u = [Decimal(float(x)) for x in u]
    w = [Decimal(float(x)) for x in w]
    if family == "categorical":
        m = max(h)
        e = [(x - m).exp() for x in h]
        z = sum(e)
        p = [x / z for x in e]
        ubar = sum(pi * ui for pi, ui in zip(p, u))
        wbar = sum(pi * wi for pi, wi in zip(p, w))
        d = [ui - ubar for ui in u]
        fisher = sum(pi * di * di for pi, di in zip(p, d))
        v1 = sum(pi * (di * di - fisher) ** 2 for pi, di in zip(p, d))
        v2 = sum(pi * (wi - wbar) ** 2 for pi, wi in zip(p, w))
        c12 = -sum(pi * (di * di - fisher) * (wi - wbar) for pi, di, wi in zip(p, d, w))
        return fisher, v1, v2, c12
    # Bernoulli: s_c = y_c − p_c, independent outputs; sᵀu = Σ_c (y_c − p_c) u_c
    p = [1 / (1 + (-x).exp()) for x in h]
    q = [1 / (1 + x.exp()) for x in h]  # 1 − p without cancellation
    var = [pi * qi for pi, qi in zip(p, q)]
    fisher = sum(vi * ui * ui for vi, ui in zip(var, u))
    # fourth central moment of a Bernoulli: pq(1 − 3pq); Var((sᵀu)²) = E(sᵀu)⁴ − I²
    m4 = sum(vi * (1 - 3 * vi) * ui ** 4 for vi, ui in zip(var, u)) + 3 * fisher ** 2 - 3 * sum(
        (vi * ui * ui) ** 2 for vi, ui in zip(var, u))
    v1 = m4 - fisher ** 2
    v2 = sum(vi * wi * wi for vi, wi in zip(var, w))
    # Cov((sᵀu)², sᵀw) = Σ_c E[s_c³] u_c² w_c, E[s³] = pq(q − p)
    c12 = -sum(vi * (qi - pi) * ui * ui * wi for vi, pi, qi, ui, wi in zip(var, p, q, u, w))
    return fisher, v1, v2, c12


def _check_against_decimal(h, jac, hess, family, rtol):
    stats = fc.fisher_stats(h, jac, hess, family)
    n, C, k = jac.shape
    for i in range(n):
        for j in range(k):
            ref = _decimal_moments(h[i], jac[i, :, j], hess[i, :, j], family)
            for name, r in zip(("fisher", "v1", "v2", "c12"), ref):
                got = Decimal(float(getattr(stats, name)[i, j]))
                scale = abs(r) if name != "c12" else max(abs(r), (ref[1] * ref[2]).sqrt())
                assert abs(got - r) <= Decimal(rtol) * scale, (name, i, j, float(got), float(r))
            # the relative quantities people use: v/I², finite and correct
            if ref[0] > 0:
                rel = Decimal(float(stats.v1[i, j])) / Decimal(float(stats.fisher[i, j])) ** 2
                assert abs(rel - ref[1] / ref[0] ** 2) <= Decimal(10 * rtol) * (ref[1] / ref[0] ** 2)
    for name in FIELDS[:4] + FIELDS[5:]:
        assert np.all(np.isfinite(getattr(stats, name))), name
    assert np.all(stats.v1 >= 0) and np.all(stats.v2 >= 0)
    return stats


@pytest.mark.parametrize("scale", [10.0, 30.0, 50.0])
def test_near_one_hot_softmax_matches_60_digit_arithmetic(scale):
    """Logits ±scale: p of the losing classes down to e^-100 ≈ 4e-44; I and v shrink accordingly."""
    rng = np.random.default_rng(1)
    C, n, k = 4, 3, 5
    h = np.stack([np.array([scale, -scale, 0.3 * scale, -0.7 * scale])[rng.permutation(C)] for _ in range(n)])
    jac, hess = rng.normal(size=(n, C, k)), rng.normal(size=(n, C, k))
    stats = _check_against_decimal(h, jac, hess, "categorical", rtol=1e-9)
    assert np.min(stats.fisher) < np.exp(-0.29 * scale)  # the regime is really reached


@pytest.mark.parametrize("scale", [5.0, 20.0, 40.0])
def test_saturated_bernoulli_matches_60_digit_arithmetic(scale):
    """σ(±40): p(1 − p) ≈ 4e-18, computed without forming 1 − p."""
    rng = np.random.default_rng(2)
    C, n, k = 3, 2, 4
    h = scale * np.sign(rng.normal(size=(n, C)))
    jac, hess = rng.normal(size=(n, C, k)), rng.normal(size=(n, C, k))
    _check_against_decimal(h, jac, hess, "bernoulli", rtol=1e-9)


def _confident_net(act, logit_scale, hidden_scale=1.0, seed=0, dtype=np.float64):
    rng = np.random.default_rng(seed)
    W1 = hidden_scale * rng.normal(size=(12, 6))
    W2 = rng.normal(size=(12, 12)) / np.sqrt(12)
    W3 = rng.normal(size=(4, 12))
    X = rng.normal(size=(40, 6))
    h = mlp.MLP([(W1, np.zeros(12)), (W2, np.zeros(12)), (W3, np.zeros(4))], act).outputs(X)
    W3 = W3 / np.abs(h).max()  # logits within ±1 ...
    b3 = np.array([1.0, -1.0, -0.5, 0.0]) * logit_scale  # ... plus a margin: every input confidently class 0
    layers = [(W1, np.zeros(12)), (W2, np.zeros(12)), (W3, b3)]
    return mlp.MLP([(W.astype(dtype), b.astype(dtype)) for W, b in layers], act), X.astype(dtype)


@pytest.mark.parametrize("act,logit_scale,hidden_scale", [("tanh", 50.0, 1.0), ("sigmoid", 20.0, 40.0),
                                                          ("relu", 50.0, 1.0)])
def test_confident_and_saturated_networks_stay_exact(act, logit_scale, hidden_scale):
    """Logits ±50 and sigmoids saturated at ±40 pre-activation: finite, ordered, exact zeros kept."""
    model, X = _confident_net(act, logit_scale, hidden_scale)
    res = fc.analyze(model, X, batch_size=7)
    fields = {f: np.asarray(getattr(res, f)) for f in FIELDS}
    for f, v in fields.items():
        assert np.all(np.isfinite(v)) and np.all(v >= 0 if f != "c12" else True), f
    assert np.all(fields["v1_lower"] <= fields["v1"] * (1 + 1e-9) + 1e-300)
    assert np.all(fields["v1"] <= fields["v1_upper"] * (1 + 1e-9) + 1e-300)
    assert np.all(fields["v2_lower"] <= fields["v2"] * (1 + 1e-9) + 1e-300)
    assert np.all(fields["v2"] <= fields["v2_upper"] * (1 + 1e-9) + 1e-300)
    groups = res.unflatten(res.v2)
    assert np.all(groups["4.weight"] == 0) and np.all(groups["4.bias"] == 0)  # last layer: Î2 exact
    if act == "relu":
        assert np.all(fields["v2"] == 0)  # piecewise linear: exactly zero everywhere
    # relative quantities: finite sample sizes wherever the Fisher is positive
    for est in ("i1", "i2"):
        size = np.asarray(res.sample_size(est))
        pos = fields["fisher"] > 0
        assert np.all(np.isfinite(size[pos])), est
    assert np.min(fields["fisher"][fields["fisher"] > 0]) < 1e-15  # the regime is really reached


def test_float32_follows_float64_within_the_stated_tolerance():
    model64, X64 = _confident_net("tanh", 8.0)
    model32, X32 = _confident_net("tanh", 8.0, dtype=np.float32)
    r64, r32 = fc.analyze(model64, X64, batch_size=9), fc.analyze(model32, X32, batch_size=9)
    worst = 0.0
    for f in FIELDS:
        a, b = np.asarray(getattr(r32, f), dtype=np.float64), np.asarray(getattr(r64, f))
        assert getattr(r32, f).dtype == np.float32
        for g in r64.groups:
            sl = slice(g.offset, g.offset + g.size)
            # a lower bound's error is set by the spectrum's largest eigenvalue (eigvalsh's absolute
            # rounding), so it is measured on the scale of the matching upper bound
            ref = np.asarray(getattr(r64, f.replace("lower", "upper"))) if f.endswith("lower") else b
            scale = np.abs(ref[sl]).max()
            if scale > 0:
                worst = max(worst, np.abs(a[sl] - b[sl]).max() / scale)
                assert np.abs(a[sl] - b[sl]).max() <= 1e-4 * scale, (f, g.name)
            else:
                assert np.all(a[sl] == 0), (f, g.name)
    for lo, v, hi in (("v1_lower", "v1", "v1_upper"), ("v2_lower", "v2", "v2_upper")):
        lo, v, hi = (np.asarray(getattr(r32, x), dtype=np.float64) for x in (lo, v, hi))
        assert np.all(lo <= v + 1e-5 * hi) and np.all(v <= hi * (1 + 1e-5))
    print(f"largest float32-vs-float64 deviation: {worst:.2e}")


def test_centred_moments_never_go_negative_in_float32():
    """Inputs that barely vary: Σ I² − n Ī² would cancel to noise (and below zero); the centred sums do not."""
    rng = np.random.default_rng(3)
    layers = [(rng.normal(size=(8, 5)).astype(np.float32), np.zeros(8, np.float32)),
              (rng.normal(size=(3, 8)).astype(np.float32), np.zeros(3, np.float32))]
    X = (1000.0 + 1e-3 * rng.normal(size=(64, 5))).astype(np.float32) / 1000.0
    res = fc.analyze(mlp.MLP(layers, "tanh"), X, batch_size=5)
    for f in ("var_x", "v1", "v2", "v1_lower", "v2_lower"):
        assert np.all(np.asarray(getattr(res, f)) >= 0), f
    assert np.all(np.asarray(res.sums.fisher_m2) >= 0)


@pytest.mark.parametrize("dtype,fisher,v1,v2,c12", [
    (np.float32, 1e-4, 1.0, 1e-9, 0.0),  # v1/v2 far above 1/ε: v1 − (v1 − c12)²/den rounds to 0
    (np.float32, 1e-4, 1.0, 1e-9, 2e-5),
    (np.float32, 1e-4, 1e-9, 1.0, -2e-5),
    (np.float64, 1e-8, 1.0, 1e-17, 0.0),
    (np.float64, 1e-8, 2.0, 3.0, 2.4),  # strongly correlated: Î1 − Î2 barely varies
    (np.float64, 1.0, 2.0, 2.0, 2.0),  # Î1 = Î2 draw by draw (den = 0)
])
def test_optimal_variance_does_not_cancel(dtype, fisher, v1, v2, c12):
    """The least-variance mix, against exact rational arithmetic on the same (rounded) inputs."""
    from fractions import Fraction

    groups = fc.make_groups([("w", (1,))])
    arr = {k: np.array([x], dtype=dtype) for k, x in
           (("fisher", fisher), ("v1", v1), ("v2", v2), ("c12", c12), ("zero", 0.0))}
    sums = fc.FisherSums(arr["fisher"], arr["zero"], arr["v1"], arr["v2"], arr["c12"], *(arr["zero"],) * 4)
    res = fc.FisherAnalysis(sums, 1, groups, fc.get_family("categorical"))
    V1, V2, C = (Fraction(float(arr[k][0])) for k in ("v1", "v2", "c12"))
    den = V1 + V2 - 2 * C
    exact = min(V1, V2) if den == 0 else (V1 * V2 - C * C) / den
    got = float(res.optimal_v()[0])
    assert abs(Fraction(got) - exact) <= Fraction(8 * float(np.finfo(dtype).eps)) * exact, (got, float(exact))
    assert got <= min(float(V1), float(V2))
    # and so the sample size for the mix is never above the better estimator's
    opt, i1, i2 = (float(res.sample_size(e)[0]) for e in ("optimal", "i1", "i2"))
    assert opt <= min(i1, i2)
    if float(exact) > 0:
        want = np.ceil(float(exact) / (0.05 * 0.01 * fisher ** 2))
        assert abs(opt - want) <= 1 + 1e-5 * want, (opt, want)
