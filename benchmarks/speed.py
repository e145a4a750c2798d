"""fishercore's speed and memory, side by side with BackPACK and a naive torch.func baseline.

Run from the repository root (BackPACK: ``pip install backpack-for-pytorch``):

    python benchmarks/speed.py                    # everything, this machine's CPU (~15 min on 2 cores)
    python benchmarks/speed.py --quick            # smaller MNIST-sized runs (~3 min)
    python benchmarks/speed.py --device gpu       # CuPy / torch CUDA / JAX GPU (see gpu_check.sh)
    python benchmarks/speed.py --parts digits --dtypes float64

Parts
-----
digits   64-128-128-10 tanh MLP on scikit-learn's 1,797 digits (random inputs of the same
         shape when scikit-learn is missing): ``analyze`` (every field), ``estimate("i1")`` and
         ``estimate("i2")`` with one draw, on every available backend; BackPACK
         DiagGGNExact + DiagHessian, DiagGGNMC(mc_samples=1) and DiagHessian on labels drawn
         from the model (batches of 512, sum reduction); a naive torch.func baseline (vmap of
         per-sample jacrev / grad, and per-sample Hessian diagonals by one forward-over-forward
         pass per parameter, timed on a few inputs and scaled to 1,797).  Ratios are
         fishercore / BackPACK; the issue's targets are ≤ 0.25 (analyze vs exact + Hessian),
         ≤ 1.0 (Î1 vs DiagGGNMC) and ≤ 0.25 (Î2 vs DiagHessian).
mnist    784-512-512-10 sigmoid MLP on 60,000 random inputs of width 784: ``analyze`` wall
         time and peak memory per backend, each in a fresh process (peak RSS from
         ``getrusage``; on a GPU also the device's peak allocation); BackPACK on a subset.
scaling  the same network, NumPy (or the first GPU backend), n from 1,000 to 60,000: time
         and peak RSS per n, and time per 1,000 inputs (constant when cost is linear in n).

Timings are medians of ``--repeat`` runs after one warm-up run (which also compiles JAX).
Results go to stdout as Markdown tables and to ``--out`` (JSON, and ``scaling.png`` when
matplotlib is installed).  Benchmarks are not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

DIGITS = [64, 128, 128, 10]
MNIST = [784, 512, 512, 10]
BACKENDS_CPU = ("numpy", "mlp-torch", "torch", "jax", "mlp-jax")
BACKENDS_GPU = ("cupy", "mlp-torch", "torch", "jax", "mlp-jax")


def _nothing():
    return None


# -- models -------------------------------------------------------------------------------
def init_layers(widths, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.normal(size=(o, i)) / np.sqrt(i), 0.1 * rng.normal(size=o)) for i, o in zip(widths[:-1], widths[1:])]


def digits_inputs():
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        print("(scikit-learn missing: random inputs of the digits' shape)", file=sys.stderr)
        return np.random.default_rng(1).random((1797, 64)), "random (1797, 64)"
    X = load_digits().data / 16.0
    return (X - X.mean(0)) / (X.std(0) + 1e-8), "sklearn digits"


def build(name, layers, X, activation, dtype, gpu):
    """(model, inputs, sync) for a backend name; ImportError when its library is missing."""
    import fishercore.backends.mlp as mlp

    if name in ("numpy", "cupy"):
        xp = np if name == "numpy" else __import__("cupy")
        def conv(a):
            return xp.asarray(a, dtype=dtype)

        sync = xp.cuda.Device().synchronize if name == "cupy" else _nothing
        return mlp.MLP([(conv(W), conv(b)) for W, b in layers], activation), conv(X), sync
    if name in ("mlp-torch", "torch"):
        import torch

        if not gpu:
            torch.set_num_threads(os.cpu_count() or 1)
        dev = "cuda" if gpu else "cpu"
        tdtype = getattr(torch, dtype)
        sync = torch.cuda.synchronize if gpu else _nothing
        Xt = torch.as_tensor(X, dtype=tdtype, device=dev)
        if name == "mlp-torch":
            return mlp.MLP([(torch.as_tensor(W, dtype=tdtype, device=dev), torch.as_tensor(b, dtype=tdtype, device=dev))
                            for W, b in layers], activation), Xt, sync
        from fishercore.backends import torch as fc_torch

        net = fc_torch.sequential_from_layers(layers, activation, dtype=tdtype).to(dev)
        return fc_torch.from_sequential(net), Xt, sync
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_default_matmul_precision", "highest")
    import jax.numpy as jnp

    dev = jax.devices("gpu" if gpu else "cpu")[0]
    def conv(a):
        return jax.device_put(jnp.asarray(a, dtype=dtype), dev)

    pairs = [(conv(W), conv(b)) for W, b in layers]
    if name == "mlp-jax":
        return mlp.MLP(pairs, activation), conv(X), _nothing
    from fishercore.backends import jax as fc_jax

    return fc_jax.from_mlp(pairs, activation), conv(X), _nothing


def timed(job, sync, repeat):
    job()
    sync()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = job()
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        sync()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def fishercore_times(model, X, sync, repeat):
    import fishercore as fc

    return {
        "analyze": timed(lambda: fc.analyze(model, X).sums.v2_upper, sync, repeat),
        "i1": timed(lambda: fc.estimate(model, X, estimator="i1", seed=0), sync, repeat),
        "i2": timed(lambda: fc.estimate(model, X, estimator="i2", seed=0), sync, repeat),
    }


# -- references ---------------------------------------------------------------------------
def backpack_times(layers, X, activation, dtype, repeat, batch=512, gpu=False):
    """BackPACK on the same network and inputs: ms for each extension (sum over batches)."""
    import torch
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, DiagGGNMC, DiagHessian

    import fishercore as fc
    from fishercore.backends import mlp
    from fishercore.backends import torch as fc_torch

    dev = "cuda" if gpu else "cpu"
    tdtype = getattr(torch, dtype)
    net = extend(fc_torch.sequential_from_layers(layers, activation, dtype=tdtype).to(dev))
    loss_fn = extend(torch.nn.CrossEntropyLoss(reduction="sum"))
    Xt = torch.as_tensor(X, dtype=tdtype, device=dev)
    # labels drawn from the model, as fishercore's estimate draws them
    ref = mlp.MLP([(np.asarray(W, float), np.asarray(b, float)) for W, b in layers], activation)
    y = torch.as_tensor(np.asarray(fc.sample_labels(ref, np.asarray(X, float), seed=0))[0], device=dev)
    sync = torch.cuda.synchronize if gpu else _nothing

    def run(*exts):
        def job():
            for s in range(0, Xt.shape[0], batch):
                net.zero_grad()
                loss = loss_fn(net(Xt[s:s + batch]), y[s:s + batch])
                with backpack(*exts):
                    loss.backward()
        return job

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # BackPACK's full-backward-hook notice
        return {
            "exact": timed(run(DiagGGNExact()), sync, repeat),
            "exact+hessian": timed(run(DiagGGNExact(), DiagHessian()), sync, repeat),
            "mc1": timed(run(DiagGGNMC(mc_samples=1)), sync, repeat),
            "hessian": timed(run(DiagHessian()), sync, repeat),
        }


def naive_times(layers, X, activation, dtype, repeat, n_hessian=4):
    """What a user would write with torch.func, per sample; the Hessian part scaled from n_hessian inputs."""
    import torch
    from torch.func import functional_call, grad, jacrev, jvp, vmap

    from fishercore.backends import torch as fc_torch

    tdtype = getattr(torch, dtype)
    net = fc_torch.sequential_from_layers(layers, activation, dtype=tdtype)
    params = {k: v.detach() for k, v in net.named_parameters()}
    Xt = torch.as_tensor(X, dtype=tdtype)
    y = torch.randint(0, layers[-1][0].shape[0], (Xt.shape[0],))
    n = Xt.shape[0]

    def out(p, x):
        return functional_call(net, p, (x[None],))[0]

    def loss(p, x, t):
        return torch.nn.functional.cross_entropy(out(p, x)[None], t[None], reduction="sum")

    def exact_fisher():  # I = Σ_c p_c (J_c − J̄)², per-sample output Jacobians in chunks of 64
        total = {k: torch.zeros_like(v) for k, v in params.items()}
        for s in range(0, n, 64):
            xb = Xt[s:s + 64]
            J = vmap(jacrev(out), in_dims=(None, 0))(params, xb)
            prob = torch.softmax(functional_call(net, params, (xb,)), -1)
            for k, Jk in J.items():
                pk = prob.reshape(*prob.shape, *([1] * (Jk.ndim - 2)))
                d = Jk - (pk * Jk).sum(1, keepdim=True)
                total[k] += (pk * d * d).sum((0, 1))
        return total

    def squared_scores():
        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, Xt, y)
        return {k: (v * v).sum(0) for k, v in g.items()}

    flat = torch.cat([v.reshape(-1) for v in params.values()])
    P = flat.numel()
    shapes = [(k, v.shape, v.numel()) for k, v in params.items()]

    def unflat(v):
        parts, o = {}, 0
        for k, shp, size in shapes:
            parts[k] = v[o:o + size].reshape(shp)
            o += size
        return parts

    def hessian_diag(x, t, chunk=512):  # −diag ∇²ℓ: one forward-over-forward pass per parameter
        def f(v):
            return loss(unflat(v), x, t)

        cols = []
        for s in range(0, P, chunk):
            basis = torch.zeros(min(chunk, P - s), P, dtype=tdtype)
            basis[torch.arange(basis.shape[0]), torch.arange(s, s + basis.shape[0])] = 1.0
            cols.append(vmap(lambda e: jvp(lambda v: jvp(f, (v,), (e,))[1], (flat,), (e,))[1])(basis))
        return torch.cat(cols)

    def hessians():
        for i in range(n_hessian):
            hessian_diag(Xt[i], y[i])

    scale = n / n_hessian
    with torch.no_grad():
        res = {"exact": timed(exact_fisher, _nothing, max(1, repeat // 2)),
               "i1": timed(squared_scores, _nothing, repeat)}
        res["hessian"] = timed(hessians, _nothing, 1) * scale
    res["exact+hessian"] = res["exact"] + res["hessian"]
    res["note"] = f"Hessian diagonal timed on {n_hessian} inputs, scaled to {n}"
    return res


# -- one MNIST-sized run in a fresh process -------------------------------------------------
def job_mnist(backend, dtype, n, gpu):
    """Run analyze once (after a warm-up on 600 inputs) and print a JSON line: seconds, peak memory."""
    layers = init_layers(MNIST)
    X = np.random.default_rng(2).random((n, 784))
    if dtype == "float32":
        layers = [(W.astype(np.float32), b.astype(np.float32)) for W, b in layers]
        X = X.astype(np.float32)
    model, Xb, sync = build(backend, layers, X, "sigmoid", dtype, gpu)
    del X
    import fishercore as fc

    def run(X):
        t0 = time.perf_counter()
        out = fc.analyze(model, X).sums.v2_upper
        if hasattr(out, "block_until_ready"):
            out.block_until_ready()
        sync()
        return time.perf_counter() - t0

    # Warm-up: JAX compiles one program per batch shape, so it first runs the whole set (that
    # first call, compilation included, is reported too); eager libraries warm up on 600 inputs.
    first = run(Xb) if backend in ("jax", "mlp-jax") else (run(Xb[:600]) and None)
    seconds = run(Xb)
    rec = {"backend": backend, "dtype": dtype, "n": n, "seconds": seconds, "first_call_seconds": first,
           "peak_rss_gb": peak_rss_gb()}
    if gpu and backend in ("mlp-torch", "torch"):
        import torch
        rec["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    elif gpu and backend == "cupy":
        import cupy
        rec["gpu_pool_gb"] = cupy.get_default_memory_pool().total_bytes() / 2**30
    print(json.dumps(rec))


def peak_rss_gb():
    """This process's peak resident memory.  /proc's VmHWM starts afresh at exec; getrusage's
    ru_maxrss (the fallback off Linux) carries the parent's peak over into a child."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_job(backend, dtype, n, gpu):
    cmd = [sys.executable, __file__, "--job", f"{backend},{dtype},{n}"] + (["--device", "gpu"] if gpu else [])
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"backend": backend, "dtype": dtype, "n": n, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# -- parts -----------------------------------------------------------------------------------
def available(name):
    mods = {"numpy": "numpy", "cupy": "cupy", "mlp-torch": "torch", "torch": "torch", "jax": "jax", "mlp-jax": "jax"}
    try:
        __import__(mods[name])
        return True
    except ImportError:
        return False


def part_digits(args, results):
    X, source = digits_inputs()
    layers = init_layers(DIGITS)
    for dtype in args.dtypes:
        lay = [(W.astype(dtype), b.astype(dtype)) for W, b in layers]
        Xd = X.astype(dtype)
        rows = {}
        for name in args.backends:
            if not available(name):
                print(f"  {name}: not installed, skipped")
                continue
            rows[name] = fishercore_times(*build(name, lay, Xd, "tanh", dtype, args.gpu), args.repeat)
            print(f"  {dtype} {name}: " + ", ".join(f"{k} {v:.1f} ms" for k, v in rows[name].items()), flush=True)
        ref = {}
        try:
            ref["backpack"] = backpack_times(lay, Xd, "tanh", dtype, args.repeat, gpu=args.gpu)
            print(f"  {dtype} BackPACK: {ref['backpack']}", flush=True)
        except ImportError as e:
            print(f"  BackPACK not installed ({e}), skipped")
        if not args.gpu and not args.no_naive and available("torch"):
            ref["naive"] = naive_times(lay, Xd, "tanh", dtype, args.repeat)
            print(f"  {dtype} naive torch.func: {ref['naive']}", flush=True)
        results["digits"][dtype] = {"source": source, "fishercore": rows, **ref}
        print_digits_table(dtype, source, rows, ref)


def print_digits_table(dtype, source, rows, ref):
    bp = ref.get("backpack")
    print(f"\n64-128-128-10 tanh, {source}, n = 1797, {dtype}: median ms (ratio to BackPACK)\n")
    print("| backend | analyze (all fields) | analyze ÷ DiagGGNExact alone | Î1, 1 draw | Î2, 1 draw |")
    print("|---|---:|---:|---:|---:|")

    def cell(v, r):
        return f"{v:,.1f}" + (f" ({v / r:.2f}×)" if r else "")

    for name, t in rows.items():
        pairs = (("analyze", "exact+hessian"), ("i1", "mc1"), ("i2", "hessian"))
        cells = [cell(t[k], bp and bp[b]) for k, b in pairs]
        cells.insert(1, f"{t['analyze'] / bp['exact']:.2f}×" if bp else "")
        print(f"| fishercore, {name} | " + " | ".join(cells) + " |")
    if bp:
        print(f"| BackPACK DiagGGNExact + DiagHessian / DiagGGNMC(1) / DiagHessian | {bp['exact+hessian']:,.1f} | "
              f"| {bp['mc1']:,.1f} | {bp['hessian']:,.1f} |")
        print(f"| BackPACK DiagGGNExact alone | {bp['exact']:,.1f} | 1× | | |")
    nv = ref.get("naive")
    if nv:
        print(f"| naive torch.func (per-sample jacrev, grad, Hessian diagonals)* | {nv['exact+hessian']:,.0f} | "
              f"| {nv['i1']:,.1f} | {nv['hessian']:,.0f} |")
        print(f"\n*{nv['note']}.")
    print()


def part_mnist(args, results):
    n = 6000 if args.quick else 60000
    backends = [b for b in args.backends if b in (("cupy", "torch", "jax", "mlp-torch") if args.gpu
                                                  else ("numpy", "torch", "jax")) and available(b)]
    rows = []
    for dtype in args.dtypes:
        for name in backends:
            rec = run_job(name, dtype, n, args.gpu)
            print(f"  {rec}", flush=True)
            rows.append(rec)
    ref = None
    if not args.gpu:
        try:
            m = 256
            layers = init_layers(MNIST)
            Xs = np.random.default_rng(2).random((m, 784))
            bp = backpack_times(layers, Xs, "sigmoid", "float64", 1)
            ref = {"n": m, **bp}
            print(f"  BackPACK on {m} inputs: {bp}", flush=True)
        except ImportError:
            pass
    results["mnist"] = {"n": n, "rows": rows, "backpack": ref}
    print(f"\n784-512-512-10 sigmoid, {n:,} random inputs: analyze (every field), fresh process per run\n")
    print("| backend | dtype | seconds | peak RSS (GB) |" + (" GPU peak (GB) |" if args.gpu else ""))
    print("|---|---|---:|---:|" + ("---:|" if args.gpu else ""))
    for r in rows:
        if "error" in r:
            print(f"| {r['backend']} | {r['dtype']} | failed: {r['error']} | |")
            continue
        gpu_mem = r.get("gpu_peak_gb", r.get("gpu_pool_gb"))
        print(f"| {r['backend']} | {r['dtype']} | {r['seconds']:.1f} | {r['peak_rss_gb']:.2f} |"
              + (f" {gpu_mem:.2f} |" if args.gpu and gpu_mem is not None else (" |" if args.gpu else "")))
    if ref:
        per = ref["exact+hessian"] / ref["n"] * n / 1e3
        print(f"\nBackPACK DiagGGNExact + DiagHessian, float64: {ref['exact+hessian'] / 1e3:.1f} s on "
              f"{ref['n']} inputs (≈ {per:,.0f} s for {n:,} at the same rate).")
    print()


def part_scaling(args, results):
    name = next(b for b in (("cupy", "torch") if args.gpu else ("numpy",)) if available(b))
    ns = [1000, 2000, 5000, 10000] if args.quick else [1000, 2000, 5000, 10000, 20000, 60000]
    rows = []
    for n in ns:
        rec = run_job(name, "float64", n, args.gpu)
        print(f"  {rec}", flush=True)
        rows.append(rec)
    results["scaling"] = {"backend": name, "rows": rows}
    print(f"\nScaling of analyze with n, 784-512-512-10 sigmoid, {name}, float64\n")
    print("| n | seconds | ms per 1,000 inputs | peak RSS (GB) |")
    print("|---:|---:|---:|---:|")
    for r in rows:
        if "error" not in r:
            print(f"| {r['n']:,} | {r['seconds']:.2f} | {1e6 * r['seconds'] / r['n']:,.0f} | {r['peak_rss_gb']:.2f} |")
    print()
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    good = [r for r in rows if "error" not in r]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
    n_ = np.array([r["n"] for r in good])
    s_ = np.array([r["seconds"] for r in good])
    ax[0].loglog(n_, s_, "o-", label=f"fishercore analyze ({name})")
    ax[0].loglog(n_, s_[-1] * n_ / n_[-1], "k:", label="linear in n")
    ax[0].set(xlabel="inputs n", ylabel="seconds", title="time")
    ax[0].legend()
    ax[1].semilogx(n_, [r["peak_rss_gb"] for r in good], "o-")
    ax[1].set(xlabel="inputs n", ylabel="GB", title="peak RSS", ylim=(0, None))
    fig.suptitle("784-512-512-10 sigmoid MLP, float64")
    fig.tight_layout()
    path = os.path.join(args.out, "scaling.png")
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--parts", default="digits,mnist,scaling")
    ap.add_argument("--backends", default=None, help="comma-separated; default: every available one")
    ap.add_argument("--dtypes", default="float64,float32")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--quick", action="store_true", help="MNIST-sized runs on 6,000 inputs, n up to 10,000")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive torch.func baseline (minutes on a CPU)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--job", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.gpu = args.device == "gpu"
    if args.job:
        backend, dtype, n = args.job.split(",")
        return job_mnist(backend, dtype, int(n), args.gpu)
    args.dtypes = args.dtypes.split(",")
    args.backends = (args.backends.split(",") if args.backends else list(BACKENDS_GPU if args.gpu else BACKENDS_CPU))
    os.makedirs(args.out, exist_ok=True)
    results = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": os.cpu_count(), "device": args.device}, "digits": {}}
    print(f"fishercore benchmark on {platform.node()} ({os.cpu_count()} CPUs, {args.device})\n")
    for part in args.parts.split(","):
        {"digits": part_digits, "mnist": part_mnist, "scaling": part_scaling}[part](args, results)
        with open(os.path.join(args.out, f"speed-{args.device}.json"), "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
