"""The AMX kernel's pieces (`cpu_kernels/_amx_tiles.py`) timed alone on one core, in cache.

The AMX path computes right but runs slower than the vector loops, and its tile products cost
about as much as the vector products they replace (README, "AMX tile products"). This tells
apart what a piece costs by itself from what it costs right after vector code wrote its operands:
- scores: `score_rows` over K rows in the pool (3 groups of 16 keys a call), operands untouched;
- scores + read: the same, then the scores read back by vector code (as the kernel transposes them);
- values: `add_values` over 4 chunks of 32 keys, its weights and interleaved V untouched;
- interleave: `interleave_values` alone (4 chunks);
- interleave + values: V interleaved by vector stores, then the tile loads read it;
- weights + values: the weight rows written by vector code, then the tile loads read them.
Each prints nanoseconds per key (batch 1, 4 query heads, head_dim 128, bfloat16 query).

    python3 bench/amx_parts.py --out amx_parts.json
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np
from numba import njit

from amx_probe import random_bf16
from bench_cpu_attention import median_seconds
from json_out import write_json
from hetero.cpu_kernels._amx_tiles import (SCORE_GROUPS, VALUE_CHUNKS, add_values, interleave_values, query_tiles,
                                           score_rows, weight_rows)
from hetero.cpu_kernels.attention import amx_ready

D, G, KEYS = 128, 4, 2048  # a pool of 2048 K and 2048 V rows: 1 MiB, in L2
STEP = 16 * SCORE_GROUPS  # keys a score call covers
CHUNK_KEYS = 32 * VALUE_CHUNKS  # keys a value call covers


@njit(cache=False)
def _scores(pool, starts, kbuf, qtiles, sbuf, rounds, read):
    total = np.float32(0.0)
    for _ in range(rounds):
        for j in range(0, KEYS - STEP + 1, STEP):
            for i in range(SCORE_GROUPS):
                starts[i] = j + 16 * i
            score_rows(pool, starts, kbuf, SCORE_GROUPS, qtiles, 1, sbuf, 0)
            if read:
                for t in range(STEP):
                    for g in range(G):
                        total += sbuf[t, g]
    return total


@njit(cache=False)
def _values(pool, rows, pbuf, probs, vbuf, acc, rounds, interleave, values, weights):
    for _ in range(rounds):
        for j in range(0, KEYS - CHUNK_KEYS + 1, CHUNK_KEYS):
            if weights:
                weight_rows(probs, CHUNK_KEYS, CHUNK_KEYS, pbuf)
            if interleave:
                for k in range(VALUE_CHUNKS):
                    interleave_values(pool, rows, j + 32 * k, KEYS, vbuf, k)
            if values:
                add_values(pbuf, 0, VALUE_CHUNKS, vbuf, acc)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=200, help="passes over the 2048 keys a timing")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--out")
    args = p.parse_args(argv)
    if not amx_ready():
        print(json.dumps({"usable": False, "why": "this CPU or OS does not run AMX tile products"}))
        return 0
    rng = np.random.default_rng(0)
    pool = random_bf16(rng, (2 * KEYS, D))
    q = rng.standard_normal((1, G, D)).astype(np.float32)
    q = (q.view(np.uint32) & np.uint32(0xFFFF0000)).view(np.float32)  # a bfloat16 query: one part
    qtiles = np.zeros((3, D // 32, 16, 16), np.uint32)
    query_tiles(q, 0, 0, G, np.zeros((3, G, D // 2), np.uint32), qtiles)
    starts = np.zeros(SCORE_GROUPS, np.int64)
    kbuf = np.zeros((16 * SCORE_GROUPS, D), np.uint16)
    sbuf = np.zeros((STEP, 16), np.float32)
    rows = np.arange(KEYS + 32, dtype=np.int64) % KEYS
    probs = rng.random((G, CHUNK_KEYS)).astype(np.float32)
    pbuf = np.zeros((16, CHUNK_KEYS + 32), np.uint16)
    weight_rows(probs, CHUNK_KEYS, CHUNK_KEYS, pbuf)
    vbuf = np.zeros((VALUE_CHUNKS, D // 16, 16, 16), np.uint32)
    acc = np.zeros((16, D), np.float32)
    keys = KEYS * args.rounds
    _values(pool, rows, pbuf, probs, vbuf, acc, 1, True, False, False)  # vbuf filled once

    def values(interleave, add, weights):
        return lambda: _values(pool, rows, pbuf, probs, vbuf, acc, args.rounds, interleave, add, weights)

    cases = {
        "scores": lambda: _scores(pool, starts, kbuf, qtiles, sbuf, args.rounds, False),
        "scores + read": lambda: _scores(pool, starts, kbuf, qtiles, sbuf, args.rounds, True),
        "values": values(False, True, False),
        "interleave": values(True, False, False),
        "interleave + values": values(True, True, False),
        "weights + values": values(False, True, True),
    }
    result = {"usable": True, "ns_per_key": {}, "keys_per_timing": keys, "head_dim": D, "heads": G}
    for name, fn in cases.items():
        result["ns_per_key"][name] = median_seconds(fn, args.reps) / keys * 1e9
        print(f"{name:<22}{result['ns_per_key'][name]:8.2f} ns a key", flush=True)
    write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
