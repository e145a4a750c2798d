"""A tiny character-level transformer, written in torch and in JAX with the same parameters, and its text.

The model: token and position embeddings, ``depth`` pre-norm blocks of causal multi-head
self-attention and a GELU MLP, each with a residual connection, a final LayerNorm and a linear
head over the characters.  Outputs are (n, T, C): one categorical label per position, as a
language model's (docs/math.md §12).  :class:`CharTransformer` (torch) and
:class:`JaxCharTransformer` (a pure function of a dict with the torch parameter names) compute
the same function, so fishercore's two backends can be compared on it
(``tests/test_transformer.py``).

The text is Python's own standard library source (it ships with every Python install),
lower-cased onto :data:`ALPHABET`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import pathlib
import sysconfig

import numpy as np

#: Characters the model predicts; every other character maps to the last one, "?".
ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789 \n.,:()[]_=\"'#-+*/?"
SOURCES = ("textwrap.py", "string.py", "fnmatch.py", "bisect.py", "heapq.py", "shlex.py", "glob.py")


def stdlib_text(max_chars: int = 200_000) -> str:
    """The first ``max_chars`` characters of a few standard-library modules' source, concatenated."""
    folder = pathlib.Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in SOURCES:
        path = folder / name
        if path.exists():
            parts.append(path.read_text(encoding="utf-8", errors="replace"))
    text = "\n".join(parts)
    if not text:
        raise FileNotFoundError(f"no standard-library source found in {folder}")
    return text[:max_chars]


def encode(text: str) -> np.ndarray:
    """Character ids (int64), lower-cased, unknown characters as "?"."""
    index = {c: i for i, c in enumerate(ALPHABET)}
    other = index["?"]
    return np.array([index.get(c, other) for c in text.lower()], dtype=np.int64)


def windows(ids: np.ndarray, context: int, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` random windows: inputs (n, T) and next-character targets (n, T)."""
    if len(ids) <= context + 1:
        raise ValueError(f"text: {len(ids)} characters are too few for windows of {context}")
    start = rng.integers(0, len(ids) - context - 1, size=n)
    idx = start[:, None] + np.arange(context)[None, :]
    return ids[idx], ids[idx + 1]


@dataclasses.dataclass(frozen=True)
class Config:
    """The transformer's shape: characters, context length, width, heads, blocks, MLP width."""

    vocab: int = len(ALPHABET)
    context: int = 16
    width: int = 32
    heads: int = 2
    depth: int = 1
    hidden: int = 64

    def names_and_shapes(self) -> list[tuple[str, tuple[int, ...]]]:
        """Parameter names (the torch module's) and shapes, in ``named_parameters()`` order."""
        d, out = self.width, [("position", (self.context, self.width)), ("embed.weight", (self.vocab, self.width))]
        for i in range(self.depth):
            p = f"blocks.{i}."
            out += [(p + "norm1.weight", (d,)), (p + "norm1.bias", (d,)), (p + "qkv.weight", (3 * d, d)),
                    (p + "qkv.bias", (3 * d,)), (p + "proj.weight", (d, d)), (p + "proj.bias", (d,)),
                    (p + "norm2.weight", (d,)), (p + "norm2.bias", (d,)), (p + "up.weight", (self.hidden, d)),
                    (p + "up.bias", (self.hidden,)), (p + "down.weight", (d, self.hidden)), (p + "down.bias", (d,))]
        return out + [("norm.weight", (d,)), ("norm.bias", (d,)), ("head.weight", (self.vocab, d)),
                      ("head.bias", (self.vocab,))]


def init_params(cfg: Config, seed: int = 0, *, perturb: float = 0.0) -> dict[str, np.ndarray]:
    """Initial weights as NumPy float64 arrays keyed by the torch names: N(0, 0.1²) embeddings, N(0, 1/fan_in)
    weights, zero biases and unit norm scales (``perturb`` > 0 adds noise of that size to biases and norms, so that
    tests see every parameter away from its special value)."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in cfg.names_and_shapes():
        if name.endswith("norm1.weight") or name.endswith("norm2.weight") or name == "norm.weight":
            value = np.ones(shape)
        elif len(shape) == 1:
            value = np.zeros(shape)
        else:
            value = rng.normal(0.0, 0.1 if name in ("embed.weight", "position") else 1.0 / math.sqrt(shape[-1]),
                               size=shape)
        if perturb and len(shape) == 1:
            value = value + perturb * rng.normal(size=shape)
        out[name] = value
    return out


def torch_model(cfg: Config, params: dict | None = None, *, dtype=None):
    """:class:`CharTransformer` holding ``params`` (default :func:`init_params` with seed 0)."""
    import torch

    net = _torch_classes()(cfg.vocab, context=cfg.context, width=cfg.width, heads=cfg.heads, depth=cfg.depth,
                           hidden=cfg.hidden)
    params = init_params(cfg) if params is None else params
    net = net.to(dtype or torch.float32)
    with torch.no_grad():  # copied after the conversion, so float64 weights are not rounded through float32
        for name, p in net.named_parameters():
            p.copy_(torch.as_tensor(params[name]))
    return net.eval()


@functools.lru_cache(maxsize=1)
def _torch_classes():
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, width, heads, hidden):
            super().__init__()
            self.heads = heads
            self.norm1, self.qkv, self.proj = nn.LayerNorm(width), nn.Linear(width, 3 * width), nn.Linear(width, width)
            self.norm2, self.up, self.down = nn.LayerNorm(width), nn.Linear(width, hidden), nn.Linear(hidden, width)

        def forward(self, a):
            n, T, d = a.shape
            q, k, v = (t.reshape(n, T, self.heads, d // self.heads).transpose(1, 2)
                       for t in self.qkv(self.norm1(a)).split(d, dim=-1))
            scores = q @ k.transpose(-2, -1) / math.sqrt(d // self.heads)
            causal = torch.ones(T, T, dtype=torch.bool, device=a.device).tril()
            mixed = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
            a = a + self.proj(mixed.transpose(1, 2).reshape(n, T, d))
            return a + self.down(nn.functional.gelu(self.up(self.norm2(a))))

    class CharTransformer(nn.Module):
        """Embeddings, ``depth`` pre-norm blocks (causal attention, GELU MLP, residuals), LayerNorm, linear head."""

        def __init__(self, vocab, *, context=16, width=32, heads=2, depth=1, hidden=64):
            super().__init__()
            if width % heads:
                raise ValueError(f"heads: {heads} heads do not divide the width {width}")
            self.embed = nn.Embedding(vocab, width)
            self.position = nn.Parameter(torch.zeros(context, width))
            self.blocks = nn.ModuleList([Block(width, heads, hidden) for _ in range(depth)])
            self.norm, self.head = nn.LayerNorm(width), nn.Linear(width, vocab)

        def forward(self, x):
            a = self.embed(x) + self.position[:x.shape[1]]
            for block in self.blocks:
                a = block(a)
            return self.head(self.norm(a))

    return CharTransformer


def __getattr__(name):  # CharTransformer is built on first use, so importing this module does not import torch
    if name == "CharTransformer":
        return _torch_classes()
    raise AttributeError(name)


def _layer_norm(jnp, a, weight, bias, eps=1e-5):
    centred = a - a.mean(-1, keepdims=True)
    return centred / jnp.sqrt((centred * centred).mean(-1, keepdims=True) + eps) * weight + bias


@dataclasses.dataclass(frozen=True)
class JaxCharTransformer:
    """The same function in JAX: ``model(params, x)`` with ``params`` a dict keyed by the torch parameter names
    (Linear weights (out, in), as torch stores them).  Frozen, hence hashable: compiled code takes it as static."""

    heads: int
    depth: int

    def __call__(self, params, x):
        import jax
        import jax.numpy as jnp

        if x.ndim != 2:
            raise ValueError(f"x: expected token ids of shape (n, T), got {x.shape}")

        def linear(name, a):
            return a @ params[f"{name}.weight"].T + params[f"{name}.bias"]

        T = x.shape[1]
        a = params["embed.weight"][x] + params["position"][:T]
        for i in range(self.depth):
            p = f"blocks.{i}."
            n, _, d = a.shape
            qkv = linear(p + "qkv", _layer_norm(jnp, a, params[p + "norm1.weight"], params[p + "norm1.bias"]))
            q, k, v = (t.reshape(n, T, self.heads, d // self.heads).transpose(0, 2, 1, 3)
                       for t in jnp.split(qkv, 3, axis=-1))
            scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // self.heads)
            causal = jnp.tril(jnp.ones((T, T), dtype=bool))
            mixed = jax.nn.softmax(jnp.where(causal, scores, -jnp.inf), axis=-1) @ v
            a = a + linear(p + "proj", mixed.transpose(0, 2, 1, 3).reshape(n, T, d))
            up = linear(p + "up", _layer_norm(jnp, a, params[p + "norm2.weight"], params[p + "norm2.bias"]))
            a = a + linear(p + "down", jax.nn.gelu(up, approximate=False))
        return linear("head", _layer_norm(jnp, a, params["norm.weight"], params["norm.bias"]))


def group_kind(name: str) -> str:
    """The kind of a parameter group, for the report: embeddings, attention, MLP, norms or head."""
    if name.startswith("embed") or name == "position":
        return "embeddings"
    if ".qkv." in name or ".proj." in name:
        return "attention"
    if ".up." in name or ".down." in name:
        return "MLP"
    if "norm" in name:
        return "norms"
    return "head"
