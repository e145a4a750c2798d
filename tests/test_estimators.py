"""estimate(): unbiasedness and spread by Monte Carlo, single draws against finite differences of ℓ."""

import numpy as np
import pytest
from array_api_compat import array_namespace, device

import fishercore as fc
from helpers import BATCH, FAMILIES, N_INPUTS, Problem, family_obj, make_problem, richardson_derivatives


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("activation", ["tanh", "relu", "softplus"])
@pytest.mark.parametrize("estimator", ["i1", "i2"])
def test_single_draw_equals_derivatives_of_sampled_loglik(estimator, activation, family):
    """One draw of Î1 = (∂ℓ/∂θ_i)², of Î2 = −∂²ℓ/∂θ_i², at the sampled label, by finite differences of ℓ."""
    fam = family_obj(family)
    model, X = make_problem(Problem("2h", activation, family, n=2, seed=5))
    est = fc.estimate(model, X, fam, estimator=estimator, n_draws=1, seed=11)
    y = fc.sample_labels(model, X, fam, n_draws=1, seed=11)[0]
    theta = model.flat_parameters()
    want = np.zeros_like(est)
    for x in range(X.shape[0]):
        def loglik(t, x=x):
            return fam.log_likelihood(model.with_parameters(t).outputs(X[x:x + 1]), y[x:x + 1])[0]
        for i in range(theta.size):
            g1, g2 = richardson_derivatives(loglik, theta, i, eps=1e-3)
            want[i] += (g1 * g1 if estimator == "i1" else -g2) / X.shape[0]
    np.testing.assert_allclose(est, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("estimator", ["i1", "i2", "optimal"])
def test_unbiased_and_variance_by_monte_carlo(estimator, family):
    """Over K seeds: mean → fisher within 5 standard errors; sample variance → variance() within
    5 standard errors of a sample variance (√(2/(K−1)) relative, the estimates being sums of many draws).
    "optimal" (α* Î1 + (1 − α*) Î2 on the same draws) has variance(\"optimal\"), below both."""
    fam = family_obj(family)
    model, X = make_problem(Problem("2h", "tanh", family, n=20, seed=2))
    res = fc.analyze(model, X, fam)
    K, M = 400, 3
    kw = {"analysis": res} if estimator == "optimal" else {}
    draws = np.stack([fc.estimate(model, X, fam, estimator=estimator, n_draws=M, seed=k, **kw) for k in range(K)])
    var = res.variance(estimator, n_draws=M)
    exact = var == 0
    se = np.sqrt(var[~exact] / K)
    z = (draws.mean(0)[~exact] - res.fisher[~exact]) / se
    assert np.max(np.abs(z)) < 5, np.max(np.abs(z))
    np.testing.assert_allclose(draws[:, exact], np.broadcast_to(res.fisher[exact], draws[:, exact].shape),
                               rtol=1e-12, atol=1e-15)  # v = 0: every draw is exact
    ratio = draws.var(0, ddof=1)[~exact] / var[~exact]
    assert np.max(np.abs(ratio - 1)) < 5 * np.sqrt(2 / (K - 1)), np.max(np.abs(ratio - 1))


def test_last_layer_single_draw_of_i2_is_exact():
    model, X = make_problem(Problem("3h", "sigmoid", "categorical"))
    res = fc.analyze(model, X)
    est = fc.estimate(model, X, estimator="i2", seed=3)
    for name in ("6.weight", "6.bias"):
        np.testing.assert_allclose(res.unflatten(est)[name], res.unflatten(res.fisher)[name], rtol=1e-13)


def test_same_seed_same_estimate_any_batch_size():
    model, X = make_problem(Problem("2h", "gelu", "bernoulli", n=23))
    a = fc.estimate(model, X, "bernoulli", n_draws=4, seed=7, batch_size=5)
    b = fc.estimate(model, X, "bernoulli", n_draws=4, seed=7, batch_size=100)
    np.testing.assert_allclose(a, b, rtol=1e-13)
    assert not np.allclose(a, fc.estimate(model, X, "bernoulli", n_draws=4, seed=8))
    rng_a = fc.estimate(model, X, "bernoulli", seed=np.random.default_rng(1))
    np.testing.assert_array_equal(rng_a, fc.estimate(model, X, "bernoulli", seed=1))


@pytest.mark.parametrize("family", FAMILIES)
def test_empirical_fisher_with_observed_labels(family):
    fam = family_obj(family)
    model, X = make_problem(Problem("1h", "tanh", family, n=6))
    y = fc.sample_labels(model, X, fam, seed=4)[0]
    np.testing.assert_allclose(fc.estimate(model, X, fam, labels=y), fc.estimate(model, X, fam, seed=4), rtol=1e-13)
    np.testing.assert_allclose(fc.estimate(model, X, fam, estimator="i2", labels=y),
                               fc.estimate(model, X, fam, estimator="i2", seed=4), rtol=1e-13)


@pytest.mark.parametrize("family", FAMILIES)
def test_estimates_on_every_backend(backend, family):
    """Same seed → same labels → same estimate on every array library; arrays in = arrays out."""
    p = Problem("2h", "softplus", family, n=N_INPUTS)
    ref_i1 = fc.estimate(*make_problem(p), family_obj(family), n_draws=3, seed=5, batch_size=BATCH)
    ref_i2 = fc.estimate(*make_problem(p), family_obj(family), estimator="i2", n_draws=3, seed=5)  # one batch
    model, X = make_problem(p, backend)
    i1 = fc.estimate(model, X, family_obj(family), n_draws=3, seed=5, batch_size=BATCH)
    i2 = fc.estimate(model, X, family_obj(family), estimator="i2", n_draws=3, seed=5, batch_size=BATCH)
    for got, ref in ((i1, ref_i1), (i2, ref_i2)):
        assert array_namespace(got) is backend.xp and got.dtype == X.dtype and device(got) == device(X)
        np.testing.assert_allclose(backend.to_numpy(got), ref, rtol=1e-10, atol=1e-14)
    labels = fc.sample_labels(model, X, family_obj(family), n_draws=2, seed=1)
    assert array_namespace(labels) is backend.xp
    assert tuple(labels.shape) == ((2, N_INPUTS) if family == "categorical" else (2, N_INPUTS, 3))


@pytest.mark.parametrize("estimator", ["i1", "i2"])
def test_column_path_estimates_equal_dense_path(estimator):
    from helpers import AsColumns

    model, X = make_problem(Problem("3h", "elu", "categorical", n=13))
    a = fc.estimate(model, X, estimator=estimator, n_draws=2, seed=3, batch_size=4)
    b = fc.estimate(AsColumns(model), X, estimator=estimator, n_draws=2, seed=3, batch_size=6)
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-15 * np.abs(b).max())


def test_optimal_mixes_the_same_draws_and_auto_takes_each_groups_choice():
    """estimate("optimal") = α* Î1 + (1 − α*) Î2 with both on the same labels (same seed); estimate("auto") is, per
    group, the estimate of the estimator choose() picks; choose() weighs variances by costs."""
    model, X = make_problem(Problem("2h", "tanh", "categorical", n=12, seed=4))
    res = fc.analyze(model, X)
    i1, i2 = (fc.estimate(model, X, estimator=e, seed=7) for e in ("i1", "i2"))
    a = res.alpha()
    np.testing.assert_allclose(fc.estimate(model, X, estimator="optimal", seed=7, analysis=res), a * i1 + (1 - a) * i2,
                               rtol=1e-12, atol=1e-15)
    # analysed on the fly when no analysis is given: the same α*
    np.testing.assert_allclose(fc.estimate(model, X, estimator="optimal", seed=7), a * i1 + (1 - a) * i2,
                               rtol=1e-12, atol=1e-15)
    expensive = res.choose({"i1": 1.0, "i2": 1e9, "optimal": 1e9})  # Î1 unless Î2 is exact (no cost beats 0)
    assert expensive == {g.name: "i2" if not np.any(res.v2[g.offset:g.offset + g.size]) else "i1" for g in res.groups}
    assert set(expensive.values()) == {"i1", "i2"}
    equal = res.choose()
    assert equal["4.weight"] == "i2" and equal["0.weight"] == "optimal"  # v2 = 0 ties go to the cheaper Î2
    costs = {"i1": 1.0, "i2": 3.0, "optimal": 3.5}
    choice = res.choose(costs)
    auto = res.unflatten(fc.estimate(model, X, estimator="auto", seed=7, analysis=res, costs=costs))
    by = {"i1": res.unflatten(i1), "i2": res.unflatten(i2), "optimal": res.unflatten(a * i1 + (1 - a) * i2)}
    for g in res.groups:
        np.testing.assert_allclose(auto[g.name], by[choice[g.name]][g.name], rtol=1e-12, atol=1e-15)
        sl = slice(g.offset, g.offset + g.size)
        pos = res.fisher[sl] > 0
        score = {e: costs[e] * np.sum(v[sl][pos] / res.fisher[sl][pos] ** 2)
                 for e, v in (("i1", res.v1), ("i2", res.v2), ("optimal", res.optimal_v()))}
        assert score[choice[g.name]] == min(score.values())
    costs = fc.draw_costs(model, X, n_inputs=8, repeat=1)
    assert set(costs) == {"i1", "i2", "optimal"} and all(c > 0 for c in costs.values())


@pytest.mark.parametrize("kw,exc,msg", [
    ({"estimator": "auto", "labels": np.zeros(12, dtype=int)}, ValueError, "labels: estimator='auto'"),
    ({"estimator": "optimal", "analysis": "res"}, TypeError, "analysis: expected a fishercore.FisherAnalysis"),
    ({"estimator": "auto", "costs": {"i1": 1.0}}, ValueError, "costs: expected a cost for each"),
    ({"estimator": "best"}, ValueError, "estimator: expected one of"),
])
def test_optimal_and_auto_refuse_bad_arguments(kw, exc, msg):
    from helpers import assert_raises_named

    model, X = make_problem(Problem("2h", "tanh", "categorical", n=12, seed=4))
    assert_raises_named(lambda: fc.estimate(model, X, **kw), exc, msg)


def test_plan_meets_the_coverage_per_group_and_counts_zero_fisher_apart():
    """plan(): per group the coverage quantile of the per-parameter draws (draws_per_input) of the cheapest estimator,
    F = 0 counted apart; n_draws scales as 1/n_inputs; an estimate with the plan's draws and estimators meets the
    error for at least the coverage of the parameters (Monte Carlo over seeds)."""
    model, X = make_problem(Problem("2h", "tanh", "categorical", n=20, seed=2))
    X = np.concatenate([X, np.zeros((1, X.shape[1]))])[:, :]  # an input of zeros: F = 0 for no weight still
    X[:, 0] = 0.0  # the first feature never on: its weights have F = 0
    res = fc.analyze(model, X)
    plan = res.plan(rel_error=0.2, confidence=0.9, coverage=0.8)
    F = res.fisher
    for row in plan:
        g = next(g for g in res.groups if g.name == row.group)
        sl = slice(g.offset, g.offset + g.size)
        pos = F[sl] > 0
        assert (row.positive, row.zero) == (int(pos.sum()), int((~pos).sum()))
        need = res.draws_per_input(row.estimator, 0.2, 0.9)[sl][pos]
        assert row.meets == np.mean(need <= row.n_draws) >= 0.8
        assert np.mean(need <= row.n_draws - 1) < 0.8 or row.n_draws == 1  # the least such number
        others = [e for e in ("i1", "i2", "optimal") if e != row.estimator]
        for e in others:  # no other estimator is cheaper (equal costs: fewer draws)
            assert np.quantile(res.draws_per_input(e, 0.2, 0.9)[sl][pos], 0.8, method="higher") >= row.n_draws
    assert plan[0].zero > 0 and "F = 0" in str(plan) and "one call: estimate" in str(plan)
    assert plan.n_draws == max(r.n_draws for r in plan) and plan.total_draws == X.shape[0] * plan.n_draws
    bigger = res.plan(rel_error=0.2, confidence=0.9, coverage=0.8, n_inputs=10 * X.shape[0])
    assert all(b.n_draws <= max(1, -(-a.n_draws // 10) + 1) for a, b in zip(plan, bigger))
    K, pos = 60, F > 0
    within = [np.mean(np.abs(fc.estimate(model, X, estimator=plan.estimators, n_draws=plan.n_draws, seed=k,
                                         analysis=res) - F)[pos] <= 0.2 * F[pos]) for k in range(K)]
    assert np.mean(within) >= 0.8


@pytest.mark.parametrize("kw,msg", [
    ({"coverage": 1.5}, "coverage:"), ({"rel_error": 0.0}, "rel_error:"), ({"costs": {"i1": 1.0}}, "costs:"),
    ({"n_inputs": 0}, "n_inputs:"),
])
def test_plan_refuses_bad_arguments(kw, msg):
    from helpers import assert_raises_named

    model, X = make_problem(Problem("2h", "tanh", "categorical", n=8, seed=2))
    res = fc.analyze(model, X)
    assert_raises_named(lambda: res.plan(**kw), ValueError, msg)
