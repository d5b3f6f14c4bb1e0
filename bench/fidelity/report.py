"""The evaluation's outputs: fidelity.json, a markdown table, and a plot of accuracy against budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KINDS = ("passkey", "kv", "copy")
COLORS = {"reference": "#000000", "select-full": "#7f7f7f", "hetero-stream": "#1f77b4", "hetero-split": "#17becf",
          "window": "#d62728", "random": "#ff7f0e", "oracle": "#2ca02c", "speculative": "#9467bd"}


def _mean_recall(values) -> float | None:
    values = [v for v in values or [] if v is not None]
    return float(np.mean(values)) if values else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def row_line(row: dict) -> str:
    """One line for the console."""
    acc = row["accuracy"]
    recall = _mean_recall(row.get("recall_by_layer_answers"))
    return (f"{row['name']:40s} acc {acc['mean']:.3f} (passkey {acc['passkey']:.2f} kv {acc['kv']:.2f} "
            f"copy {acc['copy']:.2f})  text loss {_fmt(row.get('text_loss'), '.4f')}  "
            f"recall {_fmt(recall, '.3f')}  {row['seconds']:.1f} s")


def markdown(results: dict) -> str:
    plan = results["plan"]
    res = plan["residency"]
    lines = [
        f"# Retrieval fidelity: {results['parameters'] / 1e6:.1f}M-parameter trained Llama, {plan['context']}-token contexts",
        "",
        f"{plan['probes_per_kind']} held-out probes per kind (the fact at depth {results['depth_range'][0]:.0%}-"
        f"{results['depth_range'][1]:.0%}); text loss over the last {plan['scored']} tokens of {plan['text_seqs']} "
        f"held-out sequences (nats/byte). Every approximate row keeps the sink ({res['sink']}) and recent window "
        f"({res['window']}) and fetches `budget` x context more tokens per KV head per layer. Device "
        f"{results['device_name']}, {results['dtype']}.",
        "",
        "| setting | budget | fetched tokens | passkey | kv | copy | mean accuracy | text loss | recall (answers) | recall (text) | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        budget = "-" if row["budget"] is None else f"{row['budget']:.0%}"
        fetched = "all" if row["fetch_tokens"] is None else str(row["fetch_tokens"])
        if "skipped" in row:
            lines.append(f"| {row['name']} | {budget} | {fetched} | skipped: {row['skipped'].replace('|', '/')} "
                         "| | | | | | | |")
            continue
        acc = row["accuracy"]
        lines.append(
            f"| {row['name']} | {budget} | {fetched} | {acc['passkey']:.2f} | {acc['kv']:.2f} | {acc['copy']:.2f} "
            f"| **{acc['mean']:.3f}** | {_fmt(row.get('text_loss'), '.4f')} "
            f"| {_fmt(_mean_recall(row.get('recall_by_layer_answers')), '.3f')} "
            f"| {_fmt(_mean_recall(row.get('recall_by_layer_text')), '.3f')} | {row['seconds']:.1f} |")
    short = results.get("reference_short_context")
    if short:
        acc = short["accuracy"]
        lines += ["", f"Reference at a {short['context']}-token context (did training teach retrieval at all?): "
                      f"passkey {acc['passkey']:.2f}, kv {acc['kv']:.2f}, copy {acc['copy']:.2f}, mean {acc['mean']:.3f}."]
    training = results.get("training")
    if training:
        last = training.get("last_log") or {}
        lines += ["", f"Training: {training['steps']} steps, {training['tokens'] / 1e6:.1f}M tokens in "
                      f"{training['loop_s']} s (stopped by {training['stopped_by']}), last text loss "
                      f"{last.get('text_loss', '-')} nats/byte, answer-token accuracy {last.get('answer_token_acc', '-')}."]
    lines += _depth_table(results)
    recall_rows = [r for r in results["rows"] if r.get("recall_by_layer_answers")]
    if recall_rows:
        layers = len(recall_rows[0]["recall_by_layer_answers"])
        lines += ["", "Attention-mass recall per layer (answer decode steps):", "",
                  "| setting | " + " | ".join(f"L{i}" for i in range(layers)) + " |",
                  "| --- |" + " --- |" * layers]
        for row in recall_rows:
            cells = " | ".join(_fmt(v, ".3f") for v in row["recall_by_layer_answers"])
            lines.append(f"| {row['name']} | {cells} |")
    return "\n".join(lines) + "\n"


def _depth_table(results: dict, bins: int = 4) -> list[str]:
    """Accuracy by the asked-for fact's depth, all kinds pooled: exact rows and the largest budget."""
    depths = results.get("probe_depths")
    done = [r for r in results["rows"] if "skipped" not in r and r.get("correct")]
    if not depths or not done:
        return []
    top = max((r["budget"] for r in done if r["budget"] is not None), default=None)
    shown = [r for r in done if r["budget"] is None or r["budget"] == top]
    low, high = results["depth_range"]
    edges = np.linspace(low, high, bins + 1)
    header = " | ".join(f"{a:.0%}-{b:.0%}" for a, b in zip(edges, edges[1:]))
    lines = ["", "Accuracy by depth of the asked-for fact (all kinds):", "", f"| setting | {header} |",
             "| --- |" + " --- |" * bins]
    for row in shown:
        d = np.concatenate([depths[k] for k in KINDS if k in row["correct"]])
        c = np.concatenate([row["correct"][k] for k in KINDS if k in row["correct"]])
        which = np.clip(np.searchsorted(edges, d, side="right") - 1, 0, bins - 1)
        cells = [f"{c[which == i].mean():.2f} ({(which == i).sum()})" if (which == i).any() else "-" for i in range(bins)]
        lines.append(f"| {row['name']} | " + " | ".join(cells) + " |")
    return lines


def plot_series(results: dict) -> tuple[list[tuple[str, str, list[float], list[float]]], list[tuple[str, str, float]]]:
    """(method, color, budgets %, accuracies) per budgeted method, and (method, color, accuracy) per exact one."""
    lines, levels = {}, []
    for row in results["rows"]:
        if "skipped" in row:
            continue
        if row["budget"] is None:
            levels.append((row["name"], COLORS.get(row["method"], "#444444"), row["accuracy"]["mean"]))
        else:
            lines.setdefault(row["method"], []).append((100 * row["budget"], row["accuracy"]["mean"]))
    series = [(m, COLORS.get(m, "#444444"), [x for x, _ in pts], [y for _, y in pts]) for m, pts in lines.items()]
    return series, levels


def plot(results: dict, path: Path) -> str:
    """Write the PNG with matplotlib when it is installed, else with the plain writer; returns which."""
    series, levels = plot_series(results)
    title = f"Retrieval accuracy vs fetch budget ({results['plan']['context']}-token context)"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from png_chart import line_chart

        line_chart(path, series, levels, title=title, x_label="fetch budget, % of context", y_label="accuracy")
        return "png_chart"
    fig, ax = plt.subplots(figsize=(9.5, 4.5), dpi=120)
    for name, color, level in levels:
        ax.axhline(level, color=color, linestyle="--", linewidth=1, label=f"{name}: {level:.2f}")
    for method, color, xs, ys in series:
        ax.plot(xs, ys, marker="o", color=color, label=method)
    ax.set_xscale("log")
    ticks = sorted({x for _, _, xs, _ in series for x in xs})
    if ticks:
        ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel("fetch budget (share of context, beyond sink + window)")
    ax.set_ylabel("retrieval accuracy (exact answer)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return "matplotlib"


def write_all(out_dir: str, results: dict) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md = out / "fidelity.md"
    md.write_text(markdown(results))
    png = out / "fidelity.png"
    results["plot_backend"] = plot(results, png)
    js = out / "fidelity.json"
    js.write_text(json.dumps(results, indent=1))
    return [js, md, png]
