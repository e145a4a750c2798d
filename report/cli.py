"""The ``fishercore`` command: ``fishercore report [options]``."""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

from fishercore.backends.rules.activations import ACTIVATIONS

from . import ReportError


def _integer_at_least(low, what):
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {v}")
        return v
    return parse


_positive_int = _integer_at_least(1, "a positive integer")
_seed = _integer_at_least(0, "a non-negative integer")


def _widths(text):
    try:
        widths = tuple(int(w) for w in text.split(",") if w.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer widths such as 128,128,128, got {text!r}") \
            from None
    if not widths or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected positive layer widths, got {text!r}")
    return widths


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fishercore", description="How good are your diagonal Fisher estimates?")
    from fishercore import __version__

    parser.add_argument("--version", action="version", version=f"fishercore {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    rep = sub.add_parser("report", help="reproduce the numerical study of Soen & Sun (NeurIPS 2024) on built-in data",
                         description="Train an MLP and, after every epoch, compute on held-out inputs the exact "
                                     "diagonal Fisher, the variances of Î1 and Î2, their bounds and sample sizes; "
                                     "write results.json/.csv, figures, report.md and a standalone report.html.")
    rep.add_argument("--study", choices=("fisher", "natural-gradient"), default="fisher",
                     help="the per-epoch Fisher study (default) or the natural-gradient toy of Figure 1 (which "
                          "takes only --seed, --out and --quiet)")
    rep.add_argument("--model", choices=("mlp", "cnn", "transformer"), default="mlp",
                     help="mlp: the paper's MLP study (default); cnn: a small convolutional network on the 8×8 "
                          "digits (needs torch; --activation picks its activation, default tanh; --task, --data, "
                          "--hidden and --backend do not apply); transformer: a character-level transformer trained "
                          "on Python's own source (needs torch; --task, --data, --hidden, --activation and "
                          "--backend do not apply)")
    rep.add_argument("--task", choices=("classification", "regression"), default="classification",
                     help="classification: digits, categorical likelihood (default); regression: diabetes, Gaussian")
    rep.add_argument("--data", metavar="PATH",
                     help="your own data: .npz with arrays X, y, or .csv with a label column (default: the built-in "
                          "data of --task)")
    rep.add_argument("--label-column", default="label", metavar="NAME",
                     help="label column of a --data .csv (default label)")
    rep.add_argument("--activation", choices=ACTIVATIONS, default="sigmoid",
                     help="hidden-layer activation of the MLP (default sigmoid); with --model cnn one of tanh, "
                          "sigmoid, gelu, silu, softplus, relu (default tanh)")
    rep.add_argument("--hidden", type=_widths, default=(128, 128, 128), metavar="W,W,...",
                     help="hidden layer widths (default 128,128,128)")
    rep.add_argument("--epochs", type=_positive_int, default=None,
                     help="training epochs (default 20; 10 with --model cnn, 4 with --model transformer)")
    rep.add_argument("--backend", choices=("auto", "torch", "jax", "numpy"), default="auto",
                     help="arrays and autodiff the MLP study trains and analyses with (default auto: torch when "
                          "installed, else numpy)")
    rep.add_argument("--seed", type=_seed, default=0,
                     help="seed of the initial weights, minibatches and held-out split (default 0)")
    rep.add_argument("--out", default="fishercore-report", metavar="DIR",
                     help="output folder, created (default fishercore-report)")
    rep.add_argument("--quiet", action="store_true",
                     help="no progress and no summary (default: a progress bar on a terminal, one line per epoch "
                          "otherwise, and the findings at the end)")
    rep.add_argument("--render-only", metavar="DIR",
                     help="only draw the figures and pages again from DIR/results.json (e.g. of an interrupted run); "
                          "takes no other option but --quiet")
    return parser


def _render(results: dict, folder: pathlib.Path) -> list[str]:
    if results["study"] == "cnn":
        from .vision import render_cnn

        return render_cnn(results, folder)
    if results["study"] == "transformer":
        from .lm import render_transformer

        return render_transformer(results, folder)
    if results["study"] == "natural-gradient":
        from .ngd import render_ngd

        return render_ngd(results, folder)
    from .render import render_fisher

    return render_fisher(results, folder)


class _Stopped(Exception):
    """A run stopped early (interrupt or error) after its finished records were moved into ``--out``."""

    def __init__(self, cause: BaseException, out: pathlib.Path, saved: bool):
        super().__init__(str(cause))
        self.cause, self.out, self.saved = cause, out, saved


def run_report(args) -> int:
    from .results import check_writable, load_results, publish, staging_dir

    # a progress bar on a terminal; one line per epoch when piped or logged; nothing with --quiet
    progress = False if args.quiet else (True if sys.stderr.isatty() else "lines")
    t0 = time.perf_counter()
    if args.render_only is not None:  # figures and pages again, from a folder's results.json
        _refuse("--render-only", _changed(args, ("study", "model", "task", "data", "label_column", "activation",
                                                 "hidden", "epochs", "backend", "seed", "out")))
        out = check_writable(pathlib.Path(args.render_only))
        results = load_results(out)
        work = staging_dir(out)
        findings = _render(results, work)
        publish(work, out, results=False)
    else:
        out = check_writable(pathlib.Path(args.out))
        work = staging_dir(out)  # the run writes here; its files replace the report's in --out at the end
        try:
            results = _study(args, work, progress)
        except BaseException as e:
            saved = (work / "results.json").exists() and _has_records(work)
            if saved:  # finished records are never lost: into --out, without pages of another run
                publish(work, out)
            else:
                import shutil

                shutil.rmtree(work, ignore_errors=True)
            raise _Stopped(e, out, saved) from e
        try:
            findings = _render(results, work)
        except BaseException as e:
            publish(work, out)
            raise _Stopped(e, out, True) from e
        publish(work, out)
    if not args.quiet:
        print("\n".join(f"* {f.replace('`', '')}" for f in findings))
        print(f"wrote {out / 'report.html'} (and report.md, figures{'' if args.render_only else ', results'}) "
              f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _has_records(folder: pathlib.Path) -> bool:
    import json

    try:
        data = json.loads((folder / "results.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(data.get("epochs") or data.get("runs"))


def _changed(args, options) -> list[str]:
    """The options of ``options`` that were given other values than their defaults, as command-line flags."""
    defaults = build_parser().parse_args(["report"])
    return [f"--{k.replace('_', '-')}" for k in options if getattr(args, k) != getattr(defaults, k)]


def _refuse(what: str, flags: list[str]) -> None:
    if flags:
        verb = "does" if len(flags) == 1 else "do"
        raise ReportError(f"{what}: {', '.join(flags)} {verb} not apply")


def _study(args, out: pathlib.Path, progress) -> dict:
    if args.data is None and args.label_column != "label":
        raise ReportError("--label-column: names a column of a --data .csv; give --data too")
    if args.study == "natural-gradient":
        _refuse("--study natural-gradient", _changed(args, ("model", "task", "data", "label_column", "activation",
                                                            "hidden", "epochs", "backend")))
    if args.model == "transformer":
        from .lm import TransformerStudy, run_transformer_study

        _refuse("--model transformer", _changed(args, ("task", "data", "label_column", "hidden", "activation",
                                                       "backend")))
        epochs = TransformerStudy().epochs if args.epochs is None else args.epochs
        return run_transformer_study(TransformerStudy(epochs=epochs, seed=args.seed), out, progress=progress)
    if args.model == "cnn":
        from .cnn import ACTIVATIONS as CNN_ACTIVATIONS
        from .vision import CNNStudy, run_cnn_study

        _refuse("--model cnn", _changed(args, ("task", "data", "label_column", "hidden", "backend")))
        default = CNNStudy()
        activation = default.activation if args.activation == build_parser().parse_args(["report"]).activation \
            else args.activation
        if activation not in CNN_ACTIVATIONS:
            raise ReportError(f"--activation: the cnn study takes one of {', '.join(CNN_ACTIVATIONS)}, "
                              f"got {activation!r}")
        return run_cnn_study(CNNStudy(epochs=default.epochs if args.epochs is None else args.epochs, seed=args.seed,
                                      activation=activation), out, progress=progress)
    if args.study == "natural-gradient":
        from .ngd import NGDStudy, run_ngd_study  # the options it does not take were refused above

        return run_ngd_study(NGDStudy(seed=args.seed), out, progress=progress)
    from . import data as D
    from .study import FisherStudy, run_fisher_study
    from .train import resolve_backend

    backend = resolve_backend(args.backend)
    D.load(args.task, args.data, label_column=args.label_column, seed=args.seed)  # fail before training
    cfg = FisherStudy(task=args.task, data=args.data, label_column=args.label_column, activation=args.activation,
                      hidden=tuple(args.hidden), epochs=20 if args.epochs is None else args.epochs, backend=backend,
                      seed=args.seed)
    return run_fisher_study(cfg, out, progress=progress)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:  # a bare `fishercore`: what it can do
        parser.print_help()
        return 0
    try:
        try:
            return run_report(args)
        except _Stopped as stop:
            if stop.saved:
                print(f"fishercore: stopped; the finished records are in {stop.out}/results.json; "
                      f"`fishercore report --render-only {stop.out}` draws their figures and pages", file=sys.stderr)
            raise stop.cause from None
    except ReportError as e:
        print(f"fishercore: error: {e}", file=sys.stderr)
        return 2
    except (ValueError, TypeError, FloatingPointError) as e:  # the library's argument errors name the argument
        if os.environ.get("FISHERCORE_TRACEBACK"):
            raise
        print(f"fishercore: error: {type(e).__name__}: {e} (set FISHERCORE_TRACEBACK=1 for the traceback)",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("fishercore: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
