"""The derivative engine: families as static arguments, compilation once per structure, padded batches,
the declared protocol, and dense chains the old adapters turned away."""

import numpy as np
import pytest
from array_api_compat import array_namespace

import fishercore as fc
from fishercore.backends import mlp
from helpers import (
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
