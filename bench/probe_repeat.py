"""The load-time CPU attention probe (hetero.bandwidth_probe.cpu_attention), repeated in one fresh
process: does its first figure, the one `split_ratio = "auto"` starts from, agree with the later ones?

    python3 bench/probe_repeat.py --repeats 6 --out probe_repeat.json
"""

from __future__ import annotations

import argparse
import time

import numba
import torch

from hetero import cpu_kernels
from hetero.bandwidth_probe import SCAN_BYTES, cpu_attention
from hetero.cache import KVLayout
from json_out import write_json


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=6)
    p.add_argument("--pause-s", type=float, default=0.3, help="sleep before the last probe")
    p.add_argument("--scan-mib", type=float, default=SCAN_BYTES / 2**20, help="KV each timed pass scans (the probe's)")
    p.add_argument("--out", default="probe_repeat.json")
    args = p.parse_args(argv)
    threads = max(1, numba.config.NUMBA_NUM_THREADS - 1)  # as split's "auto" cpu_threads
    cpu_kernels.set_threads(threads)
    cpu_kernels.warmup(("bfloat16",))
    layout = KVLayout(1, 1, 8, 128, 256, torch.bfloat16)  # an 8B Llama's layer, one sequence
    nbytes = int(args.scan_mib * 2**20)
    back_to_back = [cpu_attention(layout, 32, nbytes) / 1e9 for _ in range(args.repeats)]
    time.sleep(args.pause_s)
    after_pause = cpu_attention(layout, 32, nbytes) / 1e9
    print("probe GB/s, back to back:", " ".join(f"{x:.1f}" for x in back_to_back), f"| after {args.pause_s} s: {after_pause:.1f}")
    write_json(args.out, {"back_to_back_gbs": back_to_back, "after_pause_gbs": after_pause, "pause_s": args.pause_s, "scan_bytes": nbytes,
                          "threads": threads})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
