"""Bytes each system moves per decode step on each path, and the step time the ceilings allow.

hetero's bytes are measured (its cache's counters between the first new token and the last);
transformers' are estimated from the KV size: the default cache reads the KV from HBM; the
offloaded cache copies every layer's whole KV to the GPU and back each step.
"""

from __future__ import annotations

PATHS = ("pcie_h2d", "pcie_d2h", "cpu_read", "ssd_read", "ssd_write", "hbm_read")
_COUNTERS = {"pcie_h2d": "bytes_to_gpu", "pcie_d2h": "bytes_to_host", "cpu_read": "bytes_read_by_cpu",
             "ssd_read": "bytes_from_ssd", "ssd_write": "bytes_to_ssd"}


def measured_step_bytes(before, after, steps: int, kv_total: int, weights: int) -> dict:
    """From two snapshots of hetero's counters (CacheStats or GenerationStats) around `steps` steps."""
    per = {path: (getattr(after, name) - getattr(before, name)) // max(1, steps) for path, name in _COUNTERS.items()}
    per["hbm_read"] = weights + kv_total  # estimated: attention reads every token from HBM once fetched
    return {"bytes": per, "source": "measured (hetero's cache counters); hbm_read estimated (weights + KV)"}


def estimated_step_bytes(system: str, kv_total: int, weights: int) -> dict:
    per = dict.fromkeys(PATHS, 0)
    per["hbm_read"] = weights + kv_total
    if system == "transformers-offloaded":
        per["pcie_h2d"] = per["pcie_d2h"] = kv_total
    return {"bytes": per, "source": "estimated from the KV size (no counters in transformers)"}


def step_bound(step_bytes: dict, ceilings: dict) -> dict | None:
    """The lower bound of a step: each pipe runs beside the others, so the slowest one bounds it.

    PCIe and the CPU's memory bandwidth count as one pipe of their summed width when the CPU reads
    part of the KV: "pcie+cpu", the issue's prediction KV / (PCIe + CPU), from each ceiling probed
    alone. The copies read host memory too, so the two pipes narrow each other: "pcie+cpu at once"
    sums the two as measured running together (PCIe beside every core's reads, and those reads beside
    the copies), where the run measured them. None without a GPU's ceilings."""
    b = step_bytes["bytes"]
    pcie, cpu, hbm, disk = (ceilings.get(k) for k in ("pcie_h2d_gbs", "cpu_stream_gbs", "hbm_gbs", "disk_read_gbs"))
    if pcie is None or hbm is None:
        return None
    terms = {"hbm": b["hbm_read"] / (hbm * 1e9)}
    if b["cpu_read"] and cpu:
        terms["pcie+cpu"] = (b["pcie_h2d"] + b["cpu_read"]) / ((pcie + cpu) * 1e9)
        pcie_at_once, cpu_at_once = ceilings.get("pcie_h2d_beside_cpu_gbs"), ceilings.get("cpu_stream_beside_pcie_gbs")
        if pcie_at_once and cpu_at_once:
            terms["pcie+cpu at once"] = (b["pcie_h2d"] + b["cpu_read"]) / ((pcie_at_once + cpu_at_once) * 1e9)
    elif b["pcie_h2d"]:
        terms["pcie"] = b["pcie_h2d"] / (pcie * 1e9)
    if b["ssd_read"] and disk:
        terms["ssd"] = b["ssd_read"] / (disk * 1e9)
    limited_by = max(terms, key=terms.get)
    return {"seconds": terms[limited_by], "limited_by": limited_by, "terms_s": terms}
