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
