"""Fixtures: array backends (set up inside the fixture, never at import) and problems as data.

``FISHERCORE_BACKENDS`` (comma-separated) names the array libraries the tests run
on: numpy, array_api_strict, torch, jax, cupy, torch-cuda, jax-gpu.  A named
backend that fails to import *fails* the run; a GPU backend whose library loads but
finds no GPU is skipped.  Unset: numpy plus whatever of array_api_strict, torch and
jax is importable, and the GPU backends of those libraries (and CuPy) where an NVIDIA
GPU is present.  Tests on GPU backends carry the ``gpu`` marker: ``pytest -m gpu``.

Each test runs where the backends it exercises are named (:func:`helpers.backends_of`):
a test of the torch adapter with ``torch``, a cross-backend case with its kind's
library, and a backend-independent test of the core (on the NumPy reference) with
``numpy`` — so a tox matrix runs each test once, in the environment built for it.
"""

from __future__ import annotations

import pytest

from helpers import BACKENDS, DEVIATIONS, GPU_BACKENDS, REQUIRED, Backend, backends_of, get_backend


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


def pytest_collection_modifyitems(config, items):
    """Keep the tests whose backends this run names; mark those on a GPU backend ``gpu`` (``pytest -m gpu``)."""
    keep, drop = [], []
    for item in items:
        used = backends_of(item)
        (keep if used & set(BACKENDS) else drop).append(item)
        if used & set(GPU_BACKENDS):
            item.add_marker(pytest.mark.gpu)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep


def pytest_report_header(config):
    return f"fishercore backends: {', '.join(BACKENDS)} ({'required' if REQUIRED else 'auto-detected'})"


def pytest_terminal_summary(terminalreporter):
    """The largest deviation from the float64 NumPy reference, per backend and dtype."""
    if not DEVIATIONS:
        return
    terminalreporter.section("largest deviation from the float64 NumPy reference (max |got - ref| / max |ref|)")
    for (kind, dtype), (err, where) in sorted(DEVIATIONS.items()):
        terminalreporter.write_line(f"{kind:<22} {dtype:<8} {err:.2e}   ({where})")
