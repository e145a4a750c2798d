"""Fixtures: array backends (set up inside the fixture, never at import) and problems as data.

``FISHERCORE_BACKENDS`` (comma-separated) names the array libraries the tests run
on: numpy, array_api_strict, torch, jax, cupy, torch-cuda, jax-gpu.  A named
backend that fails to import *fails* the run.  Unset: numpy plus whatever of
array_api_strict, torch and jax is importable.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

from helpers import BACKENDS, DEVIATIONS, REQUIRED


class Backend(NamedTuple):
    name: str
    xp: Any  # the array-API namespace fishercore will see
    asarray: Callable  # numpy array -> backend array (dtype kept)
    to_numpy: Callable  # backend array -> numpy array
    device: Any


def _make_backend(name: str) -> Backend:
    from array_api_compat import array_namespace, device

    if name == "numpy":
        conv, back = np.asarray, np.asarray
    elif name == "array_api_strict":
        import array_api_strict as xs

        conv, back = xs.asarray, np.asarray
    elif name in ("torch", "torch-cuda"):
        import torch

        dev = "cuda" if name == "torch-cuda" else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("torch-cuda requested but torch.cuda.is_available() is False")

        def conv(a):
            return torch.asarray(np.ascontiguousarray(a), device=dev)

        def back(t):
            return t.detach().cpu().numpy()
    elif name in ("jax", "jax-gpu"):
        import jax

        jax.config.update("jax_enable_x64", True)  # inside the fixture, never at import
        # On GPUs JAX multiplies float32 matrices in TF32 by default (~3 digits; 6e-4 seen on an
        # H200); the float32 tolerance assumes true float32 products.
        jax.config.update("jax_default_matmul_precision", "highest")
        platform = "gpu" if name == "jax-gpu" else "cpu"
        dev = jax.devices(platform)[0]

        def conv(a):
            return jax.device_put(np.asarray(a), dev)

        back = np.asarray
    elif name == "cupy":
        import cupy

        conv, back = cupy.asarray, cupy.asnumpy
    else:  # pragma: no cover
        raise ValueError(name)
    probe = conv(np.zeros(1))
    return Backend(name, array_namespace(probe), conv, back, device(probe))


_CACHE: dict[str, Backend] = {}


def get_backend(name: str) -> Backend:
    if name not in _CACHE:
        try:
            _CACHE[name] = _make_backend(name)
        except Exception as e:  # noqa: BLE001
            if REQUIRED:
                pytest.fail(f"backend {name!r} is required by FISHERCORE_BACKENDS but failed to load: {e!r}")
            pytest.skip(f"backend {name!r} not available: {e!r}")
    return _CACHE[name]


@pytest.fixture(params=BACKENDS)
def backend(request) -> Backend:
    """Every array backend this run covers (the `xp` fixture of SciPy/scikit-learn)."""
    return get_backend(request.param)


@pytest.fixture
def xp(backend):
    return backend.xp


@pytest.fixture
def jax_x64():
    """JAX with float64 enabled (switched on here, inside a fixture, never at import)."""
    return get_backend("jax-gpu" if "jax" not in BACKENDS and "jax-gpu" in BACKENDS else "jax")


def pytest_report_header(config):
    return f"fishercore backends: {', '.join(BACKENDS)} ({'required' if REQUIRED else 'auto-detected'})"


def pytest_terminal_summary(terminalreporter):
    """The largest deviation from the float64 NumPy reference, per backend and dtype."""
    if not DEVIATIONS:
        return
    terminalreporter.section("largest deviation from the float64 NumPy reference (max |got - ref| / max |ref|)")
    for (kind, dtype), (err, where) in sorted(DEVIATIONS.items()):
        terminalreporter.write_line(f"{kind:<22} {dtype:<8} {err:.2e}   ({where})")
