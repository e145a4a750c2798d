"""The generic path (``from_function``: full columns by autodiff) against the dense rule (``from_sequential``).

Run from the repository root:

    python benchmarks/generic.py                      # 64-128-128-10 and the 99,530-parameter MLP, 1,797 inputs
    python benchmarks/generic.py --widths 64 128 10 --n 500
    python benchmarks/generic.py --jax                # also JAX: from_function against from_mlp

Same network, same inputs, float64, torch on the CPU, side by side in one process.
``from_sequential`` computes every field by the dense-chain rule; ``from_module`` every field
by per-neuron perturbations of each Linear; ``from_function`` above its ``max_params`` every
first-order field (the second-order ones are not computed), and its output layer's second order
(w = 0, read off the traced graph).  ``--jax`` adds JAX's ``from_function`` (every field: the
function is recognised as a dense chain and gets the dense-chain rule, docs/math.md §8) against
``from_mlp`` (the same rule).  Medians of ``--repeat`` runs after a warm-up.
Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

import fishercore as fc
from fishercore.backends import torch as fc_torch


def median_time(job, repeat):
    job()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        job()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", action="append",
                   help="layer widths (repeatable); default 64 128 128 10 and 64 300 200 10")
    p.add_argument("--n", type=int, default=1797)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jax", action="store_true", help="also JAX's from_function against from_mlp")
    args = p.parse_args()
    rng = np.random.default_rng(0)
    print("| network | P | from_sequential, every field (s) | from_module, every field (s) | "
          "from_function, first order (s) | ratios |")
    print("|---|---|---|---|---|---|")
    for widths in args.widths or [[64, 128, 128, 10], [64, 300, 200, 10]]:
        a, m, b, P = compare(widths, rng.normal(size=(args.n, widths[0])), args.repeat)
        print(f"| {'-'.join(map(str, widths))} tanh | {P:,} | {a:.2f} | {m:.2f} | {b:.2f} | "
              f"{m / a:.1f}×, {b / a:.1f}× |", flush=True)
    if args.jax:
        print("\n| network (JAX) | P | from_mlp, every field (s) | from_function, every field (s) | ratio | "
              "max rel. difference |")
        print("|---|---|---|---|---|---|")
        for widths in args.widths or [[64, 128, 128, 10], [64, 300, 200, 10]]:
            a, b, P, err = compare_jax(widths, rng.normal(size=(args.n, widths[0])), args.repeat)
            print(f"| {'-'.join(map(str, widths))} tanh | {P:,} | {a:.2f} | {b:.2f} | {b / a:.1f}× | {err:.1e} |",
                  flush=True)


def compare_jax(widths, X, repeat):
    """Seconds of ``analyze`` through JAX's from_mlp and from_function (float64), the parameter count and the
    largest relative difference of any field."""
    import jax
    import jax.numpy as jnp

    from fishercore.backends import jax as fc_jax

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(1)
    layers = [(jnp.asarray(rng.normal(size=(o, i)) / np.sqrt(i)), jnp.asarray(0.1 * rng.normal(size=o)))
              for i, o in zip(widths[:-1], widths[1:])]
    params = [{"W": W.T, "b": b} for W, b in layers]  # x @ W + b, W (in, out)

    def fn(p, x):
        for k, layer in enumerate(p):
            x = x @ layer["W"] + layer["b"]
            x = jnp.tanh(x) if k < len(p) - 1 else x
        return x

    X = jnp.asarray(X)
    ref = fc_jax.from_mlp(layers, "tanh")
    gen = fc_jax.from_function(fn, params, input_shape=(widths[0],))

    def run(model):
        res = fc.analyze(model, X)
        jax.block_until_ready(res.v2)
        return res

    a, b = median_time(lambda: run(ref), repeat), median_time(lambda: run(gen), repeat)
    ra, rb = run(ref), run(gen)
    err = 0.0
    for f in ("fisher", "v1", "v2", "c12"):
        va, vb = np.asarray(getattr(ra, f)), np.asarray(getattr(rb, f))
        for g in rb.groups:  # from_function's W is (in, out); from_mlp's (out, in)
            k, kind = g.name.split(".")
            ga = next(h for h in ra.groups if h.name == f"{k}.{0 if kind == 'W' else 1}")  # from_mlp: (W, b) pairs
            want = va[ga.offset:ga.offset + ga.size].reshape(ga.shape)
            got = vb[g.offset:g.offset + g.size].reshape(g.shape)
            err = max(err, float(np.abs((got.T if kind == "W" else got) - want).max() / np.abs(va).max()))
    return a, b, sum(int(np.prod(g.shape)) for g in rb.groups), err


def compare(widths, X, repeat):
    """Seconds of ``analyze`` through from_sequential, from_module and from_function, and the parameter count."""
    torch.manual_seed(0)
    mods = []
    for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
        mods += [torch.nn.Linear(a, b)] + ([torch.nn.Tanh()] if i < len(widths) - 2 else [])
    net = torch.nn.Sequential(*mods).double().eval()
    X = torch.from_numpy(X)
    params = {k: v.detach() for k, v in net.named_parameters()}
    seq = fc_torch.from_sequential(net)
    gen = fc_torch.from_function(lambda prm, x: torch.func.functional_call(net, prm, (x,)), params,
                                 input_shape=(widths[0],))
    mod = fc_torch.from_module(net)
    return (median_time(lambda: fc.analyze(seq, X), repeat), median_time(lambda: fc.analyze(mod, X), repeat),
            median_time(lambda: fc.analyze(gen, X), repeat), sum(v.numel() for v in params.values()))

if __name__ == "__main__":
    main()
