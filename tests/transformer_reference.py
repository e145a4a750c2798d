"""The tiny transformer both frameworks are checked against, and its reference statistics by brute force.

``python tests/transformer_reference.py`` (with torch) rewrites ``tests/data/transformer_reference.npz``:
every field of the analysis of :data:`CONFIG` with :func:`params` on :func:`tokens`, from per-output
Jacobians and Hessians of the flat parameter vector (``torch.func.jacrev`` / ``torch.func.hessian``,
float64) — no fishercore derivative code.  ``tests/test_transformer.py`` recomputes it in the torch
environment (so the file cannot go stale) and compares torch's ``from_module`` and JAX's
``from_function`` of the same weights with it.
"""

from __future__ import annotations

import pathlib

import numpy as np

from fishercore.report import transformer as tr

CONFIG = tr.Config(vocab=5, context=4, width=4, heads=2, depth=1, hidden=6)
FIELDS = ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper")
PATH = pathlib.Path(__file__).parent / "data" / "transformer_reference.npz"


def params() -> dict:
    return tr.init_params(CONFIG, seed=1, perturb=0.3)


def tokens() -> np.ndarray:
    return np.random.default_rng(2).integers(0, CONFIG.vocab, size=(6, CONFIG.context))


def mask() -> np.ndarray:
    keep = np.ones((6, CONFIG.context), dtype=bool)
    keep[1, 3] = keep[4, :2] = False
    return keep


def brute_force() -> dict:
    """Every field (flat, torch parameter order) from per-output Hessians, with and without the mask."""
    import torch

    import fishercore as fc

    net = tr.torch_model(CONFIG, params(), dtype=torch.float64)
    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])

    def h(theta, x):
        parts, k = {}, 0
        for n, sh in zip(names, shapes):
            parts[n] = theta[k:k + sh.numel()].reshape(sh)
            k += sh.numel()
        return torch.func.functional_call(net, parts, (x[None],))[0].reshape(-1)

    X = torch.as_tensor(tokens())
    out = torch.stack([h(flat, x) for x in X])
    U = torch.stack([torch.func.jacrev(h)(flat, x) for x in X])
    W = torch.stack([torch.diagonal(torch.func.hessian(h)(flat, x), dim1=-2, dim2=-1) for x in X])
    ref = {}
    for tag, keep in (("", None), ("masked_", torch.as_tensor(mask()))):
        u, w = U, W
        if keep is not None:  # masked positions: no term of the log-likelihood
            weights = keep.repeat_interleave(CONFIG.vocab, dim=1).to(torch.float64)[:, :, None]
            u, w = U * weights, W * weights
        family = fc.Positions("categorical", CONFIG.context)
        stats = fc.fisher_stats(out, u, w, family)
        if keep is not None:  # the spectrum over the kept positions only
            spectrum = family.spectrum(out, keep)
            stats = fc.stats.per_input_stats(out, u, w, family, spectrum)
        for f in FIELDS:
            if f == "var_x":
                ref[tag + f] = stats.fisher.var(0, correction=0).numpy()
            else:
                ref[tag + f] = getattr(stats, f).mean(0).numpy()
    return ref


if __name__ == "__main__":  # pragma: no cover
    PATH.parent.mkdir(exist_ok=True)
    np.savez(PATH, **brute_force())
    print(f"wrote {PATH}")
