"""The planner: bytes per token by hand, the tier split, and predicted times."""

import pytest
from transformers import LlamaConfig

from hetero import ConfigError, OffloadConfig
from hetero.config import Budgets
from hetero.plan import KVGeometry, make_plan


def llama8b():
    return LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8, num_hidden_layers=32,
                       dtype="bfloat16")


def test_bytes_per_token_of_an_8b_llama():
    geo = KVGeometry.from_model_config(llama8b())
    assert geo.bytes_per_token == 32 * 2 * 8 * 128 * 2  # 128 KiB


def test_tiers_and_predictions():
    geo = KVGeometry.from_model_config(llama8b())
    plan = make_plan(geo, 131072, 4, OffloadConfig(), Budgets(8 * 2**30, 100 * 2**30, 0))
    assert plan.total_bytes == 64 * 2**30
    assert plan.host_bytes == plan.total_bytes and plan.ssd_bytes == 0
    assert plan.step_seconds["split"] < plan.step_seconds["stream"]
    assert plan.step_seconds["speculative"] < plan.step_seconds["split"]
    assert "all-on-GPU" not in plan.step_seconds
    assert "ms/step" in plan.format()


def test_too_big_for_the_tiers_names_the_key():
    geo = KVGeometry.from_model_config(llama8b())
    with pytest.raises(ConfigError) as err:
        make_plan(geo, 131072, 4, OffloadConfig(), Budgets(8 * 2**30, 16 * 2**30, 0))
    assert err.value.key == "cpu_kv_bytes"
