"""A piece of one layer's KV cache that decode attention reads, wherever its tokens sit on the GPU."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Segment:
    """Keys and values of one piece of the KV cache, with the valid range of each row.

    Args:
        k, v: dense [B, Hkv, L, D] or blocked [B, Hkv, n, bs, D], any strides (e.g. the view
            `pool[:, 0].permute(1, 2, 0, 3, 4)` of a pool [n_slots, 2, B, Hkv, bs, D]).
        length: int32 [B] or [B, Hkv]: the end (exclusive) of each row's valid tokens, counted
            from the segment's first logical token; an int: the same end for every row (no
            tensor to make per call); None means the whole segment.
        start: int32 [B]: the first valid token of each row (left padding); None means 0.
        block_table: int32 [n_blk]: logical block j is index block_table[j] along the n axis;
            None means blocks in order. Only for blocked k, v.
    """

    k: torch.Tensor
    v: torch.Tensor
    length: torch.Tensor | int | None = None
    start: torch.Tensor | None = None
    block_table: torch.Tensor | None = None

    def __post_init__(self) -> None:
        if self.k.dim() not in (4, 5) or self.k.shape != self.v.shape:
            raise ValueError(f"k, v: expected equal shapes [B, Hkv, L, D] or [B, Hkv, n, bs, D], "
                             f"got {tuple(self.k.shape)} and {tuple(self.v.shape)}")
        if self.length is not None and not isinstance(self.length, torch.Tensor):
            self.length = int(self.length)  # a numpy integer too
        if self.block_table is not None and not self.blocked:
            raise ValueError("block_table needs blocked k, v [B, Hkv, n, bs, D]")

    @property
    def blocked(self) -> bool:
        return self.k.dim() == 5

    @property
    def block_size(self) -> int:
        """Tokens per block; a dense segment is one block of all its tokens."""
        return self.k.shape[3] if self.blocked else self.k.shape[2]

    @property
    def capacity(self) -> int:
        """Logical tokens the segment can address."""
        if not self.blocked:
            return self.k.shape[2]
        n_blocks = self.k.shape[2] if self.block_table is None else self.block_table.shape[0]
        return n_blocks * self.k.shape[3]

    def logical_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V as dense [B, Hkv, capacity, D] in logical token order (a copy when blocked)."""
        if not self.blocked:
            return self.k, self.v
        k, v = self.k, self.v
        if self.block_table is not None:
            index = self.block_table.to(device=k.device, dtype=torch.long)
            k, v = k.index_select(2, index), v.index_select(2, index)
        B, Hkv, n, bs, D = k.shape
        return k.reshape(B, Hkv, n * bs, D), v.reshape(B, Hkv, n * bs, D)

    def valid_mask(self) -> torch.Tensor:
        """Bool [B, Hkv, capacity]: which logical tokens of each row are attended."""
        B, Hkv = self.k.shape[:2]
        pos = torch.arange(self.capacity, device=self.k.device)
        mask = torch.ones(B, Hkv, self.capacity, dtype=torch.bool, device=self.k.device)
        if isinstance(self.length, int):
            mask &= pos < self.length
        elif self.length is not None:
            length = self.length.to(self.k.device).long()
            length = length[:, None] if length.dim() == 1 else length
            mask &= pos < length[..., None]
        if self.start is not None:
            mask &= pos >= self.start.to(self.k.device).long()[:, None, None]
        return mask
