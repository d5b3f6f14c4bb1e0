"""Run workloads, write their JSON, then rebuild the markdown table and the plots from every
workload's JSON in the output directory (so that results of separate calls come together)."""

from __future__ import annotations

from pathlib import Path

import torch

from .plots import write_plots
from .report import load_results, markdown, print_checks
from .runner import run_workload, write_result
from .systems import select_systems
from .workloads import WORKLOADS, scaled

RESULTS = Path(__file__).resolve().parent.parent / "results"


def default_out(scale: str) -> Path:
    return RESULTS if scale == "full" else RESULTS / scale


def run_suite(workloads: list[str], *, scale: str = "full", systems: list[str] | None = None, out: Path | None = None,
              device: str | None = None, attempt_oom: bool = False, ssd_dir: str | None = None,
              report_only: bool = False, command: str = "") -> list[Path]:
    """Returns the files written: one JSON per workload run, summary.md and the PNGs."""
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"--workload: got {', '.join(unknown)}, expected one of {', '.join(WORKLOADS)}")
    chosen = select_systems(systems)
    out = Path(out) if out is not None else default_out(scale)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    written = []
    for name in [] if report_only else workloads:
        result = run_workload(scaled(WORKLOADS[name], scale), chosen, dev, attempt_oom=attempt_oom,
                              ssd_dir=ssd_dir, command=command, save=lambda r: write_result(r, out))
        written.append(out / f"{name}.json")
        print(f"  wrote {written[-1]} ({result['wall_s']:.0f} s)", flush=True)
    results = load_results(out)
    if not results:
        raise FileNotFoundError(f"--out: no workload results under {out}")
    summary = out / "summary.md"
    summary.write_text(markdown(results))
    written += [summary, *write_plots(results, out)]
    print_checks(results)
    print("wrote " + ", ".join(str(p) for p in written[-3:]), flush=True)
    return written
