"""Time fishercore on a 64-128-128-10 tanh MLP and 1,797 inputs of width 64 (sklearn-digits-sized), per backend.

Run: python benchmarks/analyze_time.py [--repeat 5] [--batch-size 256] [--backends numpy,torch,...]

Backends (each skipped with a note when its framework is not installed):
  numpy          hand-written MLP on NumPy arrays (the reference)
  mlp-torch      hand-written MLP on torch tensors
  torch          fishercore.backends.torch.from_sequential (torch.func)
  jax            fishercore.backends.jax.from_mlp (jit-compiled)
  mlp-jax        hand-written MLP on JAX arrays
Prints the median wall time of analyze and of estimate("i1") / estimate("i2") with one draw, float64.
"""

import argparse
import statistics
import time

import numpy as np

import fishercore as fc
from fishercore.backends import mlp

WIDTHS = [64, 128, 128, 10]


def build(name, layers, X):
    if name == "numpy":
        return mlp.MLP(layers, "tanh"), X
    if name in ("mlp-torch", "torch"):
        import torch

        torch.set_num_threads(2)
        Xt = torch.from_numpy(X)
        if name == "mlp-torch":
            return mlp.MLP([(torch.from_numpy(W), torch.from_numpy(b)) for W, b in layers], "tanh"), Xt
        from fishercore.backends import torch as fc_torch

        return fc_torch.from_sequential(fc_torch.sequential_from_layers(layers, "tanh")), Xt
    import jax
    import jax.numpy as jnp

    jax.config.update("jax_enable_x64", True)
    pairs = [(jnp.asarray(W), jnp.asarray(b)) for W, b in layers]
    if name == "mlp-jax":
        return mlp.MLP(pairs, "tanh"), jnp.asarray(X)
    from fishercore.backends import jax as fc_jax

    return fc_jax.from_mlp(pairs, "tanh"), jnp.asarray(X)


def timed(job, repeat):
    job()  # warm-up (and JIT compilation)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = job()
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=None)
    ap.add_argument("--backends", default="numpy,mlp-torch,torch,jax,mlp-jax")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), rng.normal(size=o) * 0.1) for i, o in zip(WIDTHS[:-1], WIDTHS[1:])]
    X = rng.normal(size=(1797, 64))
    bs = args.batch_size
    print(f"64-128-128-10 tanh, n=1797, float64, batch {bs}; median of {args.repeat} [ms]")
    print(f"{'backend':<10} {'analyze':>9} {'i1 (M=1)':>9} {'i2 (M=1)':>9}")
    for name in args.backends.split(","):
        try:
            model, Xb = build(name, layers, X)
        except ImportError as e:
            print(f"{name:<10} skipped: {e}")
            continue
        print(f"{name:<10} " + " ".join(f"{t:>9.1f}" for t in time_backend(model, Xb, bs, args.repeat)), flush=True)


def time_backend(model, X, batch_size, repeat):
    row = [timed(lambda: fc.analyze(model, X, batch_size=batch_size).sums.v2, repeat)]
    for est in ("i1", "i2"):
        row.append(timed(lambda est=est: fc.estimate(model, X, estimator=est, seed=0, batch_size=batch_size), repeat))
    return row


if __name__ == "__main__":
    main()
