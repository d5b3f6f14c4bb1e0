"""Bytes per token, where each tier's share goes, and the decode step time the ceilings predict.

Reads only a model's config: `hetero plan` runs without loading weights.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Budgets, OffloadConfig
from .errors import ConfigError
from .residency import ResidencyPolicy

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Ceilings:
    """Bandwidths that bound each path, bytes/s: ../shared/LIMITS.md, the H100 machine, 2026-11-23."""

    pcie_h2d: float = 54e9
    uva_gather: float = 48e9
    cpu_stream: float = 76e9
    hbm: float = 3.0e12
    disk_read: float = 1.45e9
    disk_write: float = 2.3e9


@dataclass(frozen=True)
class KVGeometry:
    """The KV cache's shape for one model: what one token costs per layer and in all."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def from_model_config(cls, model_config, kv_dtype: str = "auto") -> "KVGeometry":
        heads = model_config.num_attention_heads
        kv_heads = getattr(model_config, "num_key_value_heads", None) or heads
        head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // heads
        if kv_dtype == "auto":
            dtype = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None) or "bfloat16"
            kv_dtype = str(dtype).removeprefix("torch.")
        return cls(model_config.num_hidden_layers, kv_heads, head_dim, _DTYPE_BYTES.get(kv_dtype, 2))

    @property
    def bytes_per_token_layer(self) -> int:
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        return self.num_layers * self.bytes_per_token_layer


@dataclass(frozen=True)
class Plan:
    """Where a generation's KV lives and what each mode's decode step should cost."""

    context: int
    batch: int
    bytes_per_token: int
    total_bytes: int
    gpu_bytes: int
    host_bytes: int
    ssd_bytes: int
    step_seconds: dict[str, float]

    def format(self) -> str:
        rows = [
            f"KV per token: {self.bytes_per_token / 2**10:.1f} KiB (all layers, batch {self.batch})",
            f"KV in total:  {_size(self.total_bytes)} for {self.context} tokens",
            f"GPU (sink, window, fetch buffers): {_size(self.gpu_bytes)}",
            f"host memory (every token's home): {_size(self.host_bytes)}",
            f"SSD: {_size(self.ssd_bytes)}",
            "predicted decode step (from the ceilings):",
        ]
        for mode, seconds in self.step_seconds.items():
            rows.append(f"  {mode:12s} {seconds * 1e3:9.1f} ms/step  {self.batch / seconds:9.2f} tok/s")
        return "\n".join(rows)


def make_plan(
    geometry: KVGeometry,
    context_tokens: int,
    batch: int,
    config: OffloadConfig,
    budgets: Budgets,
    ceilings: Ceilings = Ceilings(),
    speculative_share: float = 0.1,
) -> Plan:
    """Place a `batch` x `context_tokens` KV cache on the tiers and predict each mode's step time."""
    per_token = geometry.bytes_per_token * batch
    total = per_token * context_tokens
    policy = ResidencyPolicy.from_tokens(config.block_size, config.sink_tokens, config.window_tokens)
    resident_tokens = min(context_tokens, (policy.sink_blocks + policy.window_blocks + 1) * config.block_size)
    offloaded = per_token * (context_tokens - resident_tokens)
    gpu = min(budgets.gpu_kv_bytes, total)
    host = min(total, budgets.cpu_kv_bytes)
    ssd = total - host
    if ssd > budgets.ssd_kv_bytes:
        key = "cpu_kv_bytes" if budgets.ssd_kv_bytes == 0 else "ssd_kv_bytes"
        raise ConfigError(
            key,
            f"{key}: the KV of {batch} x {context_tokens} tokens needs {_size(total)}; host "
            f"{_size(budgets.cpu_kv_bytes)} + SSD {_size(budgets.ssd_kv_bytes)} do not hold it; raise {key}"
            + (" or set ssd_dir and ssd_kv_bytes" if budgets.ssd_kv_bytes == 0 else ""),
        )
    from_ssd = ssd / ceilings.disk_read
    steps = {
        "stream": offloaded / ceilings.pcie_h2d + from_ssd,
        "split": offloaded / (ceilings.pcie_h2d + ceilings.cpu_stream) + from_ssd,
        "speculative": speculative_share * offloaded / ceilings.uva_gather,
    }
    if total <= budgets.gpu_kv_bytes:
        steps["all-on-GPU"] = total / ceilings.hbm
    return Plan(context_tokens, batch, per_token, total, gpu, host, ssd, steps)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
