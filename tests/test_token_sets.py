"""Set operations on per-(row, head) token selections, against Python sets."""

import pytest
import torch

from hetero.token_sets import missing_tokens


def _selection(g, rows, heads, lo, span, width):
    idx = torch.stack([torch.stack([torch.randperm(span, generator=g)[:width] + lo for _ in range(heads)])
                       for _ in range(rows)]).int()
    return idx, torch.randint(0, width + 1, (rows, heads), generator=g).int()


@pytest.mark.parametrize("seed", range(6))
def test_missing_tokens_are_the_wanted_not_held_in_order(seed):
    g = torch.Generator().manual_seed(seed)
    lo, span = int(torch.randint(0, 50, (1,), generator=g)), int(torch.randint(1, 97, (1,), generator=g))
    width = int(torch.randint(1, span + 1, (1,), generator=g))
    wanted, wanted_count = _selection(g, 2, 3, lo, span, width)
    held, held_count = _selection(g, 2, 3, lo, span, int(torch.randint(1, span + 1, (1,), generator=g)))
    missing, count = missing_tokens(wanted, wanted_count, held, held_count, lo, lo + span)
    assert missing.shape == wanted.shape and count.dtype == torch.int32
    for b in range(2):
        for h in range(3):
            have = set(held[b, h, : held_count[b, h]].tolist())
            expected = [t for t in wanted[b, h, : wanted_count[b, h]].tolist() if t not in have]
            assert missing[b, h, : count[b, h]].tolist() == expected


def test_nothing_held_means_everything_wanted_is_missing():
    wanted = torch.tensor([[[7, 3, 5]]], dtype=torch.int32)
    missing, count = missing_tokens(wanted, torch.tensor([[2]], dtype=torch.int32),
                                    torch.tensor([[[3, 3, 3]]], dtype=torch.int32), torch.tensor([[0]], dtype=torch.int32), 3, 8)
    assert count.tolist() == [[2]] and missing[0, 0, :2].tolist() == [7, 3]
