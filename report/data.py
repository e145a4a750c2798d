"""Data sets for the report: scikit-learn's built-in digits and diabetes, or a user's .npz/.csv file."""

from __future__ import annotations

import csv
import pathlib
from typing import NamedTuple

import numpy as np

from . import ReportError


class Dataset(NamedTuple):
    name: str
    X_train: np.ndarray  # (n_train, d) float64
    y_train: np.ndarray  # (n_train,) int class indices, or (n_train, 1) float targets
    X_test: np.ndarray
    y_test: np.ndarray
    n_outputs: int  # classes (classification) or 1 (regression)


def _builtin(task):
    try:
        from sklearn import datasets
    except ImportError as e:  # pragma: no cover - the report extra installs it
        raise ReportError("the built-in data sets need scikit-learn: pip install '.[report]' in fishercore's "
                          "checkout") from e
    if task == "classification":
        X, y = datasets.load_digits(return_X_y=True)
        return "digits", X / 16.0, y
    X, y = datasets.load_diabetes(return_X_y=True)
    return "diabetes", X, y


def _read_file(path: pathlib.Path, label: str):
    if not path.is_file():
        raise ReportError(f"--data: no such file: {path}")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in ("X", "y") if k not in f]
                if missing:
                    raise ReportError(f"--data: {path.name} lacks the arrays {missing} (expected 'X' and 'y')")
                X, y = np.asarray(f["X"]), np.asarray(f["y"])
        except (OSError, ValueError) as e:
            raise ReportError(f"--data: cannot read {path.name} as .npz: {e}") from e
    elif suffix == ".csv":
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
        except (OSError, UnicodeDecodeError) as e:
            raise ReportError(f"--data: cannot read {path.name}: {e}") from e
        if len(rows) < 2:
            raise ReportError(f"--data: {path.name} needs a header row and at least one data row")
        header = [h.strip() for h in rows[0]]
        if label not in header:
            raise ReportError(f"--data: {path.name} has no column {label!r} (columns: {', '.join(header)}); "
                              "name the label column with --label-column")
        j = header.index(label)
        body = [r for r in rows[1:] if r]
        ragged = next((i for i, r in enumerate(body, start=2) if len(r) != len(header)), None)
        if ragged is not None:
            raise ReportError(f"--data: {path.name} row {ragged} has {len(body[ragged - 2])} values, the header "
                              f"{len(header)}")
        try:
            table = np.array([[float(v) for v in r] for r in body], dtype=float)
        except ValueError as e:
            raise ReportError(f"--data: {path.name} has a non-numeric value: {e}") from e
        X, y = np.delete(table, j, axis=1), table[:, j]
    else:
        raise ReportError(f"--data: expected a .npz (arrays X, y) or .csv file, got {path.name}")
    return path.stem, X, y


def load(task: str, data: str | None = None, *, label_column: str = "label", test_fraction: float = 0.2,
         seed: int = 0) -> Dataset:
    """Load, check, split (fixed seed) and standardise a data set for ``task``."""
    name, X, y = _builtin(task) if data is None else _read_file(pathlib.Path(data), label_column)
    if np.iscomplexobj(X) or np.iscomplexobj(y):
        raise ReportError("--data: X or y is complex; the study needs real values")
    if not (np.issubdtype(np.asarray(X).dtype, np.number) and np.issubdtype(np.asarray(y).dtype, np.number)):
        raise ReportError("--data: X and y must be numeric arrays")
    X = np.asarray(X, dtype=float)
    y = np.asarray(y)
    if X.ndim != 2 or X.shape[0] < 10:
        raise ReportError(f"--data: X must be a table of at least 10 rows, got shape {X.shape}")
    if y.shape != (X.shape[0],):
        raise ReportError(f"--data: y must have one value per row of X ({X.shape[0]}), got shape {y.shape}")
    if not (np.all(np.isfinite(X)) and np.all(np.isfinite(y.astype(float)))):
        raise ReportError("--data: X or y contains NaN or inf")
    if task == "classification":
        if not np.allclose(y, np.round(y)) or y.min() < 0:
            raise ReportError("--data: classification labels must be non-negative integers")
        if y.max() >= X.shape[0]:
            raise ReportError(f"--data: classification labels must be class indices 0..C-1 with C at most the "
                              f"number of rows ({X.shape[0]}); the largest label is {y.max():g}")
        y = np.round(y).astype(np.int64)
        n_outputs = int(y.max()) + 1
        if n_outputs < 2:
            raise ReportError("--data: classification needs at least two classes")
    else:
        y = y.astype(float)
        y = ((y - y.mean()) / (y.std() or 1.0))[:, None]
        n_outputs = 1
    perm = np.random.default_rng(seed).permutation(X.shape[0])
    n_test = max(1, int(round(test_fraction * X.shape[0])))
    test, train = perm[:n_test], perm[n_test:]
    mu, sd = X[train].mean(0), X[train].std(0)
    sd[sd == 0] = 1.0
    X = (X - mu) / sd
    return Dataset(name, X[train], y[train], X[test], y[test], n_outputs)
