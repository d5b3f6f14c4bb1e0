"""Whether this machine's CPU runs AMX bfloat16 tile products from Numba, and how fast.

The CPU kernel (issue 4) spends its time on the products of each key and value row with 4 query
heads, 16 to 32 lanes at a time (`bench/cpu_kernel_breakdown.py`). A tile product multiplies 16
rows of 32 bfloat16 (one 64-byte line each, which the pool's K rows are) by 32 x 16 in one
instruction. This probe, for the GPU machine's host, prints and writes JSON:
- what the CPU reports (`amx_tile`, `amx_bf16` in /proc/cpuinfo) and what LLVM, Numba's compiler,
  will compile for (its host features, which also need the OS to have enabled the tile state);
- whether Linux grants this process the tile data (arch_prctl ARCH_REQ_XCOMP_PERM; without it the
  first tile instruction kills the process);
- one score tile checked against a float64 reference: 16 keys x 128 dims against 16 query columns;
- on one core, the keys scored per second that way, reading K rows at the pool's 256-byte stride.

    python3 bench/amx_probe.py --out amx.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

from bench_cpu_attention import median_seconds
from hetero.cpu_kernels._amx_tiles import TILE_BYTES, TILE_ROWS, Tiles, request_tile_data
from hetero.cpu_kernels.reference import pool_from_bits

CHUNK = 32  # bfloat16 per tile row
_I64 = ir.IntType(64)


@intrinsic
def score_tile(typingctx, keys, first_row, query_pairs, out):
    """out[16, 16] (float32) = keys[first_row:first_row + 16] . query, over 128 dims in chunks of 32.

    keys: uint16 [rows, 128] (bfloat16 bits, C-contiguous; the probe's head_dim, unrolled below);
    query_pairs: uint32 [4, 16, 16] (chunk, pair of dims, query column): dims 2i and 2i + 1 of a
    column in one word, the low half the even one (the tile layout of the second operand).
    One chain of products: each waits on the one before (the kernel's `_amx_tiles` runs several).
    """

    def codegen(context, builder, signature, args):
        at = signature.args
        k = context.make_array(at[0])(context, builder, args[0])
        q = context.make_array(at[2])(context, builder, args[2])
        o = context.make_array(at[3])(context, builder, args[3])
        first = context.cast(builder, args[1], at[1], types.int64)
        dim = cgutils.unpack_tuple(builder, k.shape)[1]
        tiles = Tiles(builder)
        acc = tiles.zero()
        key_base = builder.gep(k.data, [builder.mul(first, dim)])
        for c in range(0, 128 // CHUNK):
            a = tiles.load(key_base, _I64(c * CHUNK), builder.mul(dim, _I64(2)))
            b = tiles.load(q.data, _I64(c * TILE_ROWS * TILE_ROWS), _I64(TILE_BYTES))
            acc = tiles.dot(acc, a, b)
        tiles.store(o.data, _I64(0), _I64(TILE_BYTES), acc)
        return context.get_dummy_value()

    return types.none(keys, first_row, query_pairs, out), codegen


@njit(cache=False)
def _score_all(keys, query_pairs, out):
    """Score every 16 rows of keys; out [rows / 16, 16, 16]."""
    for t in range(keys.shape[0] // TILE_ROWS):
        score_tile(keys, t * TILE_ROWS, query_pairs, out[t])


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def query_pairs(q: np.ndarray) -> np.ndarray:
    """q [16, D] (bfloat16 bits, uint16) as the tile product's second operand: [D / 32, 16, 16] uint32."""
    cols, dim = q.shape
    pairs = q.reshape(cols, dim // CHUNK, CHUNK // 2, 2).astype(np.uint32)
    words = pairs[..., 0] | (pairs[..., 1] << np.uint32(16))  # [col, chunk, pair]
    return np.ascontiguousarray(words.transpose(1, 2, 0))


def bf16_to_f64(bits: np.ndarray) -> np.ndarray:
    return pool_from_bits(bits).double().numpy()


def random_bf16(rng, shape) -> np.ndarray:
    return (rng.standard_normal(shape).astype(np.float32).view(np.uint32) >> np.uint32(16)).astype(np.uint16)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=65536, help="K rows scored in the timing (multiple of 16)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args(argv)
    flags = cpu_flags()
    features = llvm.get_host_cpu_features()
    result = {
        "cpuinfo_amx_tile": "amx_tile" in flags, "cpuinfo_amx_bf16": "amx_bf16" in flags,
        "cpuinfo_avx512_bf16": "avx512_bf16" in flags,
        "llvm_amx_tile": bool(features.get("amx-tile")), "llvm_amx_bf16": bool(features.get("amx-bf16")),
        "host_cpu": llvm.get_host_cpu_name(),
    }
    print(json.dumps(result))
    if not (result["llvm_amx_tile"] and result["llvm_amx_bf16"]):
        result["usable"] = False
        result["why"] = "LLVM does not compile tile instructions for this CPU (no AMX, or the OS has not enabled its state)"
    else:
        result["arch_prctl_granted"] = request_tile_data()
        if not result["arch_prctl_granted"]:
            result["usable"] = False
            result["why"] = "Linux refused the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM)"
        else:
            result.update(_check_and_time(args.tokens, args.reps))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("usable", "why", "max_rel", "keys_per_s", "k_gbs"))}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


def _check_and_time(tokens: int, reps: int) -> dict:
    rng = np.random.default_rng(0)
    dim = 128
    keys = random_bf16(rng, (tokens, dim))
    q = random_bf16(rng, (TILE_ROWS, dim))
    qp = query_pairs(q)
    out = np.full((tokens // TILE_ROWS, TILE_ROWS, TILE_ROWS), np.nan, np.float32)
    _score_all(keys[:TILE_ROWS * 4], qp, out[:4])
    ref = bf16_to_f64(keys[:TILE_ROWS * 4]) @ bf16_to_f64(q).T  # [64 keys, 16 columns]
    got = out[:4].reshape(-1, TILE_ROWS).astype(np.float64)
    rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    best = median_seconds(lambda: _score_all(keys, qp, out), reps)
    return {"usable": bool(np.isfinite(got).all() and rel < 1e-5), "max_rel_error": rel,
            "keys_per_s_one_core": tokens / best, "k_gbs_one_core": keys.nbytes / best / 1e9,
            "timed_keys": tokens, "note": "16 query columns a tile; the kernel's 4 heads would use a quarter"}


if __name__ == "__main__":
    sys.exit(main())
