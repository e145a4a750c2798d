"""Figures, findings and the report pages (report.md, standalone report.html) from results.json data."""

from __future__ import annotations

import base64
import html
import math
import pathlib


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(x, spec=".3g"):
    return "—" if x is None else format(x, spec)


def _percent(x) -> str:
    """A share as a percentage that never reads 0 % or 100 % unless it is exactly that."""
    if x is None:
        return "—"
    p = 100 * x
    if 0 < p < 1:
        return f"{p:.2g} %"  # 0.3 %, 0.05 %: never "0 %"
    if 99 < p < 100:
        return f"{p:.1f} %" if p < 99.95 else "> 99.9 %"  # never "100 %"
    return f"{p:.0f} %"


def _is_last_layer(name, groups):
    prefix = name.rsplit(".", 1)[0]
    return prefix == groups[-1].rsplit(".", 1)[0]


def fisher_findings(results: dict) -> list[str]:
    """Sentences the numbers support, computed from them (never canned)."""
    epochs = results["epochs"]
    last = epochs[-1]
    groups = list(last["groups"])
    conf = results["config"]
    lines = []
    for name in groups:
        r = last["groups"][name]
        if r["v2_max"] == 0:
            lines.append(f"`{name}`: Î2 is exact per input (v2 = 0 for every parameter: the output is linear in "
                         f"them), so its only error is the variation over inputs: {_fmt(r['n_i2'], ',.0f')} inputs, "
                         f"one draw each, for 10 % error at 95 % confidence, against {_fmt(r['n_i1'], ',.0f')} for "
                         "Î1 (medians over the group's parameters).")
        elif r["n_i1"] is not None and r["n_i2"] is not None:
            ratio = r["n_i2"] / r["n_i1"]
            better, factor = ("Î1", ratio) if ratio >= 1 else ("Î2", 1 / ratio)
            lines.append(f"`{name}`: {better} needs {factor:.1f}× fewer inputs, one draw each (median "
                         f"{_fmt(r['n_i1'], ',.0f')} for Î1, {_fmt(r['n_i2'], ',.0f')} for Î2); Î2 has the "
                         f"smaller variance for {_percent(r['i2_better'])} of its parameters, Î1 for "
                         f"{_percent(r.get('i1_better'))}.")
    checks = [(e["epoch"], g) for e in epochs for g, r in e["groups"].items() if not r["bounds_hold"]]
    n_checks = len(epochs) * len(groups)
    if not checks:
        lines.append(f"The bounds bracket the exact variances of every parameter in all {n_checks} "
                     f"(epoch, group) checks.")
    else:
        lines.append(f"The bounds failed in {len(checks)} of {n_checks} (epoch, group) checks: {checks[:5]}.")
    ratios = [r[k] for e in epochs for r in e["groups"].values() for k in ("log_upper_over_v1", "log_upper_over_v2")
              if r[k] is not None]
    if ratios:
        low, high = math.exp(min(ratios)), math.exp(max(ratios))
        if high - 1 < 1e-6:
            lines.append("The upper bounds equal the true (group-mean) variances (to 1e-6): for this likelihood "
                         "they are exact.")
        else:
            lines.append(f"Upper bounds exceed the true (group-mean) variances by factors {low:.4g} to {high:.4g}.")
    first = epochs[0]
    if len(epochs) > 1:
        change = {g: last["groups"][g]["fisher"] / first["groups"][g]["fisher"] for g in groups
                  if first["groups"][g]["fisher"]}
        if change:
            g_max = max(change, key=change.get)
            lines.append(f"From initialisation to epoch {last['epoch']} the mean Fisher changes by factors "
                         f"{min(change.values()):.3g} to {max(change.values()):.3g} (largest in `{g_max}`).")
    acc = f", test accuracy {last['test_accuracy']:.3f}" if "test_accuracy" in last else ""
    lines.append(f"After {last['epoch']} epochs on {conf['dataset']} ({conf['backend']} backend): test loss "
                 f"{last['test_loss']:.4f}{acc}.")
    return lines


def fisher_figures(results: dict, out: pathlib.Path) -> dict[str, tuple[pathlib.Path, str]]:
    """The three figures, with what each caption needs to say: ``{key: (path, caption)}``."""
    plt = _plt()
    epochs = results["epochs"]
    groups = list(epochs[-1]["groups"])
    x = [e["epoch"] for e in epochs]
    last_epoch = epochs[-1]["epoch"]

    def series(g, k):
        return [e["groups"][g][k] for e in epochs]

    def positive(vals):
        return [v if (v is not None and v > 0) else float("nan") for v in vals]

    def zero(g, k):
        return all(v == 0 for v in series(g, k))

    # 1. per group: the Fisher, then std Î1 and std Î2 on one axis with their bound bands, then the bounds'
    #    tightness; Î2's line and band are left out where Var Î2 = 0 at every epoch (said in the caption)
    fig, axes = plt.subplots(3, len(groups), figsize=(3.4 * len(groups), 8.5), squeeze=False, sharex=True)
    exact = [g for g in groups if zero(g, "std_i2")]
    for j, g in enumerate(groups):
        ax = axes[0, j]
        ax.plot(x, positive(series(g, "fisher")), color="k")
        ax.set_yscale("log")
        ax.set_title(g, fontsize=11)
        ax = axes[1, j]
        for est, color in (("i1", "tab:blue"), ("i2", "tab:orange")):
            if est == "i2" and g in exact:
                continue
            label = "Î1" if est == "i1" else "Î2"
            ax.plot(x, positive(series(g, f"std_{est}")), color=color, label=f"std {label}")
            ax.fill_between(x, positive(series(g, f"std_{est}_lower")), positive(series(g, f"std_{est}_upper")),
                            color=color, alpha=0.2, label=f"{label} bounds")
        ax.set_yscale("log")
        ax = axes[2, j]
        for k, color, label in (("log_upper_over_v1", "tab:blue", "Î1"), ("log_upper_over_v2", "tab:orange", "Î2")):
            vals = [float("nan") if v is None else v / math.log(10) for v in series(g, k)]
            if not all(math.isnan(v) for v in vals):
                ax.plot(x, vals, color=color, label=label)
        ax.set_xlabel("epoch", fontsize=10)
        for ax in axes[:, j]:
            ax.tick_params(labelsize=9)
    for row, label in enumerate(("mean Fisher (log10 axis)", "std of one draw (log10 axis)",
                                 "log10(upper bound / variance)")):
        axes[row, 0].set_ylabel(label, fontsize=10)
    axes[1, 0].legend(fontsize=8)
    axes[2, 0].legend(fontsize=8)
    fig.tight_layout()
    paths = {"grid": out / "fisher_grid.png"}
    fig.savefig(paths["grid"], dpi=100)
    plt.close(fig)
    note = (f" No Î2 curve for {', '.join(f'`{g}`' for g in exact)}: Var Î2 = 0 there at every epoch (the output is "
            "linear in those parameters; Î2 is exact).") if exact else ""
    captions = {"grid": "Per group, epochs 0 (initialisation) to "
                        f"{last_epoch}: the mean Fisher; the standard deviations of one draw of Î1 (blue) and Î2 "
                        "(orange) on one axis, each with the band between its lower and upper bounds; and how far "
                        "the upper bounds lie above the variances (log10 of the ratio, 0 = tight). Group means "
                        "over each group's parameters." + note}

    # 2. who wins, per group, at the last epoch: strict comparisons, ties (both 0, or equal) apart
    last = epochs[-1]["groups"]
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(groups), 3.6))
    pos = range(len(groups))
    i2 = [100 * last[g]["i2_better"] for g in groups]
    i1 = [100 * (last[g].get("i1_better") if last[g].get("i1_better") is not None else 1 - last[g]["i2_better"])
          for g in groups]
    ties = [max(0.0, 100 - a - b) for a, b in zip(i1, i2)]
    ax.bar(pos, i2, color="tab:orange", label="Var Î2 < Var Î1")
    ax.bar(pos, i1, bottom=i2, color="tab:blue", label="Var Î1 < Var Î2")
    ax.bar(pos, ties, bottom=[a + b for a, b in zip(i1, i2)], color="0.8", label="equal (e.g. both 0)")
    ax.set_xticks(list(pos), groups, rotation=30, fontsize=9)
    ax.set_ylabel("% of the group's parameters", fontsize=10)
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths["i2_better"] = out / "i2_better.png"
    fig.savefig(paths["i2_better"], dpi=100)
    plt.close(fig)
    captions["i2_better"] = (f"Which estimator has the smaller single-draw variance, per parameter, at epoch "
                             f"{last_epoch}.")

    # 3. sample sizes at the last epoch
    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(groups), 3.6))
    width = 0.38
    for off, est, color in ((-width / 2, "i1", "tab:blue"), (width / 2, "i2", "tab:orange")):
        vals = [last[g][f"n_{est}"] or float("nan") for g in groups]
        ax.bar([p + off for p in pos], vals, width, color=color, label="Î1" if est == "i1" else "Î2")
    ax.set_xticks(list(pos), groups, rotation=30, fontsize=9)
    ax.set_yscale("log")
    ax.set_ylabel("inputs, one draw each\n(median; log10 axis)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["sample_size"] = out / "sample_size.png"
    fig.savefig(paths["sample_size"], dpi=100)
    plt.close(fig)
    captions["sample_size"] = (f"Inputs needed, one label draw each, for 10 % relative error at 95 % confidence, "
                               f"at epoch {last_epoch} (median over each group's parameters). Where Î2 is exact "
                               "per input its bar counts only the variation of the Fisher over inputs.")
    return {k: (paths[k], captions[k]) for k in paths}


def _table(rows: list[list], head: list[str]) -> tuple[str, str]:
    md = "| " + " | ".join(head) + " |\n|" + "---|" * len(head) + "\n"
    md += "".join("| " + " | ".join(map(str, r)) + " |\n" for r in rows)
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    tr = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>" for r in rows)
    return md, f"<table><thead><tr>{th}</tr></thead><tbody>{tr}</tbody></table>"


def write_pages(out: pathlib.Path, title: str, intro: str, findings: list[str], figures: dict, tables: list) -> None:
    """report.md (figures linked) and report.html (standalone: figures embedded)."""
    md = [f"# {title}", "", intro, "", "## Findings", ""] + [f"* {f}" for f in findings] + [""]
    body = [f"<h1>{html.escape(title)}</h1>", f"<p>{html.escape(intro)}</p>", "<h2>Findings</h2><ul>"]
    body += [f"<li>{html.escape(f).replace('`', '')}</li>" for f in findings] + ["</ul>"]
    for caption, path in figures.items():
        md += [f"![{caption}]({path.name})", ""]
        data = base64.b64encode(path.read_bytes()).decode("ascii")
        body.append(f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
                    f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    for caption, head, rows in tables:
        t_md, t_html = _table(rows, head)
        md += [f"## {caption}", "", t_md]
        body += [f"<h2>{html.escape(caption)}</h2>", t_html]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "figure{margin:1em 0;overflow-x:auto}img{max-width:none}"
             "table{border-collapse:collapse;font-size:90%}td,th{border:1px solid #ccc;padding:2px 6px;"
             "text-align:right}")
    (out / "report.html").write_text(
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body>{''.join(body)}</body></html>", encoding="utf-8")


def render_fisher(results: dict, out: pathlib.Path) -> list[str]:
    findings = fisher_findings(results)
    figs = fisher_figures(results, out)
    last = results["epochs"][-1]
    rows = [[g, r["size"], _fmt(r["fisher"]), _fmt(r["std_i1"]), _fmt(r["std_i2"]), _fmt(r["v1_lower"]),
             _fmt(r["v1"]), _fmt(r["v1_upper"]), _fmt(r["v2_lower"]), _fmt(r["v2"]), _fmt(r["v2_upper"]),
             _percent(r["i2_better"]), _fmt(r["n_i1"], ",.0f"), _fmt(r["n_i2"], ",.0f")]
            for g, r in last["groups"].items()]
    head = ["group", "size", "Fisher", "std Î1", "std Î2", "v1 lower", "v1", "v1 upper", "v2 lower", "v2",
            "v2 upper", "Var Î2 < Var Î1", "inputs Î1", "inputs Î2"]
    c = results["config"]
    intro = (f"{c['dataset']}: {'-'.join(map(str, c['widths']))} {c['activation']} MLP, {c['family']}, "
             f"{c['epochs']} epochs of Adam on the {c['backend']} backend (seed {c['seed']}); exact statistics on "
             f"{c['n_analyzed']} held-out inputs after every epoch (epoch 0: initialisation). Means over each "
             "group's parameters; std = √(single-draw variance); N = inputs needed, one label draw each, for "
             f"{100 * c['rel_error']:.0f} % relative error at {100 * c['confidence']:.0f} % confidence.")
    write_pages(out, "fishercore report: Fisher information estimators", intro, findings,
                {caption: path for path, caption in figs.values()},
                [(f"Epoch {last['epoch']}, per parameter group", head, rows)])
    return findings
