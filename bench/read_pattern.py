"""The CPU kernel's read pattern without its math: how fast can it read, and with what help?

Reads the K and V rows of every (head, token) as `host_decode_attention` does (block table, units
of tokens of a head, a K row then its V row), summing them, on 4 KiB pages and on transparent huge
pages, with no software prefetch and with every line of the rows `distance` tokens ahead
prefetched into L1 or into L2; beside the streaming-read ceiling of the same run.

    python3 bench/read_pattern.py --out read_pattern.json
"""

from __future__ import annotations

import argparse
import sys

import numba
import torch

from bench_cpu_attention import bench_pattern, make_case, streaming_ceiling
from json_out import write_json
from hetero.storage.host_pool import huge_page_share

SETTINGS = ((0, 0), (16, 1), (32, 1), (64, 1), (16, 2), (32, 2), (64, 2), (128, 2))  # (distance, level)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args(argv)
    threads = numba.config.NUMBA_NUM_THREADS
    ceiling = streaming_ceiling(2.0, args.reps, threads)
    result = {"tokens": args.tokens, "threads": threads, "ceiling_gbps": ceiling, "gbps": {}, "pool_huge_page_share": {}}
    print(f"streaming-read ceiling {max(ceiling.values()):.1f} GB/s ({threads} threads)", flush=True)
    for pages, huge in (("4 KiB pages", False), ("huge pages", True)):
        _, pool, table = make_case(1, args.tokens, torch.bfloat16, Hq=32, Hkv=8, D=128, bs=256, huge_pages=huge)
        result["pool_huge_page_share"][pages] = share = huge_page_share(pool)
        print(f"{pages}: the pool's share on huge pages {'unknown' if share is None else f'{share:.0%}'}")
        for distance, level in SETTINGS:
            gbps = bench_pattern(pool, table, args.tokens, args.reps, threads, distance, level)["gbps"]
            name = f"{pages}, prefetch {distance} tokens ahead into L{level}" if distance else f"{pages}, no prefetch"
            result["gbps"][name] = gbps
            print(f"{name:<46}{gbps:7.1f} GB/s", flush=True)
        del pool
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
