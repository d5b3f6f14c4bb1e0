"""The speculative mode end to end: exact with cpu_remainder "all", a small fetch with "none"."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _llama_only(model_dir):
    if "llama" not in str(model_dir):
        pytest.skip("Triton's interpreter runs the gathers here: slow; the mode does not depend on the architecture")

from batches import left_padded
from test_stream_exact import SMALL, _hetero, _reference, model_dir  # noqa: F401  (fixture)

# Heads of 16: a quarter of their columns, as a 128-wide head keeps (min_partial_columns would keep them all).
SPECULATIVE = {**SMALL, "mode": "speculative", "gpu_kv_bytes": "384KiB", "max_tokens": 0.1, "min_tokens": 4,
               "min_partial_columns": 0}


def test_with_the_cpu_attending_over_the_rest_it_is_exact(model_dir):
    ids, mask = left_padded([211, 97, 150], seed=21)
    expected = _reference(model_dir, ids, mask, 8)
    got, model = _hetero(model_dir, ids, mask, 8, {**SPECULATIVE, "cpu_remainder": "all"})
    assert torch.equal(got, expected)
    stats = model.hetero.last_stats
    assert 0 < stats.fetched_token_share <= 0.1 + 1e-6
    assert stats.bytes_read_by_cpu > 0


def test_without_the_rest_it_fetches_a_tenth_and_still_generates(model_dir):
    ids = torch.randint(1, 256, (2, 300), generator=torch.Generator().manual_seed(22))
    got, model = _hetero(model_dir, ids, torch.ones_like(ids), 6, SPECULATIVE)
    assert got.shape == (2, 306)
    stats = model.hetero.last_stats
    assert 0 < stats.fetched_token_share <= 0.1 + 1e-6
    by_layer = stats.fetched_token_share_by_layer
    assert set(by_layer) == {1, 2} and all(0 < share <= 0.1 + 1e-6 for share in by_layer.values())
    assert stats.bytes_read_by_cpu == 0


def test_a_cache_that_fits_the_gpu_budget_needs_no_speculation(model_dir):
    ids = torch.randint(1, 256, (1, 120), generator=torch.Generator().manual_seed(23))
    mask = torch.ones_like(ids)
    expected = _reference(model_dir, ids, mask, 4)
    got, model = _hetero(model_dir, ids, mask, 4, {**SPECULATIVE, "gpu_kv_bytes": "64MiB"})
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.bytes_to_gpu == 0


@pytest.mark.parametrize("remainder,compiled", [("all", True), ("none", False)])
def test_cpu_kernels_are_compiled_at_load_when_the_cpu_attends(model_dir, monkeypatch, remainder, compiled):
    import hetero
    from hetero import cpu_kernels

    calls = []
    monkeypatch.setattr(cpu_kernels, "warmup", lambda dtypes: calls.append(dtypes))
    hetero.load(model_dir, {**SPECULATIVE, "cpu_remainder": remainder}, device="cpu")
    assert bool(calls) == compiled


def test_verification_fetches_what_speculation_missed(model_dir, monkeypatch):
    """Speculation made blind (it hands over nothing): the layer's own query, selecting every middle
    token here, must fetch them all, so the output equals transformers'."""
    import dataclasses

    from hetero.cache import HeteroCache

    pick = HeteroCache._pick
    monkeypatch.setattr(HeteroCache, "_speculation_bytes", lambda self, layout: 0)  # buffers as wide as the middle

    def blind(self, *args):
        picked = pick(self, *args)
        return dataclasses.replace(picked, count=torch.zeros_like(picked.count))

    monkeypatch.setattr(HeteroCache, "_pick", blind)
    g = torch.Generator().manual_seed(24)
    ids = torch.randint(1, 256, (2, 300), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :37] = 0
    expected = _reference(model_dir, ids, mask, 6)
    everything = {**SPECULATIVE, "alpha": 1e9, "max_tokens": 0.99}
    got, model = _hetero(model_dir, ids, mask, 6, everything)
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.verified_token_share > 0


def test_without_verification_nothing_is_added(model_dir):
    ids = torch.randint(1, 256, (2, 300), generator=torch.Generator().manual_seed(25))
    _, model = _hetero(model_dir, ids, torch.ones_like(ids), 4, {**SPECULATIVE, "verify_share": 0})
    stats = model.hetero.last_stats
    assert stats.verified_token_share is None and 0 < stats.fetched_token_share <= 0.1 + 1e-6


def test_debug_measures_the_attention_the_fetched_tokens_hold_and_stays_exact(model_dir):
    ids = torch.randint(1, 256, (2, 300), generator=torch.Generator().manual_seed(26))
    mask = torch.ones_like(ids)
    mask[0, :41] = 0
    expected = _reference(model_dir, ids, mask, 6)
    got, model = _hetero(model_dir, ids, mask, 6, {**SPECULATIVE, "speculation_debug": True})
    assert torch.equal(got, expected)  # the CPU attends over the rest, as with cpu_remainder "all"
    stats = model.hetero.last_stats
    assert 0 < stats.fetched_attention_share < 1
    assert set(stats.fetched_attention_share_by_layer) == {1, 2}  # layer 0 is fetched whole
    assert 0 <= stats.reselected_share <= 1


def test_debug_with_every_middle_token_fetched_reports_all_of_the_attention(model_dir, monkeypatch):
    from hetero.cache import HeteroCache

    monkeypatch.setattr(HeteroCache, "_speculation_bytes", lambda self, layout: 0)  # buffers as wide as the middle
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(27))
    everything = {**SPECULATIVE, "gpu_kv_bytes": "192KiB", "alpha": 1e9, "max_tokens": 0.99, "speculation_debug": True}
    _, model = _hetero(model_dir, ids, torch.ones_like(ids), 4, everything)
    stats = model.hetero.last_stats
    assert stats.fetched_attention_share == pytest.approx(1.0)
    assert stats.reselected_share > 0.9


def test_without_debug_there_are_no_debug_figures(model_dir):
    ids = torch.randint(1, 256, (2, 300), generator=torch.Generator().manual_seed(28))
    _, model = _hetero(model_dir, ids, torch.ones_like(ids), 3, SPECULATIVE)
    stats = model.hetero.last_stats
    assert stats.fetched_attention_share is None and stats.reselected_share is None


def test_kept_rows_give_the_same_tokens_and_fetch_less(model_dir):
    ids, mask = left_padded([300, 240], seed=29)
    fresh, model = _hetero(model_dir, ids, mask, 8, SPECULATIVE)
    fetched_fresh = model.hetero.last_stats.fetched_token_share
    kept, model = _hetero(model_dir, ids, mask, 8, {**SPECULATIVE, "reuse_rows": True, "gpu_kv_bytes": "512KiB"})
    stats = model.hetero.last_stats
    assert torch.equal(kept, fresh)  # the same tokens attended, from rows kept or fetched
    assert stats.reused_token_share > 0 and stats.fetched_token_share < fetched_fresh


def test_kept_rows_with_the_cpu_attending_over_the_rest_stay_exact(model_dir):
    ids, mask = left_padded([211, 97, 150], seed=30)
    expected = _reference(model_dir, ids, mask, 8)
    got, model = _hetero(model_dir, ids, mask, 8,
                         {**SPECULATIVE, "cpu_remainder": "all", "reuse_rows": True, "gpu_kv_bytes": "512KiB"})
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.reused_token_share > 0


def test_bounded_remainder_reading_every_block_is_exact(model_dir):
    ids, mask = left_padded([211, 97, 150], seed=32)
    expected = _reference(model_dir, ids, mask, 6)
    got, model = _hetero(model_dir, ids, mask, 6, {**SPECULATIVE, "cpu_remainder": "bounded", "alpha": 1e9,
                                                   "gpu_kv_bytes": "512KiB"})
    assert torch.equal(got, expected)  # every block within alpha: the CPU reads all the rest, as "all"
    assert model.hetero.last_stats.bytes_read_by_cpu > 0


def test_bounded_remainder_reads_fewer_blocks_than_all(model_dir):
    ids = torch.randint(1, 256, (2, 300), generator=torch.Generator().manual_seed(33))
    config = {**SPECULATIVE, "gpu_kv_bytes": "512KiB", "alpha": 0.5}
    _, model = _hetero(model_dir, ids, torch.ones_like(ids), 6, {**config, "cpu_remainder": "all"})
    read_all = model.hetero.last_stats.bytes_read_by_cpu
    got, model = _hetero(model_dir, ids, torch.ones_like(ids), 6, {**config, "cpu_remainder": "bounded"})
    assert got.shape == (2, 306)
    assert 0 < model.hetero.last_stats.bytes_read_by_cpu < read_all
