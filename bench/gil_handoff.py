"""How long a host job takes while another thread runs Python, at several interpreter switch intervals.

The `split` mode's host worker needs the GIL around each CPU-attention kernel (which releases it):
to start the job, to take the kernel's result and to post it. Meanwhile the host thread runs the
model's Python. CPython hands the GIL from a thread running Python to one that waits for it only
when the first blocks or after the switch interval (5 ms by default). This emulates the two: a
worker thread runs split's host job (`attend_host_blocks` over a few blocks) back to back while the
main thread alternates bursts of Python with sleeps, and reports the jobs that overlapped a burst
beside the same jobs alone, and how long the bursts took, for each interval.

    python3 bench/gil_handoff.py --out gil_handoff.json
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from hetero.cpu_kernels import set_threads, warmup
from hetero.host_attention import attend_host_blocks
from json_out import write_json


def _python_burst(steps: int) -> int:
    x = 0
    for i in range(steps):
        x += i
    return x


def _steps_for(seconds: float) -> int:
    """Steps of `_python_burst` that take about `seconds` on this thread alone."""
    steps = 10_000
    while True:
        started = time.perf_counter()
        _python_burst(steps)
        took = time.perf_counter() - started
        if took > 0.01:
            return max(1, int(steps * seconds / took))
        steps *= 4


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--intervals-ms", type=float, nargs="+", default=[5.0, 1.0, 0.2, 0.1, 0.05])
    p.add_argument("--burst-ms", type=float, default=20.0, help="the main thread's Python bursts (their length alone)")
    p.add_argument("--sleep-ms", type=float, default=60.0, help="its sleeps between them (GIL free)")
    p.add_argument("--jobs", type=int, default=300, help="jobs per interval")
    p.add_argument("--blocks", type=int, default=4, help="KV blocks (256 tokens, 8 kv heads, head_dim 128) a job reads")
    p.add_argument("--threads", type=int, default=1, help="the kernel's threads (leave a core to the main thread)")
    p.add_argument("--out", default="gil_handoff.json")
    args = p.parse_args(argv)
    set_threads(args.threads)
    warmup(("bfloat16",))
    slab = torch.randn(args.blocks, 2, 1, 8, 256, 128).to(torch.bfloat16)
    table = np.arange(args.blocks, dtype=np.int32)
    query = torch.randn(1, 32, 1, 128)

    def job():
        started = time.perf_counter()
        attend_host_blocks(query, slab, table, 0, args.blocks, 128 ** -0.5, None)
        return started, time.perf_counter()

    burst_steps = _steps_for(args.burst_ms / 1e3)
    found = sys.getswitchinterval()
    result = {"args": vars(args), "switch_interval_found_s": found, "intervals": {}}
    try:
        with ThreadPoolExecutor(1) as worker:
            alone = [end - start for start, end in (worker.submit(job).result() for _ in range(args.jobs // 4 + 1))]
            result["alone_ms"] = 1e3 * statistics.median(alone)
            print(f"job alone: median {result['alone_ms']:.2f} ms")
            for interval_ms in args.intervals_ms:
                sys.setswitchinterval(interval_ms / 1e3)
                bursts, stop = [], threading.Event()

                def main_thread_like():
                    while not stop.is_set():
                        started = time.perf_counter()
                        _python_burst(burst_steps)
                        bursts.append((started, time.perf_counter()))
                        time.sleep(args.sleep_ms / 1e3)

                runner = threading.Thread(target=main_thread_like)
                runner.start()
                try:
                    jobs = [worker.submit(job).result() for _ in range(args.jobs)]
                finally:
                    stop.set()
                    runner.join()
                met = [end - start for start, end in jobs if any(a < end and start < b for a, b in bursts)]
                row = {"jobs_meeting_a_burst": len(met),
                       "median_ms": 1e3 * statistics.median(met) if met else None,
                       "burst_ms": 1e3 * statistics.median(b - a for a, b in bursts) if bursts else None}  # alone: --burst-ms
                result["intervals"][str(interval_ms)] = row
                print(f"switch interval {interval_ms:5.2f} ms: {len(met):3d} jobs met a burst, median "
                      f"{row['median_ms'] or float('nan'):6.2f} ms; the bursts took {row['burst_ms'] or float('nan'):.1f} ms")
    finally:
        sys.setswitchinterval(found)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
