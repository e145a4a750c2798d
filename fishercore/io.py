"""Files: an analysis saved as ``.npz`` and read back bit for bit.

The file holds the sums (:class:`~fishercore.sums.FisherSums`), ``n_inputs``, the
parameter groups and the family, as NumPy arrays and a JSON metadata entry; it is
read with ``allow_pickle=False``, so a file never runs code.  Arrays are moved to the
host by their library's :class:`~fishercore.backends.ops.Ops` (``to_host``).
"""

from __future__ import annotations

from array_api_compat import array_namespace, device

from fishercore.backends.ops import ops_for

from ._protocol import ParamGroup
from .families import get_family
from .result import FisherAnalysis
from .sums import FisherSums

__all__ = ["load_analysis", "read", "write"]

FORMAT = "fishercore.FisherAnalysis/1"


def write(analysis: FisherAnalysis, path, **extra) -> None:
    """The .npz of :meth:`FisherAnalysis.save`, with ``extra`` entries in its metadata."""
    import json

    import numpy as np

    arrays = {f"sums_{k}": ops_for(v).to_host(v) for k, v in zip(FisherSums._fields, analysis.sums)}
    meta = {"format": FORMAT, "n_inputs": int(analysis.n_inputs),
            "groups": [[g.name, list(g.shape), g.offset] for g in analysis.groups],
            "family": analysis.family.name, "variance": getattr(analysis.family, "variance", None), **extra}
    try:
        with open(path, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
    except OSError as e:
        raise ValueError(f"path: cannot write {path} ({e.strerror or e})") from e


def read(path) -> tuple[dict, dict]:
    """The metadata and sums of a :meth:`FisherAnalysis.save` file (ValueError naming ``path`` otherwise)."""
    import json

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as f:
            meta = json.loads(str(f["meta"]))
            sums = {k: f[f"sums_{k}"] for k in FisherSums._fields}
    except (OSError, KeyError, ValueError) as e:
        raise ValueError(f"path: {path} is not a saved FisherAnalysis ({e})") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path} has an unknown format {meta.get('format')!r}")
    return meta, sums


def load_analysis(path, model=None, *, like=None) -> FisherAnalysis:
    """Read a :meth:`FisherAnalysis.save` file back, bit for bit.

    Parameters
    ----------
    path : str or path-like
        An ``.npz`` written by :meth:`FisherAnalysis.save`.
    model : Model, optional
        When given, the file's parameter groups must be the model's (name, shape and order),
        so that a partial analysis is only ever merged with analyses of the same model.
    like : array, optional
        Return arrays in this array's library and on its device (NumPy by default).
    """
    meta, sums = read(path)
    groups = tuple(ParamGroup(n, tuple(s), o) for n, s, o in meta["groups"])
    if model is not None and tuple(model.groups) != groups:
        mine = [(g.name, g.shape) for g in model.groups]
        theirs = [(g.name, g.shape) for g in groups]
        raise ValueError(f"path: {path} holds an analysis of other parameter groups {theirs} than the model's {mine}")
    family = get_family(meta["family"])
    if meta["variance"] is not None:
        family = type(family)(variance=meta["variance"])
    if like is not None:
        xp = array_namespace(like)
        sums = {k: xp.asarray(v, dtype=getattr(xp, str(v.dtype)), device=device(like)) for k, v in sums.items()}
    return FisherAnalysis(FisherSums(**sums), int(meta["n_inputs"]), groups, family)

