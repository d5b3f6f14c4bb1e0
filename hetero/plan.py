"""Bytes per token, where each tier's share goes, and the decode step time the ceilings predict.

Reads only a model's config: `hetero plan` runs without loading weights. The tiers are laid out as
`HeteroCache` lays them out: every token's home is host memory (the SSD takes what the host budget
cannot), and the GPU holds copies of each layer's sink and window plus a ring of fetch buffers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .config import IMPLEMENTED_MODES, Budgets, OffloadConfig, format_bytes
from .errors import ConfigError
from .residency import ResidencyPolicy

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


@dataclass(frozen=True)
class Ceilings:
    """Bandwidths that bound each path, bytes/s. Defaults: /work/shared/LIMITS.md, measured on the
    project's H100 machine (PCIe gen5, 16 Xeon cores, virtio disk) on 2026-11-23; measure your own
    machine with probe/limits.py (beside LIMITS.md) and pass its numbers."""

    pcie_h2d: float = 54e9  # pinned host -> GPU copy
    uva_gather: float = 48e9  # GPU kernel gathering scattered rows from pinned host memory
    cpu_stream: float = 76e9  # all cores streaming through host memory
    hbm: float = 3.0e12  # GPU memory
    disk_read: float = 1.45e9  # O_DIRECT, 16 threads
    disk_write: float = 2.3e9  # O_DIRECT, 16 MiB chunks


@dataclass(frozen=True)
class KVGeometry:
    """The KV cache's shape for one model: what one token costs per layer and in all layers."""

    num_layers: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int

    @classmethod
    def from_model_config(cls, model_config, kv_dtype: str = "auto") -> "KVGeometry":
        """From a transformers config (the text part of a multimodal one); `kv_dtype` as in
        OffloadConfig, "auto" taking the config's dtype (bfloat16 when it names none)."""
        text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
        heads = text.num_attention_heads
        kv_heads = getattr(text, "num_key_value_heads", None) or heads
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
        if kv_dtype == "auto":
            kv_dtype = getattr(text, "dtype", None) or getattr(text, "torch_dtype", None) or "bfloat16"
        return cls(text.num_hidden_layers, kv_heads, head_dim, _itemsize(kv_dtype))

    @property
    def bytes_per_token_layer(self) -> int:
        """K and V of one token in one layer, one sequence."""
        return 2 * self.kv_heads * self.head_dim * self.dtype_bytes

    @property
    def bytes_per_token(self) -> int:
        """K and V of one token in all layers, one sequence."""
        return self.num_layers * self.bytes_per_token_layer


@dataclass(frozen=True)
class GpuTier:
    """What the GPU holds of the KV, over all layers: resident blocks (sink, window, the block being
    filled, and window blocks a chunk pushed out that a pending plan still reads) and a ring of
    fetch buffers, each up to one layer's middle, sized from what the budget leaves. `window_blocks`:
    the window, grown past the configured one where the budget leaves room (`grow_window`)."""

    resident_blocks: int
    ring_buffers: int
    blocks_per_buffer: int
    block_bytes: int
    window_blocks: int = 0

    @property
    def bytes(self) -> int:
        return (self.resident_blocks + self.ring_buffers * self.blocks_per_buffer) * self.block_bytes


def fetch_ring_shape(prefetch_layers: int, spare_bytes: int, blocks_per_layer: int, block_bytes: int) -> tuple[int, int]:
    """(buffers, blocks per buffer) of the fetch ring within `spare_bytes`: two buffers per layer
    fetched ahead (one filling while the other is read), each up to a whole layer. (A third
    whole-layer buffer, which lets the copy engine run a layer further ahead in `split`, was
    measured on the GPU machine at 176.0 and 180.1 against 183.7 and 173.0 ms a step without:
    no gain for its GPU memory.)"""
    buffers = max(2, 2 * prefetch_layers)
    return buffers, min(blocks_per_layer, max(0, spare_bytes) // (buffers * block_bytes))


GROWING_MODES = ("stream", "split")  # exact modes: where a block lies changes nothing but the time


def size_gpu_tier(config: OffloadConfig, num_layers: int, blocks_per_layer: int, block_bytes: int,
                  gpu_budget: int, taken_bytes: int = 0, taken_for: str = "") -> GpuTier:
    """Lay the GPU tier out within `gpu_budget` bytes, of which `taken_bytes` go elsewhere (named by
    `taken_for`); ConfigError("gpu_kv_bytes") when even one block per fetch buffer does not fit
    beside the resident blocks. In `stream` and `split` with `grow_window` and no SSD tier, what a
    whole layer's fetch buffers leave widens the window: those blocks then never cross PCIe or reach
    the CPU."""
    policy = ResidencyPolicy.from_tokens(config.block_size, config.sink_tokens, config.window_tokens)
    chunk = chunk_blocks(config)
    room = gpu_budget - taken_bytes
    resident = num_layers * policy.slots_per_layer(chunk)
    ring_buffers, per_buffer = fetch_ring_shape(config.prefetch_layers, room - resident * block_bytes,
                                                blocks_per_layer, block_bytes)
    if per_buffer < 1:
        need = (resident + ring_buffers) * block_bytes + taken_bytes
        raise ConfigError(
            "gpu_kv_bytes",
            f"gpu_kv_bytes: got {gpu_budget} bytes ({format_bytes(gpu_budget)}), expected at least {need} "
            f"({format_bytes(need)}) for the sink ({config.sink_tokens} tokens), window ({config.window_tokens} "
            f"tokens){taken_for} and {ring_buffers} fetch buffers of one {config.block_size}-token block, for "
            f"{num_layers} layers; raise gpu_kv_bytes or lower window_tokens or block_size",
        )
    window = policy.window_blocks
    # The SSD holds only blocks that leave the GPU: a wider window would leave it fewer.
    if config.grow_window and config.mode in GROWING_MODES and config.ssd_dir is None:
        window = _widest_window(policy, chunk, num_layers, blocks_per_layer, block_bytes, room, ring_buffers)
        policy = replace(policy, window_blocks=window)
        resident = num_layers * policy.slots_per_layer(chunk)
        room_per_buffer = (room - resident * block_bytes) // (ring_buffers * block_bytes)
        per_buffer = min(_middle_blocks(policy, blocks_per_layer), room_per_buffer)
    return GpuTier(resident, ring_buffers, per_buffer, block_bytes, window)


def chunk_blocks(config: OffloadConfig) -> int:
    """Blocks a prefill chunk adds to a layer at most."""
    return -(-config.prefill_chunk_tokens // config.block_size)


def _middle_blocks(policy: ResidencyPolicy, blocks_per_layer: int) -> int:
    """A layer's blocks that ever leave the GPU (at least 1: the ring is never empty)."""
    return max(1, policy.leaving_end(blocks_per_layer) - policy.sink_blocks)


def _widest_window(policy: ResidencyPolicy, chunk: int, num_layers: int, blocks_per_layer: int, block_bytes: int,
                   room: int, ring_buffers: int) -> int:
    """The widest window (at least the policy's) whose resident blocks, beside fetch buffers of a
    whole layer's middle each, fit `room` bytes."""

    def fits(window: int) -> bool:
        wider = replace(policy, window_blocks=window)
        blocks = num_layers * wider.slots_per_layer(chunk) + ring_buffers * _middle_blocks(wider, blocks_per_layer)
        return blocks * block_bytes <= room

    low, high = policy.window_blocks, max(policy.window_blocks, blocks_per_layer - policy.sink_blocks - 1)
    if not fits(low) or fits(high):
        return high if fits(high) else low
    while high - low > 1:  # fits(low), not fits(high); each wider block costs more than the ring saves
        mid = (low + high) // 2
        low, high = (mid, high) if fits(mid) else (low, mid)
    return low


@dataclass(frozen=True)
class Plan:
    """Where a generation's KV lives and what each mode's decode step should cost.

    Bytes are for the whole batch and all layers. `step_seconds` maps each mode to its predicted
    decode step, KV traffic only (not weights, not compute): each pipe (PCIe, the CPU's memory
    bandwidth, the disk, HBM) runs beside the others, so the slowest bounds the step. A lower
    bound, the speed of light of each mode on the given ceilings.
    """

    context: int
    batch: int
    mode: str
    geometry: KVGeometry
    bytes_per_token: int
    total_bytes: int
    gpu: GpuTier
    host_bytes: int
    ssd_bytes: int
    offloaded_bytes: int
    gpu_share: float
    speculative_share: float
    step_seconds: dict[str, float]
    ssd_write_seconds: float = 0.0  # spilling the SSD's share once, during prefill

    @property
    def gpu_bytes(self) -> int:
        return self.gpu.bytes

    def format(self) -> str:
        """A short table for `hetero plan`."""
        g = self.geometry
        lines = [
            f"KV per token: {format_bytes(g.bytes_per_token)} per sequence ({g.num_layers} layers x K,V x "
            f"{g.kv_heads} KV heads x {g.head_dim} dims x {g.dtype_bytes} bytes), "
            f"{format_bytes(self.bytes_per_token)} for the batch of {self.batch}",
            f"KV in total:  {format_bytes(self.total_bytes)} for {self.context} tokens per sequence",
            "",
            f"{'tier':6} {'bytes':>11}  holds",
            f"{'GPU':6} {format_bytes(self.gpu_bytes):>11}  sink, window ({self.gpu.window_blocks} blocks) and the "
            f"block being filled; {self.gpu.ring_buffers} fetch buffers of {self.gpu.blocks_per_buffer} blocks",
            f"{'host':6} {format_bytes(self.host_bytes):>11}  every token's home"
            + (" but the SSD's" if self.ssd_bytes else ""),
            f"{'SSD':6} {format_bytes(self.ssd_bytes):>11}  "
            + (f"the coldest blocks, written once in {self.ssd_write_seconds:.1f} s" if self.ssd_bytes else "-"),
            "",
            f"predicted decode step, KV traffic only ({format_bytes(self.offloaded_bytes)} off the GPU per step):",
            f"  {'mode':12} {'ms/step':>9} {'tokens/s':>9}",
        ]
        notes = {
            "split": f"GPU fetches {self.gpu_share:.0%}, the CPU attends over the rest",
            "speculative": f"approximate; fetches {self.speculative_share:.0%} of the tokens",
            "all-on-GPU": "if the whole KV sat in HBM",
        }
        for mode, seconds in self.step_seconds.items():
            note = notes.get(mode, "")
            if mode != "all-on-GPU" and mode not in IMPLEMENTED_MODES:
                note = f"{note}; not available yet" if note else "not available yet"
            mark = "*" if mode == self.mode else " "
            lines.append(f"{mark} {mode:12} {seconds * 1e3:9.2f} {self.batch / seconds:9.1f}  {note}".rstrip())
        lines.append("(* the configured mode; bounds from the bandwidth ceilings, see LIMITS.md)")
        return "\n".join(lines)


def make_plan(
    geometry: KVGeometry,
    context_tokens: int,
    batch: int,
    config: OffloadConfig,
    budgets: Budgets,
    ceilings: Ceilings = Ceilings(),
    speculative_share: float = 0.1,
) -> Plan:
    """Place a `batch` x `context_tokens` KV cache on the tiers and predict each mode's step time.

    Host memory holds whole blocks up to `budgets.cpu_kv_bytes`, the SSD the rest; a cache the two
    cannot hold, or a GPU tier over `budgets.gpu_kv_bytes`, raises ConfigError naming the key to
    raise. `speculative_share` is the share of the offloaded tokens speculation is assumed to fetch.
    """
    if context_tokens < 1 or batch < 1:
        raise ConfigError("context", f"context: got {context_tokens} tokens x batch {batch}, expected both >= 1")
    if not 0 < speculative_share <= 1:
        raise ConfigError("speculative_share", f"speculative_share: got {speculative_share}, expected (0, 1]")
    bs = config.block_size
    block_bytes = geometry.bytes_per_token_layer * batch * bs
    blocks_per_layer = -(-context_tokens // bs)
    total = geometry.num_layers * blocks_per_layer * block_bytes
    gpu = size_gpu_tier(config, geometry.num_layers, blocks_per_layer, block_bytes, budgets.gpu_kv_bytes)

    host = min(total, budgets.cpu_kv_bytes // block_bytes * block_bytes)
    ssd = total - host
    if ssd > budgets.ssd_kv_bytes:
        short = ssd - budgets.ssd_kv_bytes
        where = (f"raise cpu_kv_bytes by {format_bytes(short)}, or set ssd_dir and ssd_kv_bytes"
                 if budgets.ssd_kv_bytes == 0 else f"raise ssd_kv_bytes or cpu_kv_bytes by {format_bytes(short)}")
        key = "cpu_kv_bytes" if budgets.ssd_kv_bytes == 0 else "ssd_kv_bytes"
        raise ConfigError(
            key,
            f"{key}: the KV of {batch} x {context_tokens} tokens needs {format_bytes(total)}; host "
            f"{format_bytes(budgets.cpu_kv_bytes)} + SSD {format_bytes(budgets.ssd_kv_bytes)} do not hold it; {where}"
            ", or shorten the context or the batch",
        )

    policy = replace(ResidencyPolicy.from_tokens(bs, config.sink_tokens, config.window_tokens),
                     window_blocks=gpu.window_blocks)
    middle_end = max(policy.sink_blocks, context_tokens // bs - policy.window_blocks)
    offloaded = geometry.num_layers * (middle_end - policy.sink_blocks) * block_bytes
    from_disk = min(ssd, offloaded) / ceilings.disk_read  # the SSD holds the coldest, never resident, blocks
    share = (ceilings.pcie_h2d / (ceilings.pcie_h2d + ceilings.cpu_stream)
             if config.split_ratio == "auto" else float(config.split_ratio))
    exact_total = geometry.bytes_per_token * batch * context_tokens
    resident = max(0, exact_total - offloaded)  # attention reads it from HBM in every mode
    steps = {
        "stream": max(offloaded / ceilings.pcie_h2d, from_disk, exact_total / ceilings.hbm),
        "split": max(share * offloaded / ceilings.pcie_h2d, (1 - share) * offloaded / ceilings.cpu_stream, from_disk,
                     (resident + share * offloaded) / ceilings.hbm),
        "speculative": max(speculative_share * offloaded / ceilings.uva_gather, speculative_share * from_disk,
                           (resident + speculative_share * offloaded) / ceilings.hbm),
    }
    if exact_total <= budgets.gpu_kv_bytes:
        steps["all-on-GPU"] = exact_total / ceilings.hbm
    return Plan(
        context=context_tokens, batch=batch, mode=config.mode, geometry=geometry,
        bytes_per_token=geometry.bytes_per_token * batch, total_bytes=total, gpu=gpu, host_bytes=host,
        ssd_bytes=ssd, offloaded_bytes=offloaded, gpu_share=share, speculative_share=speculative_share,
        step_seconds=steps, ssd_write_seconds=ssd / ceilings.disk_write,
    )


def estimate_weight_bytes(model_config, dtype: str = "auto") -> int:
    """The weights' bytes from a decoder config alone (embeddings, attention, gated MLP), so that
    `hetero plan` can resolve "auto" budgets as if the model were loaded
    (`MachineMemory.after_loading`). An estimate: norms and biases are left out."""
    c = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    if dtype == "auto":
        dtype = getattr(c, "dtype", None) or getattr(c, "torch_dtype", None) or "bfloat16"
    heads = c.num_attention_heads
    kv_heads = getattr(c, "num_key_value_heads", None) or heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // heads
    attention = c.hidden_size * head_dim * (2 * heads + 2 * kv_heads)
    mlp = 3 * c.hidden_size * c.intermediate_size
    embeddings = c.vocab_size * c.hidden_size * (1 if getattr(c, "tie_word_embeddings", False) else 2)
    return (c.num_hidden_layers * (attention + mlp) + embeddings) * _itemsize(dtype)


def _itemsize(dtype) -> int:
    name = str(dtype).removeprefix("torch.")
    if name in _DTYPE_BYTES:
        return _DTYPE_BYTES[name]
    import torch

    found = getattr(torch, name, None)
    if isinstance(found, torch.dtype):
        return found.itemsize
    raise ConfigError("kv_dtype", f"kv_dtype: the model's dtype {name!r} is not a torch dtype; set kv_dtype")
