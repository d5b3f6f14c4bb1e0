"""The KV's home off the GPU: slots of the pinned host pool, and the SSD for what the host budget
cannot hold.

Placement is decided once, when the cache is sized: of each layer, the `ssd_blocks` oldest middle
blocks (right after the sink) live on the SSD, every other block in a host slot. An exact mode
reads every middle block at every step, so no block is colder than another and a fixed choice
costs nothing; the oldest are the ones speculation is least likely to want.

Host slots are laid out so that what one layer's fetch reads is contiguous: every layer's host
blocks, in order, then `areas` staging areas into which the SSD blocks of a layer are read, taken
in turn: with fetches planned `depth` layers ahead and the SSD read one layer further, depth + 2
areas keep the one being filled apart from those still read. Blocks bound for the SSD are copied
from the GPU into one of a few spill slots and written from there once that copy has landed.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future

import numpy as np
import torch

from .pipeline import Fence, Pipeline
from .storage import NvmeStore

SPILL_SLOTS = 8  # host slots through which blocks travel to the SSD

class HostHome:
    """Where each (layer, block) lives off the GPU, and the moves between host memory and the SSD.

    Args:
        pool: the host pool (a storage.HostPool, or anything with a `slab`), at least `slots_needed` slots.
        layers, blocks_per_layer: the cache's shape in blocks.
        sink_blocks: blocks at the start of each layer that never leave the host (nor the GPU).
        ssd_blocks: blocks per layer on the SSD (0: no SSD tier).
        store: the NvmeStore holding them (None when `ssd_blocks` is 0).
        pipeline: orders the spill writes after their copies from the GPU.
        areas: staging areas (see above).
        spill_slots: host slots through which blocks travel to the SSD.
    """

    def __init__(self, pool, layers: int, blocks_per_layer: int, sink_blocks: int, ssd_blocks: int = 0,
                 store: NvmeStore | None = None, pipeline: Pipeline | None = None, areas: int = 3,
                 spill_slots: int = SPILL_SLOTS):
        if ssd_blocks and store is None:
            raise ValueError("ssd_blocks > 0 needs an NvmeStore")
        self.pool = pool
        self.slab = pool.slab
        self.layers, self.blocks_per_layer = layers, blocks_per_layer
        self.sink_blocks, self.ssd_blocks = sink_blocks, ssd_blocks
        self.store, self.pipeline = store, pipeline
        host_per_layer = blocks_per_layer - ssd_blocks
        self._staging_base = layers * host_per_layer
        spill_base = self._staging_base + areas * ssd_blocks
        self._spill_free = deque(range(spill_base, spill_base + (spill_slots if ssd_blocks else 0)))
        # tables[l]: layer l's block -> host slot, its SSD blocks pointing into the area it was last
        # staged in; all_tables[l, a]: the same with area a (for kernels that need it on the GPU).
        self.all_tables = np.stack([np.stack([self._layer_table(l, host_per_layer, a) for a in range(areas)])
                                    for l in range(layers)])
        self.tables = [self.all_tables[l, 0].copy() for l in range(layers)]
        self.area_of = [0] * layers
        self._areas = areas
        self._next_area = 0
        self._ssd_slots = store.allocate(layers * ssd_blocks) if ssd_blocks else []
        self._spills: dict[tuple[int, int], tuple[Future, int]] = {}  # (layer, block) -> (write issued, spill slot)
        self._spill_order: deque[tuple[int, int]] = deque()
        self._stored: list[int] = [0] * layers  # SSD blocks of each layer written so far (in block order)
        self._staged: dict[int, tuple[int, list]] = {}  # layer -> (blocks read, their pending reads)
        self._area_readers: list[list[Fence]] = [[] for _ in range(areas)]
        self.bytes_to_ssd = 0
        self.bytes_from_ssd = 0
        self.ssd_bytes = len(self._ssd_slots) * store.slot_bytes if ssd_blocks else 0
        self.host_slots = self.slots_needed(layers, blocks_per_layer, ssd_blocks, areas, spill_slots)

    @staticmethod
    def slots_needed(layers: int, blocks_per_layer: int, ssd_blocks: int, areas: int = 3,
                     spill_slots: int = SPILL_SLOTS) -> int:
        """Host slots a home of that shape takes."""
        if not ssd_blocks:
            return layers * blocks_per_layer
        return layers * (blocks_per_layer - ssd_blocks) + areas * ssd_blocks + spill_slots

    def _layer_table(self, layer: int, host_per_layer: int, area: int) -> np.ndarray:
        table = np.empty(self.blocks_per_layer, np.int32)
        first_ssd, end_ssd = self.sink_blocks, self.sink_blocks + self.ssd_blocks
        blocks = np.arange(self.blocks_per_layer)
        home = np.where(blocks < first_ssd, blocks, blocks - self.ssd_blocks)
        table[:] = layer * host_per_layer + home
        table[first_ssd:end_ssd] = self._staging_base + area * self.ssd_blocks + np.arange(self.ssd_blocks)
        return table

    def on_ssd(self, block: int) -> bool:
        return self.sink_blocks <= block < self.sink_blocks + self.ssd_blocks

    # Writing ----------------------------------------------------------------------------------

    def write_target(self, layer: int, block: int) -> torch.Tensor:
        """The host slot that a completed block is copied into from the GPU."""
        if not self.on_ssd(block):
            return self.slab[int(self.tables[layer][block])]
        if not self._spill_free:
            self._finish_spill(self._spill_order.popleft())
        slot = self._spill_free.popleft()
        self._spills[(layer, block)] = (None, slot)
        return self.slab[slot]

    def written(self, layer: int, block: int, fence: Fence) -> None:
        """The copy into `write_target(layer, block)` is under way (done at `fence`): for an SSD
        block, write it to the store once it has landed, without waiting here."""
        if not self.on_ssd(block):
            return
        _, slot = self._spills[(layer, block)]
        ssd_slot = self._ssd_slots[layer * self.ssd_blocks + block - self.sink_blocks]
        issued = self.pipeline.after(fence, self.store.write, ssd_slot, self.slab[slot])
        self._spills[(layer, block)] = (issued, slot)
        self._spill_order.append((layer, block))
        self._stored[layer] = max(self._stored[layer], block - self.sink_blocks + 1)
        self.bytes_to_ssd += self.store.block_bytes

    def _finish_spill(self, key: tuple[int, int]) -> None:
        """Wait until the block's write to the SSD is done; its spill slot is free again."""
        entry = self._spills.pop(key, None)
        if entry is None:
            return
        issued, slot = entry
        issued.result().wait()  # raises the write's error (a full disk, an I/O error)
        self._spill_free.append(slot)

    # Reading ----------------------------------------------------------------------------------

    def stage(self, layer: int) -> None:
        """Start reading the layer's SSD blocks written so far into its staging area."""
        count = self._stored[layer]
        if count == 0 or self._staged.get(layer, (0,))[0] == count:
            return
        area = self._next_area
        self._next_area = (area + 1) % self._areas
        for fence in self._area_readers[area]:
            fence.synchronize()  # the area's last readers (the layer before the computing one) are done
        self._area_readers[area] = []
        self.area_of[layer] = area
        self.tables[layer][:] = self.all_tables[layer, area]
        pending = []
        base = layer * self.ssd_blocks
        for i in range(count):
            block = self.sink_blocks + i
            if (layer, block) in self._spills:  # its write lands before it is read back (and raises if it failed)
                issued, _ = self._spills[(layer, block)]
                issued.result().wait()
            dst = self.slab[int(self.tables[layer][block])]
            pending.append(self.store.read_into(self._ssd_slots[base + i], dst))
        self.bytes_from_ssd += count * self.store.block_bytes
        self._staged[layer] = (count, pending)

    def wait_staged(self, layer: int) -> None:
        """Block until the layer's SSD blocks are in their staging area (reading them if not begun)."""
        self.stage(layer)
        entry = self._staged.pop(layer, None)
        if entry is not None:
            for p in entry[1]:
                p.wait()

    def read_by(self, layer: int, fence: Fence) -> None:
        """Record a reader of the layer's staging area: the area is reused only after it."""
        if self.ssd_blocks:
            self._area_readers[self.area_of[layer]].append(fence)

    def runs(self, layer: int, first: int, last: int) -> list[tuple[int, int, int]]:
        """Blocks [first, last) of the layer as (first block, first slot, count) runs of consecutive slots."""
        if last <= first:
            return []
        slots = self.tables[layer][first:last]
        # A run ends where the next block's slot does not follow (at most at the SSD blocks' edges).
        starts = [0, *(np.flatnonzero(np.diff(slots) != 1) + 1).tolist(), last - first]
        return [(first + a, int(slots[a]), b - a) for a, b in zip(starts, starts[1:])]

    def close(self) -> None:
        """Let the writes under way finish (their errors are not raised here), then drop the store."""
        for key in list(self._spills):
            issued, _ = self._spills.pop(key)
            if issued is not None:
                try:
                    issued.result().wait()
                except Exception:  # noqa: BLE001 - closing after a failure: the error was raised already
                    pass
        if self.store is not None:
            self.store.close()
