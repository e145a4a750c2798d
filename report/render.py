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
            lines.append(f"`{name}`: Î2 is exact (v2 = 0 for every parameter: the output is linear in them); "
                         f"Î1 needs a median of {_fmt(r['n_i1'], '.0f')} samples for 10 % error at 95 % confidence.")
        elif r["n_i1"] is not None and r["n_i2"] is not None:
            ratio = r["n_i2"] / r["n_i1"]
            better, factor = ("Î1", ratio) if ratio >= 1 else ("Î2", 1 / ratio)
            lines.append(f"`{name}`: {better} needs {factor:.1f}× fewer samples (median {_fmt(r['n_i1'], '.0f')} "
                         f"for Î1, {_fmt(r['n_i2'], '.0f')} for Î2); Î2 has the smaller variance for "
                         f"{100 * r['i2_better']:.0f} % of its parameters.")
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
        lines.append(f"Upper bounds exceed the true (group-mean) variances by factors "
                     f"{math.exp(min(ratios)):.3g} to {math.exp(max(ratios)):.3g}.")
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


def fisher_figures(results: dict, out: pathlib.Path) -> dict[str, pathlib.Path]:
    plt = _plt()
    epochs = results["epochs"]
    groups = list(epochs[-1]["groups"])
    x = [e["epoch"] for e in epochs]

    def series(g, k):
        return [e["groups"][g][k] for e in epochs]

    def positive(vals):
        return [v if (v is not None and v > 0) else float("nan") for v in vals]

    def log_or_zero(ax, vals):
        """Log scale where there is something positive to show; else say the value is exactly 0."""
        if any(v is not None and v > 0 for v in vals):
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "= 0 (exact)", ha="center", va="center", transform=ax.transAxes, fontsize=9)

    fig, axes = plt.subplots(4, len(groups), figsize=(2.6 * len(groups), 9), squeeze=False, sharex=True)
    for j, g in enumerate(groups):
        ax = axes[0, j]
        ax.plot(x, positive(series(g, "fisher")), color="k")
        ax.set_title(g, fontsize=9)
        log_or_zero(ax, series(g, "fisher"))
        for row, est, color in ((1, "i1", "tab:blue"), (2, "i2", "tab:orange")):
            ax = axes[row, j]
            ax.plot(x, positive(series(g, f"std_{est}")), color=color, label=f"std Î{est[1]}")
            ax.fill_between(x, positive(series(g, f"std_{est}_lower")), positive(series(g, f"std_{est}_upper")),
                            color=color, alpha=0.25, label="bounds")
            log_or_zero(ax, series(g, f"std_{est}_upper"))
        ax = axes[3, j]
        for k, color, lab in (("log_upper_over_v1", "tab:blue", "Î1"), ("log_upper_over_v2", "tab:orange", "Î2")):
            ax.plot(x, [float("nan") if v is None else v for v in series(g, k)], color=color, label=lab)
        axes[3, j].set_xlabel("epoch")
    for row, label in enumerate(("mean Fisher", "std of Î1\n(with bounds)", "std of Î2\n(with bounds)",
                                 "log(upper / variance)")):
        axes[row, 0].set_ylabel(label, fontsize=9)
    axes[1, 0].legend(fontsize=7)
    axes[3, 0].legend(fontsize=7)
    fig.suptitle("Diagonal Fisher and its estimators per parameter group, by epoch", fontsize=11)
    fig.tight_layout()
    paths = {"grid": out / "fisher_grid.png"}
    fig.savefig(paths["grid"], dpi=90)
    plt.close(fig)

    last = epochs[-1]["groups"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(groups), 3.2))
    ax.bar(groups, [100 * last[g]["i2_better"] for g in groups], color="tab:orange")
    ax.set_ylabel("% parameters where\nvar Î2 < var Î1")
    ax.set_ylim(0, 100)
    ax.tick_params(axis="x", labelrotation=45, labelsize=8)
    ax.set_title(f"Where Î2 beats Î1 (epoch {epochs[-1]['epoch']})", fontsize=10)
    fig.tight_layout()
    paths["i2_better"] = out / "i2_better.png"
    fig.savefig(paths["i2_better"], dpi=90)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.0 + 0.9 * len(groups), 3.4))
    width = 0.38
    pos = range(len(groups))
    for off, est, color in ((-width / 2, "i1", "tab:blue"), (width / 2, "i2", "tab:orange")):
        vals = [last[g][f"n_{est}"] or float("nan") for g in groups]
        ax.bar([p + off for p in pos], vals, width, color=color, label=f"Î{est[1]}")
    ax.set_xticks(list(pos), groups, rotation=45, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("samples (median over parameters)")
    ax.set_title("Samples for 10 % relative error at 95 % confidence", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths["sample_size"] = out / "sample_size.png"
    fig.savefig(paths["sample_size"], dpi=90)
    plt.close(fig)
    return paths


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
    style = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}img{max-width:100%}"
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
             f"{100 * r['i2_better']:.0f} %", _fmt(r["n_i1"], ".0f"), _fmt(r["n_i2"], ".0f")]
            for g, r in last["groups"].items()]
    head = ["group", "size", "Fisher", "std Î1", "std Î2", "v1 lower", "v1", "v1 upper", "v2 lower", "v2",
            "v2 upper", "Î2 better", "N Î1", "N Î2"]
    c = results["config"]
    intro = (f"{c['dataset']}: {'-'.join(map(str, c['widths']))} {c['activation']} MLP, {c['family']}, "
             f"{c['epochs']} epochs of Adam on the {c['backend']} backend (seed {c['seed']}); exact statistics on "
             f"{c['n_analyzed']} held-out inputs after every epoch (epoch 0: initialisation). Means over each "
             "group's parameters; std = √(single-draw variance); N = inputs needed, one label draw each, for "
             f"{100 * c['rel_error']:.0f} % relative error at {100 * c['confidence']:.0f} % confidence.")
    write_pages(out, "fishercore report: Fisher information estimators", intro, findings,
                {"Fisher, estimator standard deviations with bounds, and bound tightness": figs["grid"],
                 "Where Î2 beats Î1": figs["i2_better"], "Sample sizes": figs["sample_size"]},
                [(f"Epoch {last['epoch']}, per parameter group", head, rows)])
    return findings
