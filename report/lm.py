"""The transformer study: a character-level language model on Python's own source, analysed as it trains.

``fishercore report --model transformer`` trains :class:`~fishercore.report.transformer.CharTransformer`
(torch) on windows of standard-library source and, after every epoch, analyses held-out
windows: outputs (n, T, C), one categorical label per position (docs/math.md §12).  Every
epoch's analysis is first order (exact at any size); the last epoch's also has second order,
which the column rule computes exactly for this model (it has fewer curved parameters than
``max_params``).  The report says, per kind of parameter group (embeddings, attention, MLP,
norms, head), how many sequences with one Î1 draw each give 10 % relative error at 95 %
confidence, and at the end which estimator has the smaller variance.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import time
from typing import NamedTuple

import numpy as np

import fishercore as fc

from . import ReportError
from . import transformer as tr
from .render import _plt, write_pages
from .results import CONFIDENCE, REL_ERROR, ResultsWriter, largest_by_kind, log_epoch, to_numpy

KINDS = ("embeddings", "attention", "MLP", "norms", "head")
FIELDS = ["kind", "size", "fisher", "v1", "v2", "zero_fisher", "n_i1", "n_i1_p90", "n_i2", "i1_better", "i2_better"]


class TransformerStudy(NamedTuple):
    epochs: int = 4
    seed: int = 0
    n_train: int = 4096  # training windows per epoch
    n_analyze: int = 24  # held-out windows analysed
    batch_size: int = 32
    lr: float = 3e-3


def _first_order_records(res) -> dict:
    """Per group: mean F and v1, how many F are 0, and the median (and 90th percentile) over F > 0 of the sequences
    needed with one Î1 draw each."""
    F, v1 = to_numpy(res.fisher), to_numpy(res.v1)
    n1 = to_numpy(res.sample_size("i1", REL_ERROR, CONFIDENCE, n_draws=1))
    second = not res.first_order_only
    if second:
        v2 = to_numpy(res.v2)
        n2 = to_numpy(res.sample_size("i2", REL_ERROR, CONFIDENCE, n_draws=1))
    out = {}
    for g in res.groups:
        sl = slice(g.offset, g.offset + g.size)
        pos = F[sl] > 0
        rec = {"kind": tr.group_kind(g.name), "size": g.size, "fisher": float(F[sl].mean()), "v1": float(v1[sl].mean()),
               "zero_fisher": int(g.size - pos.sum()),
               "n_i1": float(np.median(n1[sl][pos])) if pos.any() else None,
               "n_i1_p90": float(np.percentile(n1[sl][pos], 90)) if pos.any() else None,
               "v2": None, "n_i2": None, "i1_better": None, "i2_better": None}
        if second:  # strict comparisons: ties (both 0, as for unused embedding rows) count for neither
            rec.update(v2=float(v2[sl].mean()), n_i2=float(np.median(n2[sl][pos])) if pos.any() else None,
                       i1_better=float(np.mean(v1[sl] < v2[sl])), i2_better=float(np.mean(v2[sl] < v1[sl])))
        out[g.name] = rec
    return out


def run_transformer_study(cfg: TransformerStudy, out: pathlib.Path, *, progress: bool = True) -> dict:
    try:
        import torch
    except ImportError:
        raise ReportError("--model transformer: needs torch (pip install '.[torch]' in fishercore's "
                          "checkout)") from None
    from fishercore.backends import torch as fc_torch

    torch.manual_seed(cfg.seed)
    model_cfg = tr.Config()
    ids = tr.encode(tr.stdlib_text())
    split = int(0.9 * len(ids))
    rng = np.random.default_rng(cfg.seed)
    net = tr.torch_model(model_cfg, tr.init_params(model_cfg, cfg.seed))
    X_test, Y_test = tr.windows(ids[split:], model_cfg.context, cfg.n_analyze, rng)
    Xa = torch.as_tensor(X_test)
    header = {"study": "transformer", "config": {**cfg._asdict(), "model": dataclasses.asdict(model_cfg),
        "alphabet": tr.ALPHABET, "text_chars": int(len(ids)),
        "sources": list(tr.SOURCES), "parameters": int(sum(p.numel() for p in net.parameters())),
        "rel_error": REL_ERROR, "confidence": CONFIDENCE}}
    writer = ResultsWriter(out, header, ["epoch", "group"] + FIELDS)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.0)
    from tqdm.auto import tqdm

    def loss_of(X, Y):
        with torch.no_grad():
            h = net(torch.as_tensor(X))
            return float(torch.nn.functional.cross_entropy(h.reshape(-1, h.shape[-1]), torch.as_tensor(Y).reshape(-1)))

    bar = tqdm(range(cfg.epochs + 1), desc="fishercore report", unit="epoch", disable=progress is not True)
    for epoch in bar:
        t0 = time.perf_counter()
        if epoch > 0:
            net.train()
            X, Y = tr.windows(ids[:split], model_cfg.context, cfg.n_train, rng)
            for start in range(0, cfg.n_train, cfg.batch_size):
                h = net(torch.as_tensor(X[start:start + cfg.batch_size]))
                loss = torch.nn.functional.cross_entropy(h.reshape(-1, h.shape[-1]),
                                                         torch.as_tensor(Y[start:start + cfg.batch_size]).reshape(-1))
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
        last = epoch == cfg.epochs
        model = fc_torch.from_module(net, input_shape=(model_cfg.context,), input_dtype=torch.long,
                                     max_params=20_000 if last else 1)
        res = fc.analyze(model, Xa)
        groups = _first_order_records(res)
        record = {"epoch": epoch, "test_loss": loss_of(X_test, Y_test), "second_order": not res.first_order_only,
                  "groups": groups, "seconds": time.perf_counter() - t0}
        writer.add(record, [{"epoch": epoch, "group": g, **r} for g, r in groups.items()])
        log_epoch(progress, epoch, cfg.epochs, record)
        bar.set_postfix(test_loss=f"{record['test_loss']:.3f}")
    bar.close()
    return writer.data


def transformer_findings(results: dict) -> list[str]:
    epochs = results["epochs"]
    first, last = epochs[0], epochs[-1]
    cfg = results["config"]
    out = [f"A {cfg['parameters']:,}-parameter character transformer, trained {len(epochs) - 1} epochs on Python's "
           f"own source: test loss {first['test_loss']:.2f} → {last['test_loss']:.2f} nats per character; "
           f"{cfg['n_analyze']} held-out windows of {cfg['model']['context']} characters analysed after every epoch."]
    need = largest_by_kind(last["groups"], "n_i1")
    parts = [f"{k} {need[k]:,.0f}" for k in KINDS if k in need]
    out.append(f"Sequences needed with one Î1 draw each for 10 % error at 95 % (median over each group's parameters "
               f"with F > 0, the largest group of each kind, epoch {last['epoch']}): " + "; ".join(parts) + ".")
    start = largest_by_kind(first["groups"], "n_i1")
    moved = [f"{k} ×{need[k] / start[k]:.2g}" for k in KINDS if k in need and start.get(k)]
    out.append("From initialisation to the end of training those needs changed by " + ", ".join(moved) + ".")
    if last.get("second_order"):
        wins = []
        for k in KINDS:
            recs = [r for r in last["groups"].values() if r["kind"] == k and r["i2_better"] is not None]
            if recs:
                size = sum(r["size"] for r in recs)
                i2 = sum(r["i2_better"] * r["size"] for r in recs) / size
                i1 = sum(r["i1_better"] * r["size"] for r in recs) / size
                wins.append(f"{k}: Î2 smaller for {100 * i2:.0f} %, Î1 for {100 * i1:.0f} %")
        out.append(f"Which estimator has the smaller variance, per parameter (epoch {last['epoch']}, exact second "
                   "order; ties, where both are 0, count for neither; Var Î2 = 0 means Î2 is exact): "
                   + "; ".join(wins) + ".")
        zero = sum(r["zero_fisher"] for r in last["groups"].values())
        out.append(f"{zero:,} parameters have F = 0 exactly (embedding rows of characters absent from the analysed "
                   "windows): every estimator is exact there, and they are left out of the medians.")
    return out


def _save_log_plot(plt, fig, ax, ylabel: str, path: pathlib.Path) -> pathlib.Path:
    """A log10 y-axis with its label and a legend; the figure written to ``path`` and closed."""
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def transformer_figures(results: dict, folder: pathlib.Path) -> dict:
    plt = _plt()
    epochs = results["epochs"]
    fig, ax = plt.subplots(figsize=(7, 4))
    for k in KINDS:
        ys = [largest_by_kind(e["groups"], "n_i1").get(k) for e in epochs]
        if any(y is not None for y in ys):
            ax.plot([e["epoch"] for e in epochs], [math.nan if y is None else y for y in ys], marker="o", label=k)
    ax.set_xlabel("epoch")
    samples = _save_log_plot(plt, fig, ax, "sequences for 10 % error (log10 axis)", folder / "transformer_samples.png")
    figures = {"Sequences needed with one Î1 draw each, per kind of group (the group of each kind that needs the "
               "most; median over its parameters with F > 0), after every epoch": samples}
    last = epochs[-1]
    if last.get("second_order"):
        names = [g for g, r in last["groups"].items() if r["v2"] is not None]
        fig, ax = plt.subplots(figsize=(9, 4))
        x = np.arange(len(names))
        v1 = [last["groups"][g]["v1"] for g in names]
        v2 = [last["groups"][g]["v2"] for g in names]
        ax.bar(x - 0.2, v1, 0.4, label="Var Î1 (mean per draw)")
        ax.bar(x + 0.2, [v if v > 0 else math.nan for v in v2], 0.4, label="Var Î2 (mean per draw)")
        ax.set_xticks(x, names, rotation=70, fontsize=7)
        var = _save_log_plot(plt, fig, ax, "variance (log10 axis)", folder / "transformer_variances.png")
        figures[f"Single-draw variances of Î1 and Î2 per group at epoch {last['epoch']} (no bar: Var Î2 = 0, Î2 "
                "exact)"] = var
    return figures


def render_transformer(results: dict, folder: pathlib.Path) -> list[str]:
    findings = transformer_findings(results)
    figures = transformer_figures(results, folder)
    last = results["epochs"][-1]
    rows = [[g, r["kind"], r["size"], f"{r['fisher']:.3g}", f"{r['v1']:.3g}",
             "–" if r["v2"] is None else f"{r['v2']:.3g}", "–" if r["n_i1"] is None else f"{r['n_i1']:,.0f}",
             "–" if r["n_i2"] is None else f"{r['n_i2']:,.0f}", r["zero_fisher"]]
            for g, r in last["groups"].items()]
    head = ["group", "kind", "size", "mean F", "mean Var Î1", "mean Var Î2", "sequences Î1 (median)",
            "sequences Î2 (median)", "F = 0"]
    write_pages(folder, "fishercore report: a character transformer", "Exact diagonal Fisher of a language model's "
                "per-position categorical outputs, the variances of its two estimators, and the samples they need.",
                findings, figures, [(f"Per group at epoch {last['epoch']}", head, rows)])
    return findings
