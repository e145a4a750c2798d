"""Bad input: every entry point × kind of bad argument raises a clear exception naming the argument."""

import numpy as np
import pytest

import fishercore as fc
from fishercore.backends import mlp
from helpers import Problem, assert_raises_named, make_layers, make_problem

GOOD = make_layers("1h")  # 3 -> 6 -> 4
X_GOOD = np.random.default_rng(0).normal(size=(5, 3))


def _with(i, W=None, b=None):
    layers = [list(p) for p in GOOD]
    if W is not None:
        layers[i][0] = W
    if b is not None:
        layers[i][1] = b
    return [tuple(p) for p in layers]


def _nan(a, where=(0, 0)):
    a = a.copy()
    a[where] = np.nan
    return a


MLP_CASES = {
    "empty layers": (lambda: mlp.MLP([]), TypeError, "layers"),
    "array as layers": (lambda: mlp.MLP(GOOD[0][0]), TypeError, "layers"),
    "not a pair": (lambda: mlp.MLP([GOOD[0][0]]), TypeError, "layers[0]"),
    "1-D weight": (lambda: mlp.MLP(_with(0, W=np.ones(3))), ValueError, "layers[0] weight"),
    "integer weight": (lambda: mlp.MLP(_with(0, W=np.ones((6, 3), dtype=int))), TypeError, "layers[0] weight"),
    "list weight": (lambda: mlp.MLP(_with(0, W=[[1.0] * 3] * 6)), TypeError, "layers[0] weight"),
    "chain mismatch": (lambda: mlp.MLP(_with(1, W=np.ones((4, 5)))), ValueError, "layers[1] weight"),
    "bias shape": (lambda: mlp.MLP(_with(0, b=np.ones(5))), ValueError, "layers[0] bias"),
    "NaN weight": (lambda: mlp.MLP(_with(0, W=_nan(GOOD[0][0]))), ValueError, "layers[0] weight"),
    "inf bias": (lambda: mlp.MLP(_with(1, b=np.array([0, np.inf, 0, 0.0]))), ValueError, "layers[1] bias"),
    "mixed dtypes": (lambda: mlp.MLP(_with(1, W=GOOD[1][0].astype(np.float32))), TypeError, "layers[1] weight"),
    "bias dtype": (lambda: mlp.MLP(_with(1, b=GOOD[1][1].astype(np.float32))), TypeError, "layers[1] bias"),
    "unknown activation": (lambda: mlp.MLP(GOOD, "swish"), ValueError, "activation"),
    "activation count": (lambda: mlp.MLP(GOOD, ["tanh", "relu"]), ValueError, "activation"),
    "negative alpha": (lambda: mlp.MLP(GOOD, "elu", alpha=-1.0), ValueError, "alpha"),
    "float16 weights": (lambda: mlp.MLP([(W.astype(np.float16), b.astype(np.float16)) for W, b in GOOD]), TypeError,
                        "layers[0] weight: dtype float16 is not supported"),
    "longdouble weights": (lambda: mlp.MLP([(W.astype(np.longdouble), b.astype(np.longdouble)) for W, b in GOOD]),
                           TypeError, "layers[0] weight: dtype float128 is not supported"),
}

MODEL = mlp.MLP(GOOD, "tanh")
ONE_OUT = mlp.MLP([GOOD[0], (np.ones((1, 6)), np.zeros(1))], "tanh")
HUGE = mlp.MLP([(np.full((6, 3), 1e308), GOOD[0][1]), GOOD[1]], "identity")
RES = fc.analyze(MODEL, X_GOOD)

ENTRY_POINTS = {"analyze": fc.analyze, "estimate": fc.estimate, "sample_labels": fc.sample_labels}

DATA_CASES = {
    "X wrong width": (dict(X=np.ones((5, 4))), ValueError, "X"),
    "X 1-D": (dict(X=np.ones(3)), ValueError, "X"),
    "X 3-D": (dict(X=np.ones((2, 5, 3))), ValueError, "X"),
    "X integer": (dict(X=np.ones((5, 3), dtype=int)), TypeError, "X"),
    "X list": (dict(X=[[0.0] * 3]), TypeError, "X"),
    "X NaN": (dict(X=_nan(X_GOOD)), ValueError, "X"),
    "X inf": (dict(X=X_GOOD * np.array([1, np.inf, 1])), ValueError, "X"),
    "X empty": (dict(X=np.ones((0, 3))), ValueError, "X"),
    "X float32": (dict(X=X_GOOD.astype(np.float32)), TypeError, "X"),
    "family unknown": (dict(family="poisson"), ValueError, "family"),
    "family type": (dict(family=3), TypeError, "family"),
    "categorical, one output": (dict(model=ONE_OUT), ValueError, "model"),
    "not a model": (dict(model=GOOD), TypeError, "model"),
    "batch_size 0": (dict(batch_size=0), ValueError, "batch_size"),
    "batch_size float": (dict(batch_size=2.5), TypeError, "batch_size"),
    "memory_budget 0": (dict(memory_budget=0), ValueError, "memory_budget"),
    "memory_budget NaN": (dict(memory_budget=float("nan")), ValueError, "memory_budget"),
    "memory_budget string": (dict(memory_budget="1GB"), TypeError, "memory_budget"),
    "outputs overflow": (dict(model=HUGE), FloatingPointError, "model"),
}


def _call(entry, **kw):
    args = dict(model=MODEL, X=X_GOOD, family="categorical")
    args.update(kw)
    return ENTRY_POINTS[entry](args.pop("model"), args.pop("X"), args.pop("family"), **args)


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_bad_mlp(case):
    assert_raises_named(*MLP_CASES[case])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy warns of the overflow, then we raise
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("case", list(DATA_CASES))
def test_bad_data_and_options(entry, case):
    kw, exc, name = DATA_CASES[case]
    if entry == "sample_labels" and "memory_budget" in kw:
        pytest.skip("sample_labels computes outputs only; it has no memory_budget")
    assert_raises_named(lambda: _call(entry, **kw), exc, name)


ESTIMATE_CASES = {
    "n_draws 0": (dict(n_draws=0), ValueError, "n_draws"),
    "n_draws float": (dict(n_draws=1.5), TypeError, "n_draws"),
    "n_draws bool": (dict(n_draws=True), TypeError, "n_draws"),
    "estimator": (dict(estimator="i3"), ValueError, "estimator"),
    "seed": (dict(seed="abc"), TypeError, "seed"),
    "seed -1": (dict(seed=-1), ValueError, "seed: must be a non-negative integer"),
    "labels shape": (dict(labels=np.zeros(4, dtype=int)), ValueError, "labels"),
    "labels float for categorical": (dict(labels=np.zeros(5)), TypeError, "labels"),
    "labels out of range": (dict(labels=np.array([0, 1, 2, 3, 4])), ValueError, "labels"),
    "labels negative": (dict(labels=np.array([0, 1, -1, 3, 0])), ValueError, "labels"),
    "labels with n_draws": (dict(labels=np.zeros(5, dtype=int), n_draws=2), ValueError, "n_draws"),
    "bernoulli label 0.5": (dict(family="bernoulli", labels=np.full((5, 4), 0.5)), ValueError, "labels"),
    "gaussian labels NaN": (dict(family="gaussian", labels=_nan(np.zeros((5, 4)))), ValueError, "labels"),
    "gaussian labels shape": (dict(family="gaussian", labels=np.zeros((5, 3))), ValueError, "labels"),
}


@pytest.mark.parametrize("case", list(ESTIMATE_CASES))
def test_bad_estimate_arguments(case):
    kw, exc, name = ESTIMATE_CASES[case]
    assert_raises_named(lambda: _call("estimate", **kw), exc, name)


RESULT_CASES = {
    "variance estimator": (lambda: RES.variance("i3"), ValueError, "estimator"),
    "variance n_draws": (lambda: RES.variance("i1", n_draws=0), ValueError, "n_draws"),
    "variance n_inputs": (lambda: RES.variance("i1", n_inputs=0), ValueError, "n_inputs"),
    "sample_size rel_error": (lambda: RES.sample_size("i1", rel_error=0), ValueError, "rel_error"),
    "sample_size confidence": (lambda: RES.sample_size("i1", confidence=1.0), ValueError, "confidence"),
    "sample_size n_draws": (lambda: RES.sample_size("i1", n_draws=-2), ValueError, "n_draws"),
    "merge other model": (lambda: RES.merge(fc.analyze(*make_problem(Problem("2h", "tanh", "categorical")))),
                          ValueError, "other"),
    "gaussian variance 0": (lambda: fc.Gaussian(variance=0), ValueError, "variance"),
    "gaussian variance -1": (lambda: fc.Gaussian(variance=-1.0), ValueError, "variance"),
    "gaussian variance nan": (lambda: fc.Gaussian(variance=float("nan")), ValueError, "variance"),
    "gaussian variance str": (lambda: fc.Gaussian(variance="big"), TypeError, "variance"),
    "gaussian variance 1e-320": (lambda: fc.Gaussian(variance=1e-320), ValueError, "variance: must lie in"),
    "gaussian variance 1e300": (lambda: fc.Gaussian(variance=1e300), ValueError, "variance: must lie in"),
}


H, U = np.zeros((5, 4)), np.ones((5, 4, 2))
MOM = fc.get_family("categorical").moments(H, U, U)
SPECTRUM = fc.get_family("categorical").spectrum(H)
N2 = np.ones((5, 2))
FUNCTION_CASES = {
    "fisher_stats outputs 1-D": (lambda: fc.fisher_stats(np.zeros(4), U, U, "categorical"), ValueError, "outputs"),
    "fisher_stats outputs list": (lambda: fc.fisher_stats([[0.0] * 4], U, U, "categorical"), TypeError, "outputs"),
    "fisher_stats jac 2-D": (lambda: fc.fisher_stats(H, U[..., 0], U, "categorical"), ValueError, "jac"),
    "fisher_stats jac rows": (lambda: fc.fisher_stats(H, U[:3], U[:3], "categorical"), ValueError, "jac"),
    "fisher_stats diag_hess shape": (lambda: fc.fisher_stats(H, U, U[..., :1], "categorical"), ValueError,
                                     "diag_hess"),
    "fisher_stats jac integer": (lambda: fc.fisher_stats(H, U.astype(int), U, "categorical"), TypeError, "jac"),
    "fisher_stats dtypes": (lambda: fc.fisher_stats(H, U.astype(np.float32), U, "categorical"), TypeError, "jac"),
    "fisher_stats jac NaN": (lambda: fc.fisher_stats(H, _nan(U, (0, 0, 0)), U, "categorical"), ValueError, "jac"),
    "fisher_stats outputs inf": (lambda: fc.fisher_stats(H + np.inf, U, U, "categorical"), ValueError, "outputs"),
    "fisher_stats family": (lambda: fc.fisher_stats(H, U, U, "poisson"), ValueError, "family"),
    "fisher_stats one logit": (lambda: fc.fisher_stats(H[:, :1], U[:, :1], U[:, :1], "categorical"), ValueError,
                               "model"),
    "variance_bounds moments": (lambda: fc.variance_bounds(3, SPECTRUM, N2, N2), TypeError, "moments"),
    "variance_bounds spectrum": (lambda: fc.variance_bounds(MOM, (1, 2, 3, 4), N2, N2), TypeError, "spectrum"),
    "variance_bounds norms shape": (lambda: fc.variance_bounds(MOM, SPECTRUM, N2, N2[:, :1]), ValueError,
                                    "hess_sq_norm"),
    "variance_bounds norms 1-D": (lambda: fc.variance_bounds(MOM, SPECTRUM, N2[0], N2), ValueError, "jac_sq_norm"),
    "variance_bounds spectrum rows": (lambda: fc.variance_bounds(MOM, fc.Spectrum(*(a[:2] for a in SPECTRUM)), N2,
                                                                 N2),
                                      ValueError, "spectrum"),
    "unflatten length": (lambda: RES.unflatten(np.zeros(3)), ValueError, "values"),
    "unflatten 2-D": (lambda: RES.unflatten(np.zeros((2, 3))), ValueError, "values"),
    "unflatten list": (lambda: RES.unflatten([0.0]), TypeError, "values"),
    "save unwritable": (lambda: RES.save("/nonexistent-folder/x.npz"), ValueError, "path"),
    "load missing": (lambda: fc.load_analysis("/nonexistent-folder/x.npz"), ValueError, "path"),
    "load not an analysis": (lambda: fc.load_analysis(__file__), ValueError, "path"),
}


@pytest.mark.parametrize("case", list(FUNCTION_CASES))
def test_bad_function_arguments(case):
    assert_raises_named(*FUNCTION_CASES[case])


@pytest.mark.parametrize("case", list(RESULT_CASES))
def test_bad_result_and_family_arguments(case):
    assert_raises_named(*RESULT_CASES[case])


def test_mixed_array_libraries(backend):
    if backend.name == "numpy":
        pytest.skip("needs a second array library")
    layers = make_layers("1h")
    with pytest.raises(TypeError, match=r"^layers\[0\] bias"):
        mlp.MLP([(backend.asarray(layers[0][0]), layers[0][1]), layers[1]])
    model = mlp.MLP([(backend.asarray(W), backend.asarray(b)) for W, b in layers])
    with pytest.raises(TypeError, match="^X: array library"):
        fc.analyze(model, X_GOOD)
    with pytest.raises(TypeError, match="^labels"):
        fc.estimate(model, backend.asarray(X_GOOD), labels=np.zeros(5, dtype=int))
    # analyses of different libraries do not merge, in either order
    theirs = fc.analyze(model, backend.asarray(X_GOOD))
    assert_raises_named(lambda: RES.merge(theirs), TypeError, "other: its sums are")
    assert_raises_named(lambda: theirs.merge(RES), TypeError, "other: its sums are")


@pytest.mark.parametrize("variance", fc.Gaussian.VARIANCE_RANGE)
def test_gaussian_variance_at_the_ends_of_its_range_computes(variance):
    """σ² = 1e-100 and 1e100: every field and sample size finite in float64, v1 = 2 I² still exact."""
    res = fc.analyze(MODEL, X_GOOD, fc.Gaussian(variance=variance))
    for f in ("fisher", "v1", "v2", "v1_lower", "v1_upper", "v2_lower", "v2_upper", "var_x"):
        assert np.all(np.isfinite(getattr(res, f))), f
    np.testing.assert_allclose(res.v1, 2 * (res.var_x + res.fisher**2), rtol=1e-12)
    assert np.all(np.isfinite(res.sample_size("i1")))


def test_half_precision_frameworks_are_refused_when_the_model_is_built(backend):
    """float16 (and bfloat16 where the library has it) on every backend: refused up front, not deep in a solver."""
    xp = backend.xp
    if hasattr(xp, "float16"):  # array_api_strict has no half precision
        layers = [(xp.astype(backend.asarray(W), xp.float16), xp.astype(backend.asarray(b), xp.float16))
                  for W, b in GOOD]
        assert_raises_named(lambda: mlp.MLP(layers), TypeError, "layers[0] weight: dtype")
    if backend.name.startswith("torch"):
        import torch

        from fishercore.backends import torch as fc_torch

        for dt in (torch.float16, torch.bfloat16):
            net = torch.nn.Sequential(torch.nn.Linear(3, 2)).to(dt)
            assert_raises_named(lambda net=net: fc_torch.from_sequential(net), TypeError, "module: dtype")
    if backend.name.startswith("jax"):
        import jax.numpy as jnp

        from fishercore.backends import jax as fc_jax

        for dt in (jnp.float16, jnp.bfloat16):
            pairs = [(jnp.ones((2, 3), dt), jnp.ones(2, dt))]
            assert_raises_named(lambda pairs=pairs: fc_jax.from_mlp(pairs), TypeError, "params: dtype")
