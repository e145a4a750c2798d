"""What the torch adapters share: the torch operations, input checks, and the parameters of a module.

Private to :mod:`fishercore.backends.torch` (which imports torch only when imported itself).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping

import array_api_compat.torch as torch_xp
import torch
from torch import nn

from fishercore._protocol import make_groups
from fishercore._validation import check_inputs, check_supported_dtype

from .ops import namespace_ops

OPS = namespace_ops(torch_xp)

# functional_call and forward hooks change the module object while they run, and torch.func's
# forward-mode levels are process-wide (two threads taking jvps at once crash torch): calls that
# use either hold this lock, so models are safe to analyse from several threads.
MODULE_LOCK = threading.RLock()


def check_tensor(X, *, dtype, device, input_shape=None, input_dtype=None, n_tokens=None):
    """A batch of inputs for a torch model (:func:`fishercore._validation.check_inputs` on torch's namespace)."""
    return check_inputs(X, xp=torch_xp, dtype=dtype, device=device, input_shape=input_shape, input_dtype=input_dtype,
                        n_tokens=n_tokens)


def model_dtype_device(params: Mapping[str, torch.Tensor], what: str):
    if not params:
        raise ValueError(f"{what}: has no parameters")
    dtypes = {p.dtype for p in params.values()}
    devices = {p.device for p in params.values()}
    if len(dtypes) != 1 or len(devices) != 1:
        raise TypeError(f"{what}: parameters must share one dtype and device, got {sorted(map(str, dtypes))} "
                        f"on {sorted(map(str, devices))}")
    (dtype,), (device,) = dtypes, devices
    if device.type == "meta":
        raise ValueError(f"{what}: parameters are on the meta device, which holds no values; materialise them "
                         "first (e.g. module.to_empty(device='cpu') and load the weights)")
    if not dtype.is_floating_point or dtype.is_complex:
        raise TypeError(f"{what}: parameters must be real floating point, got {dtype}")
    check_supported_dtype(dtype, what)
    for name, p in params.items():
        if not bool(torch.isfinite(p).all()):
            raise ValueError(f"{what}: parameter {name!r} contains NaN or inf")
    return dtype, device


def outputs_width(h, what):
    if not isinstance(h, torch.Tensor) or h.ndim != 2:
        raise ValueError(f"{what}: must return outputs of shape (n, C), got {getattr(h, 'shape', type(h))}")
    return int(h.shape[1])


def outputs_shape(h, what) -> tuple:
    """The shape of one input's outputs: (C,), or (T, C) for sequence outputs (n, T, C)."""
    if not isinstance(h, torch.Tensor) or h.ndim not in (2, 3):
        raise ValueError(f"{what}: must return outputs of shape (n, C), or (n, T, C) for sequences, "
                         f"got {getattr(h, 'shape', type(h))}")
    return tuple(int(s) for s in h.shape[1:])


def flat_outputs(h):
    """Outputs (n, C) as they are, sequence outputs (n, T, C) as (n, T·C), position-major."""
    return h if h.ndim == 2 else h.reshape(h.shape[0], -1)


_RANDOM_IN_TRAINING = (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm, nn.RReLU)


def check_eval_mode(module: nn.Module) -> None:
    """Refuse a module whose dropout draws random masks, or whose batch norm uses batch statistics: its outputs
    for one input depend on the others or on chance, so there is no per-input Fisher to compute."""
    for name, m in module.named_modules():
        if isinstance(m, _RANDOM_IN_TRAINING) and m.training:
            what = "draws random masks" if isinstance(m, nn.modules.dropout._DropoutNd) else "draws random slopes" \
                if isinstance(m, nn.RReLU) else \
                "normalises by the batch's statistics"
            raise ValueError(f"module: {name or '<root>'!r} ({type(m).__name__}) is in training mode, where it {what}; "
                             "call module.eval() before building the model (Dropout is then the identity, "
                             "BatchNorm uses its running statistics)")


@contextlib.contextmanager
def randomness_refused(what: str):
    """Turn torch.func's error for a random operation under vmap into one that says what to do."""
    try:
        yield
    except RuntimeError as e:
        if "random operation" not in str(e):
            raise
        raise ValueError(f"{what}: draws random numbers (dropout in training mode?); call .eval() on the module "
                         "it runs, or remove the randomness: a per-input analysis needs a deterministic "
                         "network") from None


class TorchModel:
    """What the module adapters share: parameters, dtype and device, groups, input checks."""

    def __init__(self, module: nn.Module):
        if not isinstance(module, nn.Module):
            raise TypeError(f"module: expected a torch.nn.Module, got {type(module).__name__}")
        hooked = [name or "<root>" for name, m in module.named_modules()
                  if getattr(m, "_backward_hooks", None) or getattr(m, "_backward_pre_hooks", None)]
        if hooked:
            raise ValueError(f"module: submodules {hooked} carry backward hooks (e.g. from backpack.extend), "
                             "which torch.func cannot trace; pass a copy without them (copy.deepcopy before extend)")
        check_eval_mode(module)
        self.module = module
        self.params = {k: v.detach() for k, v in module.named_parameters()}
        self.buffers = {k: v.detach() for k, v in module.named_buffers()}
        self.dtype, self.device = model_dtype_device(self.params, "module")
        self.groups = make_groups([(k, tuple(v.shape)) for k, v in self.params.items()])
        self.linears = [(name, m) for name, m in module.named_modules() if isinstance(m, nn.Linear)]

    def __repr__(self) -> str:
        P = sum(g.size for g in self.groups)
        return f"{type(self).__name__}({type(self.module).__name__}, {len(self.linears)} Linear, P={P}, {self.dtype})"

    def _layout(self):
        return tuple((f"{name}.weight" if name else "weight",
                      ((f"{name}.bias" if name else "bias") if lin.bias is not None else None), False)
                     for name, lin in self.linears)
