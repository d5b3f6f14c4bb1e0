"""Is the host's memory speed steady? A streaming read sampled read by read, beside the CPU time the
hypervisor stole each second, in a process that runs nothing else.

On the GPU machine, split's CPU parts read 19-45 GB/s in waves over seconds on some hosts and 57-77
on others (bench/results/split/README.md, 2026-12-02 fourth session). Run in a fresh process before
and after split: waves here too point at the host (other tenants' memory traffic, stolen CPU time),
a steady read at the process that ran split. With `--gap-ms` the reads come apart, as split's CPU
parts do (one layer's part, ~100 MiB at batch 1, then a wait for the next query): reads slower
with gaps than without would point at the threads' wake-up after a wait, which batch 4's four times
larger parts would feel less.

    python3 bench/host_noise.py --seconds 20 --out host_noise.json
    python3 bench/host_noise.py --seconds 20 --window-mib 100 --gap-ms 0.5 --out host_noise_gaps.json
"""

from __future__ import annotations

import argparse
import statistics
import time

import numba
import numpy as np

from bench_cpu_attention import _stream_sum
from json_out import write_json
from proc_stat import cpu_jiffies, jiffies_by_cpu, mean_by_cpu, most_stolen, steal_share, steal_share_by_cpu


def sample(a: np.ndarray, window: int, seconds: float, threads: int, gap_s: float = 0.0) -> tuple[list[dict], list[dict]]:
    """One read of `window` elements after another, cycling through `a` (far larger than the caches),
    `gap_s` apart, for `seconds`: each read's GB/s, and the steal share of each second, of all CPUs
    and of each (the kernel counts CPU time in ticks of 10 ms, too coarse for a read of a few
    milliseconds)."""
    found = numba.get_num_threads()
    numba.set_num_threads(threads)
    try:
        _stream_sum(a[:window], threads * 8)  # compiled, threads started
        windows = max(1, a.size // window)
        reads, seconds_steal, i = [], [], 0
        start = time.perf_counter()
        second_began, ticks, by_cpu = start, cpu_jiffies(), jiffies_by_cpu()
        while time.perf_counter() - start < seconds:
            part = a[(i % windows) * window:(i % windows + 1) * window]
            began = time.perf_counter()
            _stream_sum(part, threads * 8)
            ended = time.perf_counter()
            reads.append({"t_s": began - start, "gbs": part.nbytes / (ended - began) / 1e9})
            if ended - second_began >= 1.0:
                now, now_by_cpu = cpu_jiffies(), jiffies_by_cpu()
                seconds_steal.append({"t_s": second_began - start, "steal": steal_share(ticks, now),
                                      "by_cpu": steal_share_by_cpu(by_cpu, now_by_cpu)})
                second_began, ticks, by_cpu = ended, now, now_by_cpu
            i += 1
            if gap_s:
                time.sleep(gap_s)
    finally:
        numba.set_num_threads(found)
    return reads, seconds_steal


def summary(reads: list[dict], seconds_steal: list[dict]) -> dict:
    rates = sorted(r["gbs"] for r in reads)
    steals = [s["steal"] for s in seconds_steal if s["steal"] is not None]
    return {"reads": len(rates), "median_gbs": statistics.median(rates), "min_gbs": rates[0], "max_gbs": rates[-1],
            "p10_gbs": rates[len(rates) // 10], "p90_gbs": rates[len(rates) * 9 // 10],
            "mean_steal": statistics.fmean(steals) if steals else None, "max_steal": max(steals) if steals else None,
            "mean_steal_by_cpu": mean_by_cpu([s.get("by_cpu") for s in seconds_steal])}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--gib", type=float, default=2.0, help="the array read, cycled through window by window")
    p.add_argument("--window-mib", type=float, default=256.0, help="bytes read per sample")
    p.add_argument("--threads", type=int, default=None, help="default: every core Numba sees")
    p.add_argument("--gap-ms", type=float, default=0.0,
                   help="pause between reads: with a layer's worth a read (--window-mib 100), split's CPU parts "
                        "between which the threads wait for the next query")
    p.add_argument("--out", default="host_noise.json")
    args = p.parse_args(argv)
    threads = args.threads or numba.config.NUMBA_NUM_THREADS
    a = np.ones(int(args.gib * 2**30) // 4, np.float32)
    window = max(1, min(a.size, int(args.window_mib * 2**20) // 4))
    reads, seconds_steal = sample(a, window, args.seconds, threads, args.gap_ms / 1e3)
    s = summary(reads, seconds_steal)
    steal = "-" if s["mean_steal"] is None else f"{s['mean_steal']:.1%} (at most {s['max_steal']:.1%} in a second)"
    print(f"streaming read over {args.seconds:g} s, {threads} threads, {window * 4 / 2**20:.0f} MiB a read, "
          f"{args.gap_ms:g} ms apart: "
          f"{s['reads']} reads, median {s['median_gbs']:.1f} GB/s (p10 {s['p10_gbs']:.1f}, p90 {s['p90_gbs']:.1f}, "
          f"{s['min_gbs']:.1f}-{s['max_gbs']:.1f}); CPU time stolen {steal}; most stolen: {most_stolen(s['mean_steal_by_cpu'])}")
    write_json(args.out, {"threads": threads, "window_bytes": window * 4, "array_bytes": a.nbytes, "gap_s": args.gap_ms / 1e3,
                          "summary": s, "reads": reads, "steal_by_second": seconds_steal})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
