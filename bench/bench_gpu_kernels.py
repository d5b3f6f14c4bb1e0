"""The Triton kernels beside the ceilings measured in the same run.

(a) gather_tokens of 5/10/25% of a 128K-token layer's rows from pinned host memory (UVA) beside a
    1 GiB pinned copy_; gather_blocks beside copy_ of consecutive slots.
(b) decode_attention at 32K/64K/128K tokens, batch 1 and 8, beside a device-to-device copy and
    torch SDPA (enable_gqa=True) on the same data, timed with the L2 flushed before each call and
    from CUDA-graph replay (GPU time alone); host time per call.

    python bench/bench_gpu_kernels.py --out gpu_kernels.json [--sweep]
    python bench/bench_gpu_kernels.py --sections decode --sweep --sweep-shapes 8x32768 --block-size 256 --out s.json
    python bench/bench_gpu_kernels.py --sections host rounds --rounds 5 --block-size 256 --out r.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics
import time
import traceback

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from hetero.gpu_kernels import DecodeLaunch, Segment, decode_attention, default_launches, gather_blocks, gather_tokens
from hetero.gpu_kernels.decode_attention import default_launch

B_GATHER, HKV, HQ, D = 1, 8, 32, 128
DTYPE = torch.bfloat16


def ms(fn) -> float:
    """Median milliseconds; do_bench flushes L2 before each call, so no run reads another's cache."""
    return do_bench(fn, warmup=10, rep=60, return_mode="median")


def pinned_copy_gbs(nbytes=1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return nbytes / ms(lambda: dst.copy_(src, non_blocking=True)) / 1e6


def device_copy_gbs(nbytes=1 << 30) -> float:
    """Bytes read plus bytes written per second by a device-to-device copy_."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * nbytes / ms(lambda: dst.copy_(src)) / 1e6


def pinned_pool(n_slots, B, bs):
    pool = torch.empty(n_slots, 2, B, HKV, bs, D, dtype=DTYPE, pin_memory=True)
    for i in range(0, n_slots, 1024):  # random fill through the GPU, in slices
        chunk = pool[i:i + 1024]
        chunk.copy_(torch.randn(chunk.shape, dtype=DTYPE, device="cuda"))
    return pool


def bench_gather(tokens, bs, ceiling, sweep, rows):
    n_blocks = tokens // bs
    pool = pinned_pool(n_blocks, B_GATHER, bs)
    table = torch.randperm(n_blocks, device="cuda").int()
    for frac in (0.05, 0.10, 0.25):
        N = int(frac * tokens)
        idx = torch.rand(B_GATHER, HKV, tokens, device="cuda").argsort(-1)[..., :N].sort(-1).values.int()
        count = torch.full((B_GATHER, HKV), N, dtype=torch.int32, device="cuda")
        out = torch.empty(2, B_GATHER, HKV, N, D, dtype=DTYPE, device="cuda")
        useful = out.numel() * out.element_size()
        configs = [(64, 4)]
        if sweep and frac == 0.10:
            configs = [(32, 4), (64, 4), (64, 8)]
        for tpp, warps in configs:
            t = ms(lambda: gather_tokens(pool, table, idx, count, out, tokens_per_program=tpp, num_warps=warps))
            rows.append(dict(kind="gather_tokens", fraction=frac, tokens_per_program=tpp, num_warps=warps, ms=t,
                             gbs=useful / t / 1e6, ceiling_gbs=ceiling, of_ceiling=useful / t / 1e6 / ceiling))
            _print_row(rows[-1], f"gather_tokens {frac:.0%} of {tokens // 1024}K rows (tpp {tpp}, w {warps})")
    for frac in (0.10, 1.0):
        n = int(frac * n_blocks)
        out = torch.empty(n, *pool.shape[1:], dtype=DTYPE, device="cuda")
        nbytes = out.numel() * out.element_size()
        slots = torch.randperm(n_blocks, device="cuda")[:n].int()
        t = ms(lambda: gather_blocks(pool, slots, out))
        t_copy = ms(lambda: out.copy_(pool[:n], non_blocking=True))
        rows.append(dict(kind="gather_blocks", fraction=frac, ms=t, gbs=nbytes / t / 1e6, copy_ms=t_copy,
                         copy_gbs=nbytes / t_copy / 1e6, ceiling_gbs=ceiling, of_ceiling=nbytes / t / 1e6 / ceiling))
        _print_row(rows[-1], f"gather_blocks {n} random blocks (copy_ of consecutive: {nbytes / t_copy / 1e6:.1f})")


def decode_inputs(B, L, bs, layout):
    q = torch.randn(B, HQ, D, dtype=DTYPE, device="cuda")
    if layout == "dense":
        kv = torch.randn(2, B, HKV, L, D, dtype=DTYPE, device="cuda")
        return q, [Segment(kv[0], kv[1])], kv
    n = L // bs
    pool = torch.randn(n, 2, B, HKV, bs, D, dtype=DTYPE, device="cuda")
    table = torch.randperm(n, device="cuda").int()
    view = pool.permute(1, 2, 3, 0, 4, 5)  # [2, B, Hkv, n, bs, D]
    return q, [Segment(view[0], view[1], block_table=table)], pool


def graph_ms(fn) -> float:
    """Median milliseconds of fn replayed from a CUDA graph: GPU time, no host overhead."""
    try:
        return do_bench_cudagraph(fn, rep=30, return_mode="median")
    except torch.AcceleratorError:  # a CUDA error, sticky: not a call that cannot be captured
        raise
    except Exception:  # a call that cannot be captured keeps the other figures
        traceback.print_exc()
        return float("nan")


def queued_ms(fn, n=40) -> float:
    """GPU milliseconds per call of n eager calls run back to back: they are queued
    behind a sleeping kernel, so that the host's launch time stays off the GPU's timeline. Unlike a
    graph replay, each call is the eager call a runtime makes (what a call does only when captured
    into a graph, such as the fused merge's zeroing of its counters, is left out)."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(50e6))  # tens of ms of clock cycles: longer than queueing n calls takes
    start.record()
    for _ in range(n):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def host_us(fn, n=200) -> float:
    """Host microseconds per call: n calls enqueued without waiting for the GPU."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    elapsed = time.perf_counter() - start
    torch.cuda.synchronize()
    return elapsed / n * 1e6


def bench_decode(bs, ceiling, rows):
    """Each figure twice: do_bench (L2 flushed before each call; host overhead shows when it
    exceeds the flush) and CUDA-graph replay (GPU time only)."""
    scale = D**-0.5
    for B, L in itertools.product((1, 8), (32768, 65536, 131072)):
        kv_bytes = 2 * B * HKV * L * D * 2
        q, segs, kv = decode_inputs(B, L, bs, "dense")
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], scale=scale, enable_gqa=True)
        t_sdpa, g_sdpa = ms(sdpa), graph_ms(sdpa)
        ref = sdpa()[:, :, 0].float()
        for layout in ("dense", "pool"):
            if layout == "pool":
                del kv, segs
                q, segs, kv = decode_inputs(B, L, bs, "pool")
                ref = None
            ours = lambda: decode_attention(q, segs, scale)
            t, g = ms(ours), graph_ms(ours)
            err = None if ref is None else (ours()[0] - ref).abs().max().item()
            row = dict(kind="decode", B=B, L=L, layout=layout, ms=t, gbs=kv_bytes / t / 1e6, graph_ms=g,
                       graph_gbs=kv_bytes / g / 1e6, ceiling_gbs=ceiling, of_ceiling=kv_bytes / t / 1e6 / ceiling,
                       sdpa_ms=t_sdpa, sdpa_gbs=kv_bytes / t_sdpa / 1e6, sdpa_graph_ms=g_sdpa,
                       sdpa_graph_gbs=kv_bytes / g_sdpa / 1e6, max_abs_err_vs_sdpa=err)
            rows.append(row)
            print(f"decode B={B} {L // 1024:3d}K {layout:5s} {t:7.3f} ms {row['gbs']:6.0f} GB/s {100 * row['of_ceiling']:5.1f}%"
                  f" | graph {g:7.3f} ms {row['graph_gbs']:6.0f} GB/s {100 * row['graph_gbs'] / ceiling:5.1f}%"
                  f" | SDPA {t_sdpa:7.3f} ms, graph {g_sdpa:7.3f} ms {row['sdpa_graph_gbs']:6.0f} GB/s"
                  f" | ceiling {ceiling:5.0f}", flush=True)
        del kv, segs
        torch.cuda.empty_cache()


def bench_host_overhead(rows, rounds=5):
    """Host time per call at B=1, 32K, where the GPU part is shortest: the calls alternated over
    `rounds` rounds of 200 each, the median kept."""
    scale = D**-0.5
    q, segs, kv = decode_inputs(1, 32768, 16, "dense")
    fused, merge_kernel = default_launches(q)
    thread_loads = DecodeLaunch(block_n=128, programs_per_sm=2, tma=False)
    calls = {
        "decode_attention (default)": lambda: decode_attention(q, segs, scale),
        "decode_attention (fused merge)": lambda: decode_attention(q, segs, scale, fused),
        "decode_attention (merge kernel)": lambda: decode_attention(q, segs, scale, merge_kernel),
        "decode_attention (thread loads, fused merge)": lambda: decode_attention(q, segs, scale, thread_loads),
        "torch SDPA enable_gqa": lambda: F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], scale=scale,
                                                                        enable_gqa=True),
    }
    times = {name: [] for name in calls}
    for _ in range(rounds):
        for name, fn in calls.items():
            times[name].append(host_us(fn))
    for name, us in times.items():
        rows.append(dict(kind="host_overhead", call=name, host_us=statistics.median(us), host_us_rounds=us))
        print(f"host time per call, B=1 32K: {name:44s} {statistics.median(us):6.1f} us "
              f"(rounds {min(us):.1f}-{max(us):.1f})", flush=True)


SWEEP_SHAPES = ((1, 32768), (1, 131072), (8, 32768), (8, 131072))


def batch_by_tokens(text: str) -> tuple[int, int]:
    """argparse type of a sweep shape: BATCHxTOKENS, two positive integers, as (batch, tokens)."""
    batch, _, tokens = text.partition("x")
    if not (batch.isdigit() and tokens.isdigit() and int(batch) > 0 and int(tokens) > 0):
        raise argparse.ArgumentTypeError(f"got {text!r}, expected BATCHxTOKENS, e.g. 8x32768")
    return int(batch), int(tokens)


SWEEP_GRIDS = {  # (fused merge, programs per SM, warps, (tokens per tile, stages)) by how tiles are loaded
    "tma": ((True, False), (1, 2, 4), (4, 8), ((64, 3), (64, 4), (64, 5), (128, 2), (128, 3))),
    "threads": ((True, False), (1, 2, 3, 4), (2, 4, 8), ((32, 3), (64, 2), (64, 3), (64, 4), (128, 2), (128, 3))),
}


def sweep_decode(bs, ceiling, rows, shapes=SWEEP_SHAPES, loads=("tma",)):
    """Launch shapes of decode_attention on a block pool, each timed from CUDA-graph replay (GPU
    time) and by do_bench (host time shows where it exceeds the GPU's), beside SDPA on the same
    tokens laid out dense. `loads`: the tile loads to sweep (the tensor memory accelerator's, the
    threads' own), each over its own grid."""
    scale = D**-0.5
    grid = [(tma, *shape) for tma in loads for shape in itertools.product(*SWEEP_GRIDS[tma])]
    for B, L in shapes:
        kv_bytes = 2 * B * HKV * L * D * 2
        q, segs, kv = decode_inputs(B, L, bs, "dense")
        sdpa = lambda: F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], scale=scale, enable_gqa=True)
        sdpa_graph = graph_ms(sdpa)
        del kv, segs
        q, segs, kv = decode_inputs(B, L, bs, "pool")
        for loads_by, fused, pps, warps, (bn, stages) in grid:
            launch = DecodeLaunch(block_n=bn, num_warps=warps, num_stages=stages, programs_per_sm=pps, fused_merge=fused,
                                  tma=loads_by == "tma")
            try:
                g = graph_ms(lambda: decode_attention(q, segs, scale, launch))
                t = ms(lambda: decode_attention(q, segs, scale, launch))
            except torch.AcceleratorError:  # a CUDA error is sticky: every later launch would fail too
                raise
            except Exception as e:  # a shape that does not fit the SM (shared memory) is skipped
                print(f"sweep skip {launch}: {type(e).__name__}", flush=True)
                continue
            rows.append(dict(kind="decode_sweep", B=B, L=L, loads=loads_by, block_n=bn, num_warps=warps, num_stages=stages,
                             programs_per_sm=pps, fused_merge=fused, ms=t, gbs=kv_bytes / t / 1e6, graph_ms=g,
                             graph_gbs=kv_bytes / g / 1e6, sdpa_graph_ms=sdpa_graph, ceiling_gbs=ceiling,
                             of_ceiling=kv_bytes / g / 1e6 / ceiling))
        ranked = sorted((r for r in rows if r["kind"] == "decode_sweep" and r["B"] == B and r["L"] == L),
                        key=lambda r: r["graph_ms"])
        print(f"sweep B={B} {L // 1024}K: SDPA graph {sdpa_graph:.4f} ms {kv_bytes / sdpa_graph / 1e6:.0f} GB/s", flush=True)
        for r in ranked[:6] + ranked[-1:]:
            print(f"  {r['loads']:7s} bn {r['block_n']:3d} w {r['num_warps']} s {r['num_stages']} pps {r['programs_per_sm']} "
                  f"fused {r['fused_merge']!s:5s} graph {r['graph_ms']:.4f} ms ({r['graph_ms'] / sdpa_graph:.3f}x SDPA, "
                  f"{100 * r['of_ceiling']:.1f}% of copy) do_bench {r['ms']:.4f} ms", flush=True)
        del kv, segs
        torch.cuda.empty_cache()


ROUND_SHAPES = ((1, 32768), (1, 65536), (1, 131072), (8, 32768), (8, 65536), (8, 131072))


def bench_rounds(bs, ceiling, rows, shapes=ROUND_SHAPES, rounds=5):
    """GPU time of SDPA and of both default launch shapes over a block pool, by graph replay and by
    eager calls queued back to back, alternated `rounds` times in one process, so that drift
    within a run (seen at 4-10% between sections) falls on every call alike; the medians are
    compared, and the shape `decode_attention` picks is named."""
    scale = D**-0.5
    for B, L in shapes:
        kv_bytes = 2 * B * HKV * L * D * 2
        q, dense_segs, kv = decode_inputs(B, L, bs, "dense")
        _, segs, pool = decode_inputs(B, L, bs, "pool")
        fused, merge_kernel = default_launches(q)
        chosen = default_launch(q, HKV, L)
        calls = {"torch SDPA (dense)": lambda: F.scaled_dot_product_attention(q[:, :, None], kv[0], kv[1], scale=scale,
                                                                                enable_gqa=True)}
        for name, launch in (("fused merge", fused), ("merge kernel", merge_kernel)):
            calls[name + (" (default)" if launch == chosen else "")] = functools.partial(
                decode_attention, q, segs, scale, launch)
        graphs = {name: [] for name in calls}
        queued = {name: [] for name in calls}
        for _ in range(rounds):
            for name, fn in calls.items():
                graphs[name].append(graph_ms(fn))
                queued[name].append(queued_ms(fn))
        sdpa = "torch SDPA (dense)"
        sdpa_graph, sdpa_queued = statistics.median(graphs[sdpa]), statistics.median(queued[sdpa])
        print(f"rounds B={B} {L // 1024}K ({rounds} rounds, medians; graph replay, and eager calls queued back "
              "to back):", flush=True)
        for name in calls:
            g, qd = statistics.median(graphs[name]), statistics.median(queued[name])
            rows.append(dict(kind="decode_rounds", B=B, L=L, call=name, graph_ms=g, graph_ms_rounds=graphs[name],
                             queued_ms=qd, queued_ms_rounds=queued[name], graph_vs_sdpa=g / sdpa_graph,
                             queued_vs_sdpa=qd / sdpa_queued, graph_gbs=kv_bytes / g / 1e6,
                             queued_gbs=kv_bytes / qd / 1e6,
                             ceiling_gbs=ceiling, of_ceiling=kv_bytes / min(g, qd) / 1e6 / ceiling))
            print(f"  {name:28s} graph {1e3 * g:7.1f} us {g / sdpa_graph:.3f}x SDPA | queued {1e3 * qd:7.1f} us "
                  f"{qd / sdpa_queued:.3f}x SDPA {100 * kv_bytes / qd / 1e6 / ceiling:5.1f}% of copy "
                  f"(rounds {1e3 * min(queued[name]):.1f}-{1e3 * max(queued[name]):.1f})", flush=True)
        del kv, pool, segs, dense_segs
        torch.cuda.empty_cache()


def _print_row(r, label):
    print(f"{label:72s} {r['ms']:8.3f} ms {r['gbs']:8.1f} GB/s  ceiling {r['ceiling_gbs']:7.1f}"
          f"  {100 * r['of_ceiling']:5.1f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--gather-tokens", type=int, default=131072)
    parser.add_argument("--sweep", action="store_true", help="also try launch shapes of the kernels")
    parser.add_argument("--sweep-shapes", nargs="+", type=batch_by_tokens, default=SWEEP_SHAPES, metavar="BxTOKENS",
                        help="the decode sweep's batch x context shapes")
    parser.add_argument("--sweep-loads", nargs="+", default=["tma"], choices=sorted(SWEEP_GRIDS),
                        help="the decode sweep's tile loads: the tensor memory accelerator's, the threads' own")
    parser.add_argument("--sections", nargs="+", default=["gather", "host", "decode"],
                        choices=["gather", "host", "decode", "rounds"],
                        help="which sections to run (rounds: the default launches and SDPA alternated, not by default)")
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the host and rounds sections")
    args = parser.parse_args()
    for batch, tokens in args.sweep_shapes:
        if tokens % args.block_size:
            parser.error(f"--sweep-shapes {batch}x{tokens}: the tokens must fill whole blocks of --block-size {args.block_size}")
    result = {"device": torch.cuda.get_device_name(), "block_size": args.block_size, "rows": []}
    pinned = pinned_copy_gbs()
    d2d = device_copy_gbs()
    result.update(pinned_copy_gbs=pinned, device_copy_gbs=d2d)
    print(f"ceilings: pinned->GPU copy_ 1 GiB {pinned:.1f} GB/s; device copy (read+write) {d2d:.0f} GB/s", flush=True)
    print(f"{'case':72s} {'time':>11s} {'rate':>13s}  {'ceiling':>15s}  {'share':>6s}")

    def save():
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)

    sections = {"gather": lambda: bench_gather(args.gather_tokens, args.block_size, pinned, args.sweep, result["rows"]),
                "host": lambda: bench_host_overhead(result["rows"], args.rounds),
                "decode": lambda: bench_decode(args.block_size, d2d, result["rows"]),
                "rounds": lambda: bench_rounds(args.block_size, d2d, result["rows"], rounds=args.rounds)}
    sections = [sections[name] for name in args.sections]
    if args.sweep:
        sections.append(lambda: sweep_decode(args.block_size, d2d, result["rows"], args.sweep_shapes,
                                             args.sweep_loads))
    for section in sections:
        try:
            section()
        except Exception:  # keep the other sections' numbers
            traceback.print_exc()
        save()


if __name__ == "__main__":
    main()
