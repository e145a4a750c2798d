"""Convolutional networks in torch: every field against brute force, rule by rule; BackPACK's DiagGGNExact and
DiagHessian; the path each group takes (docs/convolutional.md)."""

import copy

import numpy as np
import pytest

import fishercore as fc
from helpers import REQUIRED, record_deviation, require_framework, torch_brute_force

pytestmark = pytest.mark.backends("torch")
torch = require_framework("torch")
from fishercore.backends import torch as fc_torch  # noqa: E402

nn = torch.nn
F64 = torch.float64


class Block(nn.Module):
    """torchvision's BasicBlock with a chosen activation: conv-BN-act-conv-BN, plus the input (through a 1×1 conv
    and BN when the shape changes), then the activation."""

    def __init__(self, cin, cout, stride, act):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, padding=1, bias=False)
        self.bn1, self.conv2, self.bn2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, padding=1, bias=False), \
            nn.BatchNorm2d(cout)
        self.act = act
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        return self.act(out + (x if self.downsample is None else self.downsample(x)))


class ChannelAttention(nn.Module):
    """A convolution whose output is weighted by its own softmax over channels: curved beyond any elementwise
    activation, so the conv layer takes forward over forward from its output."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Linear(2 * 16, 3)

    def forward(self, x):
        z = self.conv(x)
        return self.head((z * torch.softmax(z, dim=1)).flatten(1))


def _resnet(act):
    return nn.Sequential(Block(2, 2, 1, act), Block(2, 3, 2, act), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(3, 3))


CASES = {
    "stride-padding": (lambda: nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.Tanh(), nn.Flatten(),
                                             nn.Linear(12, 3)), (2, 4, 4)),
    "dilation-same-avgpool": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding="same", dilation=2), nn.Sigmoid(),
                                                    nn.AvgPool2d(2), nn.Flatten(), nn.Linear(8, 3)), (1, 4, 4)),
    "groups-maxpool": (lambda: nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.GELU(), nn.MaxPool2d(2),
                                             nn.Conv2d(4, 4, 2, groups=4), nn.Softplus(), nn.Flatten(),
                                             nn.Linear(4, 3)), (2, 4, 4)),
    "conv1d": (lambda: nn.Sequential(nn.Conv1d(2, 3, 3, padding=2, dilation=2), nn.SiLU(), nn.MaxPool1d(2),
                                     nn.Conv1d(3, 2, 3, stride=2, bias=False), nn.GELU(), nn.Flatten(),
                                     nn.Linear(2, 3)), (2, 9)),
    "batchnorm-adaptive-dropout": (lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.Tanh(),
                                                         nn.Dropout(0.3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                                         nn.Linear(2, 3)), (1, 5, 5)),
    "three-convs": (lambda: nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Conv2d(2, 3, 2), nn.Sigmoid(),
                                          nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2, 3)), (1, 4, 4)),
    "residual-tanh": (lambda: _resnet(nn.Tanh()), (2, 4, 4)),
    "residual-relu": (lambda: _resnet(nn.ReLU()), (2, 4, 4)),
    "beyond-activations": (ChannelAttention, (1, 4, 4)),
}


def _build(make, seed=0):
    torch.manual_seed(seed)
    net = make().to(F64)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # running statistics and affine parameters away from 0 and 1: BatchNorm is not trivial
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g, dtype=F64))
                m.running_var.copy_(torch.rand(m.num_features, generator=g, dtype=F64) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g, dtype=F64))
                m.bias.copy_(torch.randn(m.num_features, generator=g, dtype=F64))
    return net.eval()


def _assert_exact(net, X, res, label):
    ref = torch_brute_force(net, X, res.family)
    worst = 0.0
    for f, want in ref.items():
        scale = float(want.abs().max()) or 1.0
        err = float((getattr(res, f) - want).abs().max()) / scale
        worst = max(worst, err)
        assert err < 1e-10, (f, err)
    record_deviation(f"conv {label}", "float64", worst, "every field vs brute force")


@pytest.mark.parametrize("case", list(CASES))
def test_every_field_equals_brute_force(case):
    """Strides, padding (numeric and "same"), dilation, groups, Conv1d, max/average/adaptive pooling, eval
    BatchNorm and Dropout, residual blocks with 1×1-conv shortcuts, and curvature beyond activations: every field
    equals the statistics of torch.func's per-output Jacobians and Hessians, to 1e-10."""
    make, shape = CASES[case]
    net = _build(make)
    X = torch.randn(5, *shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    model = fc_torch.from_module(net, input_shape=shape)
    convs = {c.weight for c in model.convs} | {c.bias for c in model.convs if c.bias}
    assert convs == {k for k, v in net.named_parameters() if k.endswith((".weight", ".bias")) and v.ndim in (1, 3, 4)
                     and any(k.startswith(n + ".") for n, m in net.named_modules()
                             if isinstance(m, (nn.Conv1d, nn.Conv2d)))}
    if case == "residual-relu":  # piecewise linear in everything: w = 0 with no second-order work
        assert set(model.linear_groups) == {g.name for g in model.groups}
    elif case == "beyond-activations":
        assert not model.activation_groups & convs
    else:  # the curvature rule covers every curved conv group
        curved = convs - set(model.linear_groups)
        assert curved and curved <= model.activation_groups
    res = fc.analyze(model, X, batch_size=3)
    assert not res.first_order_only
    _assert_exact(net, X, res, case)


ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "gelu": nn.GELU, "gelu-tanh": lambda: nn.GELU("tanh"),
               "silu": nn.SiLU, "softplus": nn.Softplus, "elu": nn.ELU, "mish": nn.Mish, "hardswish": nn.Hardswish,
               "relu": nn.ReLU, "leaky-relu": nn.LeakyReLU}


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_every_activation(act):
    """Two convolutions with average pooling between, each activation, Bernoulli outputs: every field exact."""
    make = ACTIVATIONS[act]
    net = _build(lambda: nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), make(), nn.AvgPool2d(2), nn.Conv2d(2, 2, 2),
                                       make(), nn.Flatten(), nn.Linear(2, 3)), seed=2)
    X = torch.randn(4, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(3))
    res = fc.analyze(fc_torch.from_module(net, input_shape=(1, 4, 4)), X, "bernoulli")
    _assert_exact(net, X, res, f"activation {act}")


def test_conv_groups_are_exact_above_max_params():
    """The conv rules are layer rules: their groups keep every field when the module's other curved parameters
    exceed max_params (here 0 allowed): no NaN in the conv groups."""
    net = _build(CASES["three-convs"][0])
    X = torch.randn(3, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(1))
    res = fc.analyze(fc_torch.from_module(net, input_shape=(1, 4, 4), max_params=1), X)
    assert not res.first_order_only
    _assert_exact(net, X, res, "three-convs, max_params=1")


def _digits_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.Conv2d(3, 4, 3, padding=1),
                         nn.Tanh(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(4 * 2 * 2, 5))


@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # BackPACK's own hooks
def test_backpack_diag_ggn_and_diag_hessian():
    """BackPACK on a CNN it supports: DiagGGNExact of CrossEntropyLoss(mean) = the Fisher; DiagHessian of
    CrossEntropyLoss(sum) at the labels sample_labels draws = n · estimate("i2") with the same seed; over 150
    draws, DiagHessian's mean and variance are the Fisher and Var(Î2) that the analysis reports, within
    tolerances from that variance."""
    if not REQUIRED:
        pytest.importorskip("backpack")
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagHessian

    net = _build(_digits_cnn, seed=5)
    n = 6
    X = torch.randn(n, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(2))
    model = fc_torch.from_module(net, input_shape=(1, 8, 8))
    res = fc.analyze(model, X)
    bp_net = extend(copy.deepcopy(net))

    def run(extension, y, reduction):
        bp_net.zero_grad()
        with backpack(extension):
            extend(nn.CrossEntropyLoss(reduction=reduction))(bp_net(X), y).backward()
        attr = "diag_ggn_exact" if isinstance(extension, DiagGGNExact) else "diag_h"
        return torch.cat([getattr(p, attr).reshape(-1) for p in bp_net.parameters()])

    torch.testing.assert_close(res.fisher, run(DiagGGNExact(), torch.zeros(n, dtype=torch.long), "mean"),
                               rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(run(DiagHessian(), fc.sample_labels(model, X, seed=3)[0], "sum") / n,
                               fc.estimate(model, X, estimator="i2", seed=3), rtol=1e-10, atol=1e-13)
    R = 150
    Y = fc.sample_labels(model, X, n_draws=R, seed=4)
    draws = torch.stack([run(DiagHessian(), Y[r], "sum") / n for r in range(R)])
    var = res.variance("i2")  # Var of one pass's mean over the n inputs
    sd = torch.sqrt(var / R)
    assert bool(((draws.mean(0) - res.fisher).abs() <= 6 * sd + 1e-12).all())
    live = var > 1e-12 * float(var.max())
    assert bool((draws[:, ~live] - res.fisher[~live]).abs().max() < 1e-12)  # the head: Î2 exact, v2 = 0
    ratio = draws.var(0)[live] / var[live]
    # the sample variance of R draws: relative sd about sqrt(2 / (R - 1)) (heavier tails allowed for)
    assert abs(float(ratio.mean()) - 1) < 0.15 and bool(((ratio > 0.4) & (ratio < 2.0)).all()), ratio


def test_conv_rules_are_recognised_only_where_they_hold():
    """A conv whose weight is also used elsewhere, or a reflect-padded conv, takes the column rule; still exact."""

    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = nn.Conv2d(1, 1, 3, padding=1), nn.Linear(16, 2)

        def forward(self, x):
            z = torch.tanh(self.conv(x))
            return self.head((z * self.conv.weight.sum()).flatten(1))

    for make in (Tied, lambda: nn.Sequential(nn.Conv2d(1, 1, 3, padding=1, padding_mode="reflect"), nn.Tanh(),
                                             nn.Flatten(), nn.Linear(16, 2))):
        net = _build(make)
        model = fc_torch.from_module(net, input_shape=(1, 4, 4))
        assert model.convs == []
        X = torch.randn(3, 1, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(0))
        _assert_exact(net, X, fc.analyze(model, X), "conv rule not applicable")


def test_float32_cnn_matches_float64():
    """float32 through the conv rules stays within float32 rounding of the float64 analysis."""
    net = _build(_digits_cnn, seed=1)
    X = torch.randn(8, 1, 8, 8, dtype=F64, generator=torch.Generator().manual_seed(4))
    ref = fc.analyze(fc_torch.from_module(net, input_shape=(1, 8, 8)), X)
    got = fc.analyze(fc_torch.from_module(copy.deepcopy(net).float(), input_shape=(1, 8, 8)), X.float())
    for f in ("fisher", "v1", "v2", "c12"):
        want = getattr(ref, f)
        err = float((getattr(got, f).double() - want).abs().max()) / float(want.abs().max())
        assert err < 1e-4, (f, err)
    assert np.isfinite(float(got.v2.sum()))


def test_threads_share_a_model_safely():
    """Four threads analysing one from_function model (whose calls may run in parallel) and one from_module CNN at
    once get the numbers each gets alone: nothing of a call is kept on the model."""
    from concurrent.futures import ThreadPoolExecutor

    net = _build(CASES["groups-maxpool"][0])
    params = {k: v.detach() for k, v in net.named_parameters()}
    fn_model = fc_torch.from_function(lambda p, x: torch.func.functional_call(net, p, (x,)), params,
                                      input_shape=(2, 4, 4))
    mod_model = fc_torch.from_module(net, input_shape=(2, 4, 4))
    inputs = [torch.randn(3 + k, 2, 4, 4, dtype=F64, generator=torch.Generator().manual_seed(k)) for k in range(4)]
    for model in (fn_model, mod_model):
        alone = [fc.analyze(model, X).v2 for X in inputs]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda X, m=model: fc.analyze(m, X).v2, inputs))
        for a, b in zip(alone, together):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


class Bypass(nn.Module):
    """conv0's output reaches the last activation both through conv1 and around it (a skip): no channel-by-channel
    path through conv1 holds, so conv0 pushes each weight's tangent on its own."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1, self.head = nn.Conv2d(1, 2, 3, padding=1), nn.Conv2d(2, 2, 3, padding=1), \
            nn.Linear(2 * 16, 3)

    def forward(self, x):
        a = torch.tanh(self.conv0(x))
        return self.head(torch.tanh(self.conv1(a) + a).flatten(1))


class Shuffled(nn.Module):
    """Channels 1 and 3 of five swapped between the convolutions (a channel shuffle that leaves the first, middle and
    last channel in place): not channel by channel."""

    def __init__(self):
        super().__init__()
        self.conv0, self.conv1, self.head = nn.Conv2d(1, 5, 3, padding=1), nn.Conv2d(5, 2, 3), nn.Linear(2 * 4, 3)

    def forward(self, x):
        a = torch.tanh(self.conv0(x))
        a = torch.cat([a[:, :1], a[:, 3:4], a[:, 2:3], a[:, 1:2], a[:, 4:]], dim=1)
        return self.head(torch.tanh(self.conv1(a)).flatten(1))


def test_channel_by_channel_path_through_the_next_conv():
    """A conv layer's weights whose tangents stay in their own channel up to the next conv (through pooling, eval
    BatchNorm and activations on the way; activations reading a conv's output through a BatchNorm take the direct
    terms, scaled) are pushed forward one row of patches at a time, every output channel at
    once, and through that conv channel by channel (docs/math.md §13): the path each layer takes is as stated, and
    every field equals brute force, also in pieces of one direction (chunk=1).  Where the output also reaches a
    later activation around that conv, or channels are swapped on the way, it does not take this path.  The
    per-channel map itself, with groups, stride and dilation, sums to the convolution and equals it on each channel
    alone; the sets of channels the check uses separate any two channels."""
    from fishercore.backends.rules import conv

    pre = lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.MaxPool2d(2), nn.BatchNorm2d(3),  # noqa: E731
                                nn.Sigmoid(), nn.Conv2d(3, 2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(2, 3))
    # conv → BatchNorm → activation, twice: the activations read each conv's output scaled, elementwise
    batchnorm = lambda: nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Tanh(),  # noqa: E731
                                      nn.MaxPool2d(2), nn.Conv2d(3, 2, 2), nn.BatchNorm2d(2), nn.GELU(), nn.Flatten(),
                                      nn.Linear(2, 3))
    # per layer: (via, pre, post_readers, post_others, scaled, post_scaled)
    cases = {"pre": (pre, (1, 4, 4), {0: (1, (1,), (2,), (), (), ())}),
             "three-convs": (CASES["three-convs"][0], (1, 4, 4), {0: (1, (), (1,), (2,), (), ()),
                                                                   1: (2, (), (2,), (), (), ())}),
             "batchnorm": (batchnorm, (1, 4, 4), {0: (1, (), (), (), (0,), (1,)), 1: (None, (), (), (), (1,), ())}),
             "bypass": (Bypass, (1, 4, 4), {0: (None, (), (), (), (), ())}),
             "shuffled": (Shuffled, (1, 4, 4), {0: (None, (), (), (), (), ())})}
    for name, (make, shape, want) in cases.items():
        net = _build(make, seed=3)
        X = torch.randn(4, *shape, dtype=F64, generator=torch.Generator().manual_seed(5))
        for chunk in (256, 1):
            model = fc_torch.from_module(net, input_shape=shape, chunk=chunk)
            got = {k: (s.via, s.pre, s.post_readers, s.post_others, s.scaled, s.post_scaled)
                   for k, s in model._conv_sites.items()}
            assert {k: got[k] for k in want} == want, (name, got)
            _assert_exact(net, X, fc.analyze(model, X), f"channel path {name}, chunk {chunk}")

    for O in (1, 2, 5, 8, 13):  # any two channels: a set holds one and not the other
        sets = conv.channel_sets(O).astype(bool)
        assert len(sets) <= 2 * max(1, (O - 1).bit_length())
        assert all(any(s[a] and not s[b] for s in sets) for a in range(O) for b in range(O) if a != b)
    gen = torch.Generator().manual_seed(0)
    for groups, stride, dilation in ((1, 1, 1), (2, 2, 1), (4, 1, 2)):
        layer = nn.Conv2d(4, 6 if groups != 4 else 4, 3, stride=stride, padding=1, dilation=dilation, groups=groups,
                          bias=False).to(F64)
        U = torch.randn(3, 4, 7, 7, dtype=F64, generator=gen)
        out = layer(U)
        spec = conv.ConvSpec(4, layer.out_channels, groups, (3, 3), (stride,) * 2, ((1, 1),) * 2, (dilation,) * 2,
                             (7, 7), tuple(out.shape[2:]))
        per = conv.channel_outputs(U, layer.weight.detach(), spec)  # (I, O, 3, P)
        torch.testing.assert_close(per.sum(0).transpose(0, 1), out.detach().reshape(3, layer.out_channels, -1),
                                   rtol=1e-12, atol=1e-12)
        for i in range(4):
            alone = torch.zeros_like(U)
            alone[:, i] = U[:, i]
            torch.testing.assert_close(per[i].transpose(0, 1), layer(alone).detach().reshape(3, layer.out_channels, -1),
                                       rtol=1e-12, atol=1e-12)
