"""GPU: an MNIST-sized network on every GPU backend gives the CPU float64 numbers.

Runs with ``pytest -m gpu`` (or in any run whose backends include cupy, torch-cuda or
jax-gpu); without a GPU the test is skipped, so ``pytest -m gpu`` passes cleanly there.
Tolerance: the float64 cross-backend one (1e-10 of each field's scale).
"""

import numpy as np
import pytest

import fishercore as fc
from fishercore.backends import mlp
from helpers import BACKENDS, FIELDS, GPU_BACKENDS, get_backend

GPU_IN_RUN = [b for b in BACKENDS if b in GPU_BACKENDS]
WIDTHS = (784, 512, 512, 10)
N, BATCH = 600, 300  # two batches of one shape (each new shape costs JAX a compilation)


def _models(name, layers, X):
    """(label, model, X) for each way this GPU backend runs the network."""
    backend = get_backend(name)
    dev_layers = [(backend.asarray(W), backend.asarray(b)) for W, b in layers]
    Xd = backend.asarray(X)
    yield f"mlp-{name}", mlp.MLP(dev_layers, "sigmoid"), Xd
    if name == "torch-cuda":
        from fishercore.backends import torch as fc_torch

        net = fc_torch.sequential_from_layers(layers, "sigmoid").to("cuda")
        yield "torch-sequential-cuda", fc_torch.from_sequential(net), Xd
    if name == "jax-gpu":
        from fishercore.backends import jax as fc_jax

        yield "jax-mlp-gpu", fc_jax.from_mlp(dev_layers, "sigmoid"), Xd


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_IN_RUN or [pytest.param(None, marks=pytest.mark.skip(
    reason="no GPU backend in this run (no NVIDIA GPU found, or FISHERCORE_BACKENDS names none)"))])
def test_mnist_sized_network_on_the_gpu_matches_the_cpu(name):
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), 0.1 * rng.normal(size=o)) for i, o in zip(WIDTHS[:-1], WIDTHS[1:])]
    X = rng.random((N, WIDTHS[0]))
    cpu = mlp.MLP(layers, "sigmoid")
    ref = fc.analyze(cpu, X, batch_size=BATCH)
    ref_est = {e: fc.estimate(cpu, X, estimator=e, seed=3, batch_size=BATCH) for e in ("i1", "i2")}
    for label, model, Xd in _models(name, layers, X):
        back = get_backend(name).to_numpy
        res = fc.analyze(model, Xd, batch_size=BATCH)
        assert type(res.fisher) is type(Xd), label
        for f in FIELDS:
            got, want = back(getattr(res, f)), getattr(ref, f)
            scale = np.abs(want).max()
            assert np.abs(got - want).max() <= 1e-10 * scale, f"{label} {f}"
        for e, want in ref_est.items():
            got = back(fc.estimate(model, Xd, estimator=e, seed=3, batch_size=BATCH))
            assert np.abs(got - want).max() <= 1e-10 * np.abs(want).max(), f"{label} estimate {e}"


CNN_GPU = [b for b in GPU_IN_RUN if b in ("torch-cuda", "jax-gpu")]


@pytest.mark.gpu
@pytest.mark.parametrize("name", CNN_GPU or [pytest.param(None, marks=pytest.mark.skip(
    reason="no torch-cuda or jax-gpu backend in this run"))])
def test_cnn_on_the_gpu_matches_brute_force(name):
    """The report's CNN (both configurations of tests/cnn_reference.py, float64) on the GPU: torch's from_module
    (conv and curvature rules) and JAX's from_function of the Flax module give the brute-force reference."""
    import cnn_reference as R

    from fishercore.report import cnn

    get_backend(name)  # jax-gpu: float64 on
    reference = dict(np.load(R.PATH))
    for tag, config in R.CONFIGS.items():
        if name == "torch-cuda":
            import torch

            from fishercore.backends import torch as fc_torch

            net = cnn.torch_model(config, R.params(tag), dtype=torch.float64).to("cuda")
            res = fc.analyze(fc_torch.from_module(net, input_shape=(1, 8, 8)),
                             torch.as_tensor(R.images(), device="cuda"))
            flat = {f: getattr(res, f).cpu().numpy() for f in R.FIELDS}
        else:
            import jax
            import jax.numpy as jnp

            from fishercore.backends import jax as fc_jax

            variables = jax.tree_util.tree_map(jnp.asarray, cnn.flax_variables(config, R.params(tag)))
            fn, params = cnn.flax_function(config, variables)
            res = fc.analyze(fc_jax.from_function(fn, params, input_shape=(1, 8, 8)), jnp.asarray(R.images()))
            order = [n for n, _ in config.names_and_shapes()]
            flat = {}
            for f in R.FIELDS:
                values = np.asarray(getattr(res, f))
                by_name = dict(cnn.torch_layout(g.name, values[g.offset:g.offset + g.size], g.shape)
                               for g in res.groups)
                flat[f] = np.concatenate([by_name[n] for n in order])
        for f in R.FIELDS:
            want = reference[f"{tag}_{f}"]
            assert np.abs(flat[f] - want).max() <= 1e-10 * np.abs(want).max(), f"{name} {tag} {f}"


@pytest.mark.gpu
@pytest.mark.parametrize("name", GPU_IN_RUN or [pytest.param(None, marks=pytest.mark.skip(
    reason="no GPU backend in this run (no NVIDIA GPU found, or FISHERCORE_BACKENDS names none)"))])
def test_default_budget_on_the_gpu_is_a_share_of_its_free_memory(name):
    """memory_budget=None on GPU arrays: DEVICE_SHARE of what the device has free (the allocator's unused blocks
    counted), not the host's 512 MiB."""
    from fishercore._batching import DEVICE_SHARE, batches_for
    from fishercore.backends.ops import ops_for

    X = get_backend(name).asarray(np.ones((10, 4)))
    free = ops_for(X).free_device_memory(X)
    assert free is not None and free > 0, name
    assert batches_for(X, None, None).budget == pytest.approx(DEVICE_SHARE * free, rel=0.2)
