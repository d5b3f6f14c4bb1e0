"""Speculation for the `speculative` mode (InfiniGen, OSDI 2024): which middle tokens a decode step needs.

A decode query attends mostly to a few tokens. InfiniGen predicts them one layer ahead, cheaply, so
that only their K and V cross PCIe:

1. Skew, once at load (`calibrate`). Over a short calibration prompt, each layer's post-RoPE
   queries and keys are captured. Per KV head, an orthogonal matrix A (eigenvectors) is fitted to
   its group's stacked queries and its keys, so (qA)·(kA) = q·k exactly while what ranks the keys
   piles into few columns. A is the eigenbasis of Sq Sk + Sk Sq (Sq the queries' Gram, Sk the centred keys' covariance, per token), not
   of Sq alone as in InfiniGen: the scores vary where queries are strong and keys differ, and this
   basis keeps more of that in few columns (middle recall +0.01..0.05 at partial_ratio 0.25 on the
   fidelity model). Columns are ranked by query energy x key spread across tokens: a column where
   every key is alike moves every score equally and ranks nothing, hence the keys are centred. The first
   `partial_ratio` x D columns are kept (P of them; all query heads of a group share them).
2. Partial keys (`Speculator.append_keys`): every key the cache stores, prefill chunks included, is
   also kept skewed and cut to its P columns, [B, Hkv, capacity, P] per layer on the model's device.
3. Select (`Speculator.select`), while layer i-1 computes: layer i-1's attention input (the hidden
   state after its input norm; consecutive layers' inputs are alike) goes through layer i's own
   q_proj, RoPE at the decode position, then A[:, :P], and is scored against layer i's partial keys
   over the middle [lo, hi) of the context. A token is selected when its score is within `alpha` of
   the best score of some query head of the group (the union over the group, as one fetch serves
   the whole KV head), between `min_tokens` and `max_tokens` per KV head. That rule sets how many;
   which ones are the tokens with the most speculated probability summed over the group's query heads
   (softmax of the partial scores), the oracle's ranking applied to the speculated scores: with the
   same count it covers more of the true attention than the alpha rule's own set or closeness order.

RoPE sits between the projection and the skew, so the projection cannot be cut to P columns as
InfiniGen does for OPT: A mixes all D dimensions and RoPE pairs d with d + D/2. The full q_proj of
layer i is applied to layer i-1's input instead. It costs reading hidden x Hq*D weights once per step
(32 MiB for an 8B model, ~10 us of HBM), small beside the partial keys (B*Hkv*T*P) and far below the
PCIe time of the KV it saves; a RoPE-commuting skew (rotations within RoPE's planes) would allow a
cut projection but concentrates much less.

Layer 0 has no layer before it: the cache fetches its middle whole. Its partial keys are not kept.

Everything in `select` runs on the device with fixed shapes derived from Python ints: no host sync.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from .attention import attention_modules
from .config import OffloadConfig, check_speculation_keys
from .errors import UnsupportedModelError
from .token_sets import live_entries

SKEWABLE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


# Settings --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpeculationSettings:
    """The knobs of the speculative mode; the same keys and defaults as OffloadConfig.

    `min_tokens` and `max_tokens` are a token count per KV head, or a share < 1 of the context.
    `cpu_remainder` is the cache's business ("all": the CPU attends over the tokens not selected).
    """

    alpha: float = OffloadConfig.alpha
    partial_ratio: float = OffloadConfig.partial_ratio
    min_partial_columns: int = OffloadConfig.min_partial_columns
    min_tokens: int | float = OffloadConfig.min_tokens
    max_tokens: int | float = OffloadConfig.max_tokens
    cpu_remainder: str = OffloadConfig.cpu_remainder

    def __post_init__(self) -> None:
        check_speculation_keys(self)

    @classmethod
    def from_config(cls, config) -> "SpeculationSettings":
        """The settings from anything with these attributes, e.g. an OffloadConfig."""
        return cls(**{f.name: getattr(config, f.name) for f in fields(cls)})

    def min_count(self, context: int) -> int:
        return _tokens(self.min_tokens, context)

    def max_count(self, context: int) -> int:
        return _tokens(self.max_tokens, context)


def _tokens(value: int | float, context: int) -> int:
    return int(value * context) if isinstance(value, float) and value < 1 else int(value)


# Skew ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSkew:
    """One layer's skew: per KV head an orthogonal [D, D] matrix whose first `kept` columns carry most of q·k."""

    rotation: torch.Tensor  # [Hkv, D, D] float32; columns by importance, most important first
    kept: int

    @property
    def partial(self) -> torch.Tensor:
        """[Hkv, D, P]: the kept columns."""
        return self.rotation[:, :, : self.kept]


def fit_skew(queries: torch.Tensor, keys: torch.Tensor, partial_ratio: float, min_columns: int = 0) -> LayerSkew:
    """The skew of one layer from its post-RoPE queries [Hq, N, D] and keys [Hkv, N, D]; it keeps
    `partial_ratio` of the D columns, at least `min_columns` (at most D)."""
    kv_heads, _, dim = keys.shape
    q = queries.double().reshape(kv_heads, -1, dim)  # query head h serves KV head h // group
    k = keys.double() - keys.double().mean(1, keepdim=True)
    q_gram, k_cov = q.mT @ q / q.shape[1], k.mT @ k / k.shape[1]
    # The basis of the symmetrised product of the two: directions where queries are strong AND keys
    # differ, which is where the scores vary (the query Gram alone, InfiniGen's, misses the keys).
    _, basis = torch.linalg.eigh(q_gram @ k_cov + k_cov @ q_gram)
    q_energy = ((q @ basis) ** 2).sum(1)
    k_spread = ((k @ basis) ** 2).sum(1)
    importance = q_energy * k_spread
    order = importance.argsort(-1, descending=True)
    rotation = basis.gather(2, order[:, None, :].expand(-1, dim, -1))
    return LayerSkew(rotation.float(), min(dim, max(1, round(partial_ratio * dim), min_columns)))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE as the supported models apply it: x [B, H, L, D], cos/sin [B, L, D]."""
    return x * cos[:, None] + rotate_half(x) * sin[:, None]


def _heads(proj, norm, hidden: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, L, hidden] -> [B, H, L, D] through a projection and the optional per-head norm (Qwen3)."""
    x = proj(hidden).view(*hidden.shape[:-1], -1, head_dim)
    if norm is not None:
        x = norm(x)
    return x.transpose(1, 2)


def rotated_query_key(attn: torch.nn.Module, hidden: torch.Tensor, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
    """An attention module's post-RoPE queries [B, Hq, L, D] and keys [B, Hkv, L, D] for its input."""
    q = _heads(attn.q_proj, getattr(attn, "q_norm", None), hidden, attn.head_dim)
    k = _heads(attn.k_proj, getattr(attn, "k_norm", None), hidden, attn.head_dim)
    return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def calibration_ids(vocab_size: int, tokens: int = 512, tokenizer=None) -> torch.Tensor:
    """A deterministic calibration prompt [1, tokens].

    With a tokenizer: the start of Python's own argparse source. Without: fixed pseudo-random
    phrases of ids, repeated in a fixed order, so that attention has something to look back at.
    """
    if tokenizer is not None:
        text = Path(argparse.__file__).read_text(encoding="utf-8")
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][:tokens]
        if len(ids) == tokens:
            return torch.tensor([ids])
    generator = torch.Generator().manual_seed(0)
    phrases = torch.randint(min(4, vocab_size - 1), vocab_size, (32, 8), generator=generator)
    order = torch.randint(0, 32, (-(-tokens // 8),), generator=generator)
    return phrases[order].reshape(1, -1)[:, :tokens]


def check_skewable(model: torch.nn.Module) -> None:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in SKEWABLE_MODEL_TYPES:
        raise UnsupportedModelError(
            "model",
            f"model: speculation does not support architecture {model_type!r}; "
            f"expected one of {', '.join(SKEWABLE_MODEL_TYPES)}",
        )


def calibrate(model: torch.nn.Module, input_ids: torch.Tensor | None = None,
              settings: SpeculationSettings | None = None) -> "Speculator":
    """Skew every layer of a causal LM from one forward over a calibration prompt.

    Args:
        model: a transformers Llama, Mistral, Qwen2 or Qwen3 `*ForCausalLM` (or its base model).
        input_ids: [B, L] unpadded prompt; None for `calibration_ids` (512 tokens).
        settings: the speculative mode's knobs; `partial_ratio` and `min_partial_columns` are used here.
    """
    check_skewable(model)
    settings = settings or SpeculationSettings()
    if input_ids is None:
        input_ids = calibration_ids(model.config.vocab_size)
    modules = attention_modules(model)
    skews: list[LayerSkew | None] = [None] * len(modules)

    def fit(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        q, k = rotated_query_key(module, hidden, *kwargs["position_embeddings"])
        skews[module.layer_idx] = fit_skew(q.transpose(0, 1).flatten(1, 2), k.transpose(0, 1).flatten(1, 2),
                                           settings.partial_ratio, settings.min_partial_columns)

    hooks = [m.register_forward_pre_hook(fit, with_kwargs=True) for m in modules]
    decoder = getattr(model, "model", model)  # the base model: no logits over the vocabulary
    try:
        with torch.no_grad():
            decoder(input_ids=input_ids.to(modules[0].q_proj.weight.device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
    return Speculator(model, skews, settings)


def _rotary_embedding(model: torch.nn.Module) -> torch.nn.Module:
    for module in model.modules():
        if type(module).__name__.endswith("RotaryEmbedding"):
            return module
    raise UnsupportedModelError("model", "model: no rotary embedding module found; speculation needs RoPE")


# Speculation -----------------------------------------------------------------------------------


class Speculator:
    """Predicts, from layer i-1's attention input, the middle tokens layer i's decode query needs.

    The cache calls `begin` once it knows the batch, `append_keys` with every layer's new keys, and
    `select` for layers >= 1 in decode. Layer 0 has no predecessor: fetch its middle whole.
    """

    def __init__(self, model: torch.nn.Module, skews: list[LayerSkew], settings: SpeculationSettings):
        self.settings = settings
        self.skews = skews
        self._modules = attention_modules(model)
        self._rotary = _rotary_embedding(model)
        weight = self._modules[0].q_proj.weight
        self._partial = [s.partial.to(weight.device, weight.dtype).contiguous() for s in skews]
        # The query side carries the attention scale, which saves a kernel per layer and step.
        self._query_partial = [(p * m.scaling).contiguous() for p, m in zip(self._partial, self._modules)]
        self._keys: list[torch.Tensor | None] = [None] * len(skews)
        self._lengths = [0] * len(skews)
        self._batch: int | None = None
        self._capacity = 0

    @property
    def kept_columns(self) -> int:
        return self.skews[0].kept

    def max_selected(self, max_tokens: int) -> int:
        """The most tokens `select` returns per KV head in a generation of `max_tokens` tokens."""
        return min(self.settings.max_count(max_tokens), max_tokens)

    def partial_key_bytes(self, batch: int, max_tokens: int, dtype: torch.dtype) -> int:
        """Device memory `begin(batch, max_tokens)` leads to (layer 0 keeps none)."""
        kv_heads = self.skews[0].rotation.shape[0]
        per_layer = batch * kv_heads * max_tokens * self.kept_columns * torch.finfo(dtype).bits // 8
        return (len(self.skews) - 1) * per_layer

    def begin(self, batch: int, max_tokens: int) -> None:
        """Start a generation of `batch` rows and at most `max_tokens` tokens: forget the last one's keys."""
        self._batch, self._capacity = batch, max_tokens
        self._lengths = [0] * len(self.skews)
        self._rope_table(max_tokens)

    @torch.no_grad()
    def _rope_table(self, max_tokens: int) -> None:
        """RoPE's cos and sin for every position of the generation, computed once: a decode step
        then reads its row instead of launching the rotary module's kernels in every layer."""
        if getattr(self, "_cos", None) is not None and self._cos.shape[1] >= max_tokens:
            return
        weight = self._modules[0].q_proj.weight
        probe = torch.empty(1, 1, 1, dtype=weight.dtype, device=weight.device)
        positions = torch.arange(max_tokens, device=weight.device)[None]
        self._cos, self._sin = self._rotary(probe, positions)  # [1, max_tokens, D]

    @torch.no_grad()
    def append_keys(self, layer_idx: int, key_states: torch.Tensor) -> None:
        """Keep the skewed partial columns of new post-RoPE keys [B, Hkv, L, D] (as Cache.update gets them)."""
        if self._batch is None:
            raise RuntimeError("Speculator.append_keys before begin(batch, max_tokens)")
        start = self._lengths[layer_idx]
        end = start + key_states.shape[2]
        if end > self._capacity:
            raise RuntimeError(f"layer {layer_idx}: {end} tokens, but begin() sized the partial keys for {self._capacity}")
        self._lengths[layer_idx] = end
        if layer_idx == 0:
            return
        store = self._storage(layer_idx, key_states)
        store[:, :, start:end] = key_states @ self._partial[layer_idx].to(key_states.dtype)

    def _storage(self, layer_idx: int, key_states: torch.Tensor) -> torch.Tensor:
        """The layer's partial key buffer, reused across generations of the same shape."""
        b, kv_heads, _, _ = key_states.shape
        shape = (b, kv_heads, self._capacity, self.kept_columns)
        store = self._keys[layer_idx]
        if store is None or store.shape != shape or store.dtype != key_states.dtype or store.device != key_states.device:
            store = self._keys[layer_idx] = torch.empty(shape, dtype=key_states.dtype, device=key_states.device)
        return store

    @torch.no_grad()
    def query(self, layer_idx: int, hidden: torch.Tensor, position: int,
              valid_from: torch.Tensor | None = None) -> torch.Tensor:
        """Layer `layer_idx`'s post-RoPE query [B, Hq, D] for the last token of `hidden` [B, Lq, hidden_size].

        transformers' generate numbers positions from the attention mask, so a row's RoPE position
        is `position - valid_from` (its first valid slot).
        """
        attn = self._modules[layer_idx]
        x = hidden[:, -1:]
        if getattr(self, "_cos", None) is None or position >= self._cos.shape[1]:
            self._rope_table(position + 1)
        if valid_from is None:
            cos, sin = self._cos[:, position : position + 1], self._sin[:, position : position + 1]
        else:
            rows = (position - valid_from.to(x.device, torch.long)).clamp_min(0)
            cos, sin = self._cos[0, rows][:, None], self._sin[0, rows][:, None]
        q = _heads(attn.q_proj, getattr(attn, "q_norm", None), x, attn.head_dim)
        return apply_rope(q, cos, sin)[:, :, 0]

    @torch.no_grad()
    def scores(self, layer_idx: int, hidden: torch.Tensor | None, position: int, lo: int, hi: int,
               valid_from: torch.Tensor | None = None, query: torch.Tensor | None = None) -> torch.Tensor:
        """Speculated attention logits [B, Hq, hi - lo] (float32, scaled) over positions [lo, hi),
        of the query predicted from `hidden`, or of the layer's own post-RoPE `query` [B, Hq, D]."""
        if layer_idx == 0:
            raise ValueError("layer 0 has no layer before it to speculate from; fetch it whole")
        if not 0 <= lo < hi <= self._lengths[layer_idx]:
            raise ValueError(f"layer {layer_idx}: span [{lo}, {hi}) outside the {self._lengths[layer_idx]} keys stored")
        if (hidden is None) == (query is None):
            raise ValueError("scores: give the layer before's input `hidden` or the layer's own `query`, one of them")
        q = self.query(layer_idx, hidden, position, valid_from) if query is None else query
        b, hq, d = q.shape
        partial = self._query_partial[layer_idx]
        kv_heads = partial.shape[0]
        q_partial = q.view(b, kv_heads, hq // kv_heads, d) @ partial.to(q.dtype)
        keys = self._keys[layer_idx][:, :, lo:hi]
        logits = (q_partial.to(keys.dtype) @ keys.mT).float()
        return logits.reshape(b, hq, hi - lo)

    @torch.no_grad()
    def select(self, layer_idx: int, hidden: torch.Tensor | None, position: int, lo: int, hi: int,
               valid_from: torch.Tensor | None = None, ordered: bool = True,
               budget: float = 1.0, query: torch.Tensor | None = None,
               held: tuple[torch.Tensor, torch.Tensor] | None = None,
               excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The middle tokens layer `layer_idx`'s decode step should attend to.

        Args:
            layer_idx: the layer to predict (>= 1).
            hidden: [B, 1, hidden_size] the attention input of layer `layer_idx - 1` (after its norm);
                None when `query` is given.
            position: the decode token's position (tokens stored before it).
            lo, hi: the candidate span; the sink before it and the window after are attended anyway.
            valid_from: [B] each row's first non-padding position, or None.
            budget: the share of `min_tokens` and `max_tokens` this selection may take (the cache
                keeps the rest for the layer's own query, `verify_share`).
            query: the layer's own post-RoPE query [B, Hq, D], once it exists: scored instead of the
                one predicted from `hidden`.
            held: a selection (token_idx, count) already fetched, e.g. by the prediction from the
                layer before. Its tokens rank below every other, so the first `count` entries
                returned are the best tokens it lacks, best first, and `count` is what the bounds
                leave beside it (`ordered` must be False).
            excluded: bool [hi - lo], positions never to select (their blocks are not in host
                memory), as if they were padding.

        Returns:
            token_idx int32 [B, Hkv, N], absolute positions in [lo, hi), ascending in the first
            `count` entries, then padding (hi - 1); count int32 [B, Hkv].
            N = min(budget x max_tokens resolved against `position`, hi - lo).
        """
        if held is not None and ordered:
            raise ValueError("select: a selection beside a held one comes best first (ordered=False)")
        logits = self.scores(layer_idx, hidden, position, lo, hi, valid_from, query)
        kv_heads = self._partial[layer_idx].shape[0]
        grouped = logits.view(logits.shape[0], kv_heads, -1, hi - lo)
        s = self.settings
        width = min(max(1, int(s.max_count(position) * budget)), hi - lo)
        least = int(s.min_count(position) * budget)
        probs = grouped
        left_out = _left_out(lo, hi, valid_from, excluded, grouped.device)
        if left_out is not None:
            probs = grouped.masked_fill(left_out[:, None, None, :], -math.inf)
        mass = probs.softmax(-1).sum(2)  # which tokens: the most speculated probability over the group
        valid = None if left_out is None else ~left_out
        if held is None:
            return _alpha_rule(probs, lo, s.alpha, least, width, valid, ordered, mass)
        held_idx, held_count = held
        # Held tokens rank last, with padding: the entries past the count below never reach them.
        # (A fill rather than torch.where of two numbers, which would copy them to the device.)
        rank_last = torch.full(held_idx.shape, math.inf, device=mass.device).masked_fill_(
            live_entries(held_idx, held_count), -math.inf)
        mass.scatter_reduce_(-1, held_idx.long() - lo, rank_last, "amin")
        token_idx, count = _alpha_rule(probs, lo, s.alpha, least, width, valid, False, mass)
        return token_idx, (count - held_count).clamp_min(0)


def _left_out(lo: int, hi: int, valid_from: torch.Tensor | None, excluded: torch.Tensor | None,
              device) -> torch.Tensor | None:
    """bool [B or 1, hi - lo]: the positions no selection may take (padding, `excluded`), or None."""
    out = None
    if valid_from is not None:
        out = torch.arange(lo, hi, device=device) < valid_from.to(device)[:, None]
    if excluded is not None:
        out = excluded[None] if out is None else out | excluded[None]
    return out


def select_tokens(scores: torch.Tensor, lo: int, alpha: float, min_count: int, width: int,
                  valid_from: torch.Tensor | None = None, ordered: bool = True,
                  rank: torch.Tensor | None = None,
                  excluded: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The alpha rule over scores [B, Hkv, G, L] of positions lo .. lo + L - 1.

    A token is kept when some query head of the group scores it within `alpha` of that head's
    best; at least `min_count` and at most `width` per KV head (`width` wins; the best first, by
    the distance to the closest head's best), never a position before `valid_from` [B].
    Returns (token_idx int32 [B, Hkv, width], count int32 [B, Hkv]) as `Speculator.select`;
    `ordered=False` leaves the first `count` positions best first and the rest unspecified (but in
    [lo, hi)), which saves the kernels that sort them, for callers that need no order.
    `rank` [B, Hkv, L] (higher first), when given, picks which `count` tokens are kept instead of the
    closeness (the count still comes from the alpha rule and the bounds).
    `excluded` bool [L]: positions never selected, as padding is not.
    """
    valid = None
    left_out = _left_out(lo, lo + scores.shape[-1], valid_from, excluded, scores.device)
    if left_out is not None:
        valid = ~left_out
        scores = scores.masked_fill(left_out[:, None, None, :], -math.inf)
    return _alpha_rule(scores, lo, alpha, min_count, width, valid, ordered, rank)


def _alpha_rule(scores, lo, alpha, min_count, width, valid, ordered, rank):
    """`select_tokens` once the positions left out are -inf in `scores` and False in `valid`
    [B or 1, L] (None: none left out)."""
    hi = lo + scores.shape[-1]
    if rank is not None and min_count >= width:
        # The bounds leave the alpha rule nothing to decide (the default): fewer kernels per layer step.
        count = torch.full(scores.shape[:2], width, dtype=torch.int32, device=scores.device)
    else:
        best = scores.amax(-1, keepdim=True).clamp_min(torch.finfo(scores.dtype).min)  # a fully padded row stays -inf
        closeness = (scores - best).amax(2)  # [B, Hkv, L]: 0 at some head's best
        count = (closeness > -alpha).sum(-1).clamp(min=min(min_count, width), max=width)
    if valid is not None:
        count = torch.minimum(count, valid.sum(-1, keepdim=True))
    if rank is None:
        rank = closeness
    elif valid is not None:
        rank = rank.masked_fill(~valid[:, None, :], -math.inf)  # padding ranks last, below any token
    ranked = rank.sort(-1, descending=True).indices[..., :width]
    if not ordered:
        return (ranked + lo).to(torch.int32), count.to(torch.int32)
    kept = torch.arange(width, device=scores.device) < count[..., None]
    chosen = torch.where(kept, ranked + lo, hi)  # hi sorts past every kept position
    token_idx = chosen.sort(-1).values.clamp_max(hi - 1)
    return token_idx.to(torch.int32), count.to(torch.int32)


# Stats -----------------------------------------------------------------------------------------


def attention_recall(query: torch.Tensor, keys: torch.Tensor, token_idx: torch.Tensor, count: torch.Tensor,
                     scale: float | None = None, span: tuple[int, int] | None = None,
                     valid_from: torch.Tensor | None = None) -> torch.Tensor:
    """The share of each query head's attention over the span that the selection holds, [B, Hq].

    Args:
        query: [B, Hq, D] the true decode query (post-RoPE).
        keys: [B, Hkv, T, D] the layer's true keys (post-RoPE).
        token_idx, count: a selection as `Speculator.select` returns it (positions in the span).
        scale: the attention scale; None for 1/sqrt(D).
        span: [lo, hi) the candidates, softmax is taken over them; None for all T keys.
        valid_from: [B] first non-padding position, or None.
    """
    b, hq, d = query.shape
    kv_heads, total = keys.shape[1], keys.shape[2]
    lo, hi = span or (0, total)
    scale = d**-0.5 if scale is None else scale
    logits = query.float().view(b, kv_heads, hq // kv_heads, d) @ keys[:, :, lo:hi].float().mT * scale
    if valid_from is not None:
        pad = torch.arange(lo, hi, device=keys.device) < valid_from.to(keys.device)[:, None]
        logits = logits.masked_fill(pad[:, None, None, :], -math.inf)
    probs = logits.softmax(-1)
    kept = (torch.arange(token_idx.shape[-1], device=keys.device) < count[..., None].to(keys.device)).float()
    hits = torch.zeros(b, kv_heads, hi - lo, device=keys.device)
    hits.scatter_add_(-1, (token_idx.to(keys.device).long() - lo).clamp(0, max(0, hi - lo - 1)), kept)
    return (probs * (hits > 0)[:, :, None]).sum(-1).reshape(b, hq)


def selected_share(count: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """The mean share of the candidate span [lo, hi) selected per KV head (a 0-dim tensor, no sync)."""
    return count.float().mean() / max(1, hi - lo)
