"""The JAX adapter against JAX's own autodiff of the sampled log-likelihood, layouts, and refusals."""

import subprocess
import sys

import numpy as np
import pytest

import fishercore as fc
from helpers import assert_raises_named, family_obj, make_layers, require_framework

pytestmark = pytest.mark.backends("jax")
jax = require_framework("jax")
import jax.numpy as jnp  # noqa: E402
from jax.flatten_util import ravel_pytree  # noqa: E402

from fishercore.backends import jax as fc_jax  # noqa: E402


@pytest.fixture(autouse=True)
def _x64(jax_x64):
    """Every test here runs with float64 enabled, switched on by the fixture (never at import)."""


def _pairs(arch="2h", seed=0):
    return [(jnp.asarray(W), jnp.asarray(b)) for W, b in make_layers(arch, seed)]


def _loglik(family, h, y):
    """ℓ written with jax's own functions (not fishercore's)."""
    if family.name == "categorical":
        return jax.nn.log_softmax(h)[y]
    if family.name == "gaussian":
        return jnp.sum(jax.scipy.stats.norm.logpdf(y, h, jnp.sqrt(family.variance)))
    return jnp.sum(y * jax.nn.log_sigmoid(h) + (1 - y) * jax.nn.log_sigmoid(-h))


@pytest.mark.parametrize("family", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
def test_single_draw_equals_jax_autodiff(family, activation):
    """Î1 (one draw) = (jax.grad ℓ)², Î2 (one draw) = −diag jax.hessian ℓ, averaged over inputs."""
    fam = family_obj(family)
    params = _pairs("1h", seed=3)
    X = jnp.asarray(np.random.default_rng(1).normal(size=(3, 3)))
    model = fc_jax.from_mlp(params, activation)
    y = fc.sample_labels(model, X, fam, seed=2)[0]
    flat, unravel = ravel_pytree(params)
    apply = fc_jax.mlp_apply(activation)

    def ll(theta, x, yi):
        return _loglik(fam, apply(unravel(theta), x[None])[0], yi)

    per_input = jax.jit(jax.vmap(lambda x, yi: (jax.grad(ll)(flat, x, yi), jnp.diag(jax.hessian(ll)(flat, x, yi)))))
    g, H = per_input(X, y)  # one compiled program, rather than every primitive of the eager hessian
    for est, want in (("i1", jnp.mean(g**2, 0)), ("i2", -jnp.mean(H, 0))):
        got = fc.estimate(model, X, fam, estimator=est, seed=2)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-10, atol=1e-13)


def test_flax_layout_is_the_transposed_pair_layout():
    pairs = _pairs("3h", seed=4)
    flax = [{"kernel": W.T, "bias": b} for W, b in pairs]
    X = jnp.asarray(np.random.default_rng(0).normal(size=(9, 3)))
    a = fc.analyze(fc_jax.from_mlp(pairs, "sigmoid"), X, "bernoulli", batch_size=4)
    b = fc.analyze(fc_jax.from_mlp(flax, "sigmoid"), X, "bernoulli", batch_size=4)
    assert [g.name for g in a.groups][:2] == ["0.0", "0.1"]
    assert [(g.name, g.shape) for g in b.groups][:2] == [("0.bias", (4,)), ("0.kernel", (3, 4))]
    for f in ("fisher", "v1", "v2", "var_x", "v1_upper"):
        ga, gb = a.unflatten(getattr(a, f)), b.unflatten(getattr(b, f))
        for i in range(4):
            np.testing.assert_allclose(gb[f"{i}.kernel"], ga[f"{i}.0"].T, rtol=1e-12, atol=1e-300)
            np.testing.assert_allclose(gb[f"{i}.bias"], ga[f"{i}.1"], rtol=1e-12, atol=1e-300)


def test_from_function_equals_from_mlp_with_dict_params():
    pairs = _pairs("2h", seed=5)
    params = {"hidden": [{"w": W, "b": b} for W, b in pairs[:-1]], "head": {"w": pairs[-1][0], "b": pairs[-1][1]}}

    def apply(p, x):
        a = x
        for layer in p["hidden"]:
            a = jnp.tanh(a @ layer["w"].T + layer["b"])
        return a @ p["head"]["w"].T + p["head"]["b"]

    X = jnp.asarray(np.random.default_rng(2).normal(size=(7, 4)))
    fn = fc_jax.from_function(apply, params, chunk=9, input_shape=(4,))
    assert [g.name for g in fn.groups] == ["head.b", "head.w", "hidden.0.b", "hidden.0.w", "hidden.1.b", "hidden.1.w"]
    a, b = fc.analyze(fn, X, batch_size=3), fc.analyze(fc_jax.from_mlp(pairs, "tanh"), X)
    ga, gb = a.unflatten(a.v2), b.unflatten(b.v2)
    np.testing.assert_allclose(ga["hidden.0.w"], gb["0.0"], rtol=1e-10)
    np.testing.assert_allclose(ga["head.b"], gb["2.1"], atol=0)


def test_import_flips_no_global_switch(tmp_path):
    code = "import jax, fishercore.backends.jax; print(jax.config.jax_enable_x64)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path)
    assert out.stdout.strip() == "False"


def test_default_float32_mode_estimates_without_warnings(tmp_path):
    """In JAX's default mode (no x64) labels are int32, the default integer: sampling and both estimators run
    with warnings as errors (an explicit int64 used to warn twice per call)."""
    code = ("import warnings; warnings.simplefilter('error')\n"
            "import jax.numpy as jnp, fishercore as fc\n"
            "from fishercore.backends import jax as fc_jax\n"
            "layers = [(jnp.ones((4, 3)) / 3, jnp.zeros(4)), (jnp.ones((3, 4)) / 4, jnp.zeros(3))]\n"
            "m = fc_jax.from_mlp(layers, 'tanh')\n"
            "X = jnp.linspace(-1, 1, 15).reshape(5, 3)\n"
            "for est in ('i1', 'i2'): fc.estimate(m, X, estimator=est, n_draws=3, seed=0)\n"
            "print(fc.sample_labels(m, X, n_draws=2, seed=0).dtype)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and out.stdout.strip() == "int32", out.stderr[-2000:]


def test_float32_params():
    params = [(jnp.asarray(W, dtype=jnp.float32), jnp.asarray(b, dtype=jnp.float32)) for W, b in make_layers("1h")]
    res = fc.analyze(fc_jax.from_mlp(params, "tanh"), jnp.ones((4, 3), dtype=jnp.float32))
    assert res.fisher.dtype == jnp.float32


REFUSALS = {
    "empty": (lambda: fc_jax.from_mlp([]), TypeError, "params"),
    "unknown activation": (lambda: fc_jax.from_mlp(_pairs(), "swish"), ValueError, "activation"),
    "chain mismatch": (lambda: fc_jax.from_mlp([_pairs()[0], _pairs()[0]]), ValueError, "params[1]"),
    "kernel rank": (lambda: fc_jax.from_mlp([{"kernel": jnp.ones(3), "bias": jnp.ones(3)}]), ValueError, "params[0]"),
    "extra keys": (lambda: fc_jax.from_mlp([{"kernel": jnp.ones((3, 2)), "scale": jnp.ones(2)}]), ValueError,
                   "params[0]"),
    "numpy leaf": (lambda: fc_jax.from_mlp([(np.ones((2, 3)), np.ones(2))]), TypeError, "params: leaf '0.0'"),
    "integer leaf": (lambda: fc_jax.from_mlp([(jnp.ones((2, 3), dtype=jnp.int32), jnp.ones(2))]), TypeError,
                     "params: leaf '0.0'"),
    "NaN leaf": (lambda: fc_jax.from_mlp([(jnp.full((2, 3), jnp.nan), jnp.ones(2))]), ValueError, "params: leaf"),
    "max_params 0": (lambda: fc_jax.from_function(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, input_shape=(3,),
                                                  max_params=0), ValueError, "max_params: must be at least 1"),
    "not callable": (lambda: fc_jax.from_function(None, {"w": jnp.zeros(2)}), TypeError, "apply_fn"),
    "chunk 0": (lambda: fc_jax.from_function(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}, input_shape=(3,),
                                             chunk=0), ValueError, "chunk: must be at least 1"),
    "no input_shape": (lambda: fc_jax.from_function(lambda p, x: x @ p["w"], {"w": jnp.ones((3, 2))}), TypeError,
                       "input_shape: from_function needs"),
    "negative_slope nan": (lambda: fc_jax.from_mlp(_pairs(), "leaky_relu", negative_slope=float("nan")), ValueError,
                           "negative_slope"),
    "devices not devices": (lambda: fc_jax.analyze_sharded(fc_jax.from_mlp(_pairs()), jnp.ones((4, 4)),
                                                           devices=["x"]), TypeError, "devices: expected jax devices"),
    "outputs of rank 4": (lambda: fc_jax.from_function(lambda p, x: (x @ p["w"])[:, :, None, None],
                                                       {"w": jnp.ones((3, 2))}, input_shape=(3,)),
                          ValueError, "apply_fn: must return outputs of shape (n, C), or (n, T, C)"),
    "outputs of rank 1": (lambda: fc_jax.from_function(lambda p, x: (x @ p["w"])[:, 0], {"w": jnp.ones((3, 2))},
                                                       input_shape=(3,)),
                          ValueError, "apply_fn: must return outputs of shape (n, C), or (n, T, C)"),
    "ids without n_tokens": (lambda: fc_jax.from_function(lambda p, x: p["E"][x].sum(1), {"E": jnp.ones((4, 2))},
                                                          input_shape=(3,), input_dtype=jnp.int32),
                             TypeError, "n_tokens: an integer input_dtype needs n_tokens"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case):
    assert_raises_named(*REFUSALS[case])


@pytest.mark.parametrize("make,exc,msg", [
    (lambda: np.zeros((4, 3)), TypeError, "X: array library array_api_compat.numpy differs from the model's"),
    (lambda: jnp.zeros((4, 3), dtype=jnp.float32), TypeError, "X: dtype float32 differs"),
    (lambda: jnp.zeros((4, 5)), ValueError, "X: expected inputs of shape (n, 3)"),
    (lambda: jnp.zeros((4, 3), dtype=jnp.int32), TypeError, "X: expected a real floating"),
], ids=["numpy", "float32", "width", "integer"])
def test_bad_inputs(make, exc, msg):
    X = make()  # made inside the test, after the fixture enabled float64
    assert_raises_named(lambda: fc.analyze(fc_jax.from_mlp(_pairs("1h"), "tanh"), X), exc, msg)


def _linearity_cases():
    import jax
    import jax.numpy as jnp

    def dense(p, x):
        return x @ p["W"] + p["b"]

    def relu_pool(p, x):  # ReLU, max pooling, a residual sum: piecewise linear in every single parameter
        a = jax.nn.relu(dense(p["l1"], x))
        a = jnp.maximum(a[:, 0::2], a[:, 1::2]) + a[:, :3]
        return dense(p["l2"], jnp.abs(a) - jnp.minimum(a, 0.5))

    def relu_conv_pool(p, x):  # a 1-D convolution, ReLU, max, min and average pooling (reduce_window_*)
        z = jax.lax.conv_general_dilated(x[:, None, :], p["conv"], (1,), "SAME") + p["cb"][None, :, None]
        a = jax.lax.reduce_window(jax.nn.relu(z), -jnp.inf, jax.lax.max, (1, 1, 2), (1, 1, 1), "VALID")
        a = a - jax.lax.reduce_window(a, jnp.inf, jax.lax.min, (1, 1, 2), (1, 1, 1), "SAME")
        a = jax.lax.reduce_window(a, 0.0, jax.lax.add, (1, 1, 2), (1, 1, 1), "SAME") / 2
        return dense(p["l2"], a.reshape(a.shape[0], -1))

    def smooth(act):
        return lambda p, x: dense(p["l2"], act(dense(p["l1"], x)))

    def layernorm(p, x):
        z = dense(p["l1"], x)
        z = (z - z.mean(-1, keepdims=True)) / jnp.sqrt(z.var(-1, keepdims=True) + 1e-5)
        return dense(p["l2"], z * p["g"] + p["beta"])

    def attention(p, x):
        q, k, v = (x @ p[n] for n in ("q", "k", "v"))
        a = jax.nn.softmax(q[:, :, None] * k[:, None, :], axis=-1)
        return jnp.einsum("nij,nj->ni", a, v)[:, :3] @ p["o"]

    def square(p, x):  # W enters twice: curved in W though every primitive is bilinear
        return ((x @ p["W"]) @ p["W"].T)[:, :2] + (x / p["s"])[:, :2]

    rng = np.random.default_rng(0)

    def arr(*shape):
        return jnp.asarray(rng.normal(size=shape))

    layer = lambda i, o: {"W": arr(i, o), "b": arr(o)}  # noqa: E731
    two = {"l1": layer(3, 6), "l2": layer(6, 2)}
    return {  # name: (fn, params, input width, leaves that must be taken as curved)
        "relu-pool": (relu_pool, {"l1": layer(3, 6), "l2": layer(3, 2)}, 3, set()),
        "relu-conv-pool": (relu_conv_pool, {"conv": arr(2, 1, 2), "cb": arr(2), "l2": layer(4, 2)}, 3, set()),
        "tanh": (smooth(jnp.tanh), two, 3, {"l1.W", "l1.b"}),
        "gelu": (smooth(jax.nn.gelu), two, 3, {"l1.W", "l1.b"}),
        "silu": (smooth(jax.nn.silu), two, 3, {"l1.W", "l1.b"}),
        "softplus": (smooth(jax.nn.softplus), two, 3, {"l1.W", "l1.b"}),
        "layernorm": (layernorm, {**two, "g": arr(6), "beta": arr(6)}, 3, {"l1.W", "l1.b"}),
        "attention": (attention, {n: arr(3, 3) for n in ("q", "k", "v")} | {"o": arr(3, 2)}, 3, {"q", "k"}),
        "square": (square, {"W": arr(3, 3), "s": arr(3)}, 3, {"W", "s"}),
    }


def _hessian_diagonals(fn, leaves, treedef, i, X):
    """∂²h/∂θ² along every coordinate of leaf i, per input and output, by jax.hessian: (n, C, size)."""
    import jax
    import jax.numpy as jnp

    def h(v, x):
        ls = list(leaves)
        ls[i] = v.reshape(leaves[i].shape)
        return fn(jax.tree_util.tree_unflatten(treedef, ls), x[None])[0]

    H = jax.jit(jax.vmap(lambda x: jax.hessian(h)(leaves[i].reshape(-1), x)))(X)  # (n, C, p, p)
    return np.asarray(jnp.diagonal(H, axis1=-2, axis2=-1))


def test_piecewise_linear_groups_read_off_the_jaxpr_are_exact_and_never_smooth(jax_x64):
    """A group taken as piecewise linear has every Hessian diagonal exactly 0 (brute force, jax.hessian), and every
    group of a ReLU network of convolutions and max/min/average pooling is taken so; every parameter behind tanh,
    GELU, SiLU, softplus, LayerNorm's normalisation, softmax attention or a square is taken as curved; linear
    groups get exact second order at any size (here max_params=1)."""
    import jax
    import jax.numpy as jnp

    X = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)))
    for name, (fn, params, width, must_curve) in _linearity_cases().items():
        model = fc_jax.from_function(fn, params, input_shape=(width,), max_params=1)
        linear = set(model.linear_groups)
        assert not (linear & must_curve), (name, linear & must_curve)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        names = [g.name for g in model.groups]
        for i in range(len(leaves)):
            diag = _hessian_diagonals(fn, leaves, treedef, i, X)
            if names[i] in linear:
                assert np.all(diag == 0), (name, names[i])
            elif names[i] in must_curve:
                assert np.abs(diag).max() > 1e-8, (name, names[i], "taken as curved but is it?")
        if name == "relu-conv-pool":
            assert linear == set(names), "ReLU, a convolution and pooling: piecewise linear in every parameter"
        if name not in ("relu-pool", "layernorm"):  # the analysis of a linear and a mixed case
            continue
        res = fc.analyze(model, X, "gaussian")
        assert set(res.first_order_only) == set(names) - linear - set(model.rule_groups)
        for g in res.groups:
            if g.name in linear:
                sl = slice(g.offset, g.offset + g.size)
                assert np.all(np.asarray(res.v2)[sl] == 0) and np.all(np.asarray(res.c12)[sl] == 0)


def test_from_mlp_takes_flax_params_variables_and_nnx_state(jax_x64):
    """Flax containers as they come: linen variables ({"params": ...}) and params dicts, an NNX state; activations as
    jax functions. Every field equals from_function on the same module (1e-10); the layer order comes from the
    kernels' shapes (linen numbers Dense_0 as the outer layer of Dense(3)(tanh(Dense(8)(x))))."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from flax import nnx

    X = jax.random.normal(jax.random.key(1), (12, 4), dtype=jnp.float64)

    class Linen(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, param_dtype=jnp.float64)(jnp.tanh(nn.Dense(8, param_dtype=jnp.float64)(x)))

    net = Linen()
    variables = net.init(jax.random.key(0), X[:1])
    ref = fc.analyze(fc_jax.from_function(lambda p, x: net.apply({"params": p}, x), variables["params"],
                                          input_shape=(4,)), X)
    for params, act in ((variables, jnp.tanh), (variables["params"], "tanh"), (variables["params"], jax.nn.tanh)):
        res = fc.analyze(fc_jax.from_mlp(params, act), X)
        assert [g.name for g in res.groups] == [g.name for g in ref.groups]
        for f in ("fisher", "v1", "v2", "c12", "var_x"):
            np.testing.assert_allclose(getattr(res, f), getattr(ref, f), rtol=1e-10, atol=1e-14, err_msg=f)

    class NNX(nnx.Module):
        def __init__(self, rngs):
            self.hidden = nnx.Linear(4, 8, rngs=rngs, param_dtype=jnp.float64)
            self.out = nnx.Linear(8, 3, rngs=rngs, param_dtype=jnp.float64)

        def __call__(self, x):
            return self.out(jax.nn.relu(self.hidden(x)))

    model = NNX(nnx.Rngs(0))
    graph, state = nnx.split(model, nnx.Param)
    ref = fc.analyze(fc_jax.from_function(lambda s, x: nnx.merge(graph, s)(x), state, input_shape=(4,)), X)
    res = fc.analyze(fc_jax.from_mlp(nnx.state(model, nnx.Param), jax.nn.relu), X)
    assert [g.name for g in res.groups] == ["hidden.bias", "hidden.kernel", "out.bias", "out.kernel"]
    np.testing.assert_allclose(res.fisher, ref.fisher, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("params,activation,exc,msg", [
    ("linen", "swish", ValueError, "activation: unknown activation 'swish'"),
    ("linen", "callable", ValueError, "activation: 'silu' is not one of the known functions"),
    ("stats", "tanh", ValueError, "params: the variables hold the collections ['batch_stats']"),
    ("broken", "tanh", ValueError, "params: the layers ['a', 'b'] with kernels [(4, 3), (5, 2)] do not form"),
    (3, "tanh", TypeError, "params: expected a list of (W, b) pairs"),
])
def test_from_mlp_refuses_what_it_cannot_take(params, activation, exc, msg, jax_x64):
    import jax
    import jax.numpy as jnp

    layer = {"kernel": jnp.ones((4, 4)), "bias": jnp.zeros(4)}
    given = {"linen": {"params": {"Dense_0": layer, "Dense_1": layer}}, "stats": {"params": {"Dense_0": layer},
                                                                "batch_stats": {"bn": {"mean": jnp.zeros(4)}}},
             "broken": {"a": {"kernel": jnp.ones((4, 3))}, "b": {"kernel": jnp.ones((5, 2))}}}.get(params, params)
    act = jax.nn.silu if activation == "callable" else activation
    assert_raises_named(lambda: fc_jax.from_mlp(given, act), exc, msg)


def test_pooling_written_out_has_the_values_and_derivatives_of_jax_pooling(jax_x64):
    """backends/_jax_pooling.py (used on GPUs in float64, where JAX's forward rule for max pooling rounds to 20
    mantissa bits): on the CPU, where JAX's rule is exact, the written-out max and min pooling — padding, strides,
    window and base dilation, inside jit — give the same values and forward-over-forward derivatives (1e-14)."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    from fishercore.backends._jax_pooling import _pools, exact_pooling

    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 6, 3)))
    pools = {
        "max-pad-stride": lambda a: lax.reduce_window(a, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1),
                                                      ((0, 0), (1, 0), (0, 1), (0, 0))),
        "min-same": lambda a: lax.reduce_window(a, jnp.inf, lax.min, (1, 3, 3, 1), (1, 1, 2, 1), "SAME"),
        "max-dilated": lambda a: jax.jit(lambda b: lax.reduce_window(
            b, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 1, 2, 1), ((0, 0), (1, 1), (0, 2), (0, 0)),
            base_dilation=(1, 2, 1, 1), window_dilation=(1, 1, 2, 1)))(a),
    }
    for name, pool in pools.items():
        def f(p, x, pool=pool):
            return jnp.tanh(pool(jnp.sin(p * x))).sum(axis=(1, 2))

        g = exact_pooling(f)
        assert _pools(jax.make_jaxpr(f)(0.7, x).jaxpr) and not _pools(jax.make_jaxpr(g)(0.7, x).jaxpr), name

        def second(h):
            return jax.jvp(lambda q: jax.jvp(lambda r: h(r, x), (q,), (1.0,))[1], (0.7,), (1.0,))[1]

        want, got = second(f), jax.jit(lambda g=g: second(g))()
        assert np.abs(np.asarray(f(0.7, x) - g(0.7, x))).max() <= 1e-14, name
        assert np.abs(np.asarray(got - want)).max() <= 1e-14 * np.abs(np.asarray(want)).max(), name


def test_second_order_operation_by_operation_equals_jax_hessian(jax_x64):
    """The operation-by-operation rule (backends/_jax_curvature.py, docs/math.md §14): the Hessian diagonals of every
    curved group equal jax.hessian's (1e-10) — activations read right after dense layers (GELU's and SiLU's
    parts, a custom-jvp softplus, a scale between layer and activation), sequence outputs, LayerNorm, softmax
    attention, a square.  Groups whose activations all follow their own layer need no pass per parameter, and a
    dense W applied to one row a pass per output neuron, so they keep exact second order at max_params=1.  With
    ``chunk=3`` the outputs are taken three at a time (the last piece filled up with zero rows), in first order and
    in the rule: the same Jacobian rows and Hessian diagonals."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(2)
    p = {"W1": jnp.asarray(rng.normal(size=(3, 5))), "b1": jnp.asarray(rng.normal(size=5)),
         "W2": jnp.asarray(rng.normal(size=(5, 4))), "W3": jnp.asarray(rng.normal(size=(4, 2)))}

    def mlp(p, x):  # the input added to the outputs: not a dense chain, whose rule would take it
        a = jax.nn.gelu(x @ p["W1"] + p["b1"])
        return jnp.tanh(0.5 * jax.nn.softplus(a @ p["W2"])) @ p["W3"] + x[:, :2]

    def one(p, x):  # a layer and its activation, then a dense map: every curved operation right after its group's own
        return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"] + x[:, :1]  # layer, or a copy of the bias (not a chain)

    def seq(p, x):  # outputs (n, 2, 2)
        a = jax.nn.silu(jnp.stack([x, x**2], axis=1) @ p["W1"] + p["b1"])
        return jnp.tanh(a @ p["W2"]) @ p["W3"]

    cases = {"mlp": (mlp, p, 3), "seq": (seq, p, 3), "one": (one, {k: p[k] for k in ("W1", "b1", "W2")}, 3)}
    cases |= {k: v[:3] for k, v in _linearity_cases().items() if k in ("layernorm", "attention", "square")}
    X = jnp.asarray(np.random.default_rng(1).normal(size=(5, 3)))
    for name, (fn, params, width) in cases.items():
        model = fc_jax.from_function(fn, params, input_shape=(width,))
        leaves, treedef = jax.tree_util.tree_flatten(params)
        assert model._by_operation, name
        whole = model.derivatives(X).blocks
        pieces = fc_jax.from_function(fn, params, input_shape=(width,), chunk=3).derivatives(X).blocks
        for i, (block, piece) in enumerate(zip(whole, pieces)):
            want = _hessian_diagonals(fn, leaves, treedef, i, X).reshape(block.diag_hess.shape)
            for got in (block.diag_hess, piece.diag_hess):
                assert np.abs(np.asarray(got) - want).max() <= 1e-10 * max(np.abs(want).max(), 1e-300), \
                    (name, block.group)
            np.testing.assert_allclose(np.asarray(piece.jac), np.asarray(block.jac), rtol=1e-12, atol=1e-14)
    # W2: its activations follow it directly.  W1 also reaches the second activation: in the MLP a pass per neuron
    # of x @ W1 (x one row) serves all its weights; in the sequence model (x two rows) a pass per weight.  In the
    # one-layer model W1's and b1's only curved operation reads their layer's output (b1: its copies)
    for name, rule in (("mlp", ("W1", "W2")), ("seq", ("W2",)), ("one", ("W1", "b1"))):
        fn, params, width = cases[name]
        model = fc_jax.from_function(fn, params, input_shape=(width,), max_params=1)
        assert model.rule_groups == rule, name
        res = fc.analyze(model, X, "gaussian")
        assert set(res.first_order_only) == set(params) - set(model.linear_groups) - set(rule), name


def test_dense_chains_take_the_dense_rule(jax_x64):
    """A function that is a dense chain (backends/_jax_chain.py) — a Flax MLP with tanh, GELU and ReLU, a hand-written
    ``x @ W.T + b`` — is analysed by the dense-chain rule, at any size: its Jacobian rows and Hessian diagonals equal
    jax.jacrev's and jax.hessian's (1e-10), and every field is computed at max_params=1.  A skip connection, a
    weight used twice, a log-softmax on the outputs, a layer applied at several rows are not chains."""
    import flax.linen as nn
    import jax

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = x.reshape(x.shape[0], -1)
            x = nn.tanh(nn.Dense(5)(x))
            x = nn.relu(nn.Dense(3)(nn.gelu(nn.Dense(4)(x))))
            return nn.Dense(3)(x)

    rng = np.random.default_rng(3)
    flax_params = jax.tree_util.tree_map(lambda a: jnp.asarray(a, jnp.float64),
                                         MLP().init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 3))))
    hand = {"W1": jnp.asarray(rng.normal(size=(4, 6))), "b1": jnp.asarray(rng.normal(size=4)),
            "W2": jnp.asarray(rng.normal(size=(4, 2)))}

    def by_hand(p, x):
        return jax.nn.softplus(x @ p["W1"].T + p["b1"]) @ p["W2"]

    X = jnp.asarray(rng.normal(size=(5, 6)))
    for fn, params, shape in ((MLP().apply, flax_params, (2, 3)), (by_hand, hand, (6,))):
        Xs = X.reshape(-1, *shape)
        model = fc_jax.from_function(fn, params, input_shape=shape, max_params=1)
        assert model._chain is not None
        leaves, treedef = jax.tree_util.tree_flatten(params)
        names = [g.name for g in model.groups]

        def h(ls, x, fn=fn, treedef=treedef):
            return fn(jax.tree_util.tree_unflatten(treedef, ls), x[None])[0]

        jac = jax.vmap(jax.jacrev(h), in_axes=(None, 0))(leaves, Xs)
        d = model.derivatives(Xs)
        for block in d.blocks:  # u(W[a, b]) = ∂h/∂z_a x_b and w(W[a, b]) = diag ∂²h/∂z²_a x_b², in W's own layout
            i = names.index(block.weight)
            layout = "ncio" if block.transposed else "ncoi"  # stored (in, out), or (out, in)
            rows = np.einsum(f"nco,ni->{layout}", np.asarray(block.jac), np.asarray(block.inputs))
            np.testing.assert_allclose(rows, np.asarray(jac[i]), rtol=1e-10, atol=1e-12)
            got = np.einsum(f"nco,ni->{layout}", np.asarray(block.diag_hess), np.asarray(block.inputs) ** 2)
            want = _hessian_diagonals(fn, leaves, treedef, i, Xs).reshape(got.shape)
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
            if block.bias is not None:  # u(b_a) = ∂h/∂z_a, w(b_a) = diag ∂²h/∂z²_a
                j = names.index(block.bias)
                np.testing.assert_allclose(np.asarray(block.jac), np.asarray(jac[j]), rtol=1e-10, atol=1e-12)
                want = _hessian_diagonals(fn, leaves, treedef, j, Xs)
                np.testing.assert_allclose(np.asarray(block.diag_hess), want, rtol=1e-10,
                                           atol=1e-12 * np.abs(want).max())
        res = fc.analyze(model, Xs)
        assert not res.first_order_only and bool(jnp.all(jnp.isfinite(res.v2)))

    def skip(p, x):
        return jnp.tanh(x @ p["W1"]) @ p["W2"] + x[:, :2]

    def twice(p, x):
        return jnp.tanh(jnp.tanh(x @ p["W1"]) @ p["W1"]) @ p["W2"]

    def log_softmax(p, x):
        return jax.nn.log_softmax(jnp.tanh(x @ p["W1"]) @ p["W2"])

    def rows(p, x):  # each input two rows: the layer is applied at both
        return (jnp.tanh(x.reshape(-1, 2, 3) @ p["W1"]) @ p["W2"]).reshape(x.shape[0], -1)

    def reshaped(p, x):  # a weight used after reshapes (which may lay it out anew): not taken for a stored one
        return jnp.tanh(x @ p["W1"].reshape(1, 9).reshape(3, 3)) @ p["W2"]

    square = {"W1": jnp.asarray(rng.normal(size=(3, 3))), "W2": jnp.asarray(rng.normal(size=(3, 2)))}
    for fn, shape in ((skip, (3,)), (twice, (3,)), (log_softmax, (3,)), (rows, (6,)), (reshaped, (3,))):
        assert fc_jax.from_function(fn, square, input_shape=shape)._chain is None, fn.__name__


def test_conv_layers_in_any_layout_match_brute_force(jax_x64):
    """First order by the layer's ∂h/∂z and second order by conv_direct (backends/_jax_curvature.py) for convolutions
    in PyTorch's layout (NCHW, OIHW) with groups, strides, dilation and uneven padding, applied to two halves of
    each input as a batch of its own, and in Flax's (NWC, WIO) with a 1-D kernel: Jacobian rows and Hessian
    diagonals of every group equal jax.jacrev's and jax.hessian's (1e-10), and the kernels read right after their
    activations need no pass per parameter."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng(5)
    params = {"k1": jnp.asarray(rng.normal(size=(4, 1, 2, 3))), "b1": jnp.asarray(rng.normal(size=4)),
              "k2": jnp.asarray(rng.normal(size=(2, 4, 2))), "head": jnp.asarray(rng.normal(size=(14, 3)))}

    def fn(p, x):  # x: (n, 2, 5, 6); the first convolution sees each input as two, its halves, which share k1
        n = x.shape[0]
        halves = jnp.concatenate([x[:, :, :3], x[:, :, 2:]], axis=0)  # (2n, 2, 3, 6)
        z = lax.conv_general_dilated(halves, p["k1"], (2, 1), ((1, 0), (2, 1)), rhs_dilation=(1, 2),
                                     feature_group_count=2, dimension_numbers=("NCHW", "OIHW", "NCHW"))
        z = jnp.concatenate([z[:n], z[n:]], axis=2)  # (n, 4, 4, 5)
        a = jnp.tanh(z + p["b1"][None, :, None, None])  # (n, 4, 4, 5)
        a = jnp.transpose(a, (0, 2, 3, 1)).reshape(a.shape[0], 20, 4)  # NWC, width 20
        z2 = lax.conv_general_dilated(a, p["k2"], (3,), "VALID", dimension_numbers=("NWC", "WIO", "NWC"))
        return jax.nn.softplus(z2).reshape(a.shape[0], -1) @ p["head"]  # (n, 3)

    X = jnp.asarray(rng.normal(size=(4, 2, 5, 6)))
    model = fc_jax.from_function(fn, params, input_shape=(2, 5, 6))
    assert set(model.rule_groups) == {"k2"}  # k1 also reaches the softplus: one pass per weight
    leaves, treedef = jax.tree_util.tree_flatten(params)
    blocks = model.derivatives(X).blocks
    for i, block in enumerate(blocks):
        def h(v, x, i=i):
            ls = list(leaves)
            ls[i] = v.reshape(leaves[i].shape)
            return fn(jax.tree_util.tree_unflatten(treedef, ls), x[None])[0]

        J = jax.vmap(lambda x, i=i: jax.jacrev(h)(leaves[i].reshape(-1), x))(X)
        assert np.abs(np.asarray(block.jac) - np.asarray(J)).max() <= 1e-10 * np.abs(np.asarray(J)).max(), block.group
        want = _hessian_diagonals(fn, leaves, treedef, i, X)
        got = np.asarray(block.diag_hess)
        assert np.abs(got - want).max() <= 1e-10 * max(np.abs(want).max(), 1e-300), block.group


def test_first_conv_kernel_goes_channel_by_channel_through_the_next(jax_x64):
    """A kernel whose curvature reaches the next convolution's activations through channel-wise operations (tanh,
    average pooling, a per-channel scale, Flax's NHWC/HWIO layout, stride and padding) takes §13's channel-by-channel
    path: a rule group, its second order exact at max_params=1 against jax.hessian (1e-10).  Where a constant mixes
    the channels before the next convolution, or two are swapped, the check on a random input refuses that path:
    one pass per coordinate, within max_params, still exact."""
    import jax
    import jax.numpy as jnp
    from jax import lax

    rng = np.random.default_rng(3)
    params = {"k0": jnp.asarray(rng.normal(size=(3, 3, 2, 3))), "b0": jnp.asarray(rng.normal(size=3)),
              "k1": jnp.asarray(rng.normal(size=(2, 2, 3, 2))), "head": jnp.asarray(rng.normal(size=(8, 3)))}
    scale = jnp.asarray(rng.normal(size=3))
    mix = jnp.asarray(rng.normal(size=(3, 3)))

    def make(mixed):
        def fn(p, x):  # x: (n, 6, 6, 2) NHWC
            z = lax.conv_general_dilated(x, p["k0"], (1, 1), ((1, 1), (1, 1)),
                                         dimension_numbers=("NHWC", "HWIO", "NHWC")) + p["b0"]
            a = lax.reduce_window(jnp.tanh(z), 0.0, lax.add, (1, 2, 2, 1), (1, 2, 2, 1), "VALID") / 4 * scale
            a = a @ mix if mixed == "mixed" else a[..., jnp.asarray([0, 2, 1])] if mixed == "swapped" else a
            z1 = lax.conv_general_dilated(a, p["k1"], (1, 1), ((0, 1), (0, 1)),
                                          dimension_numbers=("NHWC", "HWIO", "NHWC"))
            return jax.nn.gelu(z1).reshape(x.shape[0], -1)[:, :8] @ p["head"]
        return fn

    X = jnp.asarray(rng.normal(size=(3, 6, 6, 2)))
    leaves, treedef = jax.tree_util.tree_flatten(params)
    names = [g for g in sorted(params)]
    for mixed in (False, "mixed", "swapped"):
        fn = make(mixed)
        model = fc_jax.from_function(fn, params, input_shape=(6, 6, 2), max_params=1 if not mixed else 20_000)
        assert ("k0" in model.rule_groups) is (not mixed), model.rule_groups
        blocks = {b.group: b for b in model.derivatives(X).blocks}
        for name in ("k0", "k1") if not mixed else ("k0",):
            i = names.index(name)
            want = _hessian_diagonals(fn, leaves, treedef, i, X)
            got = np.asarray(blocks[name].diag_hess)
            assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max(), (mixed, name)


def test_a_custom_vjp_function_gets_exact_first_order_and_second_order_marked(jax_x64):
    """Forward mode cannot pass a jax.custom_vjp function: the groups before one get their second order marked as not
    computed (NaN, first_order_only, Î2 refused with the reason), the others keep theirs, and the first order
    stays exact (reverse mode: the Fisher against jax.jacrev's moments)."""
    import jax
    import jax.numpy as jnp

    @jax.custom_vjp
    def act(x):
        return jnp.tanh(x)

    act.defvjp(lambda x: (jnp.tanh(x), x), lambda x, g: (g * (1 - jnp.tanh(x) ** 2),))
    rng = np.random.default_rng(0)
    p = {"W": jnp.asarray(rng.normal(size=(3, 4))), "V": jnp.asarray(rng.normal(size=(4, 2))),
         "U": jnp.asarray(rng.normal(size=(3, 2)))}
    X = jnp.asarray(rng.normal(size=(6, 3)))

    def fn(p, x):  # U's curvature (tanh) does not pass the custom_vjp: its second order is computed
        return act(x @ p["W"]) @ p["V"] + jnp.tanh(x @ p["U"])

    model = fc_jax.from_function(fn, p, input_shape=(3,))
    assert model.blocked_groups == ("W",)
    res = fc.analyze(model, X)
    assert res.first_order_only == ("W",)
    leaves, treedef = jax.tree_util.tree_flatten(p)
    J = jax.vmap(lambda x: jax.jacrev(lambda ls: fn(jax.tree_util.tree_unflatten(treedef, ls), x[None])[0])(leaves))(X)
    prob = jax.nn.softmax(fn(p, X), -1)
    fisher = []
    for Jl in J:
        u = Jl.reshape(X.shape[0], 2, -1)
        d = u - jnp.einsum("nc,ncp->np", prob, u)[:, None]
        fisher.append(jnp.einsum("nc,ncp->p", prob, d * d) / X.shape[0])
    want = np.asarray(jnp.concatenate(fisher))
    assert np.abs(np.asarray(res.fisher) - want).max() <= 1e-10 * np.abs(want).max()
    with pytest.raises(ValueError, match="^estimator: Î2 needs .*custom_vjp"):
        fc.estimate(model, X, estimator="i2", seed=0)
