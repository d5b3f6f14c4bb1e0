"""The planner: bytes per token by hand, the tier split, predicted times, and errors naming the key."""

import pytest
from transformers import LlamaConfig, Qwen3Config

from hetero.config import Budgets, MachineMemory, OffloadConfig, resolve_budgets
from hetero.errors import ConfigError
from hetero.plan import Ceilings, KVGeometry, estimate_weight_bytes, make_plan, size_gpu_tier

GiB = 2**30


def llama8b(**overrides):
    values = dict(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                  intermediate_size=14336, vocab_size=128256, dtype="bfloat16")
    return LlamaConfig(**(values | overrides))


def small_llama():
    return LlamaConfig(hidden_size=256, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=3,
                       intermediate_size=512, vocab_size=1000, dtype="float32")


def test_bytes_per_token_by_hand():
    geo = KVGeometry.from_model_config(small_llama())
    # head_dim 256 / 8 = 32; K and V; 2 KV heads; float32
    assert (geo.num_layers, geo.kv_heads, geo.head_dim, geo.dtype_bytes) == (3, 2, 32, 4)
    assert geo.bytes_per_token_layer == 2 * 2 * 32 * 4 == 512
    assert geo.bytes_per_token == 3 * 512
    assert KVGeometry.from_model_config(small_llama(), kv_dtype="bfloat16").bytes_per_token == 3 * 256
    assert KVGeometry.from_model_config(llama8b()).bytes_per_token == 32 * 2 * 8 * 128 * 2  # 128 KiB


def test_geometry_fallbacks_and_explicit_head_dim():
    no_kv_heads = LlamaConfig(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, dtype="float16")
    del no_kv_heads.num_key_value_heads
    geo = KVGeometry.from_model_config(no_kv_heads)
    assert (geo.kv_heads, geo.head_dim, geo.dtype_bytes) == (4, 16, 2)
    qwen = Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_hidden_layers=2)
    assert KVGeometry.from_model_config(qwen, kv_dtype="float32").head_dim == 32


def test_tier_split_without_ssd():
    geo = KVGeometry.from_model_config(llama8b())
    plan = make_plan(geo, 131072, 4, OffloadConfig(grow_window=False), Budgets(8 * GiB, 100 * GiB, 0))
    assert plan.bytes_per_token == 4 * 128 * 2**10
    assert plan.total_bytes == 64 * GiB
    assert plan.host_bytes == plan.total_bytes and plan.ssd_bytes == 0
    block = 4 * 256 * 128 * 2**10 // 32  # one layer's 256-token block for the batch: 4 MiB
    # sink 1 block + 2 x window 4 blocks + 2 per layer, and two ring buffers of up to a layer each
    assert plan.gpu.resident_blocks == 32 * (1 + 8 + 2)
    assert plan.gpu.ring_buffers == 2
    assert plan.gpu.blocks_per_buffer == 512 and plan.gpu_bytes == (32 * 11 + 2 * 512) * block
    assert plan.gpu_bytes <= 8 * GiB
    assert plan.offloaded_bytes == 32 * (512 - 1 - 4) * block
    assert "ms/step" in plan.format() and "host" in plan.format()


@pytest.mark.parametrize("mode", ["stream", "split"])
def test_the_window_grows_into_what_the_fetch_buffers_leave(mode):
    """8 GiB at 128K x 4 (4 MiB blocks): the window grows from 4 blocks while the resident blocks
    (sink, window, the block being filled, and a prefill chunk's 16 blocks beside the window it
    pushes out) and two buffers of a layer's middle fit; each wider block saves a block of each
    buffer, and costs one per layer."""
    geo = KVGeometry.from_model_config(llama8b())
    plan = make_plan(geo, 131072, 4, OffloadConfig(mode=mode), Budgets(8 * GiB, 100 * GiB, 0))
    block = 4 * 2**20
    window = plan.gpu.window_blocks
    assert window == 15  # 32 x (1 + 16 + 16) + 2 x (512 - 1 - 15 - 1) = 2,046 of 2,048 blocks
    assert plan.gpu.resident_blocks == 32 * (1 + 16 + 16) and plan.gpu.blocks_per_buffer == 512 - 1 - 15 - 1
    assert plan.gpu_bytes <= 8 * GiB < plan.gpu_bytes + 32 * block
    assert plan.offloaded_bytes == 32 * (512 - 1 - 15) * block
    speculative = make_plan(geo, 131072, 4, OffloadConfig(mode="speculative"), Budgets(8 * GiB, 100 * GiB, 0))
    assert speculative.gpu.window_blocks == 4  # its selection is defined beside the configured window
    ssd = OffloadConfig(mode=mode, ssd_dir="/tmp/kv", ssd_kv_bytes="8GiB")
    assert make_plan(geo, 131072, 4, ssd, Budgets(8 * GiB, 100 * GiB, 8 * GiB)).gpu.window_blocks == 4


def test_the_window_grows_no_further_than_every_block_that_would_leave():
    geo = KVGeometry.from_model_config(llama8b())
    block = 2 * 8 * 128 * 2 * 256  # one layer's 256-token block: 1 MiB
    cfg = OffloadConfig(prefill_chunk_tokens=256)
    # 513 resident blocks a layer (sink, a 510-block window, the block being filled, one chunk's), two 1-block buffers
    plan = make_plan(geo, 131072, 1, cfg, Budgets((32 * 513 + 2) * block, 100 * GiB, 0))
    assert (plan.gpu.window_blocks, plan.gpu.blocks_per_buffer) == (510, 1)
    assert make_plan(geo, 131072, 1, cfg, Budgets((32 * 513 + 1) * block, 100 * GiB, 0)).gpu.window_blocks == 509


def test_tier_split_with_ssd_takes_what_the_host_cannot():
    geo = KVGeometry.from_model_config(llama8b())
    cfg = OffloadConfig(ssd_dir="/tmp/kv", ssd_kv_bytes="64GiB")
    plan = make_plan(geo, 131072, 4, cfg, Budgets(8 * GiB, 40 * GiB + 123, 64 * GiB))
    assert plan.host_bytes == 40 * GiB and plan.ssd_bytes == 24 * GiB
    assert plan.step_seconds["stream"] == pytest.approx(24 * GiB / Ceilings().disk_read)
    assert "SSD" in plan.format()


def test_predicted_times_follow_the_ceilings():
    geo = KVGeometry.from_model_config(llama8b())
    plan = make_plan(geo, 131072, 4, OffloadConfig(), Budgets(8 * GiB, 100 * GiB, 0))
    c = Ceilings()
    steps = plan.step_seconds
    assert steps["stream"] == pytest.approx(plan.offloaded_bytes / c.pcie_h2d)
    assert steps["split"] == pytest.approx(plan.offloaded_bytes / (c.pcie_h2d + c.cpu_stream))
    assert steps["speculative"] == pytest.approx(0.1 * plan.offloaded_bytes / c.uva_gather)
    assert steps["speculative"] < steps["split"] < steps["stream"]
    assert "all-on-GPU" not in steps
    fixed = make_plan(geo, 131072, 4, OffloadConfig(mode="split", split_ratio=1.0), Budgets(8 * GiB, 100 * GiB, 0))
    assert fixed.step_seconds["split"] == pytest.approx(steps["stream"])


def test_predicted_times_grow_with_context_and_batch():
    geo = KVGeometry.from_model_config(llama8b())
    budgets = Budgets(70 * GiB, 1000 * GiB, 0)
    for mode in ("stream", "split", "speculative", "all-on-GPU"):
        by_context = [make_plan(geo, n, 1, OffloadConfig(), budgets).step_seconds[mode] for n in (8192, 32768, 131072)]
        assert by_context == sorted(by_context) and by_context[0] < by_context[-1]
        by_batch = [make_plan(geo, 32768, b, OffloadConfig(), budgets).step_seconds[mode] for b in (1, 2, 4)]
        assert by_batch == sorted(by_batch) and by_batch[0] < by_batch[-1]


def test_all_on_gpu_when_it_fits():
    geo = KVGeometry.from_model_config(llama8b())
    plan = make_plan(geo, 32768, 1, OffloadConfig(), Budgets(8 * GiB, 100 * GiB, 0))
    assert plan.step_seconds["all-on-GPU"] == pytest.approx(4 * GiB / Ceilings().hbm)
    assert plan.step_seconds["all-on-GPU"] == plan.step_seconds["stream"]  # its window grew to hold it all
    fixed = make_plan(geo, 32768, 1, OffloadConfig(grow_window=False), Budgets(8 * GiB, 100 * GiB, 0))
    assert fixed.step_seconds["all-on-GPU"] < fixed.step_seconds["stream"]
    short = make_plan(geo, 100, 1, OffloadConfig(), Budgets(8 * GiB, 100 * GiB, 0))
    assert short.offloaded_bytes == 0 and all(s > 0 for s in short.step_seconds.values())


def test_too_big_for_the_tiers_names_the_key():
    geo = KVGeometry.from_model_config(llama8b())
    with pytest.raises(ConfigError) as err:
        make_plan(geo, 131072, 4, OffloadConfig(), Budgets(8 * GiB, 16 * GiB, 0))
    assert err.value.key == "cpu_kv_bytes"
    assert "needs 64.00 GiB" in str(err.value) and "raise cpu_kv_bytes by 48.00 GiB" in str(err.value)
    ssd = OffloadConfig(ssd_dir="/tmp/kv", ssd_kv_bytes="8GiB")
    with pytest.raises(ConfigError) as err:
        make_plan(geo, 131072, 4, ssd, Budgets(8 * GiB, 16 * GiB, 8 * GiB))
    assert err.value.key == "ssd_kv_bytes" and "by 40.00 GiB" in str(err.value)
    with pytest.raises(ConfigError) as err:
        make_plan(geo, 131072, 4, OffloadConfig(), Budgets(GiB, 100 * GiB, 0))
    assert err.value.key == "gpu_kv_bytes" and "lower window_tokens" in str(err.value)


def test_gpu_tier_caps_buffers_at_one_layer_and_fills_the_budget():
    cfg = OffloadConfig(block_size=16, sink_tokens=16, window_tokens=32, prefetch_layers=2, grow_window=False)
    tier = size_gpu_tier(cfg, num_layers=2, blocks_per_layer=10, block_bytes=100, gpu_budget=10**6)
    assert (tier.resident_blocks, tier.ring_buffers, tier.blocks_per_buffer) == (2 * (1 + 4 + 2), 4, 10)
    tier = size_gpu_tier(cfg, num_layers=2, blocks_per_layer=10, block_bytes=100, gpu_budget=14 * 100 + 4 * 300 + 99)
    assert tier.blocks_per_buffer == 3 and tier.bytes <= 14 * 100 + 4 * 300 + 99


def test_weight_estimate_and_auto_budgets_for_plan():
    weights = estimate_weight_bytes(llama8b())
    assert 15.5e9 < weights < 16.5e9  # Llama 3 8B: 8.03e9 parameters in bf16
    machine = MachineMemory(gpu_free_bytes=80 * GiB, host_available_bytes=100 * GiB).after_loading(weights)
    assert resolve_budgets(OffloadConfig(), machine).gpu_kv_bytes == (80 * GiB - weights) // 2


def test_bad_arguments():
    geo = KVGeometry.from_model_config(small_llama())
    budgets = Budgets(GiB, GiB, 0)
    with pytest.raises(ConfigError, match="context: got 0 tokens"):
        make_plan(geo, 0, 1, OffloadConfig(), budgets)
    with pytest.raises(ConfigError, match="speculative_share: got 2"):
        make_plan(geo, 10, 1, OffloadConfig(), budgets, speculative_share=2)
