"""Layer rules, each written once against an operations object (:mod:`fishercore.backends.ops`).

* :mod:`.activations` — ``φ``, ``φ'``, ``φ''`` of elementwise activations: closed forms, or a
  framework's ``jvp``;
* :mod:`.dense` — chains of dense layers: forward, backpropagation of cotangents, and the
  diagonal output Hessians from per-neuron curvature factors;
* :mod:`.columns` — full derivative columns of any function: vjps per output, and the
  Hessian diagonal by forward over forward along unit vectors.

The adapters (:mod:`fishercore.backends.mlp`, ``.torch``, ``.jax``) only walk their
model's structure and hand these rules their operations; a fix to a rule lands once for
every backend.  The math is in ``docs/math.md`` §8 (dense chains) and §9 (columns).
"""
