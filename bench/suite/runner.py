"""Run one workload: build the model, measure the ceilings, run each system on the same prompt,
and write the rows (merged with rows of the same workload from earlier calls) as JSON."""

from __future__ import annotations

import contextlib
import datetime
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch

import hetero

from . import systems as sy
from .ceilings import measure_ceilings
from .measure import HostMemoryPeak, Progress, TokenClock, free_memory, peak_gpu_bytes, synchronize
from .model import build_random_model, kv_bytes, llama_8b_config, random_prompt, tiny_llama_config, weight_bytes
from .traffic import estimated_step_bytes, measured_step_bytes, step_bound
from .workloads import Workload

GiB = 2**30


@contextlib.contextmanager
def gpu_card(device: torch.device, card_bytes: int | None):
    """Cap this process's GPU memory to `card_bytes`, emulating a smaller card, for the block."""
    if card_bytes is None or device.type != "cuda":
        yield
        return
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, card_bytes / total), index)
    try:
        yield
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, index)


def run_workload(workload: Workload, system_names: list[str], device: torch.device, *, attempt_oom: bool = False,
                 ssd_dir: str | None = None, command: str = "", save=None, date: str | None = None,
                 overrides: dict | None = None) -> dict:
    """Run every system on every context of `workload`; `save(result)` after each row, so that a run
    stopped at its time limit keeps the rows it finished. `date` names the call the rows belong to
    (the parent's, when each system runs in a process of its own)."""
    tiny = workload.scale == "tiny"
    model_config = tiny_llama_config() if tiny else llama_8b_config()
    print(f"== {workload.name} ({workload.scale}: {'/'.join(map(str, workload.contexts))} tokens x {workload.batch}, "
          f"{workload.decode_steps} decode steps): {workload.description}", flush=True)
    started = time.perf_counter()
    model = build_random_model(model_config, device)
    original_generate = model.generate  # before hetero.prepare wraps it
    print(f"  model built in {time.perf_counter() - started:.1f} s; measuring ceilings", flush=True)
    ceilings = measure_ceilings(device, cpu_array_bytes=(64 if tiny else 2048) * 2**20)
    print("  ceilings: " + ", ".join(f"{k} {v:.1f}" for k, v in ceilings.items() if isinstance(v, float)), flush=True)
    result = {
        "workload": workload.name, "description": workload.description, "scale": workload.scale,
        "context": workload.context, "batch": workload.batch, "decode_steps": workload.decode_steps,
        "ceilings": ceilings, "machine": machine(device), "command": command,
        "date": date or now(), "wall_s": 0.0, "rows": [],
    }
    with tempfile.TemporaryDirectory(prefix="hetero-bench-ssd-", dir=ssd_dir) as ssd, gpu_card(device, workload.gpu_card_bytes):
        for context in workload.contexts:
            ids = random_prompt(model_config.vocab_size, workload.batch, context, device)
            for system in system_names:
                row = run_system(system, model, original_generate, ids, workload, ceilings, device, tiny,
                                 attempt_oom, ssd, overrides)
                result["rows"].append(row)
                add_agreement(result["rows"])
                result["wall_s"] = time.perf_counter() - started
                if save is not None:
                    save(result)
    del model, original_generate
    free_memory(device)
    return result


def run_system(system, model, original_generate, ids, workload, ceilings, device, tiny, attempt_oom, ssd_dir,
               overrides: dict | None = None) -> dict:
    batch, context = ids.shape
    row = {"system": system, "context": context, "batch": batch, "decode_steps": workload.decode_steps}
    skip = sy.skip_reason(system, workload, context, model, device, attempt_oom, ssd_dir)
    if skip is not None:
        row["status"], row["reason"] = skip
        print(f"  {system}: {row['status']}: {row['reason']}", flush=True)
        return row
    free_memory(device)
    print(f"  {system}: {context} tokens x {batch}, {workload.decode_steps} decode steps", flush=True)
    mode = sy.hetero_mode(system)
    try:
        if mode:
            config = sy.offload_config(mode, workload, context, model.config, tiny, ssd_dir)
            hetero.prepare(model, {**config, **(overrides or {})})
            generate = model.generate
        else:
            model.set_attn_implementation("sdpa")
            generate = original_generate
        row.update(_timed_generate(system, model, generate, ids, workload, context, tiny, device))
        row["status"] = "ok"
    except torch.cuda.OutOfMemoryError as exc:
        row["status"], row["reason"] = "oom", "out of GPU memory: " + str(exc).splitlines()[0][:200]
    except Exception as exc:  # a failing system is a result of the benchmark, not the end of it
        row["status"], row["reason"] = "error", f"{type(exc).__name__}: {exc}"[:500]
    free_memory(device)
    if row["status"] != "ok":
        print(f"  {system}: {row['status']}: {row['reason']}", flush=True)
        return row
    kv = kv_bytes(model.config, batch, context)
    weights = weight_bytes(model)
    if mode:
        traffic = measured_step_bytes(row.pop("_stats_at_first_token"), model.hetero.last_stats, workload.decode_steps,
                                      kv, weights)
        row["hetero_stats"] = model.hetero.last_stats.to_dict()
        row["ssd_share_of_kv"] = model.hetero.last_stats.ssd_kv_bytes / kv
        row["offload_config"] = model.hetero.config.to_dict()
    else:
        traffic = estimated_step_bytes(system, kv, weights)
    row["bytes_per_step"], row["bytes_source"] = traffic["bytes"], traffic["source"]
    row["kv_bytes"] = kv
    bound = step_bound(traffic, ceilings)
    row["bound"] = bound
    row["ceilings_gbs"] = {k: v for k, v in ceilings.items() if k.endswith("_gbs")}
    row["bound_tok_s"] = batch / bound["seconds"] if bound else None
    row["ratio_to_bound"] = row["decode_tok_s"] / row["bound_tok_s"] if bound else None
    predicted = bound["terms_s"].get("pcie+cpu") if bound else None  # the KV / (PCIe + CPU)
    row["ratio_to_split_prediction"] = row["decode_tok_s"] * predicted / batch if predicted else None
    settled = row.get("steps_ms", [])[2:]  # past the first decode step and the one the share is tuned after
    row["settled_step_ms"] = statistics.median(settled) if settled else None
    print(f"  {system}: prefill {row['prefill_s']:.2f} s, first token {row['ttft_s']:.2f} s, decode "
          f"{row['decode_tok_s']:.2f} tok/s" + (f" ({row['ratio_to_bound']:.0%} of its {bound['limited_by']} bound "
                                                 f"{row['bound_tok_s']:.2f})" if bound else "")
          + (f", {row['ratio_to_split_prediction']:.0%} of KV / (PCIe + CPU) probed alone, {batch / predicted:.2f}"
             if predicted and bound["limited_by"] != "pcie+cpu" else "")
          + (f"; the steps after the second: median {row['settled_step_ms']:.1f} ms "
             f"({1e3 * batch / row['settled_step_ms']:.2f} tok/s)" if settled else ""), flush=True)
    stats = row.get("hetero_stats") or {}
    if stats.get("split_cpu_bytes_per_s"):  # inside the pipeline, beside the ceilings probed alone
        print(f"  {system}: measured in decode: PCIe {stats['split_pcie_bytes_per_s'] / 1e9:.1f} GB/s, CPU attention "
              f"{stats['split_cpu_bytes_per_s'] / 1e9:.1f} GB/s, the CPU side waiting {1e3 * (stats.get('split_cpu_gap_s') or 0):.0f} "
              f"ms a step between parts for the host thread and idle {1e3 * (stats.get('split_cpu_idle_s') or 0):.0f} ms in "
              f"all (queries included); GPU share {stats['split_share_start']:.2f} at the start, {stats['split_share']:.2f} "
              f"after the tuning steps", flush=True)
    return row


def _timed_generate(system, model, generate, ids, workload, context, tiny, device) -> dict:
    steps = workload.decode_steps
    progress = Progress(system, ids.numel() // ids.shape[0], steps + 1)
    snapshot = {}
    on_first = None
    if sy.hetero_mode(system):
        on_first = _capture_cache_stats(model, snapshot)
    clock = TokenClock(progress.token, on_first, device)
    hook = model.register_forward_pre_hook(progress.forward_hook, with_kwargs=True)
    kwargs = sy.generate_kwargs(system, workload, context, tiny)
    free_memory(device)
    try:
        with HostMemoryPeak() as host, torch.no_grad():
            start = time.perf_counter()
            out = generate(ids, attention_mask=torch.ones_like(ids), streamer=clock, **kwargs)
            synchronize(device)
    finally:
        hook.remove()
        if sy.hetero_mode(system):
            del model.hetero.new_cache  # back to the class's method
    first, last = clock.times[1], clock.times[-1]
    stats = model.hetero.last_stats if sy.hetero_mode(system) else None
    result = {
        "prefill_s": stats.prefill_seconds if stats else first - start,
        "ttft_s": first - start,
        "decode_s": last - first,
        "decode_tok_s": ids.shape[0] * steps / (last - first),
        "step_ms": 1e3 * (last - first) / steps,
        "steps_ms": [1e3 * (b - a) for a, b in zip(clock.times[1:], clock.times[2:])],  # in order
        "peak_gpu_gib": _gib(peak_gpu_bytes(device)),
        "peak_host_rss_gib": host.peak / GiB,
        "new_tokens": out[:, context:].tolist(),
    }
    result["prefill_tok_s"] = ids.numel() / result["prefill_s"]
    if snapshot:
        result["_stats_at_first_token"] = snapshot["stats"]
    return result


def _capture_cache_stats(model, snapshot: dict):
    """Wrap the runtime's cache factory for one call so the first token can read the cache's counters:
    GenerationStats holds totals only, prefill traffic included."""
    runtime = model.hetero
    make = type(runtime).new_cache.__get__(runtime)
    caches = []

    def new_cache(max_tokens):
        caches.append(make(max_tokens))
        return caches[-1]

    runtime.new_cache = new_cache
    return lambda: snapshot.update(stats=caches[-1].stats)


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def add_agreement(rows: list[dict]) -> None:
    """Mark each row of this call with how many new tokens, from the first, every sequence shares
    with the first system of its context that ran (bf16 kernels differ: random weights make near
    ties, so a late divergence is no error). Rows kept from earlier calls take no part."""
    reference = {}
    for row in rows:
        tokens = row.get("new_tokens")
        if tokens is None or "from_earlier_call" in row:
            continue
        first = reference.setdefault(row["context"], (row["system"], tokens))
        if first[0] == row["system"]:
            continue
        same = 0
        for step in zip(*tokens, *first[1]):  # the sequences' tokens at each step, this row's then the first's
            if step[: len(tokens)] != step[len(tokens) :]:
                break
            same += 1
        row.update(agrees_with=first[0], agreeing_new_tokens=same)


def _gib(n):
    return None if n is None else n / GiB


def machine(device: torch.device) -> dict:
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "cpu": platform.processor() or platform.machine(), "cpu_cores": psutil.cpu_count(),
        "ram_gib": psutil.virtual_memory().total / GiB, "torch": torch.__version__,
        "transformers": __import__("transformers").__version__, "hetero": getattr(hetero, "__version__", None),
    }


def write_result(result: dict, out_dir: Path) -> Path:
    """Write out_dir/<workload>.json; rows of systems this call did not run are kept from the last file
    of the same workload and scale, so a workload can be run in several calls (--systems)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{result['workload']}.json"
    if path.exists():
        old = json.loads(path.read_text())
        ran = {r["system"] for r in result["rows"]}
        if old.get("scale") == result["scale"]:
            earlier = old.get("date") != result.get("date")  # else: this call's own last save
            device = old.get("machine", {}).get("device")
            other = device if device != result.get("machine", {}).get("device") else None

            def from_earlier(row: dict) -> dict:
                row = dict(row, from_earlier_call=row.get("from_earlier_call", old.get("date")))
                if other and "from_machine" not in row:
                    row["from_machine"] = other
                return row

            kept = [from_earlier(r) if earlier else r for r in old["rows"] if r["system"] not in ran]
            result = dict(result, rows=kept + result["rows"])
    path.write_text(json.dumps(result, indent=2))
    return path
