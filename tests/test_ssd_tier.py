"""The SSD tier under the cache: host budgets so small that most middle blocks live on the SSD."""

import errno
import os
import warnings

import pytest
import torch

import hetero
from hetero import cache as cache_module
from hetero.demo import save_random_model
from hetero.storage import Fault, NvmeStore, StorageIOError

from batches import left_padded
from test_stream_exact import _reference

SSD_CONFIG = {
    "block_size": 16,
    "sink_tokens": 16,
    "window_tokens": 32,
    "gpu_kv_bytes": "256KiB",
    "cpu_kv_bytes": "416KiB",
    "ssd_kv_bytes": "4MiB",
    "prefill_chunk_tokens": 64,
}


@pytest.fixture(scope="module")
def six_layers(tmp_path_factory):
    path = tmp_path_factory.mktemp("six")
    return save_random_model(path, "llama", seed=11, layers=6, hidden=64, heads=4, kv_heads=2, vocab=256)


def _generate(model_dir, ids, mask, new_tokens, config):
    model = hetero.load(model_dir, config, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tmpfs takes no O_DIRECT: buffered I/O, with a warning
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                 do_sample=False, pad_token_id=0)
    return out, model.hetero.last_stats


@pytest.mark.parametrize("mode", ["stream", "split"])
def test_most_blocks_on_the_ssd_and_tokens_are_exact(six_layers, tmp_path, mode):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(12))
    mask = torch.ones_like(ids)
    expected = _reference(six_layers, ids, mask, 6)
    got, stats = _generate(six_layers, ids, mask, 6, {**SSD_CONFIG, "mode": mode, "ssd_dir": str(tmp_path)})
    assert torch.equal(got, expected)
    assert stats.ssd_kv_bytes > 0 and stats.bytes_to_ssd > 0 and stats.bytes_from_ssd > 0
    assert stats.host_kv_bytes <= 416 * 1024
    assert os.listdir(tmp_path) == [], "the spill directory is removed when generation ends"


def test_left_padded_batch_with_the_ssd_tier_is_exact(six_layers, tmp_path):
    ids, mask = left_padded([260, 141], seed=13)
    expected = _reference(six_layers, ids, mask, 5)
    config = {**SSD_CONFIG, "gpu_kv_bytes": "512KiB", "cpu_kv_bytes": "800KiB", "ssd_kv_bytes": "8MiB",
              "ssd_dir": str(tmp_path)}
    got, stats = _generate(six_layers, ids, mask, 5, config)
    assert torch.equal(got, expected)
    assert stats.bytes_from_ssd > 0


def test_a_full_disk_mid_generation_ends_with_a_clear_error_and_leaves_nothing(six_layers, tmp_path, monkeypatch):
    class FullDisk(NvmeStore):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs, fault=Fault("write", nth=5, errno=errno.ENOSPC, every=True))

    monkeypatch.setattr(cache_module, "NvmeStore", FullDisk)
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(14))
    with pytest.raises(StorageIOError, match="full"):
        _generate(six_layers, ids, torch.ones_like(ids), 4, {**SSD_CONFIG, "ssd_dir": str(tmp_path)})
    assert os.listdir(tmp_path) == []


def test_host_budget_beyond_the_kv_without_ssd_dir_names_the_keys(six_layers):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(15))
    with pytest.raises(hetero.ConfigError, match="cpu_kv_bytes: .* set ssd_dir and ssd_kv_bytes"):
        _generate(six_layers, ids, torch.ones_like(ids), 4, SSD_CONFIG | {"ssd_kv_bytes": 0})


def test_too_small_an_ssd_budget_names_ssd_kv_bytes(six_layers, tmp_path):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(16))
    with pytest.raises(hetero.ConfigError, match="ssd_kv_bytes: the KV beyond the host budget needs"):
        _generate(six_layers, ids, torch.ones_like(ids), 4, {**SSD_CONFIG, "ssd_dir": str(tmp_path), "ssd_kv_bytes": "16KiB"})


SPECULATIVE_SSD = {**SSD_CONFIG, "mode": "speculative", "ssd_rebalance_steps": 2, "min_partial_columns": 0}


@pytest.mark.parametrize("padded", [False, True])
def test_speculation_over_the_ssd_equals_speculation_in_host_memory(six_layers, tmp_path, padded):
    """ssd_miss "wait" reads every SSD block a selection holds before gathering it: the tokens are
    those of the same speculation with the whole KV in host memory, while the placement moves
    blocks between the tiers every two steps."""
    if padded:
        ids, mask = left_padded([260, 141], seed=16)
    else:
        ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(14))
        mask = torch.ones_like(ids)
    in_host = {k: v for k, v in SPECULATIVE_SSD.items() if k not in ("cpu_kv_bytes", "ssd_kv_bytes")}
    if padded:
        in_host["gpu_kv_bytes"] = "512KiB"
    expected, _ = _generate(six_layers, ids, mask, 10, in_host)
    config = {**SPECULATIVE_SSD, "ssd_dir": str(tmp_path)}
    if padded:
        config.update(gpu_kv_bytes="512KiB", cpu_kv_bytes="800KiB", ssd_kv_bytes="8MiB")
    got, stats = _generate(six_layers, ids, mask, 10, config)
    assert torch.equal(got, expected)
    assert stats.ssd_swaps > 0 and stats.bytes_from_ssd > 0 and stats.ssd_skipped_share is None


def test_skipping_reads_only_the_ssd_blocks_selected_the_step_before(six_layers, tmp_path):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(15))
    mask = torch.ones_like(ids)
    _, waiting = _generate(six_layers, ids, mask, 8, {**SPECULATIVE_SSD, "ssd_dir": str(tmp_path)})
    _, skipping = _generate(six_layers, ids, mask, 8, {**SPECULATIVE_SSD, "ssd_dir": str(tmp_path), "ssd_miss": "skip"})
    assert 0 < skipping.ssd_skipped_share <= 1
    assert skipping.bytes_from_ssd < waiting.bytes_from_ssd
    assert "SSD blocks left out" in skipping.summary()


def test_skipping_with_every_block_in_host_memory_skips_nothing(six_layers, tmp_path):
    """An SSD tier the KV never reaches: "skip" has nothing to leave out and gives the tokens of "wait"."""
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(18))
    mask = torch.ones_like(ids)
    roomy = {**SPECULATIVE_SSD, "cpu_kv_bytes": "4MiB", "ssd_dir": str(tmp_path)}
    waiting, _ = _generate(six_layers, ids, mask, 4, roomy)
    skipping, stats = _generate(six_layers, ids, mask, 4, {**roomy, "ssd_miss": "skip"})
    assert torch.equal(skipping, waiting)
    assert stats.bytes_from_ssd == 0 and stats.ssd_skipped_share is None


def test_skipping_beside_a_cpu_that_attends_over_every_token_is_refused(six_layers, tmp_path):
    with pytest.raises(hetero.ConfigError, match='ssd_miss: "skip" leaves tokens out.*cpu_remainder'):
        hetero.load(six_layers, {**SPECULATIVE_SSD, "ssd_dir": str(tmp_path), "ssd_miss": "skip",
                                 "cpu_remainder": "all"}, device="cpu")


def _home_with_every_block_written(tmp_path, layers, blocks, **kwargs):
    """A HostHome over a CPU pool and a store of 3 SSD blocks per layer, each block (l, b) filled with
    100 l + b and written; returns it with its pool and pipeline."""
    from types import SimpleNamespace

    from hetero.host_home import HostHome
    from hetero.pipeline import Fence, Pipeline

    shape = (2, 1, 1, 4, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tmpfs takes no O_DIRECT
        store = NvmeStore(tmp_path, layers * 3, shape, torch.float32, io_threads=2)
    pool = SimpleNamespace(slab=torch.zeros(HostHome.slots_needed(layers, blocks, 3), *shape))
    pipeline = Pipeline(torch.device("cpu"))
    home = HostHome(pool, layers, blocks, sink_blocks=1, ssd_blocks=3, store=store, pipeline=pipeline, **kwargs)
    for layer in range(layers):
        for block in range(blocks):
            home.write_target(layer, block).fill_(100 * layer + block)
            home.written(layer, block, Fence(None))
    return home, pool, pipeline


def _assert_layer_reads_back(home, pool, layer):
    """Stage the layer's SSD blocks; every block's slot then holds what was written to it."""
    home.wait_staged(layer)
    for block in range(home.blocks_per_layer):
        assert bool((pool.slab[int(home.tables[layer][block])] == 100 * layer + block).all()), block


def test_the_placement_brings_the_most_selected_ssd_block_into_host_memory(tmp_path):
    from hetero.ssd_placement import SsdPlacement

    layers, blocks = 3, 8
    home, pool, pipeline = _home_with_every_block_written(tmp_path, layers, blocks)
    placement = SsdPlacement(layers, blocks, 4, torch.device("cpu"), rebalance_steps=1)
    placement.hits[1, 2] = 50  # block 2 sits on the SSD (blocks 1-3 do), selected far more than any other
    placement.hits[1, 5:8] = 1
    assert placement.step_boundary(home, pipeline, movable_end=blocks)
    assert not home.on_ssd(1, 2) and home.on_ssd(1, 4)  # traded for the least selected host block
    assert [home.on_ssd(2, b) for b in range(blocks)] == [home.on_ssd(0, b) for b in range(blocks)]  # nothing selected
    assert placement.swaps == 1 and placement.hits[1, 2] == 25  # halved: recent selections weigh more
    _assert_layer_reads_back(home, pool, 1)
    home.close()
    pipeline.close()


def test_an_ssd_run_placed_anywhere_in_the_middle_reads_back_what_was_written(tmp_path):
    from hetero.host_home import HostHome

    layers, blocks = 2, 9
    home, pool, pipeline = _home_with_every_block_written(tmp_path, layers, blocks, ssd_first=5)
    assert [home.on_ssd(0, b) for b in range(blocks)] == [False] * 5 + [True] * 3 + [False]
    host_slots = [int(home.tables[1][b]) for b in range(blocks) if not home.on_ssd(1, b)]
    assert len(set(host_slots)) == len(host_slots)  # every host block has a slot of its own
    _assert_layer_reads_back(home, pool, 1)
    with pytest.raises(ValueError, match="ssd_first"):
        HostHome(pool, layers, blocks, sink_blocks=1, ssd_blocks=3, store=home.store, ssd_first=7)
    home.close()
    pipeline.close()


def _prefill_ssd_traffic(model_dir, ids, ssd_dir):
    """Prefill `ids` in the config's chunks, as generate does; the blocks of layer 0 on the SSD, the end
    of the blocks that leave the GPU, and the bytes written to and read from the SSD."""
    model = hetero.load(model_dir, {**SSD_CONFIG, "mode": "stream", "ssd_dir": str(ssd_dir)}, device="cpu")
    cache = model.hetero.new_cache(ids.shape[1] + 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tmpfs takes no O_DIRECT
        with torch.no_grad():
            chunk = SSD_CONFIG["prefill_chunk_tokens"]
            for start in range(0, ids.shape[1], chunk):
                model(ids[:, start : start + chunk], past_key_values=cache, use_cache=True)
    home = cache._home
    on_ssd = [b for b in range(cache.blocks_per_layer) if home.on_ssd(0, b)]
    middle_end = cache.blocks_per_layer - cache.policy.window_blocks - 1  # the last window and the open block stay
    cache.close()
    return on_ssd, middle_end, home.bytes_to_ssd, home.bytes_from_ssd


def test_the_ssd_holds_the_latest_blocks_to_leave_the_gpu_so_prefill_reads_little_back(six_layers, tmp_path, monkeypatch):
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(14))
    on_ssd, middle_end, written, read = _prefill_ssd_traffic(six_layers, ids, tmp_path / "late")
    assert on_ssd == list(range(middle_end - len(on_ssd), middle_end)) and written > 0
    # The same prefill with the run right after the sink: every later chunk reads all of it back.
    from hetero.host_home import HostHome

    init = HostHome.__init__
    monkeypatch.setattr(HostHome, "__init__", lambda self, *a, ssd_first=None, **k: init(self, *a, **k))
    early, _, written_early, read_early = _prefill_ssd_traffic(six_layers, ids, tmp_path / "early")
    assert early[0] == 1 and written_early == written
    assert 0 < 2 * read < read_early


@pytest.mark.gpu
@pytest.mark.parametrize("miss", ["wait", "skip"])
def test_speculation_over_the_ssd_on_the_gpu(six_layers, tmp_path, miss):
    """On CUDA, in bf16: "wait" gives the tokens of the KV in host memory while blocks move between
    the tiers (the gather reads pinned staging slots and the re-uploaded slot tables); "skip" runs."""
    ids = torch.randint(1, 256, (1, 300), generator=torch.Generator().manual_seed(17)).cuda()
    mask = torch.ones_like(ids)

    def run(config):
        model = hetero.load(six_layers, config, dtype=torch.bfloat16, device="cuda")
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            out = model.generate(ids, attention_mask=mask, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                                 pad_token_id=0)
        return out, model.hetero.last_stats

    # bf16 halves the KV: halve the budgets too, so that the same share of it lies on the SSD.
    halved = {**SPECULATIVE_SSD, "gpu_kv_bytes": "128KiB", "cpu_kv_bytes": "208KiB", "ssd_kv_bytes": "2MiB"}
    in_host = {k: v for k, v in halved.items() if k not in ("cpu_kv_bytes", "ssd_kv_bytes")}
    expected, _ = run(in_host)
    got, stats = run({**halved, "ssd_dir": str(tmp_path), "ssd_miss": miss})
    assert stats.bytes_from_ssd > 0
    if miss == "wait":
        assert torch.equal(got, expected) and stats.ssd_swaps > 0
    else:
        assert 0 < stats.ssd_skipped_share <= 1
