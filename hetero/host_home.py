"""The KV's home off the GPU: slots of the pinned host pool, and the SSD for what the host budget
cannot hold.

Placement starts fixed, when the cache is sized: of each layer, a run of `ssd_blocks` middle blocks
from `ssd_first` lives on the SSD, every other block in a host slot. The cache puts the run last
among the blocks that leave the GPU: a chunked prefill attends to every block written before its
chunk, so a run written late is read back by few chunks (a run right after the sink, by all). An exact mode
reads every middle block at every step, so no block is colder than another and the fixed choice
costs nothing. Speculation reads few blocks, and some far more often than others: `swap` trades a
block on the SSD for one in host memory, so that the speculative mode keeps the blocks it selects
most in host memory (its policy, in the cache, counts the selections).

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
        ssd_first: the first of them, in every layer (None: right after the sink).
        store: the NvmeStore holding them (None when `ssd_blocks` is 0).
        pipeline: orders the spill writes after their copies from the GPU.
        areas: staging areas (see above).
        spill_slots: host slots through which blocks travel to the SSD.
    """

    def __init__(self, pool, layers: int, blocks_per_layer: int, sink_blocks: int, ssd_blocks: int = 0,
                 store: NvmeStore | None = None, pipeline: Pipeline | None = None, areas: int = 3,
                 spill_slots: int = SPILL_SLOTS, ssd_first: int | None = None):
        if ssd_blocks and store is None:
            raise ValueError("ssd_blocks > 0 needs an NvmeStore")
        ssd_first = sink_blocks if ssd_first is None else ssd_first
        if not sink_blocks <= ssd_first <= blocks_per_layer - ssd_blocks:
            raise ValueError(f"ssd_first: got {ssd_first}; the SSD run of {ssd_blocks} blocks must lie in blocks "
                             f"[{sink_blocks}, {blocks_per_layer}) after the sink")
        self.pool = pool
        self.slab = pool.slab
        self.layers, self.blocks_per_layer = layers, blocks_per_layer
        self.sink_blocks, self.ssd_blocks = sink_blocks, ssd_blocks
        self.store, self.pipeline = store, pipeline
        host_per_layer = blocks_per_layer - ssd_blocks
        self._staging_base = layers * host_per_layer
        spill_base = self._staging_base + areas * ssd_blocks
        self._spill_free = deque(range(spill_base, spill_base + (spill_slots if ssd_blocks else 0)))
        # Where each (layer, block) lives: its index among the layer's SSD slots (-1: none), else its host slot.
        blocks = np.arange(blocks_per_layer)
        on_ssd = (ssd_first <= blocks) & (blocks < ssd_first + ssd_blocks)
        self._ssd_index = np.tile(np.where(on_ssd, blocks - ssd_first, -1).astype(np.int32), (layers, 1))
        home = np.where(blocks < ssd_first, blocks, blocks - ssd_blocks)  # host blocks, in order
        self._host_slot = np.where(on_ssd, -1, np.arange(layers)[:, None] * host_per_layer + home).astype(np.int32)
        self._areas = areas
        # tables[l]: layer l's block -> host slot, its SSD blocks pointing into the area it was last
        # staged in; all_tables[l, a]: the same with area a (for kernels that need it on the GPU).
        self.all_tables = np.stack([np.stack([self._layer_table(l, a) for a in range(areas)]) for l in range(layers)])
        self.tables = [self.all_tables[l, 0].copy() for l in range(layers)]
        self.area_of = [0] * layers
        self._next_area = 0
        self._ssd_slots = store.allocate(layers * ssd_blocks) if ssd_blocks else []
        self._spills: dict[tuple[int, int], tuple[Future, int]] = {}  # (layer, block) -> (write issued, spill slot)
        self._spill_order: deque[tuple[int, int]] = deque()
        self._stored: list[int] = [0] * layers  # SSD slots of each layer written so far (in index order)
        self._staged: dict[int, dict[int, object]] = {}  # layer -> {SSD block: its pending read}
        self._present: dict[int, set[int]] = {}  # layer -> its SSD blocks in its staging area, read
        self._area_readers: list[list[Fence]] = [[] for _ in range(areas)]
        self._area_reads: list[list] = [[] for _ in range(areas)]  # reads still landing in an area, left by `take_staged`
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

    def _layer_table(self, layer: int, area: int) -> np.ndarray:
        index = self._ssd_index[layer]
        staged = self._staging_base + area * self.ssd_blocks + index
        return np.where(index >= 0, staged, self._host_slot[layer]).astype(np.int32)

    def on_ssd(self, layer: int, block: int) -> bool:
        return bool(self._ssd_index[layer, block] >= 0)

    def ssd_blocks_of(self, layer: int, first: int, last: int) -> np.ndarray:
        """The layer's blocks in [first, last) that live on the SSD."""
        return first + np.flatnonzero(self._ssd_index[layer, first:last] >= 0)

    # Writing ----------------------------------------------------------------------------------

    def write_target(self, layer: int, block: int) -> torch.Tensor:
        """The host slot that a completed block is copied into from the GPU."""
        if not self.on_ssd(layer, block):
            return self.slab[int(self.tables[layer][block])]
        slot = self._take_spill_slot()
        self._spills[(layer, block)] = (None, slot)
        return self.slab[slot]

    def _take_spill_slot(self) -> int:
        """A free spill slot; the oldest write under way is waited for when none is free."""
        if not self._spill_free:
            self._finish_spill(self._spill_order.popleft())
        return self._spill_free.popleft()

    def written(self, layer: int, block: int, fence: Fence) -> None:
        """The copy into `write_target(layer, block)` is under way (done at `fence`): for an SSD
        block, write it to the store once it has landed, without waiting here."""
        if not self.on_ssd(layer, block):
            return
        _, slot = self._spills[(layer, block)]
        index = int(self._ssd_index[layer, block])
        issued = self.pipeline.after(fence, self.store.write, self._ssd_slot(layer, index), self.slab[slot])
        self._spills[(layer, block)] = (issued, slot)
        self._spill_order.append((layer, block))
        self._stored[layer] = max(self._stored[layer], index + 1)
        self.bytes_to_ssd += self.store.block_bytes

    def _ssd_slot(self, layer: int, index: int) -> int:
        return self._ssd_slots[layer * self.ssd_blocks + index]

    def _finish_spill(self, key: tuple[int, int]) -> None:
        """Wait until the block's write to the SSD is done; its spill slot is free again."""
        entry = self._spills.pop(key, None)
        if entry is None:
            return
        issued, slot = entry
        issued.result().wait()  # raises the write's error (a full disk, an I/O error)
        self._spill_free.append(slot)

    # Reading ----------------------------------------------------------------------------------

    def stage(self, layer: int, only=None) -> None:
        """Start reading the layer's SSD blocks written so far (or those of them in `only`) into a
        staging area; nothing when the layer's last staging was not taken yet."""
        if layer in self._staged or self._stored[layer] == 0:
            return
        area = self._next_area
        self._next_area = (area + 1) % self._areas
        for fence in self._area_readers[area]:
            fence.synchronize()  # the area's last readers (the layer before the computing one) are done
        self._area_readers[area] = []
        for read in self._area_reads[area]:
            read.wait()  # reads a skipping layer did not wait for land before the area takes others
        self._area_reads[area] = []
        self.area_of[layer] = area
        self.tables[layer][:] = self.all_tables[layer, area]
        self._present[layer] = set()
        blocks = self.written_ssd_blocks(layer)
        if only is not None:
            blocks = np.intersect1d(blocks, np.asarray(list(only), dtype=np.int64))
        self._staged[layer] = {block: self._read_into_area(layer, block) for block in blocks.tolist()}

    def _read_into_area(self, layer: int, block: int):
        """Start reading a written SSD block into the layer's staging area; returns the pending read."""
        if (layer, block) in self._spills:  # its write lands before it is read back (and raises if it failed)
            issued, _ = self._spills[(layer, block)]
            issued.result().wait()
        dst = self.slab[int(self.tables[layer][block])]
        self.bytes_from_ssd += self.store.block_bytes
        return self.store.read_into(self._ssd_slot(layer, int(self._ssd_index[layer, block])), dst)

    def wait_staged(self, layer: int) -> None:
        """Block until the layer's SSD blocks are in their staging area (reading them if not begun)."""
        self.stage(layer)
        pending = self._staged.pop(layer, {})
        for read in pending.values():
            read.wait()
        self._present.setdefault(layer, set()).update(pending)

    def take_staged(self, layer: int) -> set[int]:
        """The layer's SSD blocks staged (by `stage`) whose reads have landed; the others are left to
        land before their area is reused, and are not to be read by this step."""
        pending = self._staged.pop(layer, {})
        ready = {block for block, read in pending.items() if read.done()}
        self._area_reads[self.area_of[layer]] += [read for block, read in pending.items() if block not in ready]
        for block in ready:
            pending[block].wait()  # raises a failed read's error
        self._present.setdefault(layer, set()).update(ready)
        return ready

    def read_now(self, layer: int, blocks) -> None:
        """Read those of `blocks` that sit on the SSD and are not in the layer's staging area yet
        into it, and wait for them (the layer's staging this step must be taken already)."""
        if layer in self._staged:
            raise RuntimeError(f"layer {layer}: read_now before its staged reads were taken")
        present = self._present.setdefault(layer, set())
        missing = np.setdiff1d(np.intersect1d(self.written_ssd_blocks(layer), np.asarray(blocks, dtype=np.int64)),
                               np.asarray(sorted(present), dtype=np.int64))
        reads = [self._read_into_area(layer, block) for block in missing.tolist()]
        present.update(missing.tolist())
        for read in reads:
            read.wait()

    def drain_reads(self) -> None:
        """Wait for the reads `take_staged` left landing."""
        for area, reads in enumerate(self._area_reads):
            for read in reads:
                read.wait()
            self._area_reads[area] = []

    def written_ssd_blocks(self, layer: int) -> np.ndarray:
        """The layer's SSD blocks already written there."""
        index = self._ssd_index[layer]
        return np.flatnonzero((index >= 0) & (index < self._stored[layer]))

    def swap(self, layer: int, ssd_block: int, host_block: int) -> None:
        """Bring `ssd_block` into host memory and send `host_block` (a completed block whose copy
        home has landed) to the SSD slot it leaves. The caller makes sure no read of either is
        under way (the GPU's and the CPU's) and that the layer has nothing staged."""
        if layer in self._staged or not self.on_ssd(layer, ssd_block) or self.on_ssd(layer, host_block):
            raise ValueError(f"layer {layer}: swap needs a block on the SSD and one in host memory, nothing staged")
        index = int(self._ssd_index[layer, ssd_block])
        if index >= self._stored[layer]:
            raise ValueError(f"layer {layer}: block {ssd_block} has not been written to the SSD yet")
        for block in (ssd_block, host_block):
            self._finish_spill((layer, block))
        host = int(self._host_slot[layer, host_block])
        spill = self._take_spill_slot()
        try:
            self.slab[spill].copy_(self.slab[host])
            self.store.read_into(self._ssd_slot(layer, index), self.slab[host]).wait()
            self.store.write(self._ssd_slot(layer, index), self.slab[spill]).wait()
        finally:
            self._spill_free.append(spill)
        self._ssd_index[layer, host_block], self._ssd_index[layer, ssd_block] = index, -1
        self._host_slot[layer, ssd_block], self._host_slot[layer, host_block] = host, -1
        self.all_tables[layer] = np.stack([self._layer_table(layer, a) for a in range(self._areas)])
        self.tables[layer][:] = self.all_tables[layer, self.area_of[layer]]
        self.bytes_from_ssd += self.store.block_bytes
        self.bytes_to_ssd += self.store.block_bytes

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
