"""The small CNNs both frameworks are checked against, and their reference statistics by brute force.

``python tests/cnn_reference.py`` (with torch) rewrites ``tests/data/cnn_reference.npz``: every field of the
analysis of each of :data:`CONFIGS` with :func:`params` on :func:`images`, from per-output Jacobians and Hessians
of the flat parameter vector (``torch.func.jacrev`` / ``torch.func.hessian``, float64) — no fishercore
derivative code.  ``tests/test_cnn.py`` recomputes it in the torch environment (so the file cannot go stale) and
compares torch's ``from_module`` and JAX's ``from_function`` of the Flax module with the same weights with it.
"""

from __future__ import annotations

import pathlib

import numpy as np

from fishercore.report import cnn

#: max pooling and tanh without batch norm (the report's network, narrower); average pooling, SiLU and eval-mode
#: batch norm after each convolution (Flax's BatchNorm with use_running_average)
CONFIGS = {"max_tanh": cnn.Config(channels=(2, 3), classes=4),
           "avg_silu_bn": cnn.Config(channels=(2, 3), classes=4, activation="silu", pool="avg", batchnorm=True)}
FIELDS = ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper")
PATH = pathlib.Path(__file__).parent / "data" / "cnn_reference.npz"


def params(tag: str) -> dict:
    return cnn.init_params(CONFIGS[tag], seed=3, perturb=0.4)


def images() -> np.ndarray:
    return np.random.default_rng(5).uniform(0.0, 1.0, size=(5, 1, 8, 8))


def brute_force() -> dict:
    """Every field (flat, torch parameter order) of each configuration, keys ``<tag>_<field>``."""
    import torch

    import fishercore as fc
    from helpers import torch_brute_force

    ref = {}
    for tag, config in CONFIGS.items():
        net = cnn.torch_model(config, params(tag), dtype=torch.float64)
        for f, v in torch_brute_force(net, torch.as_tensor(images()), fc.Categorical()).items():
            ref[f"{tag}_{f}"] = v.numpy()
    return ref


if __name__ == "__main__":  # pragma: no cover
    PATH.parent.mkdir(exist_ok=True)
    np.savez(PATH, **brute_force())
    print(f"wrote {PATH}")
