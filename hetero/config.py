"""OffloadConfig: every knob of hetero, with a default, loaded from TOML, YAML or a dict and validated.

Sizes are kept as given (bytes, "12GiB", "50%" of what is free, or "auto") and turned into bytes by
`resolve_budgets` against the machine's free memory.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import psutil
import yaml

from .errors import ConfigError

MODES = ("stream", "split", "speculative")
IMPLEMENTED_MODES = ("stream", "split")
KV_DTYPES = ("auto", "bfloat16", "float16", "float32")

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SHARE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")


@dataclass(frozen=True)
class OffloadConfig:
    """Where the KV cache lives and how attention reaches it. See `describe_keys()`."""

    mode: str = "stream"
    gpu_kv_bytes: int | str = "auto"
    cpu_kv_bytes: int | str = "auto"
    ssd_dir: str | None = None
    ssd_kv_bytes: int | str = 0
    block_size: int = 256
    sink_tokens: int = 64
    window_tokens: int = 1024
    kv_dtype: str = "auto"
    cpu_threads: int | str = "auto"
    prefetch_layers: int = 1
    prefill_chunk_tokens: int = 4096
    io_threads: int = 8
    split_ratio: float | str = "auto"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        if self.mode not in IMPLEMENTED_MODES:
            raise ConfigError(
                "mode", f"mode: {self.mode!r} is not available yet; expected one of {', '.join(IMPLEMENTED_MODES)}"
            )
        for key in ("gpu_kv_bytes", "cpu_kv_bytes"):
            _check_budget(key, getattr(self, key))
        parse_size(self.ssd_kv_bytes, "ssd_kv_bytes")
        if self.ssd_dir is not None and not isinstance(self.ssd_dir, str):
            raise ConfigError("ssd_dir", f"ssd_dir: got {self.ssd_dir!r}, expected a directory path")
        if self.ssd_dir is None and parse_size(self.ssd_kv_bytes, "ssd_kv_bytes") > 0:
            raise ConfigError("ssd_kv_bytes", "ssd_kv_bytes: set ssd_dir too, or leave ssd_kv_bytes at 0")
        block = _int("block_size", self.block_size, minimum=16)
        if block & (block - 1):
            raise ConfigError("block_size", f"block_size: got {block}, expected a power of two >= 16")
        _int("sink_tokens", self.sink_tokens, minimum=0)
        _int("window_tokens", self.window_tokens, minimum=0)
        _choice("kv_dtype", self.kv_dtype, KV_DTYPES)
        if self.cpu_threads != "auto":
            _int("cpu_threads", self.cpu_threads, minimum=1)
        _int("prefetch_layers", self.prefetch_layers, minimum=1)
        _int("prefill_chunk_tokens", self.prefill_chunk_tokens, minimum=1)
        _int("io_threads", self.io_threads, minimum=1)
        if self.split_ratio != "auto":
            ratio = self.split_ratio
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
                raise ConfigError("split_ratio", f"split_ratio: got {ratio!r}, expected \"auto\" or a number in [0, 1]")

    @classmethod
    def from_dict(cls, values: dict) -> "OffloadConfig":
        if not isinstance(values, dict):
            raise ConfigError("config", f"config: got {type(values).__name__}, expected a table of keys")
        known = {f.name for f in fields(cls)}
        for key in values:
            if key not in known:
                close = difflib.get_close_matches(str(key), sorted(known), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(sorted(known))}"
                raise ConfigError(str(key), f"{key}: unknown key; {hint}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "OffloadConfig":
        """Read a .toml, .yaml or .yml file."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError("config", f"config: {path} does not exist")
        suffix = path.suffix.lower()
        try:
            if suffix == ".toml":
                values = tomllib.loads(path.read_text())
            elif suffix in (".yaml", ".yml"):
                values = yaml.safe_load(path.read_text()) or {}
            else:
                raise ConfigError("config", f"config: got {path.name}, expected a .toml, .yaml or .yml file")
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            raise ConfigError("config", f"config: {path} is not valid {suffix[1:].upper()}: {exc}") from exc
        return cls.from_dict(values)

    @classmethod
    def coerce(cls, value: "OffloadConfig | dict | str | Path | None") -> "OffloadConfig":
        """Accept a config, a dict of keys, a file path, or None for the defaults."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, Path)):
            return cls.load(value)
        raise ConfigError("config", f"config: got {type(value).__name__}, expected an OffloadConfig, dict or path")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class MachineMemory:
    """Free memory the budgets are checked against."""

    gpu_free_bytes: int | None
    host_available_bytes: int

    @classmethod
    def probe(cls, device=None) -> "MachineMemory":
        import torch

        gpu = None
        if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
            gpu = torch.cuda.mem_get_info(device)[0]
        return cls(gpu, psutil.virtual_memory().available)


@dataclass(frozen=True)
class Budgets:
    """Byte budgets per tier, resolved against the machine."""

    gpu_kv_bytes: int
    cpu_kv_bytes: int
    ssd_kv_bytes: int


def resolve_budgets(config: OffloadConfig, machine: MachineMemory) -> Budgets:
    """Turn the config's sizes into bytes; a budget above what the machine has is an error.

    "auto" is half the free GPU memory and 80% of the available host memory. Without a GPU the
    "GPU tier" lives in host memory too, and shares its availability.
    """
    host = machine.host_available_bytes
    gpu = machine.gpu_free_bytes if machine.gpu_free_bytes is not None else host
    gpu_bytes = _resolve("gpu_kv_bytes", config.gpu_kv_bytes, gpu, auto_share=0.5)
    cpu_bytes = _resolve("cpu_kv_bytes", config.cpu_kv_bytes, host, auto_share=0.8)
    return Budgets(gpu_bytes, cpu_bytes, parse_size(config.ssd_kv_bytes, "ssd_kv_bytes"))


def _resolve(key: str, value, available: int, auto_share: float) -> int:
    if value == "auto":
        return int(available * auto_share)
    if isinstance(value, str) and (share := _SHARE.match(value)):
        return int(available * float(share.group(1)) / 100)
    size = parse_size(value, key)
    if size > available:
        raise ConfigError(
            key, f"{key}: got {value!r} ({size} bytes), but only {available} bytes are free; lower it or use \"auto\""
        )
    return size


def parse_size(value, key: str) -> int:
    """Bytes from an int or a string like "512MiB", "1.5GB", "1e9"; the one place sizes are parsed."""
    if isinstance(value, bool):
        raise ConfigError(key, f"{key}: got {value!r} (bool), expected a size like 4096, \"512MiB\" or \"12GiB\"")
    if isinstance(value, int):
        size = value
    elif isinstance(value, float) and value.is_integer():
        size = int(value)
    elif isinstance(value, str) and (m := _SIZE.match(value)) and m.group(2).lower() in _UNITS:
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
    else:
        raise ConfigError(key, f"{key}: got {value!r}, expected a size like 4096, \"512MiB\" or \"12GiB\"")
    if size < 0:
        raise ConfigError(key, f"{key}: got {value!r}, expected a size >= 0")
    return size


def _check_budget(key: str, value) -> None:
    if value == "auto":
        return
    if isinstance(value, str) and (share := _SHARE.match(value)):
        if not 0 < float(share.group(1)) <= 100:
            raise ConfigError(key, f"{key}: got {value!r}, expected a share in (0%, 100%]")
        return
    if isinstance(value, str) and value.strip().startswith("-"):
        raise ConfigError(key, f"{key}: got {value!r}, expected a size >= 0")
    parse_size(value, key)


def _int(key: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"{key}: got {value!r} ({type(value).__name__}), expected an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(key, f"{key}: got {value}, expected an integer >= {minimum}")
    return value


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(key, f"{key}: got {value!r}, expected one of {', '.join(repr(c) for c in choices)}")


def describe_keys() -> list[tuple[str, object, str]]:
    """(key, default, meaning) for every key: the README's table and `hetero --help` use it."""
    docs = {
        "mode": "how attention reaches KV that is not on the GPU: stream | split | speculative",
        "gpu_kv_bytes": "GPU memory for the KV: resident sink and window plus fetch buffers",
        "cpu_kv_bytes": "host memory (pinned) for the KV's home",
        "ssd_dir": "directory for KV blocks that do not fit the host budget",
        "ssd_kv_bytes": "disk budget under ssd_dir",
        "block_size": "tokens per KV block, the unit of every transfer",
        "sink_tokens": "first tokens kept on the GPU",
        "window_tokens": "most recent tokens kept on the GPU",
        "kv_dtype": "storage dtype of the KV (auto: the model's)",
        "cpu_threads": "threads for CPU attention (auto: all cores)",
        "prefetch_layers": "how many layers ahead KV is fetched",
        "prefill_chunk_tokens": "prompt tokens per prefill forward",
        "io_threads": "NVMe I/O threads",
        "split_ratio": "split mode: share of the offloaded KV the GPU fetches (auto: from bandwidths)",
    }
    return [(f.name, f.default, docs[f.name]) for f in fields(OffloadConfig)]
