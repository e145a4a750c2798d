"""Saved analyses and checkpoints under damage, bad contents, interruption, concurrency and other batches.

Every problem is a ValueError whose message starts with the argument (``path:``, ``checkpoint:``,
``batches:``) and names the file or batch; a save that fails or races leaves the previous file whole.
"""

import json
import threading

import numpy as np
import pytest

import fishercore as fc
from helpers import Problem, assert_analysis_close, assert_raises_named, make_problem


@pytest.fixture
def saved(tmp_path):
    model, X = make_problem(Problem("1h", "tanh", "categorical", n=12))
    res = fc.analyze(model, X)
    path = tmp_path / "a.npz"
    res.save(path)
    return model, X, res, path


def _checkpoint_of(model, X, path):
    fc.analyze_batches(model, [X[:6], X[6:]], checkpoint=path)


DAMAGE = {
    "truncated": lambda b: b[: len(b) // 2],
    "empty": lambda b: b"",
    "flipped byte in the data": lambda b: b[:400] + bytes([b[400] ^ 0xFF]) + b[401:],
    "flipped byte in the directory": lambda b: b[:-30] + bytes([b[-30] ^ 0xFF]) + b[-29:],
    "text": lambda b: b"fisher,v1\n1,2\n",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_files_are_named_errors(saved, damage, tmp_path):
    model, X, _, path = saved
    path.write_bytes(DAMAGE[damage](path.read_bytes()))
    with pytest.raises(ValueError, match="^path: .*a.npz") as info:
        fc.load_analysis(path, model)
    assert "pickle" not in str(info.value)
    assert_raises_named(lambda: fc.analyze_batches(model, [X], checkpoint=path), ValueError, "checkpoint: ")


def test_other_files_are_named_errors(tmp_path):
    np.save(tmp_path / "x.npy", np.zeros(3))
    assert_raises_named(lambda: fc.load_analysis(tmp_path / "x.npy"), ValueError, f"path: {tmp_path / 'x.npy'} is a "
                        "single .npy array")
    assert_raises_named(lambda: fc.load_analysis(tmp_path / "nothing.npz"), ValueError, "path: ")
    assert_raises_named(lambda: fc.load_analysis(tmp_path), ValueError, "path: cannot read")
    assert_raises_named(lambda: fc.load_analysis(None), TypeError, "path: expected a file path")
    model, X = make_problem(Problem("1h", "tanh", "categorical", n=4))
    assert_raises_named(lambda: fc.analyze(model, X).save(None), TypeError, "path: expected a file path")
    assert_raises_named(lambda: fc.analyze_batches(model, [X], checkpoint=123), TypeError, "checkpoint: expected")


def _rewrite(path, meta=None, drop=(), **arrays):
    with np.load(path) as f:
        entries = {k: f[k] for k in f.files if k not in drop}
    m = json.loads(str(entries["meta"]))
    m.update(meta or {})
    for k in drop:
        m.pop(k, None)
    entries["meta"] = np.array(json.dumps(m))
    entries.update(arrays)
    with open(path, "wb") as f:
        np.savez(f, **entries)


CONTENTS = {
    "n_inputs -5": (dict(meta={"n_inputs": -5}), "n_inputs must be a positive integer"),
    "n_inputs 0": (dict(meta={"n_inputs": 0}), "n_inputs must be a positive integer"),
    "n_inputs 2.5": (dict(meta={"n_inputs": 2.5}), "n_inputs must be a positive integer"),
    "sums one short": (dict(sums_fisher=np.ones(51)), "sums_fisher has shape (51,), expected (52,)"),
    "string sums": (dict(sums_v1=np.array(["a"] * 52)), "sums_v1 has dtype"),
    "NaN sums": (dict(sums_v2=np.full(52, np.nan)), "sums_v2 contains NaN"),
    "float16 sums": (dict(sums_fisher=np.ones(52, np.float16)), "sums_fisher has dtype float16"),
    "negative variance sums": (dict(sums_v1=-np.ones(52)), "sums_v1 has negative entries"),
    "mixed dtypes": (dict(sums_c12=np.ones(52, np.float32)), "the sums mix dtypes"),
    "missing sums": (dict(drop=("sums_v1",)), "has no sums_v1"),
    "missing metadata": (dict(drop=("family",)), "the metadata has no 'family'"),
    "unknown family": (dict(meta={"family": "poisson"}), "family 'poisson'"),
    "bad variance": (dict(meta={"family": "gaussian", "variance": -1.0}), "family 'gaussian'"),
    "groups overlap": (dict(meta={"groups": [["0.weight", [6, 3], 0], ["0.bias", [6], 3]]}), "expected offset 18"),
    "groups not triples": (dict(meta={"groups": [["0.weight", 6]]}), "groups must be"),
    "other format": (dict(meta={"format": "something/2"}), "has an unknown format"),
}


@pytest.mark.parametrize("case", list(CONTENTS))
def test_corrupt_contents_are_named_errors(saved, case):
    _, _, res, path = saved
    assert sum(g.size for g in res.groups) == 52
    kwargs, message = CONTENTS[case]
    _rewrite(path, **kwargs)
    with pytest.raises(ValueError, match="^path: ") as info:
        fc.load_analysis(path)
    assert message in str(info.value), str(info.value)


def test_an_interrupted_save_leaves_the_previous_file(saved, monkeypatch):
    model, X, res, path = saved
    before = path.read_bytes()

    def dies(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", dies)
    with pytest.raises(KeyboardInterrupt):
        fc.analyze(model, X[:3]).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.npz"]  # no temporary file left behind
    assert_analysis_close(fc.load_analysis(path, model), res)


def test_concurrent_saves_to_one_path_never_collide(saved):
    """The old fixed '….npz.tmp' name made one of two writers crash; unique names: the last writer wins."""
    model, X, _, path = saved
    parts = [fc.analyze(model, X[:k]) for k in (3, 5, 7, 9)]
    errors = []

    def work(res):
        try:
            for _ in range(15):
                res.save(path)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(r,)) for r in parts]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert fc.load_analysis(path, model).n_inputs in (3, 5, 7, 9)
    assert sorted(p.name for p in path.parent.iterdir()) == ["a.npz"]


class Stop(Exception):
    pass


def _batches(X, size, stop_at=None, order=None):
    X = X if order is None else X[order]
    for i, start in enumerate(range(0, X.shape[0], size)):
        if i == stop_at:
            raise Stop
        yield X[start:start + size]


@pytest.mark.parametrize("resume,message", [
    (dict(size=5), "batches: batch 0 (5 inputs) is not the batch the checkpoint"),
    (dict(size=20), "batches: batch 0 (20 inputs) is not the batch the checkpoint"),
    (dict(size=10, order=np.random.default_rng(0).permutation(100)), "batches: batch 0 (10 inputs) is not the batch"),
], ids=["smaller batches", "larger batches", "shuffled"])
def test_resuming_with_other_batches_is_refused(tmp_path, resume, message):
    """3 of 10 batches of 10 are checkpointed; other batches would double-count or skip inputs."""
    model, X = make_problem(Problem("1h", "tanh", "categorical", n=100))
    ckpt = tmp_path / "run.npz"
    with pytest.raises(Stop):
        fc.analyze_batches(model, _batches(X, 10, stop_at=3), checkpoint=ckpt)
    assert fc.load_analysis(ckpt).n_inputs == 30
    size, order = resume["size"], resume.get("order")
    assert_raises_named(lambda: fc.analyze_batches(model, _batches(X, size, order=order), checkpoint=ckpt),
                        ValueError, message)
    assert_raises_named(lambda: fc.analyze_batches(model, _batches(X[:20], 10), checkpoint=ckpt), ValueError,
                        "batches: the checkpoint records 3 finished batches but the iterable yields only 2")
    resumed = fc.analyze_batches(model, _batches(X, 10), checkpoint=ckpt)  # the same batches: accepted
    assert_analysis_close(resumed, fc.analyze(model, X), rtol=1e-12, atol=1e-14)
