r"""Which parameters a torch function is piecewise linear in, read off its ATen graph (``make_fx``).

The same analysis as :mod:`fishercore.backends._jax_linearity` (see there): every value of the
traced graph carries ``D``, the parameters it depends on, and ``N``, those in a single coordinate
of which it may be curved.  Shape operations, sums, ``relu``/``max``/``where``, pooling and
embedding lookups pass both on; products (``mm``, ``mul``, ``addmm``, convolutions, ``linear``)
are curved in the parameters both factors depend on; a quotient in its divisor's; ``layer_norm``
in its input's (an eval-mode batch norm is affine in its input); comparisons and integer results
depend on nothing.  Every other operation — ``tanh``, ``exp``, ``sigmoid``, ``gelu``, ``silu``,
``softmax``, ``pow`` … — is curved in everything it depends on.  Errs only towards "curved"; a
function that cannot be traced is taken as curved in every parameter.
"""

from __future__ import annotations

import operator

import torch

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
_EMPTY = frozenset()


def _name(target) -> str:
    packet = getattr(target, "overloadpacket", None)
    return getattr(packet, "__name__", str(target)).split(".")[-1]


def _walk(graph, inputs):
    env = {}
    placeholders = iter(inputs)
    out = []

    def read(a):
        if isinstance(a, torch.fx.Node):
            return env.get(a, (_EMPTY, _EMPTY))
        if isinstance(a, (list, tuple)):
            parts = [read(b) for b in a]
            return (frozenset().union(*(d for d, _ in parts)), frozenset().union(*(n for _, n in parts)))
        return _EMPTY, _EMPTY

    for node in graph.nodes:
        if node.op == "placeholder":
            env[node] = next(placeholders, (_EMPTY, _EMPTY))
            continue
        if node.op == "output":
            out.append(read(node.args[0]))
            continue
        if node.op != "call_function":
            env[node] = (_EMPTY, _EMPTY)
            continue
        args = [read(a) for a in node.args]
        deps = frozenset().union(*(d for d, _ in args)) if args else _EMPTY
        curved = frozenset().union(*(n for _, n in args)) if args else _EMPTY
        if node.target is operator.getitem:
            env[node] = args[0]
            continue
        name = _name(node.target)
        if name in _LINEAR:
            pass
        elif name in _PIECEWISE_CONSTANT:
            deps, curved = _EMPTY, _EMPTY
        elif name == "native_batch_norm" and len(node.args) > 5 and node.args[5] is False:
            curved = curved | (args[0][0] & args[1][0])  # running statistics: affine in the input
        elif name == "native_layer_norm":  # (input, shape, weight, bias): normalisation curves the input's
            curved = curved | args[0][0]
        elif name in _BILINEAR and len(args) > max(_BILINEAR[name]):
            a, b = _BILINEAR[name]
            curved = curved | (args[a][0] & args[b][0])
        elif name == "div" and len(args) == 2:
            curved = curved | args[1][0]
        else:
            curved = curved | deps
        meta = node.meta.get("val")
        floating = not isinstance(meta, torch.Tensor) or meta.dtype.is_floating_point
        env[node] = (deps, curved) if floating else (_EMPTY, _EMPTY)
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
    inputs = [(frozenset({k}), _EMPTY) for k in names]
    curved = frozenset()
    for _, n in _walk(graph, inputs):
        curved |= n
    return curved
