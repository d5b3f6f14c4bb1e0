"""The CPU kernel against its ceiling and its peer, round by round.

Each round times, back to back, the streaming-read ceiling (`bench_cpu_attention.streaming_ceiling`,
the fastest of its reads), the kernel (default knobs), its read pattern without math, and torch's CPU
SDPA in bfloat16 on the same tokens; each round's ratios compare reads made seconds apart. On the GPU
machine's host, memory speed moved by a fifth within one run and by a half between calls, so a
ceiling measured once at a run's start is a poor divisor. Reports each round and the median ratios.
Variants join each round, each reported as its ratio to the default's figure of that round (the
kernel's; for the reads on 4 KiB pages, the default pool's reads): `--small-pages` (the kernel and
its reads over a copy of the pool on 4 KiB pages) and `--knobs NAME=VALUE,...` (knobs of
`cpu_kernels.attention`, once per option).

    python3 bench/kernel_rounds.py --batches 1 4 --rounds 5 --out kernel_rounds.json
    python3 bench/kernel_rounds.py --small-pages --knobs UNITS_PER_THREAD=4 --knobs PREFETCH_NEXT_TILE=1
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numba
import torch

from bench_cpu_attention import bench_kernel, bench_pattern, bench_sdpa, logical_kv, make_case, streaming_ceiling
from json_out import write_json
from hetero.bench_cli import knobs_set, parse_key_values
from hetero.cpu_kernels import attention, warmup
from hetero.storage.host_pool import huge_page_share

SPIN_DOWN_S = 0.5  # torch's CPU threads spin a while after its SDPA; the next round's reads wait that out


def one_round(q, pool, table, k, v, tokens, reps, sdpa_reps, ceiling_gib, threads, small_pages=None, knob_sets=()):
    ceiling = streaming_ceiling(ceiling_gib, reps, threads)
    kernel = bench_kernel(q, pool, table, tokens, reps, threads)
    pattern = bench_pattern(pool, table, tokens, reps, threads)
    variants = {}  # name -> (GB/s, the default's GB/s it is set against: the kernel's, or its reads')
    if small_pages is not None:
        variants["kernel, 4 KiB pages"] = bench_kernel(q, small_pages, table, tokens, reps, threads)["gbps"], kernel["gbps"]
        variants["reads, 4 KiB pages"] = bench_pattern(small_pages, table, tokens, reps, threads)["gbps"], pattern["gbps"]
    for name, knobs in knob_sets:
        with knobs_set({f"{attention.__name__}.{knob}": value for knob, value in knobs.items()}):
            variants[name] = bench_kernel(q, pool, table, tokens, reps, threads)["gbps"], kernel["gbps"]
    sdpa = bench_sdpa(q, k, v, sdpa_reps)
    time.sleep(SPIN_DOWN_S)
    best = max(ceiling.values())
    return {"ceiling_gbps": ceiling, "ceiling_best_gbps": best, "kernel_gbps": kernel["gbps"],
            "same_reads_gbps": pattern["gbps"], "sdpa_bf16_gbps": sdpa["gbps"], "of_ceiling": kernel["gbps"] / best,
            "of_same_reads": kernel["gbps"] / pattern["gbps"], "vs_sdpa_bf16": sdpa["ms"] / kernel["ms"],
            "variants_gbps": {name: gbps for name, (gbps, _) in variants.items()},
            "variants_against_default": {name: gbps / default for name, (gbps, default) in variants.items()}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--sdpa-reps", type=int, default=2)
    p.add_argument("--ceiling-gib", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--small-pages", action="store_true", help="also the kernel and its reads on 4 KiB pages")
    p.add_argument("--knobs", action="append", default=[], metavar="NAME=VALUE,...",
                   help="also the kernel with these knobs of cpu_kernels.attention (repeatable)")
    p.add_argument("--out")
    args = p.parse_args(argv)
    knob_sets = [(text, parse_key_values(text.split(","), "--knobs", "UNITS_PER_THREAD=4")) for text in args.knobs]
    for _, knobs in knob_sets:
        for knob in knobs:
            if not hasattr(attention, knob):
                p.error(f"--knobs: cpu_kernels.attention has no knob {knob}")
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    warmup(("bfloat16",))
    result = {"args": vars(args), "batches": {}}
    for B in args.batches:
        q, pool, table = make_case(B, args.tokens, torch.bfloat16, Hq=32, Hkv=8, D=128, bs=256)
        k, v = logical_kv(pool, table, args.tokens)
        small = make_case(B, args.tokens, torch.bfloat16, Hq=32, Hkv=8, D=128, bs=256, huge_pages=False)[1] \
            if args.small_pages else None
        rounds = []
        huge = huge_page_share(pool)
        print(f"batch {B}, {args.tokens} tokens, bfloat16, {args.threads} threads, pool on huge pages: "
              f"{'unknown' if huge is None else f'{huge:.0%}'}")
        print(f"{'round':>5}{'ceiling':>9}{'kernel':>8}{'reads':>8}{'sdpa':>7}{'of ceil':>9}{'of reads':>9}{'vs sdpa':>9}")
        for i in range(args.rounds):
            r = one_round(q, pool, table, k, v, args.tokens, args.reps, args.sdpa_reps, args.ceiling_gib, args.threads,
                          small, knob_sets)
            rounds.append(r)
            print(f"{i:>5}{r['ceiling_best_gbps']:>9.1f}{r['kernel_gbps']:>8.1f}{r['same_reads_gbps']:>8.1f}"
                  f"{r['sdpa_bf16_gbps']:>7.1f}{r['of_ceiling']:>9.0%}{r['of_same_reads']:>9.0%}{r['vs_sdpa_bf16']:>8.1f}x"
                  + "".join(f"  {name} {gbps:.1f}" for name, gbps in r["variants_gbps"].items()), flush=True)
        median = {key: statistics.median(r[key] for r in rounds)
                  for key in ("ceiling_best_gbps", "kernel_gbps", "same_reads_gbps", "sdpa_bf16_gbps", "of_ceiling",
                              "of_same_reads", "vs_sdpa_bf16")}
        print(f"median: kernel {median['kernel_gbps']:.1f} GB/s, {median['of_ceiling']:.0%} of the ceiling "
              f"({median['ceiling_best_gbps']:.1f}), {median['of_same_reads']:.0%} of its reads without math, "
              f"{median['vs_sdpa_bf16']:.1f}x torch's SDPA bf16", flush=True)
        against = {name: statistics.median(r["variants_against_default"][name] for r in rounds)
                   for name in rounds[0]["variants_against_default"]}
        for name, ratio in against.items():
            print(f"median: {name} {ratio:.3f}x the default's in its round")
        result["batches"][str(B)] = {"rounds": rounds, "median": median, "variants_against_default": against,
                                     "pool_huge_page_share": huge,
                                     "small_pages_huge_page_share": None if small is None else huge_page_share(small)}
        del pool, k, v, small
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
