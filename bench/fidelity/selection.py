"""Approximate decode attention over a selection of the past tokens, registered with transformers.

A forward with no past (the prefill) is exact causal attention (SDPA). A forward over a past (one
decode step, or several teacher-forced tokens at once, which is the same computation row by row)
lets each query row attend only to its selected keys: the sink, the recent window (the row's own
token included), and `fetch` more tokens per KV head chosen by a policy:

    window  the tokens just before the window (a longer window: the naive baseline)
    random  a uniform random draw, fresh for each row, layer and KV head
    oracle  the tokens with the most true attention probability, summed over the KV head's query
            heads: the best a selection of that size can do, the ceiling for speculation
    full    every token (a check that this function is exact)

A selection is per KV head because that is what a fetch moves. While it runs, the function adds up
per layer the attention-mass recall: the share of each query head's true attention probability
that falls on the selected tokens.
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

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy: got {self.policy!r}, expected one of {', '.join(POLICIES)}")


class RecallMeter:
    """Mean attention-mass recall per layer, over every query head and row it was given."""

    def __init__(self, layers: int):
        self._sum: list[torch.Tensor | float] = [0.0] * layers  # device tensors: no host sync per layer
        self._count = [0] * layers

    def add(self, layer: int, recall: torch.Tensor) -> None:
        self._sum[layer] = self._sum[layer] + recall.float().sum()
        self._count[layer] += recall.numel()

    def by_layer(self) -> list[float | None]:
        return [float(s) / n if n else None for s, n in zip(self._sum, self._count)]


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
        out, recall = _attend_rows(query[:, :, rows], key, value, q_pos, scale, selection)
        outs.append(out)
        if STATE.meter is not None and recall is not None:
            STATE.meter.add(module.layer_idx, recall)
    out = torch.cat(outs, dim=2).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _attend_rows(query, key, value, q_pos, scale, selection: Selection):
    """Attention of query rows at positions `q_pos` over their selected keys; (out, recall or None)."""
    b, hq, rows, d = query.shape
    hkv, lk = key.shape[1], key.shape[2]
    group = hq // hkv
    k_pos = torch.arange(lk, device=query.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # [rows, lk]
    q = query.float().view(b, hkv, group, rows, d)
    scores = torch.einsum("bhgrd,bhkd->bhgrk", q, key.float()) * scale
    scores = scores.masked_fill(~causal, float("-inf"))
    true_probs = torch.softmax(scores, dim=-1)
    if selection.policy == "full":
        chosen = causal.expand(b, hkv, rows, lk)
    else:
        resident = (k_pos[None, :] < selection.sink) | (k_pos[None, :] > q_pos[:, None] - selection.window)
        resident = resident & causal
        eligible = causal & ~resident
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
    recall = None if selection.policy == "full" else (true_probs * selected).sum(-1).reshape(b, hq, rows)
    return out, recall


def _rank(policy: str, true_probs, k_pos, shape, device) -> torch.Tensor:
    """Higher is fetched first."""
    if policy == "window":
        return k_pos.float().expand(shape)
    if policy == "random":
        return torch.rand(shape, generator=STATE.generator, device=device)
    return true_probs.sum(dim=2)  # oracle
