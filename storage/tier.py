"""The one interface every storage tier offers: fixed-size block slots that can be allocated,
written, read into a caller's buffer and freed, within a budget.

A block is one layer's `bs` tokens for the whole batch, K and V: shape [2, B, Hkv, bs, D]. Tiers
only move bytes; which block lives where is decided by the placement, never inside a tier.
"""

from __future__ import annotations

import heapq
import math
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Iterable, Sequence

import torch

from .errors import TierFull

PAGE = 4096  # O_DIRECT alignment of addresses, lengths and offsets, and of host slot strides


class Pending:
    """A transfer that may still be running. `wait()` blocks until it is done and re-raises its error."""

    __slots__ = ("_future",)

    def __init__(self, future: Future | None = None):
        self._future = future

    @classmethod
    def done_now(cls) -> "Pending":
        """A transfer that already finished (the memory tiers copy synchronously)."""
        return cls(None)

    def done(self) -> bool:
        """True once the transfer finished, successfully or not."""
        return self._future is None or self._future.done()

    def wait(self) -> None:
        """Block until the transfer is done; raise its error if it failed."""
        if self._future is not None:
            self._future.result()


def wait_all(pendings: Iterable[Pending]) -> None:
    """Wait for every transfer, then raise the first error met (after all have finished)."""
    first = None
    for p in pendings:
        try:
            p.wait()
        except BaseException as e:  # noqa: BLE001 - re-raised below once all are done
            first = first or e
    if first is not None:
        raise first


def block_bytes_of(block_shape: Sequence[int], dtype: torch.dtype) -> int:
    """Bytes of one block of `block_shape` in `dtype`."""
    return math.prod(block_shape) * torch.empty((), dtype=dtype).element_size()


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


class SlotFreeList:
    """Free slots of a tier, lowest first, so that allocations tend to be consecutive runs, which
    move in one copy. Slots never handed out are implicit (a high-water mark); freed ones wait in
    a heap, all below the mark. A bitmap catches double frees and foreign slots."""

    def __init__(self, n_slots: int):
        self.n_slots = n_slots
        self._heap: list[int] = []  # freed slots, all < self._fresh
        self._fresh = 0  # slots >= this were never handed out
        self._used = bytearray(n_slots)

    @property
    def n_free(self) -> int:
        return len(self._heap) + self.n_slots - self._fresh

    def take(self, n: int) -> list[int] | None:
        """`n` slots, lowest first, or None when fewer are free."""
        if n > self.n_free:
            return None
        reused = min(n, len(self._heap))
        slots = [heapq.heappop(self._heap) for _ in range(reused)]
        slots.extend(range(self._fresh, self._fresh + n - reused))
        self._fresh += n - reused
        for s in slots:
            self._used[s] = 1
        return slots

    def give_back(self, slots: Iterable[int]) -> None:
        slots = [int(s) for s in slots]
        for i, s in enumerate(slots):
            if not 0 <= s < self.n_slots:
                self._undo(slots[:i])
                raise ValueError(f"slot {s} is not a slot of this tier (0 .. {self.n_slots - 1})")
            if not self._used[s]:
                self._undo(slots[:i])
                raise ValueError(f"slot {s} is not allocated (freed twice?)")
            self._used[s] = 0
        for s in slots:
            heapq.heappush(self._heap, s)

    def _undo(self, slots: list[int]) -> None:
        for s in slots:
            self._used[s] = 1

    def is_used(self, slot: int) -> bool:
        return 0 <= slot < self.n_slots and bool(self._used[slot])


class Tier(ABC):
    """A tier of fixed-size block slots. Subclasses implement `write`, `read_into` and `close`.

    Attributes:
        name: "gpu", "host" or "ssd": what block tables record.
        block_shape: [2, B, Hkv, bs, D].
        dtype: the KV dtype.
        block_bytes: bytes of one block.
        slot_bytes: bytes a slot takes in the tier (block_bytes rounded up to the tier's alignment).
        n_slots: how many blocks the tier holds.
    """

    name: str = "tier"

    def __init__(self, n_slots: int, block_shape: Sequence[int], dtype: torch.dtype, slot_bytes: int | None = None):
        if n_slots < 0:
            raise ValueError(f"n_slots: got {n_slots}, expected >= 0")
        self.block_shape = tuple(int(x) for x in block_shape)
        if len(self.block_shape) != 5 or self.block_shape[0] != 2 or min(self.block_shape) < 1:
            raise ValueError(f"block_shape: got {list(block_shape)}, expected [2, B, Hkv, bs, D] of positive sizes")
        self.dtype = dtype
        self.block_bytes = block_bytes_of(self.block_shape, dtype)
        self.slot_bytes = slot_bytes or self.block_bytes
        self.n_slots = n_slots
        self._free = SlotFreeList(n_slots)

    @property
    def budget(self) -> int:
        """Bytes the tier holds in all (its slots)."""
        return self.n_slots * self.slot_bytes

    def bytes_in_use(self) -> int:
        """Bytes of the allocated slots."""
        return (self.n_slots - self._free.n_free) * self.slot_bytes

    def free_slots(self) -> int:
        """How many slots `allocate` can still hand out."""
        return self._free.n_free

    def allocate(self, n: int) -> list[int]:
        """Take `n` free slots (lowest first). Raises `TierFull` when fewer than `n` are free."""
        slots = self._free.take(n)
        if slots is None:
            raise TierFull(self.name, n, self._free.n_free, self.n_slots, self.block_bytes)
        return slots

    def free(self, slots: Iterable[int]) -> None:
        """Give slots back; their content is gone."""
        self._free.give_back(slots)

    @abstractmethod
    def write(self, slot: int, src: torch.Tensor) -> Pending:
        """Copy block `src` (shape `block_shape`, dtype `dtype`) into `slot`. `src` must stay
        unchanged until the returned `Pending` is done."""

    @abstractmethod
    def read_into(self, slot: int, dst: torch.Tensor) -> Pending:
        """Copy the block in `slot` into `dst` (shape `block_shape`, dtype `dtype`)."""

    @abstractmethod
    def close(self) -> None:
        """Release the tier's memory or files. Idempotent."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_block(self, what: str, t: torch.Tensor) -> None:
        if tuple(t.shape) != self.block_shape or t.dtype != self.dtype:
            raise ValueError(
                f"{what}: got a {t.dtype} tensor of shape {list(t.shape)}, expected {self.dtype} {list(self.block_shape)}"
            )

    def _check_slot(self, slot: int) -> int:
        slot = int(slot)
        if not self._free.is_used(slot):
            raise ValueError(f"{self.name} tier: slot {slot} is not allocated")
        return slot


class SlabTier(Tier):
    """A tier whose slots are the rows of one tensor `slab` [n_slots, *block_shape] (GPU or host
    memory): its copies are synchronous, done when they return."""

    slab: torch.Tensor

    def view(self, slot: int) -> torch.Tensor:
        """The block in `slot`, a view of the slab (no copy)."""
        return self.slab[slot]

    def write(self, slot: int, src: torch.Tensor) -> Pending:
        """Copy `src` (host or GPU) into `slot`; done when it returns."""
        self._check_block("src", src)
        self.slab[self._check_slot(slot)].copy_(src)
        return Pending.done_now()

    def read_into(self, slot: int, dst: torch.Tensor) -> Pending:
        """Copy `slot` into `dst` (host or GPU); done when it returns."""
        self._check_block("dst", dst)
        dst.copy_(self.slab[self._check_slot(slot)])
        return Pending.done_now()
