"""Analyses split over processes, devices and interrupted runs equal one analysis of all the data.

* torch.distributed: two gloo processes (``docs/examples/sharded_torch.py`` under torchrun),
  each analysing its share, all-reduced — checked in the example against one process (1e-12).
* JAX: ``analyze_sharded`` over four host devices (``docs/examples/sharded_jax.py``, with
  ``XLA_FLAGS=--xla_force_host_platform_device_count=4``) — likewise.
* ``analyze_batches`` over a data loader, interrupted and resumed from its checkpoint.
"""

import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

import fishercore as fc
from fishercore import all_reduce_sums
from helpers import (
    BATCH,
    N_INPUTS,
    Problem,
    assert_analysis_close,
    assert_raises_named,
    make_problem,
    require_framework,
)

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _close(a, b):
    assert_analysis_close(a, b, atol=1e-12)


# torchrun's rendezvous on a busy machine can lose a race for its port; that, and only that, is retried
NETWORK_FLAKES = ("Address already in use", "RendezvousConnectionError", "DistNetworkError", "Connection refused",
                  "RendezvousTimeoutError")


def _run_example(name, tmp_path):
    for _ in range(2):
        out = subprocess.run([sys.executable, str(ROOT / "docs" / "examples" / name)], capture_output=True,
                             text=True, cwd=tmp_path, timeout=600)
        if out.returncode == 0 or not any(f in out.stderr for f in NETWORK_FLAKES):
            break
    assert out.returncode == 0, out.stdout + out.stderr
    m = re.search(r"(\d+) (?:processes|devices), (\d+) inputs; largest deviation from one \w+: (\S+)", out.stdout)
    assert m, out.stdout
    return int(m.group(1)), int(m.group(2)), float(m.group(3))


def test_all_reduce_sums_of_shares_equal_the_sums_of_everything():
    """The collective's algebra: three threads stand in for three ranks of an all-reduce."""
    import threading

    model, X = make_problem(Problem("2h", "tanh", "categorical", n=40))
    whole = fc.analyze(model, X)
    spans = ((0, 7), (7, 25), (25, 40))
    shares = [fc.analyze(model, X[a:b]) for a, b in spans]
    slots, barrier, results = [None] * 3, threading.Barrier(3), [None] * 3

    def rank(r):
        def reduce_sum(t):  # every rank gets the sum over ranks of their t
            slots[r] = np.asarray(t)
            barrier.wait()
            total = sum(slots)
            barrier.wait()
            return total

        results[r] = all_reduce_sums(shares[r].sums, shares[r].n_inputs, 40, reduce_sum)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for sums in results:
        _close(fc.FisherAnalysis(sums, 40, whole.groups, whole.family), whole)


@pytest.mark.backends("torch")
def test_torch_distributed_two_gloo_processes(tmp_path):
    require_framework("torch")
    world, n, dev = _run_example("sharded_torch.py", tmp_path)
    assert (world, n) == (2, 1001) and dev <= 1e-12
    print(f"torch.distributed, 2 gloo processes: largest deviation {dev:.1e}")


@pytest.mark.backends("torch")
def test_torch_all_reduce_refuses_bad_input():
    torch = require_framework("torch")
    from fishercore.backends import torch as fc_torch

    model, X = make_problem(Problem("1h", "tanh", "categorical", n=5))
    assert_raises_named(lambda: fc_torch.all_reduce("x"), TypeError, "analysis")
    assert_raises_named(lambda: fc_torch.all_reduce(fc.analyze(model, X)), RuntimeError, "torch.distributed")
    assert not torch.distributed.is_initialized()


@pytest.mark.backends("jax")
def test_jax_shard_map_over_four_host_devices(tmp_path):
    require_framework("jax")
    world, n, dev = _run_example("sharded_jax.py", tmp_path)
    assert (world, n) == (4, 1001) and dev <= 1e-12
    print(f"JAX shard_map, 4 host devices: largest deviation {dev:.1e}")


@pytest.mark.backends("jax")
def test_jax_analyze_sharded_on_one_device_with_a_remainder(jax_x64):
    from fishercore.backends import jax as fc_jax

    model, X = make_problem(Problem("2h", "relu", "bernoulli", n=N_INPUTS), jax_x64)
    fam = fc.get_family("bernoulli")
    sharded = fc_jax.analyze_sharded(model, X, fam, batch_size=BATCH, devices=[jax_x64.device])
    assert sharded.n_inputs == N_INPUTS  # two steps of BATCH inputs, and a remainder
    _close(sharded, fc.analyze(model, X, fam, batch_size=BATCH))
    assert_raises_named(lambda: fc_jax.analyze_sharded(model, X, fam, devices=[]), ValueError, "devices")
    assert_raises_named(lambda: fc_jax.analyze_sharded(model, X, fam, batch_size=0), ValueError, "batch_size")


@pytest.mark.backends("jax")
def test_jax_analyze_sharded_takes_a_padding_mask(jax_x64):
    """Sequence outputs (n, T, C) with a padding mask, sharded with the inputs: the same as analyze with the mask."""
    import jax
    import jax.numpy as jnp

    from fishercore.backends import jax as fc_jax

    T, C, d = 3, 4, 5
    params = {"w": 0.5 * jax.random.normal(jax.random.key(0), (d, T * C), dtype=jnp.float64)}

    def seq(p, x):
        return jnp.tanh(x @ p["w"]).reshape(x.shape[0], T, C) * 2.0

    model = fc_jax.from_function(seq, params, input_shape=(d,))
    X = jax.random.normal(jax.random.key(1), (11, d), dtype=jnp.float64)
    keep = np.ones((11, T), dtype=bool)
    keep[2, 1] = keep[7, :] = keep[10, 0] = False
    keep = jnp.asarray(keep)
    sharded = fc_jax.analyze_sharded(model, X, batch_size=4, devices=[jax_x64.device], mask=keep)
    _close(sharded, fc.analyze(model, X, mask=keep))
    assert_raises_named(lambda: fc_jax.analyze_sharded(model, X, batch_size=4, mask=keep[:5]), ValueError, "mask")


class Interrupt(Exception):
    pass


def _loader(X, size, fail_at=None, labels=True):
    for i, start in enumerate(range(0, X.shape[0], size)):
        if i == fail_at:
            raise Interrupt(f"stopped at batch {i}")
        xb = X[start:start + size]
        yield (xb, np.zeros(xb.shape[0], dtype=int)) if labels else xb


def test_analyze_batches_resumes_from_its_checkpoint(tmp_path):
    model, X = make_problem(Problem("2h", "tanh", "categorical", n=50))
    whole = fc.analyze(model, X)
    ckpt = tmp_path / "run.npz"
    with pytest.raises(Interrupt):
        fc.analyze_batches(model, _loader(X, 8, fail_at=4), checkpoint=ckpt, checkpoint_every=3)
    # the interrupt saved all four finished batches, not just the three of the last checkpoint
    assert fc.load_analysis(ckpt, model).n_inputs == 32
    calls = []
    counted = _Counting(model, calls)
    resumed = fc.analyze_batches(counted, _loader(X, 8), checkpoint=ckpt)
    assert resumed.n_inputs == 50 and sum(calls) == 50 - 32  # finished batches were not recomputed
    _close(resumed, whole)
    _close(fc.load_analysis(ckpt, model), whole)  # the final result is checkpointed too
    # without a checkpoint, plain arrays as batches
    _close(fc.analyze_batches(model, _loader(X, 13, labels=False)), whole)


class _Counting:
    """A model that counts the inputs it differentiates."""

    def __init__(self, model, calls):
        self.model, self.calls = model, calls
        self.groups, self.n_outputs = model.groups, model.n_outputs

    def check_inputs(self, X):
        return self.model.check_inputs(X)

    def outputs(self, X):
        return self.model.outputs(X)

    def derivatives(self, X, *, hessian=True):
        self.calls.append(X.shape[0])
        return self.model.derivatives(X, hessian=hessian)


def test_analyze_batches_refuses_bad_input(tmp_path):
    model, X = make_problem(Problem("1h", "tanh", "categorical", n=10))
    other, _ = make_problem(Problem("2h", "tanh", "categorical", n=10))
    ckpt = tmp_path / "c.npz"
    fc.analyze_batches(model, _loader(X, 4), checkpoint=ckpt)
    assert_raises_named(lambda: fc.analyze_batches(other, _loader(X, 4), checkpoint=ckpt), ValueError, "checkpoint")
    assert_raises_named(lambda: fc.analyze_batches(model, _loader(X, 4), "bernoulli", checkpoint=ckpt),
                        ValueError, "checkpoint")
    assert_raises_named(lambda: fc.analyze_batches(model, _loader(X[:4], 4), checkpoint=ckpt), ValueError, "batches")
    plain = tmp_path / "plain.npz"
    fc.analyze(model, X).save(plain)
    assert_raises_named(lambda: fc.analyze_batches(model, _loader(X, 4), checkpoint=plain), ValueError, "checkpoint")
    assert_raises_named(lambda: fc.analyze_batches(model, 3), TypeError, "batches")
    assert_raises_named(lambda: fc.analyze_batches(model, iter([])), ValueError, "batches")
    assert_raises_named(lambda: fc.analyze_batches(model, [["a"]]), TypeError, "batches")
    assert_raises_named(lambda: fc.analyze_batches(model, _loader(X, 4), checkpoint_every=0), ValueError,
                        "checkpoint_every")
    assert_raises_named(lambda: fc.analyze_batches(model, _loader(X, 4), checkpoint=tmp_path / "no" / "c.npz"),
                        ValueError, "checkpoint")
