"""Where a decode step's time goes: torch's profiler over decode steps only (no prefill), per mode.

    python bench/profile_decode.py --mode speculative --context 32768 --gpu-kv-bytes 1GiB --out prof.json
    python bench/profile_decode.py --tiny --mode speculative            # a CPU check of the script
    python bench/profile_decode.py --mode split --python --context 32768  # Python functions (cProfile)

An 8B-class Llama (random bf16 weights; `--tiny`: a small one on the CPU) prefills `--context`
tokens, then decodes; the profiler records `--steps` decode steps after `--skip` warm ones, and
prints the operators that take the most host time and the most device time, with the step time
beside the same model's plain transformers forward time when the KV fits (`--baseline`).
"""

from __future__ import annotations

import argparse
import cProfile
import math
import os
import pstats
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile, schedule

import hetero
from hetero.bench_cli import parse_overrides

sys.path.insert(0, os.path.dirname(__file__))
from json_out import write_json  # noqa: E402
from suite.model import build_random_model, llama_8b_config, random_prompt, tiny_llama_config  # noqa: E402


def profile_decode(model, ids, config: dict, steps: int, skip: int, rows: int) -> dict:
    """Profile `steps` decode steps of one generate call; returns the step times and top operators."""
    hetero.prepare(model, config)
    chunks = math.ceil(ids.shape[1] / hetero.OffloadConfig.from_dict(config).prefill_chunk_tokens)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if ids.is_cuda else [])
    # The cache reports each forward's layer 0 (every prefill chunk, then every decode step): one profiler step each.
    with profile(activities=activities, schedule=schedule(wait=chunks + skip, warmup=1, active=steps, repeat=1)) as prof:
        stamps = []

        def step(_tokens):
            stamps.append(time.perf_counter())
            prof.step()

        model.hetero.progress = step
        new = skip + steps + 3
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False)
        model.hetero.progress = None
    decode = stamps[chunks:]
    per_step = [b - a for a, b in zip(decode, decode[1:])]
    table = prof.key_averages()
    device_key = "self_device_time_total" if ids.is_cuda else "self_cpu_time_total"

    def top(key):
        ranked = sorted(table, key=lambda e: getattr(e, key, 0), reverse=True)[:rows]
        return [{"name": e.key, "calls": e.count, "self_cpu_ms": e.self_cpu_time_total / 1e3,
                 "self_device_ms": getattr(e, "self_device_time_total", 0) / 1e3} for e in ranked]

    stats = model.hetero.last_stats
    return {
        "config": config, "context": ids.shape[1], "batch": ids.shape[0], "profiled_steps": steps,
        "step_ms_median": 1e3 * sorted(per_step)[len(per_step) // 2] if per_step else None,
        "decode_tokens_per_s": stats.decode_tokens_per_s, "summary": stats.summary(),
        "kernel_launches_per_step": sum(e.count for e in table if e.key in ("cudaLaunchKernel", "cuLaunchKernelEx")) / steps,
        "torch_ops_per_step": sum(e.count for e in table if e.key.startswith("aten::")) / steps,
        "top_host": top("self_cpu_time_total"), "top_device": top(device_key),
    }


def profile_python(model, ids, config: dict, steps: int, skip: int, rows: int) -> dict:
    """cProfile over `steps` decode steps: where the Python time goes, which in `split` mode lies
    between a layer's CPU part and the next one's. From Python 3.12 cProfile sees every thread (the
    host worker's jobs too, their Numba calls as the caller's own time); before, the calling one."""
    hetero.prepare(model, config)
    chunks = math.ceil(ids.shape[1] / hetero.OffloadConfig.from_dict(config).prefill_chunk_tokens)
    profiler = cProfile.Profile()
    stamps = []

    def step(_tokens):
        stamps.append(time.perf_counter())
        if len(stamps) == chunks + skip:
            profiler.enable()
        elif len(stamps) == chunks + skip + steps:
            profiler.disable()

    model.hetero.progress = step
    new = skip + steps + 3
    with torch.no_grad():
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new, do_sample=False)
    model.hetero.progress = None
    stats = pstats.Stats(profiler)
    total = sum(row[2] for row in stats.stats.values())  # tottime over every function

    def top(index):
        ranked = sorted(stats.stats.items(), key=lambda kv: kv[1][index], reverse=True)[:rows]
        return [{"name": f"{os.path.basename(f)}:{line}({fn})", "calls": v[1], "self_ms": v[2] * 1e3 / steps,
                 "cumulative_ms": v[3] * 1e3 / steps} for (f, line, fn), v in ranked]

    result = {"config": config, "context": ids.shape[1], "batch": ids.shape[0], "profiled_steps": steps,
              "profiled_ms_per_step": total * 1e3 / steps, "summary": model.hetero.last_stats.summary(),
              "top_self": top(2), "top_cumulative": top(3)}
    print(result["summary"])
    print(f"profiled: {result['profiled_ms_per_step']:.1f} ms per step of function time under cProfile (which slows "
          "Python; waits count as the waiting function's time)")
    for title, key in (("self", "top_self"), ("cumulative", "top_cumulative")):
        print(f"\ntop functions by {title} time, per step:")
        for row in result[key]:
            print(f"  {row['self_ms']:8.2f} ms self {row['cumulative_ms']:8.2f} ms cum {row['calls'] // steps:6d} calls/step  "
                  f"{row['name'][:80]}")
    return result


def print_operators(result: dict, steps: int, device: torch.device) -> None:
    print(result["summary"])
    print(f"decode step {result['step_ms_median']:.1f} ms (median of the profiled ones), "
          f"{result['torch_ops_per_step']:.0f} torch operators and {result['kernel_launches_per_step']:.0f} "
          "kernel launches per step")
    tables = (("host time", "top_host"),) + ((("device time", "top_device"),) if device.type == "cuda" else ())
    for title, key in tables:
        print(f"\ntop operators by self {title} over {steps} steps:")
        for row in result[key]:
            print(f"  {row['self_cpu_ms']:9.2f} ms host {row['self_device_ms']:9.2f} ms device "
                  f"{row['calls']:7d} calls  {row['name'][:70]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", default="speculative", help="stream | split | speculative")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--gpu-kv-bytes", default="1GiB", help="small enough that the KV goes to the host")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more offload keys, e.g. --set verify_share=0 (values read as JSON when they parse)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--skip", type=int, default=2, help="decode steps before the profiled ones")
    parser.add_argument("--rows", type=int, default=25)
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU (checks the script)")
    parser.add_argument("--python", action="store_true", help="cProfile the host thread's Python instead")
    parser.add_argument("--out", help="JSON file")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    model = build_random_model(tiny_llama_config() if args.tiny else llama_8b_config(), device)
    ids = random_prompt(model.config.vocab_size, args.batch, args.context, device)
    config = {"mode": args.mode, "gpu_kv_bytes": args.gpu_kv_bytes}
    if args.tiny:
        config.update(block_size=16, sink_tokens=16, window_tokens=32, prefill_chunk_tokens=256)
    config.update(parse_overrides(args.set))
    if args.python:
        result = profile_python(model, ids, config, args.steps, args.skip, args.rows)
    else:
        result = profile_decode(model, ids, config, args.steps, args.skip, args.rows)
        print_operators(result, args.steps, device)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
