"""Where each layer's blocks live: per layer, logical block j -> (tier, slot).

Rows are kept in growable int32/int8 tensors (capacity doubles), so appending a block costs O(1)
amortised and never touches the KV itself; kernels get a layer's slots as an int32 tensor view.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

_NONE = -1


class BlockTable:
    """Block placement of `n_layers` layers over the named tiers.

    Args:
        n_layers: layers of the model.
        tiers: tier names, in the order their ids are numbered (ids go into `tier_ids`).
        capacity: blocks per layer to reserve room for at first (it grows as needed).
    """

    def __init__(self, n_layers: int, tiers: Sequence[str] = ("gpu", "host", "ssd"), capacity: int = 64):
        if len(set(tiers)) != len(tiers) or not tiers:
            raise ValueError(f"tiers: got {list(tiers)}, expected distinct names")
        self.tiers = tuple(tiers)
        self._tier_id = {name: i for i, name in enumerate(self.tiers)}
        capacity = max(1, capacity)
        self._tier = [torch.full((capacity,), _NONE, dtype=torch.int8) for _ in range(n_layers)]
        self._slot = [torch.full((capacity,), _NONE, dtype=torch.int32) for _ in range(n_layers)]
        self._len = [0] * n_layers

    @property
    def n_layers(self) -> int:
        return len(self._len)

    def tier_id(self, tier: str) -> int:
        """The id that `tier_ids` uses for `tier`."""
        try:
            return self._tier_id[tier]
        except KeyError:
            raise ValueError(f"tier: got {tier!r}, expected one of {list(self.tiers)}") from None

    def num_blocks(self, layer: int) -> int:
        """Blocks of `layer` so far."""
        return self._len[layer]

    def append(self, layer: int, tier: str, slot: int) -> int:
        """Add the layer's next block, held in `slot` of `tier`; returns its block index."""
        return self.extend(layer, tier, [slot])[0]

    def extend(self, layer: int, tier: str, slots: Sequence[int] | torch.Tensor) -> range:
        """Add several next blocks of `layer`, all in `tier`; returns their block indices."""
        tid = self.tier_id(tier)
        slots = torch.as_tensor(slots, dtype=torch.int32).reshape(-1)
        n, k = self._len[layer], slots.numel()
        self._reserve(layer, n + k)
        self._tier[layer][n:n + k] = tid
        self._slot[layer][n:n + k] = slots
        self._len[layer] = n + k
        return range(n, n + k)

    def lookup(self, layer: int, block: int) -> tuple[str, int]:
        """(tier, slot) of block `block` of `layer`."""
        self._check(layer, block)
        return self.tiers[int(self._tier[layer][block])], int(self._slot[layer][block])

    def move(self, layer: int, block: int, tier: str, slot: int) -> tuple[str, int]:
        """Record that the block now lives in `slot` of `tier`; returns where it was. The caller
        moves the bytes and frees the old slot."""
        old = self.lookup(layer, block)
        self._tier[layer][block] = self.tier_id(tier)
        self._slot[layer][block] = slot
        return old

    def slots(self, layer: int) -> torch.Tensor:
        """int32 [num_blocks] slot of each of the layer's blocks (a view: do not keep it across appends)."""
        return self._slot[layer][: self._len[layer]]

    def tier_ids(self, layer: int) -> torch.Tensor:
        """int8 [num_blocks] tier id of each of the layer's blocks (a view)."""
        return self._tier[layer][: self._len[layer]]

    def blocks_in(self, layer: int, tier: str, start: int = 0, end: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(block indices, slots) as int32 tensors, in block order, of the layer's blocks in
        [start, end) that live in `tier`."""
        end = self._len[layer] if end is None else min(end, self._len[layer])
        mask = self._tier[layer][start:end] == self.tier_id(tier)
        blocks = (torch.nonzero(mask).reshape(-1) + start).to(torch.int32)
        return blocks, self._slot[layer][start:end][mask]

    def count_in(self, tier: str) -> int:
        """How many blocks of all layers live in `tier`."""
        tid = self.tier_id(tier)
        return sum(int((self._tier[l][: self._len[l]] == tid).sum()) for l in range(self.n_layers))

    def clear(self, layer: int) -> list[tuple[str, list[int]]]:
        """Forget the layer's blocks; returns [(tier, slots)] for the caller to free."""
        out = []
        for tier in self.tiers:
            _, slots = self.blocks_in(layer, tier)
            if slots.numel():
                out.append((tier, slots.tolist()))
        self._len[layer] = 0
        return out

    def _reserve(self, layer: int, n: int) -> None:
        cap = self._slot[layer].numel()
        if n <= cap:
            return
        new_cap = max(n, 2 * cap)
        for rows, fill in ((self._tier, _NONE), (self._slot, _NONE)):
            grown = torch.full((new_cap,), fill, dtype=rows[layer].dtype)
            grown[:cap] = rows[layer]
            rows[layer] = grown

    def _check(self, layer: int, block: int) -> None:
        if not 0 <= block < self._len[layer]:
            raise IndexError(f"layer {layer} has {self._len[layer]} blocks; block {block} is not one of them")

    def __repr__(self) -> str:
        return f"BlockTable(n_layers={self.n_layers}, tiers={list(self.tiers)}, blocks={self._len})"


def group_by_tier(table: BlockTable, layer: int, blocks: Iterable[int]) -> dict[str, list[tuple[int, int]]]:
    """{tier: [(block, slot), ...]} for the given blocks of `layer`, in the order given."""
    out: dict[str, list[tuple[int, int]]] = {}
    for b in blocks:
        tier, slot = table.lookup(layer, b)
        out.setdefault(tier, []).append((b, slot))
    return out
