"""Convolutional networks: fishercore's full analysis against BackPACK, side by side in one process.

Run from the repository root (BackPACK: ``pip install backpack-for-pytorch``):

    python benchmarks/cnn.py                 # both networks
    python benchmarks/cnn.py --only digits   # or resnet

* **digits**: the report's CNN (:mod:`fishercore.report.cnn`: conv 1→8 3×3, tanh, max pool, conv 8→16,
  tanh, max pool, dense 64→10; 1,898 parameters), float64, on all 1,797 built-in digits.
  fishercore: ``analyze`` (every field: Fisher, v1, v2, c12, var_x, the four bounds).  BackPACK
  on the same network and inputs, in batches of 512: ``DiagGGNExact`` (the Fisher alone) and
  ``DiagGGNExact`` + ``DiagHessian`` (the Fisher and one Î2 draw: what a user would need to start on
  the second-order question, which BackPACK cannot answer exactly).
* **resnet**: a ReLU ResNet of 8 weight layers (a 3→16 stem conv, three torchvision-style BasicBlocks
  of 16, 32 and 64 channels, the last two with stride 2 and 1×1-conv shortcuts, BatchNorm in eval
  mode, global average pooling, dense 64→10; 78,042 parameters), float32, 512 random 3×32×32
  inputs.  fishercore: ``analyze`` — every field, the second order being zero by piecewise
  linearity (read off the traced graph) — against BackPACK's ``DiagGGNExact`` with its module
  converter for the residual additions.  Peak RSS growth of each (``/proc/self/status`` VmHWM,
  reset before each, after a warm-up call on ``WARM`` inputs) beside fishercore's ``memory_budget``; on
  CUDA, the growth of torch's peak allocated GPU memory instead.

``--jax`` adds the digits CNN written in Flax (:mod:`fishercore.report.cnn`) through JAX's ``from_function``.

Medians of ``--repeat`` rounds after a warm-up, the jobs taking turns in each round (run back to back,
the first would fault in memory that the C allocator has already mapped for the later ones).  The
largest deviation between the two Fishers is printed as a check.  ``--device cuda`` runs both on the
GPU (``benchmarks/gpu_check.sh``); where BackPACK is not installed its columns are "–", and where
scikit-learn is not, the digits are replaced by as many uniform random 8×8 images.  Benchmarks are
not tests: nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

import numpy as np
import torch
from memory import peak, reset_peak  # benchmarks/memory.py, beside this script
from torch import nn

import fishercore as fc
from fishercore.backends import torch as fc_torch
from fishercore.report import cnn

#: Inputs of the warm-up call that each job makes before the call whose memory is measured.
WARM = 32


def timed(jobs, X, repeat, device="cpu"):
    """Per job of ``jobs`` (each ``job(X)``): (median seconds, peak RSS growth in bytes, last result), or None where
    the job is None (its library is not installed).  Each job in turn runs once on ``WARM`` inputs, so that what
    the libraries set up once (thread pools, BLAS buffers, the transforms' caches) is not counted, then on X, which
    gives its memory; then the jobs take turns on X, ``repeat`` rounds, which give the times: every job meets the C
    allocator in the same state (run back to back, the first job's batches would fault in memory that a later job
    finds already mapped; docs/performance.md, "Blocks the C allocator reuses")."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    live = [j for j in jobs if j is not None]
    grow, times, out = {}, {id(j): [] for j in live}, {}
    for job in live:
        job(X[:WARM])
        sync()
        if device == "cuda":  # on the GPU the memory that counts is the device's: its allocator's peak
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        else:
            before = reset_peak()  # the peak starts afresh at the current RSS
        job(X)
        sync()
        grow[id(job)] = (torch.cuda.max_memory_allocated() if device == "cuda" else peak()) - before
    for _ in range(repeat):
        for job in live:
            sync()
            t = time.perf_counter()
            out[id(job)] = job(X)
            sync()
            times[id(job)].append(time.perf_counter() - t)
    return [None if j is None else (statistics.median(times[id(j)]), grow[id(j)], out[id(j)]) for j in jobs]


def _cells(fc_run, ref):
    """Seconds, ratio and RSS cells for a reference run (or dashes), and the Fisher deviation."""
    if ref is None:
        return "–", "–", "–", "–"
    t, mem, fisher = ref
    err = float((fc_run[2].fisher - fisher).abs().max() / fisher.abs().max()) if fisher is not None else None
    return f"{t:.2f} s", f"{fc_run[0] / t:.3g}×", f"{mem / 2**20:.0f} MiB", "–" if err is None else f"{err:.1e}"


def backpack_job(net, y, extensions, batch=512, converter=False):
    """``job(X)``: BackPACK's ``extensions`` on the first ``len(X)`` inputs and labels ``y``, in batches; the
    diagonal GGN of the mean loss, or None without BackPACK."""
    try:
        from backpack import backpack, extend
    except ImportError:
        return None

    bp = extend(copy.deepcopy(net), use_converter=converter)
    loss_fn = extend(nn.CrossEntropyLoss(reduction="mean"))

    def job(X):
        total = None
        for s in range(0, X.shape[0], batch):
            bp.zero_grad()
            loss = loss_fn(bp(X[s:s + batch]), y[s:min(s + batch, X.shape[0])])
            with backpack(*extensions()):
                loss.backward()
            # the batch's mean; BackPACK starts from the loss module, so the weight goes on the result
            part = torch.cat([p.diag_ggn_exact.reshape(-1) for p in bp.parameters()]) * (
                min(batch, X.shape[0] - s) / X.shape[0])
            total = part if total is None else total + part
        return total

    return job


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


def resnet8():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), Block(16, 16, 1),
                        Block(16, 32, 2), Block(32, 64, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # running statistics as after training, not the identity
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.num_features, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.num_features, generator=g))
    return net.eval()


def _extensions(*names):
    def make():
        from backpack import extensions

        return [getattr(extensions, n)() for n in names]
    return make


def _digits():
    try:
        from sklearn.datasets import load_digits

        data = load_digits()
        return torch.as_tensor(data.data / 16.0), torch.as_tensor(data.target)
    except ImportError:
        gen = torch.Generator().manual_seed(0)
        return torch.rand(1797, 64, dtype=torch.float64, generator=gen), torch.randint(0, 10, (1797,), generator=gen)


def digits_jax(repeat, device):
    """The digits CNN as the Flax module of fishercore.report.cnn through JAX's from_function, float64: seconds with
    compilation (first call), then the median of ``repeat`` calls; the Fisher's deviation from torch's."""
    import jax
    import jax.numpy as jnp

    from fishercore.backends import jax as fc_jax

    jax.config.update("jax_enable_x64", True)
    dev = jax.devices("gpu" if device == "cuda" else "cpu")[0]
    X, _ = _digits()
    config = cnn.Config()
    params = cnn.init_params(config, 0)
    with jax.default_device(dev):
        variables = jax.tree_util.tree_map(jnp.asarray, cnn.flax_variables(config, params))
        fn, flax_params = cnn.flax_function(config, variables)
        Xj = jnp.asarray(X.numpy().reshape(-1, 1, 8, 8))
        model = fc_jax.from_function(fn, flax_params, input_shape=(1, 8, 8))
        t = time.perf_counter()
        res = jax.block_until_ready(fc.analyze(model, Xj).v2)
        first = time.perf_counter() - t
        times = []
        for _ in range(repeat):
            t = time.perf_counter()
            res = fc.analyze(model, Xj)
            jax.block_until_ready(res.v2)
            times.append(time.perf_counter() - t)
    net = cnn.torch_model(config, params, dtype=torch.float64)
    ref = fc.analyze(fc_torch.from_module(net, input_shape=(1, 8, 8)), X.reshape(-1, 1, 8, 8))
    order = [n for n, _ in config.names_and_shapes()]
    values = np.asarray(res.fisher)
    by_name = dict(cnn.torch_layout(g.name, values[g.offset:g.offset + g.size], g.shape) for g in res.groups)
    err = float(np.abs(np.concatenate([by_name[n] for n in order]) - ref.fisher.numpy()).max() / ref.fisher.abs().max())
    print(f"| digits CNN in Flax, JAX from_function, float64, {X.shape[0]} inputs, {device} | "
          f"{statistics.median(times):.2f} s ({first:.1f} s with compilation) | – | – | – | – | – | "
          f"{err:.1e} vs torch |", flush=True)


def digits(repeat, device):
    X, y = _digits()
    config = cnn.Config()
    net = cnn.torch_model(config, cnn.init_params(config, 0), dtype=torch.float64).to(device)
    X, y = X.reshape(-1, 1, 8, 8).to(device), y.to(device)
    model = fc_torch.from_module(net, input_shape=(1, 8, 8))
    ours, ggn, both = timed([lambda X: fc.analyze(model, X), backpack_job(net, y, _extensions("DiagGGNExact")),
                             backpack_job(net, y, _extensions("DiagGGNExact", "DiagHessian"))], X, repeat, device)
    t_ggn, r_ggn, m_ggn, err = _cells(ours, ggn)
    t_both, r_both, m_both, _ = _cells(ours, None if both is None else (both[0], both[1], None))
    P = sum(p.numel() for p in net.parameters())
    print(f"| digits CNN, {P:,} params, float64, {X.shape[0]} inputs, {device} | {ours[0]:.2f} s | {t_ggn} | "
          f"{t_both} | {r_ggn} | {r_both} | {ours[1] / 2**20:.0f} MiB / {m_ggn} / {m_both} | {err} |", flush=True)


def resnet(repeat, device, n=512):
    """The ReLU ResNet-8 within 512 MiB on the CPU; on a GPU with the default budget (a share of its free memory)."""
    from fishercore._batching import default_memory_budget

    net = resnet8().to(device)
    X = torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(2)).to(device)
    y = torch.randint(0, 10, (n,), generator=torch.Generator().manual_seed(3)).to(device)
    model = fc_torch.from_module(net, input_shape=(3, 32, 32))
    assert set(model.linear_groups) == {g.name for g in model.groups}  # ReLU, pooling, eval BatchNorm: w = 0
    budget = 512 * 2**20 if device == "cpu" else default_memory_budget(X)
    ours, ggn = timed([lambda X: fc.analyze(model, X, memory_budget=budget),
                       backpack_job(net, y, _extensions("DiagGGNExact"), batch=128, converter=True)], X, repeat,
                      device)
    t_ggn, r_ggn, m_ggn, err = _cells(ours, ggn)
    P = sum(p.numel() for p in net.parameters())
    print(f"| ReLU ResNet-8, {P:,} params, float32, {n} inputs, {device} | {ours[0]:.2f} s | {t_ggn} | – | {r_ggn} | "
          f"– | {ours[1] / 2**20:.0f} MiB (budget {budget / 2**20:.0f}) / {m_ggn} | {err} |", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("digits", "resnet"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--jax", action="store_true", help="also the digits CNN in Flax through JAX's from_function")
    args = p.parse_args()
    warnings.simplefilter("ignore")  # BackPACK's full-backward-hook notices
    print("| network | fishercore, every field | BackPACK DiagGGNExact | BackPACK DiagGGNExact + DiagHessian | "
          "ratio to GGN | ratio to GGN + Hessian | peak RSS growth (fishercore / GGN / both) | "
          "max rel. Fisher diff |")
    print("|---|---|---|---|---|---|---|---|")
    if args.only in (None, "digits"):
        digits(args.repeat, args.device)
        if args.jax:
            digits_jax(args.repeat, args.device)
    if args.only in (None, "resnet"):
        resnet(args.repeat, args.device)


if __name__ == "__main__":
    main()
