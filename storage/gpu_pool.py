"""The GPU tier: one slab of block slots in device memory (the CPU on machines without CUDA)."""

from __future__ import annotations

from typing import Sequence

import torch

from .tier import Pending, Tier


class GpuPool(Tier):
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

    def view(self, slot: int) -> torch.Tensor:
        """The block in `slot`, a view of the slab (no copy)."""
        return self.slab[slot]

    def write(self, slot: int, src: torch.Tensor) -> Pending:
        """Copy `src` into `slot`; done when it returns."""
        self._check_block("src", src)
        self.slab[self._check_slot(slot)].copy_(src)
        return Pending.done_now()

    def read_into(self, slot: int, dst: torch.Tensor) -> Pending:
        """Copy `slot` into `dst`; done when it returns."""
        self._check_block("dst", dst)
        dst.copy_(self.slab[self._check_slot(slot)])
        return Pending.done_now()

    def close(self) -> None:
        """Drop the slab (views handed out keep their memory alive)."""
        self.slab = torch.empty((0, *self.block_shape), dtype=self.dtype, device=self.device)
