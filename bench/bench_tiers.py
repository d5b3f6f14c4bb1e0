"""Storage tiers, side by side with their ceilings measured in the same run.

(a) SSD tier: NvmeStore writes and reads of `--total-gib` of blocks (1-4 MiB) from and into pinned
    HostPool slots (checksums included), beside a raw threaded O_DIRECT preadv read of the same
    file (same threads, same chunk; and 16 threads x 256 KiB, the LIMITS.md probe's setting), and
    beside the same reads done through aiofiles. Goal: store read >= 85% of the raw read.
(b) Host tier -> GPU tier: copy_slots of HostPool slots to GpuPool slots (one copy_ per run of
    consecutive slots) beside one copy_ of a single large pinned tensor; both directions; and the
    cost of pinning by cudaHostRegister (HostPool) versus torch's pin_memory=True allocator.
    Goal: consecutive slots >= 90% of the single copy_.

    python bench/bench_tiers.py --out tiers.json [--dir /tmp] [--total-gib 4] [--small]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import mmap
import os
import statistics
import threading
import time
import zlib

import torch

from hetero.storage import GpuPool, HostPool, NvmeStore, copy_slots, wait_all

GiB, MiB = 1 << 30, 1 << 20
ROW = 2 * 4 * 8 * 128 * 2  # bytes per token of a block [2, B=4, Hkv=8, bs, D=128] in bf16


def timed(fn, reps=1):
    """Best and median seconds of `reps` calls."""
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return min(times), statistics.median(times)


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def raw_io(path, nbytes, chunk, threads, write=False, dynamic=True):
    """The ceiling: `threads` threads preadv (pwritev) `chunk`-sized pieces of the file with
    O_DIRECT, taking the next piece from a shared queue (dynamic) or a fixed stride of pieces."""
    flags = (os.O_RDWR if write else os.O_RDONLY) | os.O_DIRECT
    fd = os.open(path, flags)
    offsets = list(range(0, nbytes - chunk + 1, chunk))
    queue = iter(offsets)  # next() on a list iterator is atomic under the GIL

    def work(k):
        buf = mmap.mmap(-1, chunk)
        for off in (queue if dynamic else offsets[k::threads]):
            (os.pwritev if write else os.preadv)(fd, [buf], off)

    ths = [threading.Thread(target=work, args=(k,)) for k in range(threads)]
    t = time.perf_counter()
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    dt = time.perf_counter() - t
    os.close(fd)
    return len(offsets) * chunk / dt / 1e9


def raw_write_fresh(directory, nbytes, chunk, threads):
    """O_DIRECT write ceiling on a fresh preallocated file, as the store writes its own."""
    path = os.path.join(directory, f"bench-raw-write-{os.getpid()}.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        os.close(fd)
        return raw_io(path, nbytes, chunk, threads, write=True)
    finally:
        os.remove(path)


def aiofiles_read(path, nbytes, chunk, tasks):
    """The same reads through aiofiles (O_DIRECT file objects, seek + readinto in its executor)."""
    import aiofiles

    offsets = list(range(0, nbytes - chunk + 1, chunk))
    opener = lambda p, flags: os.open(p, os.O_RDONLY | os.O_DIRECT)  # noqa: E731

    async def worker(k):
        buf = mmap.mmap(-1, chunk)
        async with aiofiles.open(path, "rb", buffering=0, opener=opener) as f:
            for off in offsets[k::tasks]:
                await f.seek(off)
                await f.readinto(buf)

    async def main():
        await asyncio.gather(*(worker(k) for k in range(tasks)))

    t = time.perf_counter()
    asyncio.run(main())
    return len(offsets) * chunk / (time.perf_counter() - t) / 1e9


def bench_ssd(directory, total, block_bytes, threads, pin, rounds, rows):
    bs = max(1, block_bytes // ROW)
    shape = (2, 4, 8, bs, 128) if block_bytes >= ROW else (2, 1, 1, block_bytes // 512, 128)
    src = HostPool(total // (torch.Size(shape).numel() * 2), shape, pin=pin)
    n = src.n_slots
    dst = HostPool(n, shape, pin=pin)
    slots = src.allocate(n)
    dst.allocate(n)
    src.slab.view(torch.int16).random_()
    nbytes = n * src.block_bytes
    store = NvmeStore(directory, n, shape, io_threads=threads)
    s = store.allocate(n)
    cfg = f"{n} x {src.block_bytes / MiB:g} MiB, {threads} threads"
    raw_w = raw_write_fresh(directory, n * store.slot_bytes, store.slot_bytes, threads)
    try:
        _, wt = timed(lambda: wait_all([store.write(s[i], src.view(i)) for i in slots]))
        store_read, raw, raw_probe, aio = [], [], [], []
        for _ in range(rounds):  # alternate, so that both see the same disk state
            raw.append(raw_io(store.path, n * store.slot_bytes, store.slot_bytes, threads))
            dst.slab.zero_()
            t, _ = timed(lambda: wait_all([store.read_into(s[i], dst.view(i)) for i in slots]))
            store_read.append(nbytes / t / 1e9)
            raw_probe.append(raw_io(store.path, n * store.slot_bytes, 256 << 10, 16, dynamic=False))
        aio.append(aiofiles_read(store.path, n * store.slot_bytes, store.slot_bytes, threads))
        exact = torch.equal(dst.slab.view(torch.int16), src.slab.view(torch.int16))
    finally:
        store.close()
        src.close()
        dst.close()
    ceiling = max(raw)
    rows.append(dict(test="ssd write (NvmeStore, crc32, O_DIRECT)" if store.direct else "ssd write (buffered)",
                     config=cfg, GBps=nbytes / wt / 1e9, ceiling=f"raw O_DIRECT pwritev, fresh file, {threads} thr",
                     ceiling_GBps=raw_w, ratio=nbytes / wt / 1e9 / raw_w, goal=None))
    rows.append(dict(test="ssd read -> pinned HostPool slots (NvmeStore)", config=cfg, GBps=max(store_read),
                     ceiling=f"raw O_DIRECT preadv, {threads} thr, same chunk", ceiling_GBps=ceiling,
                     ratio=max(store_read) / ceiling, goal=0.85, all_runs=store_read, ceiling_runs=raw,
                     bit_exact=exact))
    rows.append(dict(test="  raw O_DIRECT 16 thr x 256 KiB, fixed stride (LIMITS)", config=cfg, GBps=max(raw_probe),
                     ceiling="", ceiling_GBps=None, ratio=max(store_read) / max(raw_probe), goal=None,
                     note="ratio = store read / this"))
    rows.append(dict(test="  aiofiles O_DIRECT seek+readinto, same chunk", config=cfg, GBps=max(aio),
                     ceiling=f"raw O_DIRECT preadv, {threads} threads", ceiling_GBps=ceiling,
                     ratio=max(aio) / ceiling, goal=None))


def bench_h2d(total, block_bytes, reps, rows):
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    pin = dev == "cuda"
    shape = (2, 1, 8, max(1, block_bytes // (2 * 8 * 128 * 2)), 128)
    blk = torch.Size(shape).numel() * 2
    n = total // blk
    host = HostPool(n, shape, pin=pin)
    host.allocate(n)
    host.slab.view(torch.int16).random_()
    gpu = GpuPool(n, shape, device=dev)
    gpu.allocate(n)
    nbytes = n * blk
    big = torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)
    big.fill_(1)
    big_dev = torch.empty(nbytes, dtype=torch.uint8, device=dev)
    ceil_h2d = nbytes / timed(lambda: big_dev.copy_(big, non_blocking=True), reps)[0] / 1e9
    ceil_d2h = nbytes / timed(lambda: big.copy_(big_dev, non_blocking=True), reps)[0] / 1e9
    cfg = f"{n} x {blk / 1024:g} KiB, {dev}"
    forward = torch.arange(n)  # slot lists as the block table gives them: int tensors
    g = torch.Generator().manual_seed(0)
    for run in (n, 256, 64, 16, 4, 1):
        runs = max(1, n // run)
        order = torch.randperm(runs, generator=g).tolist()
        src = torch.tensor([r * run + i for r in order for i in range(run)][:n]) if run < n else forward
        sec = timed(lambda: copy_slots(host.slab, src, gpu.slab, forward[:len(src)], non_blocking=True), reps)[0]
        rows.append(dict(test=f"HostPool -> GpuPool copy_slots, runs of {run} slot(s)", config=cfg,
                         GBps=len(src) * blk / sec / 1e9, ceiling="one copy_ of a pinned tensor", ceiling_GBps=ceil_h2d,
                         ratio=len(src) * blk / sec / 1e9 / ceil_h2d, goal=0.9 if run == n else None,
                         copies=runs if run < n else 1))
    sec = timed(lambda: copy_slots(gpu.slab, forward, host.slab, forward, non_blocking=True), reps)[0]
    rows.append(dict(test="GpuPool -> HostPool copy_slots, consecutive", config=cfg, GBps=nbytes / sec / 1e9,
                     ceiling="one copy_ to a pinned tensor", ceiling_GBps=ceil_d2h, ratio=nbytes / sec / 1e9 / ceil_d2h,
                     goal=0.9))
    host.close()
    del big, big_dev, gpu


def anon_huge_bytes():
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    return 0


def bench_pinning(nbytes, reps, rows):
    """Pinning `nbytes` (not a power of two) and copying it to and from the GPU, for HostPool with
    and without huge pages (cudaHostRegister) and for torch's pin_memory=True allocator."""
    if not torch.cuda.is_available():
        return
    shape = (2, 1, 1, nbytes // 512, 128)
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    stats = getattr(torch.cuda, "host_memory_stats", dict)
    variants = [("HostPool: huge pages + cudaHostRegister", lambda: HostPool(1, shape, pin=True, huge_pages=True)),
                ("HostPool: 4 KiB pages + cudaHostRegister", lambda: HostPool(1, shape, pin=True, huge_pages=False)),
                ("torch.empty(pin_memory=True)", lambda: torch.empty(nbytes, dtype=torch.uint8, pin_memory=True))]
    found = []
    for name, make in variants:
        huge0 = anon_huge_bytes()
        torch.cuda.synchronize()
        t = time.perf_counter()
        obj = make()
        t_pin = time.perf_counter() - t
        host = obj.slab.reshape(-1).view(torch.uint8) if isinstance(obj, HostPool) else obj
        h2d = nbytes / timed(lambda: dev.copy_(host, non_blocking=True), reps)[0] / 1e9
        d2h = nbytes / timed(lambda: host.copy_(dev, non_blocking=True), reps)[0] / 1e9
        extra = dict(seconds_to_pin=t_pin, is_pinned=bool(host.is_pinned()), d2h_GBps=d2h,
                     anon_huge_bytes=anon_huge_bytes() - huge0,
                     host_memory_stats={k: v for k, v in stats().items() if "current" in k and "bytes" in k})
        found.append((name, h2d, d2h, extra))
        if isinstance(obj, HostPool):
            obj.close()
        del obj, host
        getattr(torch._C, "_host_emptyCache", lambda: None)()
    ceil_h2d, ceil_d2h = found[-1][1], found[-1][2]
    cfg = f"{nbytes / GiB:.2f} GiB, one copy_"
    for name, h2d, d2h, extra in found:
        rows.append(dict(test=f"H2D from {name}", config=cfg, GBps=h2d, ceiling="H2D from pin_memory=True",
                         ceiling_GBps=ceil_h2d, ratio=h2d / ceil_h2d, goal=None, **extra))
        rows.append(dict(test=f"  D2H to it; pinned in {extra['seconds_to_pin']:.2f} s", config=cfg, GBps=d2h,
                         ceiling="D2H to pin_memory=True", ceiling_GBps=ceil_d2h, ratio=d2h / ceil_d2h, goal=None))
    del dev


def crc_speed(rows):
    buf = os.urandom(4 * MiB)
    t = time.perf_counter()
    for _ in range(64):
        zlib.crc32(buf)
    rows.append(dict(test="zlib.crc32, one thread", config="4 MiB buffer", GBps=64 * len(buf) / (time.perf_counter() - t) / 1e9,
                     ceiling="", ceiling_GBps=None, ratio=None, goal=None))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--dir", default="/tmp", help="directory for the SSD tier's file (a disk, not tmpfs)")
    ap.add_argument("--total-gib", type=float, default=4.0, help="bytes of blocks read and written per SSD run")
    ap.add_argument("--ssd", default="2:16,1:16,4:16,2:8", help="block MiB:io threads, comma separated")
    ap.add_argument("--h2d-gib", type=float, default=2.0, help="bytes moved host -> GPU per copy")
    ap.add_argument("--h2d-block-kib", type=int, default=64, help="block size for the host -> GPU runs")
    ap.add_argument("--rounds", type=int, default=2, help="alternating raw/store read rounds")
    ap.add_argument("--small", action="store_true", help="tiny sizes, to check the script on a CPU machine")
    args = ap.parse_args()
    if args.small:
        args.total_gib, args.h2d_gib, args.ssd = 0.03, 0.02, "0.25:4,1:2"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu only"
    rows = []

    def save():  # after each part, so that a run cut short still leaves its figures
        with open(args.out, "w") as f:
            json.dump({"device": device, "cpus": os.cpu_count(), "dir": args.dir, "rows": rows}, f, indent=1)

    crc_speed(rows)
    bench_pinning(3 * GiB, 5, rows)
    bench_h2d(int(args.h2d_gib * GiB), args.h2d_block_kib * 1024, 5, rows)
    save()
    print_rows(rows)
    for item in args.ssd.split(","):
        mib, threads = item.split(":")
        done = len(rows)
        bench_ssd(args.dir, int(args.total_gib * GiB), int(float(mib) * MiB), int(threads),
                  torch.cuda.is_available(), args.rounds, rows)
        save()
        print_rows(rows[done:], header=False)
    print(f"\ndevice: {device}, {os.cpu_count()} CPUs, SSD file under {args.dir}")
    print_rows(rows)


def print_rows(rows, header=True):
    if header:
        print(f"{'measurement':58} {'config':34} {'GB/s':>7}  {'ceiling (same run)':46} {'GB/s':>7} {'ratio':>6} "
              f"{'goal':>5}")
    for r in rows:
        c = "" if r["ceiling_GBps"] is None else f"{r['ceiling_GBps']:7.2f}"
        q = "" if r["ratio"] is None else f"{r['ratio']:6.2f}"
        goal = "" if r["goal"] is None else f"{r['goal']:.2f}"
        print(f"{r['test']:58} {r['config']:34} {r['GBps']:7.2f}  {r['ceiling']:46} {c:>7} {q:>6} {goal:>5}", flush=True)

if __name__ == "__main__":
    main()
