"""The table of settings the evaluation measures: one row each in the results.

A setting is run by one of three runners:

    reference  transformers' own model, its default attention (SDPA) and cache (DynamicCache)
    select     the same model with the selection attention of selection.py (exact prefill,
               approximate decode), for the naive baselines and the oracle
    hetero     `hetero.load(ckpt, config=...)`: a model whose generate() runs over hetero's cache

`budget` is the share of the context fetched per KV head per layer beyond the sink and the recent
window, which every approximate method keeps as well; None for exact settings.

The speculative mode plugs in at `speculative_config` below: when hetero offers the mode, its rows
appear, one per budget, and are drawn as one more line in the plot.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from selection import Selection

BUDGETS = (0.01, 0.02, 0.05, 0.10)
BASELINES = ("window", "random")
EXACT_METHODS = ("reference", "select-full", "hetero-stream", "hetero-split")


@dataclass(frozen=True)
class Residency:
    """What every approximate method keeps besides its fetched tokens (and hetero's block size)."""

    sink: int
    window: int
    block: int


@dataclass(frozen=True)
class Setting:
    name: str  # the row's label
    method: str  # the line it belongs to in the plot
    runner: str  # "reference", "select" or "hetero"
    budget: float | None = None
    selection: Selection | None = None
    hetero_config: dict = field(default_factory=dict)
    skip_reason: str | None = None  # set when the row cannot run here; it is reported, not run


def hetero_config(mode: str, residency: Residency, gpu_kv_bytes: int) -> dict:
    """The offload configuration of a hetero row (exactly the keys of the issue's call)."""
    return {"mode": mode, "gpu_kv_bytes": gpu_kv_bytes, "block_size": residency.block,
            "window_tokens": residency.window, "sink_tokens": residency.sink}


def speculative_config(budget_tokens: int, residency: Residency, gpu_kv_bytes: int) -> dict:
    """THE HOOK for the speculative mode's rows: its offload configuration at a fetch budget.

    The key naming the per-layer token budget is hetero's to choose; change it here when the mode
    lands (and add its knobs: partial weight ratio, alpha).
    """
    return {**hetero_config("speculative", residency, gpu_kv_bytes), "token_budget": budget_tokens}


def speculative_available() -> str | None:
    """None when hetero accepts mode "speculative", else why its rows are skipped (hetero's own words)."""
    try:
        import hetero

        hetero.OffloadConfig.from_dict({"mode": "speculative"})
    except Exception as exc:  # noqa: BLE001 - any failure means: skip these rows, and say why
        return f"{type(exc).__name__}: {exc}"
    return None


def build_settings(context: int, residency: Residency, gpu_kv_bytes: int, budgets=BUDGETS,
                   oracle: bool = True, hetero_modes=("stream", "split")) -> list[Setting]:
    """Every row, in the order they run: transformers and the selection rows first (one model, shared
    prefills), then hetero's, each loading the checkpoint itself."""
    rows = [
        Setting("reference (transformers)", "reference", "reference"),
        Setting("select: full (check)", "select-full", "select", selection=Selection("full", 0, 0, 0)),
    ]
    methods = BASELINES + (("oracle",) if oracle else ())
    for method in methods:
        for budget in budgets:
            fetch = round(budget * context)
            rows.append(Setting(f"{method} {budget:.0%}", method, "select", budget,
                                Selection(method, residency.sink, residency.window, fetch)))
    for mode in hetero_modes:
        rows.append(Setting(f"hetero {mode}", f"hetero-{mode}", "hetero",
                            hetero_config=hetero_config(mode, residency, gpu_kv_bytes)))
    why_not = speculative_available()
    for budget in budgets:
        fetch = round(budget * context)
        rows.append(Setting(f"speculative {budget:.0%}", "speculative", "hetero", budget,
                            hetero_config=speculative_config(fetch, residency, gpu_kv_bytes), skip_reason=why_not))
    return rows
