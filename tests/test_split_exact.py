"""The `split` mode (CPU attention over part of the offloaded KV) is exact too."""

import pytest
import torch

from batches import left_padded
from test_stream_exact import SMALL, _hetero, _reference, model_dir  # noqa: F401  (fixture)


@pytest.mark.parametrize("ratio", [0.0, 0.5, "auto"])
def test_split_matches_transformers_with_left_padding(model_dir, ratio):
    ids, mask = left_padded([211, 97, 150], seed=3)
    expected = _reference(model_dir, ids, mask, 10)
    config = {**SMALL, "gpu_kv_bytes": "384KiB", "mode": "split", "split_ratio": ratio}
    got, model = _hetero(model_dir, ids, mask, 10, config)
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.bytes_read_by_cpu > 0, "the CPU must have attended over part of the KV"


def test_split_with_a_deeper_prefetch_matches_transformers(model_dir):
    """Two layers planned ahead: the next step's first two layers are planned, and the share
    refined, before that step's tokens are stored."""
    ids, mask = left_padded([211, 97, 150], seed=4)
    expected = _reference(model_dir, ids, mask, 10)
    config = {**SMALL, "gpu_kv_bytes": "512KiB", "mode": "split", "split_ratio": "auto", "prefetch_layers": 2}
    got, model = _hetero(model_dir, ids, mask, 10, config)
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.bytes_read_by_cpu > 0, "the CPU must have attended over part of the KV"
