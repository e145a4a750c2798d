"""Every backend gives the numbers of the float64 NumPy reference (the hand-written MLP).

Problems are data (architecture, activation, family); they expand over backend kinds
and dtypes into ids such as ``3h-gelu-categorical-torch-sequential-float64``.  Every
field of ``analyze`` and both estimators with the same seed are compared.

Tolerances
----------
float64: ``max |got − ref| ≤ 1e-10 · max |ref|`` per field, and elementwise
``|got − ref| ≤ 1e-10 · |ref|`` wherever ``|ref| ≥ 1e-6 · max |ref|``.  Backends differ
only in the order of floating-point operations, so deviations are a few ulps times
the depth of the computation (~1e-15 seen).

float32: the model and inputs are rounded to float32 (relative 6e-8) and every
operation rounds again.  The statistics are polynomials of degree up to 8 in the
network's derivatives (v1 is a centred 4th moment of squared first derivatives,
``var_x`` a centred second moment of I), each a sum over C outputs, n inputs and up
to three layers; a few hundred roundings of relative 6e-8 each bound the deviation
by about 1e-4 of each field's scale, which is the tolerance used.
"""

import numpy as np
import pytest
from array_api_compat import array_namespace

import fishercore as fc
from fishercore.backends import mlp
from helpers import (
    ACTIVATIONS,
    ARCHS,
    BACKENDS,
    BATCH,
    FIELDS,
    GPU_KINDS,
    N_INPUTS,
    Problem,
    family_obj,
    get_backend,
    make_layers,
    record_deviation,
)

N = N_INPUTS

# every activation on 1, 2 and 3 hidden layers; every family on smooth and piecewise-linear nets
PROBLEMS = [Problem(arch, act, "categorical", n=N) for arch in ARCHS for act in ACTIVATIONS]
PROBLEMS += [Problem(arch, act, fam, n=N) for fam in ("gaussian", "bernoulli")
             for arch, act in (("1h", "sigmoid"), ("2h", "relu"), ("3h", "gelu"))]
FLOAT32 = [Problem("2h", act, fam, n=N) for act, fam in (("tanh", "categorical"), ("softplus", "gaussian"),
                                                         ("elu", "bernoulli"))]

def _torch_sequential(layers, activation, dtype):
    import torch

    from fishercore.backends.torch import sequential_from_layers

    return sequential_from_layers(layers, activation, dtype=getattr(torch, dtype))


class _Stack:
    """A custom torch module (ModuleList + functional activation): from_module's case."""

    @staticmethod
    def build(layers, activation, dtype):
        import torch

        seq = _torch_sequential(layers, activation, dtype)

        class Stack(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.blocks = torch.nn.ModuleList([m for m in seq if isinstance(m, torch.nn.Linear)])
                self.acts = [m for m in seq if not isinstance(m, torch.nn.Linear)]

            def forward(self, x):
                for lin, act in zip(self.blocks, self.acts):
                    x = act(lin(x))
                return self.blocks[-1](x)

        return Stack()


def build(kind, p: Problem, dtype):
    """(model, X, to_ref) with to_ref mapping a flat result to the reference's flat order (numpy)."""
    layers = [(W.astype(dtype), b.astype(dtype)) for W, b in make_layers(p.arch, p.seed)]
    X = np.random.default_rng(p.seed + 1).normal(size=(p.n, ARCHS[p.arch][0])).astype(dtype)
    if kind == "mlp-cupy":
        import cupy

        return mlp.MLP([(cupy.asarray(W), cupy.asarray(b)) for W, b in layers], p.activation), cupy.asarray(X), \
            cupy.asnumpy
    if kind.startswith(("mlp-torch", "torch")):
        import torch

        dev = "cuda" if kind.endswith("-cuda") else "cpu"
        Xt = torch.from_numpy(X).to(dev)
        to_ref = lambda a: a.detach().cpu().numpy()  # noqa: E731
        if kind.startswith("mlp-torch"):
            return mlp.MLP([(torch.from_numpy(W).to(dev), torch.from_numpy(b).to(dev)) for W, b in layers],
                           p.activation), Xt, to_ref
        from fishercore.backends import torch as fc_torch

        if kind.startswith("torch-sequential"):
            return fc_torch.from_sequential(_torch_sequential(layers, p.activation, dtype).to(dev)), Xt, to_ref
        if kind == "torch-module":
            return fc_torch.from_module(_Stack.build(layers, p.activation, dtype)), Xt, to_ref
        seq = _torch_sequential(layers, p.activation, dtype)
        params = {k: v.detach() for k, v in seq.named_parameters()}
        fn = lambda prm, x: torch.func.functional_call(seq, prm, (x,))  # noqa: E731
        return fc_torch.from_function(fn, params, input_shape=X.shape[1:]), Xt, to_ref
    import jax
    import jax.numpy as jnp

    from fishercore.backends import jax as fc_jax

    dev = jax.devices("gpu" if kind.endswith("-gpu") else "cpu")[0]
    Xj = jax.device_put(X, dev)
    pairs = [(jax.device_put(W, dev), jax.device_put(b, dev)) for W, b in layers]
    to_ref = np.asarray
    if kind.startswith("mlp-jax"):
        return mlp.MLP(pairs, p.activation), Xj, to_ref
    if kind.startswith("jax-mlp") and kind != "jax-mlp-flax":
        return fc_jax.from_mlp(pairs, p.activation), Xj, to_ref
    if kind == "jax-function":
        return fc_jax.from_function(fc_jax.mlp_apply(p.activation), pairs, input_shape=X.shape[1:]), Xj, to_ref
    # Flax layout: groups in pytree order ("i.bias", "i.kernel"), kernels (in, out)
    model = fc_jax.from_mlp([{"kernel": jnp.asarray(W.T), "bias": jnp.asarray(b)} for W, b in layers],
                            p.activation)

    def flax_to_ref(flat):
        flat = np.asarray(flat)
        group = {g.name: flat[g.offset:g.offset + g.size].reshape(g.shape) for g in model.groups}
        return np.concatenate([a for i in range(len(layers))
                               for a in (group[f"{i}.kernel"].T.ravel(), group[f"{i}.bias"])])

    return model, Xj, flax_to_ref


def _kinds():
    kinds = []
    if "torch" in BACKENDS:
        kinds += ["mlp-torch-tensors", "torch-sequential", "torch-module", "torch-function"]
    if "jax" in BACKENDS:
        kinds += ["mlp-jax-arrays", "jax-mlp", "jax-mlp-flax", "jax-function"]
    if "cupy" in BACKENDS:
        kinds += ["mlp-cupy"]
    if "torch-cuda" in BACKENDS:
        kinds += ["mlp-torch-cuda", "torch-sequential-cuda"]
    if "jax-gpu" in BACKENDS:
        kinds += ["mlp-jax-gpu", "jax-mlp-gpu"]
    return kinds


KINDS = _kinds()
# Every kind runs every activation and family on the 2-hidden-layer problems; the 1- and 3-layer ones run
# where depth is what a kind changes.  Not for the full-column paths (their cost grows with P × n), the
# GPU kinds (a GPU check must fit in minutes), nor the JAX kinds that differ from jax-mlp only in where
# φ', φ'' come from (closed forms: mlp-jax-arrays) or in layout (jax-mlp-flax) — JAX compiles every
# new structure, and those two share jax-mlp's dense-chain rule and compiled statistics.
SHALLOW_ONLY = ("mlp-jax-arrays", "jax-mlp-flax")
CASES = [(p, k) for p in PROBLEMS for k in KINDS
         if p.arch == "2h" or not (k.endswith("function") or k in GPU_KINDS or k in SHALLOW_ONLY)]


def _compare(got, ref, rtol, label, kind, dtype):
    scale = np.abs(ref).max()
    if scale == 0:  # exact zeros (v2 of piecewise-linear nets) stay exactly zero on every backend
        assert np.all(got == 0), f"{label}: reference is exactly 0, got max |{np.abs(got).max():.2e}|"
        return
    err = np.abs(got - ref).max() / scale
    record_deviation(kind, dtype, err, label)
    assert err <= rtol, f"{label}: normwise deviation {err:.2e} > {rtol:.0e}"
    if dtype == "float64":
        big = np.abs(ref) >= 1e-6 * scale
        elem = np.abs(got[big] - ref[big]) / np.abs(ref[big])
        assert elem.max(initial=0.0) <= rtol, f"{label}: elementwise deviation {elem.max():.2e}"


def _check(p, kind, dtype, rtol):
    ref_model, ref_X = mlp.MLP(make_layers(p.arch, p.seed), p.activation), \
        np.random.default_rng(p.seed + 1).normal(size=(p.n, ARCHS[p.arch][0]))
    fam = family_obj(p.family)
    ref = fc.analyze(ref_model, ref_X, fam, batch_size=BATCH)
    if kind in GPU_KINDS:
        get_backend(GPU_KINDS[kind])  # skips when there is no GPU
    model, X, to_ref = build(kind, p, dtype)
    res = fc.analyze(model, X, fam, batch_size=BATCH)
    assert array_namespace(res.fisher) is array_namespace(X) and res.fisher.dtype == X.dtype
    for f in FIELDS:
        _compare(to_ref(getattr(res, f)), getattr(ref, f), rtol, f"{p.id} {f}", kind, dtype)
    for est in ("i1", "i2"):
        r = fc.estimate(ref_model, ref_X, fam, estimator=est, n_draws=3, seed=7, batch_size=BATCH)
        g = fc.estimate(model, X, fam, estimator=est, n_draws=3, seed=7, batch_size=BATCH)
        _compare(to_ref(g), r, rtol, f"{p.id} estimate {est}", kind, dtype)


@pytest.mark.parametrize("p,kind", CASES, ids=[f"{p.id}-{k}-float64" for p, k in CASES])
def test_float64_agrees_with_numpy_reference(p, kind, request):
    if "jax" in kind:
        request.getfixturevalue("jax_x64")
    _check(p, kind, "float64", 1e-10)


CASES32 = [(p, k) for p in FLOAT32 for k in KINDS if not k.endswith("function")]


@pytest.mark.parametrize("p,kind", CASES32, ids=[f"{p.id}-{k}-float32" for p, k in CASES32])
def test_float32_within_stated_tolerance(p, kind, request):
    if "jax" in kind:
        request.getfixturevalue("jax_x64")  # float32 arrays side by side with the float64 reference
    _check(p, kind, "float32", 1e-4)


CHUNK_KINDS = ["mlp-numpy"] + [k for k in ("torch-sequential", "jax-mlp") if k in KINDS]


@pytest.mark.parametrize("kind", CHUNK_KINDS)
def test_budget_chunks_give_the_same_numbers(kind, request, monkeypatch):
    """Budgets small enough to split a layer's sums into row chunks and an input's draws into chunks give
    the numbers of one unchunked pass (the labels too: one input's noise is one stream)."""
    import fishercore.estimators as E
    import fishercore.sums as S

    if "jax" in kind:
        request.getfixturevalue("jax_x64")
    rows, draws = [], []
    chunk_rows, noise = S.chunk_rows, E._noise
    monkeypatch.setattr(S, "chunk_rows", lambda b, budget: rows.append((chunk_rows(b, budget), b.jac.shape[-1]))
                        or rows[-1][0])
    monkeypatch.setattr(E, "_noise", lambda fam, rng, h, m, k=None: draws.append(m) or noise(fam, rng, h, m, k))
    for fam in ("categorical", "gaussian", "bernoulli"):
        p = Problem("2h", "tanh", fam, n=4)
        ref_model = mlp.MLP(make_layers(p.arch, p.seed), p.activation)
        ref_X = np.random.default_rng(p.seed + 1).normal(size=(p.n, ARCHS[p.arch][0]))
        ref = fc.analyze(ref_model, ref_X, fam, batch_size=p.n)
        ref_est = fc.estimate(ref_model, ref_X, fam, n_draws=300, seed=3, batch_size=p.n)
        model, X, to_ref = (ref_model, ref_X, np.asarray) if kind == "mlp-numpy" else build(kind, p, "float64")
        chunked = {"rows": False, "draws": False}
        for budget in (3e3, 1e4, 3e4, 1e5):
            rows.clear()
            draws.clear()
            try:
                res = fc.analyze(model, X, fam, memory_budget=budget)
                est = fc.estimate(model, X, fam, n_draws=300, seed=3, memory_budget=budget)
            except ValueError as e:  # too small to hold one input: said so, naming the budget
                assert "memory_budget" in str(e)
                continue
            chunked["rows"] |= any(r < out for r, out in rows)
            chunked["draws"] |= max(draws) < 300
            for f in FIELDS:
                _compare(to_ref(getattr(res, f)), getattr(ref, f), 1e-12, f"{fam} {budget:g} {f}", kind, "float64")
            _compare(to_ref(est), ref_est, 1e-12, f"{fam} {budget:g} estimate", kind, "float64")
        assert chunked == {"rows": True, "draws": True}, (fam, chunked)
