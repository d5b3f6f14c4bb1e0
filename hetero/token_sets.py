"""Set operations on token selections, per (batch row, KV head), on the device with fixed shapes.

A selection is `(token_idx [B, Hkv, N], count [B, Hkv])`: the first `count` entries of each row
are positions, the rest padding, as `hetero.speculate.select_tokens` returns them. Nothing here
reads a count back to the host, so a decode step never waits on the GPU for them.
"""

from __future__ import annotations

import torch


def missing_tokens(wanted: torch.Tensor, wanted_count: torch.Tensor, held: torch.Tensor, held_count: torch.Tensor,
                   lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The wanted positions that are not held, as a selection of the same width as `wanted`.

    Both selections hold positions in [lo, hi); the result lists the missing ones first, in
    `wanted`'s order, then padding (positions from `wanted`, never read past the count).
    """
    width = wanted.shape[-1]
    span = hi - lo
    # One mark per position of the span, plus a last one where the held padding lands.
    marks = torch.zeros(*held.shape[:-1], span + 1, dtype=torch.bool, device=held.device)
    held_live = torch.arange(held.shape[-1], device=held.device) < held_count[..., None]
    marks.scatter_(-1, torch.where(held_live, held.long() - lo, span), True)
    live = torch.arange(width, device=wanted.device) < wanted_count[..., None]
    need = live & ~marks.gather(-1, wanted.long() - lo)
    # A stable sort on "not needed" puts the needed entries first, in order.
    order = (~need).to(torch.uint8).sort(dim=-1, stable=True).indices
    return wanted.gather(-1, order), need.sum(-1, dtype=torch.int32)
