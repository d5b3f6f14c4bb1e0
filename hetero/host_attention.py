"""Attention over blocks where they lie in host memory: the CPU's half of the `split` mode."""

from __future__ import annotations

import torch

from .partial_attention import attend


def attend_host_blocks(
    query: torch.Tensor,
    slab: torch.Tensor,
    first_slot: int,
    first_block: int,
    blocks: int,
    scale: float,
    valid_from: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of host `query` [B, Hq, Lq, D] over `blocks` consecutive blocks of a host slab.

    The blocks hold logical blocks `first_block`... of the layer, from slot `first_slot` of `slab`
    ([n_slots, 2, B, Hkv, bs, D]). `valid_from` [B] is each row's first non-padding position.
    Returns float32 (out [B, Hq, Lq, D], lse [B, Hq, Lq]) on the host.
    """
    bs = slab.shape[4]
    kv = slab[first_slot : first_slot + blocks]
    n, _, b, h, _, d = kv.shape
    kv = kv.permute(1, 2, 3, 0, 4, 5).reshape(2, b, h, n * bs, d).float()
    key_pos = torch.arange(first_block * bs, (first_block + n) * bs)
    valid = None if valid_from is None else key_pos[None, :] >= valid_from[:, None]
    return attend(query.float(), kv[0], kv[1], scale, key_pos, None, valid)
