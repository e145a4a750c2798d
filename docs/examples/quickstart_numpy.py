"""NumPy quickstart: how noisy are Î1 and Î2 for each layer of a small tanh MLP?"""

import numpy as np

import fishercore as fc
from fishercore.backends import mlp

rng = np.random.default_rng(0)
widths = [64, 32, 32, 10]
layers = [(rng.normal(size=(o, i)) / np.sqrt(i), np.zeros(o)) for i, o in zip(widths[:-1], widths[1:])]
model = mlp.MLP(layers, activation="tanh")
X = rng.normal(size=(500, 64))

res = fc.analyze(model, X, family="categorical")
print(res.summary())
M = res.unflatten(res.sample_size("i1", rel_error=0.1, confidence=0.95))
print("median draws per input for 10% error, layer 0 weights, Î1:", np.median(M["0.weight"]))
