"""The `stream` mode generates exactly what transformers generates with its default cache."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hetero
from hetero.demo import save_random_model

from batches import left_padded

SMALL = {
    "mode": "stream",
    "block_size": 16,
    "sink_tokens": 16,
    "window_tokens": 32,
    "gpu_kv_bytes": "256KiB",
    "cpu_kv_bytes": "64MiB",
    "prefill_chunk_tokens": 96,
}


@pytest.fixture(scope="module", params=["llama", "mistral", "qwen2"])
def model_dir(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    return save_random_model(path, request.param, seed=1, layers=3, hidden=64, heads=4, kv_heads=2, vocab=256)


def _reference(model_dir, ids, mask, new_tokens):
    ref = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        return ref.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                            min_new_tokens=new_tokens, pad_token_id=0)


def _hetero(model_dir, ids, mask, new_tokens, config=SMALL):
    model = hetero.load(model_dir, config, device="cpu")
    with torch.no_grad():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                             min_new_tokens=new_tokens, pad_token_id=0)
    return out, model


def test_batch_of_one_matches_transformers(model_dir):
    ids = torch.randint(1, 256, (1, 301), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    expected = _reference(model_dir, ids, mask, 12)
    got, model = _hetero(model_dir, ids, mask, 12)
    assert torch.equal(got, expected)
    stats = model.hetero.last_stats
    assert stats.bytes_to_gpu > 0, "the middle of the KV must have been streamed from host memory"
    assert stats.new_tokens == 12


@pytest.mark.parametrize("mode,chunk", [("stream", 96), ("split", 96), ("stream", 32)])
def test_a_grown_window_moves_less_and_generates_the_same(model_dir, mode, chunk):
    """What two fetch buffers of a whole layer leave of the GPU budget holds more of the window: the
    same tokens come out, fewer bytes cross to the GPU or reach the CPU, and the budget holds. With
    prefill chunks of 2 blocks the window outgrows a chunk, which then reserves only its own blocks."""
    ids = torch.randint(1, 256, (1, 301), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    config = {**SMALL, "mode": mode, "prefill_chunk_tokens": chunk}
    fixed, fixed_model = _hetero(model_dir, ids, mask, 12, {**config, "grow_window": False})
    grown, grown_model = _hetero(model_dir, ids, mask, 12, config)
    assert torch.equal(grown, fixed)
    before, after = fixed_model.hetero.last_stats, grown_model.hetero.last_stats
    moved = lambda s: s.bytes_to_gpu + s.bytes_read_by_cpu  # noqa: E731
    assert 0 < moved(after) < moved(before)
    assert after.gpu_kv_bytes <= 256 * 1024  # the buffers gave up what the window took


def test_left_padded_batch_matches_transformers(model_dir):
    ids, mask = left_padded([211, 97, 150], seed=3)
    expected = _reference(model_dir, ids, mask, 10)
    got, model = _hetero(model_dir, ids, mask, 10, {**SMALL, "gpu_kv_bytes": "384KiB"})
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.bytes_to_gpu > 0, "the budget must force fetches"


def test_deeper_prefetch_and_unchunked_prefill_match(model_dir):
    ids = torch.randint(1, 256, (2, 180), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    expected = _reference(model_dir, ids, mask, 8)
    config = {**SMALL, "prefetch_layers": 2, "prefill_chunk_tokens": 4096, "gpu_kv_bytes": "256KiB"}
    got, model = _hetero(model_dir, ids, mask, 8, config)
    assert torch.equal(got, expected)
    assert model.hetero.last_stats.bytes_to_gpu > 0, "the budget must force fetches"


def test_gpu_tier_stays_within_its_budget_as_context_grows(tmp_path):
    path = save_random_model(tmp_path, "llama", seed=5, layers=2, hidden=64, heads=4, kv_heads=2, vocab=256)
    budget = 128 * 1024
    config = {**SMALL, "gpu_kv_bytes": budget}
    model = hetero.load(path, config, device="cpu")
    for prompt in (100, 400, 900):
        ids = torch.randint(1, 256, (1, prompt), generator=torch.Generator().manual_seed(prompt))
        with torch.no_grad():
            model.generate(ids, max_new_tokens=4, do_sample=False, min_new_tokens=4)
        stats = model.hetero.last_stats
        context_kv = 2 * 2 * 2 * 16 * (prompt + 4) * 4  # layers * K,V * kv_heads * head_dim * tokens * fp32
        assert stats.gpu_kv_bytes <= budget
        # The whole KV is at home on the GPU while it fits there, in host memory once it does not.
        assert stats.gpu_kv_bytes >= context_kv or stats.host_kv_bytes >= context_kv
    assert context_kv > budget, "the last context must outgrow the GPU budget"
    assert stats.host_kv_bytes >= context_kv and stats.bytes_to_gpu > 0


def test_a_cache_that_fits_the_gpu_budget_stays_there_and_moves_nothing(model_dir):
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    expected = _reference(model_dir, ids, mask, 6)
    got, model = _hetero(model_dir, ids, mask, 6, {**SMALL, "gpu_kv_bytes": "64MiB"})
    assert torch.equal(got, expected)
    stats = model.hetero.last_stats
    assert stats.host_kv_bytes == 0 and stats.bytes_to_gpu == 0 and stats.bytes_to_host == 0


def test_sampling_runs_and_stops_at_eos(model_dir):
    model = hetero.load(model_dir, SMALL, device="cpu")
    ids = torch.randint(1, 256, (1, 64), generator=torch.Generator().manual_seed(6))
    torch.manual_seed(0)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=20, do_sample=True, temperature=1.0, eos_token_id=[0, 1, 2, 3])
    new = out[0, 64:]
    assert 1 <= new.numel() <= 20
    if new.numel() < 20:
        assert int(new[-1]) in (0, 1, 2, 3)


def test_decode_through_the_triton_kernel_path_matches(model_dir, monkeypatch):
    """The CUDA decode path (resident blocks read in place, fetched buffers), run in Triton's interpreter."""
    from hetero import gpu_decode

    if "llama" not in str(model_dir):
        pytest.skip("the interpreter is slow; the kernel path does not depend on the architecture")
    monkeypatch.setattr(gpu_decode, "ON_CPU", True)
    ids = torch.randint(1, 256, (2, 150), generator=torch.Generator().manual_seed(9))
    mask = torch.ones_like(ids)
    expected = _reference(model_dir, ids, mask, 5)
    for budget in ("256KiB", "64MiB"):  # through the fetch ring; everything resident
        got, model = _hetero(model_dir, ids, mask, 5, {**SMALL, "gpu_kv_bytes": budget})
        assert torch.equal(got, expected), budget
