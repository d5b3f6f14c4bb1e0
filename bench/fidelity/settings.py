"""The table of settings the evaluation measures: one row each in the results.

A setting is run by one of three runners:

    reference  transformers' own model, its default attention (SDPA) and cache (DynamicCache)
    select     the same model with the selection attention of selection.py (exact prefill,
               approximate decode), for the naive baselines and the oracle
    hetero     `hetero.load(ckpt, config=...)`: a model whose generate() runs over hetero's cache

`budget` is the share of the context fetched per KV head per layer beyond the sink and the recent
window, which every approximate method keeps as well; None for exact settings.

The speculative mode's rows (`speculative_config`): one per budget, the budget being the cap
`max_tokens`; one at hetero's defaults (the issue's bar: >= 99% of the reference's accuracy while
fetching at most 10% of the context per step); and one with `cpu_remainder="all"`, which is exact.
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

    def __post_init__(self):
        # hetero keeps whole blocks; whole-block sink and window make its residency and the baselines' the same.
        if self.block < 1 or self.sink % self.block or self.window % self.block:
            raise ValueError(f"sink ({self.sink}) and window ({self.window}) must be whole blocks of {self.block}")


@dataclass(frozen=True)
class Setting:
    name: str  # the row's label
    method: str  # the line it belongs to in the plot
    runner: str  # "reference", "select" or "hetero"
    budget: float | None = None
    selection: Selection | None = None
    hetero_config: dict = field(default_factory=dict)
    skip_reason: str | None = None  # set when the row cannot run here; it is reported, not run

    @property
    def speculative(self) -> bool:
        return self.hetero_config.get("mode") == "speculative"

    @property
    def approximate(self) -> bool:
        """Speculation that leaves tokens out (not cpu_remainder "all"): its recall is measured."""
        return self.speculative and self.hetero_config.get("cpu_remainder", "none") == "none"


# The default row's verify_share against others: none (InfiniGen's prediction alone) and larger shares.
VERIFY_SHARES = (0.0, 0.5, 0.75)


def hetero_config(mode: str, residency: Residency, gpu_kv_bytes: int) -> dict:
    """The offload configuration of a hetero row (exactly the keys of the issue's call)."""
    return {"mode": mode, "gpu_kv_bytes": gpu_kv_bytes, "block_size": residency.block,
            "window_tokens": residency.window, "sink_tokens": residency.sink}


def speculative_config(budget: float | None, residency: Residency, gpu_kv_bytes: int, cpu_remainder: str = "none") -> dict:
    """The speculative mode's offload configuration at a fetch budget (a share of the context).

    `max_tokens = budget` (a float share of the context, resolved at each step) caps the middle
    tokens fetched per KV head per layer, like the baselines' `fetch`; `min_tokens = 0` leaves the
    alpha rule free below it. hetero's default floor (64 tokens) would be most of the cap at 1% of an
    8K context (81 tokens) and all of it in the tiny run's 1K (10 tokens: the cap wins), so every
    small-budget row would fetch its cap whatever speculation predicted; with 0, the cap is the
    budget, and the measured share shows what the alpha rule took under it. `alpha` and
    `partial_ratio` are left out: hetero's defaults. budget None: hetero's defaults for all of them.
    """
    cfg = {**hetero_config("speculative", residency, gpu_kv_bytes), "cpu_remainder": cpu_remainder}
    if budget is not None:
        cfg.update(min_tokens=0, max_tokens=float(budget))
    return cfg


def speculation_settings(config: dict):
    """hetero's SpeculationSettings that an offload configuration resolves to (its defaults filled in)."""
    import hetero
    from hetero.speculate import SpeculationSettings

    return SpeculationSettings.from_config(hetero.OffloadConfig.from_dict(config))


def default_max_share() -> float:
    """hetero's default `max_tokens` as a share of the context (0.1 when hetero cannot say)."""
    try:
        import hetero

        share = hetero.OffloadConfig().max_tokens
    except Exception:  # noqa: BLE001 - only the plot position of the default row depends on it
        return 0.1
    return float(share) if isinstance(share, float) and share < 1 else 0.1


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
                                Selection(method, residency.sink, residency.window, fetch, residency.block)))
    for mode in hetero_modes:
        rows.append(Setting(f"hetero {mode}", f"hetero-{mode}", "hetero",
                            hetero_config=hetero_config(mode, residency, gpu_kv_bytes)))
    why_not = speculative_available()
    # The bar first: if the time limit bites, it is the last budgeted rows that go.
    rows.append(Setting("speculative default", "speculative-default", "hetero", default_max_share(),
                        hetero_config=speculative_config(None, residency, gpu_kv_bytes), skip_reason=why_not))
    for share in VERIFY_SHARES:
        name = "no verify" if share == 0 else f"verify_share {share}"
        rows.append(Setting(f"speculative default, {name}", "speculative-unverified" if share == 0 else "speculative-verify",
                            "hetero", default_max_share(),
                            hetero_config={**speculative_config(None, residency, gpu_kv_bytes), "verify_share": share},
                            skip_reason=why_not))
    for budget in budgets:
        rows.append(Setting(f"speculative {budget:.0%}", "speculative", "hetero", budget,
                            hetero_config=speculative_config(budget, residency, gpu_kv_bytes), skip_reason=why_not))
    top = max(budgets)
    rows.append(Setting(f"speculative {top:.0%} + cpu_remainder all", "speculative-exact", "hetero", top,
                        hetero_config=speculative_config(top, residency, gpu_kv_bytes, cpu_remainder="all"),
                        skip_reason=why_not))
    rows.append(Setting("speculative default + cpu_remainder bounded", "speculative-bounded", "hetero", default_max_share(),
                        hetero_config={**speculative_config(None, residency, gpu_kv_bytes), "cpu_remainder": "bounded"},
                        skip_reason=why_not))
    return rows
