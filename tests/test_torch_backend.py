"""The torch adapter against torch's own autodiff of the sampled log-likelihood, BackPACK, and refusals."""

import copy

import numpy as np
import pytest

import fishercore as fc
from helpers import (
    REQUIRED,
    assert_raises_named,
    family_obj,
    record_deviation,
    require_framework,
    torch_brute_force,
)

pytestmark = pytest.mark.backends("torch")
torch = require_framework("torch")
from fishercore.backends import torch as fc_torch  # noqa: E402

F64 = torch.float64


def _net(*widths, act=torch.nn.Tanh, seed=0):
    torch.manual_seed(seed)
    mods = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods.append(torch.nn.Linear(a, b))
        if i < len(widths) - 2:
            mods.append(act())
    return torch.nn.Sequential(*mods).to(F64)


def _loglik(family, h, y):
    """ℓ written with torch's own functions (not fishercore's)."""
    if family.name == "categorical":
        return torch.log_softmax(h, -1).gather(-1, y[..., None])[..., 0]
    if family.name == "gaussian":
        return torch.distributions.Normal(h, family.variance ** 0.5).log_prob(y).sum(-1)
    return -torch.nn.functional.binary_cross_entropy_with_logits(h, y, reduction="none").sum(-1)


@pytest.mark.parametrize("family", ["categorical", "gaussian", "bernoulli"])
@pytest.mark.parametrize("act", [torch.nn.Tanh, torch.nn.Softplus, torch.nn.ReLU])
def test_single_draw_equals_torch_autodiff(family, act):
    """Î1 (one draw) = (torch.func.grad ℓ)²; Î2 (one draw) = −diag torch.func.hessian ℓ, per input, averaged."""
    fam = family_obj(family)
    net = _net(3, 4, 3, act=act, seed=1)
    X = torch.randn(3, 3, dtype=F64, generator=torch.Generator().manual_seed(2))
    model = fc_torch.from_sequential(net)
    y = fc.sample_labels(model, X, fam, seed=5)[0]
    names = [n for n, _ in net.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    shapes = [p.shape for p in net.parameters()]

    def ll(theta, x, yi):
        parts, k = {}, 0
        for n, s in zip(names, shapes):
            parts[n] = theta[k:k + s.numel()].reshape(s)
            k += s.numel()
        return _loglik(fam, torch.func.functional_call(net, parts, (x[None],))[0], yi)

    g = torch.stack([torch.func.grad(ll)(flat, X[i], y[i]) for i in range(3)])
    H = torch.stack([torch.diagonal(torch.func.hessian(ll)(flat, X[i], y[i])) for i in range(3)])
    for est, want in (("i1", (g**2).mean(0)), ("i2", -H.mean(0))):
        got = fc.estimate(model, X, fam, estimator=est, seed=5)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # BackPACK's own hooks
def test_fisher_matches_backpack_diag_ggn_exact():
    """BackPACK's DiagGGNExact: CrossEntropyLoss(mean) = categorical Fisher; MSELoss(mean) = Gaussian Fisher with
    σ² = ½ divided by C (the mean runs over the n·C squared errors: ℓ = −Σ(h − y)², Hessian 2I/(nC))."""
    if not REQUIRED:  # the torch tox environment installs it; elsewhere it is optional
        pytest.importorskip("backpack")
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    net = _net(5, 7, 6, 4, seed=3)
    X = torch.randn(13, 5, dtype=F64, generator=torch.Generator().manual_seed(4))
    for loss, y, family, scale in (
        (torch.nn.CrossEntropyLoss(reduction="mean"), torch.randint(0, 4, (13,)), "categorical", 1.0),
        (torch.nn.MSELoss(reduction="mean"), torch.randn(13, 4, dtype=F64), fc.Gaussian(variance=0.5), 1 / 4),
    ):
        bp_net = extend(copy.deepcopy(net))  # BackPACK's hooks stay on the copy
        with backpack(DiagGGNExact()):
            extend(loss)(bp_net(X), y).backward()
        want = torch.cat([p.diag_ggn_exact.reshape(-1) for p in bp_net.parameters()])
        got = fc.analyze(fc_torch.from_sequential(net), X, family, batch_size=5).fisher * scale
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


class Skip(torch.nn.Module):
    """Skip connection and a custom forward: from_module's case."""

    def __init__(self):
        super().__init__()
        self.inp, self.hid, self.out = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        a = torch.tanh(self.inp(x))
        return self.out(a + torch.nn.functional.gelu(self.hid(a), approximate="tanh"))


@pytest.mark.parametrize("family", ["categorical", "bernoulli"])
def test_from_module_equals_full_columns_of_the_same_module(family):
    """Per-neuron factors by output perturbation = exact full columns by jacrev/jvp over the parameters."""
    net = Skip().to(F64)
    X = torch.randn(10, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
    params = {k: v.detach() for k, v in net.named_parameters()}
    full = fc_torch.from_function(lambda p, x: torch.func.functional_call(net, p, (x,)), params, chunk=17,
                                  input_shape=(4,))
    a = fc.analyze(fc_torch.from_module(net), X, family, batch_size=3)
    b = fc.analyze(full, X, family, batch_size=4)
    assert [g.name for g in a.groups] == ["inp.weight", "inp.bias", "hid.weight", "hid.bias", "out.weight", "out.bias"]
    for f in ("fisher", "v1", "v2", "c12", "var_x", "v1_upper", "v2_lower"):
        torch.testing.assert_close(getattr(a, f), getattr(b, f), rtol=1e-10, atol=1e-14)
    for est in ("i1", "i2"):
        got = fc.estimate(fc_torch.from_module(net), X, family, estimator=est, seed=1, n_draws=2)
        want = fc.estimate(full, X, family, estimator=est, seed=1, n_draws=2)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-14)


def _chains():
    seq = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(5, 4), torch.nn.LeakyReLU(0.1), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    return seq.to(F64).eval()


def test_dense_chains_take_the_dense_rule_and_nothing_else_does():
    """A module or function that is only linear maps and elementwise activations, each applied to the previous
    result, is analysed by the dense-chain rule (from_sequential's): the same numbers, every field and both
    estimators; a skip connection, a weight used twice or ``x @ W`` are not chains and keep their paths."""
    net = _chains()
    X = torch.randn(9, 2, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    params = {k: v.detach() for k, v in net.named_parameters()}
    ref_model = fc_torch.from_sequential(net)
    ref = fc.analyze(ref_model, X)
    for f, want in torch_brute_force(net, X, ref.family).items():  # the rule itself, independently
        torch.testing.assert_close(getattr(ref, f), want, rtol=1e-10, atol=1e-13 * float(want.abs().max()))
    for model in (fc_torch.from_module(net, input_shape=(2, 3)),
                  fc_torch.from_function(lambda p, x: torch.func.functional_call(net, p, (x,)), params,
                                         input_shape=(2, 3))):
        assert model._chain is not None and [w for w, _, _ in model._chain[1]] == ["1.weight", "4.weight", "7.weight"]
        res = fc.analyze(model, X, batch_size=4)
        for f in ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper"):
            torch.testing.assert_close(getattr(res, f), getattr(ref, f), rtol=1e-12, atol=1e-15)
        for est in ("i1", "i2"):
            torch.testing.assert_close(fc.estimate(model, X, estimator=est, seed=2, n_draws=2),
                                       fc.estimate(ref_model, X, estimator=est, seed=2, n_draws=2),
                                       rtol=1e-12, atol=1e-15)
    w = {"w": torch.randn(3, 4, dtype=F64), "v": torch.randn(4, 2, dtype=F64)}
    for model in (fc_torch.from_module(Skip().to(F64)), fc_torch.from_module(Twice().to(F64)),
                  fc_torch.from_function(lambda p, x: torch.tanh(x @ p["w"]) @ p["v"], w, input_shape=(3,))):
        assert model._chain is None
    res = fc.analyze(fc_torch.from_module(Twice().to(F64)), X[:, 0, :])
    assert not res.first_order_only


def test_flatten_first_and_image_inputs():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 5), torch.nn.Sigmoid(), torch.nn.Linear(5, 3))
    net = net.to(F64)
    X = torch.randn(7, 3, 4, dtype=F64)
    res = fc.analyze(fc_torch.from_sequential(net), X, batch_size=3)
    flat = torch.nn.Sequential(*list(net)[1:])
    torch.testing.assert_close(res.fisher, fc.analyze(fc_torch.from_sequential(flat), X.reshape(7, 12)).fisher)
    assert [g.name for g in res.groups] == ["1.weight", "1.bias", "3.weight", "3.bias"]


def test_gelu_exact_form_uses_torch_autodiff():
    """GELU(approximate='none') has no closed form in the hand-written MLP, but torch's autodiff handles it."""
    net = _net(3, 5, 2, act=torch.nn.GELU, seed=2)
    X = torch.randn(6, 3, dtype=F64)
    model = fc_torch.from_sequential(net)
    full = fc_torch.from_function(lambda p, x: torch.func.functional_call(net, p, (x,)),
                                  {k: v.detach() for k, v in net.named_parameters()}, input_shape=(3,))
    torch.testing.assert_close(fc.analyze(model, X).v2, fc.analyze(full, X).v2, rtol=1e-10, atol=1e-14)


def test_float32_module():
    net = _net(3, 5, 2, seed=4).float()
    res = fc.analyze(fc_torch.from_sequential(net), torch.randn(6, 3))
    assert res.fisher.dtype == torch.float32


class Twice(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(torch.tanh(self.lin(x)))


class Scaled(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(3, 2)
        self.scale = torch.nn.Parameter(torch.ones(2))

    def forward(self, x):
        return self.lin(x) * self.scale


def _seq(*mods):
    return fc_torch.from_sequential(torch.nn.Sequential(*mods))


REFUSALS = {
    "conv layer": (lambda: _seq(torch.nn.Linear(4, 4), torch.nn.Conv1d(1, 1, 1)), ValueError,
                   "module: layer '1' (Conv1d)"),
    "flatten not first": (lambda: _seq(torch.nn.Linear(4, 4), torch.nn.Flatten()), ValueError,
                          "module: layer '1' (Flatten)"),
    "no linear": (lambda: fc_torch.from_sequential(torch.nn.Sequential(torch.nn.Tanh())), ValueError, "module"),
    "not sequential": (lambda: fc_torch.from_sequential(Skip()), TypeError, "module"),
    "not a module": (lambda: fc_torch.from_module(3), TypeError, "module"),
    "max_params 0": (lambda: fc_torch.from_function(lambda p, x: x @ p["w"], {"w": torch.ones(3, 2)}, input_shape=(3,),
                                                    max_params=0), ValueError, "max_params: must be at least 1"),
    "function not callable": (lambda: fc_torch.from_function(3, {"w": torch.zeros(2)}), TypeError, "fn"),
    "NaN weight": (lambda: fc_torch.from_function(lambda p, x: x, {"w": torch.tensor([float("nan")])}),
                   ValueError, "params: parameter 'w' contains NaN"),
    "backward hooks": (lambda: fc_torch.from_sequential(_hooked()), ValueError, "module: submodules"),
    "meta device": (lambda: fc_torch.from_sequential(_net(2, 3).to("meta")), ValueError,
                    "module: parameters are on the meta device"),
    "chunk 0": (lambda: fc_torch.from_function(lambda p, x: x @ p["w"], {"w": torch.ones(3, 2)}, input_shape=(3,),
                                               chunk=0), ValueError, "chunk: must be at least 1"),
    "no input_shape": (lambda: fc_torch.from_function(lambda p, x: x @ p["w"], {"w": torch.ones(3, 2)}), TypeError,
                       "input_shape: from_function needs"),
    "module without Linear, no input_shape": (lambda: fc_torch.from_module(torch.nn.Conv1d(1, 2, 3)), ValueError,
                                              "input_shape: required for a module without nn.Linear"),
    "outputs of rank 4": (lambda: fc_torch.from_function(lambda p, x: (x @ p["w"])[:, :, None, None],
                                                         {"w": torch.ones(3, 2)}, input_shape=(3,)),
                          ValueError, "fn: must return outputs of shape (n, C), or (n, T, C)"),
    "outputs of rank 1": (lambda: fc_torch.from_module(torch.nn.Sequential(torch.nn.Linear(3, 1),
                                                                           torch.nn.Flatten(0))),
                          ValueError, "module: must return outputs of shape (n, C), or (n, T, C)"),
    "float16": (lambda: fc_torch.from_module(torch.nn.Linear(3, 2).half()), TypeError,
                "module: dtype torch.float16 is not supported"),
    "ids without n_tokens": (lambda: fc_torch.from_function(lambda p, x: p["E"][x].sum(1), {"E": torch.ones(4, 2)},
                                                            input_shape=(3,), input_dtype=torch.long),
                             TypeError, "n_tokens: an integer input_dtype needs n_tokens"),
    "n_tokens without ids": (lambda: fc_torch.from_function(lambda p, x: x @ p["w"], {"w": torch.ones(3, 2)},
                                                            input_shape=(3,), n_tokens=4),
                             ValueError, "n_tokens: only for integer inputs"),
}


def _hooked():
    net = _net(2, 2)
    net[0].register_full_backward_hook(lambda *a: None)
    return net


@pytest.mark.parametrize("case", list(REFUSALS))
def test_refusals(case):
    assert_raises_named(*REFUSALS[case])


class LayerNormGelu(torch.nn.Module):
    """A LayerNorm + GELU MLP with a skip connection."""

    def __init__(self):
        super().__init__()
        self.inp, self.norm, self.out = torch.nn.Linear(3, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3)

    def forward(self, x):
        a = self.inp(x)
        return self.out(a + torch.nn.functional.gelu(self.norm(a)))


class TinyCNN(torch.nn.Module):
    """Conv, tanh, max pool, eval BatchNorm, Flatten, Linear: columns for all but the last layer."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = torch.nn.Conv2d(1, 2, 3, padding=1), torch.nn.BatchNorm2d(2)
        self.fc = torch.nn.Linear(2 * 2 * 2, 3)

    def forward(self, x):
        a = torch.nn.functional.max_pool2d(torch.tanh(self.conv(x)), 2)
        return self.fc(self.bn(a).flatten(1))


class TinySequence(torch.nn.Module):
    """Embedding, a Linear at every position, a causal mix, outputs (n, T, C)."""

    def __init__(self, vocab=4, width=3):
        super().__init__()
        self.emb, self.mix, self.head = torch.nn.Embedding(vocab, width), torch.nn.Linear(width, width), \
            torch.nn.Linear(width, vocab)

    def forward(self, x):
        e = self.emb(x)
        T = e.shape[1]
        causal = torch.tril(torch.ones(T, T, dtype=e.dtype)) / torch.arange(1, T + 1, dtype=e.dtype)[:, None]
        return self.head(torch.tanh(self.mix(causal @ e)))


def _tiny_modules():
    g = torch.Generator().manual_seed(3)
    cnn = TinyCNN().to(F64)
    with torch.no_grad():  # running statistics other than 0 and 1, so eval BatchNorm is not the identity
        cnn.bn.running_mean.copy_(torch.randn(2, generator=g, dtype=F64))
        cnn.bn.running_var.copy_(torch.rand(2, generator=g, dtype=F64) + 0.5)
    return {
        "scaled": (Scaled(), torch.randn(5, 3, generator=g, dtype=F64), {}),
        "twice": (Twice(), torch.randn(5, 3, generator=g, dtype=F64), {}),
        "layernorm-gelu": (LayerNormGelu(), torch.randn(5, 3, generator=g, dtype=F64), {}),
        "cnn": (cnn.eval(), torch.randn(5, 1, 4, 4, generator=g, dtype=F64), {"input_shape": (1, 4, 4)}),
        "sequence": (TinySequence(), torch.randint(0, 4, (5, 3), generator=g),
                     {"input_shape": (3,), "input_dtype": torch.long}),
    }


@pytest.mark.parametrize("case", ["scaled", "twice", "layernorm-gelu", "cnn", "sequence"])
def test_from_module_takes_any_module_exactly(case):
    """Parameters outside nn.Linear, a Linear applied twice, LayerNorm, convolutions, eval BatchNorm, embeddings
    and sequence outputs: every field equals brute force (per-output Hessians) to 1e-10."""
    net, X, kw = _tiny_modules()[case]
    net = net.to(F64)
    model = fc_torch.from_module(net, **kw)
    res = fc.analyze(model, X, batch_size=2)
    family = res.family
    if case == "sequence":
        assert model.output_shape == (3, 4) and isinstance(family, fc.Positions)
    X_ = X
    ref = torch_brute_force(net, X_, family)
    worst = 0.0
    for f, want in ref.items():
        got = getattr(res, f)
        scale = float(want.abs().max()) or 1.0
        err = float((got - want).abs().max()) / scale
        worst = max(worst, err)
        assert err < 1e-10, (f, err)
    record_deviation(f"from_module {case}", "float64", worst, "every field vs brute force")


@pytest.mark.parametrize("X,exc,msg", [
    (np.zeros((4, 3)), TypeError, "X: array library array_api_compat.numpy differs from the model's"),
    (torch.zeros(4, 3), TypeError, "X: dtype torch.float32 differs"),
    (torch.zeros(4, 3, dtype=torch.int64), TypeError, "X: expected a real floating"),
    (torch.zeros(4, 5, dtype=F64), ValueError, "X: the module cannot run"),
    (torch.zeros(3, dtype=F64), ValueError, "X: expected a batch"),
])
def test_bad_inputs(X, exc, msg):
    assert_raises_named(lambda: fc.analyze(fc_torch.from_sequential(_net(3, 4, 2)), X), exc, msg)


@pytest.mark.parametrize("adapter", ["from_sequential", "from_module"])
def test_one_model_from_several_threads_gives_the_numbers_of_one_thread(adapter):
    """from_sequential uses no hooks and no functional_call; from_module's hooks run under a lock."""
    import threading

    net = _net(6, 16, 16, 4, seed=7)
    model = getattr(fc_torch, adapter)(net)
    parts = [torch.randn(60, 6, dtype=F64, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    want = [fc.analyze(model, X, batch_size=25) for X in parts]
    got, errors = [None] * len(parts), []

    def work(k):
        try:
            for _ in range(3):
                got[k] = fc.analyze(model, parts[k], batch_size=25)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(parts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for g, w in zip(got, want):
        torch.testing.assert_close(g.fisher, w.fisher, rtol=1e-12, atol=0)
        torch.testing.assert_close(g.v2, w.v2, rtol=1e-12, atol=0)


def test_results_carry_no_autograd_graph():
    """Inputs that require grad, or an MLP built from nn.Parameter weights: the analysis detaches them."""
    from fishercore.backends import mlp

    net = _net(5, 8, 3, seed=1)
    X = torch.randn(20, 5, dtype=F64, requires_grad=True)
    model = mlp.MLP([(lin.weight, lin.bias) for lin in net if isinstance(lin, torch.nn.Linear)], "tanh")
    for m in (model, fc_torch.from_sequential(net)):
        res = fc.analyze(m, X, batch_size=7)
        assert all(not f.requires_grad and f.grad_fn is None for f in res.sums)
        for est in ("i1", "i2"):
            assert fc.estimate(m, X, estimator=est, seed=0).grad_fn is None


def test_training_mode_randomness_is_refused_and_eval_mode_dropout_is_the_identity():
    """Dropout or BatchNorm in training mode: refused when the model is built (from_sequential, from_module) or
    analysed (from_function), saying to call .eval(); in eval mode Dropout is the identity."""
    torch.manual_seed(0)
    plain = _net(4, 8, 3)
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), plain[0], plain[1], torch.nn.Dropout(0.5), plain[2]).double()
    X = torch.randn(6, 4, dtype=F64)
    for build in (fc_torch.from_sequential, fc_torch.from_module):
        assert_raises_named(lambda build=build: build(net), ValueError, "module: '0' (Dropout) is in training mode")
    bn = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 2)).double()
    assert_raises_named(lambda: fc_torch.from_module(bn), ValueError, "module: '1' (BatchNorm1d) is in training mode")
    params = {k: v.detach() for k, v in net.named_parameters()}
    fn_model = fc_torch.from_function(lambda p, x: torch.func.functional_call(net, p, (x,)), params, input_shape=(4,))
    assert_raises_named(lambda: fc.analyze(fn_model, X), ValueError, "fn: draws random numbers")
    net.eval()
    want = fc.analyze(fc_torch.from_sequential(plain), X)
    for got in (fc.analyze(fc_torch.from_sequential(net), X), fc.analyze(fc_torch.from_module(net), X),
                fc.analyze(fn_model, X)):
        for f in ("fisher", "v1", "v2", "c12"):
            torch.testing.assert_close(getattr(got, f), getattr(want, f), rtol=1e-12, atol=1e-15)


def _torch_linearity_cases():
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)

    def arr(*shape):
        return torch.randn(*shape, dtype=F64, generator=g)

    def dense(p, x, k):
        return x @ p[f"{k}.W"] + p[f"{k}.b"]

    def relu_pool(p, x):  # ReLU, max and average pooling, a residual sum
        a = torch.relu(dense(p, x, "l1"))
        a = F.max_pool1d(a[:, None, :], 2)[:, 0, :] + F.avg_pool1d(a[:, None, :], 2)[:, 0, :] + a[:, :3]
        return dense(p, a, "l2")

    def smooth(act):
        return lambda p, x: dense(p, act(dense(p, x, "l1")), "l2")

    def layernorm(p, x):
        return dense(p, F.layer_norm(dense(p, x, "l1"), (6,), p["g"], p["beta"]), "l2")

    def batchnorm(p, x):  # eval mode: affine in its input
        z = F.batch_norm(dense(p, x, "l1"), torch.zeros(6, dtype=F64), torch.ones(6, dtype=F64), p["g"], p["beta"],
                         training=False)
        return dense(p, torch.relu(z), "l2")

    def attention(p, x):
        q, k, v = (x @ p[n] for n in ("q", "k", "v"))
        a = torch.softmax(q[:, :, None] * k[:, None, :], dim=-1)
        return torch.einsum("nij,nj->ni", a, v)[:, :3] @ p["o"]

    def square(p, x):
        return ((x @ p["W"]) @ p["W"].T)[:, :2] + (x / p["s"])[:, :2]

    two = {"l1.W": arr(3, 6), "l1.b": arr(6), "l2.W": arr(6, 2), "l2.b": arr(2)}
    return {
        "relu-pool": (relu_pool, {"l1.W": arr(3, 6), "l1.b": arr(6), "l2.W": arr(3, 2), "l2.b": arr(2)}, set()),
        "tanh": (smooth(torch.tanh), two, {"l1.W", "l1.b"}),
        "gelu": (smooth(F.gelu), two, {"l1.W", "l1.b"}),
        "silu": (smooth(F.silu), two, {"l1.W", "l1.b"}),
        "sigmoid": (smooth(torch.sigmoid), two, {"l1.W", "l1.b"}),
        "layernorm": (layernorm, {**two, "g": arr(6), "beta": arr(6)}, {"l1.W", "l1.b"}),
        "batchnorm": (batchnorm, {**two, "g": arr(6), "beta": arr(6)}, set()),
        "attention": (attention, {n: arr(3, 3) for n in ("q", "k", "v")} | {"o": arr(3, 2)}, {"q", "k"}),
        "square": (square, {"W": arr(3, 3), "s": arr(3)}, {"W", "s"}),
    }


def test_piecewise_linear_groups_read_off_the_aten_graph_are_exact_and_never_smooth():
    """As for JAX: a group taken as piecewise linear has every Hessian diagonal exactly 0 (torch.func.hessian);
    parameters behind tanh, GELU, SiLU, sigmoid, LayerNorm's normalisation, softmax attention or a square are
    taken as curved; linear groups get exact second order at any size (max_params=1)."""
    X = torch.randn(5, 3, dtype=F64, generator=torch.Generator().manual_seed(1))
    for name, (fn, params, must_curve) in _torch_linearity_cases().items():
        model = fc_torch.from_function(fn, params, input_shape=(3,), max_params=1)
        linear = set(model.linear_groups)
        assert not (linear & must_curve), (name, linear & must_curve)
        for k, leaf in params.items():
            def h(v, x, k=k, leaf=leaf, fn=fn, params=params):
                return fn({**params, k: v.reshape(leaf.shape)}, x[None])[0]

            H = torch.stack([torch.func.hessian(h)(leaf.reshape(-1), x) for x in X])  # (n, C, p, p)
            diag = torch.diagonal(H, dim1=-2, dim2=-1)
            if k in linear:
                assert bool((diag == 0).all()), (name, k)
            elif k in must_curve:
                assert float(diag.abs().max()) > 1e-8, (name, k)
        if name in ("relu-pool", "layernorm"):
            res = fc.analyze(model, X, "gaussian")
            assert set(res.first_order_only) == set(params) - linear


def test_eval_batch_norm_is_affine_on_every_device_kernel():
    """An eval-mode batch norm is affine in its input and its scale whichever kernel the device traces to (CPU
    native_batch_norm, CUDA cudnn_batch_norm, ROCm miopen_batch_norm); in training mode (batch statistics) it
    is curved.  Hand-built graphs: the CUDA kernels cannot run here."""
    import operator

    from fishercore.backends._torch_linearity import EMPTY, _walk

    for op in (torch.ops.aten.native_batch_norm, torch.ops.aten.cudnn_batch_norm, torch.ops.aten.miopen_batch_norm):
        for training in (False, True):
            g = torch.fx.Graph()
            args = [g.placeholder(n) for n in ("x", "weight", "bias", "mean", "var")]
            out = g.call_function(operator.getitem, (g.call_function(op.default, (*args, training, 0.1, 1e-5)), 0))
            g.output(out)
            inputs = [(frozenset({"conv"}), EMPTY), (frozenset({"bn.weight"}), EMPTY), (frozenset({"bn.bias"}), EMPTY),
                      (EMPTY, EMPTY), (EMPTY, EMPTY)]
            [(deps, curved)] = _walk(g, inputs)
            assert deps == {"conv", "bn.weight", "bn.bias"}, op
            assert curved == (deps if training else EMPTY), (op, training)


def test_composites_differentiate_twice_exactly():
    """torch 2.13's forward-over-forward of native_layer_norm is wrong (0.3 off here); the composite form used for
    every derivative agrees with torch.func.hessian and with central differences."""
    from torch.func import jvp

    from fishercore.backends._torch_composites import composites

    x = torch.randn(2, 4, 3, dtype=F64, generator=torch.Generator().manual_seed(0))
    weight, bias = torch.rand(3, dtype=F64) + 0.5, torch.randn(3, dtype=F64)
    e = torch.zeros_like(x)
    e[0, 1, 2] = 1.0
    cases = {
        "layer_norm": lambda v: torch.nn.functional.layer_norm(v, (3,), weight, bias),
        "attention": lambda v: torch.nn.functional.scaled_dot_product_attention(v, v * 0.5, v, is_causal=True),
    }
    for name, f in cases.items():
        with composites():
            second = jvp(lambda p, f=f: jvp(f, (p,), (e,))[1], (x,), (e,))[1]
            composite = f(x)
        torch.testing.assert_close(composite, f(x), rtol=1e-12, atol=1e-14, msg=name)  # the fused kernel's values
        H = torch.func.hessian(lambda v, f=f: f(v.reshape(x.shape)).reshape(-1))(x.reshape(-1))
        k = int(e.reshape(-1).argmax())
        torch.testing.assert_close(second.reshape(-1), H[:, k, k], rtol=1e-10, atol=1e-12, msg=name)
        step = 1e-4
        fd = (f(x + step * e) - 2 * f(x) + f(x - step * e)) / step**2
        torch.testing.assert_close(second, fd, rtol=0, atol=1e-6, msg=name)


def test_sequence_estimates_equal_torch_autodiff_with_a_mask():
    """Î1 and Î2 of a sequence model = (∂ℓ/∂θ)² and −∂²ℓ/∂θ² by torch.func of ℓ = Σ_t mask_t log p(y_t | h_t), on the
    labels sample_labels draws."""
    net = TinySequence().to(F64)
    g = torch.Generator().manual_seed(8)
    X = torch.randint(0, 4, (4, 3), generator=g)
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 2] = mask[3, 0] = False
    model = fc_torch.from_module(net, input_shape=(3,), input_dtype=torch.long)
    y = fc.sample_labels(model, X, n_draws=2, seed=4)  # (M, n, T)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def ll(theta, x, yi, keep):
        parts, k = {}, 0
        for n, sh in zip(names, shapes):
            parts[n] = theta[k:k + sh.numel()].reshape(sh)
            k += sh.numel()
        h = torch.func.functional_call(net, parts, (x[None],))[0]  # (T, C)
        return (torch.log_softmax(h, -1).gather(-1, yi[:, None])[:, 0] * keep).sum()

    G = torch.stack([torch.func.grad(ll)(flat, X[i], y[m, i], mask[i].to(F64)) for m in range(2) for i in range(4)])
    H = torch.stack([torch.diagonal(torch.func.hessian(ll)(flat, X[i], y[m, i], mask[i].to(F64)))
                     for m in range(2) for i in range(4)])
    for est, want in (("i1", (G**2).mean(0)), ("i2", -H.mean(0))):
        got = fc.estimate(model, X, estimator=est, n_draws=2, seed=4, mask=mask)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-13)


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # BackPACK's own hooks
@pytest.mark.parametrize("form", ["functional_call", "transposed weights"])
def test_generic_path_fisher_matches_backpack_above_100k_parameters(form):
    """from_function on a 101,770-parameter network: the Fisher equals BackPACK's DiagGGNExact.

    * ``functional_call``: nn.Linear calls F.linear with the parameters themselves, so both layers are
      recognised as dense (per-neuron factors) and every field is computed;
    * ``transposed weights``: ``x @ W.t()`` uses a new tensor, so both layers are full columns — above
      max_params, first order only, the last layer's w = 0 read off the graph.
    """
    if not REQUIRED:
        pytest.importorskip("backpack")
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact

    net = _net(784, 128, 10, seed=6)
    X = torch.randn(6, 784, dtype=F64, generator=torch.Generator().manual_seed(7))
    params = {k: v.detach() for k, v in net.named_parameters()}
    if form == "functional_call":
        fn = lambda p, x: torch.func.functional_call(net, p, (x,))  # noqa: E731
    else:
        fn = lambda p, x: torch.tanh(x @ p["0.weight"].t() + p["0.bias"]) @ p["2.weight"].t() + p["2.bias"]  # noqa
    model = fc_torch.from_function(fn, params, input_shape=(784,))
    res = fc.analyze(model, X)
    assert sum(g.size for g in res.groups) == 101_770
    bp_net = extend(copy.deepcopy(net))
    with backpack(DiagGGNExact()):
        extend(torch.nn.CrossEntropyLoss())(bp_net(X), torch.zeros(6, dtype=torch.long)).backward()
    want = torch.cat([p.diag_ggn_exact.reshape(-1) for p in bp_net.parameters()])
    torch.testing.assert_close(res.fisher, want, rtol=1e-10, atol=1e-14)
    if form == "functional_call":
        assert [d.weight for d in model.dense] == ["0.weight", "2.weight"] and res.first_order_only == ()
        full = fc.analyze(fc_torch.from_sequential(net), X)
        for f in ("v1", "v2", "c12", "v2_upper"):
            torch.testing.assert_close(getattr(res, f), getattr(full, f), rtol=1e-10, atol=1e-14)
    else:
        assert not model.dense and res.first_order_only == ("0.weight", "0.bias")
        assert bool(torch.isnan(res.v2[:100_480]).all()) and bool((res.v2[100_480:] == 0).all())


def test_token_ids_out_of_range_name_x():
    """from_module reads n_tokens off its one nn.Embedding; ids outside [0, n_tokens) are refused before any work."""
    net = TinySequence().to(F64)
    model = fc_torch.from_module(net, input_shape=(3,), input_dtype=torch.long)
    assert model.n_tokens == 4
    assert_raises_named(lambda: fc.analyze(model, torch.tensor([[0, 1, 4]])), ValueError,
                        "X: token ids must lie in [0, 4), got 0..4")
    assert_raises_named(lambda: fc.estimate(model, torch.tensor([[0, -1, 2]])), ValueError,
                        "X: token ids must lie in [0, 4), got -1..2")
