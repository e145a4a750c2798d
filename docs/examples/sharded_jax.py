"""Sharded analysis over JAX devices: shard_map over the inputs, psum of the sums.

On a multi-GPU host ``jax.devices()`` are the GPUs.  Here, on a CPU, XLA is asked for four
host devices (the flag must be set before JAX is imported).  The result is checked against
one single-device analysis of all the data.
"""

import os

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import fishercore as fc  # noqa: E402
from fishercore.backends import jax as fc_jax  # noqa: E402

jax.config.update("jax_enable_x64", True)
keys = jax.random.split(jax.random.PRNGKey(0), 4)
params = [(jax.random.normal(keys[0], (32, 20)) / 4, jnp.zeros(32)),
          (jax.random.normal(keys[1], (32, 32)) / 6, jnp.zeros(32)),
          (jax.random.normal(keys[2], (5, 32)) / 6, jnp.zeros(5))]
model = fc_jax.from_mlp(params, "tanh")
X = jax.random.normal(keys[3], (1001, 20))

devices = jax.devices()
sharded = fc_jax.analyze_sharded(model, X, "categorical", batch_size=64, devices=devices)
single = fc.analyze(model, X, "categorical", batch_size=64)
dev = max(float(jnp.max(jnp.abs(getattr(sharded, f) - getattr(single, f))) / jnp.max(jnp.abs(getattr(single, f))))
          for f in ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper"))
print(f"{len(devices)} devices, {sharded.n_inputs} inputs; largest deviation from one device: {dev:.1e}")
assert sharded.n_inputs == X.shape[0] and dev <= 1e-12
