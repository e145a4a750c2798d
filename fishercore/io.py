"""Files: an analysis saved as ``.npz`` and read back bit for bit.

The file holds the sums (:class:`~fishercore.sums.FisherSums`), ``n_inputs``, the
parameter groups and the family, as NumPy arrays and a JSON metadata entry; it is
read with ``allow_pickle=False``, so a file never runs code.  Arrays are moved to the
host by their library's :class:`~fishercore.backends.ops.Ops` (``to_host``).

Writing is atomic: a uniquely named temporary file in the target's folder, then
``os.replace`` — an interrupted or concurrent save never leaves a broken file, and two
writers never collide (the last one wins).  Reading validates everything against the
format (every key, every shape against the groups, dtypes, finiteness, counts) and
reports any problem as a ``ValueError`` that names the file.
"""

from __future__ import annotations

import json
import os
import tempfile
import zipfile
import zlib

import numpy as np
from array_api_compat import array_namespace, device

from fishercore.backends.ops import ops_for

from ._protocol import ParamGroup
from .families import Positions, get_family
from .result import FisherAnalysis
from .stats import SECOND_ORDER
from .sums import FisherSums

__all__ = ["load_analysis", "read", "write"]

FORMAT = "fishercore.FisherAnalysis/1"

# Sums that are sums of non-negative quantities (c12, a covariance, may be negative).
_NON_NEGATIVE = tuple(f for f in FisherSums._fields if f != "c12")


def _path(path, what: str = "path") -> str:
    try:
        return os.fspath(path)
    except TypeError as e:
        raise TypeError(f"{what}: expected a file path, got {type(path).__name__}") from e


def write(analysis: FisherAnalysis, path, **extra) -> None:
    """The .npz of :meth:`FisherAnalysis.save`, with ``extra`` entries in its metadata, written atomically."""
    path = _path(path)
    arrays = {f"sums_{k}": ops_for(v).to_host(v) for k, v in zip(FisherSums._fields, analysis.sums)}
    base = getattr(analysis.family, "base", analysis.family)  # a Positions family: its base, and its length
    meta = {"format": FORMAT, "n_inputs": int(analysis.n_inputs),
            "groups": [[g.name, list(g.shape), g.offset] for g in analysis.groups],
            "family": analysis.family.name, "variance": getattr(base, "variance", None),
            "positions": getattr(analysis.family, "length", None), **extra}
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise ValueError(f"path: cannot write {path} ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "wb") as f:  # a file object: np.savez would append ".npz" to a bare name
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        if isinstance(e, OSError):
            raise ValueError(f"path: cannot write {path} ({e.strerror or e})") from e
        raise


def read(path) -> tuple[dict, dict]:
    """The metadata and sums of a :meth:`FisherAnalysis.save` file, validated (ValueError naming ``path`` otherwise).

    Returns ``meta`` (with ``groups`` as :class:`~fishercore.ParamGroup` and ``family`` as a Family) and
    the sums as NumPy arrays.
    """
    path = _path(path)
    try:
        fh = open(path, "rb")  # opened here, so that a damaged archive never leaves it open
    except FileNotFoundError as e:
        raise ValueError(f"path: {path} does not exist") from e
    except OSError as e:
        raise ValueError(f"path: cannot read {path} ({e.strerror or e})") from e
    missing = []
    with fh:
        head = fh.read(6)
        if not head:
            raise ValueError(f"path: {path} is empty, not a saved FisherAnalysis")
        if head[:4] != b"PK\x03\x04":
            kind = "a single .npy array" if head == b"\x93NUMPY" else "not an .npz archive"
            raise ValueError(f"path: {path} is {kind}, not a saved FisherAnalysis")
        fh.seek(0)
        try:
            with np.load(fh, allow_pickle=False) as f:
                missing = [k for k in ["meta"] + [f"sums_{k}" for k in FisherSums._fields] if k not in f.files]
                if not missing:
                    meta = json.loads(str(f["meta"]))
                    sums = {k: f[f"sums_{k}"] for k in FisherSums._fields}
        except (OSError, EOFError, ValueError, KeyError, TypeError, zipfile.BadZipFile, zlib.error) as e:
            raise ValueError(f"path: {path} is truncated or damaged, not a readable saved FisherAnalysis ({e})") \
                from e
    if missing:
        raise ValueError(f"path: {path} is not a saved FisherAnalysis (it has no {', '.join(missing)})")
    return _validated(path, meta, sums)


def _validated(path, meta, sums):
    def bad(what):
        return ValueError(f"path: {path} is corrupt: {what}")

    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise ValueError(f"path: {path} has an unknown format {got!r}")
    for key in ("n_inputs", "groups", "family", "variance"):
        if key not in meta:
            raise bad(f"the metadata has no {key!r}")
    n = meta["n_inputs"]
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise bad(f"n_inputs must be a positive integer, got {n!r}")
    try:
        groups = tuple(ParamGroup(str(name), tuple(int(s) for s in shape), int(offset))
                       for name, shape, offset in meta["groups"])
    except (TypeError, ValueError) as e:
        raise bad(f"groups must be [name, shape, offset] triples ({e})") from e
    offset = 0
    for g in groups:
        if g.offset != offset or any(s < 0 for s in g.shape):
            raise bad(f"group {g.name!r} has shape {g.shape} at offset {g.offset}, expected offset {offset}")
        offset += g.size
    try:
        family = get_family(meta["family"])
        if meta["variance"] is not None:
            family = type(family)(variance=meta["variance"])
        if meta.get("positions") is not None:  # absent in files of earlier versions: no positions
            family = Positions(family, meta["positions"])
    except (TypeError, ValueError) as e:
        raise bad(f"family {meta['family']!r} ({e})") from e
    dtypes = set()
    for k, v in sums.items():
        if v.dtype not in (np.float32, np.float64):
            raise bad(f"sums_{k} has dtype {v.dtype}, expected float32 or float64")
        if v.shape != (offset,):
            raise bad(f"sums_{k} has shape {v.shape}, expected ({offset},) for the groups' {offset} parameters")
        if not np.all(np.isfinite(v)) and not (k in SECOND_ORDER and _whole_groups_nan(v, sums, groups)):
            raise bad(f"sums_{k} contains NaN or inf")
        if k in _NON_NEGATIVE and np.any(v < 0):
            raise bad(f"sums_{k} has negative entries (a sum of non-negative quantities)")
        dtypes.add(v.dtype)
    if len(dtypes) != 1:
        raise bad(f"the sums mix dtypes {sorted(map(str, dtypes))}")
    return {**meta, "groups": groups, "family": family}, sums


def _whole_groups_nan(v, sums, groups) -> bool:
    """Whether v's non-finite entries are whole groups that are NaN in every second-order sum ("not computed")
    and finite elsewhere."""
    for g in groups:
        part = v[g.offset:g.offset + g.size]
        if np.all(np.isfinite(part)):
            continue
        if not all(np.all(np.isnan(sums[f][g.offset:g.offset + g.size])) for f in SECOND_ORDER if f in sums):
            return False
    return True


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

    Raises
    ------
    ValueError
        Naming the file, when it is missing, truncated, not an analysis, or holds contents
        that do not fit the format (counts, shapes, dtypes, NaN), or another model's groups.
    """
    meta, sums = read(path)
    groups = meta["groups"]
    if model is not None and tuple(model.groups) != groups:
        mine = [(g.name, g.shape) for g in model.groups]
        theirs = [(g.name, g.shape) for g in groups]
        raise ValueError(f"path: {path} holds an analysis of other parameter groups {theirs} than the model's {mine}")
    if like is not None:
        xp = array_namespace(like)
        sums = {k: xp.asarray(v, dtype=getattr(xp, str(v.dtype)), device=device(like)) for k, v in sums.items()}
    return FisherAnalysis(FisherSums(**sums), meta["n_inputs"], groups, meta["family"])
