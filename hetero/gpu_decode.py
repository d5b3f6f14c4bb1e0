"""Decode attention on the GPU over the cache's blocks where they lie, through the Triton kernel.

The resident blocks (the step's own token already stored among them) are read in place in the GPU
pool through a block table, with no gather copy; the fetched blocks in their ring buffers. One
kernel call covers them and returns (out, lse) for the merge with the CPU's part.
"""

from __future__ import annotations

import torch

from .gpu_kernels import Segment, decode_attention, default_launches, gather_tokens
from .gpu_kernels.host_flag import copy_when_raised

# Tests set this to run the kernel path on the CPU, in Triton's interpreter.
ON_CPU = False


def applies(query: torch.Tensor, key_valid, sliding_window) -> bool:
    """The kernel path covers a decode step without padding or a sliding window, on CUDA."""
    return (query.is_cuda or ON_CPU) and query.shape[2] == 1 and key_valid is None and sliding_window is None


def pool_segment(slab: torch.Tensor, table: torch.Tensor, valid_tokens: int) -> Segment:
    """The blocks `table` lists of the pool `slab` [n_slots, 2, B, Hkv, bs, D], in that order, of
    which the first `valid_tokens` tokens are attended."""
    # The length as an int: the same for every row, and no tensor (nor fill kernel) per call.
    return Segment(slab[:, 0].permute(1, 2, 0, 3, 4), slab[:, 1].permute(1, 2, 0, 3, 4), length=valid_tokens,
                   block_table=table)


def blocks_segment(blocks: torch.Tensor) -> Segment:
    """Consecutive complete blocks [n, 2, B, Hkv, bs, D] (a fetch buffer)."""
    return Segment(blocks[:, 0].permute(1, 2, 0, 3, 4), blocks[:, 1].permute(1, 2, 0, 3, 4))


def attend_segments(query: torch.Tensor, segments: list[Segment], scale: float,
                    launch=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query` [B, Hq, 1, D] over the segments: (out [B, Hq, 1, D], lse [B, Hq, 1]) float32."""
    out, lse = decode_attention(query[:, :, 0], segments, scale, launch)
    return out[:, :, None], lse[:, :, None]


def gathered_segment(rows: torch.Tensor, count: torch.Tensor) -> Segment:
    """Rows [2, B, Hkv, N, D] gathered by `gather_tokens`, of which the first `count` [B, Hkv] are valid."""
    return Segment(rows[0], rows[1], length=count)


def warmup(device, query_dtype: torch.dtype, kv_dtype: torch.dtype, q_heads: int, kv_heads: int, head_dim: int,
           block_size: int, gathers: bool = False, host_waits: bool = False) -> None:
    """Compile the kernel variants a generation uses (resident blocks alone, and with fetched
    blocks; with `gathers`, the gather of token rows from pinned memory and the attention over
    one or two gathered buffers too; with `host_waits`, the wait for a host job's flag and the copy
    of what it guards) now, at load, rather than in the middle of the first decode steps."""
    if host_waits:
        flag, words = torch.ones(1, dtype=torch.int32).pin_memory(), torch.zeros(5, dtype=torch.int32).pin_memory()
        copy_when_raised(flag, 1, torch.zeros(1, dtype=torch.int32).pin_memory(), words, torch.empty_like(words, device=device))
    pool = torch.randn(3, 2, 1, kv_heads, block_size, head_dim, device=device).to(kv_dtype)
    # The query as transformers hands it over: a [B, 1, Hq, D] projection viewed as [B, Hq, 1, D].
    query = torch.randn(1, 1, q_heads, head_dim, device=device).to(query_dtype).transpose(1, 2)
    table = torch.tensor([0, 2], dtype=torch.int32, device=device)
    resident = pool_segment(pool, table, block_size + 1)
    picked = []
    if gathers:
        host = pool.cpu().pin_memory()
        tokens = 2 * block_size - 3  # a width that is no multiple of anything
        idx = torch.randint(0, 2 * block_size, (1, kv_heads, tokens), dtype=torch.int32, device=device)
        count = torch.full((1, kv_heads), tokens - 1, dtype=torch.int32, device=device)
        rows = torch.empty(2, 1, kv_heads, tokens + 5, head_dim, dtype=kv_dtype, device=device)[:, :, :, :tokens]
        gather_tokens(host, table, idx, count, rows)
        picked = [gathered_segment(rows, count)] * 2
    for launch in default_launches(query[:, :, 0]):  # calls launch by their batch and length
        attend_segments(query, [resident], 1.0, launch)
        attend_segments(query, [resident, blocks_segment(pool[1:])], 1.0, launch)
        for n in range(1, len(picked) + 1):  # speculation's buffer, and the one its verification adds
            attend_segments(query, [*picked[:n], resident], 1.0, launch)
    if gathers:
        torch.cuda.synchronize(device)  # the pinned source must outlive the gather
