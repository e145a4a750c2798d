"""The derivative engine: families as static arguments, compilation once per structure, padded batches,
the declared protocol, and dense chains the old adapters turned away."""

import math

import numpy as np
import pytest
from array_api_compat import array_namespace

import fishercore as fc
from fishercore.backends import mlp
from helpers import (
    ARCHS,
    BACKENDS,
    BATCH,
    FAMILIES,
    N_INPUTS,
    AsColumns,
    Problem,
    assert_analysis_close,
    family_obj,
    make_layers,
    make_problem,
    require_framework,
)


class Scaled(fc.Categorical):
    """A user's family with a parameter and the default repr: the categorical statistics scaled by ``scale``."""

    def __init__(self, scale):
        self.scale = scale

    def moments(self, outputs, jac, diag_hess):
        return fc.Moments(*(self.scale * m for m in super().moments(outputs, jac, diag_hess)))


def test_families_compare_and_hash_by_type_and_parameters():
    assert Scaled(2.0) != Scaled(1.0) and hash(Scaled(2.0)) != hash(Scaled(1.0))
    assert Scaled(2.0) == Scaled(2.0) and hash(Scaled(2.0)) == hash(Scaled(2.0))
    assert fc.Gaussian(variance=0.5) != fc.Gaussian(variance=2.0) and fc.Gaussian() == fc.get_family("gaussian")
    assert fc.Categorical() != Scaled(1.0)  # another type, whatever its numbers
    assert repr(fc.Gaussian(variance=0.5)) == "Gaussian(variance=0.5)" and repr(Scaled(3)) == "Scaled(scale=3)"
    with_array = Scaled(np.ones(2))  # an unhashable parameter: equal only to itself, still hashable
    assert with_array == with_array and with_array != Scaled(np.ones(2)) and isinstance(hash(with_array), int)


def test_a_family_subclass_gives_the_same_numbers_on_every_backend(backend):
    """Compiled code takes the family as a static argument: Scaled(2.0) must not reuse Scaled(1.0)'s."""
    model, X = make_problem(Problem("2h", "tanh", "categorical", n=N_INPUTS), backend)
    one = fc.analyze(model, X, Scaled(1.0), batch_size=BATCH)
    two = fc.analyze(model, X, Scaled(2.0), batch_size=BATCH)
    ratio = backend.to_numpy(two.fisher) / backend.to_numpy(one.fisher)
    np.testing.assert_allclose(ratio, 2.0, rtol=1e-12)
    ref = fc.analyze(*make_problem(Problem("2h", "tanh", "categorical", n=N_INPUTS)), "categorical", batch_size=BATCH)
    np.testing.assert_allclose(backend.to_numpy(one.fisher), ref.fisher, rtol=1e-10)


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_batches_give_the_numbers_of_unpadded_ones(family, monkeypatch):
    """The masked sums of docs/math.md §5, forced on NumPy: a short last batch filled with copies of its last
    input and weighed out by the mask gives every field and both estimators as before."""
    from fishercore.backends import ops

    model, X = make_problem(Problem("3h", "sigmoid", family, n=11))
    fam = family_obj(family)
    plain = fc.analyze(model, X, fam, batch_size=4)
    est = {e: fc.estimate(model, X, fam, estimator=e, n_draws=2, seed=3, batch_size=4) for e in ("i1", "i2")}
    emp = fc.estimate(model, X, fam, labels=fc.sample_labels(model, X, fam, seed=5)[0], batch_size=4)
    seen = []
    take = fc._batching.Batches.take
    monkeypatch.setattr(ops.Ops, "compiles", True)
    monkeypatch.setattr(fc._batching.Batches, "take", lambda self, *a: seen.append(take(self, *a)) or seen[-1])
    assert_analysis_close(fc.analyze(model, X, fam, batch_size=4), plain, rtol=1e-12, atol=1e-14)
    assert [tuple(Xb.shape) for Xb, _ in seen] == [(4, 3)] * 3  # 4, 4 and 3 + 1 filler row
    np.testing.assert_array_equal(seen[-1][1], [1, 1, 1, 0])
    for e, want in est.items():
        got = fc.estimate(model, X, fam, estimator=e, n_draws=2, seed=3, batch_size=4)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-15 * np.abs(want).max())
    got = fc.estimate(model, X, fam, labels=fc.sample_labels(model, X, fam, seed=5, batch_size=4)[0], batch_size=4)
    np.testing.assert_allclose(got, emp, rtol=1e-12, atol=1e-15 * np.abs(emp).max())


def test_optional_capabilities_are_declared_protocols():
    model, X = make_problem(Problem("1h", "tanh", "categorical"))
    assert isinstance(model, fc.Model) and isinstance(model, fc.SupportsPullback)
    assert isinstance(model, fc.DeclaresWorkspace)
    wrapped = AsColumns(model)  # implements Model only: estimate("i1") takes its derivatives instead
    assert isinstance(wrapped, fc.Model) and not isinstance(wrapped, fc.SupportsPullback)
    np.testing.assert_allclose(fc.estimate(wrapped, X, seed=1), fc.estimate(model, X, seed=1), rtol=1e-12)


def test_a_model_must_know_its_output_width():
    model, X = make_problem(Problem("1h", "tanh", "categorical"))
    unknown = AsColumns(model)
    unknown.n_outputs = None  # as the torch adapters had it until a first forward pass
    with pytest.raises(TypeError, match="^model: n_outputs must be a positive integer known when the model is built"):
        fc.analyze(unknown, X)


@pytest.mark.backends("jax")
def test_jax_compiles_once_per_structure_not_per_instance(jax_x64):
    """A second model of the same structure, dtype and shapes — new weights, a new instance — reuses every
    compiled program: the caches of the rules and of the core do not grow."""
    jax = require_framework("jax")
    import jax.numpy as jnp

    from fishercore.backends import jax as fc_jax
    from fishercore.backends.ops import namespace_ops

    compiled = namespace_ops(jnp)._compiled

    def sizes():
        return {key[0].__name__ + str(key[1]): fn._cache_size() for key, fn in compiled.items()}

    X = jnp.asarray(np.random.default_rng(0).normal(size=(N_INPUTS, 4)))
    builders = {
        "from_mlp": lambda seed: fc_jax.from_mlp([(jnp.asarray(W), jnp.asarray(b)) for W, b in make_layers("2h", seed)],
                                                 "relu"),
        "mlp on JAX arrays": lambda seed: mlp.MLP(
            [(jnp.asarray(W), jnp.asarray(b)) for W, b in make_layers("2h", seed)], "relu"),
        "from_function": lambda seed: fc_jax.from_function(
            fc_jax.mlp_apply("relu"), [(jnp.asarray(W), jnp.asarray(b)) for W, b in make_layers("2h", seed)],
            input_shape=(4,)),
    }
    for name, build in builders.items():
        def run(model):
            res = fc.analyze(model, X, "bernoulli", batch_size=BATCH)
            for e in ("i1", "i2"):
                fc.estimate(model, X, "bernoulli", estimator=e, seed=0, batch_size=BATCH)
            return res

        first = run(build(1))
        before = sizes()
        second = run(build(2))
        assert sizes() == before, f"{name}: {set(sizes().items()) - set(before.items())}"
        assert not np.allclose(np.asarray(first.fisher), np.asarray(second.fisher))  # other weights, other numbers
    assert jax.numpy.float64 == X.dtype


@pytest.mark.backends("torch")
def test_sequential_with_activations_before_the_first_and_after_the_last_linear():
    """The dense-chain rule with an activation on the inputs and one on the outputs (the old adapter fell back
    to one pass per neuron), against exact full columns of the same module."""
    torch = require_framework("torch")
    from fishercore.backends import torch as fc_torch

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Tanh(), torch.nn.Linear(3, 5), torch.nn.Sigmoid(), torch.nn.Identity(),
                              torch.nn.Linear(5, 4), torch.nn.Softplus(), torch.nn.Linear(4, 3),
                              torch.nn.Tanh()).double()
    X = torch.randn(9, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    full = fc_torch.from_function(lambda p, x: torch.func.functional_call(net, p, (x,)),
                                  {k: v.detach() for k, v in net.named_parameters()}, input_shape=(3,))
    seq = fc_torch.from_sequential(net)
    assert seq.n_outputs == 3 and full.n_outputs == 3
    for family in ("gaussian", "bernoulli"):
        assert_analysis_close(fc.analyze(seq, X, family, batch_size=4), fc.analyze(full, X, family, batch_size=5),
                              rtol=1e-10, atol=1e-14, to_numpy=lambda t: t.numpy())
        for e in ("i1", "i2"):
            got = fc.estimate(seq, X, family, estimator=e, seed=2, n_draws=2)
            want = fc.estimate(full, X, family, estimator=e, seed=2, n_draws=2)
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)
    assert array_namespace(fc.analyze(seq, X, "gaussian").v2) is array_namespace(X)


def _frameworks():
    """``(name, array library, fishercore adapter)`` for torch and JAX, where this run names them."""
    import importlib

    for name, lib_name in (("torch", "torch"), ("jax", "jax.numpy")):
        if name in BACKENDS:
            yield name, importlib.import_module(lib_name), importlib.import_module(f"fishercore.backends.{name}")


def _generic_models(max_params):
    """The same tanh net through torch's and JAX's from_function, with the given max_params; its input is added to
    its outputs, so that it is no dense chain (whose rule would give every field at any size)."""
    layers = make_layers("2h", 0)
    X = np.random.default_rng(1).normal(size=(7, ARCHS["2h"][0]))
    out = {}
    for name, lib, adapter in _frameworks():
        params = {f"{k}{i}": lib.asarray(a) for i, (W, b) in enumerate(layers) for k, a in (("W", W), ("b", b))}

        def fn(p, x, lib=lib):
            a = x
            for i in range(len(layers)):
                a = a @ p[f"W{i}"].T + p[f"b{i}"]
                a = lib.tanh(a) if i < len(layers) - 1 else a
            return a + x[:, :a.shape[1]]

        out[name] = (adapter.from_function(fn, params, input_shape=X.shape[1:], max_params=max_params),
                     lib.asarray(X))
    return out


@pytest.mark.backends("torch", "jax")
def test_second_order_is_exact_or_marked_not_computed(request, tmp_path):
    """Above max_params a generic model gives every first-order field exactly and marks the second-order ones
    NaN, "not computed": shown as "–", refused by everything that needs them, kept through save/load/merge."""
    if "jax" in BACKENDS:
        request.getfixturevalue("jax_x64")
    full, first = _generic_models(10**6), _generic_models(5)
    assert full.keys() == first.keys() and full
    for name in full:
        (m_full, X), (m_first, _) = full[name], first[name]
        exact, res = fc.analyze(m_full, X), fc.analyze(m_first, X)
        # (the groups the function is linear in are read off its traced graph: exact w = 0 there, at any size; in
        # JAX the last hidden bias's curvature is its activation's, read off its copies at any size, docs/math.md §14)
        linear = m_first.linear_groups
        rule = ("b1",) if name == "jax" else ()
        names = tuple(g.name for g in res.groups if g.name not in linear and g.name not in rule)
        assert exact.first_order_only == () and res.first_order_only == names
        assert set(linear) == {"W2", "b2"}  # the output layer
        for f in ("fisher", "v1", "var_x", "v1_lower", "v1_upper"):
            np.testing.assert_allclose(np.asarray(getattr(res, f)), np.asarray(getattr(exact, f)), rtol=1e-12,
                                       atol=0, err_msg=f"{name} {f}")
        for f in ("v2", "c12", "v2_lower", "v2_upper"):
            for g in res.groups:
                part = np.asarray(getattr(res, f))[g.offset:g.offset + g.size]
                want = np.asarray(getattr(exact, f))[g.offset:g.offset + g.size]
                if g.name in rule:
                    np.testing.assert_allclose(part, want, rtol=1e-12, atol=0, err_msg=f"{name} {f}")
                else:
                    assert np.all(np.isnan(part)) if g.name in names else np.all(part == 0), (name, f, g.name)
        np.testing.assert_array_equal(np.asarray(res.sample_size("i1")), np.asarray(exact.sample_size("i1")))
        for call, args in ((res.sample_size, ("i2",)), (res.variance, ("optimal",)), (res.alpha, ()),
                           (res.optimal_v, ())):
            with pytest.raises(ValueError, match=r"second-order statistics .* not computed for the groups"):
                call(*args)
        table = str(res.summary())
        assert "–" in table and "nan" not in table.lower() and "not computed" in table
        assert all(math.isnan(r.i2_better) and math.isnan(r.v2) for r in res.summary() if r.group in names)
        np.testing.assert_allclose(np.asarray(fc.estimate(m_first, X, estimator="i1", seed=1)),
                                   np.asarray(fc.estimate(m_full, X, estimator="i1", seed=1)), rtol=1e-12)
        with pytest.raises(ValueError, match="estimator: Î2 needs per-sample Hessian diagonals"):
            fc.estimate(m_first, X, estimator="i2")
        res.save(tmp_path / f"{name}.npz")
        back = fc.load_analysis(tmp_path / f"{name}.npz")
        assert back.first_order_only == names
        merged = res.merge(res)
        assert merged.first_order_only == names
        np.testing.assert_allclose(np.asarray(merged.fisher), np.asarray(res.fisher), rtol=1e-14)


@pytest.mark.backends("torch", "jax")
def test_token_ids_in_through_an_embedding(request):
    """Integer inputs (token ids) with input_dtype: an embedding, a tanh layer and a linear head, the same numbers
    on torch and JAX, every field against the full columns of the same model on one-hot float inputs."""
    if "jax" in BACKENDS:
        request.getfixturevalue("jax_x64")
    rng = np.random.default_rng(3)
    E, W, b, V = rng.normal(size=(7, 3)), rng.normal(size=(3, 4)), rng.normal(size=4), rng.normal(size=(4, 5))
    ids = rng.integers(0, 7, size=(9, 2))  # two tokens per input, mean of their embeddings
    results = {}
    for name, lib, adapter in _frameworks():
        params = {"E": lib.asarray(E), "W": lib.asarray(W), "b": lib.asarray(b), "V": lib.asarray(V)}
        int_dtype = lib.int64 if name == "torch" else lib.int32

        def fn(p, x, lib=lib):
            return lib.tanh(p["E"][x].mean(1) @ p["W"] + p["b"]) @ p["V"]

        def onehot_fn(p, x, lib=lib):  # the same model on one-hot rows: a float model of the same parameters
            return lib.tanh((x @ p["E"]).mean(1) @ p["W"] + p["b"]) @ p["V"]

        model = adapter.from_function(fn, params, input_shape=(2,), input_dtype=int_dtype, n_tokens=7)
        X = lib.asarray(ids.astype(np.int64 if name == "torch" else np.int32))
        res = fc.analyze(model, X)
        ref = fc.analyze(adapter.from_function(onehot_fn, params, input_shape=(2, 7)),
                         lib.asarray(np.eye(7)[ids]))
        for f in ("fisher", "v1", "v2", "c12", "var_x", "v1_upper", "v2_upper"):
            np.testing.assert_allclose(np.asarray(getattr(res, f)), np.asarray(getattr(ref, f)), rtol=1e-10,
                                       atol=1e-14, err_msg=f"{name} {f}")
        assert set(model.linear_groups) == {"V"}
        with pytest.raises(TypeError, match="X: dtype .* differs from the model's input_dtype"):
            fc.analyze(model, lib.asarray(ids.astype(np.float64)))
        with pytest.raises(TypeError, match="input_dtype: expected None"):
            adapter.from_function(fn, params, input_shape=(2,), input_dtype=lib.float64)
        # ids out of range: refused, naming X (JAX would clamp them silently); n_tokens is required with ids
        bad = ids.astype(np.int64 if name == "torch" else np.int32)
        for value, shown in ((7, "0..7"), (-1, "-1..")):
            bad[0, 0] = value
            with pytest.raises(ValueError, match=rf"X: token ids must lie in \[0, 7\), got {shown}"):
                fc.analyze(model, lib.asarray(bad))
        with pytest.raises(TypeError, match="n_tokens: an integer input_dtype needs n_tokens"):
            adapter.from_function(fn, params, input_shape=(2,), input_dtype=int_dtype)
        results[name] = res
    if len(results) == 2:  # group by group: JAX orders a dict's keys, torch keeps their order
        t, j = results["torch"], results["jax"]
        for f in ("fisher", "v1", "v2", "c12"):
            jt, jj = t.unflatten(getattr(t, f)), j.unflatten(getattr(j, f))
            for k in jt:
                np.testing.assert_allclose(np.asarray(jt[k]), np.asarray(jj[k]), rtol=1e-10, atol=1e-14)
