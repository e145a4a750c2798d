"""The hand-written MLP: derivatives against finite differences, on every activation; namespaces."""

import numpy as np
import pytest
from array_api_compat import array_namespace, device

import fishercore as fc
from fishercore.backends import mlp
from fishercore.backends.rules import activations
from helpers import ACTIVATIONS, ARCHS, full_columns, make_layers, richardson_derivatives

FD_TOL = 1e-6  # the target: float64 agreement with finite differences ≤ 1e-6 relative


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_activation_derivatives(name):
    z = np.linspace(-3.1, 2.9, 41)  # avoids the kink at 0 exactly
    act = activations.get_activation(name, 0.07, 1.3)
    f, d1, d2 = act.fn(z, array_namespace(z))
    for i in range(z.size):
        g1, g2 = richardson_derivatives(lambda t: act.fn(t, array_namespace(t))[0], z.copy(), i, eps=1e-3)
        assert abs(d1[i] - g1[i]) <= FD_TOL * max(1, abs(g1[i]))
        assert abs(d2[i] - g2[i]) <= FD_TOL * max(1, abs(g2[i]))
    if act.piecewise_linear:
        assert np.all(d2 == 0)


def test_gelu_is_the_tanh_form():
    z = np.array([-2.0, -0.5, 0.0, 0.7, 3.0])
    want = 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3)))
    np.testing.assert_allclose(activations.get_activation("gelu").fn(z, array_namespace(z))[0], want, rtol=1e-15)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_derivatives_match_finite_differences(arch, activation):
    """u = ∂h/∂θ_i and w = ∂²h/∂θ_i² for every parameter, against Richardson differences."""
    model = mlp.MLP(make_layers(arch, seed=3), activation)
    X = np.random.default_rng(4).normal(size=(3, ARCHS[arch][0]))
    h, u, w = full_columns(model, X)
    theta = model.flat_parameters()
    np.testing.assert_allclose(h, model.outputs(X), rtol=0, atol=0)

    def out(t):
        return model.with_parameters(t).outputs(X)

    worst = 0.0
    for i in range(theta.size):
        g1, g2 = richardson_derivatives(out, theta, i, eps=1e-3)
        scale1, scale2 = max(1.0, np.abs(g1).max()), max(1.0, np.abs(g2).max())
        worst = max(worst, np.abs(u[:, :, i] - g1).max() / scale1, np.abs(w[:, :, i] - g2).max() / scale2)
    assert worst <= FD_TOL, worst


def test_layer_factors_chain_rule_by_hand():
    """A 1-hidden-layer tanh net in closed form: ∂h/∂z1 = W2 diag(φ'), diag ∂²h/∂z1² = W2 diag(φ'')."""
    (W1, b1), (W2, b2) = make_layers("1h", seed=9)
    X = np.random.default_rng(2).normal(size=(5, 3))
    d = mlp.MLP([(W1, b1), (W2, b2)], "tanh").derivatives(X)
    z = X @ W1.T + b1
    t = np.tanh(z)
    np.testing.assert_allclose(d.blocks[0].jac, W2[None] * (1 - t**2)[:, None, :], rtol=1e-14)
    np.testing.assert_allclose(d.blocks[0].diag_hess, W2[None] * (-2 * t * (1 - t**2))[:, None, :], rtol=1e-14)
    np.testing.assert_allclose(d.blocks[1].inputs, t, rtol=1e-15)
    assert np.all(d.blocks[1].diag_hess == 0)
    np.testing.assert_array_equal(d.blocks[1].jac, np.broadcast_to(np.eye(4), (5, 4, 4)))


def test_groups_follow_sequential_naming():
    layers = make_layers("2h")
    layers[1] = (layers[1][0], None)
    model = mlp.MLP(layers, ["tanh", "relu"])
    assert [g.name for g in model.groups] == ["0.weight", "0.bias", "2.weight", "4.weight", "4.bias"]
    assert [g.offset for g in model.groups] == [0, 20, 25, 55, 73]
    assert sum(g.size for g in model.groups) == model.flat_parameters().size == 76
    assert model.n_inputs == 4 and model.n_outputs == 3
    assert "4-5-6-3" in repr(model)


def test_mixed_activations_and_biasless_layers_match_finite_differences():
    layers = make_layers("3h", seed=5)
    layers[1] = (layers[1][0], None)
    model = mlp.MLP(layers, ["sigmoid", "relu", "gelu"])
    X = np.random.default_rng(1).normal(size=(2, 3))
    h, u, w = full_columns(model, X)
    theta = model.flat_parameters()
    for i in range(theta.size):
        g1, g2 = richardson_derivatives(lambda t: model.with_parameters(t).outputs(X), theta, i)
        np.testing.assert_allclose(u[:, :, i], g1, atol=FD_TOL * max(1, np.abs(g1).max()))
        np.testing.assert_allclose(w[:, :, i], g2, atol=FD_TOL * max(1, np.abs(g2).max()))


@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
def test_mlp_on_every_namespace_matches_numpy(backend, activation):
    """The same derivatives on each array library, in its own namespace, dtype and device."""
    layers = make_layers("3h", seed=2)
    X = np.random.default_rng(3).normal(size=(6, 3))
    ref = mlp.MLP(layers, activation).derivatives(X)
    model = mlp.MLP([(backend.asarray(W), backend.asarray(b)) for W, b in layers], activation)
    got = model.derivatives(backend.asarray(X))
    assert array_namespace(got.outputs) is backend.xp and device(got.outputs) == backend.device
    np.testing.assert_allclose(backend.to_numpy(got.outputs), ref.outputs, rtol=1e-12)
    for r, g in zip(ref.blocks, got.blocks):
        for name in ("inputs", "jac", "diag_hess"):
            arr = getattr(g, name)
            assert array_namespace(arr) is backend.xp and arr.dtype == model.dtype
            np.testing.assert_allclose(backend.to_numpy(arr), getattr(r, name), rtol=1e-11, atol=1e-14)


def test_no_full_jacobian_for_dense_layers():
    """Dense blocks carry per-neuron factors: their size does not grow with the fan-in."""
    wide = mlp.MLP(make_layers((200, (3,), 2)), "tanh")
    d = wide.derivatives(np.zeros((4, 200)))
    assert all(isinstance(b, fc.DenseBlock) for b in d.blocks)
    assert d.blocks[0].jac.shape == (4, 2, 3)  # not (4, 2, 603)
