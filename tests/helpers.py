"""Problems as data, reference constructions and independent checks used by the tests."""

from __future__ import annotations

import importlib
import itertools
import os
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
import pytest

import fishercore as fc
from fishercore.backends import mlp

CPU_BACKENDS = ("numpy", "array_api_strict", "torch", "jax")
GPU_BACKENDS = ("cupy", "torch-cuda", "jax-gpu")
# cross-backend kinds that run on a GPU, and the backend whose device they need
GPU_KINDS = {"mlp-cupy": "cupy", "mlp-torch-cuda": "torch-cuda", "torch-sequential-cuda": "torch-cuda",
             "mlp-jax-gpu": "jax-gpu", "jax-mlp-gpu": "jax-gpu"}


def _requested() -> tuple[tuple[str, ...], bool]:
    env = os.environ.get("FISHERCORE_BACKENDS", "").strip()
    if env:
        names = tuple(n.strip() for n in env.split(",") if n.strip())
        unknown = set(names) - set(CPU_BACKENDS) - set(GPU_BACKENDS)
        if unknown:
            raise pytest.UsageError(f"FISHERCORE_BACKENDS: unknown backends {sorted(unknown)}")
        return names, True
    names = ["numpy"]
    for mod in ("array_api_strict", "torch", "jax"):
        if importlib.util.find_spec(mod) is not None:
            names.append(mod)
    if gpu_present():  # GPU backends join automatically where there is an NVIDIA GPU
        for name, mod in (("cupy", "cupy"), ("torch-cuda", "torch"), ("jax-gpu", "jax")):
            if importlib.util.find_spec(mod) is not None:
                names.append(name)
    return tuple(names), False


def gpu_present() -> bool:
    """An NVIDIA GPU is visible (cheap: no framework is imported to find out)."""
    return os.path.exists("/dev/nvidiactl") and os.environ.get("CUDA_VISIBLE_DEVICES", "0") not in ("", "-1")


BACKENDS, REQUIRED = _requested()

# cross-backend kinds, and the array library each runs on
KIND_BACKENDS = {"mlp-torch-tensors": "torch", "torch-sequential": "torch", "torch-module": "torch",
                 "torch-function": "torch", "mlp-jax-arrays": "jax", "jax-mlp": "jax", "jax-mlp-flax": "jax",
                 "jax-function": "jax", **GPU_KINDS}


def backends_of(item) -> set:
    """The array backends a collected test exercises.

    Its parameters that name a backend or a cross-backend kind, its ``backends`` marker (a module's
    ``pytestmark`` or the test's own), and for the doctests of a framework's modules in ``backends/``
    (``torch.py``, ``_torch_module.py``, ``jax.py``, ...) that framework; a test with none of these tests
    the core on the NumPy reference: ``{"numpy"}``.
    """
    used = set()
    for value in getattr(getattr(item, "callspec", None), "params", {}).values():
        if isinstance(value, str) and value in CPU_BACKENDS + GPU_BACKENDS:
            used.add(value)
        elif isinstance(value, str) and value in KIND_BACKENDS:
            used.add(KIND_BACKENDS[value])
    for mark in item.iter_markers("backends"):
        used.update(mark.args)
    path = getattr(item, "path", None)
    if type(item).__name__ == "DoctestItem" and path is not None and path.parent.name == "backends":
        used.update(b for b in ("torch", "jax") if b in path.stem.split("_"))  # torch.py, _torch_module.py, ...
    return used or {"numpy"}

# (backend kind, dtype) -> (largest normwise relative deviation, where); filled by the cross-backend suite
DEVIATIONS: dict = {}


def record_deviation(kind, dtype, err, where):
    key = (kind, str(dtype))
    if err > DEVIATIONS.get(key, (-1.0, ""))[0]:
        DEVIATIONS[key] = (float(err), where)


class NoGPU(Exception):
    """A GPU backend's library loads, but there is no GPU for it (a skip, never a failure)."""


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
            raise NoGPU("torch.cuda.is_available() is False")

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
        try:
            dev = jax.devices(platform)[0]
        except RuntimeError as e:
            raise NoGPU(f"JAX has no {platform} device ({e})") from e

        def conv(a):
            return jax.device_put(np.asarray(a), dev)

        back = np.asarray
    elif name == "cupy":
        import cupy

        try:
            cupy.cuda.runtime.getDeviceCount()
        except cupy.cuda.runtime.CUDARuntimeError as e:
            raise NoGPU(f"CuPy finds no CUDA device ({e})") from e
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
        except NoGPU as e:
            pytest.skip(f"backend {name!r}: no GPU ({e})")
        except Exception as e:  # noqa: BLE001
            if REQUIRED:
                pytest.fail(f"backend {name!r} is required by FISHERCORE_BACKENDS but failed to load: {e!r}")
            pytest.skip(f"backend {name!r} not available: {e!r}")
    return _CACHE[name]


def require_framework(name: str):
    """Import a framework for a test module: fail if FISHERCORE_BACKENDS names it, else skip if absent."""
    if not any(b == name or b.startswith(name + "-") for b in BACKENDS):
        pytest.skip(f"{name} is not among the backends of this run ({', '.join(BACKENDS)})", allow_module_level=True)
    try:
        return importlib.import_module(name)
    except ImportError as e:
        if REQUIRED:
            raise RuntimeError(f"{name} is required by FISHERCORE_BACKENDS but cannot be imported: {e}") from e
        pytest.skip(f"{name} not installed", allow_module_level=True)


def assert_raises_named(fn, exc, prefix):
    """fn() raises exc with a message that starts with prefix (the argument's name, then the problem)."""
    with pytest.raises(exc) as info:
        fn()
    assert str(info.value).startswith(prefix), str(info.value)


ACTIVATIONS = mlp.ACTIVATIONS

#: Every per-parameter field of a FisherAnalysis, in one place.
FIELDS = ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper", "v2_lower", "v2_upper")


def _numpy(to_numpy):
    """``to_numpy`` for a backend's arrays, leaving NumPy arrays (a reference's) as they are."""
    return lambda x: x if isinstance(x, np.ndarray) else to_numpy(x)


def field_scale(ref, f, to_numpy=np.asarray) -> float:
    """The scale a field of an analysis rounds on: its largest magnitude — except ``var_x``, which rounds on
    max I² (it is exactly 0 where I(x) is constant), and a lower bound, which rounds on its upper bound's (the
    spectrum's smallest eigenvalue carries eigvalsh's absolute rounding, ε λ_max)."""
    to_numpy = _numpy(to_numpy)
    if f == "var_x":
        return max(np.abs(to_numpy(ref.var_x)).max(), np.abs(to_numpy(ref.fisher)).max() ** 2)
    if f.endswith("lower"):
        return max(np.abs(to_numpy(getattr(ref, f))).max(), np.abs(to_numpy(getattr(ref, f[:2] + "_upper"))).max())
    return float(np.abs(to_numpy(getattr(ref, f))).max())


def assert_analysis_close(got, want, *, rtol=0.0, atol=0.0, to_numpy=np.asarray, fields=FIELDS):
    """Two analyses of the same inputs agree in every field:
    ``|got − want| ≤ rtol·|want| + atol·scale`` elementwise, with scale the field's rounding scale
    (:func:`field_scale`; ``rtol=0`` makes it a normwise check)."""
    assert got.n_inputs == want.n_inputs, (got.n_inputs, want.n_inputs)
    to_numpy = _numpy(to_numpy)
    for f in fields:
        g, w = to_numpy(getattr(got, f)), to_numpy(getattr(want, f))
        np.testing.assert_allclose(g, w, rtol=rtol, atol=atol * field_scale(want, f, to_numpy) + 1e-300, err_msg=f)


SMOOTH = ("tanh", "sigmoid", "softplus", "gelu", "elu")
PIECEWISE_LINEAR = ("identity", "relu", "leaky_relu")
FAMILIES = ("categorical", "gaussian", "bernoulli")

# name -> (input width, hidden widths, outputs)
ARCHS = {
    "1h": (3, (6,), 4),
    "2h": (4, (5, 6), 3),
    "3h": (3, (4, 5, 4), 3),
}


# Inputs and batch size of the tests that run on every backend: the batch size does not divide n, and on
# JAX, which compiles for each shape, sharing them lets the tests reuse each other's compiled code.
N_INPUTS, BATCH = 11, 4


class Problem(NamedTuple):
    arch: str
    activation: str
    family: str
    n: int = 11
    seed: int = 0

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.activation}-{self.family}"


def make_layers(arch, seed=0, scale=1.0, bias=True):
    d, hidden, C = ARCHS[arch] if isinstance(arch, str) else arch
    rng = np.random.default_rng(seed)
    widths = (d, *hidden, C)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        W = rng.normal(size=(b, a)) * scale / np.sqrt(a)
        layers.append((W, rng.normal(size=b) * 0.5 if bias else None))
    return layers


def make_problem(p: Problem, backend=None, dtype=np.float64):
    """(model, X) for a problem, on a backend (numpy when None)."""
    layers = make_layers(p.arch, p.seed)
    X = np.random.default_rng(p.seed + 1).normal(size=(p.n, ARCHS[p.arch][0]))
    conv = (lambda a: a.astype(dtype)) if backend is None else (lambda a: backend.asarray(a.astype(dtype)))
    model = mlp.MLP([(conv(W), None if b is None else conv(b)) for W, b in layers], p.activation)
    return model, conv(X)


def family_obj(name):
    return fc.Gaussian(variance=0.7) if name == "gaussian" else fc.get_family(name)


class AsColumns:
    """Wraps a model so every dense block is handed to the core as full columns.

    This exercises the core's generic path (ColumnBlock) and gives an independent
    check of the dense matmul aggregation.
    """

    def __init__(self, model):
        self.model = model
        self.groups = model.groups
        self.n_outputs = model.n_outputs

    def check_inputs(self, X):
        return self.model.check_inputs(X)

    def outputs(self, X):
        return self.model.outputs(X)

    def derivatives(self, X, *, hessian=True):
        d = self.model.derivatives(X, hessian=hessian)
        blocks = []
        for b in d.blocks:
            blocks.extend(dense_columns(b))
        return fc.Derivatives(d.outputs, tuple(blocks))


def dense_columns(block):
    """ColumnBlocks equal to a DenseBlock: u(W_ab) = B[:, a] a_b, w(W_ab) = γ[:, a] a_b²."""
    from array_api_compat import array_namespace

    xp = array_namespace(block.inputs)
    n, C, out = block.jac.shape
    A = block.inputs[:, None, None, :]
    u = xp.reshape(block.jac[:, :, :, None] * A, (n, C, -1))
    w = None if block.diag_hess is None else xp.reshape(block.diag_hess[:, :, :, None] * A * A, (n, C, -1))
    cols = [fc.ColumnBlock(block.weight, u, w)]
    if block.bias is not None:
        cols.append(fc.ColumnBlock(block.bias, block.jac, block.diag_hess))
    return cols


def full_columns(model, X):
    """(h, u, w) with u, w of shape (n, C, P) in flat order, from the model's blocks."""
    d = AsColumns(model).derivatives(X)
    by_name = {b.group: b for b in d.blocks}
    u = np.concatenate([np.asarray(by_name[g.name].jac) for g in model.groups], axis=-1)
    w = np.concatenate([np.asarray(by_name[g.name].diag_hess) for g in model.groups], axis=-1)
    return np.asarray(d.outputs), u, w


def richardson_derivatives(f, theta, i, eps=1e-3):
    """First and second derivative of f along coordinate i, O(eps⁴) Richardson central differences."""
    def diffs(e):
        tp, tm = theta.copy(), theta.copy()
        tp[i] += e
        tm[i] -= e
        fp, fm, f0 = f(tp), f(tm), f(theta)
        return (fp - fm) / (2 * e), (fp - 2 * f0 + fm) / (e * e)

    d1a, d2a = diffs(eps)
    d1b, d2b = diffs(eps / 2)
    return (4 * d1b - d1a) / 3, (4 * d2b - d2a) / 3


# -- brute-force moments by enumerating the label space --------------------------
def label_space(family, h):
    """[(probability, score s)] for one input's outputs h (C,), by enumeration."""
    C = h.shape[0]
    if family.name == "categorical":
        p = np.exp(h - h.max())
        p /= p.sum()
        return [(p[c], np.eye(C)[c] - p) for c in range(C)]
    if family.name == "bernoulli":
        p = 1 / (1 + np.exp(-h))
        out = []
        for y in itertools.product((0.0, 1.0), repeat=C):
            y = np.array(y)
            out.append((np.prod(np.where(y == 1, p, 1 - p)), y - p))
        return out
    raise ValueError(family.name)


def brute_moments(family, h, u, w):
    """I, E[(sᵀu)³], v1, v2, c12 by enumeration of y (categorical, bernoulli)."""
    I = m3 = m4 = v2 = c = 0.0
    for prob, s in label_space(family, h):
        x, z = s @ u, s @ w
        I += prob * x**2
        m3 += prob * x**3
        m4 += prob * x**4
        v2 += prob * z**2
        c += prob * x**2 * z
    return I, m3, m4 - I**2, v2, -c


def brute_M_spectrum(family, h):
    """Extreme eigenvalues of 𝓜 = Cov(vec(ssᵀ)) restricted to symmetric matrices (and to
    the centred subspace for the categorical family), by enumeration."""
    C = h.shape[0]
    space = label_space(family, h)
    vecs = np.array([np.outer(s, s).ravel() for _, s in space])
    probs = np.array([p for p, _ in space])
    mean = probs @ vecs
    M = (vecs - mean).T @ ((vecs - mean) * probs[:, None])
    # restricted to 1⊥ ⊗ 1⊥ for the softmax
    P = np.eye(C) - np.ones((C, C)) / C if family.name == "categorical" else np.eye(C)
    ev = symmetric_spectrum(M, P)
    return ev.min(), ev.max()


def symmetric_spectrum(M, P):
    """Eigenvalues of M (D², D²) on the symmetric D×D matrices of the form P A P (an orthonormal basis of them)."""
    D = P.shape[0]
    basis = []
    for a in range(D):
        for b in range(a, D):
            E = np.zeros((D, D))
            E[a, b] = E[b, a] = 1.0
            basis.append((P @ E @ P).ravel())
    U, sv, _ = np.linalg.svd(np.array(basis).T, full_matrices=False)
    Q = U[:, sv > 1e-10 * sv.max()]
    return np.linalg.eigvalsh(Q.T @ M @ Q)


def torch_brute_force(net, X, family):
    """Every field of a torch module's analysis from per-output Hessians of its flat parameter vector
    (torch.func.jacrev / hessian, float64): the brute force that the layer rules are checked against."""
    import torch

    names = [n for n, _ in net.named_parameters()]
    shapes = [p.shape for p in net.parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in net.parameters()])
    buffers = dict(net.named_buffers())

    def h(theta, x):
        parts, k = {}, 0
        for n, sh in zip(names, shapes):
            parts[n] = theta[k:k + sh.numel()].reshape(sh)
            k += sh.numel()
        return torch.func.functional_call(net, ({**parts, **buffers},), (x[None],))[0].reshape(-1)

    out = torch.stack([h(flat, x) for x in X])
    U = torch.stack([torch.func.jacrev(h)(flat, x) for x in X])
    W = torch.stack([torch.diagonal(torch.func.hessian(h)(flat, x), dim1=-2, dim2=-1) for x in X])
    stats = fc.fisher_stats(out, U, W, family)
    ref = {f: getattr(stats, f).mean(0) for f in ("fisher", "v1", "v2", "c12", "v1_lower", "v1_upper", "v2_lower",
                                                   "v2_upper")}
    ref["var_x"] = stats.fisher.var(0, correction=0)
    return ref
