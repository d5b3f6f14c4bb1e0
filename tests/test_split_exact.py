"""The `split` mode (CPU attention over part of the offloaded KV) is exact too."""

import pytest
import torch

from test_stream_exact import SMALL, _hetero, _reference, model_dir  # noqa: F401  (fixture)


@pytest.mark.parametrize("ratio", [0.0, 0.5, "auto"])
def test_split_matches_transformers_with_left_padding(model_dir, ratio):
    g = torch.Generator().manual_seed(3)
    lengths = [211, 97, 150]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n :] = torch.randint(1, 256, (n,), generator=g)
        mask[row, width - n :] = 1
    expected = _reference(model_dir, ids, mask, 10)
    config = {**SMALL, "gpu_kv_bytes": "384KiB", "mode": "split", "split_ratio": ratio}
    got, model = _hetero(model_dir, ids, mask, 10, config)
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.bytes_read_by_cpu > 0, "the CPU must have attended over part of the KV"
