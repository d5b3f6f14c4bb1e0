"""Per-block key bounds (Quest, ICML 2024): which blocks of keys may hold a high score for a query.

Each block keeps, per KV head, the elementwise minimum and maximum of its keys. For a query q, no key
k of the block scores above sum_d max(q_d min_d, q_d max_d), so a block whose bound lies far below
the best bound of the layer holds nothing the softmax would weigh. Used by `cpu_remainder = "bounded"`
to choose the blocks whose tokens (those speculation did not fetch) the CPU attends over.
"""

from __future__ import annotations

import torch


def score_upper_bounds(query: torch.Tensor, bounds: torch.Tensor, scale: float) -> torch.Tensor:
    """Upper bounds on the scaled scores, float32 [B, Hkv, G, n], of queries [B, Hkv, G, D] against
    blocks whose key minima and maxima are `bounds` [B, Hkv, n, 2, D]."""
    q = query.float()[:, :, :, None, :]
    lows, highs = bounds.float()[:, :, None, :, 0], bounds.float()[:, :, None, :, 1]
    return torch.maximum(q * lows, q * highs).sum(-1) * scale


def blocks_within(upper: torch.Tensor, alpha: float) -> torch.Tensor:
    """Blocks, bool [B, Hkv, n], whose bound is within `alpha` of the best bound for some query head
    of the group (upper [B, Hkv, G, n])."""
    return (upper >= upper.amax(-1, keepdim=True) - alpha).any(2)
