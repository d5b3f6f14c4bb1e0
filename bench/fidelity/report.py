"""The evaluation's outputs: fidelity.json, a markdown table, and a plot of accuracy against budget."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

KINDS = ("passkey", "kv", "copy")
COLORS = {"reference": "#000000", "select-full": "#7f7f7f", "hetero-stream": "#1f77b4", "hetero-split": "#17becf",
          "window": "#d62728", "random": "#ff7f0e", "oracle": "#2ca02c", "speculative": "#9467bd",
          "speculative-default": "#8c564b", "speculative-unverified": "#bcbd22", "speculative-verify": "#17a768", "speculative-bounded": "#aec7e8", "speculative-exact": "#e377c2"}
BAR_ROW, BAR_ACCURACY, BAR_SHARE = "speculative default", 0.99, 0.10  # the issue's bar


def _mean_recall(values) -> float | None:
    values = [v for v in values or [] if v is not None]
    return float(np.mean(values)) if values else None


def _fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _measured_fetch(row: dict) -> str:
    """The share of the context hetero fetched per layer and step (speculative rows), else '-'."""
    if not row["method"].startswith("speculative"):
        return "-"
    if row.get("offloaded") is False:
        return "not offloaded!"
    share, text = row.get("fetched_share"), row.get("fetched_share_text")
    return "-" if share is None else f"{share:.2%}" + ("" if text is None else f" (text {text:.2%})")


def row_line(row: dict) -> str:
    """One line for the console."""
    acc = row["accuracy"]
    recall = _mean_recall(row.get("recall_by_layer_answers"))
    middle = _mean_recall(row.get("recall_middle_by_layer_answers"))
    fetched = _measured_fetch(row)
    return (f"{row['name']:40s} acc {acc['mean']:.3f} (passkey {acc['passkey']:.2f} kv {acc['kv']:.2f} "
            f"copy {acc['copy']:.2f})  text loss {_fmt(row.get('text_loss'), '.4f')}  "
            f"recall {_fmt(recall, '.3f')} middle {_fmt(middle, '.3f')}"
            + ("" if fetched == "-" else f"  fetched {fetched}") + f"  {row['seconds']:.1f} s")


def markdown(results: dict) -> str:
    plan = results["plan"]
    res = plan["residency"]
    lines = [
        f"# Retrieval fidelity: {results['parameters'] / 1e6:.1f}M-parameter trained Llama, {plan['context']}-token contexts",
        "",
        f"{plan['probes_per_kind']} held-out probes per kind (the fact at depth {results['depth_range'][0]:.0%}-"
        f"{results['depth_range'][1]:.0%}); text loss over the last {plan['scored']} tokens of {plan['text_seqs']} "
        f"held-out sequences (nats/byte). Every approximate row keeps the sink ({res['sink']}) and recent window "
        f"({res['window']}), whole blocks of {res['block']} as hetero keeps them, and fetches `budget` x context "
        "more tokens per KV head per layer from the middle between them (speculative rows: at most that many, "
        "`max_tokens`; 'measured fetch' is hetero's `fetched_token_share`, the tokens it gathered per layer and "
        "decode step over the context, layers 1+; layer 0 is fetched whole). Recall: the share of each head's "
        "true attention probability the attended tokens cover, over the whole context (sink and window "
        "included) and over the middle only (the fetched tokens' share of the middle's attention). Device "
        f"{results['device_name']}, {results['dtype']}.",
        "",
        f"Produced by `{results.get('command', '?')}` on {results.get('date', '?')}.",
        "",
        "| setting | budget | fetched tokens | measured fetch | passkey | kv | copy | mean accuracy | text loss "
        "| recall (answers) | middle recall (answers) | recall (text) | middle recall (text) | s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["rows"]:
        budget = "-" if row["budget"] is None else f"{row['budget']:.0%}"
        fetched = "all" if row["fetch_tokens"] is None else str(row["fetch_tokens"])
        if row["method"].startswith("speculative") and row["fetch_tokens"] is not None:
            fetched = f"<= {fetched}"
        if "skipped" in row:
            lines.append(f"| {row['name']} | {budget} | {fetched} | skipped: {row['skipped'].replace('|', '/')} "
                         "| | | | | | | | | | |")
            continue
        acc = row["accuracy"]
        lines.append(
            f"| {row['name']} | {budget} | {fetched} | {_measured_fetch(row)} | {acc['passkey']:.2f} | {acc['kv']:.2f} "
            f"| {acc['copy']:.2f} | **{acc['mean']:.3f}** | {_fmt(row.get('text_loss'), '.4f')} "
            f"| {_fmt(_mean_recall(row.get('recall_by_layer_answers')), '.3f')} "
            f"| {_fmt(_mean_recall(row.get('recall_middle_by_layer_answers')), '.3f')} "
            f"| {_fmt(_mean_recall(row.get('recall_by_layer_text')), '.3f')} "
            f"| {_fmt(_mean_recall(row.get('recall_middle_by_layer_text')), '.3f')} | {row['seconds']:.1f} |")
    lines += _bar(results)
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
    for key, title in (("recall_middle_by_layer_answers", "Middle recall per layer (answer decode steps): the share "
                        "of the middle's true attention probability (beyond sink and window) the fetched tokens cover"),
                       ("recall_by_layer_answers", "Attention-mass recall per layer (answer decode steps), "
                        "sink and window included")):
        recall_rows = [r for r in results["rows"] if r.get(key)]
        if not recall_rows:
            continue
        layers = len(recall_rows[0][key])
        lines += ["", f"{title}:", "", "| setting | " + " | ".join(f"L{i}" for i in range(layers)) + " |",
                  "| --- |" + " --- |" * layers]
        for row in recall_rows:
            cells = " | ".join(_fmt(v, ".3f") for v in row[key])
            lines.append(f"| {row['name']} | {cells} |")
    if any(r["method"].startswith("speculative") and r.get("recall_by_layer_answers") for r in results["rows"]):
        lines += ["", "Speculative rows: layer 0 has no layer before it to speculate from; hetero fetches its "
                      "middle whole, so it has no speculation recall ('-') and the means are over layers 1+. "
                      "Their recall is measured on the transformers model with hetero's Speculator (same "
                      "calibration, settings and middle span), at the true answers' decode steps and at "
                      f"{results['plan'].get('recall_text_positions', '-')} of the text positions."]
    return "\n".join(lines) + "\n"


def _bar(results: dict) -> list[str]:
    """The issue's bar: at hetero's default settings, >= 99% of the reference's accuracy, <= 10% fetched."""
    rows = {r["name"]: r for r in results["rows"] if "skipped" not in r}
    ref, spec = rows.get("reference (transformers)"), rows.get(BAR_ROW)
    if ref is None or spec is None:
        return []
    base, acc, share = ref["accuracy"]["mean"], spec["accuracy"]["mean"], spec.get("fetched_share")
    kept = acc / base if base > 0 else None
    ok_acc = acc >= BAR_ACCURACY * base
    ok_share = share is not None and share <= BAR_SHARE and spec.get("offloaded") is not False
    verdict = ("not meaningful: the reference answers nothing" if base == 0
               else "**met**" if ok_acc and ok_share else "**not met**")
    overall = spec.get("fetched_share_all_layers")
    lines = ["", f"Issue bar ({BAR_ROW}: >= {BAR_ACCURACY:.0%} of the reference's accuracy, <= {BAR_SHARE:.0%} of the "
                 f"context fetched per step): accuracy {acc:.3f} vs {base:.3f}"
                 + ("" if kept is None else f" ({kept:.1%} of it)")
                 + f", fetched {_fmt(share, '.2%')} per speculated layer and step -> {verdict}"
                 + (f". Counting layer 0, fetched whole, the mean over all layers is {overall:.2%}." if overall is not None
                    else ".")]
    return lines + _exact_checks(rows, ref)


EXACT_METHODS = ("select-full", "hetero-stream", "hetero-split", "speculative-exact")


def _exact_checks(rows: dict, ref: dict) -> list[str]:
    """The rows that must equal the reference: the same answers, the same text loss (to 1e-3)."""
    checks = []
    for row in rows.values():
        if row["method"] not in EXACT_METHODS:
            continue
        same = row.get("correct") == ref.get("correct") and all(
            row["wrong"].get(k) == ref["wrong"].get(k) for k in ref.get("wrong", {}))
        loss = row.get("text_loss")
        same_loss = loss is not None and abs(loss - ref["text_loss"]) <= 1e-3
        checks.append(f"{row['name']} {'equals' if same and same_loss else '**differs from**'} it"
                      + ("" if same else " (answers)") + ("" if same_loss else " (text loss)"))
    return ["", "Exact rows against the reference: " + "; ".join(checks) + "."] if checks else []


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
