"""EWC with fishercore on a torch model: exact Fisher penalty weights, and how noisy a Monte-Carlo estimate would be.

Elastic weight consolidation protects what a network learned on task A while it trains on task B
with the penalty  λ/2 Σ_i F_i (θ_i − θ*_i)²,  F the diagonal Fisher at the task-A solution θ*.
fishercore gives F exactly, and says how many label draws a Monte-Carlo estimate of F would need.
"""

import numpy as np
import torch

import fishercore as fc
from fishercore.backends import torch as fc_torch

torch.manual_seed(0)
rng = np.random.default_rng(0)


def task(centres, n=600):
    """Gaussian blobs in 10-D, one class per centre."""
    y = rng.integers(0, len(centres), n)
    X = np.asarray(centres)[y] + rng.normal(size=(n, 10))
    return torch.tensor(X), torch.tensor(y)


centres = rng.normal(size=(4, 10)) * 2.5
XA, yA = task(centres)
XB, yB = task(rng.normal(size=(4, 10)) * 2.5 + 4.0)  # four new classes' blobs in a neighbouring region

net = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()


def train(model, X, y, steps=300, penalty=None):
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(X), y)
        if penalty is not None:
            loss = loss + penalty(model)
        loss.backward()
        opt.step()


def accuracy(model, X, y):
    with torch.no_grad():
        return float((model(X).argmax(1) == y).double().mean())


train(net, XA, yA)
res = fc.analyze(fc_torch.from_sequential(net), XA, family="categorical")
F = res.fisher  # exact diagonal Fisher at θ*, a float64 tensor in parameter order
star = [p.detach().clone() for p in net.parameters()]

# How good would a Monte-Carlo estimate of these EWC weights be?  Relative std per parameter, one draw per input:
rel = (res.variance("i1", n_draws=1).sqrt() / F).nan_to_num(posinf=0.0)
print(f"exact Fisher: {F.numel()} weights; one-draw Î1 estimate: median relative std {rel.median():.2%}")
M1, M2 = (res.sample_size(e, rel_error=0.1, confidence=0.95) for e in ("i1", "i2"))
print(f"label draws per input for ±10% at 95% (median over weights): Î1 {M1.median():.0f}, Î2 {M2.median():.0f}")


def ewc(lam):
    def penalty(model):
        flat = torch.cat([(p - s).reshape(-1) for p, s in zip(model.parameters(), star)])
        return 0.5 * lam * torch.sum(F * flat**2)
    return penalty


results = {}
for name, penalty in (("plain fine-tuning", None), ("EWC, λ = 1e4", ewc(1e4))):
    model = torch.nn.Sequential(torch.nn.Linear(10, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).double()
    model.load_state_dict(net.state_dict())
    train(model, XB, yB, penalty=penalty)
    results[name] = (accuracy(model, XA, yA), accuracy(model, XB, yB))
    print(f"{name:<18} task A accuracy {results[name][0]:.3f}   task B accuracy {results[name][1]:.3f}")
assert results["EWC, λ = 1e4"][0] > results["plain fine-tuning"][0]  # EWC kept more of task A
