"""The CNN study: the paper's per-epoch analysis on a small convolutional network and the built-in digits.

``fishercore report --model cnn`` trains :func:`fishercore.report.cnn.torch_model` (conv 1→8, act, max pool,
conv 8→16, act, max pool, dense 64→10; tanh by default) on scikit-learn's 8×8 digits with Adam and, after
every epoch (epoch 0: initialisation), analyses the held-out images exactly — every field, second order
included, by the conv and curvature rules (docs/convolutional.md).  The report says, per kind of layer
(convolution weights and biases, dense head), which estimator has the smaller variance for how many
parameters, and how many images each needs for 10 % relative error at 95 % confidence.
"""

from __future__ import annotations

import math
import pathlib
import time
from typing import NamedTuple

import numpy as np

import fishercore as fc

from . import ReportError
from . import cnn as C
from . import data as D
from .render import _plt, write_pages
from .results import CONFIDENCE, REL_ERROR, SLACK, ResultsWriter, largest_by_kind, log_epoch, to_numpy

FIELDS = ["kind", "size", "fisher", "v1", "v2", "zero_fisher", "n_i1", "n_i2", "i1_better", "i2_better", "ties",
          "v2_zero", "bounds_hold"]


class CNNStudy(NamedTuple):
    epochs: int = 10
    seed: int = 0
    activation: str = "tanh"
    batch_size: int = 32
    lr: float = 3e-3


def group_records(res) -> dict:
    """Per group: mean F, v1, v2; how many F are 0; medians over F > 0 of the images needed with one draw of Î1
    and of Î2; the fractions of parameters where Î1 (Î2) has the strictly smaller variance, and ties; whether
    the four bounds bracket the exact variances of every parameter."""
    f = {k: to_numpy(getattr(res, k)) for k in ("fisher", "v1", "v2", "v1_lower", "v1_upper", "v2_lower",
                                                 "v2_upper")}
    n1 = to_numpy(res.sample_size("i1", REL_ERROR, CONFIDENCE, n_draws=1))
    n2 = to_numpy(res.sample_size("i2", REL_ERROR, CONFIDENCE, n_draws=1))
    out = {}
    for g in res.groups:
        sl = slice(g.offset, g.offset + g.size)
        F, v1, v2 = f["fisher"][sl], f["v1"][sl], f["v2"][sl]
        pos = F > 0
        hold = bool(np.all(f["v1_lower"][sl] <= v1 * (1 + SLACK)) and np.all(v1 <= f["v1_upper"][sl] * (1 + SLACK))
                    and np.all(f["v2_lower"][sl] <= v2 * (1 + SLACK)) and np.all(v2 <= f["v2_upper"][sl] * (1 + SLACK)))
        out[g.name] = {
            "kind": C.group_kind(g.name), "size": g.size, "fisher": float(F.mean()), "v1": float(v1.mean()),
            "v2": float(v2.mean()), "zero_fisher": int(g.size - pos.sum()),
            "n_i1": float(np.median(n1[sl][pos])) if pos.any() else None,
            "n_i2": float(np.median(n2[sl][pos])) if pos.any() else None,
            "i1_better": float(np.mean(v1 < v2)), "i2_better": float(np.mean(v2 < v1)),
            "ties": float(np.mean(v1 == v2)), "v2_zero": float(np.mean(v2 == 0)), "bounds_hold": hold}
    return out


def run_cnn_study(cfg: CNNStudy, out: pathlib.Path, *, progress: bool = True) -> dict:
    try:
        import torch
    except ImportError:
        raise ReportError("--model cnn: needs torch (pip install '.[torch]' in fishercore's checkout)") from None
    from fishercore.backends import torch as fc_torch

    ds = D.load("classification", seed=cfg.seed)
    side = int(round(math.sqrt(ds.X_train.shape[1])))
    config = C.Config(activation=cfg.activation, image=side)
    torch.manual_seed(cfg.seed)
    net = C.torch_model(config, C.init_params(config, cfg.seed), dtype=torch.float64)
    X_train = torch.as_tensor(ds.X_train).reshape(-1, 1, side, side)
    y_train = torch.as_tensor(ds.y_train, dtype=torch.long)
    X_test = torch.as_tensor(ds.X_test).reshape(-1, 1, side, side)
    y_test = torch.as_tensor(ds.y_test, dtype=torch.long)
    header = {"study": "cnn", "config": {**cfg._asdict(), "dataset": ds.name, "channels": list(config.channels),
              "kernel": config.kernel, "pool": config.pool, "image": side, "n_train": int(len(y_train)),
              "n_analyzed": int(len(y_test)), "parameters": int(sum(p.numel() for p in net.parameters())),
              "rel_error": REL_ERROR, "confidence": CONFIDENCE}}
    writer = ResultsWriter(out, header, ["epoch", "group"] + FIELDS)
    opt = torch.optim.Adam(net.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    from tqdm.auto import tqdm

    bar = tqdm(range(cfg.epochs + 1), desc="fishercore report", unit="epoch", disable=progress is not True)
    for epoch in bar:
        t0 = time.perf_counter()
        if epoch > 0:
            net.train()
            order = torch.randperm(len(y_train), generator=gen)
            for start in range(0, len(order), cfg.batch_size):
                idx = order[start:start + cfg.batch_size]
                loss = torch.nn.functional.cross_entropy(net(X_train[idx]), y_train[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            net.eval()
        res = fc.analyze(fc_torch.from_module(net, input_shape=(1, side, side)), X_test)
        with torch.no_grad():
            h = net(X_test)
            test_loss = float(torch.nn.functional.cross_entropy(h, y_test))
            accuracy = float((h.argmax(1) == y_test).double().mean())
        groups = group_records(res)
        record = {"epoch": epoch, "test_loss": test_loss, "test_accuracy": accuracy, "groups": groups,
                  "second_order": not res.first_order_only, "conv0_log_ratio": _log_ratio(res, "conv0.weight"),
                  "seconds": time.perf_counter() - t0}
        writer.add(record, [{"epoch": epoch, "group": g, **r} for g, r in groups.items()])
        log_epoch(progress, epoch, cfg.epochs, record)
        bar.set_postfix(test_loss=f"{test_loss:.3f}")
    bar.close()
    return writer.data


def _log_ratio(res, name: str) -> list:
    """log10(Var Î2 / Var Î1) of each weight of a group, per output channel (the first input channel's kernel);
    None where either variance is 0."""
    g = next(g for g in res.groups if g.name == name)
    sl = slice(g.offset, g.offset + g.size)
    v1, v2 = to_numpy(res.v1)[sl].reshape(g.shape), to_numpy(res.v2)[sl].reshape(g.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.log10(v2[:, 0] / v1[:, 0])
    return [[[float(v) if np.isfinite(v) else None for v in row] for row in k] for k in r]


def _weighted_by_kind(groups: dict, key: str) -> dict:
    """kind → the size-weighted mean of ``key`` over its groups."""
    sums, sizes = {}, {}
    for r in groups.values():
        if r.get(key) is not None:
            sums[r["kind"]] = sums.get(r["kind"], 0.0) + r[key] * r["size"]
            sizes[r["kind"]] = sizes.get(r["kind"], 0) + r["size"]
    return {k: sums[k] / sizes[k] for k in sums}


def cnn_findings(results: dict) -> list[str]:
    epochs = results["epochs"]
    first, last = epochs[0], epochs[-1]
    c = results["config"]
    ch = c["channels"]
    out = [f"A {c['parameters']:,}-parameter CNN (conv 1→{ch[0]} {c['kernel']}×{c['kernel']}, {c['activation']}, "
           f"{c['pool']} pool, conv {ch[0]}→{ch[1]}, {c['activation']}, {c['pool']} pool, dense → 10) trained "
           f"{len(epochs) - 1} epochs on {c['dataset']} ({c['image']}×{c['image']}): test accuracy "
           f"{100 * last['test_accuracy']:.1f} %, test loss {last['test_loss']:.3f}. Every field exact (second order "
           f"by the conv and curvature rules) on the {c['n_analyzed']} held-out images after every epoch; "
           f"{sum(e['seconds'] for e in epochs):.1f} s for training and all {len(epochs)} analyses."]
    i2, i1, ties = (_weighted_by_kind(last["groups"], k) for k in ("i2_better", "i1_better", "ties"))
    zero = _weighted_by_kind(last["groups"], "v2_zero")
    parts = []
    for kind in sorted(i2):
        if zero.get(kind) == 1.0:
            parts.append(f"{_plural(kind)}: Î2 is exact (Var Î2 = 0 for every parameter: the outputs are linear in "
                         "them), so it wins outright")
        else:
            winner = "Î2" if i2[kind] > i1[kind] else "Î1"
            parts.append(f"{_plural(kind)}: {winner} wins — Î2 has the smaller variance for {100 * i2[kind]:.1f} % "
                         f"of the parameters, Î1 for {100 * i1[kind]:.1f} %"
                         + (f", ties {100 * ties[kind]:.1f} %" if ties[kind] else ""))
    out.append(f"Which estimator has the smaller single-draw variance, per parameter, at epoch {last['epoch']}: "
               + "; ".join(parts) + ".")
    n1, n2 = largest_by_kind(last["groups"], "n_i1"), largest_by_kind(last["groups"], "n_i2")
    exact = [_plural(k) for k in sorted(n1) if zero.get(k) == 1.0]
    out.append(f"Images needed with one label draw each for 10 % relative error at 95 % confidence (median over "
               f"each kind's parameters with F > 0, epoch {last['epoch']}): "
               + "; ".join(f"{_plural(k)} Î1 {n1[k]:,.0f}, Î2 {n2[k]:,.0f}" for k in sorted(n1)) + "."
               + (f" For the {' and '.join(exact)}, where Î2 is exact, its number counts only the variation of the "
                  "Fisher over images (var_x), which any estimator on that many images has." if exact else ""))
    before = _weighted_by_kind(first["groups"], "i2_better").get("conv weight")
    after = i2.get("conv weight")
    if before is not None and after is not None:
        out.append(f"Over training, the share of convolution weights where Î2 has the smaller variance went from "
                   f"{100 * before:.1f} % (initialisation) to {100 * after:.1f} % (epoch {last['epoch']}).")
    checks = sum(len(e["groups"]) for e in epochs)
    held = sum(r["bounds_hold"] for e in epochs for r in e["groups"].values())
    out.append(f"The bounds bracket the exact variances of every parameter in {held} of {checks} (epoch, group) "
               "checks.")
    return out


def _plural(kind: str) -> str:
    return kind[:-1] + "ses" if kind.endswith("bias") else kind + "s"


def cnn_figures(results: dict, folder: pathlib.Path) -> dict:
    plt = _plt()
    epochs = results["epochs"]
    last = epochs[-1]
    names = list(last["groups"])
    figures = {}
    # 1. who wins, per group, at the last epoch
    fig, ax = plt.subplots(figsize=(8, 3.6))
    x = np.arange(len(names))
    i2 = np.array([last["groups"][g]["i2_better"] for g in names])
    i1 = np.array([last["groups"][g]["i1_better"] for g in names])
    ax.bar(x, 100 * i2, color="tab:orange", label="Var Î2 < Var Î1")
    ax.bar(x, 100 * i1, bottom=100 * i2, color="tab:blue", label="Var Î1 < Var Î2")
    ax.bar(x, 100 * (1 - i1 - i2), bottom=100 * (i1 + i2), color="0.8", label="equal")
    ax.set_xticks(x, names, rotation=30, fontsize=8)
    ax.set_ylabel("% of the group's parameters")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    figures[f"Which estimator has the smaller single-draw variance, per parameter, at epoch {last['epoch']} "
            "(dense head: Var Î2 = 0, Î2 exact)"] = _save(plt, fig, folder / "cnn_winner.png")
    # 2. mean variances per group over training, Î1 solid and Î2 dashed on one axis
    fig, ax = plt.subplots(figsize=(8, 4))
    xs = [e["epoch"] for e in epochs]
    skipped = []
    for k, g in enumerate(names):
        colour = f"C{k % 10}"
        ax.plot(xs, [e["groups"][g]["v1"] for e in epochs], color=colour, label=f"{g} Î1")
        v2 = [e["groups"][g]["v2"] for e in epochs]
        if all(v == 0 for v in v2):
            skipped.append(g)
        else:
            ax.plot(xs, v2, color=colour, linestyle="--", label=f"{g} Î2")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean single-draw variance (log10 axis)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    note = f" ({', '.join(skipped)}: Var Î2 = 0 at every epoch, not drawn)" if skipped else ""
    figures["Mean single-draw variance of Î1 (solid) and Î2 (dashed) per group, after every epoch" + note] = \
        _save(plt, fig, folder / "cnn_variances.png")
    # 3. the first layer's filters: log10(Var Î2 / Var Î1) per weight
    ratio = last.get("conv0_log_ratio")
    if ratio is not None:
        r = np.array(ratio, dtype=float)
        fig, axes = plt.subplots(1, r.shape[0], figsize=(1.3 * r.shape[0], 1.9))
        lim = float(np.nanmax(np.abs(r))) or 1.0
        for k, ax in enumerate(np.atleast_1d(axes)):
            im = ax.imshow(r[k], cmap="coolwarm", vmin=-lim, vmax=lim)
            ax.set_title(f"filter {k}", fontsize=7)
            ax.set_xticks([])
            ax.set_yticks([])
        fig.colorbar(im, ax=list(np.atleast_1d(axes)), shrink=0.8, label="log10(Var Î2 / Var Î1)")
        figures[f"First convolution, epoch {last['epoch']}: log10 of Var Î2 / Var Î1 for each weight of each 3×3 "
                "filter (blue: Î2 better, red: Î1 better)"] = _save(plt, fig, folder / "cnn_filters.png",
                                                                   tight=False)
    return figures


def _save(plt, fig, path: pathlib.Path, tight: bool = True) -> pathlib.Path:
    if tight:
        fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches=None if tight else "tight")
    plt.close(fig)
    return path


def render_cnn(results: dict, folder: pathlib.Path) -> list[str]:
    findings = cnn_findings(results)
    figures = cnn_figures(results, folder)
    last = results["epochs"][-1]

    def fmt(v, spec=".3g"):
        return "–" if v is None else format(v, spec)

    rows = [[g, r["kind"], r["size"], fmt(r["fisher"]), fmt(r["v1"]), fmt(r["v2"]), f"{100 * r['i2_better']:.1f} %",
             f"{100 * r['i1_better']:.1f} %", fmt(r["n_i1"], ",.0f"), fmt(r["n_i2"], ",.0f"), r["zero_fisher"]]
            for g, r in last["groups"].items()]
    head = ["group", "kind", "size", "mean F", "mean Var Î1", "mean Var Î2", "Î2 smaller", "Î1 smaller",
            "images Î1 (median)", "images Î2 (median)", "F = 0"]
    c = results["config"]
    intro = (f"{c['dataset']} ({c['image']}×{c['image']}), a CNN with {c['parameters']:,} parameters, "
             f"{len(results['epochs']) - 1} epochs of Adam (seed {c['seed']}); exact statistics on {c['n_analyzed']} "
             "held-out images after every epoch (epoch 0: initialisation). Variances are of one label draw per "
             f"image; images needed are for {100 * c['rel_error']:.0f} % relative error at "
             f"{100 * c['confidence']:.0f} % confidence with one draw each.")
    write_pages(folder, "fishercore report: a convolutional network", intro, findings, figures,
                [(f"Per group at epoch {last['epoch']}", head, rows)])
    return findings
