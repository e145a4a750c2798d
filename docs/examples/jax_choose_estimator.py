"""Choosing Î1 or Î2 per layer for a JAX model, and the best unbiased mix of the two.

For every parameter group: which estimator has the smaller variance, how many label draws each
needs, and the optimal combination α Î1 + (1 − α) Î2 (never worse than either); then a plan for a
target error, carried out by one estimate call.
"""

import jax
import jax.numpy as jnp
import numpy as np

import fishercore as fc
from fishercore.backends import jax as fc_jax

jax.config.update("jax_enable_x64", True)
keys = jax.random.split(jax.random.PRNGKey(0), 4)
widths = [12, 32, 32, 6]
params = [{"kernel": jax.random.normal(k, (i, o)) * jnp.sqrt(2.0 / (i + o)), "bias": jnp.zeros(o)}
          for k, i, o in zip(keys, widths[:-1], widths[1:])]
X = jax.random.normal(keys[-1], (500, 12))

model = fc_jax.from_mlp(params, "softplus")
res = fc.analyze(model, X, family="categorical")
by = {k: res.unflatten(getattr(res, k)) for k in ("fisher", "v1", "v2")}
best = res.unflatten(res.optimal_v())
alpha = res.unflatten(res.alpha())
M = {e: res.unflatten(res.sample_size(e, rel_error=0.1, confidence=0.95)) for e in ("i1", "i2", "optimal")}

choice = res.choose()  # per group: the least summed relative variance per draw (pass costs= to weigh them)
print(f"{'group':<10} {'use':>8} {'Î2 wins':>8} {'draws Î1':>9} {'draws Î2':>9} {'mix α*':>7} {'draws mix':>9}")
for g in res.groups:
    v1, v2 = by["v1"][g.name], by["v2"][g.name]
    wins = float(jnp.mean(v2 < v1))
    med = {e: float(jnp.median(M[e][g.name])) for e in M}
    print(f"{g.name:<10} {choice[g.name]:>8} {wins:>8.0%} {med['i1']:>9.0f} {med['i2']:>9.0f} "
          f"{float(jnp.median(alpha[g.name])):>7.2f} {med['optimal']:>9.0f}")
    assert bool(jnp.all(best[g.name] <= jnp.minimum(v1, v2)))  # the mix is never worse

# The decision for a target: per group the estimator and the draws per input for 10 % error at 95 %
# confidence on 95 % of its parameters, then one estimate call that carries it out.
plan = res.plan(rel_error=0.1, confidence=0.95, coverage=0.95)
print(plan)
planned = fc.estimate(model, X, estimator=plan.estimators, n_draws=plan.n_draws, analysis=res, seed=1)
flat_true = res.fisher
within = float(jnp.mean((jnp.abs(planned - flat_true) <= 0.1 * flat_true)[flat_true > 0]))
print(f"the plan: {within:.1%} of the parameters with F > 0 within 10 %")
assert within >= 0.95

# The estimate itself: one draw per input, jit-compiled, in the kernel's own (in, out) shape.
est = res.unflatten(fc.estimate(model, X, family="categorical", estimator="i2", n_draws=1, seed=0))
last_est, last_true = np.asarray(est["2.kernel"]), np.asarray(by["fisher"]["2.kernel"])
err = np.linalg.norm(last_est - last_true) / np.linalg.norm(last_true)
print(f"last layer: one Î2 draw per input is exact (relative error {err:.1e})")
