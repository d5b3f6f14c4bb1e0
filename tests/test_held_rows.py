"""A layer's rows kept from one decode step to the next: moved, not fetched again, and always right."""

import pytest
import torch

from hetero.held_rows import HeldRows

B, HKV, BS, D, BLOCKS = 2, 3, 8, 5, 13


def _pool(seed):
    pool = torch.randn(BLOCKS, 2, B, HKV, BS, D, generator=torch.Generator().manual_seed(seed))
    table = torch.randperm(BLOCKS, generator=torch.Generator().manual_seed(seed + 1)).int()
    return pool, table


def _row(pool, table, b, h, t):
    return pool[table[t // BS], :, b, h, t % BS]  # [2, D]


def _selection(g, lo, hi, n, previous):
    """n distinct positions in [lo, hi) per (row, head); about half of them from `previous` (the
    step before's, as consecutive decode steps select), when given."""
    rows = []
    for b in range(B):
        heads = []
        for h in range(HKV):
            again = previous.get((b, h), [])[: n // 2]
            fresh = [t for t in (torch.randperm(hi - lo, generator=g) + lo).tolist() if t not in again]
            heads.append(again + fresh[: n - len(again)])
        rows.append(heads)
    return torch.tensor(rows, dtype=torch.int32)


@pytest.mark.parametrize("seed", range(4))
def test_refills_hold_the_selection_and_fetch_only_what_was_not_held(seed):
    g = torch.Generator().manual_seed(seed)
    pool, table = _pool(seed)
    lo, width = 8, 20
    held = HeldRows.empty(B, HKV, width, D, pool.dtype, "cpu")
    scratch = torch.empty(2, B, HKV, width, D)
    before = {}
    for step in range(6):
        hi = 60 + 4 * step  # the middle grows as the context does
        n = int(torch.randint(1, width + 1, (1,), generator=g))
        selected = _selection(g, lo, hi, n, before if seed % 2 else {})
        count = torch.randint(0, n + 1, (B, HKV), generator=g).int()
        fetched = held.refill(pool, table, selected, count, scratch, lo, hi)
        keys, values = held.segment_views()
        for b in range(B):
            for h in range(HKV):
                c = int(count[b, h])
                want, have = selected[b, h, :c].tolist(), held.idx[b, h, :c].tolist()
                assert sorted(have) == sorted(want) and int(held.count[b, h]) == c
                for r, t in enumerate(have):
                    assert torch.equal(torch.stack([keys[b, h, r], values[b, h, r]]), _row(pool, table, b, h, t))
                assert int(fetched[b, h]) == len(set(want) - set(before.get((b, h), [])))
                before[(b, h)] = want


def test_a_selection_held_already_fetches_only_its_new_token():
    pool, table = _pool(9)
    held = HeldRows.empty(B, HKV, 6, D, pool.dtype, "cpu")
    scratch = torch.empty(2, B, HKV, 6, D)
    selected = torch.tensor([10, 30, 20, 50, 41, 12], dtype=torch.int32).expand(B, HKV, 6).contiguous()
    count = torch.full((B, HKV), 5, dtype=torch.int32)
    assert held.refill(pool, table, selected, count, scratch, 8, 64).tolist() == [[5] * HKV] * B
    # Reversed, the first five are 12 (new) and four held ones.
    assert held.refill(pool, table, selected.flip(-1), count, scratch, 8, 64).tolist() == [[1] * HKV] * B
