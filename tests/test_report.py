"""`fishercore report` end to end on tiny configurations: files, numbers, errors, interruption."""

import json
import subprocess
import sys

import numpy as np
import pytest

import fishercore as fc
from helpers import BACKENDS

pytest.importorskip("matplotlib")  # the report extra; installed by every tox environment
from fishercore.report import cli  # noqa: E402

TINY = ["--epochs", "2", "--hidden", "6,5", "--quiet"]


def _run(tmp_path, *args):
    return cli.main(["report", "--out", str(tmp_path / "out"), *TINY, *args])


def _check_fisher_outputs(out, epochs=2):
    for name in ("report.html", "report.md", "results.json", "results.csv", "fisher_grid.png", "i2_better.png",
                 "sample_size.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "results.json").read_text())
    assert [e["epoch"] for e in res["epochs"]] == list(range(epochs + 1))
    groups = res["epochs"][-1]["groups"]
    last = [g for g in groups if g.startswith(sorted({g.split(".")[0] for g in groups}, key=int)[-1] + ".")]
    assert last and all(groups[g]["v2"] == 0 and groups[g]["v2_max"] == 0 for g in last)  # Î2 exact
    for e in res["epochs"]:
        for g, r in e["groups"].items():
            assert r["bounds_hold"], (e["epoch"], g)  # every parameter: lower ≤ v ≤ upper
            assert r["v1_lower"] <= r["v1"] * (1 + 1e-9) <= r["v1_upper"] * (1 + 1e-9) + 1e-300
            assert r["v2_lower"] <= r["v2"] * (1 + 1e-9) <= r["v2_upper"] * (1 + 1e-9) + 1e-300
            assert r["fisher"] > 0 and 0 <= r["i2_better"] <= 1
    rows = (out / "results.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + (epochs + 1) * len(groups)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3 and "src=\"fisher_grid.png\"" not in html  # standalone
    md = (out / "report.md").read_text()
    assert "Î2 is exact" in md and "bounds bracket the exact variances" in md
    return res


def test_default_classification_study_tiny(tmp_path):
    assert _run(tmp_path, "--backend", "numpy") == 0
    res = _check_fisher_outputs(tmp_path / "out")
    assert res["config"]["dataset"] == "digits" and res["config"]["widths"] == [64, 6, 5, 10]
    assert 0 <= res["epochs"][-1]["test_accuracy"] <= 1
    assert res["epochs"][-1]["train_loss"] < res["epochs"][0]["train_loss"]  # it trained


def test_regression_study_tiny(tmp_path):
    assert _run(tmp_path, "--backend", "numpy", "--task", "regression", "--activation", "tanh") == 0
    res = _check_fisher_outputs(tmp_path / "out")
    assert res["config"]["dataset"] == "diabetes" and res["config"]["family"] == "Gaussian(variance=1.0)"
    for r in res["epochs"][-1]["groups"].values():  # Gaussian: v1 = 2 I² per input, and the bounds are tight
        assert r["v1_lower"] == pytest.approx(r["v1"], rel=1e-9) == r["v1_upper"]
    md = (tmp_path / "out" / "report.md").read_text()
    assert "by factors 1 to 1" not in md and "upper bounds equal the true (group-mean) variances" in md


def test_findings_never_round_a_share_to_0_or_100():
    from fishercore.report.render import _percent

    assert [_percent(x) for x in (0.0, 0.003, 0.0004, 0.5, 0.996, 0.9999, 1.0)] == \
        ["0 %", "0.3 %", "0.04 %", "50 %", "99.6 %", "> 99.9 %", "100 %"]


@pytest.mark.parametrize("backend", [b for b in ("torch", "jax") if b in BACKENDS])
def test_study_on_framework_backends_matches_numpy(tmp_path, backend):
    """Same initial weights, minibatches and Adam: the framework's own training gives the same study."""
    assert cli.main(["report", "--out", str(tmp_path / "np"), *TINY, "--backend", "numpy"]) == 0
    assert cli.main(["report", "--out", str(tmp_path / backend), *TINY, "--backend", backend]) == 0
    a = json.loads((tmp_path / "np" / "results.json").read_text())["epochs"][-1]
    b = _check_fisher_outputs(tmp_path / backend)["epochs"][-1]
    assert b["test_loss"] == pytest.approx(a["test_loss"], rel=1e-8)
    for g, r in a["groups"].items():
        assert b["groups"][g]["fisher"] == pytest.approx(r["fisher"], rel=1e-6)


def test_natural_gradient_study(tmp_path):
    assert cli.main(["report", "--out", str(tmp_path / "out"), "--quiet", "--study", "natural-gradient"]) == 0
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    runs = {(r["problem"], r["method"]): r for r in res["runs"]}
    assert len(runs) == 6
    for problem in ("linear regression", "logistic regression"):
        # the models are linear in θ: Î2 equals the exact diagonal draw by draw, so the runs coincide
        np.testing.assert_allclose(runs[(problem, "i2")]["mean_test_nll"], runs[(problem, "exact")]["mean_test_nll"],
                                   rtol=1e-10)
        assert runs[(problem, "exact")]["mean_test_nll"][-1] < runs[(problem, "exact")]["mean_test_nll"][0]
    md = (out / "report.md").read_text()
    assert (out / "natural_gradient.png").stat().st_size > 0 and "final test NLL" in md
    assert "to within 0 " not in md and "coincides with the exact diagonal's run" in md


@pytest.mark.parametrize("args,message", [
    (["--data", "missing.npz"], "--data: no such file"),
    (["--data", "{bad_ext}"], "--data: expected a .npz"),
    (["--data", "{no_label}"], "--data: no_label.csv has no column 'label'"),
    (["--data", "{npz_wrong}"], "--data: npz_wrong.npz lacks the arrays ['y']"),
    (["--out", "{file_as_dir}/sub"], "--out: cannot write"),
    (["--data", "{huge_label}"], "--data: classification labels must be class indices 0..C-1 with C at most the "
                                 "number of rows (20); the largest label is 1e+08"),
    (["--data", "{ragged}"], "--data: ragged.csv row 3 has 2 values, the header 3"),
    (["--data", "{complex}"], "--data: X or y is complex"),
])
def test_bad_arguments_fail_before_training_with_one_line(tmp_path, capsys, args, message):
    (tmp_path / "data.txt").write_text("1,2\n")
    (tmp_path / "no_label.csv").write_text("a,b,y\n1,2,0\n")
    np.savez(tmp_path / "npz_wrong.npz", X=np.zeros((20, 3)))
    labels = np.arange(20) % 2
    labels[3] = 10**8  # one label of 1e8 asked for 1e8 + 1 outputs (a 2.98 GiB allocation)
    np.savez(tmp_path / "huge_label.npz", X=np.ones((20, 3)), y=labels)
    (tmp_path / "ragged.csv").write_text("a,b,label\n1,2,0\n1,2\n")
    np.savez(tmp_path / "complex.npz", X=np.ones((20, 3)) * 1j, y=labels % 2)
    (tmp_path / "file").write_text("not a folder")
    subs = {"bad_ext": tmp_path / "data.txt", "no_label": tmp_path / "no_label.csv",
            "npz_wrong": tmp_path / "npz_wrong.npz", "file_as_dir": tmp_path / "file",
            "huge_label": tmp_path / "huge_label.npz", "ragged": tmp_path / "ragged.csv",
            "complex": tmp_path / "complex.npz"}
    args = [a.format(**subs) for a in args]
    code = cli.main(["report", "--out", str(tmp_path / "out"), *TINY, "--backend", "numpy", *args]
                    if "--out" not in args else ["report", *TINY, "--backend", "numpy", *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "results.json").exists()  # nothing trained


def test_user_csv_and_npz_data(tmp_path):
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 4)), rng.integers(0, 3, 60)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    lines = ["f1,f2,f3,f4,cls"] + [",".join(map(str, [*x, c])) for x, c in zip(X, y)]
    (tmp_path / "d.csv").write_text("\n".join(lines))
    assert cli.main(["report", "--out", str(tmp_path / "a"), *TINY, "--backend", "numpy",
                     "--data", str(tmp_path / "d.npz")]) == 0
    assert cli.main(["report", "--out", str(tmp_path / "b"), *TINY, "--backend", "numpy",
                     "--data", str(tmp_path / "d.csv"), "--label-column", "cls"]) == 0
    a = json.loads((tmp_path / "a" / "results.json").read_text())
    b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert a["config"]["widths"] == [4, 6, 5, 3] == b["config"]["widths"]
    assert a["epochs"][-1]["test_loss"] == pytest.approx(b["epochs"][-1]["test_loss"], rel=1e-12)


def _report_files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_interrupted_run_keeps_finished_epochs_and_never_mixes_two_runs(tmp_path, monkeypatch, capsys):
    from fishercore.report import render, study

    out = tmp_path / "out"
    args = ["report", "--out", str(out), "--epochs", "5", "--hidden", "4", "--quiet", "--backend", "numpy"]
    assert cli.main(args[:3] + TINY + ["--backend", "numpy"]) == 0  # an earlier, complete report in --out
    (out / "notes.txt").write_text("mine")
    complete = _report_files(out)
    calls = {"n": 0}
    real = study.group_records

    def interrupt_after_two(res, names=None):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(res, names)

    monkeypatch.setattr(study, "group_records", interrupt_after_two)
    assert cli.main(args) == 130
    res = json.loads((out / "results.json").read_text())
    assert [e["epoch"] for e in res["epochs"]] == [0, 1]
    err = capsys.readouterr().err
    assert "interrupted" in err and f"--render-only {out}" in err
    # the earlier run's pages and figures are gone with its results; the user's file stays; no staging left
    assert _report_files(out) == ["notes.txt", "results.csv", "results.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    # the figures and pages of the finished epochs, from results.json
    assert cli.main(["report", "--render-only", str(out), "--quiet"]) == 0
    assert _report_files(out) == complete
    assert "Epoch 1, per parameter group" in (out / "report.md").read_text()

    # interrupted while rendering: results in place, no pages of the earlier run beside them
    monkeypatch.setattr(study, "group_records", real)
    monkeypatch.setattr(render, "fisher_figures", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    assert cli.main(args) == 130
    assert _report_files(out) == ["notes.txt", "results.csv", "results.json"]
    assert len(json.loads((out / "results.json").read_text())["epochs"]) == 6
    monkeypatch.undo()
    assert cli.main(["report", "--render-only", str(out), "--quiet"]) == 0 and _report_files(out) == complete


@pytest.mark.parametrize("content,message", [
    (None, "has no results.json"),
    ("{not json", "cannot read"),
    ('{"study": "fisher"}', "not a fishercore report"),
    ('{"study": "fisher", "config": {}, "epochs": []}', "no finished epochs"),
])
def test_render_only_refuses_what_is_not_a_report(tmp_path, capsys, content, message):
    folder = tmp_path / "r"
    folder.mkdir()
    if content is not None:
        (folder / "results.json").write_text(content)
    assert cli.main(["report", "--render-only", str(folder)]) == 2
    assert message in capsys.readouterr().err


def test_console_script_and_usage_errors(tmp_path):
    out = subprocess.run([sys.executable, "-m", "fishercore.report.cli", "report", "--epochs", "0"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "--epochs: expected a positive integer" in out.stderr
    assert out.stderr.count("\n") == 1
    out = subprocess.run([sys.executable, "-m", "fishercore.report.cli", "report", "--seed", "-1"],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 2 and "--seed: expected a non-negative integer, got -1" in out.stderr
    assert out.stderr.count("\n") == 1
    help_text = subprocess.run([sys.executable, "-m", "fishercore.report.cli", "report", "--help"],
                               capture_output=True, text=True, cwd=tmp_path, check=True).stdout
    for option in ("--activation", "--task", "--data", "--hidden", "--epochs", "--backend", "--seed", "--out",
                   "--quiet", "--study", "--model"):
        assert option in help_text
    bare = subprocess.run([sys.executable, "-m", "fishercore.report.cli"], capture_output=True, text=True,
                          cwd=tmp_path)
    assert bare.returncode == 0 and "report" in bare.stdout and bare.stdout.startswith("usage: fishercore")
    version = subprocess.run([sys.executable, "-m", "fishercore.report.cli", "--version"], capture_output=True,
                             text=True, cwd=tmp_path, check=True)
    assert version.stdout.strip() == f"fishercore {fc.__version__}"


@pytest.mark.parametrize("backend", ["torch", "jax"])
def test_missing_framework_is_a_one_line_error(tmp_path, capsys, monkeypatch, backend):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == backend else real(name, *a))
    assert cli.main(["report", "--out", str(tmp_path / "out"), *TINY, "--backend", backend]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--backend {backend}: {backend} is not installed" in err


def test_library_errors_become_one_line_and_a_non_zero_exit(tmp_path, monkeypatch, capsys):
    """An argument error raised inside the library mid-run: one line naming the argument, exit 1."""
    from fishercore.report import study

    def bad(*args, **kwargs):
        raise FloatingPointError("model: outputs are NaN or inf for inputs 0..9 (overflow in the network)")

    monkeypatch.setattr(study.fc, "analyze", bad)
    code = cli.main(["report", "--out", str(tmp_path / "out"), "--epochs", "1", "--hidden", "4", "--quiet",
                     "--backend", "numpy"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert err.startswith("fishercore: error: FloatingPointError: model: outputs are NaN")
    monkeypatch.setenv("FISHERCORE_TRACEBACK", "1")
    with pytest.raises(FloatingPointError):
        cli.main(["report", "--out", str(tmp_path / "out2"), "--epochs", "1", "--hidden", "4", "--quiet",
                  "--backend", "numpy"])


@pytest.mark.backends("torch")
def test_transformer_study_tiny(tmp_path):
    """--model transformer: first order every epoch, exact second order at the last, findings per kind of group."""
    if "torch" not in BACKENDS:
        pytest.skip("torch is not among this run's backends")
    from fishercore.report.cli import _render
    from fishercore.report.lm import TransformerStudy, run_transformer_study

    out = tmp_path / "lm"
    out.mkdir()
    res = run_transformer_study(TransformerStudy(epochs=1, n_train=128, n_analyze=3), out, progress=False)
    first, last = res["epochs"]
    assert not first["second_order"] and last["second_order"]
    kinds = {r["kind"] for r in last["groups"].values()}
    assert kinds == {"embeddings", "attention", "MLP", "norms", "head"}
    head = last["groups"]["head.weight"]
    assert head["v2"] == 0 and head["i2_better"] > 0.5 and first["groups"]["head.weight"]["v2"] is None
    findings = _render(json.loads((out / "results.json").read_text()), out)
    assert any("Sequences needed" in f for f in findings) and any("smaller variance" in f for f in findings)
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 2


@pytest.mark.backends("torch")
def test_cnn_study_tiny(tmp_path, capsys):
    """fishercore report --model cnn --epochs 1: every field at every epoch, findings per kind of layer that say
    which estimator wins, three figures in --out and in report.html, a dense head where Î2 is exact."""
    if "torch" not in BACKENDS:
        pytest.skip("torch is not among this run's backends")
    out = tmp_path / "cnn"
    assert cli.main(["report", "--model", "cnn", "--epochs", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "conv weights: Î" in printed and "dense weights: Î2 is exact" in printed
    res = json.loads((out / "results.json").read_text())
    first, last = res["epochs"]
    assert first["second_order"] and last["second_order"]
    assert {r["kind"] for r in last["groups"].values()} == {"conv weight", "conv bias", "dense weight", "dense bias"}
    head = last["groups"]["head.weight"]
    assert head["v2"] == 0 and head["v2_zero"] == 1.0 and head["i2_better"] > 0.5
    conv = last["groups"]["conv1.weight"]
    assert conv["v2"] > 0 and abs(conv["i1_better"] + conv["i2_better"] + conv["ties"] - 1) < 1e-12
    assert all(r["bounds_hold"] for e in res["epochs"] for r in e["groups"].values())
    for name in ("cnn_winner.png", "cnn_variances.png", "cnn_filters.png", "report.md"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3
    (out / "report.html").unlink()
    assert cli.main(["report", "--render-only", str(out), "--quiet"]) == 0  # and again from results.json
    assert (out / "report.html").read_text().count("data:image/png;base64,") == 3


@pytest.mark.parametrize("args,message", [
    (["--model", "transformer", "--hidden", "4"], "--model transformer: --hidden does not apply"),
    (["--model", "transformer", "--study", "natural-gradient"], "--study natural-gradient: --model does not apply"),
    (["--model", "cnn", "--hidden", "4"], "--model cnn: --hidden does not apply"),
    (["--model", "cnn", "--backend", "numpy"], "--model cnn: --backend does not apply"),
    (["--model", "cnn", "--activation", "leaky_relu"], "--activation: the cnn study takes one of"),
    (["--model", "cnn", "--study", "natural-gradient"], "--study natural-gradient: --model does not apply"),
    (["--study", "natural-gradient", "--task", "regression", "--epochs", "3"],
     "--study natural-gradient: --task, --epochs do not apply"),
    (["--label-column", "y"], "--label-column: names a column of a --data .csv; give --data too"),
    (["--seed", "-3"], "argument --seed: expected a non-negative integer, got -3"),
])
def test_options_a_study_does_not_take_are_refused(tmp_path, capsys, args, message):
    try:
        code = cli.main(["report", "--out", str(tmp_path / "out"), "--quiet", *args])
    except SystemExit as e:  # argparse's own errors (a bad value) exit with 2 after one line
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1


def test_render_only_takes_no_other_option(tmp_path, capsys):
    code = cli.main(["report", "--render-only", str(tmp_path), "--seed", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "--render-only: --seed does not apply" in err


def test_every_option_says_its_default():
    parser = cli.build_parser()
    report = next(a for a in parser._actions if a.dest == "command").choices["report"]
    for action in report._actions:
        if action.dest in ("help", "render_only"):
            continue
        assert action.help and "default" in action.help, action.dest


def test_one_line_per_epoch_when_not_a_terminal(tmp_path, capsys):
    """Output to a pipe or a log (pytest's capture is not a terminal): no progress bar, a line per epoch."""
    assert cli.main(["report", "--out", str(tmp_path / "out"), "--epochs", "2", "--hidden", "4",
                     "--backend", "numpy"]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("fishercore report: epoch")]
    assert [line.split(",")[0] for line in lines] == [f"fishercore report: epoch {e}/2" for e in range(3)]
    assert all("test loss" in line for line in lines) and "\r" not in err
