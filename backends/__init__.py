"""Backends: adapters that supply derivatives of a network's outputs to the core.

* :mod:`fishercore.backends.mlp` — a hand-written MLP with closed-form first and
  second derivatives, on any array-API library (NumPy, CuPy, torch tensors, JAX
  arrays, array_api_strict);
* :mod:`fishercore.backends.torch` and :mod:`fishercore.backends.jax` — PyTorch and
  JAX models, differentiated by their own frameworks;
* :mod:`fishercore.backends.rules` — the layer rules all of them share, written once
  against :mod:`fishercore.backends.ops`, the per-framework operations.

Framework adapters import their framework only when imported themselves.
"""
