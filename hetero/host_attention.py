"""Attention over blocks where they lie in host memory: the CPU's half of the `split` mode.

A decode step (one query per row) runs the Numba kernel over the host slab in place; a longer
query (never in `split` decode, kept for completeness) takes the PyTorch path.
"""

from __future__ import annotations

import numpy as np
import torch

from .cpu_kernels import host_decode_attention
from .partial_attention import attend


def attend_host_blocks(
    query: torch.Tensor,
    slab: torch.Tensor,
    block_table: np.ndarray,
    first_block: int,
    end_block: int,
    scale: float,
    valid_from: torch.Tensor | None,
    into=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of host `query` [B, Hq, Lq, D] over logical blocks [first_block, end_block) of a layer.

    `slab` is the host pool [n_slots, 2, B, Hkv, bs, D]; `block_table` (int32, one entry per logical
    block of the layer) gives each block's slot. `valid_from` [B] is each row's first non-padding
    position. Returns float32 (out [B, Hq, Lq, D], lse [B, Hq, Lq]) on the host. `into` (decode
    only): ((out, lse) tensors of those shapes, flag, number) to write the result into, the kernel
    then setting flag[0] to number itself, without the GIL (see `Pipeline.run_on_host`'s `posts`).
    """
    B, Hq, Lq, D = query.shape
    bs, kv_heads = slab.shape[4], slab.shape[3]
    lo, hi = first_block * bs, end_block * bs
    if Lq == 1:
        ranges = np.empty((B, kv_heads, 1, 2), np.int32)
        ranges[..., 0] = lo
        ranges[..., 1] = hi
        if valid_from is not None:
            ranges[..., 0] = np.maximum(lo, valid_from.numpy().astype(np.int32))[:, None, None]
        q = query[:, :, 0].float()
        if into is not None:
            (out, lse), flag, number = into
            host_decode_attention(q, slab, block_table, ranges, scale, out=out[:, :, 0], lse=lse[:, :, 0],
                                  done=(flag, number))
            return out, lse
        out, lse = host_decode_attention(q, slab, block_table, ranges, scale)
        return out[:, :, None], lse[:, :, None]
    if into is not None:
        raise ValueError(f"into: only a decode query (one position) writes into given tensors, got {Lq}")
    slots = torch.from_numpy(block_table[first_block:end_block].astype(np.int64))
    kv = slab[slots]
    n, _, b, h, _, d = kv.shape
    kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(2, b, h, n * bs, d).float()
    key_pos = torch.arange(lo, hi)
    valid = None if valid_from is None else key_pos[None, :] >= valid_from[:, None]
    return attend(query.float(), kv[0], kv[1], scale, key_pos, None, valid)


def attend_host_unselected(
    query: torch.Tensor,
    slab: torch.Tensor,
    block_table: np.ndarray,
    lo: int,
    hi: int,
    selected: torch.Tensor,
    count: torch.Tensor,
    scale: float,
    valid_from: torch.Tensor | None,
    blocks: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a decode query [B, Hq, 1, D] over the positions of [lo, hi) that were not selected.

    `selected` int32 [B, Hkv, N] holds, per KV head, `count` sorted positions inside [lo, hi) (the
    rest is padding); what lies between them is read as ranges, in one pass. `blocks` (bool
    [B, Hkv, blocks of [lo, hi)]), when given, limits them to the chosen blocks.
    """
    sel = selected.numpy()
    n = sel.shape[2]
    cnt = count.numpy()[..., None]
    beyond = np.arange(n) >= cnt
    sel = np.where(beyond, hi, sel).astype(np.int64)
    if blocks is not None:
        ranges = _ranges_in_blocks(sel, lo, hi, blocks.numpy(), slab.shape[4])
    else:
        ranges = np.empty((*sel.shape[:2], n + 1, 2), np.int32)
        ranges[..., 0, 0] = lo
        ranges[..., 1:, 0] = sel + 1
        ranges[..., :n, 1] = sel
        ranges[..., n, 1] = hi
    if valid_from is not None:
        ranges[..., 0] = np.maximum(ranges[..., 0], valid_from.numpy().astype(np.int32)[:, None, None])
    out, lse = host_decode_attention(query[:, :, 0].float(), slab, block_table, ranges, scale)
    return out[:, :, None], lse[:, :, None]


def _ranges_in_blocks(selected: np.ndarray, lo: int, hi: int, blocks: np.ndarray, block_size: int) -> np.ndarray:
    """The positions of [lo, hi) in the chosen blocks (`blocks` [B, Hkv, (hi - lo) / block_size] bool)
    that are not `selected` (int64 [B, Hkv, N], padded with hi), as ranges [B, Hkv, R, 2]."""
    b, h, _ = selected.shape
    wanted = np.repeat(blocks, block_size, axis=-1)  # [B, Hkv, hi - lo]
    rows, heads, _ = np.indices(selected.shape)
    inside = selected < hi
    wanted[rows[inside], heads[inside], selected[inside] - lo] = False
    edges = np.diff(wanted.astype(np.int8), axis=-1, prepend=0, append=0)  # +1 opens a range, -1 closes one
    width = max(1, int((edges > 0).sum(-1).max()))
    ranges = np.zeros((b, h, width, 2), np.int32)  # empty ranges (0, 0) pad
    for i in range(b):
        for j in range(h):
            starts, ends = np.flatnonzero(edges[i, j] > 0), np.flatnonzero(edges[i, j] < 0)
            ranges[i, j, : len(starts), 0] = starts + lo
            ranges[i, j, : len(ends), 1] = ends + lo
    return ranges
