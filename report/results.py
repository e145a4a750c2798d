"""Per-group summaries of an analysis, and results written to disk as they are produced."""

from __future__ import annotations

import csv
import json
import math
import os
import pathlib

import numpy as np

from . import ReportError

REL_ERROR, CONFIDENCE = 0.1, 0.95  # the sample sizes reported: 10 % relative error at 95 % confidence
SLACK = 1e-9  # relative rounding allowed when checking lower ≤ v ≤ upper in float64


def to_numpy(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu()
    return np.asarray(x, dtype=float)


def _clean(v):
    """JSON-safe number: inf and NaN become None."""
    if v is None:
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def group_records(res, names=None) -> dict:
    """{group: {statistic: value}} for one FisherAnalysis, means over each group's parameters.

    ``names`` relabels the groups (in order), so that every backend's report reads the same.
    """
    f = {k: to_numpy(getattr(res, k)) for k in ("fisher", "v1", "v2", "c12", "var_x", "v1_lower", "v1_upper",
                                                 "v2_lower", "v2_upper")}
    n = {e: to_numpy(res.sample_size(e, REL_ERROR, CONFIDENCE, n_draws=1)) for e in ("i1", "i2", "optimal")}
    out = {}
    names = [g.name for g in res.groups] if names is None else list(names)
    for name, g in zip(names, res.groups):
        sl = slice(g.offset, g.offset + g.size)
        m = {k: float(np.mean(v[sl])) for k, v in f.items()}
        v1, v2 = f["v1"][sl], f["v2"][sl]
        hold = bool(np.all(f["v1_lower"][sl] <= v1 * (1 + SLACK)) and np.all(v1 <= f["v1_upper"][sl] * (1 + SLACK))
                    and np.all(f["v2_lower"][sl] <= v2 * (1 + SLACK)) and np.all(v2 <= f["v2_upper"][sl] * (1 + SLACK)))
        rec = {"size": g.size, **m,
               "std_i1": math.sqrt(m["v1"]), "std_i2": math.sqrt(m["v2"]),
               "std_i1_lower": math.sqrt(m["v1_lower"]), "std_i1_upper": math.sqrt(m["v1_upper"]),
               "std_i2_lower": math.sqrt(m["v2_lower"]), "std_i2_upper": math.sqrt(m["v2_upper"]),
               "log_upper_over_v1": math.log(m["v1_upper"] / m["v1"]) if m["v1"] > 0 else None,
               "log_upper_over_v2": math.log(m["v2_upper"] / m["v2"]) if m["v2"] > 0 else None,
               "v2_max": float(np.max(v2)),
               "i2_better": float(np.mean(v2 < v1)), "i1_better": float(np.mean(v1 < v2)),
               "ties": float(np.mean(v1 == v2)),  # both 0 (dead units), or equal: neither is better
               "n_i1": float(np.median(n["i1"][sl])), "n_i2": float(np.median(n["i2"][sl])),
               "n_optimal": float(np.median(n["optimal"][sl])),
               "bounds_hold": hold}
        out[name] = {k: (_clean(v) if isinstance(v, float) else v) for k, v in rec.items()}
    return out


#: Every file a report writes: what :func:`publish` replaces in ``--out`` (nothing else there is touched).
RESULT_FILES = ("results.json", "results.csv")
PAGE_FILES = ("report.md", "report.html", "fisher_grid.png", "i2_better.png", "sample_size.png",
              "natural_gradient.png", "transformer_samples.png", "transformer_variances.png", "cnn_winner.png",
              "cnn_variances.png", "cnn_filters.png")


def staging_dir(out: pathlib.Path) -> pathlib.Path:
    """A fresh folder beside ``out`` (same file system, so files move into place by rename)."""
    import tempfile

    return pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))


def publish(work: pathlib.Path, out: pathlib.Path, *, results: bool = True) -> None:
    """Move a finished (or interrupted) run's files from ``work`` into ``out``, then remove ``work``.

    The report's files in ``out`` that ``work`` does not have are removed first, so ``out`` never
    mixes two runs (an old report.html beside new results); ``results=False`` (re-rendering)
    leaves the results files alone.  Other files in ``out`` are never touched.
    """
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    owned = (RESULT_FILES if results else ()) + PAGE_FILES
    for name in owned:
        if not (work / name).exists():
            (out / name).unlink(missing_ok=True)
    for name in owned:
        if (work / name).exists():
            os.replace(work / name, out / name)
    shutil.rmtree(work, ignore_errors=True)


def load_results(folder: pathlib.Path) -> dict:
    """The results.json of a report folder, checked enough to render it."""
    path = folder / "results.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"--render-only: {folder} has no results.json (not a report folder?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ReportError(f"--render-only: cannot read {path}: {e}") from None
    study = data.get("study") if isinstance(data, dict) else None
    key = {"fisher": "epochs", "natural-gradient": "runs", "transformer": "epochs", "cnn": "epochs"}.get(study)
    if key is None or not isinstance(data.get(key), list) or "config" not in data:
        raise ReportError(f"--render-only: {path} is not a fishercore report's results "
                          f"(no study, config and {key or 'records'})")
    if not data[key]:
        raise ReportError(f"--render-only: {path} holds no finished {key} yet; nothing to render")
    return data


def check_writable(out: pathlib.Path) -> pathlib.Path:
    """Create ``out`` and prove it writable, before any work starts."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fishercore-write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise ReportError(f"--out: cannot write to {out}: {e.strerror or e}") from e
    return out


class ResultsWriter:
    """results.json (rewritten atomically after every record) and results.csv (one row per record and group)."""

    def __init__(self, out: pathlib.Path, header: dict, csv_fields: list[str], key: str = "epochs"):
        self.out, self.key = out, key
        self.data = dict(header, **{key: []})
        self.csv_fields = csv_fields
        with (out / "results.csv").open("w", newline="", encoding="utf-8") as fh:
            csv.DictWriter(fh, fieldnames=csv_fields).writeheader()
        self._write_json()

    def _write_json(self):
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(self.data, indent=1, allow_nan=False), encoding="utf-8")
        os.replace(tmp, self.out / "results.json")

    def add(self, record: dict, rows: list[dict]):
        self.data[self.key].append(record)
        self._write_json()
        with (self.out / "results.csv").open("a", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=self.csv_fields, extrasaction="ignore")
            for row in rows:
                writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in self.csv_fields})

    def finish(self, **extra):
        self.data.update(extra)
        self._write_json()


def log_epoch(progress, epoch: int, epochs: int, record: dict) -> None:
    """With ``progress="lines"`` (output that is not a terminal, and not --quiet): one line per epoch on stderr,
    so a piped or logged run is never silent for long."""
    if progress != "lines":
        return
    import sys

    parts = [f"fishercore report: epoch {epoch}/{epochs}"]
    if record.get("test_loss") is not None:
        parts.append(f"test loss {record['test_loss']:.4f}")
    if record.get("test_accuracy") is not None:
        parts.append(f"test accuracy {record['test_accuracy']:.3f}")
    if record.get("seconds") is not None:
        parts.append(f"{record['seconds']:.1f} s")
    print(", ".join(parts), file=sys.stderr, flush=True)


def largest_by_kind(groups: dict, key: str) -> dict:
    """kind → the largest per-group value of ``key`` among the groups of that kind (the group that needs the most),
    for per-group records with a "kind"; groups without a value are left out."""
    out = {}
    for rec in groups.values():
        v = rec.get(key)
        if v is not None:
            out[rec["kind"]] = max(out.get(rec["kind"], 0.0), v)
    return out
