"""Decode step times of several offload configs on one model and prompt, side by side, beside the
PCIe bound of each step's measured traffic.

    python bench/step_times.py --context 131072 --gpu-kv-bytes 4GiB \
        --variants stream split split:cpu_part_wait=gpu --out steps.json
    python bench/step_times.py --tiny --variants stream split     # a CPU check of the script

An 8B-class Llama (random bf16 weights; `--tiny`: a small one on the CPU) prefills `--context`
tokens once per variant, then decodes `--steps` tokens; each variant is a mode with optional
`key=value` overrides; a key naming a module's attribute (`hetero.cache.LOOK_PAST_STEP_END=false`)
sets that tuning knob for the variant alone. `--sync-each-token` synchronizes the device at each
token as `hetero bench` does. `--hang-s` dumps every thread's stack and exits if a variant has not
finished within that many seconds (a stalled pipeline shows where each thread waits);
`--stall-dump-s` dumps them, once per variant, when a decode step has run that long, and goes on.
With `--sync-each-token` each variant also records its steps as the suite counts them, from one
token's streamer call to the next (`token_step_ms`: the first one includes what runs before the first
decode step's first cache update, `token_to_update_ms`); `--profile-first-gap` lists the functions
that took that first stretch (cProfile), where the first decode step's one-time costs show.
A variant that fails is recorded with its error, the others still run, and the script exits 1.
"""

from __future__ import annotations

import argparse
import cProfile
import faulthandler
import json
import os
import pstats
import statistics
import sys
import threading
import time

import torch

import hetero
from hetero.bench_cli import knobs_set, parse_key_values

sys.path.insert(0, os.path.dirname(__file__))
from suite.ceilings import pinned_h2d_bytes_per_s  # noqa: E402
from suite.measure import TokenClock  # noqa: E402
from suite.runner import _capture_cache_stats  # noqa: E402
from suite.model import build_random_model, llama_8b_config, random_prompt, tiny_llama_config  # noqa: E402

TINY = {"block_size": 16, "sink_tokens": 16, "window_tokens": 32, "prefill_chunk_tokens": 64}


def parse_variant(text: str) -> tuple[str, dict]:
    """"split:cpu_part_wait=gpu,split_ratio=0.5" -> ("split:...", {"mode": "split", ...}); numbers parsed."""
    mode, _, rest = text.partition(":")
    settings = parse_key_values(filter(None, rest.split(",")), f"variant {text!r}", "split:split_ratio=0.5")
    return text, {"mode": mode, **settings}


class StallWatch:
    """Dumps every thread's stack to stderr, and what `describe()` says, once, when no decode token
    has come for `seconds`."""

    def __init__(self, seconds: float, describe=lambda: ""):
        self.seconds, self.last, self.done, self.describe = seconds, None, threading.Event(), describe
        if seconds > 0:
            threading.Thread(target=self._watch, daemon=True).start()

    def token(self) -> None:
        self.last = time.perf_counter()

    def _watch(self) -> None:
        while not self.done.wait(self.seconds / 10):
            if self.last is not None and time.perf_counter() - self.last > self.seconds:
                print(f"--- no decode token for {self.seconds} s: every thread's stack ---", file=sys.stderr, flush=True)
                faulthandler.dump_traceback(sys.stderr, all_threads=True)
                print(self.describe(), file=sys.stderr, flush=True)
                return

    def stop(self) -> None:
        self.done.set()


def run_variant(model, ids, config: dict, steps: int, sync_each_token: bool = False, stall_dump_s: float = 0,
                profile_first_gap: bool = False) -> dict:
    knobs = {k: v for k, v in config.items() if "." in k}
    with knobs_set(knobs):
        return _run_variant(model, ids, {k: v for k, v in config.items() if k not in knobs}, steps, sync_each_token,
                            stall_dump_s, profile_first_gap) | {"config": config}


def _run_variant(model, ids, config: dict, steps: int, sync_each_token: bool, stall_dump_s: float,
                 profile_first_gap: bool) -> dict:
    hetero.prepare(model, config)
    gap_profile = cProfile.Profile() if profile_first_gap else None
    # As `hetero bench` times tokens: a streamer that synchronizes the device at each one.
    clock = TokenClock(device=ids.device, on_first_token=gap_profile and gap_profile.enable)
    extra = {"streamer": clock} if sync_each_token or profile_first_gap else {}
    stamps, snapshot = [], {}
    at_first_token = _capture_cache_stats(model, snapshot)

    made, live = model.hetero.new_cache, []
    model.hetero.new_cache = lambda max_tokens: live.append(made(max_tokens)) or live[-1]
    watch = StallWatch(stall_dump_s, lambda: live[-1].pipeline.mailbox_report() if live else "")

    def progress(tokens):
        stamps.append((tokens, time.perf_counter()))
        if tokens > ids.shape[1]:
            watch.token()
        if tokens == ids.shape[1] + 1:
            if gap_profile is not None:
                gap_profile.disable()
            at_first_token()  # decode traffic only: the counters from here to the end

    model.hetero.progress = progress
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=steps, min_new_tokens=steps,
                           do_sample=False, **extra)
    finally:
        watch.stop()
        model.hetero.progress = None
    stats = model.hetero.last_stats
    decode = [t for tokens, t in stamps if tokens > ids.shape[1]]
    step_ms = [1e3 * (b - a) for a, b in zip(decode, decode[1:])]
    first = snapshot["stats"].bytes_to_gpu if snapshot else 0
    row = {"config": config, "step_ms": step_ms, "summary": stats.summary(),
           "pcie_bytes_per_step": (stats.bytes_to_gpu - first) / max(1, stats.new_tokens - 1),
           "pcie_bytes_with_prefill": stats.bytes_to_gpu}
    if extra:
        # As the suite times steps: from each token's streamer call (the device synchronized) to the
        # next; and from each token's call to the next decode step's first cache update.
        puts = clock.times[1:]
        row["token_step_ms"] = [1e3 * (b - a) for a, b in zip(puts, puts[1:])]
        row["token_to_update_ms"] = [1e3 * (u - p) for p, u in zip(puts, decode)]
    if gap_profile is not None:
        row["first_gap_functions"] = _top_functions(gap_profile, 20)
    return row


def _top_functions(profiler: cProfile.Profile, rows: int) -> list[str]:
    """The functions with the most cumulative time, as "ms  file:line(name)"."""
    stats = pstats.Stats(profiler).stats
    ranked = sorted(stats.items(), key=lambda kv: kv[1][3], reverse=True)[:rows]
    return [f"{v[3] * 1e3:8.2f} ms cum {v[2] * 1e3:8.2f} ms self  {os.path.basename(f)}:{line}({fn})"
            for (f, line, fn), v in ranked]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--gpu-kv-bytes", default="1GiB")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--variants", nargs="+", default=["stream", "split"])
    parser.add_argument("--hang-s", type=float, default=0, help="dump stacks and exit after this long per variant")
    parser.add_argument("--stall-dump-s", type=float, default=0, help="dump stacks once when a decode step runs this long")
    parser.add_argument("--sync-each-token", action="store_true", help="synchronize the device at each token, as the suite does")
    parser.add_argument("--profile-first-gap", action="store_true",
                        help="cProfile from the first new token's streamer call to the first decode step's first cache update")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    model = build_random_model(tiny_llama_config() if args.tiny else llama_8b_config(), device)
    context = 256 if args.tiny else args.context
    ids = random_prompt(model.config.vocab_size, 1, context, device)
    pcie = pinned_h2d_bytes_per_s() if device.type == "cuda" else None
    results = {"context": context, "device": str(device), "pcie_h2d_gbs": pcie and pcie / 1e9, "variants": {}}
    print(f"{context} tokens x 1 on {device}" + (f"; PCIe host-to-GPU {pcie / 1e9:.1f} GB/s" if pcie else ""))
    print(f"{'variant':40s} {'median ms/step':>14s} {'PCIe bound ms':>13s}  steps ms")
    for name, config in map(parse_variant, args.variants):
        runs = sum(1 for v in results["variants"] if v == name or v.startswith(f"{name} (run "))
        name = f"{name} (run {runs + 1})" if runs else name  # a variant given twice (A/B/A/B) keeps both rows
        base = {**(TINY if args.tiny else {}), "gpu_kv_bytes": "256KiB" if args.tiny else args.gpu_kv_bytes}
        if args.hang_s:
            faulthandler.dump_traceback_later(args.hang_s, exit=True)
        try:
            row = run_variant(model, ids, {**base, **config}, args.steps, args.sync_each_token, args.stall_dump_s,
                              args.profile_first_gap)
        except Exception as error:  # e.g. a GPU wait for a host job gave up: the other variants still run
            results["variants"][name] = {"config": config, "error": str(error)}
            print(f"{name:40s} failed: {error}", flush=True)
            continue
        finally:
            faulthandler.cancel_dump_traceback_later()
        # The first step loads kernels and fills the pipeline: the median of the rest.
        median = statistics.median(row["step_ms"][1:] or row["step_ms"])
        bound = 1e3 * row["pcie_bytes_per_step"] / pcie if pcie else None
        row["median_step_ms"], row["pcie_bound_ms"] = median, bound
        results["variants"][name] = row
        print(f"{name:40s} {median:14.1f} {bound or float('nan'):13.1f}  {[round(s, 1) for s in row['step_ms']]}\n"
              f"    {row['summary']}", flush=True)
        if "token_step_ms" in row:
            print(f"    token to token ms {[round(s, 1) for s in row['token_step_ms']]}; token to the next step's "
                  f"first update ms {[round(s, 1) for s in row['token_to_update_ms']]}", flush=True)
        for line in row.get("first_gap_functions", []):
            print(f"      {line}", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if any("error" in row for row in results["variants"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
