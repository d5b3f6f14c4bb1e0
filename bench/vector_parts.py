"""The hand-built vector loops' pieces (`cpu_kernels/_bf16_tiles.py`) in core cycles, alone in cache.

The kernel in cache runs several times slower than its multiply-adds alone would take at the
vector units' rate. This puts numbers on each piece in the same run:
- the core clock, from a chain of dependent register adds (one a cycle), on one core and on every
  core at once, and vfmadd231ps's rate on every core at once (half where two of the OS's cores share
  one physical core, which a VM may not report);
- the rate of vfmadd231ps and, where the CPU has it, vdpbf16ps (12 independent sums);
- per key (4 query heads, head_dim 128): the scores of `score_4x4` over K rows in L1, a tile's
  value sums (`accumulate_tile`, 128 keys, V rows in L1), the online softmax of a tile
  (`_softmax_tile`), the next tile's prefetch (`_prefetch_rows` of lines already in cache), and a
  whole tile (`_bf16_tile`, K and V rows in L2), without that prefetch and with it into L1 or L2.
Each in nanoseconds and in cycles of the measured clock, beside the fewest the multiply-adds need.

    python3 bench/vector_parts.py --out vector_parts.json
"""

from __future__ import annotations

import argparse
import sys

import numba
import numpy as np
import llvmlite.binding
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from amx_probe import cpu_flags, random_bf16
from bench_cpu_attention import median_seconds
from json_out import write_json
from hetero.cpu_kernels._bf16_tiles import (_has_dpbf16, _has_wide_vectors, accumulate_tile, cpu_has_dpbf16,
                                            query_parts, score_4x4, split_width)
from hetero.cpu_kernels._kernel import _bf16_tile, _prefetch_rows, _softmax_tile

llvmlite.binding.initialize_native_asmparser()  # Numba's JIT assembles no inline asm without it

D, G, TILE = 128, 4, 128
ADDS = 1000  # dependent adds an asm block
MULS = 50 * 12  # multiply-adds an asm block: 50 rounds over 12 sums


def _rate_asm(context, mnemonic):
    """12 independent sums of `mnemonic` (zmm, or ymm without AVX-512) from zeroed registers."""
    reg = "zmm" if _has_wide_vectors(context) else "ymm"
    count = 16 if reg == "ymm" else 14
    zero = "".join(f"vpxor %xmm{r}, %xmm{r}, %xmm{r}\n" for r in range(count))  # zeros: no slow denormals
    body = "".join(f"{mnemonic} %{reg}0, %{reg}1, %{reg}{r}\n" for r in range(2, 14))
    clobbers = ",".join(f"~{{xmm{r}}}" for r in range(count))
    return zero + ".rept 50\n" + body + ".endr\n", clobbers


@intrinsic
def _add_chain(typingctx, x):
    """x + ADDS through ADDS dependent register-to-register adds: ADDS cycles (Golden Cove's renamer
    folds adds of an immediate, several a cycle: they would overstate the clock)."""

    def codegen(context, builder, signature, args):
        fn = ir.FunctionType(ir.IntType(64), [ir.IntType(64), ir.IntType(64)])
        return builder.asm(fn, f".rept {ADDS}\naddq $1, $0\n.endr", "=r,r,0", [ir.Constant(ir.IntType(64), 1), args[0]],
                           True)

    return types.int64(types.int64), codegen


def _multiply_adds(mnemonic_of):
    @intrinsic
    def block(typingctx, x):
        def codegen(context, builder, signature, args):
            asm, clobbers = _rate_asm(context, mnemonic_of(context))
            builder.asm(ir.FunctionType(ir.VoidType(), []), asm, clobbers, [], True)
            return args[0]

        return types.int64(types.int64), codegen

    return block


_fma_block = _multiply_adds(lambda context: "vfmadd231ps")
_dp_block = _multiply_adds(lambda context: "vdpbf16ps" if _has_dpbf16(context) else "vfmadd231ps")


def _blocks_of(block):
    """A compiled loop that runs `block` (an asm intrinsic) `blocks` times."""

    @njit(cache=False)
    def run(blocks):
        x = 0
        for _ in range(blocks):
            x = block(x)
        return x

    return run


_adds, _fmas, _dps = _blocks_of(_add_chain), _blocks_of(_fma_block), _blocks_of(_dp_block)


def _everywhere(run):
    """`run` on every thread at once (one prange task each)."""

    @njit(parallel=True, cache=False)
    def each(blocks, threads):
        out = np.zeros(threads, np.int64)
        for t in prange(threads):
            out[t] = run(blocks)
        return out

    return each


_adds_everywhere, _fmas_everywhere = _everywhere(_adds), _everywhere(_fmas)


@njit(cache=False)
def _scores(q_bf16, q_f32, parts, pool, rows, scores, rounds):
    for _ in range(rounds):
        for j in range(0, TILE, 4):
            score_4x4(q_bf16, q_f32, parts, 0, pool, rows, j, np.float32(0.1), scores)


@njit(cache=False)
def _values(probs, pool, rows, acc, ahead, rounds):
    for _ in range(rounds):
        accumulate_tile(probs, 0, pool, rows, TILE, TILE, acc, ahead, 0, 0, False)


@njit(cache=False)
def _softmax(scores, m, l, acc, rounds):
    for _ in range(rounds):
        _softmax_tile(scores, TILE, TILE, m, l, acc)


@njit(cache=False)
def _prefetch(pool, ahead, rounds):
    for _ in range(rounds):
        _prefetch_rows(pool, ahead, 0, TILE, 0, 1)
        _prefetch_rows(pool, ahead, 0, TILE, TILE, 1)


@njit(cache=False)
def _tiles(q_bf16, q_f32, parts, pool, rows, scores, m, l, acc, ahead, level, rounds):
    for r in range(rounds):
        # The two halves of the pool take turns, each prefetching the other, as tiles do.
        first, second = (rows, ahead) if r % 2 == 0 else (ahead, rows)
        _bf16_tile(q_bf16, q_f32, parts, pool, first, 2 * TILE, TILE, TILE, np.float32(0.1), scores, m, l, acc, second,
                   TILE, level, False)


@njit(cache=False)
def _split_width():
    return split_width()


def _inputs(seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((1, G, D)).astype(np.float32)
    q = (q.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # a bfloat16 model's query: one part
    q_bf16, q_f32 = np.zeros((3, G, D // 2), np.uint32), np.zeros((1, G, D), np.float32)
    parts = query_parts(q, 0, 0, G, q_bf16, q_f32)
    pool = random_bf16(rng, (4 * TILE, D))  # K rows 0..2*TILE, V rows 2*TILE.. (v_rows = 2 * TILE)
    rows = np.arange(TILE + 31, dtype=np.int64) % TILE
    ahead = rows + TILE
    scores = rng.random((G, TILE + 31)).astype(np.float32)
    return dict(q_bf16=q_bf16, q_f32=q_f32, parts=parts, pool=pool, rows=rows, ahead=ahead, scores=scores,
                probs=scores.copy(), m=np.zeros(G, np.float32), l=np.ones(G, np.float32),
                acc=np.zeros((G, D), np.float32))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2000, help="tiles of 128 keys a timing")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args(argv)
    x = _inputs()
    n, blocks = args.rounds, 20000
    ghz = ADDS * blocks / median_seconds(lambda: _adds(blocks), args.reps) / 1e9
    threads = numba.config.NUMBA_NUM_THREADS
    ghz_all = ADDS * blocks / median_seconds(lambda: _adds_everywhere(blocks, threads), args.reps) / 1e9
    fma_rate = MULS * blocks / median_seconds(lambda: _fmas(blocks), args.reps) / 1e9 / ghz
    # Each thread's vfmadd231ps a cycle of its own clock with all threads busy: where the OS's cores
    # are two hardware threads of one physical core each (a VM may not say), about half the above.
    fma_rate_all = MULS * blocks / median_seconds(lambda: _fmas_everywhere(blocks, threads), args.reps) / 1e9 / ghz_all
    dp_rate = None  # vdpbf16ps where the CPU has it
    if "avx512_bf16" in cpu_flags():
        dp_rate = MULS * blocks / median_seconds(lambda: _dps(blocks), args.reps) / 1e9 / ghz
    keys = n * TILE
    cases = {
        "scores": lambda: _scores(x["q_bf16"], x["q_f32"], x["parts"], x["pool"], x["rows"], x["scores"], n),
        "values": lambda: _values(x["probs"], x["pool"], x["rows"], x["acc"], x["ahead"], n),
        "softmax": lambda: _softmax(x["scores"], x["m"], x["l"], x["acc"], n),
        "prefetch (lines in cache)": lambda: _prefetch(x["pool"], x["ahead"], n),
    }
    for level, name in ((0, "whole tile, no prefetch"), (1, "whole tile, prefetch to L1"),
                        (2, "whole tile, prefetch to L2")):
        cases[name] = lambda level=level: _tiles(x["q_bf16"], x["q_f32"], x["parts"], x["pool"], x["rows"], x["scores"],
                                                 x["m"], x["l"], x["acc"], x["ahead"], level, n)
    wide = _split_width() == 32
    lanes = 16 if wide else 8
    # The fewest cycles a key's multiply-adds take at the measured rates (4 heads x D each for
    # scores and for values): scores by vdpbf16ps where used (2 products an instruction a lane).
    floor = {"scores": G * D / (2 * lanes) / dp_rate if cpu_has_dpbf16() else G * D / lanes / fma_rate,
             "values": G * D / lanes / fma_rate}
    result = {"clock_ghz_one_core": ghz, "clock_ghz_every_core": ghz_all, "threads": threads,
              "vfmadd231ps_per_cycle": fma_rate, "vfmadd231ps_per_cycle_every_core": fma_rate_all,
              "vdpbf16ps_per_cycle": dp_rate, "vector_bits": 32 * lanes, "head_dim": D, "heads": G,
              "keys_per_timing": keys, "ns_per_key": {}, "cycles_per_key": {},
              "fewest_cycles_per_key": floor}
    print(f"clock {ghz:.2f} GHz on one core, {ghz_all:.2f} on {threads} at once; per cycle: vfmadd231ps {fma_rate:.2f},"
          f" vdpbf16ps {'none' if dp_rate is None else f'{dp_rate:.2f}'} ({32 * lanes}-bit); vfmadd231ps on"
          f" {threads} at once: {fma_rate_all:.2f} a cycle each", flush=True)
    for name, fn in cases.items():
        ns = median_seconds(fn, args.reps) / keys * 1e9
        result["ns_per_key"][name] = ns
        result["cycles_per_key"][name] = ns * ghz
        least = f"   (multiply-adds alone {floor[name]:.1f})" if name in floor else ""
        print(f"{name:<28}{ns:8.2f} ns {ns * ghz:7.1f} cycles a key{least}", flush=True)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
