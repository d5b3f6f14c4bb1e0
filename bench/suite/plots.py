"""Two figures: decode tokens/s per system per workload (grouped bars), and decode step time
against context with each system's bound (the sweep). matplotlib where it is installed (the GPU
machine); otherwise a plain PNG drawn with bench/fidelity's standard-library canvas."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

from .systems import all_systems

COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2"]


def bar_data(results: dict[str, dict]) -> tuple[list[str], dict[str, list[float | None]]]:
    """Workloads (not the sweep) and, per system, decode tokens/s at each (None: did not run)."""
    workloads = [name for name in results if name != "sweep"]
    values = {}
    for system in all_systems():
        column = []
        for name in workloads:
            rows = [r for r in results[name]["rows"] if r["system"] == system and r["status"] == "ok"]
            column.append(max(rows, key=lambda r: r["context"])["decode_tok_s"] if rows else None)
        if any(v is not None for v in column) or any(r["system"] == system for n in workloads for r in results[n]["rows"]):
            values[system] = column
    return workloads, values


def sweep_data(result: dict) -> dict[str, tuple[list[int], list[float], list[float | None]]]:
    """Per system: contexts, measured ms per step, bound ms per step."""
    series = {}
    for system in all_systems():
        rows = sorted((r for r in result["rows"] if r["system"] == system and r["status"] == "ok"), key=lambda r: r["context"])
        if rows:
            series[system] = ([r["context"] for r in rows], [r["step_ms"] for r in rows],
                              [1e3 * r["bound"]["seconds"] if r.get("bound") else None for r in rows])
    return series


def write_plots(results: dict[str, dict], out_dir: Path) -> list[Path]:
    paths = []
    workloads, values = bar_data(results)
    if workloads:
        paths.append(out_dir / "decode_tokens_per_s.png")
        _draw(_bars_matplotlib, _bars_canvas, paths[-1], workloads, values)
    if "sweep" in results and (series := sweep_data(results["sweep"])):
        paths.append(out_dir / "sweep_step_time.png")
        _draw(_sweep_matplotlib, _sweep_canvas, paths[-1], series)
    return paths


def _draw(with_matplotlib, with_canvas, path, *data) -> None:
    try:
        import matplotlib
    except ImportError:
        with_canvas(path, *data)
        return
    matplotlib.use("Agg")
    with_matplotlib(path, *data)


def _bars_matplotlib(path, workloads, values) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5))
    width = 0.8 / max(1, len(values))
    for i, (system, column) in enumerate(values.items()):
        xs = [w + (i - (len(values) - 1) / 2) * width for w in range(len(workloads))]
        heights = [v or 0 for v in column]
        ax.bar(xs, heights, width, label=system, color=COLORS[i % len(COLORS)])
        for x, v in zip(xs, column):
            if v is None:
                ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=7,
                        transform=ax.get_xaxis_transform())
    ax.set_xticks(range(len(workloads)), workloads)
    ax.set_ylabel("decode tokens/s (batch included)")
    if any(v for c in values.values() for v in c):
        ax.set_yscale("log")
    ax.set_title("Decode throughput per workload (n/a: out of memory or skipped, see the table)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _sweep_matplotlib(path, series) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5))
    for i, (system, (contexts, step_ms, bound_ms)) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        ax.plot(contexts, step_ms, "o-", color=color, label=system)
        points = [(c, b) for c, b in zip(contexts, bound_ms) if b is not None]
        if points:
            ax.plot(*zip(*points), "--", color=color, alpha=0.7, label=f"{system} bound")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    contexts = sorted({c for cs, _, _ in series.values() for c in cs})
    ax.set_xticks(contexts, [str(c) for c in contexts])
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode step (ms)")
    ax.set_title("Decode step time against context; dashed: the bound from this run's ceilings")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _canvas():
    path = Path(__file__).resolve().parent.parent / "fidelity" / "png_chart.py"
    spec = importlib.util.spec_from_file_location("png_chart", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rgb(color: str) -> tuple[int, int, int]:
    return tuple(int(color[i : i + 2], 16) for i in (1, 3, 5))


def _bars_canvas(path, workloads, values, width=960, height=520) -> None:
    png = _canvas()
    canvas = png.Canvas(width, height)
    left, right, top, bottom = 60, width - 260, 50, height - 50
    top_value = max([v for c in values.values() for v in c if v] or [1.0])
    canvas.text(left, 15, "decode tokens/s per workload", scale=2)
    canvas.line(left, bottom, right, bottom, png.BLACK)
    canvas.line(left, top, left, bottom, png.BLACK)
    canvas.text(8, top - 14, f"max {top_value:.3g}")
    group = (right - left) / max(1, len(workloads))
    bar = group * 0.8 / max(1, len(values))
    for w, name in enumerate(workloads):
        canvas.text(round(left + w * group + 4), bottom + 10, name)
        for i, (system, column) in enumerate(values.items()):
            x0 = round(left + w * group + group * 0.1 + i * bar)
            if column[w] is None:
                canvas.text(x0, bottom - 12, "NA")
                continue
            h = round((bottom - top) * column[w] / top_value)
            for x in range(x0, round(x0 + bar) - 1):
                canvas.line(x, bottom, x, bottom - h, _rgb(COLORS[i % len(COLORS)]))
    for i, system in enumerate(values):
        canvas.line(right + 15, top + 16 * i + 3, right + 35, top + 16 * i + 3, _rgb(COLORS[i % len(COLORS)]), size=5)
        canvas.text(right + 42, top + 16 * i, system)
    canvas.save(path)


def _sweep_canvas(path, series, width=960, height=520) -> None:
    png = _canvas()
    canvas = png.Canvas(width, height)
    left, right, top, bottom = 60, width - 260, 50, height - 50
    xs = [c for cs, _, _ in series.values() for c in cs]
    ys = [y for _, ms, bs in series.values() for y in ms + [b for b in bs if b]]
    x_lo, x_hi = math.log2(min(xs)) - 0.3, math.log2(max(xs)) + 0.3
    y_lo, y_hi = math.log10(min(ys)) - 0.1, math.log10(max(ys)) + 0.1

    def point(x, y):
        return (round(left + (math.log2(x) - x_lo) / (x_hi - x_lo) * (right - left)),
                round(bottom - (math.log10(y) - y_lo) / (y_hi - y_lo) * (bottom - top)))

    canvas.text(left, 15, "decode step ms against context (log-log); dashed: bound", scale=2)
    canvas.line(left, bottom, right, bottom, png.BLACK)
    canvas.line(left, top, left, bottom, png.BLACK)
    for x in sorted(set(xs)):
        canvas.text(point(x, 10**y_lo)[0] - 12, bottom + 8, str(x))
    canvas.text(8, top - 14, f"{10**y_hi:.3g} ms")
    canvas.text(8, bottom - 4, f"{10**y_lo:.3g}")
    for i, (system, (contexts, step_ms, bound_ms)) in enumerate(series.items()):
        color = _rgb(COLORS[i % len(COLORS)])
        for dashed, ys_ in ((0, step_ms), (6, bound_ms)):
            pts = [point(c, y) for c, y in zip(contexts, ys_) if y]
            for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
                canvas.line(x0, y0, x1, y1, color, size=2, dash=dashed)
            for x, y in pts:
                canvas.dot(x, y, color, size=3 if dashed else 7)
        canvas.line(right + 15, top + 16 * i + 3, right + 35, top + 16 * i + 3, color, size=2)
        canvas.text(right + 42, top + 16 * i, system)
    canvas.save(path)
