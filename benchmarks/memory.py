"""Peak memory of ``analyze`` and ``estimate`` against ``memory_budget``, per backend.

Run from the repository root:

    python benchmarks/memory.py                         # issue 13's case: 784-512-512-10, 20,000 inputs, 64 MiB
    python benchmarks/memory.py --n 2000 --budget 64    # quicker
    python benchmarks/memory.py --job estimate --n-draws 400000 --n 100
    python benchmarks/memory.py --model sequence --backends jax --n 8 --budget 400   # JAX from_function, T = 64
    python benchmarks/memory.py --model transformer --backends torch --n 8 --budget 512   # torch from_module
    python benchmarks/memory.py --model cnn --backends torch --n 1797 --budget 24   # the digits CNN, torch

Each case runs in a fresh process.  After the model and the inputs exist (and, for JAX, after
one call on a few inputs has compiled the code, which is XLA's memory, not the budget's), the
process's peak resident set is reset (``/proc/self/clear_refs``) and the job runs; the growth
reported is ``VmHWM − VmRSS before``: everything the call allocated at its peak.  The model's
weights and X are outside it (they exist before the call).  Results go to stdout as a Markdown
table.  Benchmarks are not tests: the test ``tests/test_memory.py`` asserts the budget on a
smaller case.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

MIB = 2**20


def _status(key):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(key)


def reset_peak():
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); return the current RSS in bytes."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def peak():
    return _status("VmHWM")


def sequence_function(n, seed=0):
    """A JAX ``from_function`` model with sequence outputs: a tanh layer of width 512 and a dense 512 → 10 at each
    of 64 positions (T·C = 640 outputs, 13,824 parameters), float64; the first layer's kernel and bias take the
    operation-by-operation rule, whose cotangents of every curved value outgrow the columns."""
    import jax
    import numpy as np
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    from fishercore.backends import jax as fj

    rng = np.random.default_rng(seed)
    params = {"W1": jnp.asarray(rng.normal(size=(16, 512)) / 4), "b1": jnp.asarray(0.1 * rng.normal(size=512)),
              "W2": jnp.asarray(rng.normal(size=(512, 10)) / 16)}

    def f(p, x):  # (n, 64, 16) → (n, 64, 10)
        return jnp.tanh(x @ p["W1"] + p["b1"]) @ p["W2"]

    return fj.from_function(f, params, input_shape=(64, 16)), jnp.asarray(rng.normal(size=(n, 64, 16)))


def transformer_module(n, seed=0, width=64, hidden=256):
    """torch ``from_module`` of :class:`fishercore.report.transformer.CharTransformer` (by default width 64, one block,
    MLP width 256, T = 32, 55 characters: 59,255 parameters, T·C = 1,760 outputs), float32, on n random sequences:
    its backward passes hold 1,760 cotangents of its values, 32 × 256 numbers each for the MLP's."""
    import numpy as np
    import torch

    from fishercore.backends import torch as ft
    from fishercore.report import transformer as tr

    torch.set_num_threads(os.cpu_count())
    cfg = tr.Config(context=32, width=width, heads=2, depth=1, hidden=hidden)
    net = tr.torch_model(cfg, tr.init_params(cfg, seed, perturb=0.1), dtype=torch.float32)
    X = torch.as_tensor(np.random.default_rng(seed + 1).integers(0, cfg.vocab, size=(n, cfg.context)))
    return ft.from_module(net, input_shape=(cfg.context,), input_dtype=torch.long, max_params=1), X


def cnn_module(n, seed=0):
    """torch ``from_module`` of the report's digits CNN (:mod:`fishercore.report.cnn`, 1,898 parameters, float64) on
    n random 8×8 images: every field, the first convolution's curvature by way of the second (docs/math.md §13)."""
    import torch

    from fishercore.backends import torch as ft
    from fishercore.report import cnn

    torch.set_num_threads(os.cpu_count())
    config = cnn.Config()
    net = cnn.torch_model(config, cnn.init_params(config, seed), dtype=torch.float64)
    X = torch.rand((n, 1, 8, 8), generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return ft.from_module(net, input_shape=(1, 8, 8)), X


def build(backend, widths, n, seed=0, model="mlp"):
    import numpy as np

    if model == "cnn":
        if backend != "torch":
            raise ValueError("--model cnn: torch only")
        return cnn_module(n, seed)
    if model == "transformer":
        if backend != "torch":
            raise ValueError("--model transformer: torch only")
        return transformer_module(n, seed)
    if model == "sequence":
        if backend != "jax":
            raise ValueError("--model sequence: JAX only")
        return sequence_function(n, seed)
    rng = np.random.default_rng(seed)
    layers = [(rng.normal(size=(o, i)) / np.sqrt(i), 0.1 * rng.normal(size=o)) for i, o in zip(widths[:-1], widths[1:])]
    X = rng.normal(size=(n, widths[0]))
    if backend == "numpy":
        from fishercore.backends import mlp
        return mlp.MLP(layers, "tanh"), X
    if backend == "torch":
        import torch

        from fishercore.backends import torch as ft
        torch.set_num_threads(os.cpu_count())
        return ft.from_sequential(ft.sequential_from_layers(layers, "tanh")), torch.from_numpy(X)
    if backend == "jax":
        import jax
        jax.config.update("jax_enable_x64", True)
        import jax.numpy as jnp

        from fishercore.backends import jax as fj
        return fj.from_mlp([(jnp.asarray(W), jnp.asarray(b)) for W, b in layers], "tanh"), jnp.asarray(X)
    raise ValueError(backend)


def child(args):
    import fishercore as fc

    model, X = build(args.backend, args.widths, args.n, model=args.model)
    budget = args.budget * MIB

    def job(X):
        if args.job == "analyze":
            return fc.analyze(model, X, memory_budget=budget).fisher
        return fc.estimate(model, X, estimator=args.estimator, n_draws=args.n_draws, seed=0, memory_budget=budget)

    # warm up on a small model: the libraries' start-up (BLAS thread buffers, thread pools) is not the
    # call's working memory; compiling for this model (JAX) is measured with the call
    small, Xs = build(args.backend, [8, 4, 3], 64)
    fc.analyze(small, Xs)
    if args.model == "transformer":  # and the libraries' transforms on a model of the same kind, 2 sequences
        tiny, Xt = transformer_module(2, seed=1, width=8, hidden=16)
        fc.analyze(tiny, Xt)
        del tiny, Xt
    if args.model == "cnn":  # and the conv rule's transforms, on 4 images
        tiny, Xt = cnn_module(4, seed=1)
        fc.analyze(tiny, Xt)
        del tiny, Xt
    del small, Xs
    try:
        if args.compile_first:  # and compile for this model's shapes: the first call measured is the second
            job(X)
    except ValueError as e:  # refused: the budget cannot hold one input
        print(json.dumps({"backend": args.backend, "job": args.job, "refused": str(e)}))
        return
    grown = []
    for _ in range(1 if args.compile_first else 2):  # the first call compiles (JAX), the second runs compiled code
        before = reset_peak()
        out = job(X)
        float(out[0])
        result = out.nbytes * (9 if args.job == "analyze" else 1)
        del out
        grown.append(peak() - before)
    print(json.dumps({"backend": args.backend, "job": args.job, "first_mib": grown[0] / MIB,
                      "second_mib": grown[-1] / MIB, "result_mib": result / MIB, "budget_mib": args.budget}))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backends", nargs="+", default=["numpy", "torch", "jax"])
    p.add_argument("--widths", type=int, nargs="+", default=[784, 512, 512, 10])
    p.add_argument("--n", type=int, default=20_000)
    p.add_argument("--budget", type=float, default=64.0, help="memory_budget in MiB")
    p.add_argument("--job", choices=["analyze", "estimate"], default="analyze")
    p.add_argument("--estimator", default="i1")
    p.add_argument("--n-draws", type=int, default=1)
    p.add_argument("--compile-first", action="store_true", help="one call before the measured ones")
    p.add_argument("--model", choices=["mlp", "sequence", "transformer", "cnn"], default="mlp",
                   help="mlp: --widths, tanh; sequence: sequence_function (JAX); transformer: transformer_module "
                        "(torch); cnn: cnn_module (torch)")
    p.add_argument("--backend", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.backend:
        return child(args)
    name = {"sequence": "sequence_function (JAX)", "transformer": "transformer_module (torch)",
            "cnn": "cnn_module (torch)"}.get(
        args.model, "-".join(map(str, args.widths)))
    print(f"{args.job} {name}, n = {args.n:,}"
          + (f", {args.estimator}, n_draws = {args.n_draws:,}" if args.job == "estimate" else "")
          + f", memory_budget = {args.budget:g} MiB\n")
    print("| backend | growth, first call (MiB) | of it, the result (MiB) | (growth − result) ÷ budget | "
          "growth, second call (MiB) |\n|---|---|---|---|---|")
    for backend in args.backends:
        cmd = [sys.executable, __file__, "--backend", backend, "--job", args.job, "--n", str(args.n),
               "--budget", str(args.budget), "--estimator", args.estimator, "--n-draws", str(args.n_draws),
               "--widths", *map(str, args.widths), "--model", args.model] + (
                   ["--compile-first"] if args.compile_first else [])
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(f"| {backend} | failed: {r.stderr.strip().splitlines()[-1]} | | | |")
            continue
        res = json.loads(r.stdout.strip().splitlines()[-1])
        if "refused" in res:
            print(f"| {backend} | refused: {res['refused']} | | | |")
            continue
        print(f"| {backend} | {res['first_mib']:.0f} | {res['result_mib']:.0f} | "
              f"{(res['first_mib'] - res['result_mib']) / args.budget:.2f} | {res['second_mib']:.0f} |")


if __name__ == "__main__":
    main()
