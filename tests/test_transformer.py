"""The tiny transformer (embeddings, LayerNorm, causal multi-head attention, GELU MLP, residuals; outputs (n, T, C)):
torch's from_module and JAX's from_function of the same weights give the brute-force statistics to 1e-10."""

import types

import numpy as np
import pytest
import transformer_reference as R

from helpers import get_backend, record_deviation, require_framework

REFERENCE = dict(np.load(R.PATH))


FIRST_ORDER = ("fisher", "v1", "var_x", "v1_lower", "v1_upper")


def _compare(res, tag, kind, to_numpy, fields=R.FIELDS):
    """The fields against the brute-force reference, to 1e-10 of their largest values."""
    worst = 0.0
    for f in fields:
        want = REFERENCE[tag + f]
        got = to_numpy(getattr(res, f))
        err = float(np.max(np.abs(got - want))) / float(np.max(np.abs(want)))
        worst = max(worst, err)
        assert err < 1e-10, (tag + f, err)
    record_deviation(kind, "float64", worst, f"transformer {tag or 'unmasked'} vs brute force")


def _recording_spans(model) -> list:
    """The ``positions=`` of each of the model's ``derivatives_of`` calls from now on (None for whole sequences)."""
    spans, derivatives_of = [], model.derivatives_of

    def recorded(X, groups, **kw):
        spans.append(kw.get("positions"))
        return derivatives_of(X, groups, **kw)

    model.derivatives_of = recorded
    return spans


@pytest.mark.backends("torch")
def test_reference_file_is_current():
    """The stored reference is what brute force gives today (so it cannot go stale)."""
    require_framework("torch")
    now = R.brute_force()
    for k, want in REFERENCE.items():
        np.testing.assert_allclose(now[k], want, rtol=1e-12, atol=1e-15 * np.abs(want).max(), err_msg=k)


@pytest.mark.backends("torch")
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("budget", [None, 64_000])
def test_torch_transformer_matches_brute_force(masked, budget):
    """``budget``: one input's columns and Hessian diagonals (71 kB) and the model's workspace (15 kB: cotangents of
    its largest value) exceed it, so the analysis takes one input, a few groups at a time, and their statistics a
    few columns at a time — the same numbers."""
    torch = require_framework("torch")
    import fishercore as fc
    from fishercore.backends import torch as fc_torch
    from fishercore.report import transformer as tr

    net = tr.torch_model(R.CONFIG, R.params(), dtype=torch.float64)
    model = fc_torch.from_module(net, input_shape=(R.CONFIG.context,), input_dtype=torch.long)
    assert model.output_shape == (R.CONFIG.context, R.CONFIG.vocab) and not model.linears  # every Linear: per token
    mask = torch.as_tensor(R.mask()) if masked else None
    if budget is None:
        res = fc.analyze(model, torch.as_tensor(R.tokens()), mask=mask, batch_size=4)
    else:
        from fishercore._batching import group_plan

        assert len(group_plan(model, 8, budget)) == 3  # groups in three calls
        res = fc.analyze(model, torch.as_tensor(R.tokens()), mask=mask, memory_budget=budget)
    assert [g.name for g in res.groups] == [n for n, _ in R.CONFIG.names_and_shapes()]
    _compare(res, "masked_" if masked else "", "transformer-torch", lambda x: x.numpy())


@pytest.mark.backends("torch")
@pytest.mark.parametrize("masked", [False, True])
def test_torch_transformer_a_few_positions_at_a_time(masked):
    """First order (max_params=1: no Hessian diagonals, but the zeros of the groups where w = 0): under a budget
    that holds two of the four positions' columns, each sequence's outputs are differentiated two positions at a
    time (every group, one backward pass per output) and the moments merged — the numbers of brute force, and
    the second-order zeros and NaNs of one call."""
    torch = require_framework("torch")
    import fishercore as fc
    from fishercore.backends import torch as fc_torch
    from fishercore.report import transformer as tr

    net = tr.torch_model(R.CONFIG, R.params(), dtype=torch.float64)
    model = fc_torch.from_module(net, input_shape=(R.CONFIG.context,), input_dtype=torch.long, max_params=1)
    assert model.position_chunks
    spans = _recording_spans(model)
    mask = torch.as_tensor(R.mask()) if masked else None
    X = torch.as_tensor(R.tokens())
    res = fc.analyze(model, X, mask=mask, memory_budget=40_000)
    assert spans == [(0, 2), (2, 4)] * X.shape[0]
    _compare(res, "masked_" if masked else "", "transformer-torch", lambda x: x.numpy(), FIRST_ORDER)
    one = fc.analyze(model, X, mask=mask, batch_size=6)
    for f in ("v2", "c12", "v2_lower", "v2_upper"):
        np.testing.assert_array_equal(getattr(res, f).numpy(), getattr(one, f).numpy(), err_msg=f)  # NaN, or 0
    # a model whose groups need Hessian diagonals takes whole sequences, and says so when asked for positions
    full = fc_torch.from_module(net, input_shape=(R.CONFIG.context,), input_dtype=torch.long)
    assert not full.position_chunks
    with pytest.raises(ValueError, match="positions: "):
        full.derivatives_of(X[:1], None, positions=(0, 2))
    with pytest.raises(ValueError, match="positions: expected 0 <= t0 < t1 <= 4"):
        model.derivatives_of(X[:1], None, positions=(3, 5))


@pytest.mark.backends("torch-cuda")
def test_torch_transformer_on_the_gpu_matches_brute_force():
    """The same on CUDA tensors, masked, under a budget that cuts groups and columns: the outputs stay on the GPU."""
    get_backend("torch-cuda")  # a skip where there is no GPU
    import torch

    import fishercore as fc
    from fishercore.backends import torch as fc_torch
    from fishercore.report import transformer as tr

    net = tr.torch_model(R.CONFIG, R.params(), dtype=torch.float64).to("cuda")
    model = fc_torch.from_module(net, input_shape=(R.CONFIG.context,), input_dtype=torch.long)
    res = fc.analyze(model, torch.as_tensor(R.tokens(), device="cuda"), mask=torch.as_tensor(R.mask(), device="cuda"),
                     memory_budget=64_000)
    assert res.fisher.device.type == "cuda"
    _compare(res, "masked_", "transformer-torch-cuda", lambda x: x.cpu().numpy())


@pytest.mark.parametrize("masked,budget,name", [
    (False, None, "jax"), (True, 40_000, "jax"),
    pytest.param(True, None, "jax-gpu", marks=pytest.mark.backends("jax-gpu"))])
def test_jax_transformer_matches_brute_force(masked, budget, name):
    """Under the budget, first order only (max_params=1: no per-group Hessian programs to compile); the cuts
    into spans of positions and columns are what is checked there.  ``jax-gpu``: every field on the GPU."""
    require_framework("jax")
    get_backend(name)  # float64 on; a skip where there is no GPU
    import jax.numpy as jnp

    import fishercore as fc
    from fishercore.backends import jax as fc_jax
    from fishercore.report import transformer as tr

    params = {k: jnp.asarray(v) for k, v in R.params().items()}
    model = fc_jax.from_function(tr.JaxCharTransformer(heads=R.CONFIG.heads, depth=R.CONFIG.depth), params,
                                 input_shape=(R.CONFIG.context,), input_dtype=jnp.int64,
                                 n_tokens=R.CONFIG.vocab, max_params=20_000 if budget is None else 1)
    spans = _recording_spans(model)
    mask = jnp.asarray(R.mask()) if masked else None
    if budget is None:
        res = fc.analyze(model, jnp.asarray(R.tokens()), mask=mask, batch_size=4)
    else:
        res = fc.analyze(model, jnp.asarray(R.tokens()), mask=mask, memory_budget=budget)
    order = [n for n, _ in R.CONFIG.names_and_shapes()]  # JAX orders a dict's leaves by key; the reference, torch's
    fields = R.FIELDS if budget is None else FIRST_ORDER
    flat = {f: np.concatenate([np.asarray(res.unflatten(getattr(res, f))[n]).reshape(-1) for n in order])
            for f in fields}
    if budget is not None:  # first order only: each sequence a position at a time, every group each time
        assert model.position_chunks and spans == [(t, t + 1) for t in range(R.CONFIG.context)] * len(R.tokens())
    if name == "jax-gpu":
        assert next(iter(res.fisher.devices())).platform == "gpu"
    _compare(types.SimpleNamespace(**flat), "masked_" if masked else "", f"transformer-{name}", np.asarray, fields)
