"""The GPU tier: one slab of block slots in device memory (the CPU on machines without CUDA)."""

from __future__ import annotations

from typing import Sequence

import torch

from .tier import SlabTier


class GpuPool(SlabTier):
    """`n_slots` blocks in one device tensor `slab` [n_slots, *block_shape].

    `write` and `read_into` copy synchronously (they wait for the copy); the pipeline, which owns
    the CUDA streams, moves runs of slots asynchronously through `slab` with `copy_slots`.
    """

    name = "gpu"

    def __init__(self, n_slots: int, block_shape: Sequence[int], dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str | None = None):
        super().__init__(n_slots, block_shape, dtype)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.slab = torch.empty((n_slots, *self.block_shape), dtype=dtype, device=self.device)

    def close(self) -> None:
        """Drop the slab (views handed out keep their memory alive)."""
        self.slab = torch.empty((0, *self.block_shape), dtype=self.dtype, device=self.device)
