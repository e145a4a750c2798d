r"""Which parameters a torch function is piecewise linear in, read off its ATen graph (``make_fx``).

The rule is :mod:`fishercore.backends.rules.linearity`'s; this module maps ATen operations to its
kinds (an eval-mode ``native_batch_norm``, ``cudnn_batch_norm`` on CUDA, is a product of its input and
scale, ``native_layer_norm`` a normalisation).  A function that cannot be traced is taken as curved in every parameter.
"""

from __future__ import annotations

import operator

import torch

from .rules.linearity import EMPTY, propagate

__all__ = ["curved_params"]

_LINEAR = frozenset({
    "t", "transpose", "permute", "view", "reshape", "_unsafe_view", "expand", "unsqueeze", "squeeze", "slice",
    "select", "cat", "stack", "sum", "mean", "clone", "_to_copy", "relu", "maximum", "minimum", "abs", "where",
    "add", "sub", "rsub", "neg", "alias", "flatten", "contiguous", "max_pool1d_with_indices",
    "max_pool2d_with_indices", "max_pool3d_with_indices", "avg_pool1d", "avg_pool2d", "avg_pool3d",
    "_adaptive_avg_pool2d", "adaptive_avg_pool1d", "adaptive_avg_pool2d", "leaky_relu", "hardtanh", "clamp",
    "index_select", "embedding", "gather", "constant_pad_nd", "split", "split_with_sizes", "unbind", "copy",
    "amax", "amin", "max", "min", "sort", "cumsum", "repeat", "roll", "flip", "narrow", "lift_fresh_copy",
    "masked_fill", "unfold", "im2col", "col2im", "pad", "squeeze_copy",
    "view_copy", "expand_copy", "permute_copy", "t_copy", "transpose_copy", "unsqueeze_copy",
})
_PIECEWISE_CONSTANT = frozenset({
    "gt", "ge", "lt", "le", "eq", "ne", "sign", "floor", "ceil", "round", "trunc", "argmax", "argmin",
    "zeros_like", "ones_like", "full_like", "empty_like", "full", "zeros", "ones", "arange", "empty",
    "scalar_tensor", "logical_and", "logical_or", "logical_not", "isnan", "isinf", "isfinite", "detach",
})
# name → the positions of the two factors whose common parameters make the product curved
_BILINEAR = {"mm": (0, 1), "bmm": (0, 1), "mul": (0, 1), "matmul": (0, 1), "dot": (0, 1), "mv": (0, 1),
             "addmm": (1, 2), "baddbmm": (1, 2), "addmv": (1, 2), "linear": (0, 1), "convolution": (0, 1),
             "_native_batch_norm_legit_no_training": (0, 1)}
# batch norms (input, weight, bias, running_mean, running_var, training, …): CPU, CUDA (cuDNN) and ROCm kernels
_BATCH_NORMS = frozenset({"native_batch_norm", "cudnn_batch_norm", "miopen_batch_norm"})


def _name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", str(target)).split(".")[-1]


def _kind(name: str) -> str | None:
    if name in _LINEAR:
        return "linear"
    if name in _PIECEWISE_CONSTANT:
        return "constant"
    if name == "native_layer_norm":  # (input, shape, weight, bias)
        return "normalise"
    return "quotient" if name == "div" else None


def _walk(graph, inputs):
    env = {}
    placeholders = iter(inputs)
    out = []

    def read(a):
        if isinstance(a, torch.fx.Node):
            return env.get(a, (EMPTY, EMPTY))
        if isinstance(a, (list, tuple)):
            parts = [read(b) for b in a]
            return (frozenset().union(*(d for d, _ in parts)), frozenset().union(*(n for _, n in parts)))
        return EMPTY, EMPTY

    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders, (EMPTY, EMPTY))
            continue
        if node.op == "output":
            out.append(read(node.args[0]))
            continue
        if node.op != "call_function":
            env[node] = (EMPTY, EMPTY)
            continue
        args = [read(a) for a in node.args]
        if node.target is operator.getitem:
            env[node] = args[0]
            continue
        name = _name(node.target)
        if name in _BATCH_NORMS and len(node.args) > 5 and node.args[5] is False:
            deps, curved = propagate("product", args)  # running statistics: affine in the input
        elif name in _BILINEAR:
            deps, curved = propagate("product", args, _BILINEAR[name])
        else:
            deps, curved = propagate(_kind(name), args)
        meta = node.meta.get("val")
        floating = not isinstance(meta, torch.Tensor) or meta.dtype.is_floating_point
        env[node] = (deps, curved) if floating else (EMPTY, EMPTY)
    return out


def curved_params(fn, params: dict, example_x) -> frozenset:
    """Names of the parameters in a single coordinate of which ``fn(params, x)`` may be curved (all of them
    when the function cannot be traced)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    names = list(params)

    def flat(leaves, x):
        return fn(dict(zip(names, leaves)), x)

    try:
        graph = make_fx(flat)([params[k] for k in names], example_x).graph
    except Exception:  # noqa: BLE001 - any tracing failure: assume curvature everywhere (exact, slower)
        return frozenset(names)
    inputs = [(frozenset({k}), EMPTY) for k in names]
    curved = frozenset()
    for _, n in _walk(graph, inputs):
        curved |= n
    return curved
