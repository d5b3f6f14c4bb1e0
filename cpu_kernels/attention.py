"""Decode attention over KV blocks in host memory, computed by the CPU (the `split` mode's half).

Front-ends over the Numba kernel in `_kernel`: they accept numpy arrays or torch CPU tensors
(bfloat16 pools are viewed as uint16 bits, zero-copy), check what the kernel would otherwise
read out of bounds, cut the work into per-core units and return the kind they were given.
"""

from __future__ import annotations

import threading

import numba
import numpy as np
import torch

from ._amx_tiles import MAX_DIM, MAX_HEADS, cpu_has_amx, request_tile_data
from ._bf16_tiles import CHUNK, HEADS
from ._kernel import (AMX_TILES as _AMX, BF16_LOOPS, BLOCK_WITHOUT_SLOT, LOOPS, RANGE_OUTSIDE_TABLE, attend_units,
                      build_units, check_ranges)
from .thread_cpus import pin_team

# Tuning knobs, set from bench/bench_cpu_attention.py --sweep on the 16-core machine: units of work
# per thread (equal shares of the tokens; more than one lets a thread that runs slow fall behind by
# less), the smallest unit, tokens per tile (a multiple of 4), and whether threads take units one
# at a time as they finish (dynamic), and into which cache a tile's computation prefetches the next
# tile's rows (1: L1, 2: L2, 0: none), and whether bfloat16 pools take the hand-built loops of
# `_bf16_tiles` where they apply (head_dim a multiple of 32, query heads per kv head a multiple of 4):
# None (the default) takes them wherever they apply, as they ran faster than Numba's own on every CPU
# measured: the H200 machine's Emerald Rapids host, scores by vfmadd231ps (2026-12-02,
# bench/results/split/cpu_attention_fma_scores.json), and a 2-core AMD EPYC (Zen 3) in their 256-bit
# form: 8.0 against 4.9 GB/s in cache on one thread; from memory on two, 9.4 against 8.9 at batch 1
# and 9.4 against 8.8 at batch 4 (`bench/results/avx2/cpu_attention.json`). True or False forces it.
# The next tile's rows go into L2: the kernel's read pattern alone, prefetching ahead, read 100-125
# GB/s into L2 against 82-98 into L1 (H200 machine, 2026-12-02, bench/results/split/read_pattern.json;
# its two pools were likely both on 4 KiB pages: see storage/host_pool.py's huge_pages), and from
# memory at 16 threads the kernel ran at 71.4 GB/s with it against 51.0 without any prefetch
# (split/breakdown_from_memory.json).
# SPREAD_V_PREFETCH: the hand-built loops issue the next tile's V prefetches over every pass of their
# value sums (each pass the lines of its elements) instead of all in the first, which took about an
# eighth of a tile's time on one core (bench/vector_parts.py: value sums 7.9 ns a key of a ~30 ns
# tile, in two passes at head_dim 128). A guess at why the kernel reads at 82-86% of its own reads
# without math (bench/kernel_rounds.py). Off: against the default in the same rounds it ran at 1.02x
# (batch 1, rounds 0.82-1.12x) and 1.09x (batch 4), and split's decode steps were no shorter with it
# (bench/results/split/kernel_rounds_knobs_b*_2026-12-02b.json, steps_knobs_2026-12-02b.json).
# Tiles of 128 tokens: best for those loops in three sweeps (85.9 against 82.9 GB/s for 64 in the last).
# AMX_TILES: whether bfloat16 pools take the AMX tile products of `_amx_tiles` (head_dim a multiple of
# 32 up to 256, at most 8 query heads per kv head) before the hand-built loops: True where the CPU has
# AMX and Linux grants the tile state (elsewhere an error), None where they can run. Off by default:
# correct, but slower so far (in cache, 15 threads, H200 machine: 58.6 against 73.3 GB/s for the
# hand-built loops; `bench/cpu_kernel_breakdown.py`).
UNITS_PER_THREAD = 2
MIN_CHUNK = 256
TILE_TOKENS = 128
DYNAMIC_SCHEDULE = True
PREFETCH_NEXT_TILE = 2
SPREAD_V_PREFETCH = False
BF16_TILES: bool | None = None
AMX_TILES: bool | None = False
# THREAD_CPUS: the CPUs the calling thread's kernel team may run on (`thread_cpus.pin_team`, applied
# at its next call), to keep it off vCPUs the hypervisor steals from; None leaves the team where it
# is (or, after a set, lets it back onto every CPU). Off until measured on a host that steals.
THREAD_CPUS: list[int] | None = None
_threads: int | None = None
_amx_granted: bool | None = None
_placed = threading.local()  # (CPUs, threads) the calling thread's team was last confined to


def set_threads(n: int | None) -> None:
    """Threads for every later call that passes no `threads` (None: all of Numba's threads)."""
    global _threads
    if n is not None and not 1 <= n <= numba.config.NUMBA_NUM_THREADS:
        raise ValueError(f"threads: got {n}, expected 1..{numba.config.NUMBA_NUM_THREADS}")
    _threads = n


def amx_ready() -> bool:
    """Whether the kernels can run AMX tile products here: compiled for a CPU with AMX bfloat16,
    and the tile state granted by Linux (asked once)."""
    global _amx_granted
    if _amx_granted is None:
        _amx_granted = bool(cpu_has_amx()) and request_tile_data()
    return _amx_granted


def host_decode_attention(q, pool, block_table, ranges, scale, threads=None, *, chunk=None, out=None, lse=None,
                          done=None):
    """Attention of q over token ranges of the blocks of a host pool, in one pass over K and V.

    Args:
        q: float32 [B, Hq, D] (Hq = G * Hkv; query head h reads kv head h // G).
        pool: [n_slots, 2, B, Hkv, bs, D], C-contiguous: torch bfloat16/float16/float32, or numpy
            uint16 (bfloat16 bits), float16, float32.
        block_table: int32 [n_blocks]; logical block j lives in slot block_table[j].
        ranges: int32 [B, Hkv, R, 2], [start, end) logical positions per (row, kv head); empty
            ranges allowed, the ranges of one head must not overlap.
        scale: scores are (q . k) * scale.
        threads: cores to use for this call (default: `set_threads`, else all).
        chunk: tokens per parallel unit of work (default: UNITS_PER_THREAD units per thread).
        out, lse: optional float32 [B, Hq, D] and [B, Hq] to write into.
        done: optional (flag, number): the kernel sets flag (int32, one element) to number once out
            and lse are written, before it returns and without the GIL (a GPU polling the flag may
            read them then).
    Returns:
        (out float32 [B, Hq, D], lse float32 [B, Hq]); a head with no token gets out 0, lse -inf.
        torch tensors when q is a torch tensor, numpy arrays otherwise.
    """
    qa, rows, fp16, (n_slots, B, Hkv, bs, D) = _operands(q, pool)
    table = _int32(block_table, "block_table", (None,))
    rng = _int32(ranges, "ranges", (B, Hkv, None, 2))
    # Only the blocks the ranges touch need a slot: others may be elsewhere (GPU, disk).
    status, n_tokens = check_ranges(rng, table, bs, n_slots)
    if status == RANGE_OUTSIDE_TABLE:
        raise ValueError(f"ranges: positions must lie in [0, {table.shape[0] * bs}) (block_table covers that)")
    if status == BLOCK_WITHOUT_SLOT:
        raise _slots_error(n_slots)
    return _run(q, qa, rows, fp16, table, _NO_INDEX, False, rng, n_tokens, Hkv, bs, scale, threads, chunk, out, lse,
                done)


def host_decode_attention_indexed(q, pool, block_table, token_idx, token_count, scale, threads=None, *, chunk=None, out=None, lse=None):
    """Attention of q over listed tokens: the first token_count[b, h] entries of token_idx[b, h].

    token_idx int32 [B, Hkv, N] (logical positions, no duplicates within a head), token_count
    int32 [B, Hkv]; entries past the count are never read. Other arguments and the result are
    those of `host_decode_attention`.
    """
    qa, rows, fp16, (n_slots, B, Hkv, bs, D) = _operands(q, pool)
    table = _int32(block_table, "block_table", (None,))
    idx = _int32(token_idx, "token_idx", (B, Hkv, None))
    count = _int32(token_count, "token_count", (B, Hkv))
    if count.min(initial=0) < 0 or count.max(initial=0) > idx.shape[2]:
        raise ValueError(f"token_count: must lie in [0, {idx.shape[2]}] (token_idx's last dimension)")
    listed = idx[np.arange(idx.shape[2]) < count[..., None]]
    if listed.size:
        if listed.min() < 0 or listed.max() >= table.shape[0] * bs:
            raise ValueError(f"token_idx: positions must lie in [0, {table.shape[0] * bs})")
        _check_slots(table[np.unique(listed // bs)], n_slots)
    spans = np.stack([np.zeros_like(count), count], axis=-1)[:, :, None, :]
    return _run(q, qa, rows, fp16, table, idx, True, spans, int(count.sum()), Hkv, bs, scale, threads, chunk, out, lse)


def warmup(dtypes=("bfloat16", "float16", "float32")) -> None:
    """Compile (or load from Numba's cache) every kernel signature the given pool dtypes need."""
    for name in dtypes:
        dtype = getattr(torch, name) if isinstance(name, str) else name
        pool = torch.ones(1, 2, 1, 1, 5, 8, dtype=dtype)
        q = torch.ones(1, 1, 8)
        table = torch.zeros(1, dtype=torch.int32)
        host_decode_attention(q, pool, table, torch.tensor([[[[0, 5]]]], dtype=torch.int32), 1.0, chunk=2)
        host_decode_attention_indexed(q, pool, table, torch.zeros(1, 1, 1, dtype=torch.int32), torch.ones(1, 1, dtype=torch.int32), 1.0)


_NO_INDEX = np.zeros((1, 1, 1), np.int32)
_NO_FLAG = np.zeros(0, np.int32)
_TORCH_POOL_KINDS = {  # pool dtype -> (what the kernel reads it as, is float16)
    torch.bfloat16: (np.uint16, False),
    torch.float16: (np.uint16, True),
    torch.float32: (np.float32, False),
}
_NUMPY_POOL_KINDS = {
    np.dtype(np.uint16): (np.uint16, False),
    np.dtype(np.float16): (np.uint16, True),
    np.dtype(np.float32): (np.float32, False),
}


def _operands(q, pool):
    """float32 q as numpy, the pool as a zero-copy [rows, D] numpy view, fp16 flag, pool dims."""
    if pool.ndim != 6 or pool.shape[1] != 2:
        raise ValueError(f"pool: got shape {tuple(pool.shape)}, expected [n_slots, 2, B, Hkv, bs, D]")
    is_torch = isinstance(pool, torch.Tensor)
    kind = (_TORCH_POOL_KINDS if is_torch else _NUMPY_POOL_KINDS).get(pool.dtype)
    if kind is None:
        raise ValueError(f"pool: got dtype {pool.dtype}, expected bfloat16 (uint16 bits), float16 or float32")
    if is_torch:
        if pool.device.type != "cpu" or not pool.is_contiguous():
            raise ValueError("pool: expected a contiguous CPU tensor (the kernel reads it in place)")
        arr = pool.view(torch.int16).numpy() if pool.element_size() == 2 else pool.numpy()
    else:
        if not pool.flags.c_contiguous:
            raise ValueError("pool: expected a C-contiguous array (the kernel reads it in place)")
        arr = pool
    n_slots, _, B, Hkv, bs, D = pool.shape
    rows = arr.reshape(-1, D).view(kind[0])
    qa = q.detach().cpu().numpy() if isinstance(q, torch.Tensor) else np.asarray(q)
    qa = np.ascontiguousarray(qa, dtype=np.float32)
    if qa.ndim != 3 or qa.shape[0] != B or qa.shape[2] != D or qa.shape[1] % Hkv:
        raise ValueError(f"q: got shape {qa.shape}, expected [{B}, G * {Hkv}, {D}]")
    return qa, rows, kind[1], (n_slots, B, Hkv, bs, D)


def _int32(x, name, shape):
    a = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if len(a.shape) != len(shape) or any(want is not None and got != want for got, want in zip(a.shape, shape)):
        want = ", ".join("*" if s is None else str(s) for s in shape)
        raise ValueError(f"{name}: got shape {tuple(a.shape)}, expected [{want}]")
    return np.ascontiguousarray(a, dtype=np.int32)


def _check_slots(slots, n_slots):
    if slots.size and (slots.min() < 0 or slots.max() >= n_slots):
        raise _slots_error(n_slots)


def _slots_error(n_slots):
    return ValueError(f"block_table: slots must lie in [0, {n_slots})")


def _run(q, qa, rows, fp16, table, idx, indexed, spans, n_tokens, Hkv, bs, scale, threads, chunk, out, lse, done=None):
    n_threads = threads or _threads or numba.config.NUMBA_NUM_THREADS
    numba.set_num_threads(n_threads)
    _place_team(n_threads)
    B, Hq, D = qa.shape
    if chunk is None:
        chunk = max(MIN_CHUNK, -(-n_tokens // (n_threads * UNITS_PER_THREAD)))
    elif chunk < 1:
        raise ValueError(f"chunk: got {chunk}, expected a positive number of tokens")
    pieces, unit_begin, head_begin, n_parts = build_units(spans, chunk)
    out_np = _output(out, (B, Hq, D), "out")
    lse_np = _output(lse, (B, Hq), "lse")
    inner = _inner_loops(rows, fp16, D, Hq // Hkv)
    flag, number = (_NO_FLAG, 0) if done is None else (_flag(done[0]), int(done[1]))
    previous = numba.set_parallel_chunksize(1 if DYNAMIC_SCHEDULE else 0)
    try:
        attend_units(qa, rows, fp16, table, idx, indexed, pieces, unit_begin, head_begin, n_parts, Hkv, bs, TILE_TOKENS,
                     PREFETCH_NEXT_TILE, bool(SPREAD_V_PREFETCH), inner, float(scale), out_np, lse_np, flag, number)
    finally:
        numba.set_parallel_chunksize(previous)
    if isinstance(q, torch.Tensor):
        return (out if out is not None else torch.from_numpy(out_np)), (lse if lse is not None else torch.from_numpy(lse_np))
    return out_np, lse_np


def _place_team(n_threads: int) -> None:
    """Confine the calling thread's team to `THREAD_CPUS` where it (or the thread count) changed."""
    wanted = None if THREAD_CPUS is None else frozenset(THREAD_CPUS)
    placed = getattr(_placed, "state", None)
    if placed == (wanted, n_threads) or (wanted is None and placed is None):
        return
    if not pin_team(wanted):
        raise RuntimeError("THREAD_CPUS: this platform cannot confine the kernel's threads (Linux with glibc 2.30 "
                           "or later can); set it to None")
    _placed.state = None if wanted is None else (wanted, n_threads)


def _inner_loops(rows, fp16, D, G):
    """LOOPS, BF16_LOOPS or AMX_TILES for a call, from the knobs and what applies."""
    if AMX_TILES and not amx_ready():
        raise RuntimeError("AMX_TILES is True, but this CPU or OS cannot run AMX tile products; "
                           "set it to None (use them where they run) or False")
    bf16 = rows.dtype == np.uint16 and not fp16 and D % CHUNK == 0
    if bf16 and D <= MAX_DIM and G <= MAX_HEADS and (amx_ready() if AMX_TILES is None else AMX_TILES):
        return _AMX
    if bf16 and G % HEADS == 0 and BF16_TILES is not False:  # None: wherever they apply
        return BF16_LOOPS
    return LOOPS


def _flag(given):
    arr = given.numpy() if isinstance(given, torch.Tensor) else given
    if not (isinstance(arr, np.ndarray) and arr.shape == (1,) and arr.dtype == np.int32):
        raise ValueError("done: expected (flag, number), the flag an int32 array of one element")
    return arr


def _output(given, shape, name):
    if given is None:
        return np.empty(shape, np.float32)
    arr = given.numpy() if isinstance(given, torch.Tensor) else given
    if arr.shape != shape or arr.dtype != np.float32 or not arr.flags.c_contiguous:
        raise ValueError(f"{name}: expected a contiguous float32 array of shape {list(shape)}")
    return arr
