"""First-order analysis of a character transformer: fishercore against the straightforward torch.func approach.

Run from the repository root:

    python benchmarks/transformer.py                                   # width 64, 1 block, T = 32, 32 sequences
    python benchmarks/transformer.py --width 128 --depth 2 --hidden 512 --context 64 --sequences 256   # issue size
    python benchmarks/transformer.py ... --jax      # also JAX's from_function of the same weights

The model is :class:`fishercore.report.transformer.CharTransformer` (55 characters, outputs
(n, T, 55)), float32, torch on the CPU, with random token ids.  Both sides compute, per parameter,
the Fisher, Var Î1 and var_x of a sequence model (docs/math.md §12), in batches of
``--batch`` sequences:

* **torch.func**: ``vmap`` over the sequences of ``jacrev`` of the flattened outputs (the full
  (T·C, P) Jacobian of each sequence), then the categorical moments per position and their sums;
* **fishercore**: ``analyze(from_module(net, max_params=1), X, memory_budget=...)``: every
  first-order field and the v1 bounds; second order is skipped (not computed), except where
  w = 0.  Batches are sized to the budget; when one sequence's columns exceed it, sequences go
  one at a time and parameter groups a few at a time.

Side by side in one process, medians of ``--repeat`` runs after a warm-up, with the peak RSS
growth of each (``/proc/self/status`` VmHWM, reset before each).  The largest deviation
between the two Fishers and Var Î1 is printed as a check.  Benchmarks are not tests: nothing
here asserts a time.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from memory import peak, reset_peak  # benchmarks/memory.py, beside this script

import fishercore as fc
from fishercore.backends import torch as fc_torch
from fishercore.report import transformer as tr


def baseline(net, X, batch):
    """Fisher, Var Î1 and var_x per parameter from the full per-sequence Jacobians (vmap of jacrev)."""
    params = {k: v.detach() for k, v in net.named_parameters()}
    T, C = X.shape[1], net.head.out_features

    def h(p, x):
        return torch.func.functional_call(net, p, (x[None],))[0].reshape(-1)

    jac = torch.func.vmap(torch.func.jacrev(h), in_dims=(None, 0))
    sums = {k: [torch.zeros(v.numel()), torch.zeros(v.numel()), torch.zeros(v.numel())] for k, v in params.items()}
    with torch.no_grad():
        for a in range(0, X.shape[0], batch):
            Xb = X[a:a + batch]
            n = Xb.shape[0]
            p = torch.softmax(net(Xb), -1)[:, :, :, None]  # (n, T, C, 1)
            for k, J in jac(params, Xb).items():
                u = J.reshape(n, T, C, -1)
                d = u - (p * u).sum(2, keepdim=True)
                d2 = d * d
                I_t = (p * d2).sum(2)  # (n, T, P)
                I = I_t.sum(1)
                v1 = ((p * d2 * d2).sum(2) - I_t * I_t).sum(1) + 2.0 * (I * I - (I_t * I_t).sum(1))
                sums[k][0] += I.sum(0)
                sums[k][1] += v1.sum(0)
                sums[k][2] += (I * I).sum(0)
    n = X.shape[0]
    fisher = torch.cat([s[0] for s in sums.values()]) / n
    v1 = torch.cat([s[1] for s in sums.values()]) / n
    var_x = torch.cat([s[2] for s in sums.values()]) / n - fisher * fisher
    return fisher, v1, var_x


def jax_row(cfg, X, args, ref):
    """The transformer through JAX's ``from_function``, float32, ``max_params=1``, the same weights and sequences:
    a line with the first call's time (compilation included), the median of ``args.repeat`` later calls, and the
    largest relative deviation of its Fisher, Var Î1 and var_x from torch's ``ref`` (each in torch's order)."""
    import jax
    import jax.numpy as jnp

    from fishercore.backends import jax as fc_jax

    params = {k: jnp.asarray(v, dtype=jnp.float32) for k, v in tr.init_params(cfg, 0, perturb=0.1).items()}
    model = fc_jax.from_function(tr.JaxCharTransformer(heads=cfg.heads, depth=cfg.depth), params,
                                 input_shape=(cfg.context,), input_dtype=jnp.int32, n_tokens=cfg.vocab, max_params=1)
    Xj = jnp.asarray(X.numpy(), dtype=jnp.int32)

    def run():
        res = fc.analyze(model, Xj, memory_budget=args.memory_budget)
        jax.block_until_ready(res.fisher)
        return res

    t = time.perf_counter()
    res = run()
    first = time.perf_counter() - t
    times = []
    for _ in range(args.repeat):
        t = time.perf_counter()
        res = run()
        times.append(time.perf_counter() - t)
    order = [n for n, _ in cfg.names_and_shapes()]  # JAX orders a dict's leaves by key; torch, as the module does
    dev = 0.0
    for f in ("fisher", "v1", "var_x"):
        got = np.concatenate([np.asarray(res.unflatten(getattr(res, f))[n]).reshape(-1) for n in order])
        want = getattr(ref, f).numpy()
        dev = max(dev, float(np.abs(got - want).max() / np.abs(want).max()))
    return (f"JAX from_function, first order, within {args.memory_budget / 2**20:.0f} MiB: "
            f"{statistics.median(times):.2f} s ({first:.2f} s with compilation); largest relative deviation "
            f"from torch (F, Var Î1, var_x): {dev:.1e}")


def timed(job, repeat):
    job()
    times, peaks = [], []
    for _ in range(repeat):
        before = reset_peak()  # the peak starts afresh at the current RSS
        t = time.perf_counter()
        out = job()
        times.append(time.perf_counter() - t)
        peaks.append(peak() - before)
    return statistics.median(times), max(peaks), out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=1)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--sequences", type=int, default=32)
    p.add_argument("--batch", type=int, default=4, help="sequences per batch of the torch.func side")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--memory-budget", type=float, default=512 * 2**20)
    p.add_argument("--jax", action="store_true",
                   help="also the same weights as JAX's from_function (JaxCharTransformer): the first call, "
                        "compilation included, then the median of --repeat calls, and its deviation from torch's")
    p.add_argument("--skip-reference", action="store_true",
                   help="time fishercore only (the reference's full Jacobians need T·C·P numbers per sequence: "
                        "5.9 GB in float32 at the issue's size, before its moments' temporaries)")
    args = p.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    cfg = tr.Config(context=args.context, width=args.width, heads=args.heads, depth=args.depth, hidden=args.hidden)
    net = tr.torch_model(cfg, tr.init_params(cfg, 0, perturb=0.1), dtype=torch.float32)
    X = torch.as_tensor(np.random.default_rng(1).integers(0, cfg.vocab, size=(args.sequences, cfg.context)))
    P = sum(v.numel() for v in net.parameters())
    model = fc_torch.from_module(net, input_shape=(cfg.context,), input_dtype=torch.long, max_params=1)
    ours, ours_rss, res = timed(lambda: fc.analyze(model, X, memory_budget=args.memory_budget), args.repeat)
    if args.jax:
        print(jax_row(cfg, X, args, res), flush=True)
    if args.skip_reference:
        print(f"transformer: width {cfg.width}, {cfg.depth} block(s), hidden {cfg.hidden}, T = {cfg.context}, "
              f"C = {cfg.vocab}, P = {P:,}; {args.sequences} sequences, float32, fishercore within "
              f"{args.memory_budget / 2**20:.0f} MiB: {ours:.2f} s ({ours / args.sequences:.2f} s per sequence), "
              f"peak RSS growth {ours_rss / 2**20:.0f} MiB")
        return
    base, base_rss, (f, v1, vx) = timed(lambda: baseline(net, X, args.batch), args.repeat)
    dev = max(float((res.fisher - f).abs().max() / f.abs().max()), float((res.v1 - v1).abs().max() / v1.abs().max()),
              float((res.var_x - vx).abs().max() / vx.abs().max()))
    print(f"transformer: width {cfg.width}, {cfg.depth} block(s), hidden {cfg.hidden}, T = {cfg.context}, "
          f"C = {cfg.vocab}, P = {P:,}; {args.sequences} sequences, float32, torch.func in batches of {args.batch}, "
          f"fishercore within {args.memory_budget / 2**20:.0f} MiB, "
          f"{torch.get_num_threads()} threads")
    print("| method | seconds (median) | peak RSS growth (MiB) |")
    print("|---|---|---|")
    print(f"| torch.func: vmap(jacrev) + moments | {base:.2f} | {base_rss / 2**20:.0f} |")
    print(f"| fishercore analyze, first order | {ours:.2f} | {ours_rss / 2**20:.0f} |")
    print(f"ratio fishercore / torch.func: {ours / base:.2f}; largest relative deviation (F, Var Î1, var_x): "
          f"{dev:.1e}")


if __name__ == "__main__":
    main()
