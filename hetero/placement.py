"""Which blocks leave the host tier for the SSD when the host budget is full: the placement policy.

The coldest blocks go first: the lowest importance (how often speculation selected the block),
then the least recently used, then the oldest block. The sink and the recent window are never
victims: the caller passes them as protected (`protected_blocks` builds that set). This module
only keeps counters; it neither touches tensors nor calls the tiers.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

NEVER = -1  # last-used step of a block never used


class Placement:
    """Per (layer, block): the last decode step that used it and an importance counter."""

    def __init__(self, n_layers: int):
        self._last = [np.full(0, NEVER, dtype=np.int64) for _ in range(n_layers)]
        self._importance = [np.zeros(0, dtype=np.int64) for _ in range(n_layers)]

    @property
    def n_layers(self) -> int:
        return len(self._last)

    def note_use(self, layer: int, blocks: Iterable[int], step: int) -> None:
        """Record that attention at `step` read these blocks of `layer`."""
        idx = self._index(layer, blocks)
        self._last[layer][idx] = np.maximum(self._last[layer][idx], step)

    def note_selected(self, layer: int, blocks: Iterable[int]) -> None:
        """Count one selection by speculation for each block listed (repeats count each time)."""
        idx = self._index(layer, blocks)
        np.add.at(self._importance[layer], idx, 1)

    def forget(self, layer: int, blocks: Iterable[int] | None = None) -> None:
        """Reset the counters of these blocks (all of the layer's with None), e.g. when freed."""
        if blocks is None:
            self._last[layer] = self._last[layer][:0].copy()
            self._importance[layer] = self._importance[layer][:0].copy()
            return
        idx = self._index(layer, blocks)
        self._last[layer][idx] = NEVER
        self._importance[layer][idx] = 0

    def last_used(self, layer: int, block: int) -> int:
        """The last step that used the block (NEVER if none)."""
        return int(self._last[layer][block]) if block < self._last[layer].size else NEVER

    def importance(self, layer: int, block: int) -> int:
        """How often speculation selected the block."""
        return int(self._importance[layer][block]) if block < self._importance[layer].size else 0

    def victims(self, layer: int | None, candidates: Iterable, n: int, protected: Iterable = ()) -> list:
        """Up to `n` of `candidates`, coldest first: lowest importance, then least recently used,
        then lowest layer and block. Protected blocks are never returned.

        With `layer` an int, candidates and protected are block indices of that layer and block
        indices are returned; with `layer` None, they are (layer, block) pairs over all layers and
        pairs are returned.
        """
        if n <= 0:
            return []
        if layer is not None:
            blocks = np.unique(np.asarray(list(candidates), dtype=np.int64))
            if protected is not None:
                blocks = blocks[~np.isin(blocks, np.asarray(list(protected), dtype=np.int64))]
            order = self._coldest(np.full(blocks.size, layer, dtype=np.int64), blocks)
            return [int(b) for b in blocks[order[:n]]]
        pairs = _pairs(candidates)
        if pairs.size and protected is not None:
            guarded = {(int(l), int(b)) for l, b in _pairs(protected)}
            keep = np.array([(int(l), int(b)) not in guarded for l, b in pairs], dtype=bool)
            pairs = pairs[keep]
        pairs = np.unique(pairs, axis=0)
        order = self._coldest(pairs[:, 0], pairs[:, 1])
        return [(int(l), int(b)) for l, b in pairs[order[:n]]]

    def _coldest(self, layers: np.ndarray, blocks: np.ndarray) -> np.ndarray:
        last = np.full(blocks.size, NEVER, dtype=np.int64)
        imp = np.zeros(blocks.size, dtype=np.int64)
        for l in np.unique(layers):
            sel = layers == l
            known = sel & (blocks < self._last[l].size)
            last[known] = self._last[l][blocks[known]]
            imp[known] = self._importance[l][blocks[known]]
        return np.lexsort((blocks, layers, last, imp))  # the last key sorts first

    def _index(self, layer: int, blocks: Iterable[int]) -> np.ndarray:
        idx = np.asarray(list(blocks) if not isinstance(blocks, np.ndarray) else blocks, dtype=np.int64).reshape(-1)
        if idx.size and idx.min() < 0:
            raise ValueError(f"blocks: got a negative block index for layer {layer}")
        need = int(idx.max()) + 1 if idx.size else 0
        have = self._last[layer].size
        if need > have:
            grow = max(need, 2 * have)
            self._last[layer] = np.concatenate([self._last[layer], np.full(grow - have, NEVER, dtype=np.int64)])
            self._importance[layer] = np.concatenate([self._importance[layer], np.zeros(grow - have, dtype=np.int64)])
        return idx


def protected_blocks(n_blocks: int, sink_blocks: int, window_blocks: int) -> set[int]:
    """Block indices a layer of `n_blocks` blocks never gives up: the first `sink_blocks` and the
    last `window_blocks` (which include the block being filled)."""
    return set(range(min(sink_blocks, n_blocks))) | set(range(max(0, n_blocks - window_blocks), n_blocks))


def _pairs(items: Iterable) -> np.ndarray:
    arr = np.asarray(list(items), dtype=np.int64)
    return arr.reshape(-1, 2)
