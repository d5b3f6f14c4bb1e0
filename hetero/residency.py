"""Which of a layer's blocks the GPU keeps, and how the rest reaches attention: the placement policy.

The GPU keeps the sink (first blocks), the recent window (last complete blocks) and the block being
filled. Of the middle, a share is fetched to the GPU and, in `split` mode, the rest is attended
where it lies, by the CPU. Nothing here touches tensors: the cache carries out the plan.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ResidencyPolicy:
    """Block counts derived from the config's token counts."""

    block_size: int
    sink_blocks: int
    window_blocks: int

    @classmethod
    def from_tokens(cls, block_size: int, sink_tokens: int, window_tokens: int) -> "ResidencyPolicy":
        return cls(block_size, -(-sink_tokens // block_size), -(-window_tokens // block_size))

    def slots_per_layer(self, chunk_blocks: int | None = None) -> int:
        """GPU slots one layer may hold: sink, window and the block being filled, and as many again
        for the blocks a chunk of new tokens adds while the pending plan still reads those it pushed
        out of the window: no more than `chunk_blocks`, a chunk's length in blocks (None: unbounded)."""
        held = self.window_blocks + 1
        added = held if chunk_blocks is None else min(held, chunk_blocks)
        return self.sink_blocks + held + added

    def leaving_end(self, blocks_per_layer: int) -> int:
        """The end of the blocks that ever leave the GPU, [sink, end), in a layer of
        `blocks_per_layer` blocks: the last window and the block being filled stay there."""
        return blocks_per_layer - self.window_blocks - 1


@dataclass(frozen=True)
class LayerPlan:
    """What one layer's attention reads of the past tokens [0, length)."""

    length: int
    resident: tuple[tuple[int, int], ...]  # (logical block, GPU slot), in block order
    fetch: tuple[tuple[int, int], ...]  # [first, last) block runs to bring to the GPU
    host: tuple[int, int] | None  # [first, last) blocks the CPU attends where they lie


@dataclass
class LayerResidency:
    """One layer's token count and the GPU slots of its resident blocks."""

    length: int = 0
    gpu_slots: dict[int, int] = field(default_factory=dict)  # logical block -> GPU slot

    def trim(self, policy: ResidencyPolicy) -> list[int]:
        """Drop complete blocks that left the window (their host copy is home); returns freed slots."""
        keep_from = self._middle_end(policy)
        gone = [b for b in self.gpu_slots if policy.sink_blocks <= b < keep_from]
        return [self.gpu_slots.pop(b) for b in gone]

    def plan(self, policy: ResidencyPolicy, blocks_per_fetch: int, gpu_share: float) -> LayerPlan:
        """Plan the next attention: resident blocks, fetched runs, and the host's part.

        `gpu_share` of the middle blocks is fetched (1.0 in `stream` mode); the rest goes to the CPU.
        """
        bs = policy.block_size
        resident = tuple(sorted((b, s) for b, s in self.gpu_slots.items() if b * bs < self.length))
        first, end = policy.sink_blocks, self._middle_end(policy)
        middle = max(0, end - first)
        fetched_end = first + round(middle * gpu_share)
        fetch = tuple((b, min(b + blocks_per_fetch, fetched_end)) for b in range(first, fetched_end, blocks_per_fetch))
        host = (fetched_end, end) if fetched_end < end else None
        return LayerPlan(self.length, resident, fetch, host)

    def _middle_end(self, policy: ResidencyPolicy) -> int:
        complete = self.length // policy.block_size
        return max(policy.sink_blocks, complete - policy.window_blocks)
