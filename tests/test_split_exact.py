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


@pytest.mark.parametrize("look_past_step_end", [True, False])
def test_a_steps_last_layer_plans_the_next_steps_first_layers_into_the_whole_ring(model_dir, monkeypatch,
                                                                                  look_past_step_end):
    """The host thread waits at each step's end: the fetches it queued before then keep the copy
    engine busy meanwhile. Exact either way."""
    import hetero.cache as cache_module

    monkeypatch.setattr(cache_module, "LOOK_PAST_STEP_END", look_past_step_end)
    planned_at_step_end = []
    prefetch_after = cache_module.HeteroCache._prefetch_after

    def recording(self, layer_idx, decode):
        prefetch_after(self, layer_idx, decode)
        if decode and layer_idx == len(self._layers) - 1:
            planned_at_step_end.append((sorted(self._plans), self._ring.buffers))

    monkeypatch.setattr(cache_module.HeteroCache, "_prefetch_after", recording)
    ids, mask = left_padded([211, 97, 150], seed=5)
    expected = _reference(model_dir, ids, mask, 6)
    config = {**SMALL, "gpu_kv_bytes": "384KiB", "mode": "split", "split_ratio": 0.5}
    got, _ = _hetero(model_dir, ids, mask, 6, config)
    assert torch.equal(got, expected)
    assert len(planned_at_step_end) == 5  # six new tokens: the prefill's, then five decode steps
    for plans, buffers in planned_at_step_end:
        assert plans == (list(range(min(3, buffers))) if look_past_step_end else [0])


def test_split_is_exact_with_the_gil_knobs_on(model_dir, monkeypatch):
    """The host worker's wait for each query without the GIL (HOST_WAIT_SPINS; numbered fences exist
    on CUDA only), a short switch interval while it works, and CPU parts that post their results
    themselves (mailboxes, CUDA only) change when things run, not what."""
    import sys

    from hetero import cache as cache_module
    from hetero import pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "HOST_WAIT_SPINS", 40_000)
    monkeypatch.setattr(pipeline_module, "HOST_JOB_SWITCH_INTERVAL_S", 1e-4)
    monkeypatch.setattr(cache_module, "CPU_PART_POSTS_ITSELF", True)  # mailboxes exist on CUDA only
    found = sys.getswitchinterval()
    ids, mask = left_padded([211, 97, 150], seed=5)
    expected = _reference(model_dir, ids, mask, 10)
    config = {**SMALL, "gpu_kv_bytes": "384KiB", "mode": "split", "split_ratio": 0.5}
    got, model = _hetero(model_dir, ids, mask, 10, config)
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.bytes_read_by_cpu > 0
    assert sys.getswitchinterval() == found, "put back when the generation's pipeline closed"


def test_only_the_generations_first_cpu_part_comes_back_through_the_host_thread(model_dir, monkeypatch):
    """cpu_part_wait "gpu": the first CPU part's layer launches a decode layer's kernels for the first
    time, so its result comes back through the host thread; every later part's through the GPU's wait."""
    import hetero.cache as cache_module

    ways = []
    returns_on_gpu = cache_module.HeteroCache._returns_on_gpu

    def noted(self, query):
        shapes = returns_on_gpu(self, query)
        ways.append("gpu" if shapes is not None else "host")
        return shapes

    monkeypatch.setattr(cache_module.HeteroCache, "_returns_on_gpu", noted)
    ids, mask = left_padded([211, 97, 150], seed=5)
    expected = _reference(model_dir, ids, mask, 4)
    config = {**SMALL, "gpu_kv_bytes": "384KiB", "mode": "split", "split_ratio": 0.5}
    for _ in range(2):  # each generation's cache starts again
        ways.clear()
        got, model = _hetero(model_dir, ids, mask, 4, config)
        assert torch.equal(got, expected)
        if model.hetero.last_stats.split_share == 1.0:
            pytest.skip("a sliding-window model streams")
        assert ways[0] == "host" and len(ways) > 1 and set(ways[1:]) == {"gpu"}
