"""The per-framework operations that the layer rules and the core are written against.

One small class per array library, chosen lazily by an array's namespace — the pattern
of einops' ``_backends.py``: :func:`ops_for` recognises it through ``array_api_compat``'s
``is_*_namespace`` (which never import a framework), and a framework is imported here only
once an array of it exists.

An :class:`Ops` supplies

* ``xp`` — the array-API namespace;
* ``vjp``, ``jvp``, ``vmap`` — autodiff and vectorisation (torch.func or JAX; libraries
  without autodiff raise);
* ``jit(fn, static_argnames)`` — the compile policy: JAX compiles (one cache per
  function, so code is compiled once per structure, dtype and shape, never per model
  instance), everything else runs eagerly;
* ``no_grad()``, ``detach(x)`` — keep the caller's autograd graph out of the analysis;
* ``to_host(x)`` — a NumPy copy on the host (for files);
* ``prefers_large_batches(x)`` — compiled or accelerator arrays, for which batches are
  limited by the memory budget alone;
* ``free_device_memory(x)`` — bytes free on the accelerator that holds x (what the library's own
  allocator holds unused counted as free), or None for arrays in host memory;
* ``compiles`` — code is compiled per shape, so the drivers pad a short last batch to the batch size.
"""

from __future__ import annotations

import contextlib

import numpy as np
from array_api_compat import array_namespace, is_cupy_namespace, is_jax_namespace, is_torch_namespace

__all__ = ["CupyOps", "JaxOps", "Ops", "TorchOps", "namespace_ops", "ops_for"]


class Ops:
    """Array-API operations of a library without autodiff (NumPy, array_api_strict, ...), run eagerly."""

    compiles = False  # True: code is compiled for each new shape (batches are padded to one shape)
    mutable = True  # arrays can be updated in place (``+=``), so running sums keep their memory

    def __init__(self, xp):
        self.xp = xp

    @property
    def name(self) -> str:
        return self.xp.__name__

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name})"

    def _no_autodiff(self, what):
        raise NotImplementedError(f"{self.name} arrays have no automatic differentiation ({what}); "
                                  "use a framework backend (torch or JAX) for this model")

    def vjp(self, f, *primals, has_aux: bool = False):
        """``(f(*primals), pull)`` with ``pull(cotangent)`` the tuple of vector-Jacobian products."""
        self._no_autodiff("vjp")

    def jvp(self, f, primals: tuple, tangents: tuple):
        """``(f(*primals), Jacobian-vector product along tangents)``."""
        self._no_autodiff("jvp")

    def vmap(self, f, in_axes=0, out_axes=0):
        """``f`` mapped over an axis of its arguments."""
        self._no_autodiff("vmap")

    def elementwise_derivatives(self, fn, z, order: int, curved: bool = True):
        """``(φ(z), φ'(z), φ''(z))`` of an elementwise ``φ = fn`` (None past ``order``, and for φ'' when not
        ``curved``): ``jvp`` with a tangent of ones, once for φ' and once more for φ''."""
        if order == 0:
            return fn(z), None, None
        ones = self.xp.ones_like(z)

        def first(t):
            return self.jvp(fn, (t,), (ones,))

        if order == 1 or not curved:
            f, d1 = first(z)
            return f, d1, None
        (f, d1), (_, d2) = self.jvp(first, (z,), (ones,))
        return f, d1, d2

    def jit(self, fn, static_argnames=()):
        """``fn`` itself: this library runs eagerly."""
        return fn

    def no_grad(self):
        return contextlib.nullcontext()

    def detach(self, x):
        return x

    def to_host(self, x) -> np.ndarray:
        """A NumPy copy of ``x`` (DLPack on the CPU)."""
        try:
            return np.from_dlpack(x).copy()
        except (RuntimeError, TypeError, ValueError, BufferError):
            return np.array(x, copy=True)

    def prefers_large_batches(self, x) -> bool:
        """False: eager CPU libraries stop gaining from batches beyond a few hundred inputs."""
        return False

    def free_device_memory(self, x) -> int | None:
        """None: the array is in host memory."""
        return None


class CupyOps(Ops):
    """CuPy: eager, on an NVIDIA GPU."""

    def to_host(self, x) -> np.ndarray:
        return x.get()

    def prefers_large_batches(self, x) -> bool:
        return True

    def free_device_memory(self, x) -> int | None:
        """The driver's free bytes on x's device and the blocks CuPy's memory pool holds unused."""
        import cupy

        with cupy.cuda.Device(x.device.id):
            return int(cupy.cuda.runtime.memGetInfo()[0]) + int(cupy.get_default_memory_pool().free_bytes())


class TorchOps(Ops):
    """PyTorch: ``torch.func`` transforms, eager; CUDA tensors prefer large batches."""


    def __init__(self, xp):
        super().__init__(xp)
        import torch
        import torch.func

        self.torch, self.func = torch, torch.func

    def vjp(self, f, *primals, has_aux=False):
        return self.func.vjp(f, *primals, has_aux=has_aux)

    def jvp(self, f, primals, tangents):
        return self.func.jvp(f, primals, tangents)

    def vmap(self, f, in_axes=0, out_axes=0):
        return self.func.vmap(f, in_dims=in_axes, out_dims=out_axes)

    def elementwise_derivatives(self, fn, z, order: int, curved: bool = True):
        """``φ'`` and ``φ''`` of an elementwise ``φ`` by reverse mode on ``Σ φ(z)`` (whose gradient is
        ``φ'(z)``, φ being elementwise): plain autograd costs a fraction of ``torch.func.jvp``'s dual
        tensors (measured: Î1 on the digits MLP, 9 of 21 ms in the jvps)."""
        torch = self.torch
        if order == 0:
            return fn(z), None, None
        second = order >= 2 and curved
        with torch.enable_grad():
            t = z.detach().requires_grad_(True)
            f = fn(t)
            d1 = torch.autograd.grad(f.sum(), t, create_graph=second)[0] if f.requires_grad else torch.zeros_like(z)
            d2 = None
            if second:
                d2 = torch.autograd.grad(d1.sum(), t)[0] if d1.requires_grad else torch.zeros_like(z)
        return f.detach(), d1.detach(), d2

    def no_grad(self):
        return self.torch.no_grad()

    def detach(self, x):
        return x.detach()

    def to_host(self, x) -> np.ndarray:
        return x.detach().cpu().numpy().copy()

    def prefers_large_batches(self, x) -> bool:
        return x.device.type != "cpu"

    def free_device_memory(self, x) -> int | None:
        """CUDA: the driver's free bytes and what torch's caching allocator holds unused; None elsewhere (the CPU,
        and devices whose free memory torch does not report)."""
        if x.device.type != "cuda":
            return None
        cuda = self.torch.cuda
        unused = cuda.memory_reserved(x.device) - cuda.memory_allocated(x.device)
        return int(cuda.mem_get_info(x.device)[0]) + int(unused)


class JaxOps(Ops):
    """JAX: ``jax.vjp``/``jvp``/``vmap``, and ``jax.jit`` with one cache per function."""

    compiles = True
    mutable = False

    def __init__(self, xp):
        super().__init__(xp)
        import jax

        self.jax = jax
        self._compiled: dict = {}

    def vjp(self, f, *primals, has_aux=False):
        return self.jax.vjp(f, *primals, has_aux=has_aux)

    def jvp(self, f, primals, tangents):
        return self.jax.jvp(f, primals, tangents)

    def vmap(self, f, in_axes=0, out_axes=0):
        return self.jax.vmap(f, in_axes=in_axes, out_axes=out_axes)

    def jit(self, fn, static_argnames=()):
        """``jax.jit(fn)``, made once per function: a module-level ``fn`` with the structure of the
        model in ``static_argnames`` compiles once per structure, dtype and shape."""
        key = (fn, tuple(static_argnames))
        if key not in self._compiled:
            self._compiled[key] = self.jax.jit(fn, static_argnames=static_argnames)
        return self._compiled[key]

    def detach(self, x):
        return self.jax.lax.stop_gradient(x)

    def to_host(self, x) -> np.ndarray:
        return np.array(x, copy=True)

    def prefers_large_batches(self, x) -> bool:
        """On accelerators; on the CPU, compiled code too is fastest at a few hundred inputs (measured: the
        digits MLP's analyze took 110 ms in batches of 512, 174 ms in one batch of 1,797)."""
        return any(d.platform != "cpu" for d in x.devices())

    def free_device_memory(self, x) -> int | None:
        """An accelerator's ``bytes_limit − bytes_in_use`` (JAX's allocator, which by default takes 75 % of the device
        at start); None on the CPU and where the device reports no memory statistics."""
        dev = next(iter(x.devices()))
        if dev.platform == "cpu":
            return None
        stats = dev.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))


_BY_NAMESPACE: dict = {}


def namespace_ops(xp) -> Ops:
    """The :class:`Ops` of an array-API namespace (one instance per namespace, so one compile cache)."""
    key = xp.__name__
    if key not in _BY_NAMESPACE:
        if is_torch_namespace(xp):
            cls = TorchOps
        elif is_jax_namespace(xp):
            cls = JaxOps
        elif is_cupy_namespace(xp):
            cls = CupyOps
        else:
            cls = Ops
        _BY_NAMESPACE[key] = cls(xp)
    return _BY_NAMESPACE[key]


def ops_for(*arrays) -> Ops:
    """The :class:`Ops` of the arrays' library."""
    return namespace_ops(array_namespace(*arrays))
