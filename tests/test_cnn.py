"""The report's CNN (conv, activation, pooling, optional eval batch norm, dense head) in torch and in Flax linen with
the same weights: torch's from_module and JAX's from_function give the brute-force statistics to 1e-10."""

import cnn_reference as R
import numpy as np
import pytest

from helpers import record_deviation, require_framework

REFERENCE = dict(np.load(R.PATH))


def _compare(flat: dict, tag: str, kind: str):
    worst = 0.0
    for f in R.FIELDS:
        want = REFERENCE[f"{tag}_{f}"]
        err = float(np.max(np.abs(flat[f] - want))) / float(np.max(np.abs(want)))
        worst = max(worst, err)
        assert err < 1e-10, (tag, f, err)
    record_deviation(kind, "float64", worst, f"cnn {tag} vs brute force")


@pytest.mark.backends("torch")
def test_reference_file_is_current():
    """The stored reference is what brute force gives today (so it cannot go stale)."""
    require_framework("torch")
    now = R.brute_force()
    assert set(now) == set(REFERENCE)
    for k, want in REFERENCE.items():
        np.testing.assert_allclose(now[k], want, rtol=1e-12, atol=1e-15 * np.abs(want).max(), err_msg=k)


@pytest.mark.backends("torch")
@pytest.mark.parametrize("tag", list(R.CONFIGS))
def test_torch_cnn_matches_brute_force(tag):
    torch = require_framework("torch")
    import fishercore as fc
    from fishercore.backends import torch as fc_torch
    from fishercore.report import cnn

    net = cnn.torch_model(R.CONFIGS[tag], R.params(tag), dtype=torch.float64)
    model = fc_torch.from_module(net, input_shape=(1, 8, 8))
    assert len(model.convs) == 2 and len(model.dense) == 1
    res = fc.analyze(model, torch.as_tensor(R.images()), batch_size=2)
    _compare({f: getattr(res, f).numpy() for f in R.FIELDS}, tag, "cnn-torch")


@pytest.mark.backends("jax")
@pytest.mark.parametrize("tag,written_out", [(tag, False) for tag in R.CONFIGS] + [("max_tanh", True)],
                         ids=[*R.CONFIGS, "max_tanh-pooling-written-out"])
def test_flax_cnn_matches_brute_force(tag, written_out, jax_x64, monkeypatch):
    """Flax linen Conv, max_pool/avg_pool, BatchNorm(use_running_average=True) and Dense through from_function; the
    JAX analysis, mapped onto torch's names and layouts (kernels (kh, kw, I, O) → (O, I, kh, kw)), equals the torch
    brute force — so torch and JAX agree to 2e-10.  ``written_out``: max pooling rewritten as on a GPU in float64
    (backends/_jax_pooling.py), here on the CPU."""
    require_framework("jax")
    import jax
    import jax.numpy as jnp

    import fishercore as fc
    from fishercore.backends import _jax_pooling
    from fishercore.backends import jax as fc_jax
    from fishercore.report import cnn

    if written_out:
        monkeypatch.setattr(fc_jax, "needs_exact_pooling", lambda device, dtype: True)
    config = R.CONFIGS[tag]
    variables = jax.tree_util.tree_map(jnp.asarray, cnn.flax_variables(config, R.params(tag)))
    fn, params = cnn.flax_function(config, variables)
    model = fc_jax.from_function(fn, params, input_shape=(1, 8, 8))
    assert isinstance(model._hessian_static["apply_fn"], _jax_pooling.exact_pooling) == written_out
    # read off the jaxpr: after the last activation only pooling and the dense head, which are linear
    assert set(model.linear_groups) == {"head.bias", "head.kernel"}
    res = fc.analyze(model, jnp.asarray(R.images()), batch_size=5)  # one batch: one compilation per program
    order = [n for n, _ in config.names_and_shapes()]
    flat = {}
    for f in R.FIELDS:
        values = np.asarray(getattr(res, f))
        by_name = dict(cnn.torch_layout(g.name, values[g.offset:g.offset + g.size], g.shape) for g in res.groups)
        assert set(by_name) == set(order)
        flat[f] = np.concatenate([by_name[n] for n in order])
    _compare(flat, tag, "cnn-jax")
