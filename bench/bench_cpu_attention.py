"""CPU decode attention over host KV blocks: the Numba kernel beside its ceiling and its peer.

In one run: (a) the Numba streaming-read ceiling (prange sums over a large uint16, float32 and
float64 array, LIMITS.md's probe the last, and over the float32 one with L2 prefetches ahead, as the
kernel prefetches; the fastest is the ceiling every row is measured against: a read's bytes are
bytes, and no read pattern of ours should run faster than the ceiling), (b) `host_decode_attention`'s
GB/s of KV scanned, (c) torch's CPU scaled_dot_product_attention on the same tokens (fp32 and bf16,
K/V already contiguous).
Prints a table and writes JSON (--out).

    python bench/bench_cpu_attention.py --tokens 131072 --out cpu_attention.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numba
import numpy as np
import torch
from numba import njit, prange

from json_out import write_json
from hetero.bench_cli import knobs_set
from hetero.cpu_kernels import attention as knobs
from hetero.cpu_kernels import host_decode_attention, host_decode_attention_indexed, warmup
from hetero.cpu_kernels._bf16_tiles import cpu_has_dpbf16
from hetero.cpu_kernels._intrinsics import prefetch_l1, prefetch_l2
from hetero.cpu_kernels.attention import amx_ready
from hetero.storage.host_pool import HostPool, huge_page_share


@njit(parallel=True, fastmath=True, cache=True)
def _stream_sum(a, n_chunks):
    """Sum of a 1-D uint16 or float32 array read once by n_chunks prange tasks (integers wrap).

    Each task loops over a slice from 0 so that the loop vectorizes: the cheapest full read.
    """
    per = (a.size + n_chunks - 1) // n_chunks
    partial = np.zeros(n_chunks, a.dtype)
    for c in prange(n_chunks):
        part = a[c * per : min(a.size, (c + 1) * per)]
        s = a.dtype.type(0)
        for i in range(part.size):
            s += part[i]
        partial[c] = s
    return partial.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _stream_sum_prefetched(lines, n_chunks, distance):
    """`_stream_sum` of a float32 array seen as lines [n, 16] (64 bytes each), every line first
    prefetched into L2 `distance` lines ahead, a 4 KiB page at a time: the kernel's reads gain from
    that, and the ceiling must not be slower than any read pattern of ours."""
    per = (lines.shape[0] + n_chunks - 1) // n_chunks
    partial = np.zeros(n_chunks, np.float32)
    for c in prange(n_chunks):
        first, stop = c * per, min(lines.shape[0], (c + 1) * per)
        s = np.float32(0.0)
        for page in range(first, stop, 64):
            for k in range(page + distance, min(page + 64 + distance, stop)):
                prefetch_l2(lines, k, 0)
            part = lines[page:min(page + 64, stop)].ravel()
            for i in range(part.size):
                s += part[i]
        partial[c] = s
    return partial.sum()


@njit(parallel=True, fastmath=True, cache=True)
def _probe_sum(x):
    """The reduction of LIMITS.md's probe (float64 prange sum), for comparison with its table."""
    s = 0.0
    for i in prange(x.size):
        s += x[i]
    return s


@njit(cache=True, inline="always")
def _k_row(block_table, pos, bs, bh, v_rows):
    """The pool row (of [rows, D]) of head bh's K at logical position pos; its V row is v_rows on."""
    blk = pos // bs
    return block_table[blk] * 2 * v_rows + bh * bs + pos - blk * bs


@njit(parallel=True, cache=True)
def _pattern_sum(rows, block_table, n_heads, bs, tokens, chunk, distance, level):
    """Read K and V rows of every (head, token) as the kernel does (block table, per-head chunks)
    and only sum them: the access pattern's own ceiling, to tell memory stalls from compute. With
    `distance` > 0, each line of the rows that many tokens ahead is prefetched into L1 (level 1) or
    L2 (level 2) first."""
    per_head = (tokens + chunk - 1) // chunk
    v_rows = n_heads * bs
    partial = np.zeros(n_heads * per_head, np.uint16)
    for t in prange(n_heads * per_head):
        bh, first = t // per_head, (t % per_head) * chunk
        last = min(tokens, first + chunk)
        s = np.uint16(0)
        for pos in range(first, last):
            if distance > 0 and pos + distance < last:
                r = _k_row(block_table, pos + distance, bs, bh, v_rows)
                for d in range(0, rows.shape[1], 32):
                    if level == 1:
                        prefetch_l1(rows, r, d)
                        prefetch_l1(rows, r + v_rows, d)
                    else:
                        prefetch_l2(rows, r, d)
                        prefetch_l2(rows, r + v_rows, d)
            r = _k_row(block_table, pos, bs, bh, v_rows)
            k, v = rows[r], rows[r + v_rows]
            for d in range(k.size):
                s += k[d] + v[d]
        partial[t] = s
    return partial.sum()


def _timings(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def median_seconds(fn, reps):
    """The median of `reps` timed calls of fn, after one untimed call (compiled and warm)."""
    return statistics.median(_timings(fn, reps))


def streaming_ceiling(gib, reps, threads):
    """GB/s of the Numba prange streaming read, for uint16 and float32 arrays of `gib` GiB (NumPy
    puts arrays that large on transparent huge pages where it can), and for float32 with each line
    prefetched into L2 256 lines (16 KiB) ahead."""
    result = {}
    for dtype in (np.uint16, np.float32):
        a = np.ones(int(gib * 2**30) // np.dtype(dtype).itemsize, dtype)
        sec = median_seconds(lambda: _stream_sum(a, threads * 8), reps)
        result[np.dtype(dtype).name] = a.nbytes / sec / 1e9
        if dtype is np.float32:
            lines = a[: a.size // 16 * 16].reshape(-1, 16)
            sec = median_seconds(lambda: _stream_sum_prefetched(lines, threads * 8, 256), reps)
            result["float32_prefetched"] = lines.nbytes / sec / 1e9
            del lines
        del a
    a = np.ones(int(gib * 2**30) // 8)
    result["float64_probe"] = a.nbytes / median_seconds(lambda: _probe_sum(a), reps) / 1e9
    return result


def sweep_knobs(q, pool, table, tokens, reps, threads):
    """The kernel's GB/s under each tuning knob setting (tile, units per thread, schedule, prefetch,
    hand-built bfloat16 loops)."""
    settings = [dict(TILE_TOKENS=tile, PREFETCH_NEXT_TILE=pf, BF16_TILES=tiles)
                for tiles in (True, False) for pf in (1, 2) for tile in (32, 64, 128)]
    settings += [dict(TILE_TOKENS=64, PREFETCH_NEXT_TILE=0, BF16_TILES=tiles) for tiles in (True, False)]
    settings += [dict(UNITS_PER_THREAD=units, DYNAMIC_SCHEDULE=dyn) for units in (1, 2, 4, 8) for dyn in (True, False)]
    results = []
    for changed in settings:
        with knobs_set({f"{knobs.__name__}.{name}": value for name, value in changed.items()}):
            r = bench_kernel(q, pool, table, tokens, reps, threads)
            results.append(dict(tile=knobs.TILE_TOKENS, units_per_thread=knobs.UNITS_PER_THREAD,
                                dynamic=knobs.DYNAMIC_SCHEDULE, prefetch=knobs.PREFETCH_NEXT_TILE,
                                bf16_tiles=knobs.BF16_TILES, gbps=r["gbps"]))
    return results


# The inner loops bfloat16 pools can take (the rows' names): Numba's own, the hand-built vector
# loops of `_bf16_tiles`, and where the CPU runs them the AMX tile products of `_amx_tiles`.
LOOPS = {"numba": dict(BF16_TILES=False, AMX_TILES=False), "hand-built": dict(BF16_TILES=True, AMX_TILES=False)}
if amx_ready():
    LOOPS["amx"] = dict(AMX_TILES=True)


def loops(name, fn):
    """fn() with the bfloat16 pools on the inner loops LOOPS[name]."""
    with knobs_set({f"{knobs.__name__}.{knob}": value for knob, value in LOOPS[name].items()}):
        return fn()


def make_case(B, tokens, dtype, Hq, Hkv, D, bs, seed=0, query_dtype=None, huge_pages=True):
    """A pool holding `tokens` tokens under a shuffled block table, and q; random values.

    The pool is a host tier's slab (`HostPool`, unpinned), on transparent huge pages as the host
    tier's is unless `huge_pages` is False. q is float32 holding values of `query_dtype` (default: the
    pool's dtype), as the query of a model that runs in that dtype is."""
    g = torch.Generator().manual_seed(seed)
    n_blocks = -(-tokens // bs)
    pool = HostPool(n_blocks, (2, B, Hkv, bs, D), dtype, pin=False, slot_align=1, huge_pages=huge_pages).slab
    for s in range(n_blocks):  # slot by slot: no float32 copy of the whole pool
        pool[s] = torch.randn(2, B, Hkv, bs, D, generator=g).to(dtype)
    table = torch.randperm(n_blocks, generator=g).int()
    q = torch.randn(B, Hq, D, generator=g).to(query_dtype or dtype).float()
    return q, pool, table


def cached_case(pool, tokens):
    """A one-slot pool whose block table names that slot for every block: the kernel's reads all
    hit the caches, so its GB/s is its compute rate."""
    slot = pool[:1].clone()
    return slot, torch.zeros(-(-tokens // pool.shape[4]), dtype=torch.int32)


def logical_kv(pool, table, tokens):
    """K and V [B, Hkv, tokens, D] in logical order (what SDPA reads), built once, not timed."""
    kv = pool[table.long()]  # [n_blocks, 2, B, Hkv, bs, D]
    n, _, B, Hkv, bs, D = kv.shape
    kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(2, B, Hkv, n * bs, D)[:, :, :, :tokens]
    return kv[0].contiguous(), kv[1].contiguous()


def kernel_call(q, pool, table, tokens, threads, attend=host_decode_attention):
    """The kernel's call (`attend`, a `host_decode_attention`) over the first `tokens` of every head,
    and the KV bytes it reads."""
    B, Hkv = pool.shape[2], pool.shape[3]
    ranges = torch.tensor([0, tokens], dtype=torch.int32).expand(B, Hkv, 1, 2).contiguous()
    call = lambda: attend(q, pool, table, ranges, q.shape[-1] ** -0.5, threads)  # noqa: E731
    return call, 2 * B * Hkv * tokens * q.shape[-1] * pool.element_size()


def rate(sec, kv_bytes):
    return {"ms": sec * 1e3, "gbps": kv_bytes / sec / 1e9, "kv_bytes": kv_bytes}


def bench_kernel(q, pool, table, tokens, reps, threads):
    call, kv_bytes = kernel_call(q, pool, table, tokens, threads)
    return rate(median_seconds(call, reps), kv_bytes)


def bench_all_loops(q, pool, table, tokens, reps, threads, rounds):
    """Each of LOOPS, timed in alternating rounds of `reps` calls (within a run the machine's speed
    drifts by up to a fifth), each the median of all its calls."""
    call, kv_bytes = kernel_call(q, pool, table, tokens, threads)
    times = {name: [] for name in LOOPS}
    for _ in range(rounds):
        for name in times:
            times[name] += loops(name, lambda: _timings(call, reps))
    return {name: {**rate(statistics.median(t), kv_bytes), "calls": len(t)} for name, t in times.items()}


def call_overhead_us(Hq, Hkv, D, bs, calls=3000):
    """Microseconds per `host_decode_attention` call over 16 tokens a head on one thread: the front
    end's checks and the kernel's launch, paid once per layer in split's pipeline."""
    q, pool, table = make_case(1, 2 * bs, torch.bfloat16, Hq, Hkv, D, bs)
    ranges = torch.tensor([0, 16], dtype=torch.int32).expand(1, Hkv, 1, 2).contiguous()
    calls_in_a_row = lambda: [host_decode_attention(q, pool, table, ranges, 0.1, 1) for _ in range(calls)]  # noqa: E731
    return median_seconds(calls_in_a_row, 3) / calls * 1e6


def bench_pattern(pool, table, tokens, reps, threads, distance=None, level=None):
    """The kernel's reads without its math (`_pattern_sum`), prefetching `distance` tokens ahead into
    L1 or L2 (`level`); by default as the kernel does: a tile ahead, into the cache
    `PREFETCH_NEXT_TILE` names."""
    B, Hkv, D = pool.shape[2], pool.shape[3], pool.shape[5]
    rows = pool.view(torch.int16).numpy().reshape(-1, D).view(np.uint16)
    chunk = max(256, -(-tokens * B * Hkv // (threads * 8)))
    if level is None:
        level = knobs.PREFETCH_NEXT_TILE
    if distance is None:
        distance = knobs.TILE_TOKENS if level else 0
    sec = median_seconds(lambda: _pattern_sum(rows, table.numpy(), B * Hkv, pool.shape[4], tokens, chunk, distance,
                                              level), reps)
    kv_bytes = 2 * B * Hkv * tokens * D * 2
    return {"ms": sec * 1e3, "gbps": kv_bytes / sec / 1e9, "kv_bytes": kv_bytes}


def bench_indexed(q, pool, table, tokens, share, reps, threads):
    B, Hkv, D = pool.shape[2], pool.shape[3], q.shape[-1]
    n = int(tokens * share)
    rng = np.random.default_rng(0)
    idx = np.stack([np.sort(rng.choice(tokens, n, replace=False)) for _ in range(B * Hkv)]).reshape(B, Hkv, n)
    idx, count = torch.from_numpy(idx.astype(np.int32)), torch.full((B, Hkv), n, dtype=torch.int32)
    sec = median_seconds(lambda: host_decode_attention_indexed(q, pool, table, idx, count, D**-0.5, threads), reps)
    kv_bytes = 2 * B * Hkv * n * D * pool.element_size()
    return {"ms": sec * 1e3, "gbps": kv_bytes / sec / 1e9, "kv_bytes": kv_bytes, "share": share}


def bench_sdpa(q, k, v, reps):
    qq = q.to(k.dtype)[:, :, None, :]
    fn = lambda: torch.nn.functional.scaled_dot_product_attention(qq, k, v, enable_gqa=True)  # noqa: E731
    sec = median_seconds(fn, reps)
    kv_bytes = k.numel() * k.element_size() * 2
    return {"ms": sec * 1e3, "gbps": kv_bytes / sec / 1e9, "kv_bytes": kv_bytes}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=131072)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    p.add_argument("--hq", type=int, default=32)
    p.add_argument("--hkv", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds of --reps calls for the two loops' main rows")
    p.add_argument("--sdpa-reps", type=int, default=3)
    p.add_argument("--ceiling-gib", type=float, default=2.0)
    p.add_argument("--sweep", action="store_true", help="also time each tuning knob setting (batch 1 bf16)")
    p.add_argument("--resident-tokens", type=int, default=4096, help="a cache-resident case: compute, not memory")
    p.add_argument("--scaling", type=int, nargs="*", default=[1, 4, 8], help="extra thread counts, batch 1 bf16")
    p.add_argument("--out", default="cpu_attention.json")
    args = p.parse_args()
    numba.set_num_threads(args.threads)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    warmup()
    compile_s = time.perf_counter() - t0
    shape = dict(Hq=args.hq, Hkv=args.hkv, D=args.head_dim, bs=args.block_size)
    ceiling = streaming_ceiling(args.ceiling_gib, args.reps, args.threads)
    best = max(ceiling.values())
    rows, sweep = [], []
    on_huge_pages = {}  # each pool's share on transparent huge pages (asked for, not always granted)

    def add(name, B, dtype, r, peer=None):
        r.update(case=name, batch=B, dtype=dtype, of_ceiling=r["gbps"] / best)
        if peer:
            r.update({f"speedup_vs_{k}": v["ms"] / r["ms"] for k, v in peer.items()})
        rows.append(r)

    for B in args.batches:
        q, pool, table = make_case(B, args.tokens, torch.bfloat16, **shape)
        on_huge_pages[f"batch {B}"] = huge_page_share(pool)
        # The kernels first: torch's CPU threads may still spin for a while after its SDPA.
        every = bench_all_loops(q, pool, table, args.tokens, args.reps, args.threads, args.rounds)
        pattern = bench_pattern(pool, table, args.tokens, args.reps, args.threads)
        k, v = logical_kv(pool, table, args.tokens)
        sdpa = {"sdpa_bf16": bench_sdpa(q, k, v, args.sdpa_reps)}
        kf, vf = k.float(), v.float()
        del k, v
        sdpa["sdpa_fp32"] = bench_sdpa(q, kf, vf, args.sdpa_reps)
        del kf, vf
        for name, r in every.items():
            add(name if name == "numba" else f"{name} loops", B, "bfloat16", r, sdpa)
        add("same reads, no math", B, "bfloat16", pattern)
        for name, r in sdpa.items():
            add(name, B, "float32" if name.endswith("fp32") else "bfloat16", r)
        if B == 1:
            for t in sorted({min(t, numba.config.NUMBA_NUM_THREADS) for t in args.scaling}):  # a smaller machine: its cores
                for name in LOOPS:
                    add(f"{name} {t} thr", B, "bfloat16",
                        loops(name, lambda: bench_kernel(q, pool, table, args.tokens, max(2, args.reps // 3), t)))
            slot, aliased = cached_case(pool, args.tokens)
            for t in sorted({1, args.threads}):
                for name in LOOPS:
                    add(f"{name} in cache {t} thr", B, "bfloat16",
                        loops(name, lambda: bench_kernel(q, slot, aliased, args.tokens, max(2, args.reps // 3), t)))
            q32 = torch.randn(q.shape, generator=torch.Generator().manual_seed(1))  # 3 bfloat16 parts
            for name in LOOPS:
                add(f"{name}, fp32 query", B, "bfloat16",
                    loops(name, lambda: bench_kernel(q32, pool, table, args.tokens, args.reps, args.threads)), sdpa)
            numba.set_num_threads(1)
            add("same reads 1 thr", B, "bfloat16", bench_pattern(pool, table, args.tokens, max(2, args.reps // 3), 1))
            numba.set_num_threads(args.threads)
            _, small_pages, _ = make_case(B, args.tokens, torch.bfloat16, **shape, huge_pages=False)
            on_huge_pages[f"batch {B}, 4 KiB pages"] = huge_page_share(small_pages)
            on_small_pages = lambda: bench_kernel(q, small_pages, table, args.tokens, args.reps, args.threads)  # noqa: E731
            add("hand-built, 4 KiB pages", B, "bfloat16", loops("hand-built", on_small_pages), sdpa)
            add("same reads, 4 KiB pages", B, "bfloat16", bench_pattern(small_pages, table, args.tokens, args.reps,
                                                                          args.threads))
            del small_pages
            add("numba indexed 1/8", B, "bfloat16", bench_indexed(q, pool, table, args.tokens, 0.125, args.reps, args.threads))
            if args.sweep:
                sweep = sweep_knobs(q, pool, table, args.tokens, args.reps, args.threads)
        del pool
    q, pool, table = make_case(1, args.resident_tokens, torch.bfloat16, **shape)
    for name in LOOPS:
        add(f"{name} cache-resident", 1, "bfloat16",
            loops(name, lambda: bench_kernel(q, pool, table, args.resident_tokens, args.reps * 20, args.threads)))
    for dtype in (torch.float16, torch.float32):
        q, pool, table = make_case(1, args.tokens, dtype, **shape)
        add("numba", 1, str(dtype).split(".")[1], bench_kernel(q, pool, table, args.tokens, args.reps, args.threads))
        del pool
    print(f"threads={args.threads} tokens={args.tokens} {shape} compile+load {compile_s:.1f}s"
          f" numba features: ...{(numba.core.config.CPU_FEATURES or 'host default')[-40:]}"
          f" vdpbf16ps: {cpu_has_dpbf16()} amx: {amx_ready()}")
    overhead = call_overhead_us(**shape)
    print(f"a call over 16 tokens a head, one thread: {overhead:.0f} us (the front end and the kernel's launch)")
    print(f"(a) streaming-read ceiling {best:.1f} GB/s, the fastest of: uint16 {ceiling['uint16']:.1f}, float32 "
          f"{ceiling['float32']:.1f}, float32 prefetched into L2 {ceiling['float32_prefetched']:.1f}, float64 "
          f"(LIMITS.md's probe) {ceiling['float64_probe']:.1f}")
    print("pools on huge pages: " + ", ".join(f"{k} {'unknown' if v is None else f'{v:.0%}'}"
                                              for k, v in on_huge_pages.items()))
    print(f"{'case':<28}{'B':>3} {'dtype':<9}{'ms':>9}{'GB/s':>8}{'of ceil':>9}{'vs sdpa bf16':>14}{'vs sdpa fp32':>14}")
    for r in rows:
        sb, sf = r.get("speedup_vs_sdpa_bf16"), r.get("speedup_vs_sdpa_fp32")
        print(
            f"{r['case']:<28}{r['batch']:>3} {r['dtype']:<9}{r['ms']:>9.2f}{r['gbps']:>8.1f}{r['of_ceiling']:>8.0%}"
            f"{'' if sb is None else f'{sb:.1f}x':>14}{'' if sf is None else f'{sf:.1f}x':>14}"
        )
    for k in sweep:
        print(f"knobs tile={k['tile']:<3} units/thread={k['units_per_thread']:<3} dynamic={k['dynamic']!s:<5} "
              f"prefetch={k['prefetch']!s:<5} bf16_tiles={k['bf16_tiles']!s:<5} {k['gbps']:6.1f} GB/s {k['gbps'] / best:5.0%} of ceiling")
    write_json(args.out, {"args": vars(args), "compile_s": compile_s, "ceiling_gbps": ceiling, "ceiling_best_gbps": best,
                          "rows": rows, "sweep": sweep, "call_overhead_us": overhead,
                          "pool_huge_page_share": on_huge_pages, "numba_threading_layer": numba.threading_layer(),
                          "numba_cpu_features": numba.core.config.CPU_FEATURES, "vdpbf16ps": cpu_has_dpbf16(),
                          "amx": amx_ready(), "torch": torch.__version__})


if __name__ == "__main__":
    main()
