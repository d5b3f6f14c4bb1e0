"""HeteroCache: a transformers Cache whose KV lives in host memory, with a GPU-resident sink and window.

Every layer's KV is a sequence of blocks of `block_size` tokens (`KVLayout.block_shape`). A block's
home is the host pool; the GPU keeps the blocks `residency` says it keeps. The rest of a layer is
fetched through the pipeline's ring, one layer or more ahead, while the layer before computes; in
`split` mode the CPU attends over part of it where it lies, at the same time.

`update` stores new tokens and returns them unchanged; the registered attention function calls
`attend`, which combines the past with the new tokens exactly, by log-sum-exp.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


from . import gpu_decode
from .config import Budgets, OffloadConfig
from .errors import ConfigError
from .host_attention import attend_host_blocks, attend_host_unselected
from .gpu_kernels import Segment, gather_tokens
from .block_bounds import blocks_within, score_upper_bounds
from .held_rows import HeldRows
from .host_home import SPILL_SLOTS, HostHome
from .ssd_placement import SsdPlacement
from .storage import PAGE, GpuPool, HostPool, NvmeStore
from .token_sets import missing_tokens
from .partial_attention import PartialMerger, attend
from .pipeline import Pipeline
from .plan import size_gpu_tier
from .residency import LayerPlan, LayerResidency, ResidencyPolicy

# Whether a decode step's last layer plans the next step's first layers into the whole ring
# (`_planned_at_step_end`): a knob for bench/step_times.py's A/B.
LOOK_PAST_STEP_END = True
# Whether a split CPU part's kernel writes its result into the mailbox and raises the flag itself,
# so that the GPU goes on as soon as the kernel ends, before the host worker has the GIL back to
# return (`Pipeline.run_on_host`'s `posts`). Off: in split at 128K (bench/split_ab.py,
# bench/results/split/ab_gil_knobs_hostD_2026-12-02c.json) it ran 127.4 ms steps against 129.0 without,
# within the noise.
CPU_PART_POSTS_ITSELF = False


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
    bytes_read_by_cpu: int = 0  # KV the CPU attended over where it lies (split mode)
    blocks_per_fetch: int = 0
    ssd_kv_bytes: int = 0
    bytes_to_ssd: int = 0
    bytes_from_ssd: int = 0
    fetched_token_share: float | None = None  # speculative mode: tokens gathered per layer step / context
    split_share_start: float | None = None  # split mode: the GPU share the generation began with
    split_share: float | None = None  # split mode: the GPU share it ended with (refined, with "auto")
    verified_token_share: float | None = None  # speculative, verify: of the context, the tokens the own query added
    fetched_token_share_by_layer: dict[int, float] | None = None  # speculative: the same per layer (1 and up)
    reused_token_share: float | None = None  # reuse_rows: of the context, tokens attended from rows kept (not fetched)
    # speculation_debug: the share of each head's attention over the middle the fetched tokens hold (mean,
    # and per layer), and the share of the selected tokens the layer selected the step before too.
    fetched_attention_share: float | None = None
    fetched_attention_share_by_layer: dict[int, float] | None = None
    reselected_share: float | None = None
    # speculative mode with an SSD tier: of the SSD blocks within the spans selected from, the share
    # left out for not being in host memory in time ("skip"), and the blocks the placement moved.
    ssd_skipped_share: float | None = None
    ssd_swaps: int | None = None
    # split mode, "auto": each side's bytes/s and the CPU side's gap per step, as the refining steps
    # measured them (SplitTuner.rates)
    split_pcie_bytes_per_s: float | None = None
    split_cpu_bytes_per_s: float | None = None
    split_cpu_gap_s: float | None = None
    split_cpu_idle_s: float | None = None  # the CPU side's idle time per step between parts (SplitTuner.idle_seconds)


class HeteroLayer(CacheLayerMixin):
    """Per-layer view that transformers' Cache API expects; the data lives in HeteroCache."""

    is_compileable = False
    is_sliding = False

    def __init__(self, residency: LayerResidency):
        super().__init__()
        self.residency = residency

    def lazy_initialization(self, key_states, value_states) -> None:
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError("HeteroCache.update stores tokens; layers are not updated directly")

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.residency.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.residency.length

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
        gpu_share: in decode, the share of each layer's middle blocks fetched to the GPU; the CPU
            attends over the rest (1.0: all fetched, the `stream` mode).
        host_pools: makes the host pool, `(n_slots, block_shape, dtype, pin) -> pool`; a caller that
            generates repeatedly passes one that reuses the last pool rather than pin memory again
            (`HostPoolReuse`).
        speculator: in `speculative` mode, predicts which middle tokens each layer's decode step
            attends to (hetero.speculate); only those are gathered to the GPU.
        split_tuner: in `split` mode with "auto", refines `gpu_share` from the first decode steps'
            timings (hetero.split_tuner.SplitTuner); None keeps it fixed.
    """

    def __init__(
        self,
        config: OffloadConfig,
        budgets: Budgets,
        num_layers: int,
        max_tokens: int,
        device: torch.device | str,
        gpu_share: float = 1.0,
        host_pools=None,
        speculator=None,
        split_tuner=None,
    ):
        self._layers = [LayerResidency() for _ in range(num_layers)]
        super().__init__(layers=[HeteroLayer(r) for r in self._layers])
        self.config = config
        self.budgets = budgets
        self.max_tokens = max_tokens
        self.device = torch.device(device)
        self.gpu_share = gpu_share
        self._split_share_start = gpu_share
        self.split_tuner = split_tuner
        self._host_pools = host_pools or HostPoolReuse()
        self.speculator = speculator
        self._inputs: dict[int, torch.Tensor] = {}  # layer -> its attention input of this forward
        self._picks: dict[int, Pick] = {}  # layer -> the tokens gathered for its next decode step
        self._counts: dict[int, list[torch.Tensor]] = {}  # layer -> tokens gathered per (row, head), each step (speculative)
        self._verified: list[torch.Tensor] = []  # of them, those the layer's own query added (verify)
        self._verifying = speculator is not None and config.verify_share > 0 and not config.cpu_attends_remainder
        self._debugging = speculator is not None and config.speculation_debug
        self._reusing = speculator is not None and config.reuse_rows
        # cpu_remainder "bounded": per-block key minima and maxima choose the blocks the CPU reads.
        self._bounding = speculator is not None and config.cpu_remainder == "bounded" and not config.speculation_debug
        self._key_bounds: torch.Tensor | None = None  # [layers, B, Hkv, blocks, 2, D]
        self._blocks_read: list[torch.Tensor] = []  # "bounded": (row, head) blocks the CPU read, each layer step
        self._held: dict[int, HeldRows] = {}  # reuse_rows: layer -> its rows kept from the step before
        self._reused: list[torch.Tensor] = []  # reuse_rows: tokens attended from rows kept, each layer step
        self._attention_shares: list[tuple[int, torch.Tensor]] = []  # debug: (layer, share the fetched tokens hold)
        self._reuse: list[tuple[torch.Tensor, torch.Tensor]] = []  # debug: (tokens selected the step before too, selected)
        self._last_selected: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # debug: layer -> its last selection
        self._context_tokens: dict[int, int] = {}  # layer -> context tokens of the (step, row, head)s that gathered
        self._valid_from: torch.Tensor | None = None  # [B] first non-padding position, for speculation
        self._placement: SsdPlacement | None = None  # speculative mode with an SSD tier: its policy
        self._ssd_skipping = False  # ssd_miss "skip" with blocks on the SSD: set with the placement
        self.policy = ResidencyPolicy.from_tokens(config.block_size, config.sink_tokens, config.window_tokens)
        self.blocks_per_layer = -(-max_tokens // config.block_size)
        self.pipeline = Pipeline(self.device)
        if split_tuner is not None:
            self.pipeline.time_work()
        self.layout: KVLayout | None = None
        self._plans: dict[int, tuple[LayerPlan, list]] = {}  # layer -> its next plan and fetch tickets
        self._steps_decoded = 0
        self._host_waited = False  # a CPU part's result came back through the host thread (see _returns_on_gpu)
        # The GPU waits for the CPU's parts: their host jobs then wait for their inputs without a CUDA call.
        self._gpu_waits = config.cpu_part_wait == "gpu"
        self._fences: dict[int, object] = {}  # GPU slot -> offload fence of the last block it held
        self._home: HostHome | None = None  # none when the whole cache fits the GPU budget
        self._tables: dict[int, tuple[tuple, torch.Tensor]] = {}  # layer -> (resident blocks, slot table)
        self._bytes_read_by_cpu = 0
        self.prompt_tokens: int | None = None
        self.decode_started_at: float | None = None
        self.progress = None  # called with layer 0's token count after each update

    # transformers' Cache interface -------------------------------------------------------------

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        if self.layout is None:
            self._allocate(key_states)
        layer = self._layers[layer_idx]
        start, count = layer.length, key_states.shape[2]
        if layer_idx == 0 and start == self.prompt_tokens and self.decode_started_at is None:
            self.pipeline.synchronize()
            self.decode_started_at = time.perf_counter()
        if start + count > self.max_tokens:
            raise CacheCapacityError(
                f"the cache holds at most {self.max_tokens} tokens (prompt + max_new_tokens); got {start + count}"
            )
        if layer_idx not in self._plans:
            self._plan(layer_idx, decode=count == 1)  # the plan covers the past: make it before storing
        self._store(layer_idx, key_states, value_states)
        if self.speculator is not None:
            self.speculator.append_keys(layer_idx, key_states)
        layer.length = start + count
        if layer_idx == 0 and self.progress is not None:
            self.progress(layer.length)
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
        if layer_idx not in self._plans:
            raise RuntimeError(f"layer {layer_idx}: attend() without update(); the past is unknown")
        plan, tickets = self._plans.pop(layer_idx)
        lq = query.shape[2]
        past = plan.length
        pick = self._picks.pop(layer_idx, None)
        host_job = None
        if pick is not None:
            host_job = self._start_unselected_part(layer_idx, pick, query, key_valid, past, scale)
        elif plan.host is not None:
            host_job = self._start_host_part(layer_idx, plan.host, query, key_valid, past, scale)
        added = self._verify(layer_idx, pick, query, past) if pick is not None and self._verifying else None
        if pick is not None and self._placement is not None:
            self._placement.end_layer(layer_idx, self.pipeline)
        if self.speculator is not None and lq == 1:
            self._prefetch_after(layer_idx, decode=True)  # the next layer's gather overlaps this one's compute
        merger = PartialMerger()
        picked = []
        for part in (pick, added):
            if part is not None:
                self.pipeline.wait(part.ready)
                picked.append(part.segment)
        selected_lse = None
        if pick is not None and self._debugging:  # the fetched tokens' own log-sum-exp, to weigh them
            _, selected_lse = gpu_decode.attend_segments(query, [pick.segment], scale)
        if gpu_decode.applies(query, key_valid, sliding_window):
            self._attend_on_gpu(layer_idx, plan, tickets, query, scale, merger, picked)
        else:
            if picked:
                merger.add(*gpu_decode.attend_segments(query, picked, scale))
            self._attend_by_pieces(plan, tickets, query, key_new, value_new, key_valid, scale, sliding_window, merger)
        self._prefetch_after(layer_idx, decode=lq == 1)
        if host_job is not None:
            rest = self.pipeline.host_result(host_job)
            self._host_waited = True
            merger.add(*rest)
            if selected_lse is not None:
                self._attention_shares.append((layer_idx, _mass_share(selected_lse, rest[1])))
        if self._home is not None and self._home.ssd_blocks:
            self._home.read_by(layer_idx, self.pipeline.fence_here())
        if lq == 1 and layer_idx == len(self._layers) - 1:
            self._steps_decoded += 1
        out, _ = merger.result()
        return out.to(query.dtype)

    def _attend_on_gpu(self, layer_idx, plan, tickets, query, scale, merger, picked=()) -> None:
        """A decode step through the Triton kernel: the resident blocks in place (the new token is
        already stored in one of them), the tokens speculation gathered, then the fetched buffers."""
        resident = self._resident_after_store(layer_idx, plan)
        table = self._slot_table(layer_idx, resident)
        segments = [*picked, gpu_decode.pool_segment(self._gpu.slab, table, self._resident_tokens(resident, plan.length + 1))]
        pending = [ticket for _, ticket in tickets]
        while True:
            # Every ticket that already holds a buffer joins this call; the rest wait for the release.
            ready = []
            while pending and pending[0].buffer is not None:
                ready.append(pending.pop(0))
            segments += [gpu_decode.blocks_segment(self._ring.acquire(t)) for t in ready]
            merger.add(*gpu_decode.attend_segments(query, segments, scale))
            for ticket in ready:
                self._ring.release(ticket)
            if not pending:
                return
            segments = []

    def _resident_after_store(self, layer_idx: int, plan: LayerPlan) -> tuple[tuple[int, int], ...]:
        """The plan's resident blocks, plus the block the decoded token opened, if it opened one."""
        block = plan.length // self.config.block_size
        if plan.resident and plan.resident[-1][0] == block:
            return plan.resident
        return plan.resident + ((block, self._layers[layer_idx].gpu_slots[block]),)

    def _attend_by_pieces(self, plan, tickets, query, key_new, value_new, key_valid, scale, sliding_window, merger):
        """The PyTorch path (prefill, padding, sliding windows, no CUDA): one attention per piece."""
        lq = query.shape[2]
        past = plan.length
        q_pos = torch.arange(past, past + lq, device=query.device)
        window_q_pos = q_pos if sliding_window is not None else None
        bs = self.config.block_size
        if plan.resident:
            # Python-side indexing: building index tensors on the GPU would sync with the host.
            kv = torch.stack([self._gpu.slab[s] for _, s in plan.resident])
            key_pos = torch.cat([self._positions(b * bs, bs, query.device) for b, _ in plan.resident])
            # Only the last block may be partly filled: cut its empty tail rather than mask it, so
            # that the unmasked (flash) path applies.
            valid_tokens = self._resident_tokens(plan.resident, past)
            keys, values = (t[:, :, :valid_tokens] for t in _as_kv(kv))
            key_pos = key_pos[:valid_tokens]
            valid = None if key_valid is None else key_valid[:, key_pos]
            merger.add(*attend(query, keys, values, scale, key_pos, window_q_pos, valid, sliding_window))
        for first, ticket in tickets:
            kv = self._ring.acquire(ticket)
            key_pos = self._positions(first * bs, kv.shape[0] * bs, query.device)
            valid = None if key_valid is None else key_valid[:, key_pos]
            merger.add(*attend(query, *_as_kv(kv), scale, key_pos, window_q_pos, valid, sliding_window))
            self._ring.release(ticket)
        new_valid = None if key_valid is None else key_valid[:, past : past + lq]
        merger.add(*attend(query, key_new, value_new, scale, q_pos, q_pos, new_valid, sliding_window))

    def _slot_table(self, layer_idx: int, resident: tuple[tuple[int, int], ...]) -> torch.Tensor:
        """The resident blocks' GPU slots in block order, as a device tensor rebuilt only when they change."""
        cached = self._tables.get(layer_idx)
        if cached is None or cached[0] != resident:
            slots = torch.tensor([s for _, s in resident], dtype=torch.int32)
            if self.device.type == "cuda":
                slots = slots.pin_memory()  # a pageable source would make the copy wait for the stream
            cached = self._tables[layer_idx] = (resident, slots.to(self.device, non_blocking=True))
        return cached[1]

    def _resident_tokens(self, resident: tuple[tuple[int, int], ...], length: int) -> int:
        """Tokens of the resident blocks of a layer of `length` tokens; only the last block may be partly filled."""
        bs = self.config.block_size
        last = resident[-1][0]
        return len(resident) * bs - max(0, (last + 1) * bs - length)

    def _start_unselected_part(self, layer_idx, pick, query, key_valid, past, scale):
        """Queue the CPU's attention over the middle tokens speculation did not select (cpu_remainder
        "all", or "bounded": in the blocks worth reading)."""
        if pick.on_host is None:
            return None
        lo, hi = pick.span
        blocks = None
        if self._bounding:
            blocks = self._blocks_worth_reading(layer_idx, query, lo, hi, scale)
            self._blocks_read = _tally(self._blocks_read, blocks.sum(dtype=torch.int64))  # per (row, head)
        else:
            self._bytes_read_by_cpu += (hi - lo) * self.layout.block_bytes // self.config.block_size
        valid_from = None if key_valid is None else (~key_valid[:, :past]).sum(-1)
        (q_host, valid_host, blocks_host), ready = self.pipeline.to_host(query, valid_from, blocks,
                                                                         numbered=self._gpu_waits)
        (selected, count), picked = pick.on_host
        return self.pipeline.run_on_host(
            [picked, ready], attend_host_unselected, q_host, self._home.slab, self._home.tables[layer_idx],
            lo, hi, selected, count, scale, valid_host, blocks_host, returns=self._returns_on_gpu(query),
        )

    def _blocks_worth_reading(self, layer_idx, query, lo, hi, scale) -> torch.Tensor:
        """cpu_remainder "bounded": the blocks of [lo, hi) where some key may score within `alpha` of
        the best block's bound (hetero.block_bounds); bool [B, Hkv, blocks]."""
        bs = self.config.block_size
        bounds = self._key_bounds[layer_idx, :, :, lo // bs : hi // bs]
        b, kv_heads = bounds.shape[:2]
        upper = score_upper_bounds(query[:, :, -1].view(b, kv_heads, -1, query.shape[-1]), bounds, scale)
        return blocks_within(upper, self.config.alpha)

    def _start_host_part(self, layer_idx, blocks, query, key_valid, past, scale):
        """Queue the CPU's attention over `blocks` of the layer; returns the pending job."""
        first, end = blocks
        self._bytes_read_by_cpu += (end - first) * self.layout.block_bytes
        valid_from = None if key_valid is None else (~key_valid[:, :past]).sum(-1)
        (q_host, valid_host), ready = self.pipeline.to_host(query, valid_from, numbered=self._gpu_waits)
        table = self._home.tables[layer_idx]
        return self.pipeline.run_on_host(
            ready, attend_host_blocks, q_host, self._home.slab, table, first, end, scale, valid_host,
            work_bytes=(end - first) * self.layout.block_bytes, returns=self._returns_on_gpu(query),
            posts=CPU_PART_POSTS_ITSELF,
        )

    def _returns_on_gpu(self, query: torch.Tensor) -> tuple | None:
        """With cpu_part_wait "gpu", the shapes of a CPU part's result, so that the GPU (not the host
        thread) waits for it; None otherwise, and for the generation's first CPU part, whose result
        the host thread waits for. Its layer launches a decode layer's kernels for the first time
        (the next layers' are the same, and the step's end runs what the prefill's end ran): CUDA
        loads a kernel lazily at its first launch, and the load waits for the GPU to idle, which a
        pending wait for the host would hold off. (The whole first decode step used to wait on the
        host: 294-299 ms against 136-146 for the steps after, in two small-card suite runs,
        bench/results/split/suite_small_card_host{O,P}_2026-12-02e.json.)"""
        if not self._gpu_waits or not self._host_waited:
            return None
        return _partial_shapes(query)

    @staticmethod
    def _positions(start: int, count: int, device) -> torch.Tensor:
        return torch.arange(start, start + count, device=device)

    # Storage -----------------------------------------------------------------------------------

    def _allocate(self, key_states: torch.Tensor) -> None:
        cfg = self.config
        batch, kv_heads, _, head_dim = key_states.shape
        dtype = key_states.dtype if cfg.kv_dtype == "auto" else getattr(torch, cfg.kv_dtype)
        layout = KVLayout(len(self._layers), batch, kv_heads, head_dim, cfg.block_size, dtype)
        nl, bpl = layout.num_layers, self.blocks_per_layer
        if self.budgets.gpu_kv_bytes >= nl * (bpl + 2) * layout.block_bytes:
            # Everything fits the GPU budget: every block stays resident and nothing moves (nor is
            # there anything to speculate about).
            self.speculator = None
            self.policy = ResidencyPolicy(cfg.block_size, sink_blocks=bpl, window_blocks=0)
            self._gpu = GpuPool(nl * self.policy.slots_per_layer(), layout.block_shape, dtype, self.device)
            self._ring = self.pipeline.fetch_ring(1, 1, layout.block_shape, dtype)
            self.layout = layout
            return
        speculation = self._speculation_bytes(layout)
        extra = f", the speculative mode's partial keys and gather buffers ({speculation} bytes)" if speculation else ""
        tier = size_gpu_tier(cfg, nl, bpl, layout.block_bytes, self.budgets.gpu_kv_bytes, speculation, extra)
        self.policy = replace(self.policy, window_blocks=tier.window_blocks)
        home = self._home = self._make_home(layout)
        self._gpu = GpuPool(tier.resident_blocks, layout.block_shape, dtype, self.device)
        self._ring = self.pipeline.fetch_ring(tier.ring_buffers, tier.blocks_per_buffer, layout.block_shape, dtype)
        if self.speculator is not None:
            self._home_tables_gpu = torch.from_numpy(home.all_tables).to(self.device)
            if home.ssd_blocks and not cfg.cpu_attends_remainder:  # else the CPU reads every block anyway
                self._placement = SsdPlacement(nl, bpl, cfg.block_size, self.device, cfg.ssd_rebalance_steps)
                self._ssd_skipping = cfg.ssd_miss == "skip"
            width = self.speculator.max_selected(self.max_tokens)
            shape = (2, batch, kv_heads, width, head_dim)
            # With reuse_rows, each layer keeps its own rows, and one buffer takes what is fetched on the way.
            self._gather_buffers = [torch.empty(shape, dtype=dtype, device=self.device)
                                    for _ in range(1 if self._reusing else 2)]
            if self._reusing:
                self._held = {layer: HeldRows.empty(batch, kv_heads, width, head_dim, dtype, self.device)
                              for layer in range(1, nl)}
            if self._bounding:
                self._key_bounds = torch.zeros(nl, batch, kv_heads, bpl, 2, head_dim, dtype=dtype, device=self.device)
            # One more for the tokens a layer's own query adds: they are gathered while it waits.
            self._verify_buffer = torch.empty(shape, dtype=dtype, device=self.device) if self._verifying else None
            self.speculator.begin(batch, self.max_tokens)
        self.layout = layout

    def _speculation_bytes(self, layout: KVLayout) -> int:
        """GPU memory the speculative mode takes from the KV budget: partial keys, gather buffers, and
        with reuse_rows every layer's kept rows."""
        if self.speculator is None:
            return 0
        partial = self.speculator.partial_key_bytes(layout.batch, self.max_tokens, layout.dtype)
        width = self.speculator.max_selected(self.max_tokens)
        buffers = (1 if self._reusing else 2) + (1 if self._verifying else 0)
        held = 0
        if self._reusing:
            held = (layout.num_layers - 1) * HeldRows.nbytes(layout.batch, layout.kv_heads, width, layout.head_dim, layout.dtype)
        bounds = 0
        if self._bounding:
            bounds = layout.num_layers * self.blocks_per_layer * 2 * layout.batch * layout.kv_heads * layout.head_dim * layout.dtype.itemsize
        return partial + held + bounds + buffers * 2 * layout.batch * layout.kv_heads * width * layout.head_dim * layout.dtype.itemsize

    def _make_home(self, layout: KVLayout) -> HostHome:
        """The host pool, and the SSD store for the blocks the host budget cannot hold."""
        cfg = self.config
        nl, bpl, block_bytes = layout.num_layers, self.blocks_per_layer, layout.block_bytes
        depth = 1 if self.speculator is not None else cfg.prefetch_layers
        areas = depth + 2
        ssd_blocks = 0
        if nl * bpl * block_bytes > self.budgets.cpu_kv_bytes:
            ssd_blocks = self._ssd_blocks_needed(layout, areas)
        n_slots = HostHome.slots_needed(nl, bpl, ssd_blocks, areas)
        pool = self._host_pools(n_slots, layout.block_shape, layout.dtype, self.device.type == "cuda")
        store = None
        if ssd_blocks:
            store = NvmeStore(cfg.ssd_dir, nl * ssd_blocks, layout.block_shape, layout.dtype, io_threads=cfg.io_threads)
        # The run ends where the blocks that ever leave the GPU do.
        ssd_first = max(self.policy.sink_blocks, self._leaving_end() - ssd_blocks)
        return HostHome(pool, nl, bpl, self.policy.sink_blocks, ssd_blocks, store, self.pipeline, areas,
                        ssd_first=ssd_first)

    def _leaving_end(self) -> int:
        return self.policy.leaving_end(self.blocks_per_layer)

    def _ssd_blocks_needed(self, layout: KVLayout, areas: int) -> int:
        """Blocks per layer that must live on the SSD for the host budget to suffice (or a clear error)."""
        cfg = self.config
        nl, bpl, block_bytes = layout.num_layers, self.blocks_per_layer, layout.block_bytes
        need = nl * bpl * block_bytes
        if cfg.ssd_dir is None:
            raise ConfigError(
                "cpu_kv_bytes",
                f"cpu_kv_bytes: the KV of {self.max_tokens} tokens needs {need} bytes of host memory, the budget "
                f"is {self.budgets.cpu_kv_bytes}; raise cpu_kv_bytes, set ssd_dir and ssd_kv_bytes to keep the "
                "rest on an SSD, or shorten the generation",
            )
        host_slots = self.budgets.cpu_kv_bytes // block_bytes
        middle = self._leaving_end() - self.policy.sink_blocks  # blocks that ever leave the GPU
        ssd_blocks = -(-(HostHome.slots_needed(nl, bpl, 0) + SPILL_SLOTS - host_slots) // max(1, nl - areas))
        if nl <= areas or ssd_blocks > middle:
            least = HostHome.slots_needed(nl, bpl, max(0, middle), areas, SPILL_SLOTS) * block_bytes
            raise ConfigError(
                "cpu_kv_bytes",
                f"cpu_kv_bytes: got {self.budgets.cpu_kv_bytes} bytes; with the SSD holding what it can, the host "
                f"still needs {least} bytes (the sink, the window and staging for {nl} layers); raise cpu_kv_bytes",
            )
        ssd_need = nl * ssd_blocks * -(-block_bytes // PAGE) * PAGE
        if ssd_need > self.budgets.ssd_kv_bytes:
            raise ConfigError(
                "ssd_kv_bytes",
                f"ssd_kv_bytes: the KV beyond the host budget needs {ssd_need} bytes on the SSD, the budget is "
                f"{self.budgets.ssd_kv_bytes}; raise ssd_kv_bytes or cpu_kv_bytes",
            )
        return ssd_blocks

    def _store(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write new tokens into GPU blocks; each completed block is copied to its host home."""
        layer = self._layers[layer_idx]
        bs = self.config.block_size
        start, count = layer.length, keys.shape[2]
        end = start + count
        window_start = end // bs - self.policy.window_blocks  # first block of the window once stored
        pos = start
        while pos < end:
            block, offset = divmod(pos, bs)
            take = min(bs - offset, end - pos)
            slot = layer.gpu_slots.get(block)
            if slot is None:
                slot = layer.gpu_slots[block] = self._take_gpu_slot()
                # A block being filled is read, masked, before it is full: stale bytes there may be NaN,
                # and masking multiplies them by zero, which keeps a NaN.
                if offset + take < bs:
                    self._gpu.slab[slot].zero_()
            dst = self._gpu.slab[slot]
            src = slice(pos - start, pos - start + take)
            dst[0, :, :, offset : offset + take] = keys[:, :, src]
            dst[1, :, :, offset : offset + take] = values[:, :, src]
            pos += take
            if offset + take < bs or self._home is None:
                continue
            if self._key_bounds is not None:
                bounds = self._key_bounds[layer_idx, :, :, block]
                torch.amin(dst[0], dim=2, out=bounds[:, :, 0])
                torch.amax(dst[0], dim=2, out=bounds[:, :, 1])
            fence = self._fences[slot] = self.pipeline.offload(dst, self._home.write_target(layer_idx, block))
            self._home.written(layer_idx, block, fence)
            if block * bs >= start and self.policy.sink_blocks <= block < window_start:
                # Completed by this update and already outside the window: no plan reads its slot.
                del layer.gpu_slots[block]
                self._gpu.free([slot])

    def _take_gpu_slot(self) -> int:
        slot = self._gpu.allocate(1)[0]
        self.pipeline.wait(self._fences.pop(slot, None))
        return slot

    # Planning ----------------------------------------------------------------------------------

    def _plan(self, layer_idx: int, decode: bool) -> None:
        """Plan layer `layer_idx`'s next attention and queue its fetches."""
        layer = self._layers[layer_idx]
        self._gpu.free(layer.trim(self.policy))
        # Speculation predicts layer l from layer l - 1's input: layer 0 has none and is fetched whole.
        speculate = self.speculator is not None and decode and layer_idx > 0 and self._home is not None
        if decode and layer_idx == 0 and self.split_tuner is not None:
            self._retune_split()  # a step boundary: every layer of the step plans with one share
        share = 0.0 if speculate else self.gpu_share if decode else 1.0
        plan = layer.plan(self.policy, self._ring.blocks_per_buffer, share)
        tickets = []
        left_out = None
        if self._home is not None and (plan.fetch or plan.host):
            home = self._home
            if decode and layer_idx == 0 and self._placement is not None:
                self._rebalance_ssd(plan.length)
            if speculate and self._ssd_skipping and plan.host is not None:
                # Its SSD blocks read ahead that have landed; the others are left out of the selection.
                left_out = self._placement.left_out(home, layer_idx, *plan.host, home.take_staged(layer_idx))
            else:
                home.wait_staged(layer_idx)  # its SSD blocks read ahead (speculating: the rest once selected)
            nxt = (layer_idx + 1) % len(self._layers)
            # Speculating, a layer reads ahead the SSD blocks it selected at the step before.
            only = self._placement.read_ahead(nxt) if self._placement is not None and decode and nxt > 0 else None
            home.stage(nxt, only)  # the next layer's, while this one computes
            for first, last in plan.fetch:
                for block, slot, n in home.runs(layer_idx, first, last):
                    tickets.append((block, self._ring.submit(home.slab[slot : slot + n])))
        if speculate and plan.host is not None:
            self._picks[layer_idx] = self._pick(layer_idx, plan, left_out)
        self._plans[layer_idx] = (plan, tickets)

    def _read_selected_ssd_blocks(self, layer_idx: int) -> None:
        """ssd_miss "wait": read the SSD blocks the layer's selection so far holds and were not read
        ahead, before its gather (one wait on the GPU for the selection)."""
        if not self._ssd_skipping:
            self._home.read_now(layer_idx, self._placement.selected_now(layer_idx, self.pipeline))

    def _rebalance_ssd(self, length: int) -> None:
        """A decode step's boundary: the speculative mode's SSD placement may move blocks now."""
        movable_end = length // self.config.block_size - self.policy.window_blocks  # complete, outside the window
        if self._placement.step_boundary(self._home, self.pipeline, movable_end):
            self._home_tables_gpu.copy_(torch.from_numpy(self._home.all_tables))

    def _retune_split(self) -> None:
        """Fold the work measured since the last step boundary into the GPU share (split, "auto")."""
        self.gpu_share = self.split_tuner.observe(self.pipeline.take_work_times())
        if self.split_tuner.done:
            self.pipeline.time_work(False)

    def _pick(self, layer_idx: int, plan: LayerPlan, left_out: torch.Tensor | None = None) -> "Pick":
        """Select the middle tokens layer `layer_idx` will attend to and gather them from host memory;
        never the positions `left_out` marks (blocks on the SSD not read in time, "skip")."""
        bs = self.config.block_size
        lo, hi = plan.host[0] * bs, plan.host[1] * bs
        valid_from = self._valid_from
        exact = self.config.cpu_attends_remainder  # the CPU's ranges between the selected need them in order
        ahead = 1 - self.config.verify_share if self._verifying else 1.0  # the rest is the own query's
        selected, count = self.speculator.select(layer_idx, self._inputs[layer_idx - 1], plan.length, lo, hi,
                                                 valid_from, ordered=exact, budget=ahead, excluded=left_out)
        if self._placement is not None:
            self._placement.count(layer_idx, selected, count, first=True)
            self._read_selected_ssd_blocks(layer_idx)
        table = self._home_tables_gpu[layer_idx, self._home.area_of[layer_idx]]
        if self._reusing:
            buffer, ready, fetched = self._refill(layer_idx, table, selected, count, lo, hi)
        else:
            buffer = self._gather_buffers[layer_idx % 2][:, :, :, : selected.shape[2]]
            ready = self.pipeline.gather(gather_tokens, self._home.slab, table, selected, count, buffer)
            fetched = count
        self._counts[layer_idx] = _tally(self._counts.get(layer_idx, []), fetched)
        self._context_tokens[layer_idx] = self._context_tokens.get(layer_idx, 0) + plan.length * count.numel()
        on_host = self.pipeline.to_host(selected, count, numbered=self._gpu_waits) if exact else None
        if self._debugging:
            self._note_reuse(layer_idx, selected, count, lo, hi)
        return Pick(buffer, count, ready, (lo, hi), on_host, selected, left_out)

    def _refill(self, layer_idx, table, selected, count, lo, hi):
        """reuse_rows: the layer's kept rows take the new selection, fetching only the tokens they lack.
        Returns the rows (the first `count` hold the selection), their fence and the tokens fetched."""
        held = self._held[layer_idx]
        result = []

        def refill(*args):  # on the copy stream: the counts it makes are read only after it
            fetched = held.refill(*args)
            result.append((fetched, count - fetched))

        ready = self.pipeline.gather(refill, self._home.slab, table, selected, count, self._gather_buffers[0], lo, hi)
        fetched, reused = result[0]
        if max(len(self._reused), len(self._counts.get(layer_idx, []))) >= 4095:
            self.pipeline.synchronize()  # the fold below reads counts the copy stream wrote
        self._reused = _tally(self._reused, reused)
        return held.buffer[:, :, :, : held.width], ready, fetched

    def _note_reuse(self, layer_idx: int, selected: torch.Tensor, count: torch.Tensor, lo: int, hi: int) -> None:
        """Debug: how many of the tokens selected now the layer also selected at the step before."""
        last = self._last_selected.get(layer_idx)
        self._last_selected[layer_idx] = (selected, count)
        if last is not None:
            _, new = missing_tokens(selected, count, *last, lo, hi)  # the step before's all lie in [lo, hi)
            total = count.sum(dtype=torch.int64)
            self._reuse.append((total - new.sum(dtype=torch.int64), total))

    def _verify(self, layer_idx: int, pick: "Pick", query: torch.Tensor, position: int) -> "Pick":
        """Select again with the layer's own query [B, Hq, 1, D], now that it exists, and gather the
        best tokens speculation (from the layer before) did not fetch, while `max_tokens` allows."""
        lo, hi = pick.span
        missing, count = self.speculator.select(layer_idx, None, position, lo, hi, self._valid_from, ordered=False,
                                                query=query[:, :, 0], held=(pick.selected, pick.count),
                                                excluded=pick.left_out)
        if self._placement is not None:
            self._placement.count(layer_idx, missing, count, first=False)
            self._read_selected_ssd_blocks(layer_idx)
        buffer = self._verify_buffer[:, :, :, : missing.shape[2]]
        table = self._home_tables_gpu[layer_idx, self._home.area_of[layer_idx]]
        ready = self.pipeline.gather(gather_tokens, self._home.slab, table, missing, count, buffer)
        self._counts[layer_idx] = _tally(self._counts[layer_idx], count)
        self._verified = _tally(self._verified, count)
        return Pick(buffer, count, ready, pick.span, None, missing)

    def observe_input(self, layer_idx: int, hidden: torch.Tensor, key_valid: torch.Tensor | None) -> None:
        """Called before layer `layer_idx`'s attention with its input: speculation reads it."""
        if self.speculator is not None:
            self._inputs[layer_idx] = hidden
            if layer_idx == 0:
                self._valid_from = None if key_valid is None else (~key_valid).sum(-1).to(torch.int32)

    def _prefetch_after(self, layer_idx: int, decode: bool) -> None:
        """Plan the next `prefetch_layers` layers (wrapping to the next forward) so their fetches start.

        Speculation plans only the next layer: it needs the input of the layer before. At a decode
        step's last layer, the next step's first layers fill the whole ring (`_planned_at_step_end`)."""
        n = len(self._layers)
        depth = 1 if self.speculator is not None and decode else self.config.prefetch_layers
        if decode and layer_idx == n - 1:
            depth = max(depth, self._planned_at_step_end())
        for ahead in range(1, depth + 1):
            nxt = (layer_idx + ahead) % n
            if nxt not in self._plans:
                self._plan(nxt, decode)

    def _planned_at_step_end(self) -> int:
        """Layers of the next step planned at a decode step's last layer. The host thread waits for
        the step to end before it runs the next (generate reads the sampled token), so a fetch it
        has not queued by then starts only once the next step reaches the layer before: the copy
        engine would idle meanwhile. Queued now, they take each buffer the moment it is read.
        Not with speculation (a layer's selection needs the layer before's input), nor with an SSD
        tier (its staging areas are sized for `prefetch_layers`)."""
        if not LOOK_PAST_STEP_END or self.speculator is not None or self._home is None or self._home.ssd_blocks:
            return 0
        return min(len(self._layers), self._ring.buffers)

    # Reporting ---------------------------------------------------------------------------------

    @property
    def stats(self) -> CacheStats:
        if self.layout is None:
            return CacheStats()
        gpu = self._gpu.slab.numel() * self._gpu.slab.element_size() + self._ring.bytes
        home = self._home
        host = 0 if home is None else home.host_slots * self.layout.block_bytes
        ssd = (0, 0, 0) if home is None else (home.ssd_bytes, home.bytes_to_ssd, home.bytes_from_ssd)
        share, by_layer, gathered = None, None, 0
        context = sum(self._context_tokens.values())
        if self._counts and context:
            fetched = {layer: int(torch.stack(c).sum(dtype=torch.int64)) for layer, c in sorted(self._counts.items())}
            by_layer = {layer: n / self._context_tokens[layer] for layer, n in fetched.items()}
            share = sum(fetched.values()) / context
            lay = self.layout
            gathered = sum(fetched.values()) * 2 * lay.head_dim * torch.finfo(lay.dtype).bits // 8  # K and V rows over PCIe
        reused = None
        if self._reusing and context:
            reused = int(torch.stack(self._reused).sum(dtype=torch.int64)) / context if self._reused else 0.0
        verified = None
        if self._verifying and context:
            verified = int(torch.stack(self._verified).sum(dtype=torch.int64)) / context if self._verified else 0.0
        cpu_bytes = self._bytes_read_by_cpu
        if self._blocks_read:  # a block's bytes hold every row and head
            lay = self.layout
            cpu_bytes += int(torch.stack(self._blocks_read).sum()) * lay.block_bytes // (lay.batch * lay.kv_heads)
        c = self.pipeline.counters
        split = (self._split_share_start, self.gpu_share) if self.config.mode == "split" else (None, None)
        stats = CacheStats(gpu, host, c.to_gpu + gathered, c.to_host, cpu_bytes, self._ring.blocks_per_buffer, *ssd, share, *split, verified)
        stats.fetched_token_share_by_layer = by_layer
        stats.reused_token_share = reused
        rates = self.split_tuner.rates() if self.split_tuner is not None else None
        stats.split_pcie_bytes_per_s, stats.split_cpu_bytes_per_s, stats.split_cpu_gap_s = rates or (None, None, None)
        stats.split_cpu_idle_s = self.split_tuner.idle_seconds() if self.split_tuner is not None else None
        if self._placement is not None:
            stats.ssd_skipped_share = self._placement.skipped_share
            stats.ssd_swaps = self._placement.swaps
        return self._debug_stats(stats) if self._debugging else stats

    def _debug_stats(self, stats: CacheStats) -> CacheStats:
        """speculation_debug's figures, added to `stats`."""
        if self._attention_shares:
            by_layer: dict[int, list[torch.Tensor]] = {}
            for layer, share in self._attention_shares:
                by_layer.setdefault(layer, []).append(share)
            means = {layer: float(torch.stack(v).mean()) for layer, v in sorted(by_layer.items())}
            stats.fetched_attention_share = float(torch.stack([s for _, s in self._attention_shares]).mean())
            stats.fetched_attention_share_by_layer = means
        if self._reuse:
            again, total = (int(torch.stack(v).sum()) for v in zip(*self._reuse))
            stats.reselected_share = again / total if total else None
        return stats

    def close(self) -> None:
        """Drop queued fetches and wait for transfers in flight."""
        if self.layout is not None:
            self._ring.cancel_pending()
        try:
            self.pipeline.synchronize()
            self.pipeline.close()  # raises a host job's error, if one failed
        finally:
            if self._home is not None:
                self._home.close()


@dataclass
class Pick:
    """The tokens speculation selected for one layer's decode step, gathered (or on their way) to the GPU."""

    buffer: torch.Tensor  # [2, B, Hkv, N, D]; the first `count` rows of each head hold the selected tokens
    count: torch.Tensor  # int32 [B, Hkv]
    ready: object  # fence of the gather
    span: tuple[int, int]  # [lo, hi): the middle positions selected from
    on_host: tuple | None  # ((selected, count) in host memory, fence) when the CPU attends over the rest
    selected: torch.Tensor  # int32 [B, Hkv, N]: the positions, the first `count` of each row
    left_out: torch.Tensor | None = None  # bool [hi - lo]: positions no selection may take (SSD, "skip")

    @property
    def segment(self) -> Segment:
        return gpu_decode.gathered_segment(self.buffer, self.count)


class HostPoolReuse:
    """Makes host pools, keeping the last one so that repeated generations do not pin memory again."""

    def __init__(self):
        self._pool: HostPool | None = None

    @property
    def held_bytes(self) -> int:
        """Host memory the kept pool holds."""
        return 0 if self._pool is None else self._pool.budget

    def __call__(self, n_slots: int, block_shape, dtype: torch.dtype, pin: bool) -> HostPool:
        if self._pool is None or not self._pool.fits(n_slots, block_shape, dtype, pin):
            if self._pool is not None:
                self._pool.close()
            self._pool = None
            block_bytes = math.prod(block_shape) * torch.finfo(dtype).bits // 8
            # Page-aligned slots when blocks are whole pages (the SSD tier reads into them), else packed:
            # the slab stays C-contiguous either way, which runs of slots and the CPU kernel need.
            align = PAGE if block_bytes % PAGE == 0 else 1
            self._pool = HostPool(n_slots, block_shape, dtype, pin, slot_align=align)
        return self._pool


def _partial_shapes(query: torch.Tensor) -> tuple:
    """The (shape, dtype) of a partial attention result for `query` [B, Hq, Lq, D]: out and lse, float32."""
    return (tuple(query.shape), torch.float32), (tuple(query.shape[:3]), torch.float32)


def _mass_share(lse: torch.Tensor, rest_lse: torch.Tensor) -> torch.Tensor:
    """The mean share of each head's attention that the tokens of `lse` hold beside those of `rest_lse`
    (softmax masses exp(lse)); a head with neither holds all of it."""
    share = torch.sigmoid(lse.float() - rest_lse.float())
    return torch.where(torch.isnan(share), torch.ones_like(share), share).mean()


def _tally(counts: list[torch.Tensor], count: torch.Tensor) -> list[torch.Tensor]:
    """Keep a layer step's token counts, summed only when stats are read: no kernel per layer and step;
    a long generation folds them so that the list stays short."""
    counts.append(count)
    if len(counts) >= 4096:
        counts = [torch.stack(counts).sum(dim=0, dtype=torch.int64)]
    return counts


def _as_kv(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[n, 2, B, Hkv, bs, D] blocks -> keys and values [B, Hkv, n * bs, D]."""
    n, _, b, h, bs, d = blocks.shape
    kv = blocks.permute(1, 2, 3, 0, 4, 5).reshape(2, b, h, n * bs, d)
    return kv[0], kv[1]
