"""The results of every workload in one directory as a markdown table, and the bar each must clear."""

from __future__ import annotations

import json
from pathlib import Path

from .systems import DEFAULT, OFFLOADED, all_systems
from .workloads import WORKLOADS

GiB = 2**30


def load_results(out_dir: Path) -> dict[str, dict]:
    """Every <workload>.json under out_dir, in the suite's order; rows in system order."""
    found = {}
    for name in WORKLOADS:
        path = out_dir / f"{name}.json"
        if path.exists():
            result = json.loads(path.read_text())
            order = {s: i for i, s in enumerate(all_systems())}
            result["rows"].sort(key=lambda r: (r["context"], order.get(r["system"], len(order))))
            found[name] = result
    return found


def _ok(result: dict | None, system: str) -> dict | None:
    """The system's row at the workload's longest context, when it ran to the end."""
    if result is None:
        return None
    rows = [r for r in result["rows"] if r["system"] == system and r["status"] == "ok"]
    return max(rows, key=lambda r: r["context"]) if rows else None


def _check(name: str, workload: str, value: float | None, target: float, why_missing: str = "") -> dict:
    if value is None:
        return {"check": name, "workload": workload, "value": None, "target": target, "result": "not measured",
                "note": why_missing}
    return {"check": name, "workload": workload, "value": value, "target": target,
            "result": "pass" if value >= target else "fail"}


def _ratio(a: dict | None, b: dict | None, key: str, invert: bool = False) -> float | None:
    if a is None or b is None or not a.get(key) or not b.get(key):
        return None
    return b[key] / a[key] if invert else a[key] / b[key]


def _to_prediction(split: dict) -> float | None:
    """Split's decode over the issue's prediction KV / (PCIe + CPU), from the ceilings probed alone:
    rows without it (written before the suite measured the two at once, or where the CPU read no KV)
    hold it as their ratio to the bound."""
    predicted = split.get("ratio_to_split_prediction")
    return predicted if predicted is not None else split.get("ratio_to_bound")


def checks(results: dict[str, dict]) -> list[dict]:
    """The issue's bar: split >= 1.8x transformers' offloaded cache and >= 80% of its (PCIe + CPU)
    bound; speculative >= 10x offloaded on the small card; hetero within 5% of transformers' default
    cache where the KV fits; beyond-RAM completing."""
    found = []
    for name in ("small-card", "many-sequences", "beyond-ram"):
        r = results.get(name)
        split = _ok(r, "hetero-split")
        found.append(_check("split decode vs transformers offloaded (x)", name,
                            _ratio(split, _ok(r, OFFLOADED), "decode_tok_s"), 1.8, "split or offloaded did not run"))
        moved = split is not None and (split["bytes_per_step"]["pcie_h2d"] + split["bytes_per_step"]["cpu_read"]) > 0
        found.append(_check("split decode / its (PCIe + CPU) bound", name,
                            _to_prediction(split) if moved else None, 0.8,
                            "split did not run, moved no KV, or ran without a GPU"))
    r = results.get("small-card")
    found.append(_check("speculative decode vs transformers offloaded (x)", "small-card",
                        _ratio(_ok(r, "hetero-speculative"), _ok(r, OFFLOADED), "decode_tok_s"), 10.0,
                        "speculative or offloaded did not run"))
    r = results.get("fits")
    default = _ok(r, DEFAULT)
    for system in (s for s in all_systems() if s.startswith("hetero-")):
        row = _ok(r, system)
        found.append(_check(f"{system} decode vs transformers default (>= 0.95: at most 5% slower)", "fits",
                            _ratio(row, default, "decode_tok_s"), 0.95, "it or the default cache did not run"))
        found.append(_check(f"{system} first token vs transformers default (default time / its time)", "fits",
                            _ratio(row, default, "ttft_s", invert=True), 0.95, "it or the default cache did not run"))
    r = results.get("beyond-ram")
    for system in (s for s in all_systems() if s.startswith("hetero-")):
        row = None if r is None else next((x for x in r["rows"] if x["system"] == system), None)
        value = None if row is None else float(row["status"] == "ok")
        found.append(_check(f"{system} completes (1 = yes)", "beyond-ram", value, 1.0,
                            "not run" if row is None else ""))
    return found


def _bytes(n) -> str:
    if not n:
        return "0"
    return f"{n / GiB:.2f} GiB" if n >= GiB / 4 else f"{n / 2**20:.1f} MiB"


def _num(x, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def workload_table(result: dict) -> list[str]:
    c, m = result["ceilings"], result["machine"]
    ceilings = ", ".join(f"{k.removesuffix('_gbs')} {v:.1f} GB/s" for k, v in c.items() if k.endswith("_gbs") and v is not None)
    if "sources" in c:
        ceilings += f" (disk: {c['sources']['disk_read_gbs']})"
    lines = [
        f"### {result['workload']} ({result['scale']})", "", result["description"], "",
        (f"Machine: {m['device']}, {m['cpu_cores']} cores, {m['ram_gib']:.0f} GiB RAM" if m else "Machine: not recorded")
        + f"; {result['date']}; `{result['command']}`", "",
        "Ceilings (this run): " + (ceilings or "none measured (no system finished)"), "",
        "| system | context x batch | status | prefill s | first token s | decode tok/s | ms/step | PCIe to GPU /step "
        "| to host /step | CPU reads /step | SSD reads /step | peak GPU GiB | peak host RSS GiB | bound tok/s (by) "
        "| of bound | vs offloaded |",
        "|" + "---|" * 16,
    ]
    offloaded = {r["context"]: r for r in result["rows"] if r["system"] == OFFLOADED and r["status"] == "ok"}
    for r in result["rows"]:
        earlier = ""
        if r.get("from_earlier_call"):
            where = f" on {r['from_machine']}" if r.get("from_machine") else ""
            earlier = f" (from the call of {r['from_earlier_call']}{where})"
        head = f"| {r['system']}{earlier} | {r['context']} x {r['batch']} | "
        if r["status"] != "ok":
            lines.append(head + f"{r['status']}: {r['reason']} |" + " |" * 13)
            continue
        b, bound = r["bytes_per_step"], r.get("bound")
        mark = "" if r["system"].startswith("hetero-") else " (est.)"
        vs = _ratio(r, offloaded.get(r["context"]), "decode_tok_s")
        lines.append(
            head + f"ok | {r['prefill_s']:.2f} | {r['ttft_s']:.2f} | {r['decode_tok_s']:.2f} | {r['step_ms']:.1f} | "
            f"{_bytes(b['pcie_h2d'])}{mark} | {_bytes(b['pcie_d2h'])}{mark} | {_bytes(b['cpu_read'])} | "
            f"{_bytes(b['ssd_read'])} | {_num(r['peak_gpu_gib'], '.2f')} | {r['peak_host_rss_gib']:.2f} | "
            + (f"{r['bound_tok_s']:.2f} ({bound['limited_by']}) | {r['ratio_to_bound']:.0%} | " if bound else "- | - | ")
            + (f"{vs:.2f}x |" if vs else "- |")
        )
    lines += ["", "Bytes per step: hetero's are measured by its cache's counters; transformers' are estimated from "
              "the KV size (the offloaded cache copies every layer's KV to the GPU and back each step). The bound "
              "is the slowest pipe: (weights + KV) / HBM, PCIe bytes / PCIe (or PCIe and CPU bytes / their sum when "
              "the CPU attends, measured at once where the run measured them: the copies read host memory too), "
              "SSD bytes / disk.", ""]
    return lines


def markdown(results: dict[str, dict]) -> str:
    lines = ["# hetero benchmark suite", ""]
    for result in results.values():
        lines += workload_table(result)
    lines += ["## The bar", "", "| check | workload | value | target | result |", "|---|---|---|---|---|"]
    for c in checks(results):
        value = _num(c["value"], ".2f")
        result = c["result"] + (f" ({c['note']})" if c.get("note") and c["result"] == "not measured" else "")
        lines.append(f"| {c['check']} | {c['workload']} | {value} | {c['target']:g} | {result} |")
    return "\n".join(lines) + "\n"


def print_checks(results: dict[str, dict]) -> None:
    print("\nthe bar:", flush=True)
    for c in checks(results):
        value = _num(c["value"], ".2f")
        print(f"  {c['result']:>12}  {c['check']} [{c['workload']}]: {value} (target {c['target']:g})", flush=True)
