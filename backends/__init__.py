"""Backends: adapters that supply derivatives of a network's outputs to the core.

* :mod:`fishercore.backends.mlp` — a hand-written MLP with closed-form first and
  second derivatives, on any array-API library (NumPy, CuPy, torch tensors, JAX
  arrays, array_api_strict).

Framework adapters import their framework only when imported themselves.
"""
