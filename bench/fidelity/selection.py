"""Approximate decode attention over a selection of the past tokens, registered with transformers.

A forward with no past (the prefill) is exact causal attention (SDPA). A forward over a past (one
decode step, or several teacher-forced tokens at once, which is the same computation row by row)
lets each query row attend only to its selected keys: the sink, the recent window (and the row's own
token), and `fetch` more tokens per KV head from the middle between them, chosen by a policy:

    window  the tokens just before the window (a longer window: the naive baseline)
    random  a uniform random draw, fresh for each row, layer and KV head
    oracle  the tokens with the most true attention probability, summed over the KV head's query
            heads: the best a selection of that size can do, the ceiling for speculation
    full    every token (a check that this function is exact)

The sink and the window are hetero's, block for block: with `block` > 1 the sink is the first
ceil(sink / block) blocks and the window the last ceil(window / block) complete blocks before the
row's own block, plus that block's tokens up to the row (what `HeteroCache` keeps on the GPU); the
middle [lo, hi) between them is what speculation selects from. With block 1 the window is the
`window` tokens before the row.

A selection is per KV head because that is what a fetch moves. While it runs, the function adds up
per layer the attention-mass recall: the share of each query head's true attention probability
that falls on the selected tokens (sink and window included), and the middle recall: the share of
the middle's attention probability that the fetched tokens cover (the definition the speculative
rows are measured by).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

ATTENTION_NAME = "fidelity_select"
POLICIES = ("window", "random", "oracle", "full")
ROWS_PER_CHUNK = 64  # query rows scored at once: bounds the [B, H, rows, keys] temporaries


@dataclass(frozen=True)
class Selection:
    """Which past tokens a query row attends to: sink + window, plus `fetch` tokens chosen by `policy`."""

    policy: str
    sink: int
    window: int
    fetch: int
    block: int = 1  # hetero's block size: the sink and window are whole blocks, as its cache keeps them

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy: got {self.policy!r}, expected one of {', '.join(POLICIES)}")
        if self.block < 1:
            raise ValueError(f"block: got {self.block}, expected >= 1")

    def middle(self, q_pos: torch.Tensor) -> tuple[int, torch.Tensor]:
        """The middle [lo, hi) of each row at positions `q_pos`: lo an int, hi [rows] (hetero's span)."""
        blocks = -(-self.sink // self.block)
        lo = blocks * self.block
        hi = ((q_pos // self.block - -(-self.window // self.block)) * self.block).clamp_min(lo)
        return lo, hi


class RecallMeter:
    """Mean attention-mass recall per layer, over every query head and row it was given.

    `add` takes the whole-context recall and, optionally, the middle recall (NaN where a row has no
    middle: those rows are left out of its mean)."""

    def __init__(self, layers: int):
        self._sum: list[torch.Tensor | float] = [0.0] * layers  # device tensors: no host sync per layer
        self._count = [0] * layers
        self._middle_sum: list[torch.Tensor | float] = [0.0] * layers
        self._middle_count: list[torch.Tensor | int] = [0] * layers

    def add(self, layer: int, recall: torch.Tensor, middle: torch.Tensor | None = None) -> None:
        self._sum[layer] = self._sum[layer] + recall.float().sum()
        self._count[layer] += recall.numel()
        if middle is not None:
            finite = torch.isfinite(middle)
            self._middle_sum[layer] = self._middle_sum[layer] + torch.where(finite, middle.float(), 0.0).sum()
            self._middle_count[layer] = self._middle_count[layer] + finite.sum()

    def by_layer(self) -> list[float | None]:
        return [float(s) / n if n else None for s, n in zip(self._sum, self._count)]

    def middle_by_layer(self) -> list[float | None]:
        return [float(s) / int(n) if int(n) else None for s, n in zip(self._middle_sum, self._middle_count)]


class _State:
    selection: Selection | None = None
    meter: RecallMeter | None = None
    generator: torch.Generator | None = None


STATE = _State()


def use(selection: Selection | None, meter: RecallMeter | None = None, seed: int = 0, device=None) -> None:
    """Make `selection` the one applied from now on (None: exact), recall going to `meter`."""
    STATE.selection = selection
    STATE.meter = meter
    STATE.generator = torch.Generator(device=device or "cpu").manual_seed(seed)


def register() -> None:
    """Make `attn_implementation="fidelity_select"` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, selected_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def _no_mask(*, attention_mask=None, **kwargs):
    """Mask function: causality comes from positions; padding is not supported here."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("the fidelity attention does not support padded batches")
    return None


def selected_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention function: exact prefill, selected keys for rows that have a past."""
    lq, lk = query.shape[2], key.shape[2]
    selection = STATE.selection
    if lq == lk or selection is None:
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling, is_causal=True)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    outs = []
    for start in range(0, lq, ROWS_PER_CHUNK):
        rows = slice(start, min(lq, start + ROWS_PER_CHUNK))
        q_pos = torch.arange(lk - lq + rows.start, lk - lq + rows.stop, device=query.device)
        out, recall, middle = _attend_rows(query[:, :, rows], key, value, q_pos, scale, selection)
        outs.append(out)
        if STATE.meter is not None and recall is not None:
            STATE.meter.add(module.layer_idx, recall, middle)
    out = torch.cat(outs, dim=2).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _attend_rows(query, key, value, q_pos, scale, selection: Selection):
    """Attention of query rows at positions `q_pos` over their selected keys.

    Returns (out, recall, middle recall); both recalls [B, Hq, rows] or None for the full policy, the
    middle one NaN for a row without a middle."""
    b, hq, rows, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    k_pos = torch.arange(lk, device=query.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [rows, lk]
    q = query.float().view(b, hkv, group, rows, d)
    scores = torch.einsum("bhgrd,bhkd->bhgrk", q, key.float()) * scale
    scores = scores.masked_fill(~causal, float("-inf"))
    true_probs = torch.softmax(scores, dim=-1)
    eligible = None
    if selection.policy == "full":
        chosen = causal.expand(b, hkv, rows, lk)
    else:
        lo, hi = selection.middle(q_pos)
        eligible = (k_pos[None, :] >= lo) & (k_pos[None, :] < hi[:, None])  # [rows, lk]; causal as hi <= q_pos
        resident = causal & ~eligible
        chosen = resident.expand(b, hkv, rows, lk).clone()
        if selection.fetch > 0:
            rank = _rank(selection.policy, true_probs, k_pos, (b, hkv, rows, lk), query.device)
            rank = rank.masked_fill(~eligible, float("-inf"))
            top = rank.topk(min(selection.fetch, lk), dim=-1)
            chosen.scatter_(-1, top.indices, top.values > float("-inf"))
            chosen |= resident  # scatter may write False over a resident slot when few are eligible
    selected = chosen[:, :, None]  # one selection per KV head, shared by its query heads
    probs = torch.softmax(scores.masked_fill(~selected, float("-inf")), dim=-1)
    out = torch.einsum("bhgrk,bhkd->bhgrd", probs, value.float()).reshape(b, hq, rows, d)
    if eligible is None:
        return out, None, None
    recall = (true_probs * selected).sum(-1).reshape(b, hq, rows)
    middle_mass = (true_probs * eligible).sum(-1)
    fetched_mass = (true_probs * (selected & eligible)).sum(-1)
    middle = (fetched_mass / middle_mass).masked_fill(~eligible.any(-1), float("nan")).reshape(b, hq, rows)
    return out, recall, middle


def _rank(policy: str, true_probs, k_pos, shape, device) -> torch.Tensor:
    """Higher is fetched first."""
    if policy == "window":
        return k_pos.float().expand(shape)
    if policy == "random":
        return torch.rand(shape, generator=STATE.generator, device=device)
    return true_probs.sum(dim=2)  # oracle
