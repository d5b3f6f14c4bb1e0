"""The placement policy: coldest blocks first, protected blocks never."""


import pytest

from hetero.placement import NEVER, Placement, protected_blocks


def test_victims_lowest_importance_then_least_recently_used():
    p = Placement(2)
    p.note_use(0, [0, 1, 2, 3, 4, 5], step=1)
    p.note_use(0, [2, 4], step=5)
    p.note_use(0, [3], step=3)
    p.note_selected(0, [4, 4, 1])  # 4 selected twice, 1 once
    # importance 0: 0 (step 1), 5 (step 1), 3 (step 3), 2 (step 5); then 1 (imp 1), 4 (imp 2)
    assert p.victims(0, range(6), n=6) == [0, 5, 3, 2, 1, 4]
    assert p.victims(0, range(6), n=2) == [0, 5]
    assert p.victims(0, [4, 1, 1], n=5) == [1, 4]  # repeats counted once
    assert p.importance(0, 4) == 2 and p.last_used(0, 2) == 5 and p.last_used(1, 0) == NEVER


def test_protected_blocks_are_never_victims():
    p = Placement(1)
    n_blocks = 10
    p.note_use(0, range(n_blocks), step=0)
    guard = protected_blocks(n_blocks, sink_blocks=1, window_blocks=3)
    assert guard == {0, 7, 8, 9}
    got = p.victims(0, range(n_blocks), n=100, protected=guard)
    assert got == [1, 2, 3, 4, 5, 6]
    assert p.victims(0, range(n_blocks), n=0) == []
    assert protected_blocks(2, sink_blocks=4, window_blocks=4) == {0, 1}


def test_never_used_blocks_go_first():
    p = Placement(1)
    p.note_use(0, [0, 2], step=7)
    assert p.victims(0, [0, 1, 2, 3], n=2) == [1, 3]


def test_victims_across_layers():
    p = Placement(3)
    p.note_use(0, [0, 1], step=4)
    p.note_use(1, [0, 1], step=2)
    p.note_use(2, [0], step=9)
    p.note_selected(1, [0])
    cands = [(l, b) for l in range(3) for b in range(2)]
    # (2, 1) never used; then (1, 1) step 2, (0, 0), (0, 1) step 4, (2, 0) step 9; (1, 0) selected once
    assert p.victims(None, cands, n=6) == [(2, 1), (1, 1), (0, 0), (0, 1), (2, 0), (1, 0)]
    assert p.victims(None, cands, n=6, protected=[(2, 1), (0, 0)]) == [(1, 1), (0, 1), (2, 0), (1, 0)]
    assert p.victims(None, [], n=3) == []


def test_forget_and_growth():
    p = Placement(1)
    p.note_use(0, [1000], step=3)  # grows to hold block 1000
    p.note_selected(0, [1000])
    p.forget(0, [1000])
    assert p.last_used(0, 1000) == NEVER and p.importance(0, 1000) == 0
    p.note_use(0, [5], step=1)
    p.forget(0)
    assert p.last_used(0, 5) == NEVER
    with pytest.raises(ValueError):
        p.note_use(0, [-1], step=0)


def test_placement_needs_no_torch():
    import hetero.placement as mod
    src = open(mod.__file__).read()
    assert "import torch" not in src and "cuda" not in src.lower()
