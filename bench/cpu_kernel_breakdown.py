"""Where the CPU decode kernel's compute goes: the kernel in cache, whole and with parts cut out.

Every block of the table names one slot, so that reads hit the caches and the rate is the compute's.
Each variant is a copy of `cpu_kernels` with one edit to `_kernel.py` (the edit must apply: a
kernel that changed shape fails here, not silently), timed in alternating rounds in one process:
- full: the kernel as it is;
- no_prefetch: the same, with no prefetch of the next tile (`PREFETCH_NEXT_TILE = 0`);
- no_scores, no_values: the hand-built bfloat16 loops' scores, or value sums, skipped;
- bookkeeping: scores and value sums both skipped (softmax, row lists, prefetches, merge);
- called_steps: the hand-built score step and the next tile's prefetch called as functions, as before
  they were inlined into the tile loop (each call passed its arrays field by field on the stack);
- dpbf16_scores: scores by vdpbf16ps on bfloat16 parts of the query where the CPU has AVX512-BF16
  (`SCORES_BY_DPBF16`), not by widening and vfmadd231ps;
- serial_max: a tile's softmax takes each head's max in one chain of compares, as it did;
- one_load_values: value sums go by one load (32 elements of the 4 heads) a pass over the keys, as
  they did, not two;
- amx: the kernel with the AMX tile products (`_amx_tiles`), where the CPU runs them; amx_no_scores,
  amx_no_values: without its score or its value tile products; amx_no_tiles: without either (no
  tile instruction runs: the rest of its work, at the clock the vector code gets).
The others force the hand-built loops (`BF16_TILES = True`, `AMX_TILES = False`).
With `--from-memory B` the variants read a pool of B sequences of `--tokens` tokens from host memory
at every thread count instead (B 4 at 128K: 2 GiB, past the last-level cache): set beside the rates
in cache, they show how much of the compute each core hides behind its reads.

    python3 bench/cpu_kernel_breakdown.py --threads 1 15 --out breakdown.json
"""

from __future__ import annotations

import argparse
import importlib
import os
import shutil
import statistics
import sys
import tempfile
import time

import numba
import torch

from bench_cpu_attention import cached_case, kernel_call, make_case
from json_out import write_json
from hetero.cpu_kernels._bf16_tiles import cpu_has_dpbf16
from hetero.cpu_kernels.attention import amx_ready

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SKIP_VALUES = ("    for g in range(0, G, HEADS):\n        accumulate_step(",
                "    return\n    for g in range(0, G, HEADS):\n        accumulate_step(")
_SKIP_SCORES = ("        for g in range(0, G, HEADS):\n            score_step(",
                "        for g in range(0, 0, HEADS):\n            score_step(")
_CALLED_STEPS = (("@overload(score_step, inline='always')\n", "@overload(score_step)\n", "_bf16_tiles.py"),
                 ("@njit(cache=True, _nrt=False, inline='always')\ndef _prefetch_step",
                  "@njit(cache=True, _nrt=False)\ndef _prefetch_step"),
                 ("@njit(cache=True, _nrt=False, inline='always')\ndef _prefetch_rows",
                  "@njit(cache=True, _nrt=False)\ndef _prefetch_rows"))
_DPBF16_SCORES = ("SCORES_BY_DPBF16 = False\n", "SCORES_BY_DPBF16 = True\n", "_bf16_tiles.py")
_SERIAL_MAX = ("        m_new = max(m[g], _row_max(scores[g], n))",
               "        top = scores[g, 0]\n        for j in range(1, n):\n            top = max(top, scores[g, j])\n"
               "        m_new = max(m[g], top)")
_ONE_LOAD_VALUES = ("        loads = 2 if _has_wide_vectors(context) else 1", "        loads = 1", "_bf16_tiles.py")
_AMX_SKIP_SCORES = ("        score_rows(pool, starts, kbuf, groups, qtiles, parts, sbuf, j)\n", "")
_AMX_SKIP_VALUES = ("        add_values(pbuf, j, chunks, vbuf, acc)\n", "")
VARIANTS = {
    "full": (),
    "no_prefetch": (),
    "no_scores": (_SKIP_SCORES,),
    "no_values": (_SKIP_VALUES,),
    "bookkeeping": (_SKIP_SCORES, _SKIP_VALUES),
    "called_steps": _CALLED_STEPS,
    "dpbf16_scores": (_DPBF16_SCORES,),
    "serial_max": (_SERIAL_MAX,),
    "one_load_values": (_ONE_LOAD_VALUES,),
    "amx": (),
    "amx_no_scores": (_AMX_SKIP_SCORES,),
    "amx_no_values": (_AMX_SKIP_VALUES,),
    "amx_no_tiles": (_AMX_SKIP_SCORES, _AMX_SKIP_VALUES),
}


def variant(name: str, edits, into: str):
    """The `attention` module of a copy of cpu_kernels with `edits` made: (old, new) to its
    `_kernel.py`, (old, new, file) to another of its files."""
    package = f"breakdown_{name}"
    dst = os.path.join(into, package)
    shutil.copytree(os.path.join(ROOT, "cpu_kernels"), dst, ignore=shutil.ignore_patterns("__pycache__"))
    for old, new, *where in edits:
        path = os.path.join(dst, where[0] if where else "_kernel.py")
        with open(path) as f:
            src = f.read()
        if old not in src:
            raise SystemExit(f"variant {name}: {os.path.basename(path)} no longer has the code it changes:\n{old}")
        with open(path, "w") as f:
            f.write(src.replace(old, new))
    module = importlib.import_module(f"{package}.attention")
    module.BF16_TILES = True
    module.AMX_TILES = name.startswith("amx")
    module.PREFETCH_NEXT_TILE = 0 if name == "no_prefetch" else module.PREFETCH_NEXT_TILE
    return module


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=131072, help="tokens a head, at the largest thread count")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 15])
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--from-memory", type=int, metavar="B", help="read B sequences from host memory, not the caches")
    p.add_argument("--out")
    args = p.parse_args(argv)
    most = max(args.threads)
    if most > numba.config.NUMBA_NUM_THREADS:
        p.error(f"--threads: at most {numba.config.NUMBA_NUM_THREADS} here")
    results = {"tokens": args.tokens, "rounds": args.rounds, "reps": args.reps, "from_memory": args.from_memory,
               "gbs": {}}
    with tempfile.TemporaryDirectory() as into:
        sys.path.insert(0, into)
        names = [n for n in args.variants if not n.startswith("amx") or amx_ready()]
        if not names:
            p.error("--variants: only AMX variants were asked for, and this CPU or OS does not run AMX tile products")
        modules = {name: variant(name, VARIANTS[name], into) for name in names}
        results["dpbf16"] = bool(cpu_has_dpbf16())
        if args.from_memory:
            q, pool, table = make_case(args.from_memory, args.tokens, torch.bfloat16, 32, 8, 128, 256)
        else:
            q, one_block, _ = make_case(1, 256, torch.bfloat16, 32, 8, 128, 256)  # a bfloat16 query: one part
        where = "from memory" if args.from_memory else "in cache"
        for threads in args.threads:
            if args.from_memory:
                tokens, slot = args.tokens, pool
            else:
                tokens = max(1024, args.tokens * threads // most)  # the same time a call at each thread count
                slot, table = cached_case(one_block, tokens)
            calls = {name: kernel_call(q, slot, table, tokens, threads, m.host_decode_attention)[0]
                     for name, m in modules.items()}
            kv_bytes = kernel_call(q, slot, table, tokens, threads)[1]
            times = {name: [] for name in calls}
            for call in calls.values():
                call()  # compiled (or loaded) and warm before any timing
            for _ in range(args.rounds):
                for name, call in calls.items():
                    for _ in range(args.reps):
                        start = time.perf_counter()
                        call()
                        times[name].append(time.perf_counter() - start)
            row = {name: kv_bytes / statistics.median(t) / 1e9 for name, t in times.items()}
            results["gbs"][str(threads)] = row
            print(f"{threads:>3} threads, {tokens} tokens a head, GB/s of KV {where}: "
                  + "  ".join(f"{name} {gbs:.1f}" for name, gbs in row.items()), flush=True)
    print(f"AVX512-BF16 used: {results['dpbf16']}")
    write_json(args.out, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
