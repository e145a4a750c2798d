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
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    rep = sub.add_parser("report", help="reproduce the numerical study of Soen & Sun (NeurIPS 2024) on built-in data",
                         description="Train an MLP and, after every epoch, compute on held-out inputs the exact "
                                     "diagonal Fisher, the variances of Î1 and Î2, their bounds and sample sizes; "
                                     "write results.json/.csv, figures, report.md and a standalone report.html.")
    rep.add_argument("--study", choices=("fisher", "natural-gradient"), default="fisher",
                     help="the per-epoch Fisher study (default) or the natural-gradient toy of Figure 1")
    rep.add_argument("--task", choices=("classification", "regression"), default="classification",
                     help="classification: digits, categorical likelihood (default); regression: diabetes, Gaussian")
    rep.add_argument("--data", metavar="PATH", help="your own data: .npz with arrays X, y, or .csv with a label column")
    rep.add_argument("--label-column", default="label", metavar="NAME", help="label column of a --data .csv")
    rep.add_argument("--activation", choices=ACTIVATIONS, default="sigmoid")
    rep.add_argument("--hidden", type=_widths, default=(128, 128, 128), metavar="W,W,...",
                     help="hidden layer widths (default 128,128,128)")
    rep.add_argument("--epochs", type=_positive_int, default=20)
    rep.add_argument("--backend", choices=("auto", "torch", "jax", "numpy"), default="auto",
                     help="auto: torch when installed, else numpy")
    rep.add_argument("--seed", type=_seed, default=0)
    rep.add_argument("--out", default="fishercore-report", metavar="DIR", help="output folder (created)")
    rep.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    return parser


def run_report(args) -> int:
    from .results import check_writable
    from .train import resolve_backend

    out = check_writable(pathlib.Path(args.out))
    progress = not args.quiet and sys.stderr.isatty()
    t0 = time.perf_counter()
    if args.study == "natural-gradient":
        from .ngd import NGDStudy, render_ngd, run_ngd_study

        results = run_ngd_study(NGDStudy(seed=args.seed), out, progress=progress)
        findings = render_ngd(results, out)
    else:
        from . import data as D
        from .render import render_fisher
        from .study import FisherStudy, run_fisher_study

        backend = resolve_backend(args.backend)
        D.load(args.task, args.data, label_column=args.label_column, seed=args.seed)  # fail before training
        cfg = FisherStudy(task=args.task, data=args.data, label_column=args.label_column, activation=args.activation,
                          hidden=tuple(args.hidden), epochs=args.epochs, backend=backend, seed=args.seed)
        results = run_fisher_study(cfg, out, progress=progress)
        findings = render_fisher(results, out)
    if not args.quiet:
        print("\n".join(f"* {f.replace('`', '')}" for f in findings))
        print(f"wrote {out / 'report.html'} (and report.md, results.json, results.csv, *.png) "
              f"in {time.perf_counter() - t0:.1f} s")
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run_report(args)
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
        print(f"fishercore: interrupted; finished epochs are in {args.out}/results.json", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
