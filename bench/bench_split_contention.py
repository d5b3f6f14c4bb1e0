"""The CPU attention beside PCIe copies, as the `split` mode runs them: does one slow the other?

`split` assumes two separate pipes, host-to-GPU copies and the CPU's reads of host memory. In one
run on the GPU machine this times, for a host pool on 4 KiB pages and on transparent huge pages:
the Numba decode-attention kernel alone and while pinned host-to-GPU copies run (from a 4 GiB
source by default, beyond the last-level cache; at several thread counts, and called from a worker
thread as the pipeline calls it), the kernel's own read pattern with no math, and the
streaming-read ceiling, each beside the copies' rate in the same window.

    python bench/bench_split_contention.py --out contention.json
    python bench/bench_split_contention.py --sweep --out contention_sweep.json
    python bench/bench_split_contention.py --sweep --grid UNITS_PER_THREAD=2 --out contention_sweep.json

`--sweep` times instead the kernel's tuning knobs (`hetero.cpu_kernels.attention`: the prefetch of
the next tile, tokens per tile, units of work per thread, the hand-built bfloat16 loops) at the
thread count `split` uses (all cores but one), alone and beside the copies: `split` runs the kernel
beside the fetches' DMA, where the settings chosen alone may not be the best.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np
import torch

sys.path.insert(0, os.path.dirname(__file__))
from bench_cpu_attention import _pattern_sum, _stream_sum  # noqa: E402

from hetero.bench_cli import knobs_set, parse_key_values  # noqa: E402
from hetero.cpu_kernels import host_decode_attention, warmup  # noqa: E402
from hetero.storage.host_pool import HostPool  # noqa: E402

GiB = 2**30


class Copier:
    """Pinned host -> GPU copies queued for longer than a window of CPU work; the rate of those that
    landed inside it. Each copy moves the next `chunk` bytes of a source of `source_bytes`: a source
    that fits the host's last-level cache (300 MiB on the GPU machine) may be served from there,
    while split's fetches read KV from DRAM, beside the CPU's reads."""

    def __init__(self, source_bytes: int = 4 * GiB, chunk: int = GiB // 4):
        self.chunk = min(chunk, source_bytes)
        self.src = torch.empty(source_bytes // self.chunk * self.chunk, dtype=torch.uint8, pin_memory=True)
        self.src.fill_(1)  # pages faulted in before anything is timed
        self.dst = torch.empty(self.chunk, dtype=torch.uint8, device="cuda")
        self.stream = torch.cuda.Stream()

    def alone(self) -> float:
        return self.beside(lambda: time.sleep(0.002), 0.4)[0]

    def beside(self, fn, seconds: float) -> tuple[float, list[float]]:
        """(copy bytes/s, fn's durations) with copies running through `seconds` of repeated `fn` calls."""
        copies = int(2 * seconds * 60e9 / self.chunk) + 4  # outlasts the window at up to 60 GB/s
        n_chunks = self.src.numel() // self.chunk
        start = torch.cuda.Event(enable_timing=True)
        landed = [torch.cuda.Event(enable_timing=True) for _ in range(copies)]
        torch.cuda.synchronize()
        with torch.cuda.stream(self.stream):
            start.record(self.stream)
            for i, event in enumerate(landed):
                first = i % n_chunks * self.chunk
                self.dst.copy_(self.src[first:first + self.chunk], non_blocking=True)
                event.record(self.stream)
        time.sleep(0.01)  # the copies are under way before the first timed call
        began = time.perf_counter()
        durations = timed_calls(fn, seconds)
        window = time.perf_counter() - began + 0.01
        self.stream.synchronize()
        times = [start.elapsed_time(e) / 1e3 for e in landed]
        inside = [t for t in times if t <= window]
        if len(inside) == len(times):
            raise RuntimeError("the copies ended before the CPU work: queue more")
        return len(inside) * self.chunk / inside[-1], durations


def timed_calls(fn, seconds: float) -> list[float]:
    """The durations of back-to-back calls of `fn` for about `seconds`."""
    began, durations = time.perf_counter(), []
    while time.perf_counter() - began < seconds:
        t0 = time.perf_counter()
        fn()
        durations.append(time.perf_counter() - t0)
    return durations


def repeated(fn, seconds: float) -> list[float]:
    """`timed_calls` after one untimed call."""
    fn()
    return timed_calls(fn, seconds)


def make_pool(batch: int, tokens: int, huge_pages: bool, hq=32, hkv=8, d=128, bs=256, seed=0):
    g = torch.Generator().manual_seed(seed)
    n_blocks = tokens // bs
    pool = HostPool(n_blocks, (2, batch, hkv, bs, d), torch.bfloat16, pin=True, huge_pages=huge_pages)
    for s in range(n_blocks):
        pool.slab[s] = torch.randn(2, batch, hkv, bs, d, generator=g).to(torch.bfloat16)
    table = torch.randperm(n_blocks, generator=g).int()
    # The model's query is bfloat16 widened to float32: one bfloat16 part in the hand-built loops.
    q = torch.randn(batch, hq, d, generator=g).to(torch.bfloat16).float()
    ranges = torch.tensor([0, tokens], dtype=torch.int32).expand(batch, hkv, 1, 2).contiguous()
    return pool, table, q, ranges


def huge_page_share() -> float | None:
    """AnonHugePages over the process's anonymous RSS: how much of it sits on 2 MiB pages."""
    try:
        fields = dict(line.split(":", 1) for line in open("/proc/self/smaps_rollup"))
        anon = int(fields["Anonymous"].split()[0])
        return int(fields["AnonHugePages"].split()[0]) / anon if anon else None
    except (OSError, KeyError, ValueError):
        return None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--threads", type=int, nargs="+", default=[os.cpu_count(), os.cpu_count() - 1, os.cpu_count() - 2, 12])
    p.add_argument("--seconds", type=float, default=1.0, help="length of each timed window")
    p.add_argument("--sweep", action="store_true", help="time the kernel's tuning knobs instead (see above)")
    p.add_argument("--grid", nargs="*", default=[], metavar="KNOB=V1,V2",
                   help="with --sweep: these values for a knob instead of SWEEP's, e.g. BF16_TILES=None,False")
    p.add_argument("--copy-source-gib", type=float, default=4.0,
                   help="the pinned source the copies cycle through (default 4: beyond the last-level cache)")
    p.add_argument("--out", default="contention.json")
    args = p.parse_args()
    grid = sweep_grid(args.grid)
    warmup(("bfloat16",))
    copier = Copier(int(args.copy_source_gib * GiB))
    rows = []
    thp = open("/sys/kernel/mm/transparent_hugepage/enabled").read().strip() if os.path.exists(
        "/sys/kernel/mm/transparent_hugepage/enabled") else "absent"

    def add(case, batch, pages, threads, nbytes, alone, beside=None, copy_gbs=None):
        row = dict(case=case, batch=batch, pages=pages, threads=threads,
                   alone_gbs=nbytes / statistics.median(alone) / 1e9)
        if beside is not None:
            row.update(beside_gbs=nbytes / statistics.median(beside) / 1e9, copy_beside_gbs=copy_gbs / 1e9)
            row["slowdown"] = row["alone_gbs"] / row["beside_gbs"]
        rows.append(row)
        extra = "" if beside is None else (f"  beside copies {row['beside_gbs']:6.1f} (x{1 / row['slowdown']:.2f})"
                                           f"  copies {row['copy_beside_gbs']:5.1f}  sum {row['beside_gbs'] + row['copy_beside_gbs']:6.1f}")
        print(f"{case:<28} B={batch} {pages:<5} thr={threads:<3} alone {row['alone_gbs']:6.1f} GB/s{extra}", flush=True)

    copy_alone = copier.alone()
    print(f"host->GPU copies alone: {copy_alone / 1e9:.1f} GB/s (source {copier.src.numel() / GiB:.2f} GiB); "
          f"THP: {thp}; numba layer {numba.threading_layer()}")
    if args.sweep:
        sweep(args, copier, add, grid)
    else:
        cases(args, copier, add)
    with open(args.out, "w") as f:
        json.dump({"args": vars(args), "copy_alone_gbs": copy_alone / 1e9, "copy_source_bytes": copier.src.numel(),
                   "thp": thp, "rows": rows,
                   "numba_threading_layer": numba.threading_layer(), "cpu_count": os.cpu_count()}, f, indent=1)


# Knob values to sweep: (next-tile prefetch into L1/L2/none, tokens per tile, units per thread,
# hand-built bfloat16 loops where the CPU has AVX512-BF16 / Numba's loops).
SWEEP = {
    "PREFETCH_NEXT_TILE": (1, 2, 0),
    "TILE_TOKENS": (128, 64, 256),
    "UNITS_PER_THREAD": (2, 1, 4),
    "BF16_TILES": (None, False),
}


def sweep_grid(items: list[str]) -> dict:
    """SWEEP with the values --grid gives (KNOB=V1,V2; each value read as JSON, None as None)."""
    grid = dict(SWEEP)
    for name, values in parse_key_values(items, "--grid", "BF16_TILES=None,False").items():
        if name not in SWEEP:
            raise SystemExit(f"--grid {name}: not a swept knob; expected one of {', '.join(SWEEP)}")
        try:
            grid[name] = tuple(None if v == "None" else json.loads(v.lower()) for v in str(values).split(","))
        except json.JSONDecodeError:
            raise SystemExit(f"--grid {name}={values}: expected comma-separated numbers, true/false or None") from None
    return grid


def sweep(args, copier, add, grid) -> None:
    """Every combination of the grid (SWEEP's values unless --grid) at all cores but one, alone and
    beside the copies, the current defaults first."""
    threads = max(1, min(os.cpu_count() - 1, numba.config.NUMBA_NUM_THREADS))
    for batch in args.batches:
        pool, table, q, ranges = make_pool(batch, args.tokens, False)
        nbytes, scale = pool.slab.numel() * 2, q.shape[-1] ** -0.5
        for values in itertools.product(*grid.values()):
            knobs = {f"hetero.cpu_kernels.attention.{name}": v for name, v in zip(grid, values)}
            with knobs_set(knobs):
                kernel = lambda: host_decode_attention(q, pool.slab, table, ranges, scale, threads)  # noqa: E731
                copy_gbs, durations = copier.beside(kernel, args.seconds)
                case = " ".join(f"{name.lower()}={v}" for name, v in zip(grid, values))
                add(case, batch, "4k", threads, nbytes, repeated(kernel, args.seconds), durations, copy_gbs)
        pool.close()


def cases(args, copier, add) -> None:
    """The module's cases: the streaming read, the kernel at each thread count (and from a worker
    thread), its reads without math, on 4 KiB and huge pages."""
    a = np.ones(2 * GiB // 2, np.uint16)
    n_all = numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(n_all)
    stream = lambda: _stream_sum(a, n_all * 8)  # noqa: E731
    add("streaming read", 1, "4k", n_all, a.nbytes, repeated(stream, args.seconds), *reversed(copier.beside(stream, args.seconds)))
    del a
    worker = ThreadPoolExecutor(1)
    for batch in args.batches:
        for huge in (False, True):
            pages = "huge" if huge else "4k"
            pool, table, q, ranges = make_pool(batch, args.tokens, huge)
            share = huge_page_share()
            print(f"pool B={batch} {pages}: {pool.slab.numel() * 2 / GiB:.2f} GiB, share of anon memory on huge pages {share}")
            nbytes = pool.slab.numel() * 2
            scale = q.shape[-1] ** -0.5
            for threads in args.threads if batch == args.batches[0] else args.threads[:2]:
                threads = min(threads, n_all)
                kernel = lambda: host_decode_attention(q, pool.slab, table, ranges, scale, threads)  # noqa: E731
                copy_gbs, durations = copier.beside(kernel, args.seconds)
                add("numba attention", batch, pages, threads, nbytes, repeated(kernel, args.seconds), durations, copy_gbs)
                if threads == args.threads[1]:
                    on_worker = lambda: worker.submit(kernel).result()  # noqa: E731
                    copy_gbs, durations = copier.beside(on_worker, args.seconds)
                    add("numba, from a worker thread", batch, pages, threads, nbytes, repeated(on_worker, args.seconds), durations, copy_gbs)
            rows_np = pool.slab.view(torch.int16).numpy().reshape(-1, 128).view(np.uint16)
            chunk = max(256, -(-args.tokens * batch * 8 // (n_all * 8)))
            numba.set_num_threads(n_all)
            pattern = lambda: _pattern_sum(rows_np, table.numpy(), batch * 8, 256, args.tokens, chunk, 0, 0)  # noqa: E731
            pattern()  # compiled before the copies start
            copy_gbs, durations = copier.beside(pattern, args.seconds)
            add("same reads, no math", batch, pages, n_all, nbytes, repeated(pattern, args.seconds), durations, copy_gbs)
            pool.close()
            del pool, rows_np


if __name__ == "__main__":
    main()
