"""OffloadConfig: defaults, files, sizes, budgets, and an error naming the key for every kind of bad input."""

import pickle
from pathlib import Path

import pytest

from hetero.config import (
    IMPLEMENTED_MODES,
    Budgets,
    MachineMemory,
    OffloadConfig,
    describe_keys,
    parse_size,
    resolve_budgets,
)
from hetero.errors import ConfigError, ModelPathError

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
EXAMPLE_FILES = ["offload-24gb.toml", "offload-80gb-multi.toml", "offload-cpu-small.yaml"]
GiB = 2**30


def test_defaults():
    cfg = OffloadConfig()
    assert (cfg.mode, cfg.gpu_kv_bytes, cfg.cpu_kv_bytes) == ("stream", "auto", "auto")
    assert (cfg.ssd_dir, cfg.ssd_kv_bytes, cfg.split_ratio) == (None, 0, "auto")
    assert (cfg.block_size, cfg.sink_tokens, cfg.window_tokens, cfg.kv_dtype) == (256, 64, 1024, "auto")
    assert (cfg.cpu_threads, cfg.prefetch_layers, cfg.prefill_chunk_tokens, cfg.io_threads) == ("auto", 1, 4096, 8)
    assert OffloadConfig.coerce(None) == cfg and OffloadConfig.from_dict({}) == cfg


def test_round_trip_keeps_sizes_as_given():
    cfg = OffloadConfig(gpu_kv_bytes="50%", cpu_kv_bytes="12GiB", ssd_dir="/tmp/kv", ssd_kv_bytes=10**9)
    assert cfg.to_dict()["cpu_kv_bytes"] == "12GiB"
    assert OffloadConfig.from_dict(cfg.to_dict()) == cfg
    assert OffloadConfig.coerce(cfg) is cfg and OffloadConfig.coerce(cfg.to_dict()) == cfg


def test_describe_keys_covers_every_key():
    rows = describe_keys()
    assert [k for k, _, _ in rows] == list(OffloadConfig().to_dict())
    assert dict((k, d) for k, d, _ in rows) == OffloadConfig().to_dict()
    assert all(doc and "\n" not in doc for _, _, doc in rows)


@pytest.mark.parametrize("name", EXAMPLE_FILES)
def test_example_files_load_and_comment_every_key(name):
    cfg = OffloadConfig.load(EXAMPLES / name)
    assert isinstance(cfg, OffloadConfig)
    lines = (EXAMPLES / name).read_text().splitlines()
    for key in cfg.to_dict():
        line = next(line for line in lines if line.lstrip("# ").startswith(key))
        assert "#" in line.lstrip("# "), f"{name}: {key} has no comment"


def test_the_80gb_example_ssd_option_loads_when_uncommented(tmp_path):
    text = (EXAMPLES / "offload-80gb-multi.toml").read_text()
    uncommented = text.replace("# ssd_dir", "ssd_dir").replace("# ssd_kv_bytes", "ssd_kv_bytes")
    (tmp_path / "ssd.toml").write_text(uncommented)
    cfg = OffloadConfig.load(tmp_path / "ssd.toml")
    assert cfg.ssd_dir == "/nvme/hetero" and parse_size(cfg.ssd_kv_bytes, "ssd_kv_bytes") == 200 * GiB


def test_load_toml_yaml_and_coerce_a_path(tmp_path):
    (tmp_path / "c.toml").write_text('block_size = 64\nmode = "split"\ngpu_kv_bytes = "1.5GB"\n')
    cfg = OffloadConfig.load(tmp_path / "c.toml")
    assert (cfg.block_size, cfg.mode, cfg.gpu_kv_bytes) == (64, "split", "1.5GB")
    (tmp_path / "c.yml").write_text("window_tokens: 128\ncpu_kv_bytes: 50%\n")
    assert OffloadConfig.load(tmp_path / "c.yml").cpu_kv_bytes == "50%"
    (tmp_path / "c.YAML").write_text("sink_tokens: 0\n")
    assert OffloadConfig.coerce(str(tmp_path / "c.YAML")).sink_tokens == 0
    (tmp_path / "empty.yaml").write_text("# nothing set\n")
    assert OffloadConfig.coerce(tmp_path / "empty.yaml") == OffloadConfig()


@pytest.mark.parametrize("text,expected", [
    (4096, 4096), ("4096", 4096), ("512MiB", 512 * 2**20), ("1.5GB", 1_500_000_000), ("1e9", 10**9),
    ("12gib", 12 * GiB), ("2 KB", 2000), ("1KiB", 1024), ("3tb", 3 * 10**12), (" 7b ", 7), (2.0e9, 2 * 10**9),
    (0, 0),
])
def test_sizes(text, expected):
    assert parse_size(text, "k") == expected


@pytest.mark.parametrize("values,message", [
    # unknown key, with the closest valid key suggested; and with none close, the valid keys listed
    ({"windw_tokens": 3}, "windw_tokens: unknown key; did you mean 'window_tokens'?"),
    ({"zzz": 3}, "zzz: unknown key; expected one of mode, gpu_kv_bytes,"),
    # wrong type, and bools are not integers
    ({"block_size": "abc"}, "block_size: got 'abc' (str), expected an integer >= 16"),
    ({"block_size": True}, "block_size: got True (bool), expected an integer >= 16"),
    ({"io_threads": 2.0}, "io_threads: got 2.0 (float), expected an integer >= 1"),
    ({"cpu_threads": "many"}, "cpu_threads: got 'many' (str), expected \"auto\" or an integer >= 1"),
    ({"gpu_kv_bytes": False}, "gpu_kv_bytes: got False (bool), expected a size in bytes"),
    ({"gpu_kv_bytes": [1]}, "gpu_kv_bytes: got [1] (list), expected a size in bytes"),
    # negative and unparsable sizes
    ({"cpu_kv_bytes": "-3GiB"}, "cpu_kv_bytes: got '-3GiB', a negative size; expected a size >= 0"),
    ({"cpu_kv_bytes": -1}, "cpu_kv_bytes: got -1, a negative size"),
    ({"gpu_kv_bytes": "lots"}, "gpu_kv_bytes: got 'lots', expected a size in bytes like 4096, \"512MiB\", "
                               '"1.5GB" or "1e9", a share of what is free like "50%", or "auto"'),
    ({"gpu_kv_bytes": "12G"}, "gpu_kv_bytes: got '12G', unknown unit 'G'; expected B, KB, MB, GB, TB"),
    ({"gpu_kv_bytes": "1e400"}, "gpu_kv_bytes: got '1e400', expected a finite size"),
    ({"gpu_kv_bytes": 1.5}, "gpu_kv_bytes: got 1.5, expected a whole number of bytes"),
    ({"gpu_kv_bytes": "150%"}, "gpu_kv_bytes: got '150%', expected a share in (0%, 100%]"),
    ({"gpu_kv_bytes": "0%"}, "gpu_kv_bytes: got '0%', expected a share in (0%, 100%]"),
    # modes: unknown, and known but not available yet
    ({"mode": "fast"}, "mode: got 'fast' (str), expected one of 'stream', 'split', 'speculative'"),
    ({"alpha": 0}, "alpha: got 0"),
    ({"partial_ratio": 1.5}, "partial_ratio: got 1.5"),
    ({"max_tokens": -1}, "max_tokens: got -1"),
    ({"min_tokens": 2.5}, "min_tokens: got 2.5"),
    ({"cpu_remainder": "some"}, "cpu_remainder: got 'some'"),
    # other values
    ({"kv_dtype": "int8"}, "kv_dtype: got 'int8' (str), expected one of 'auto', 'bfloat16', 'float16', 'float32'"),
    ({"block_size": 100}, "block_size: got 100, expected a power of two >= 16"),
    ({"block_size": 8}, "block_size: got 8, expected an integer >= 16"),
    ({"sink_tokens": -1}, "sink_tokens: got -1, expected an integer >= 0"),
    ({"prefetch_layers": 0}, "prefetch_layers: got 0, expected an integer >= 1"),
    ({"split_ratio": 2}, "split_ratio: got 2 (int), expected \"auto\" or a number in [0, 1]"),
    ({"ssd_kv_bytes": "1GiB"}, "ssd_kv_bytes: got '1GiB' without ssd_dir; set ssd_dir too, or use 0"),
    ({"ssd_dir": "/tmp/kv"}, "ssd_kv_bytes: got 0 with ssd_dir set, expected a size > 0"),
    ({"ssd_dir": "/tmp/kv", "ssd_kv_bytes": "50%"}, "ssd_kv_bytes: got '50%', expected a size in bytes"),
    ({"ssd_dir": 3, "ssd_kv_bytes": 1}, "ssd_dir: got 3 (int), expected a directory path"),
])
def test_bad_values_name_their_key(values, message):
    with pytest.raises(ConfigError) as err:
        OffloadConfig.from_dict(values)
    key = message.split(":")[0]
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}:")
    assert message in str(err.value)


def test_not_a_table():
    with pytest.raises(ConfigError, match=r"config: got \[1, 2\] \(list\), expected a table of keys"):
        OffloadConfig.from_dict([1, 2])
    with pytest.raises(ConfigError, match=r"config: got 3 \(int\), expected an OffloadConfig, a dict or a file path"):
        OffloadConfig.coerce(3)


def test_implemented_modes_gate_the_modes():
    assert {"stream", "split", "speculative"} <= IMPLEMENTED_MODES
    for mode in IMPLEMENTED_MODES:
        assert OffloadConfig(mode=mode).mode == mode


def test_file_errors(tmp_path):
    (tmp_path / "c.json").write_text("{}")
    cases = [
        (tmp_path / "c.json", "expected a .toml, .yaml or .yml file"),
        (tmp_path / "none.toml", "does not exist"),
        (tmp_path, "expected a .toml"),
    ]
    (tmp_path / "dir.toml").mkdir()
    cases.append((tmp_path / "dir.toml", "is not a file"))
    (tmp_path / "bad.toml").write_text("block_size = = 3")
    cases.append((tmp_path / "bad.toml", "is not valid TOML"))
    (tmp_path / "bad.yaml").write_text("block_size: [1\n")
    cases.append((tmp_path / "bad.yaml", "is not valid YAML"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    cases.append((tmp_path / "list.yaml", "expected a table of keys"))
    (tmp_path / "typo.toml").write_text("blok_size = 64\n")
    cases.append((tmp_path / "typo.toml", "blok_size: unknown key; did you mean 'block_size'?"))
    for path, fragment in cases:
        with pytest.raises(ConfigError) as err:
            OffloadConfig.load(path)
        assert fragment in str(err.value), path


MACHINE = MachineMemory(gpu_free_bytes=10 * GiB, host_available_bytes=100 * GiB)


def test_a_process_capped_below_its_card_counts_only_what_the_cap_leaves(monkeypatch):
    """set_per_process_memory_fraction (a smaller card, emulated) caps what the caching allocator may
    reserve: "auto" budgets must come from that, not from the card's free memory."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (120 * GiB, 140 * GiB))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 18 * GiB)
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 0.5)
    assert MachineMemory.probe("cuda").gpu_free_bytes == 70 * GiB - 18 * GiB
    monkeypatch.setattr(torch.cuda, "get_per_process_memory_fraction", lambda device=None: 1.0)
    assert MachineMemory.probe("cuda").gpu_free_bytes == 120 * GiB


def test_budgets_resolve_against_the_machine():
    b = resolve_budgets(OffloadConfig(), MACHINE)
    assert b == Budgets(5 * GiB, 80 * GiB, 0)
    b = resolve_budgets(OffloadConfig(gpu_kv_bytes="25%", cpu_kv_bytes="12GiB"), MACHINE)
    assert (b.gpu_kv_bytes, b.cpu_kv_bytes) == (GiB * 10 // 4, 12 * GiB)
    no_gpu = MachineMemory(gpu_free_bytes=None, host_available_bytes=100 * GiB)
    assert resolve_budgets(OffloadConfig(gpu_kv_bytes="10%"), no_gpu).gpu_kv_bytes == 10 * GiB
    ssd = OffloadConfig(ssd_dir="/tmp/kv", ssd_kv_bytes="2GiB")
    assert resolve_budgets(ssd, MachineMemory(None, GiB, ssd_free_bytes=3 * GiB)).ssd_kv_bytes == 2 * GiB


@pytest.mark.parametrize("config,machine,key,fragments", [
    (OffloadConfig(cpu_kv_bytes="1000TiB"), MACHINE, "cpu_kv_bytes",
     ["cpu_kv_bytes: got '1000TiB' (1099511627776000 bytes, 1000.00 TiB), but only 107374182400 bytes "
      "(100.00 GiB) of host memory available", 'lower cpu_kv_bytes, or use "auto" (80% of it)']),
    (OffloadConfig(gpu_kv_bytes=11 * GiB), MACHINE, "gpu_kv_bytes", ["of GPU memory free", "lower gpu_kv_bytes"]),
    (OffloadConfig(gpu_kv_bytes="2GiB"), MachineMemory(None, GiB), "gpu_kv_bytes", ["host memory available (no GPU)"]),
    (OffloadConfig(ssd_dir="/d", ssd_kv_bytes="5GB"), MachineMemory(None, GiB, 10**9), "ssd_kv_bytes",
     ["disk free under /d", "pick another ssd_dir"]),
])
def test_budget_larger_than_the_machine(config, machine, key, fragments):
    with pytest.raises(ConfigError) as err:
        resolve_budgets(config, machine)
    assert err.value.key == key
    for fragment in fragments:
        assert fragment in str(err.value)


def test_machine_probe_and_after_loading(tmp_path):
    machine = MachineMemory.probe(ssd_dir=tmp_path / "not" / "made" / "yet")
    assert machine.host_available_bytes > 0 and machine.ssd_free_bytes > 0
    assert MachineMemory.probe("cpu").gpu_free_bytes is None
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="ssd_dir: got .*, which is a file"):
        MachineMemory.probe(ssd_dir=tmp_path / "file")
    assert MACHINE.after_loading(4 * GiB).gpu_free_bytes == 6 * GiB
    assert MachineMemory(None, 10 * GiB).after_loading(4 * GiB).host_available_bytes == 6 * GiB


def test_errors_are_value_errors_that_survive_pickling():
    err = ModelPathError("model", "model: got 'x', expected a directory")
    assert isinstance(err, ConfigError) and isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert type(back) is ModelPathError and back.key == "model" and str(back) == str(err)


@pytest.mark.parametrize("key,value,expected", [
    ("verify_share", 1, r"verify_share: got 1 \(int\), expected a number in \[0, 1\)"),
    ("verify_share", "0.2", r"verify_share: got '0.2' \(str\), expected a number in \[0, 1\)"),
    ("reuse_rows", "yes", r"reuse_rows: got 'yes' \(str\), expected true or false"),
    ("speculation_debug", 1, r"speculation_debug: got 1 \(int\), expected true or false"),
    ("grow_window", "auto", r"grow_window: got 'auto' \(str\), expected true or false"),
    ("ssd_miss", "drop", r"ssd_miss: got 'drop' \(str\), expected one of 'wait', 'skip'"),
    ("cpu_part_wait", "cpu", r"cpu_part_wait: got 'cpu' \(str\), expected one of 'host', 'gpu'"),
    ("ssd_rebalance_steps", -1, r"ssd_rebalance_steps: got -1, expected an integer >= 0"),
])
def test_speculative_switches_name_the_key_and_what_they_take(key, value, expected):
    with pytest.raises(ConfigError, match=expected) as info:
        OffloadConfig(mode="speculative", **{key: value})
    assert info.value.key == key
