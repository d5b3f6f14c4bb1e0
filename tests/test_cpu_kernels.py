"""The Numba host attention kernels against the float64 PyTorch reference, on fresh random inputs."""

import os

import numpy as np
import pytest
import torch

from hetero.cpu_kernels import (
    host_decode_attention,
    host_decode_attention_indexed,
    merge_partials,
    set_threads,
    warmup,
)
from hetero.cpu_kernels import reference

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _case(rng, dtype, D, G, B=2, Hkv=2, bs=16, n_blocks=13, spare=4):
    """q, a pool with spare slots, a shuffled block table; random values everywhere."""
    n_slots = n_blocks + spare
    pool = torch.from_numpy(rng.standard_normal((n_slots, 2, B, Hkv, bs, D), dtype=np.float32)).to(DTYPES[dtype])
    table = torch.from_numpy(rng.permutation(n_slots)[:n_blocks].astype(np.int32))
    q = torch.from_numpy(rng.standard_normal((B, G * Hkv, D), dtype=np.float32))
    return q, pool, table


def _random_ranges(rng, B, Hkv, R, n_tokens):
    """R sorted, non-overlapping [start, end) per head, some empty, some of one token."""
    ranges = np.zeros((B, Hkv, R, 2), np.int32)
    for b in range(B):
        for h in range(Hkv):
            cuts = np.sort(rng.choice(n_tokens + 1, 2 * R, replace=False))
            spans = cuts.reshape(R, 2)
            empty = rng.integers(R)
            spans[empty, 1] = spans[empty, 0]
            ranges[b, h] = spans
    ranges[0, 0, 0] = [5, 6]  # a one-token range
    return ranges


def _poisoned(B, Hq, D):
    return torch.full((B, Hq, D), float("nan")), torch.full((B, Hq), float("nan"))


def _assert_close(out, lse, ref_out, ref_lse, dtype):
    tol = 2e-5 if dtype == "float32" else 3e-5
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    torch.testing.assert_close(out.double(), ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, atol=tol, rtol=tol)


@pytest.mark.parametrize(
    "dtype,D,G,chunk",
    [
        ("bfloat16", 64, 1, 37),
        ("bfloat16", 80, 4, None),
        ("bfloat16", 96, 8, 19),
        ("bfloat16", 128, 4, 50),
        ("bfloat16", 256, 8, 23),
        ("float16", 128, 8, 29),
        ("float16", 80, 1, None),
        ("float16", 256, 4, 41),
        ("float32", 64, 4, 31),
        ("float32", 96, 1, None),
        ("float32", 128, 8, 33),
        ("float32", 256, 2, 17),
    ],
)
def test_ranges_match_reference(dtype, D, G, chunk):
    rng = np.random.default_rng(D * 10 + G)
    q, pool, table = _case(rng, dtype, D, G, bs=16 if D != 96 else 24)
    n_tokens = table.numel() * pool.shape[4] - 3
    ranges = _random_ranges(rng, 2, 2, 3, n_tokens)
    out, lse = _poisoned(*q.shape)
    got = host_decode_attention(q, pool, table, torch.from_numpy(ranges), D**-0.5, chunk=chunk, out=out, lse=lse)
    assert got[0] is out and got[1] is lse
    _assert_close(out, lse, *reference.decode_attention(q, pool, table, ranges, D**-0.5), dtype)


def test_prefetching_the_next_tile_changes_nothing(monkeypatch):
    """The prefetch is only a hint: the results are the same bits with it off or spread over the value
    passes (head_dim 96: a pass of two loads and one of one), at odd tiles."""
    from hetero.cpu_kernels import attention

    rng = np.random.default_rng(11)
    q, pool, table = _case(rng, "bfloat16", 96, 4, bs=24)
    ranges = torch.from_numpy(_random_ranges(rng, 2, 2, 3, table.numel() * 24 - 5))
    results = []
    for prefetch, spread in ((1, False), (2, False), (0, False), (2, True), (1, True)):
        monkeypatch.setattr(attention, "PREFETCH_NEXT_TILE", prefetch)
        monkeypatch.setattr(attention, "SPREAD_V_PREFETCH", spread)
        monkeypatch.setattr(attention, "TILE_TOKENS", 20)
        results.append(host_decode_attention(q, pool, table, ranges, 0.1, chunk=45))
    for other in results[1:]:
        assert torch.equal(results[0][0], other[0]) and torch.equal(results[0][1], other[1])
    _assert_close(*results[0], *reference.decode_attention(q, pool, table, ranges.numpy(), 0.1), "bfloat16")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_numpy_pools_in_numpy_out(dtype):
    rng = np.random.default_rng(7)
    q, pool, table = _case(rng, dtype, 128, 4, B=1, Hkv=3, bs=32, n_blocks=5)
    bits = {"bfloat16": lambda p: p.view(torch.int16).numpy().view(np.uint16), "float16": lambda p: p.numpy()}
    pool_np = bits.get(dtype, lambda p: p.numpy())(pool)
    ranges = np.array([[[[0, 70], [90, 160]]] * 3], np.int32)
    out, lse = host_decode_attention(q.numpy(), pool_np, table.numpy(), ranges, 0.1)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and lse.shape == (1, 12)
    _assert_close(torch.from_numpy(out), torch.from_numpy(lse), *reference.decode_attention(q, pool, table, ranges, 0.1), dtype)


def test_large_scores_take_the_online_rescale():
    """Scores growing along the sequence force many max updates; values far from 0 test exp."""
    rng = np.random.default_rng(3)
    q, pool, table = _case(rng, "float32", 64, 4, n_blocks=20)
    growth = 1 + torch.linspace(0, 6, table.numel() * 16).reshape(-1, 1, 1, 16, 1)
    pool[table.long(), 0] *= growth  # logical token t's keys scaled by growth[t]
    q *= 4
    ranges = np.array([[[[0, 320]]] * 2] * 2, np.int32)
    out, lse = _poisoned(*q.shape)
    host_decode_attention(q, pool, table, ranges, 1.0, chunk=70, out=out, lse=lse)
    ref_out, ref_lse = reference.decode_attention(q, pool, table, ranges, 1.0)
    assert ref_lse.max() > 100
    torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=0, rtol=2e-6)


def test_heads_without_tokens_get_zero_and_minus_inf():
    rng = np.random.default_rng(4)
    q, pool, table = _case(rng, "bfloat16", 80, 4)
    ranges = np.zeros((2, 2, 2, 2), np.int32)
    ranges[1, 0] = [[3, 3], [10, 40]]
    out, lse = _poisoned(*q.shape)
    host_decode_attention(q, pool, table, ranges, 0.1, out=out, lse=lse)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(out[1, 4:], torch.zeros_like(out[1, 4:]))
    assert torch.isneginf(lse[0]).all() and torch.isneginf(lse[1, 4:]).all() and torch.isfinite(lse[1, :4]).all()
    _assert_close(out, lse, *reference.decode_attention(q, pool, table, ranges, 0.1), "bfloat16")


@pytest.mark.parametrize("dtype,D,G", [("bfloat16", 80, 4), ("float16", 64, 1), ("float32", 128, 8)])
def test_indexed_matches_reference(dtype, D, G):
    rng = np.random.default_rng(D + G)
    q, pool, table = _case(rng, dtype, D, G, B=2, Hkv=3)
    n_tokens, N = table.numel() * 16, 61
    idx = rng.integers(0, n_tokens, (2, 3, N)).astype(np.int32)  # past the count: never read
    count = np.array([[N, 0, 1], [45, 17, 30]], np.int32)
    for b in range(2):
        for h in range(3):
            idx[b, h, : count[b, h]] = rng.choice(n_tokens, count[b, h], replace=False)
    out, lse = _poisoned(*q.shape)
    host_decode_attention_indexed(q, pool, table, idx, count, D**-0.5, chunk=13, out=out, lse=lse)
    ref = reference.decode_attention_indexed(q, pool, table, idx, count, D**-0.5)
    _assert_close(out, lse, *ref, dtype)
    assert torch.isneginf(lse[0, G : 2 * G]).all()


def test_units_are_equal_shares_that_cover_every_range_once():
    """Work is cut by token count across heads and ranges, so no thread count leaves a lone remainder."""
    from hetero.cpu_kernels._kernel import build_units

    rng = np.random.default_rng(12)
    ranges = _random_ranges(rng, 2, 3, 4, 500)
    ranges[1, 2] = 0  # a head with no tokens
    pieces, unit_begin, head_begin, n_parts = build_units(ranges, 37)
    lengths = pieces[:, 2] - pieces[:, 1]
    per_unit = np.add.reduceat(lengths, unit_begin[:-1])
    total = int(np.clip(ranges[..., 1] - ranges[..., 0], 0, None).sum())
    assert (per_unit[:-1] == 37).all() and 0 < per_unit[-1] <= 37 and per_unit.sum() == total
    assert (lengths > 0).all() and n_parts == pieces[-1, 3] + 1
    for bh in range(6):
        mine = pieces[pieces[:, 0] == bh]
        assert set(mine[:, 3]) == set(range(head_begin[bh], head_begin[bh + 1]))
        covered = np.concatenate([np.arange(a, b) for _, a, b, _ in mine]) if len(mine) else np.empty(0, int)
        b, h = divmod(bh, 3)
        wanted = np.concatenate([np.arange(a, b_) for a, b_ in ranges[b, h]])
        assert np.array_equal(covered, wanted)


def test_merged_partials_equal_attention_over_the_union():
    rng = np.random.default_rng(11)
    q, pool, table = _case(rng, "bfloat16", 128, 4, n_blocks=16)
    a = np.array([[[[0, 50], [100, 130]]] * 2] * 2, np.int32)
    b = np.array([[[[50, 100], [200, 256]]] * 2] * 2, np.int32)
    listed = np.arange(130, 200, dtype=np.int32)
    idx = np.broadcast_to(rng.permutation(listed), (2, 2, listed.size)).copy()
    count = np.full((2, 2), listed.size, np.int32)
    empty = np.zeros((2, 2, 1, 2), np.int32)
    parts = [
        host_decode_attention(q, pool, table, a, 0.09),
        host_decode_attention_indexed(q, pool, table, idx, count, 0.09),
        host_decode_attention(q, pool, table, b, 0.09),
        host_decode_attention(q, pool, table, empty, 0.09),
    ]
    out, lse = merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    union = np.array([[[[0, 256]]] * 2] * 2, np.int32)
    _assert_close(out, lse, *reference.decode_attention(q, pool, table, union, 0.09), "bfloat16")
    ref_out, ref_lse = reference.merge_partials(torch.stack([p[0] for p in parts]), torch.stack([p[1] for p in parts]))
    _assert_close(out, lse, ref_out, ref_lse, "float32")


def test_merge_of_nothing_is_zero_not_nan():
    outs = np.zeros((3, 2, 4, 8), np.float32)
    lses = np.full((3, 2, 4), -np.inf, np.float32)
    lses[1, 0, 0] = 0.5
    outs[1, 0, 0] = 2.0
    out, lse = merge_partials(outs, lses)
    assert isinstance(out, np.ndarray) and not np.isnan(out).any()
    assert np.all(out[0, 0] == 2.0) and lse[0, 0] == np.float32(0.5)
    assert np.all(out.reshape(-1, 8)[1:] == 0) and np.isneginf(lse.reshape(-1)[1:]).all()


def test_thread_counts_agree():
    rng = np.random.default_rng(5)
    q, pool, table = _case(rng, "bfloat16", 96, 4, n_blocks=30)
    ranges = np.array([[[[0, 470]]] * 2] * 2, np.int32)
    one = host_decode_attention(q, pool, table, ranges, 0.1, threads=1)
    set_threads(2)
    try:
        two = host_decode_attention(q, pool, table, ranges, 0.1)
    finally:
        set_threads(None)
    torch.testing.assert_close(one[0], two[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(one[1], two[1], atol=1e-5, rtol=1e-5)


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(6)
    q, pool, table = _case(rng, "float32", 64, 1)
    ok = np.array([[[[0, 10]]] * 2] * 2, np.int32)
    with pytest.raises(ValueError, match="ranges"):
        host_decode_attention(q, pool, table, ok + table.numel() * 16, 0.1)
    with pytest.raises(ValueError, match="block_table"):
        host_decode_attention(q, pool, table + 100, ok, 0.1)
    elsewhere = table.clone()
    elsewhere[1:] = -1  # blocks the ranges do not touch need no slot
    host_decode_attention(q, pool, elsewhere, ok, 0.1)
    with pytest.raises(ValueError, match="block_table"):
        host_decode_attention(q, pool, elsewhere, ok + 10, 0.1)
    with pytest.raises(ValueError, match="pool"):
        host_decode_attention(q, pool.transpose(4, 5), table, ok, 0.1)
    with pytest.raises(ValueError, match="pool"):
        host_decode_attention(q, pool.double(), table, ok, 0.1)
    with pytest.raises(ValueError, match="token_count"):
        host_decode_attention_indexed(q, pool, table, np.zeros((2, 2, 3), np.int32), np.full((2, 2), 4, np.int32), 0.1)
    with pytest.raises(ValueError, match="q"):
        host_decode_attention(q[:, :, :32], pool, table, ok, 0.1)


def test_warmup_compiles_every_pool_dtype():
    warmup()
    from hetero.cpu_kernels._kernel import attend_units

    assert {sig[1].dtype.name for sig in attend_units.signatures} == {"uint16", "float32"}


def test_vector_width_leaves_a_users_numba_features_alone():
    """NUMBA_CPU_FEATURES set by the user wins; without it, AVX-512 hosts get 512-bit vectors."""
    import subprocess
    import sys

    import llvmlite.binding as llvm

    probe = "import hetero.cpu_kernels; from numba.core import config; print(config.CPU_FEATURES)"
    env = dict(os.environ, NUMBA_CPU_FEATURES="+sse2")
    given = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert given.stdout.strip() == "+sse2"
    env.pop("NUMBA_CPU_FEATURES")
    chosen = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    if llvm.get_host_cpu_features().get("avx512f"):
        assert chosen.stdout.strip().endswith(",-prefer-256-bit")
    else:
        assert chosen.stdout.strip() == "None"
    # An AVX-512 host, as LLVM would describe it (nothing compiles in the probe, so nothing runs).
    fake_host = ("import llvmlite.binding as llvm\n"
                 "class Features(dict):\n    def flatten(self):\n        return '+avx512f,+sse2'\n"
                 "llvm.get_host_cpu_features = lambda: Features(avx512f=True, sse2=True)\n")
    wide = subprocess.run([sys.executable, "-c", fake_host + probe], env=env, capture_output=True, text=True, check=True)
    assert wide.stdout.strip() == "+avx512f,+sse2,-prefer-256-bit"


def test_bfloat16_query_parts_sum_exactly_to_the_query():
    """vdpbf16ps takes the query as bfloat16 parts: their sum must be the float32 query, bit for bit."""
    from hetero.cpu_kernels._bf16_tiles import bfloat16_parts

    rng = np.random.default_rng(13)
    q = rng.standard_normal((2, 8, 96)).astype(np.float32) * np.float32(30)
    q[0, 5, 7] = 0.0
    packed = np.zeros((3, 4, 48), np.uint32)
    assert bfloat16_parts(q, 1, 4, 4, packed) == 3
    halves = np.stack([packed << np.uint32(16), packed & np.uint32(0xFFFF0000)], axis=-1).reshape(3, 4, 96)
    parts = halves.view(np.float32).astype(np.float64)
    assert np.array_equal(parts.sum(0), q[1, 4:8].astype(np.float64))
    exact = torch.from_numpy(q).to(torch.bfloat16).float().numpy()
    assert bfloat16_parts(exact, 0, 0, 8, np.zeros((3, 8, 48), np.uint32)) == 1


@pytest.mark.parametrize("indexed", [False, True])
def test_bfloat16_tiles_match_the_numba_loops(monkeypatch, indexed):
    """The hand-built bfloat16 loops and Numba's own agree with the reference, at an odd tile and
    chunk, with scores that grow along the sequence (online rescales), at G 4 and 8."""
    from hetero.cpu_kernels import attention

    monkeypatch.setattr(attention, "AMX_TILES", False)
    rng = np.random.default_rng(14 + indexed)
    for G in (4, 8):
        q, pool, table = _case(rng, "bfloat16", 128, G, n_blocks=20)
        growth = 1 + torch.linspace(0, 3, table.numel() * 16).reshape(-1, 1, 1, 16, 1)
        pool[table.long(), 0] = (pool[table.long(), 0].float() * growth).to(torch.bfloat16)
        n_tokens = table.numel() * 16
        idx = np.stack([rng.permutation(n_tokens)[:150] for _ in range(4)]).reshape(2, 2, 150).astype(np.int32)
        count = np.array([[150, 0], [77, 3]], np.int32)
        ranges = _random_ranges(rng, 2, 2, 3, n_tokens)
        results = []
        for tiles in (True, False):
            monkeypatch.setattr(attention, "BF16_TILES", tiles)
            monkeypatch.setattr(attention, "TILE_TOKENS", 20)
            if indexed:
                results.append(host_decode_attention_indexed(q, pool, table, idx, count, 0.2, chunk=47))
            else:
                results.append(host_decode_attention(q, pool, table, ranges, 0.2, chunk=47))
        ref = (reference.decode_attention_indexed(q, pool, table, idx, count, 0.2) if indexed
               else reference.decode_attention(q, pool, table, ranges, 0.2))
        for out, lse in results:
            _assert_close(out, lse, *ref, "bfloat16")


def test_hand_built_loops_by_default_wherever_they_apply(monkeypatch):
    """BF16_TILES None takes the hand-built loops (they ran faster than Numba's own on every CPU
    measured); False forces Numba's."""
    from hetero.cpu_kernels import attention

    q, pool, table = _case(np.random.default_rng(21), "bfloat16", 64, 4, n_blocks=6)
    ranges = torch.tensor([0, 90], dtype=torch.int32).expand(2, 2, 1, 2).contiguous()
    monkeypatch.setattr(attention, "TILE_TOKENS", 20)
    monkeypatch.setattr(attention, "AMX_TILES", False)
    forced = {}
    for tiles in (True, False):
        monkeypatch.setattr(attention, "BF16_TILES", tiles)
        forced[tiles] = host_decode_attention(q, pool, table, ranges, 0.3, chunk=30)[0]
    assert not torch.equal(forced[True], forced[False])  # the two loops sum in different orders
    monkeypatch.setattr(attention, "BF16_TILES", None)
    assert torch.equal(host_decode_attention(q, pool, table, ranges, 0.3, chunk=30)[0], forced[True])


def test_kernel_helpers_count_no_references():
    """Every function the kernel's parallel tasks call compiles without Numba's reference counts:
    each counted call adds and removes a reference to the pool that all threads share, atomically,
    and the cores then queue on that one cache line (22 against 87 GB/s in cache on 16 cores)."""
    from numba.core.registry import CPUDispatcher

    from hetero.cpu_kernels import _amx_tiles, _bf16_tiles, _kernel

    helpers = [f for module in (_kernel, _bf16_tiles, _amx_tiles) for name, f in vars(module).items()
               if isinstance(f, CPUDispatcher) and f.py_func.__module__ == module.__name__
               and name not in ("attend_units", "build_units", "check_ranges", "cpu_has_dpbf16", "cpu_has_amx")]
    assert {"_score_tile", "_accumulate_tile", "_bf16_tile", "_amx_tile", "query_tiles", "_prefetch_rows"} <= {
        f.__name__ for f in helpers}
    counted = [f.__name__ for f in helpers if f.targetoptions.get("_nrt", True)]
    assert counted == [], f"compile these with _nrt=False: {counted}"


def test_row_max_takes_every_element_at_any_length():
    """The softmax's max by 8 running maxima: every length from 1 (the tail alone) past two rounds
    of 8, the largest element anywhere, negative rows too."""
    from hetero.cpu_kernels._kernel import _row_max

    rng = np.random.default_rng(31)
    for n in range(1, 27):
        row = (rng.standard_normal(n + 5) - 3).astype(np.float32)
        for top in range(n):
            row[:n] = -np.abs(row[:n])
            row[top] = 1.5
            assert _row_max(row, n) == np.float32(1.5)
        assert _row_max(row, n) == row[:n].max()


@pytest.mark.skipif(not hasattr(os, "sched_getaffinity"), reason="CPU affinity is Linux-only")
def test_thread_cpus_confine_the_callers_team_and_let_it_back(monkeypatch):
    """THREAD_CPUS confines every member of the calling thread's team (found by their thread ids) at
    its next call, the results unchanged; None lets them back onto every CPU; a CPU the process lacks
    is refused by name."""
    from hetero.cpu_kernels import attention
    from hetero.cpu_kernels.thread_cpus import ALL_CPUS, pin_team, team_thread_ids

    if team_thread_ids() is None:
        pytest.skip("no gettid here")
    rng = np.random.default_rng(12)
    q, pool, table = _case(rng, "bfloat16", 64, 4)
    ranges = torch.from_numpy(_random_ranges(rng, 2, 2, 2, table.numel() * 16 - 3))
    free = host_decode_attention(q, pool, table, ranges, 0.1)
    one = min(ALL_CPUS)
    try:
        monkeypatch.setattr(attention, "THREAD_CPUS", [one])
        pinned = host_decode_attention(q, pool, table, ranges, 0.1)
        assert all(os.sched_getaffinity(int(t)) == {one} for t in team_thread_ids())
        monkeypatch.setattr(attention, "THREAD_CPUS", None)
        host_decode_attention(q, pool, table, ranges, 0.1)
        assert all(os.sched_getaffinity(int(t)) == set(ALL_CPUS) for t in team_thread_ids())
    finally:
        pin_team(None)
    assert torch.equal(free[0], pinned[0]) and torch.equal(free[1], pinned[1])
    with pytest.raises(ValueError, match="not among"):
        pin_team([max(ALL_CPUS) + 1])
