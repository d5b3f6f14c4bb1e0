"""A layer's gathered K and V rows, kept on the GPU from one decode step to the next (`reuse_rows`).

Consecutive decode steps select much the same tokens for a layer (about half, on the fidelity
model): the rows a layer already holds are moved within its buffer rather than fetched again over
PCIe, and only the newly selected ones are gathered from pinned host memory. Every operation has
fixed shapes and reads no count back to the host, so a step never waits on the GPU for it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gpu_kernels import gather_tokens
from .token_sets import live_entries, members, missing_tokens


@dataclass
class HeldRows:
    """The first `count` rows of `buffer` hold the K and V of the positions in the first `count`
    entries of `idx`, per batch row and KV head. Row `width` of the buffer (and entry `width` of
    `idx`) is a dump that writes of nothing land in."""

    buffer: torch.Tensor  # [2, B, Hkv, width + 1, D]
    idx: torch.Tensor  # int32 [B, Hkv, width + 1]
    count: torch.Tensor  # int32 [B, Hkv]

    @classmethod
    def empty(cls, batch: int, kv_heads: int, width: int, head_dim: int, dtype, device) -> "HeldRows":
        return cls(torch.empty(2, batch, kv_heads, width + 1, head_dim, dtype=dtype, device=device),
                   torch.zeros(batch, kv_heads, width + 1, dtype=torch.int32, device=device),
                   torch.zeros(batch, kv_heads, dtype=torch.int32, device=device))

    @staticmethod
    def nbytes(batch: int, kv_heads: int, width: int, head_dim: int, dtype: torch.dtype) -> int:
        rows = batch * kv_heads * (width + 1)
        return rows * (2 * head_dim * torch.finfo(dtype).bits // 8 + 4) + batch * kv_heads * 4

    @property
    def width(self) -> int:
        return self.idx.shape[-1] - 1

    def refill(self, pool: torch.Tensor, table: torch.Tensor, selected: torch.Tensor, count: torch.Tensor,
               scratch: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
        """Make the first `count` rows hold the `selected` positions (in [lo, hi); the held ones lie
        there too): rows held already move into the places of those no longer wanted, the missing
        ones are gathered from `pool` by `table` through `scratch` [2, B, Hkv, >= N, D].
        Returns the rows gathered from the pool, int32 [B, Hkv]."""
        width, n = self.width, selected.shape[-1]
        held_idx = self.idx[..., :width]
        missing, fetched = missing_tokens(selected, count, held_idx, self.count, lo, hi)
        kept = members(held_idx, live_entries(held_idx, self.count), selected, count, lo, hi)
        pos = torch.arange(width, device=selected.device)
        wanted = count[..., None]
        hole = (pos < wanted) & ~kept  # places below the new count that a kept row does not fill
        mover = kept & (pos >= wanted)  # kept rows above it, which move down into holes
        holes = (~hole).to(torch.uint8).sort(dim=-1, stable=True).indices  # hole places first, ascending
        movers = (~mover).to(torch.uint8).sort(dim=-1, stable=True).indices
        n_mov = mover.sum(-1, keepdim=True)
        # The movers fill the first holes: rows at or above the count go below it, so no row is both read and written.
        moving = pos < n_mov
        self._move(torch.where(moving, movers, width), torch.where(moving, holes, width))
        # The missing rows, gathered from the pool, fill the rest.
        gather_tokens(pool, table, missing, fetched, scratch[:, :, :, :n])
        j = torch.arange(n, device=selected.device)
        arriving = j < fetched[..., None]
        places = torch.where(arriving, holes.gather(-1, (j + n_mov).clamp(max=width - 1)), width)
        index = places.long()[None, ..., None].expand(2, -1, -1, -1, self.buffer.shape[-1])
        self.buffer.scatter_(3, index, scratch[:, :, :, :n])
        self.idx.scatter_(-1, places.long(), missing)
        self.count.copy_(count)
        return fetched

    def _move(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Row `src[i]` to row `dst[i]`, for every i (both `width` where nothing moves)."""
        src, dst = src.long(), dst.long()
        d = self.buffer.shape[-1]
        rows = self.buffer.gather(3, src[None, ..., None].expand(2, -1, -1, -1, d))
        self.buffer.scatter_(3, dst[None, ..., None].expand(2, -1, -1, -1, d), rows)
        self.idx.scatter_(-1, dst, self.idx.gather(-1, src))

    def segment_views(self) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V [B, Hkv, width, D] (the first `count` rows of each hold the positions)."""
        return self.buffer[0, :, :, : self.width], self.buffer[1, :, :, : self.width]
