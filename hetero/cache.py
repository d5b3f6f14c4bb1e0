"""HeteroCache: a transformers Cache whose KV lives in host memory, with a GPU-resident sink and window.

Every layer's KV is a sequence of blocks of `block_size` tokens (`KVLayout.block_shape`). A block's
home is the host pool; the GPU keeps the first blocks (the attention sink), the last complete
blocks (the recent window) and the block being filled. The rest, the middle, is fetched through
the pipeline's ring for each layer, one layer or more ahead, while the layer before computes.

`update` stores new tokens and returns them unchanged; the registered attention function calls
`attend`, which combines the past (resident and fetched blocks) with the new tokens exactly, by
log-sum-exp.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ._tmp_pools import GpuPool, HostPool
from .config import Budgets, OffloadConfig
from .errors import ConfigError
from .partial_attention import PartialMerger, attend
from .pipeline import FetchTicket, Pipeline


class CacheCapacityError(RuntimeError):
    """More tokens than the cache was sized for (prompt + max_new_tokens)."""


@dataclass(frozen=True)
class KVLayout:
    """Shape of one layer's KV blocks for a batch."""

    num_layers: int
    batch: int
    kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (2, self.batch, self.kv_heads, self.block_size, self.head_dim)

    @property
    def block_bytes(self) -> int:
        return math.prod(self.block_shape) * torch.finfo(self.dtype).bits // 8


@dataclass
class CacheStats:
    """What the cache held and moved; filled as it runs."""

    gpu_kv_bytes: int = 0
    host_kv_bytes: int = 0
    bytes_to_gpu: int = 0
    bytes_to_host: int = 0
    fetch_buffer_blocks: int = 0


@dataclass
class _Plan:
    """What a layer's attention reads of the past tokens [0, length)."""

    length: int
    resident: list[tuple[int, int]]  # (logical block, GPU slot)
    fetched: list[tuple[int, FetchTicket]]  # (first logical block, ticket)


@dataclass
class _LayerState:
    length: int = 0
    gpu_slots: dict[int, int] = field(default_factory=dict)  # logical block -> GPU slot
    plan: _Plan | None = None


class HeteroLayer(CacheLayerMixin):
    """Per-layer view that transformers' Cache API expects; the data lives in HeteroCache."""

    is_compileable = False
    is_sliding = False

    def __init__(self, state: _LayerState):
        super().__init__()
        self.state = state

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("HeteroCache.update stores tokens; layers are not updated directly")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.state.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.state.length

    def get_max_length(self) -> int:
        return -1


class HeteroCache(Cache):
    """The KV cache of one generation, across GPU and host memory.

    Args:
        config: the offload configuration.
        budgets: resolved byte budgets per tier.
        num_layers: decoder layers of the model.
        max_tokens: prompt plus new tokens: the host pool is sized for it.
        device: where the model computes ("GPU tier"); a CPU device runs everything synchronously.
    """

    def __init__(
        self,
        config: OffloadConfig,
        budgets: Budgets,
        num_layers: int,
        max_tokens: int,
        device: torch.device | str,
    ):
        self._states = [_LayerState() for _ in range(num_layers)]
        super().__init__(layers=[HeteroLayer(s) for s in self._states])
        self.config = config
        self.budgets = budgets
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.pipeline = Pipeline(self.device)
        self.layout: KVLayout | None = None
        self._fences: dict[int, object] = {}  # GPU slot -> offload fence of its last block
        bs = config.block_size
        self.sink_blocks = -(-config.sink_tokens // bs)
        self.window_blocks = -(-config.window_tokens // bs)
        self.blocks_per_layer = -(-max_tokens // bs)
        self.prompt_tokens: int | None = None
        self.decode_started_at: float | None = None
        self.progress = None

    # transformers' Cache interface -------------------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.layout is None:
            self._allocate(key_states)
        state = self._states[layer_idx]
        start, count = state.length, key_states.shape[2]
        if layer_idx == 0 and start == self.prompt_tokens and self.decode_started_at is None:
            self.pipeline.synchronize()
            self.decode_started_at = time.perf_counter()
        if start + count > self.max_tokens:
            raise CacheCapacityError(
                f"the cache holds at most {self.max_tokens} tokens (prompt + max_new_tokens); got {start + count}"
            )
        if state.plan is None:
            self._plan(layer_idx)  # the plan covers the past only: make it before storing new tokens
        self._store(layer_idx, state, key_states, value_states)
        state.length = start + count
        if layer_idx == 0 and self.progress is not None:
            self.progress(state.length)
        return key_states, value_states

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("hetero does not support beam search; use greedy or sampling")

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("hetero does not support cropping the cache (assisted decoding)")

    def batch_repeat_interleave(self, repeats: int):
        raise NotImplementedError("expand the inputs before generation instead of the cache")

    def batch_select_indices(self, indices):
        raise NotImplementedError("hetero does not support selecting batch rows of the cache")

    @property
    def batch_size(self) -> int:
        return -1 if self.layout is None else self.layout.batch

    # Attention ---------------------------------------------------------------------------------

    def attend(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key_new: torch.Tensor,
        value_new: torch.Tensor,
        key_valid: torch.Tensor | None,
        scale: float,
        sliding_window: int | None = None,
    ) -> torch.Tensor:
        """Attention of `query` [B, Hq, Lq, D] over the layer's past and the new tokens.

        `key_valid` is the [B, past + Lq] padding mask (True = attend), or None.
        Returns [B, Hq, Lq, D] in the query's dtype.
        """
        state = self._states[layer_idx]
        plan, state.plan = state.plan, None
        if plan is None:
            raise RuntimeError(f"layer {layer_idx}: attend() without update(); the past is unknown")
        lq = query.shape[2]
        past = plan.length
        q_pos = torch.arange(past, past + lq, device=query.device)
        window_q_pos = q_pos if sliding_window is not None else None
        merger = PartialMerger()
        bs = self.config.block_size
        if plan.resident:
            # Python-side indexing: building index tensors on the GPU would sync with the host.
            kv = torch.stack([self._gpu.slab[s] for _, s in plan.resident])
            key_pos = torch.cat([self._positions(b * bs, bs, query.device) for b, _ in plan.resident])
            valid = key_pos < past
            valid = valid[None, :] if key_valid is None else valid[None, :] & key_valid[:, key_pos.clamp_max(past - 1)]
            merger.add(*attend(query, *_as_kv(kv), scale, key_pos, window_q_pos, valid, sliding_window))
        for first_block, ticket in plan.fetched:
            kv = self._ring.acquire(ticket)
            key_pos = self._positions(first_block * bs, kv.shape[0] * bs, query.device)
            valid = None if key_valid is None else key_valid[:, key_pos]
            merger.add(*attend(query, *_as_kv(kv), scale, key_pos, window_q_pos, valid, sliding_window))
            self._ring.release(ticket)
        new_valid = None if key_valid is None else key_valid[:, past : past + lq]
        merger.add(*attend(query, key_new, value_new, scale, q_pos, q_pos, new_valid, sliding_window))
        self._prefetch_after(layer_idx)
        out, _ = merger.result()
        return out.to(query.dtype)

    @staticmethod
    def _positions(start: int, count: int, device) -> torch.Tensor:
        return torch.arange(start, start + count, device=device)

    # Storage -----------------------------------------------------------------------------------

    def _allocate(self, key_states: torch.Tensor) -> None:
        cfg = self.config
        batch, kv_heads, _, head_dim = key_states.shape
        dtype = key_states.dtype if cfg.kv_dtype == "auto" else getattr(torch, cfg.kv_dtype)
        layout = KVLayout(len(self._states), batch, kv_heads, head_dim, cfg.block_size, dtype)
        nl = layout.num_layers
        host_bytes = nl * self.blocks_per_layer * layout.block_bytes
        if host_bytes > self.budgets.cpu_kv_bytes:
            raise ConfigError(
                "cpu_kv_bytes",
                f"cpu_kv_bytes: the KV of {self.max_tokens} tokens needs {host_bytes} bytes of host memory, "
                f"the budget is {self.budgets.cpu_kv_bytes}; raise cpu_kv_bytes or shorten the generation",
            )
        # Sink, window, the block being filled, and window blocks awaiting their trim at the next plan.
        resident_slots = nl * (self.sink_blocks + 2 * self.window_blocks + 2)
        resident_bytes = resident_slots * layout.block_bytes
        ring_buffers = max(2, 2 * cfg.prefetch_layers)
        spare = self.budgets.gpu_kv_bytes - resident_bytes
        per_buffer = min(self.blocks_per_layer, spare // (ring_buffers * layout.block_bytes))
        if per_buffer < 1:
            need = resident_bytes + ring_buffers * layout.block_bytes
            raise ConfigError(
                "gpu_kv_bytes",
                f"gpu_kv_bytes: got {self.budgets.gpu_kv_bytes} bytes, expected at least {need} for the sink "
                f"({cfg.sink_tokens} tokens), window ({cfg.window_tokens} tokens) and {ring_buffers} fetch buffers "
                f"of one {cfg.block_size}-token block for {nl} layers; raise it or lower window_tokens/block_size",
            )
        pin = self.device.type == "cuda"
        self._host = HostPool(nl * self.blocks_per_layer, layout.block_shape, dtype, pin=pin)
        self._gpu = GpuPool(resident_slots, layout.block_shape, dtype, self.device)
        self._ring = self.pipeline.fetch_ring(ring_buffers, per_buffer, layout.block_shape, dtype)
        self.layout = layout

    def _store(self, layer_idx: int, state: _LayerState, keys: torch.Tensor, values: torch.Tensor) -> None:
        bs = self.config.block_size
        start, count = state.length, keys.shape[2]
        end = start + count
        last_window_block = end // bs - self.window_blocks  # first block of the final window
        pos = start
        while pos < end:
            block, offset = divmod(pos, bs)
            take = min(bs - offset, end - pos)
            slot = state.gpu_slots.get(block)
            if slot is None:
                slot = self._take_gpu_slot()
                state.gpu_slots[block] = slot
            dst = self._gpu.slab[slot]
            src = slice(pos - start, pos - start + take)
            dst[0, :, :, offset : offset + take] = keys[:, :, src].to(dst.dtype)
            dst[1, :, :, offset : offset + take] = values[:, :, src].to(dst.dtype)
            pos += take
            if offset + take == bs:
                host = self._host.slab[layer_idx * self.blocks_per_layer + block]
                self._fences[slot] = self.pipeline.offload(dst, host)
                newly_written = block * bs >= start
                if newly_written and block >= self.sink_blocks and block < last_window_block:
                    # Completed here and already outside the window: nothing planned reads its slot.
                    del state.gpu_slots[block]
                    self._gpu.free([slot])

    def _take_gpu_slot(self) -> int:
        slot = self._gpu.allocate(1)[0]
        self.pipeline.wait(self._fences.pop(slot, None))
        return slot

    # Planning ----------------------------------------------------------------------------------

    def _plan(self, layer_idx: int) -> _Plan:
        """Trim the layer's GPU residents to sink + window + tail, and queue fetches of the rest."""
        state = self._states[layer_idx]
        bs = self.config.block_size
        length = state.length
        complete = length // bs
        keep_from = max(self.sink_blocks, complete - self.window_blocks)
        for block in [b for b in state.gpu_slots if self.sink_blocks <= b < keep_from]:
            self._gpu.free([state.gpu_slots.pop(block)])
        resident = sorted((b, s) for b, s in state.gpu_slots.items() if b * bs < length)
        fetched = []
        if self.layout is not None:
            base = layer_idx * self.blocks_per_layer
            per_buffer = self._ring.blocks_per_buffer
            for first in range(self.sink_blocks, keep_from, per_buffer):
                last = min(first + per_buffer, keep_from)
                ticket = self._ring.submit(self._host.slab[base + first : base + last])
                fetched.append((first, ticket))
        plan = _Plan(length, resident, fetched)
        state.plan = plan
        return plan

    def _prefetch_after(self, layer_idx: int) -> None:
        n = len(self._states)
        for ahead in range(1, self.config.prefetch_layers + 1):
            nxt = (layer_idx + ahead) % n
            if self._states[nxt].plan is None:
                self._plan(nxt)

    # Reporting ---------------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        if self.layout is None:
            return CacheStats()
        gpu = self._gpu.slab.numel() * self._gpu.slab.element_size() + self._ring.bytes
        host = self._host.slab.numel() * self._host.slab.element_size()
        c = self.pipeline.counters
        return CacheStats(gpu, host, c.to_gpu, c.to_host, self._ring.blocks_per_buffer)

    def close(self) -> None:
        """Drop queued fetches and wait for transfers in flight."""
        if self.layout is not None:
            self._ring.cancel_pending()
        self.pipeline.synchronize()


def _as_kv(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 2, B, Hkv, bs, D] blocks -> keys and values [B, Hkv, n * bs, D]."""
    n, _, b, h, bs, d = blocks.shape
    kv = blocks.permute(1, 2, 3, 0, 4, 5).reshape(2, b, h, n * bs, d)
    return kv[0], kv[1]
