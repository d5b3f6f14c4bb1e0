"""Set operations on token selections, per (batch row, KV head), on the device with fixed shapes.

A selection is `(token_idx [B, Hkv, N], count [B, Hkv])`: the first `count` entries of each row
are positions, the rest padding, as `hetero.speculate.select_tokens` returns them. Nothing here
reads a count back to the host, so a decode step never waits on the GPU for them.
"""

from __future__ import annotations

import torch


def live_entries(positions: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """bool [..., N]: which entries of a selection's `positions` [..., N] lie within its `count`."""
    return torch.arange(positions.shape[-1], device=positions.device) < count[..., None]


def members(positions: torch.Tensor, live: torch.Tensor, within: torch.Tensor, within_count: torch.Tensor,
            lo: int, hi: int) -> torch.Tensor:
    """bool [..., N]: the `live` entries of `positions` that are among the selection (`within`,
    `within_count`); live positions lie in [lo, hi), the others may hold anything."""
    span = hi - lo
    # One mark per position of the span, plus a last one where padding (of either side) lands.
    marks = torch.zeros(*within.shape[:-1], span + 1, dtype=torch.bool, device=within.device)
    marks.scatter_(-1, torch.where(live_entries(within, within_count), within.long() - lo, span), True)
    return live & marks.gather(-1, torch.where(live, positions.long() - lo, span))


def missing_tokens(wanted: torch.Tensor, wanted_count: torch.Tensor, held: torch.Tensor, held_count: torch.Tensor,
                   lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The wanted positions that are not held, as a selection of the same width as `wanted`.

    Both selections hold positions in [lo, hi); the result lists the missing ones first, in
    `wanted`'s order, then padding (positions from `wanted`, never read past the count).
    """
    live = live_entries(wanted, wanted_count)
    need = live & ~members(wanted, live, held, held_count, lo, hi)
    # A stable sort on "not needed" puts the needed entries first, in order.
    order = (~need).to(torch.uint8).sort(dim=-1, stable=True).indices
    return wanted.gather(-1, order), need.sum(-1, dtype=torch.int32)
