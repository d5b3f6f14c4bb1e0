"""The speculative mode's policy for the SSD tier: which blocks to read ahead, which to leave out,
and which to keep in host memory.

HostHome moves the bytes (`stage`, `take_staged`, `swap`); this decides. Per layer and block, a
counter on the GPU adds the tokens speculation and verification selected there, with no host sync
in the step. The blocks a layer selected at one step are the ones read ahead for its next step
(consecutive steps select mostly the same tokens). Every `rebalance_steps` steps the counters come
to the host once: in each layer the SSD blocks selected most trade places with the host blocks
selected least (a few per layer, while the SSD block's count is the higher), and the counters are
halved, so that recent selections weigh more.
"""

from __future__ import annotations

import numpy as np
import torch

from .host_home import HostHome
from .pipeline import Pipeline
from .token_sets import live_entries


class SsdPlacement:
    """Selection counters per (layer, block), and the decisions made from them."""

    def __init__(self, layers: int, blocks_per_layer: int, block_size: int, device: torch.device,
                 rebalance_steps: int, swaps_per_layer: int = 4):
        self.blocks_per_layer, self.block_size, self.device = blocks_per_layer, block_size, device
        self.rebalance_steps, self.swaps_per_layer = rebalance_steps, swaps_per_layer
        # One more column takes the entries past a selection's count.
        self.hits = torch.zeros(layers, blocks_per_layer + 1, dtype=torch.int32, device=device)
        self.step_hits = torch.zeros_like(self.hits)
        self._last: dict[int, tuple] = {}  # layer -> (its step's counts in host memory, their fence)
        self.steps = 0
        self.blocks_needed = 0  # SSD blocks within the spans selected from, each layer step
        self.blocks_skipped = 0  # of them, those not in host memory when selected from ("skip")
        self.swaps = 0

    # In the step, on the device ----------------------------------------------------------------

    def count(self, layer: int, selected: torch.Tensor, count: torch.Tensor, first: bool) -> None:
        """Add a selection (positions [B, Hkv, N], the first `count` [B, Hkv] valid) to the layer's
        counts of this step; `first`: the step's first selection of the layer."""
        if first:
            self.step_hits[layer].zero_()
        blocks = torch.where(live_entries(selected, count), selected // self.block_size, self.blocks_per_layer)
        blocks = blocks.flatten().long()
        self.step_hits[layer].scatter_add_(0, blocks, torch.ones_like(blocks, dtype=torch.int32))

    def end_layer(self, layer: int, pipeline: Pipeline) -> None:
        """The layer's selections of this step are counted: add them up and send them to the host."""
        self.hits[layer] += self.step_hits[layer]
        (host,), fence = pipeline.to_host(self.step_hits[layer])
        self._last[layer] = (host, fence)

    # On the host --------------------------------------------------------------------------------

    def read_ahead(self, layer: int) -> np.ndarray:
        """The blocks the layer selected at its last step (none before its first)."""
        last = self._last.get(layer)
        return np.empty(0, dtype=np.int64) if last is None else _hit_blocks(*last)  # a step old: landed long ago

    def selected_now(self, layer: int, pipeline: Pipeline) -> np.ndarray:
        """The blocks the layer's selections of this step hold so far (waits for the GPU to make them)."""
        (host,), fence = pipeline.to_host(self.step_hits[layer])
        return _hit_blocks(host, fence)

    def left_out(self, home: HostHome, layer: int, first: int, last: int, ready: set[int]) -> torch.Tensor | None:
        """bool [(last - first) x block_size] on the device: the positions of blocks [first, last)
        that sit on the SSD and are not in host memory now; None when there are none."""
        on_ssd = home.ssd_blocks_of(layer, first, last)
        missing = [b for b in on_ssd.tolist() if b not in ready]
        self.blocks_needed += len(on_ssd)
        self.blocks_skipped += len(missing)
        if not missing:
            return None
        mask = np.zeros((last - first, self.block_size), dtype=bool)
        mask[np.asarray(missing) - first] = True
        mask = torch.from_numpy(mask.reshape(-1))
        if self.device.type == "cuda":
            return mask.pin_memory().to(self.device, non_blocking=True)
        return mask.to(self.device)

    def step_boundary(self, home: HostHome, pipeline: Pipeline, movable_end: int) -> bool:
        """Called once per decode step; every `rebalance_steps` steps, trade SSD blocks selected more
        for host blocks selected less among blocks [sink, movable_end) of each speculated layer.
        Returns whether any block moved (the caller's copies of the slot tables are then stale)."""
        self.steps += 1
        if not self.rebalance_steps or self.steps % self.rebalance_steps:
            return False
        pipeline.quiesce()  # no read of a block under way, on the GPU or the CPU
        home.drain_reads()
        hits = self.hits.cpu().numpy()
        moved = 0
        for layer in range(1, hits.shape[0]):
            ssd = home.written_ssd_blocks(layer)
            host = np.setdiff1d(np.arange(home.sink_blocks, movable_end), home.ssd_blocks_of(layer, 0, movable_end))
            ssd = ssd[np.argsort(-hits[layer, ssd], kind="stable")]
            host = host[np.argsort(hits[layer, host], kind="stable")]
            for s, h in zip(ssd[: self.swaps_per_layer].tolist(), host[: self.swaps_per_layer].tolist()):
                if hits[layer, s] <= hits[layer, h]:
                    break
                home.swap(layer, s, h)
                moved += 1
        self.hits.bitwise_right_shift_(1)
        self.swaps += moved
        return moved > 0

    @property
    def skipped_share(self) -> float | None:
        return self.blocks_skipped / self.blocks_needed if self.blocks_needed else None


def _hit_blocks(hits: torch.Tensor, fence) -> np.ndarray:
    """The blocks with a count in `hits` [blocks + 1] (host memory, landed at `fence`)."""
    fence.synchronize()
    return np.flatnonzero(hits[:-1].numpy() > 0)
