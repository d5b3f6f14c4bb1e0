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


def test_the_window_grows_no_further_than_every_block_that_would_leave():
    geo = KVGeometry.from_model_config(llama8b())
    block = 2 * 8 * 128 * 2 * 256  # one layer's 256-token block: 1 MiB
    cfg = OffloadConfig(prefill_chunk_tokens=256)
    # 513 resident blocks a layer (sink, a 510-block window, the block being filled, one chunk's) and two 1-block buffers
    plan = make_plan(geo, 131072, 1, cfg, Budgets((32 * 513 + 2) * block, 100 * GiB, 0))
    assert (plan.gpu.window_blocks, plan.gpu.blocks_per_buffer) == (510, 1)
    assert make_plan(geo, 131072, 1, cfg, Budgets((32 * 513 + 1) * block, 100 * GiB, 0)).gpu.window_blocks == 509
