"""OffloadConfig: defaults, files, and an error naming the key for every kind of bad input."""

from pathlib import Path

import pytest

from hetero import ConfigError, OffloadConfig
from hetero.config import MachineMemory, parse_size, resolve_budgets

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def test_defaults_and_round_trip():
    cfg = OffloadConfig()
    assert cfg.mode == "stream" and cfg.block_size == 256
    assert OffloadConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("name", ["offload-24gb.toml", "offload-80gb-multi.toml", "offload-cpu-small.yaml"])
def test_example_files_load(name):
    assert isinstance(OffloadConfig.load(EXAMPLES / name), OffloadConfig)


@pytest.mark.parametrize("text,expected", [
    (4096, 4096), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1e9", 10**9), ("12gib", 12 * 2**30),
])
def test_sizes(text, expected):
    assert parse_size(text, "k") == expected


@pytest.mark.parametrize("values,key,fragment", [
    ({"windw_tokens": 3}, "windw_tokens", "window_tokens"),
    ({"block_size": "big"}, "block_size", "integer"),
    ({"block_size": True}, "block_size", "integer"),
    ({"block_size": 100}, "block_size", "power of two"),
    ({"cpu_kv_bytes": "-3GiB"}, "cpu_kv_bytes", ">= 0"),
    ({"gpu_kv_bytes": "lots"}, "gpu_kv_bytes", "size"),
    ({"mode": "fast"}, "mode", "stream"),
    ({"mode": "speculative"}, "mode", "not available yet"),
    ({"kv_dtype": "int8"}, "kv_dtype", "bfloat16"),
    ({"ssd_kv_bytes": "1GiB"}, "ssd_kv_bytes", "ssd_dir"),
    ({"split_ratio": 2}, "split_ratio", "[0, 1]"),
    ({"prefetch_layers": 0}, "prefetch_layers", ">= 1"),
])
def test_bad_values_name_their_key(values, key, fragment):
    with pytest.raises(ConfigError) as err:
        OffloadConfig.from_dict(values)
    assert err.value.key == key
    assert str(err.value).startswith(key) and fragment in str(err.value)


def test_budgets_resolve_against_the_machine():
    machine = MachineMemory(gpu_free_bytes=10 * 2**30, host_available_bytes=100 * 2**30)
    b = resolve_budgets(OffloadConfig(gpu_kv_bytes="50%", cpu_kv_bytes="auto"), machine)
    assert b.gpu_kv_bytes == 5 * 2**30 and b.cpu_kv_bytes == 80 * 2**30
    with pytest.raises(ConfigError) as err:
        resolve_budgets(OffloadConfig(cpu_kv_bytes="1000TiB"), machine)
    assert err.value.key == "cpu_kv_bytes" and "free" in str(err.value)


def test_files(tmp_path):
    (tmp_path / "c.toml").write_text('block_size = 64\nmode = "split"\n')
    assert OffloadConfig.load(tmp_path / "c.toml").block_size == 64
    (tmp_path / "c.yml").write_text("window_tokens: 128\n")
    assert OffloadConfig.load(tmp_path / "c.yml").window_tokens == 128
    (tmp_path / "c.json").write_text("{}")
    for path, fragment in [(tmp_path / "c.json", ".toml"), (tmp_path / "none.toml", "does not exist")]:
        with pytest.raises(ConfigError) as err:
            OffloadConfig.load(path)
        assert fragment in str(err.value)
    (tmp_path / "bad.toml").write_text("block_size = = 3")
    with pytest.raises(ConfigError, match="not valid TOML"):
        OffloadConfig.load(tmp_path / "bad.toml")
