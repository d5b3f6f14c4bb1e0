"""Per-block key bounds (cpu_remainder "bounded"): never below a true score, and the alpha rule over them."""

import pytest
import torch

from hetero.block_bounds import blocks_within, score_upper_bounds


@pytest.mark.parametrize("seed", range(3))
def test_the_bound_is_never_below_a_score_in_the_block(seed):
    g = torch.Generator().manual_seed(seed)
    b, kv_heads, group, blocks, size, dim = 2, 3, 4, 7, 11, 24
    keys = torch.randn(b, kv_heads, blocks, size, dim, generator=g) * torch.rand(1, 1, blocks, 1, dim, generator=g) * 3
    query = torch.randn(b, kv_heads, group, dim, generator=g)
    bounds = torch.stack([keys.amin(3), keys.amax(3)], dim=3)  # [B, Hkv, n, 2, D]
    upper = score_upper_bounds(query, bounds, 0.125)
    scores = torch.einsum("bhgd,bhnsd->bhgns", query, keys) * 0.125
    assert (upper >= scores.amax(-1) - 1e-5).all()
    # A block of identical keys is bounded by its one score exactly.
    same = keys[:, :, :1, :1].expand(-1, -1, 1, size, -1)
    flat = torch.stack([same.amin(3), same.amax(3)], dim=3)
    exact = torch.einsum("bhgd,bhnd->bhgn", query, same[:, :, :, 0]) * 0.125
    assert torch.allclose(score_upper_bounds(query, flat, 0.125), exact, atol=1e-5)


def test_blocks_within_alpha_of_some_heads_best():
    upper = torch.tensor([[[[0.0, -3.0, -9.0], [-9.0, -9.0, -1.0]]]])  # [B=1, Hkv=1, G=2, n=3]
    assert blocks_within(upper, 5.0).tolist() == [[[True, True, True]]]
    assert blocks_within(upper, 2.0).tolist() == [[[True, False, True]]]


def test_ranges_cover_the_chosen_blocks_but_the_selected_tokens():
    import numpy as np

    from hetero.host_attention import _ranges_in_blocks

    g = np.random.default_rng(4)
    lo, bs, n = 32, 8, 9
    hi = lo + n * bs
    blocks = g.random((2, 3, n)) < 0.5
    selected = np.full((2, 3, 10), hi, np.int64)
    for b in range(2):
        for h in range(3):
            k = int(g.integers(0, 11))
            selected[b, h, :k] = np.sort(g.choice(np.arange(lo, hi), k, replace=False))
    ranges = _ranges_in_blocks(selected, lo, hi, blocks, bs)
    for b in range(2):
        for h in range(3):
            covered = {t for start, end in ranges[b, h] for t in range(start, end)}
            chosen = {t for t in range(lo, hi) if blocks[b, h, (t - lo) // bs]}
            assert covered == chosen - set(selected[b, h].tolist())
