"""OffloadConfig: every knob of hetero, each with a default, loaded from TOML, YAML or a dict and
validated at construction; every error names the key, what it got and what was expected.

Sizes are kept as given (bytes, "12GiB", "50%" of what is free, or "auto") and turned into bytes by
`resolve_budgets` against the machine's free memory, the moment the cache is sized.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import shutil
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import psutil
import yaml

from .errors import ConfigError

MODES = ("stream", "split", "speculative")
IMPLEMENTED_MODES = {"stream", "split", "speculative"}  # enabling a mode is one line here
CPU_REMAINDERS = ("none", "bounded", "all")
SSD_MISSES = ("wait", "skip")
CPU_PART_WAITS = ("host", "gpu")
KV_DTYPES = ("auto", "bfloat16", "float16", "float32")
AUTO_GPU_SHARE = 0.5  # of the GPU memory free once the weights are loaded
AUTO_CPU_SHARE = 0.8  # of the host memory available

_UNITS = {
    "": 1, "b": 1,
    "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}
_SIZE = re.compile(r"^\s*([-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:e[-+]?[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_SHARE = re.compile(r"^\s*([-+]?[0-9]*\.?[0-9]+)\s*%\s*$")
_SIZE_HINT = 'a size in bytes like 4096, "512MiB", "1.5GB" or "1e9"'
_BUDGET_HINT = f'{_SIZE_HINT}, a share of what is free like "50%", or "auto"'

_DOCS = {
    "mode": "how attention reaches KV off the GPU: stream (fetch it all) | split (the CPU attends over part)",
    "gpu_kv_bytes": "GPU memory for the KV (sink, window, fetch buffers); auto = 50% of what is free after the weights",
    "cpu_kv_bytes": "pinned host memory, the home of every token's K and V; auto = 80% of available RAM",
    "ssd_dir": "directory for KV blocks beyond the host budget (none: no SSD tier)",
    "ssd_kv_bytes": "disk budget under ssd_dir, bytes or a size; > 0 exactly when ssd_dir is set",
    "block_size": "tokens per KV block, the unit of every transfer (a power of two >= 16)",
    "sink_tokens": "first tokens of each layer kept on the GPU (the attention sink)",
    "window_tokens": "most recent tokens of each layer kept on the GPU (the least, with grow_window)",
    "grow_window": "stream and split: the window grows past window_tokens to hold as many recent blocks as the GPU "
                   "budget leaves beside fetch buffers of a whole layer, so that they never cross PCIe or reach the "
                   "CPU (speculative keeps window_tokens: its selection is defined beside that window; so does a "
                   "cache with an SSD tier, which holds only blocks that leave the GPU)",
    "kv_dtype": "storage dtype of the KV: auto (the model's) | bfloat16 | float16 | float32",
    "cpu_threads": "threads for CPU attention (split, cpu_remainder; auto: all cores but one, which drives the GPU)",
    "prefetch_layers": "layers ahead of the one computing whose KV is fetched",
    "prefill_chunk_tokens": "prompt tokens per prefill forward (bounds prefill activations)",
    "io_threads": "threads reading and writing the SSD tier",
    "split_ratio": "split mode: share 0..1 of the offloaded KV the GPU fetches (auto: from PCIe vs CPU bandwidth)",
    "alpha": "speculative mode: a token is fetched when its predicted score is within alpha of its head's best",
    "partial_ratio": "speculative mode: share 0..1 of each head's key columns kept for prediction",
    "min_partial_columns": "speculative mode: fewest key columns kept per head whatever partial_ratio gives (0.25 of "
                           "128 is 32; smaller heads keep this many too, or all of theirs; 0: partial_ratio alone)",
    "min_tokens": "speculative mode: fewest middle tokens fetched per KV head (a count, or a share < 1 of the context)",
    "max_tokens": "speculative mode: most middle tokens fetched per KV head (a count, or a share < 1 of the context)",
    "cpu_remainder": "speculative mode: none (ignore tokens not fetched) | bounded (the CPU attends over them in the "
                     "blocks whose key bounds allow a score within alpha of the best block's, Quest) | all (the CPU "
                     "attends over them all: exact)",
    "reuse_rows": "speculative mode: keep each layer's gathered rows on the GPU from one step to the next and fetch only "
                  "the newly selected tokens (GPU memory: max_tokens rows per layer; pays where PCIe binds, at "
                  "larger batches; costs host time per layer)",
    "speculation_debug": "speculative mode, debug: the CPU also attends over the tokens not fetched (the output is then "
                         "exact, as with cpu_remainder all, and slower), so that the stats report the share of each "
                         "head's attention the fetched tokens hold, and how many of them the layer fetched the step before",
    "verify_share": "speculative mode: share [0, 1) of max_tokens kept for the layer's own query, which once known "
                    "selects again and fetches what the prediction from the layer before missed (0: the prediction "
                    "alone, as InfiniGen)",
    "ssd_miss": "speculative mode with an SSD tier: wait (read every SSD block of a layer before it attends) | skip "
                "(read ahead only the SSD blocks the layer selected at the step before; tokens of SSD blocks not "
                "in host memory when selected are left out, counted in the stats; needs cpu_remainder none)",
    "cpu_part_wait": "split, and cpu_remainder bounded/all: what waits for the CPU's part of a layer: gpu (the compute "
                     "stream waits on a flag in pinned memory while the host thread queues the layers after it) | "
                     "host (the host thread waits before it queues the next layer: slower, no GPU-side wait)",
    "ssd_rebalance_steps": "speculative mode with an SSD tier: every this many decode steps, the blocks selected most "
                           "that sit on the SSD trade places with the least selected in host memory (0: never)",
}


@dataclass(frozen=True)
class OffloadConfig:
    """Where the KV cache lives and how attention reaches it; `describe_keys()` documents each key."""

    mode: str = "stream"
    gpu_kv_bytes: int | str = "auto"
    cpu_kv_bytes: int | str = "auto"
    ssd_dir: str | None = None
    ssd_kv_bytes: int | str = 0
    block_size: int = 256
    sink_tokens: int = 64
    window_tokens: int = 1024
    grow_window: bool = True
    kv_dtype: str = "auto"
    cpu_threads: int | str = "auto"
    prefetch_layers: int = 1
    prefill_chunk_tokens: int = 4096
    io_threads: int = 8
    split_ratio: float | str = "auto"
    alpha: float = 5.0
    partial_ratio: float = 0.25
    min_partial_columns: int = 32
    min_tokens: int | float = 0.1
    max_tokens: int | float = 0.1
    cpu_remainder: str = "none"
    verify_share: float = 0.25
    reuse_rows: bool = False
    speculation_debug: bool = False
    ssd_miss: str = "wait"
    ssd_rebalance_steps: int = 16
    cpu_part_wait: str = "gpu"

    def __post_init__(self) -> None:
        _choice("mode", self.mode, MODES)
        if self.mode not in IMPLEMENTED_MODES:
            available = ", ".join(repr(m) for m in MODES if m in IMPLEMENTED_MODES)
            raise ConfigError("mode", f"mode: {self.mode!r} is not available yet; expected one of {available}")
        for key in ("gpu_kv_bytes", "cpu_kv_bytes"):
            _check_budget(key, getattr(self, key))
        ssd_bytes = parse_size(self.ssd_kv_bytes, "ssd_kv_bytes")
        if isinstance(self.ssd_dir, os.PathLike):
            object.__setattr__(self, "ssd_dir", os.fspath(self.ssd_dir))
        if self.ssd_dir is not None and (not isinstance(self.ssd_dir, str) or not self.ssd_dir.strip()):
            raise ConfigError("ssd_dir", f"ssd_dir: got {_shown(self.ssd_dir)}, expected a directory path")
        if self.ssd_dir is None and ssd_bytes > 0:
            raise ConfigError("ssd_kv_bytes", f"ssd_kv_bytes: got {self.ssd_kv_bytes!r} without ssd_dir; "
                                              "set ssd_dir too, or use 0")
        if self.ssd_dir is not None and ssd_bytes == 0:
            raise ConfigError("ssd_kv_bytes", f"ssd_kv_bytes: got {self.ssd_kv_bytes!r} with ssd_dir set, "
                                              'expected a size > 0 like "200GiB"')
        block = _int("block_size", self.block_size, minimum=16)
        if block & (block - 1):
            raise ConfigError("block_size", f"block_size: got {block}, expected a power of two >= 16")
        _int("sink_tokens", self.sink_tokens, minimum=0)
        _int("window_tokens", self.window_tokens, minimum=0)
        _choice("kv_dtype", self.kv_dtype, KV_DTYPES)
        if self.cpu_threads != "auto":
            _int("cpu_threads", self.cpu_threads, minimum=1, also='"auto" or ')
        _int("prefetch_layers", self.prefetch_layers, minimum=1)
        _int("prefill_chunk_tokens", self.prefill_chunk_tokens, minimum=1)
        _int("io_threads", self.io_threads, minimum=1)
        ratio = self.split_ratio
        if ratio != "auto" and (isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio <= 1):
            raise ConfigError("split_ratio", f'split_ratio: got {_shown(ratio)}, expected "auto" or a number in [0, 1]')
        check_speculation_keys(self)
        _bool("grow_window", self.grow_window)
        _bool("reuse_rows", self.reuse_rows)
        _bool("speculation_debug", self.speculation_debug)
        if not _is_number(self.verify_share) or not 0 <= self.verify_share < 1:
            raise ConfigError("verify_share", f"verify_share: got {_shown(self.verify_share)}, expected a number in [0, 1)")
        _choice("ssd_miss", self.ssd_miss, SSD_MISSES)
        _choice("cpu_part_wait", self.cpu_part_wait, CPU_PART_WAITS)
        if self.ssd_miss == "skip" and self.cpu_attends_remainder:
            raise ConfigError("ssd_miss", f'ssd_miss: "skip" leaves tokens out, which cpu_remainder '
                                          f'"{self.cpu_remainder}" (or speculation_debug) attends over; use '
                                          'cpu_remainder "none" or ssd_miss "wait"')
        _int("ssd_rebalance_steps", self.ssd_rebalance_steps, minimum=0)

    @property
    def cpu_attends_remainder(self) -> bool:
        """Whether, in the speculative mode, the CPU attends over the tokens not fetched."""
        return self.cpu_remainder != "none" or self.speculation_debug

    @classmethod
    def from_dict(cls, values: dict) -> "OffloadConfig":
        """Build from a mapping of top-level keys; an unknown key is named with the closest valid ones."""
        if not isinstance(values, dict):
            raise ConfigError("config", f"config: got {_shown(values)}, expected a table of keys")
        known = [f.name for f in fields(cls)]
        for key in values:
            if key not in known:
                close = " or ".join(repr(c) for c in _close_keys(str(key), known))
                hint = f"did you mean {close}?" if close else f"expected one of {', '.join(known)}"
                raise ConfigError(str(key), f"{key}: unknown key; {hint}")
        return cls(**values)

    @classmethod
    def load(cls, path: str | Path) -> "OffloadConfig":
        """Read a .toml, .yaml or .yml file whose keys sit at the top level."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix not in (".toml", ".yaml", ".yml"):
            raise ConfigError("config", f"config: got {str(path)!r}, expected a .toml, .yaml or .yml file")
        if not path.exists():
            raise ConfigError("config", f"config: {path} does not exist")
        if not path.is_file():
            raise ConfigError("config", f"config: {path} is not a file")
        try:
            text = path.read_text(encoding="utf-8")
            values = tomllib.loads(text) if suffix == ".toml" else yaml.safe_load(text)
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError("config", f"config: cannot read {path}: {exc}") from exc
        except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
            kind = "TOML" if suffix == ".toml" else "YAML"
            raise ConfigError("config", f"config: {path} is not valid {kind}: {exc}") from exc
        return cls.from_dict({} if values is None else values)

    @classmethod
    def coerce(cls, value: "OffloadConfig | dict | str | Path | None") -> "OffloadConfig":
        """Accept a config, a dict of keys, a file path, or None for the defaults."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, dict):
            return cls.from_dict(value)
        if isinstance(value, (str, os.PathLike)):
            return cls.load(value)
        raise ConfigError("config", f"config: got {_shown(value)}, expected an OffloadConfig, a dict or a file path")

    def to_dict(self) -> dict:
        """Every key and its value as given; `from_dict(c.to_dict()) == c`."""
        return asdict(self)


def describe_keys() -> list[tuple[str, object, str]]:
    """(key, default, one-line meaning with its unit) for every key, in file order: the README's
    table and `hetero --help` are built from it."""
    return [(f.name, f.default, _DOCS[f.name]) for f in fields(OffloadConfig)]


@dataclass(frozen=True)
class MachineMemory:
    """Free memory the budgets are resolved and checked against, in bytes.

    `gpu_free_bytes` is None without a GPU (the "GPU tier" then lives in host memory);
    `ssd_free_bytes` is the free disk under ssd_dir, None when unknown (then not checked).
    """

    gpu_free_bytes: int | None
    host_available_bytes: int
    ssd_free_bytes: int | None = None

    @classmethod
    def probe(cls, device=None, ssd_dir: str | Path | None = None) -> "MachineMemory":
        """Measure now: call it after the weights are loaded, so that "auto" leaves them room."""
        import torch

        gpu = None
        if torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda"):
            gpu, total = torch.cuda.mem_get_info(device)
            # A process capped below the card (set_per_process_memory_fraction) may not take what is free.
            capped = getattr(torch.cuda, "get_per_process_memory_fraction", lambda _: 1.0)(device) * total
            if capped < total:
                gpu = max(0, min(gpu, int(capped) - torch.cuda.memory_reserved(device)))
        return cls(gpu, psutil.virtual_memory().available, _disk_free(ssd_dir))

    def after_loading(self, weight_bytes: int) -> "MachineMemory":
        """The machine once `weight_bytes` of weights sit on the GPU (in host memory without one):
        what `hetero plan` resolves "auto" against before anything is loaded."""
        if self.gpu_free_bytes is None:
            return replace(self, host_available_bytes=max(0, self.host_available_bytes - weight_bytes))
        return replace(self, gpu_free_bytes=max(0, self.gpu_free_bytes - weight_bytes))


def check_speculation_keys(values) -> None:
    """Validate the speculative mode's keys of `values` (an OffloadConfig or SpeculationSettings)."""
    alpha, ratio = values.alpha, values.partial_ratio
    if not _is_number(alpha) or not math.isfinite(alpha) or not alpha > 0:
        raise ConfigError("alpha", f"alpha: got {_shown(alpha)}, expected a number > 0 (InfiniGen uses 4-5)")
    if not _is_number(ratio) or not 0 < ratio <= 1:
        raise ConfigError("partial_ratio", f"partial_ratio: got {_shown(ratio)}, expected a number in (0, 1]")
    _int("min_partial_columns", values.min_partial_columns, minimum=0)
    for key in ("min_tokens", "max_tokens"):
        value = getattr(values, key)
        if not _is_number(value) or value < 0 or (isinstance(value, float) and not (value < 1 or value.is_integer())):
            raise ConfigError(key, f"{key}: got {_shown(value)}, expected a token count >= 0 or a share of the context in [0, 1)")
    _choice("cpu_remainder", values.cpu_remainder, CPU_REMAINDERS)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class Budgets:
    """Byte budgets per tier, resolved against the machine: caps the cache allocates within."""

    gpu_kv_bytes: int
    cpu_kv_bytes: int
    ssd_kv_bytes: int


def resolve_budgets(config: OffloadConfig, machine: MachineMemory) -> Budgets:
    """Turn the config's sizes into bytes; a budget above what the machine has is an error.

    "auto" is 50% of the free GPU memory and 80% of the available host memory; "N%" is that share of
    the same. Without a GPU the "GPU tier" lives in host memory and shares its availability.
    """
    if machine.gpu_free_bytes is None:
        gpu_free, gpu_what = machine.host_available_bytes, "host memory available (no GPU)"
    else:
        gpu_free, gpu_what = machine.gpu_free_bytes, "GPU memory free"
    gpu = _resolve("gpu_kv_bytes", config.gpu_kv_bytes, gpu_free, AUTO_GPU_SHARE, gpu_what)
    cpu = _resolve("cpu_kv_bytes", config.cpu_kv_bytes, machine.host_available_bytes, AUTO_CPU_SHARE,
                   "host memory available")
    ssd = parse_size(config.ssd_kv_bytes, "ssd_kv_bytes")
    if config.ssd_dir is not None and machine.ssd_free_bytes is not None and ssd > machine.ssd_free_bytes:
        what, fix = f"disk free under {config.ssd_dir}", "lower it or pick another ssd_dir"
        message = _too_big("ssd_kv_bytes", config.ssd_kv_bytes, ssd, machine.ssd_free_bytes, what, fix)
        raise ConfigError("ssd_kv_bytes", message)
    return Budgets(gpu, cpu, ssd)


def parse_size(value, key: str, *, expected: str = _SIZE_HINT) -> int:
    """Bytes from an int or a string like "512MiB", "1.5GB", "1e9" (binary and decimal units, any
    case); the one place sizes are parsed. Raises ConfigError naming `key`; `expected` is what the
    message says was expected when the value is no size at all."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(key, f"{key}: got {_shown(value)}, expected {expected}")
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ConfigError(key, f"{key}: got {value!r}, expected {expected}")
        unit = match.group(2).lower()
        if unit not in _UNITS:
            raise ConfigError(key, f"{key}: got {value!r}, unknown unit {match.group(2)!r}; expected B, KB, MB, "
                                   "GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024)")
        number = float(match.group(1)) * _UNITS[unit]
    else:
        number = value
    if isinstance(number, float) and not math.isfinite(number):
        raise ConfigError(key, f"{key}: got {value!r}, expected a finite size")
    if number < 0:
        raise ConfigError(key, f"{key}: got {value!r}, a negative size; expected a size >= 0")
    if isinstance(value, float) and not value.is_integer():
        raise ConfigError(key, f"{key}: got {value!r}, expected a whole number of bytes")
    return round(number)


def _share(key: str, value) -> float | None:
    """The fraction in a share like "50%"; None when `value` is not a share."""
    if not isinstance(value, str) or (match := _SHARE.match(value)) is None:
        return None
    percent = float(match.group(1))
    if not 0 < percent <= 100:
        raise ConfigError(key, f"{key}: got {value!r}, expected a share in (0%, 100%]")
    return percent / 100


def _check_budget(key: str, value) -> None:
    if value != "auto" and _share(key, value) is None:
        parse_size(value, key, expected=_BUDGET_HINT)


def _resolve(key: str, value, available: int, auto_share: float, what: str) -> int:
    if value == "auto":
        return int(available * auto_share)
    if (share := _share(key, value)) is not None:
        return int(available * share)
    size = parse_size(value, key)
    if size > available:
        fix = f'lower {key}, or use "auto" ({auto_share:.0%} of it) or a share like "50%"'
        raise ConfigError(key, _too_big(key, value, size, available, what, fix))
    return size


def _too_big(key: str, value, size: int, available: int, what: str, fix: str) -> str:
    return (f"{key}: got {value!r} ({size} bytes, {format_bytes(size)}), but only {available} bytes "
            f"({format_bytes(available)}) of {what}; {fix}")


def _disk_free(ssd_dir) -> int | None:
    """Free bytes on the file system that holds (or would hold) `ssd_dir`."""
    if ssd_dir is None:
        return None
    path = Path(ssd_dir).expanduser().absolute()
    if path.exists() and not path.is_dir():
        raise ConfigError("ssd_dir", f"ssd_dir: got {str(ssd_dir)!r}, which is a file; expected a directory")
    while not path.exists():  # the directory is created when the SSD tier starts
        path = path.parent
    return shutil.disk_usage(path).free


def _close_keys(key: str, known: list[str]) -> list[str]:
    """Valid keys that look like `key`: the best match and any nearly as good."""
    scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in known), reverse=True)
    return [k for ratio, k in scored[:3] if ratio >= max(0.5, scored[0][0] - 0.1)]


def _int(key: str, value, minimum: int, also: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"{key}: got {_shown(value)}, expected {also}an integer >= {minimum}")
    if value < minimum:
        raise ConfigError(key, f"{key}: got {value}, expected {also}an integer >= {minimum}")
    return value


def _bool(key: str, value) -> None:
    if not isinstance(value, bool):
        raise ConfigError(key, f"{key}: got {_shown(value)}, expected true or false")


def _choice(key: str, value, choices) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(key, f"{key}: got {_shown(value)}, expected one of {', '.join(repr(c) for c in choices)}")


def _shown(value) -> str:
    """`'abc' (str)`: the value and its type, for messages where the type is the likely mistake."""
    return f"{value!r} ({type(value).__name__})"


def format_bytes(n: int | float) -> str:
    """A byte count for people: "1.50 GiB", "512.0 MiB", "3.0 KiB", "12 B"."""
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"
