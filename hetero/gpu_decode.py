"""Decode attention on the GPU over the cache's pieces where they lie, through the Triton kernel.

The resident blocks are read in place in the GPU pool through a block table (no gather copy), the
fetched blocks in their ring buffer, the new token as it came; one kernel call covers them all and
returns (out, lse) for the merge with the CPU's part.
"""

from __future__ import annotations

import torch

from .gpu_kernels import Segment, decode_attention


def applies(query: torch.Tensor, key_valid, sliding_window) -> bool:
    """The kernel path covers a CUDA decode step without padding or a sliding window."""
    return query.is_cuda and query.shape[2] == 1 and key_valid is None and sliding_window is None


def pool_segment(slab: torch.Tensor, table: torch.Tensor, valid_tokens: int) -> Segment:
    """The blocks `table` lists of the pool `slab` [n_slots, 2, B, Hkv, bs, D], in that order, of
    which the first `valid_tokens` tokens are attended."""
    k = slab[:, 0].permute(1, 2, 0, 3, 4)
    v = slab[:, 1].permute(1, 2, 0, 3, 4)
    length = torch.full((slab.shape[2],), valid_tokens, dtype=torch.int32, device=slab.device)
    return Segment(k, v, length=length, block_table=table)


def blocks_segment(blocks: torch.Tensor) -> Segment:
    """Consecutive complete blocks [n, 2, B, Hkv, bs, D] (a fetch buffer)."""
    return Segment(blocks[:, 0].permute(1, 2, 0, 3, 4), blocks[:, 1].permute(1, 2, 0, 3, 4))


def new_tokens_segment(keys: torch.Tensor, values: torch.Tensor) -> Segment:
    """The step's own key and value [B, Hkv, 1, D]."""
    return Segment(keys, values)


def attend_segments(query: torch.Tensor, segments: list[Segment], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of `query` [B, Hq, 1, D] over the segments: (out [B, Hq, 1, D], lse [B, Hq, 1]) float32."""
    out, lse = decode_attention(query[:, :, 0], segments, scale)
    return out[:, :, None], lse[:, :, None]
