"""The attention function and mask function hetero registers with transformers.

transformers calls the attention function with the attention module, the queries, and the keys
and values that `Cache.update` returned. With a HeteroCache those are only the new tokens: the
function asks the cache for the rest. A forward pre-hook on each attention module hands it the
cache of the current forward (the module's own `past_key_values` argument).

The mask function gives the attention the 2D padding mask as it is, never a dense
[query x key] matrix: causality is applied per piece from positions.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

from .cache import HeteroCache
from .partial_attention import attend

ATTENTION_NAME = "hetero"
_CACHE_ATTR = "_hetero_cache"


def padding_mask(*, batch_size, kv_length, attention_mask=None, device=None, **kwargs):
    """Mask function: the [B, kv_length] bool padding mask, or None when nothing is padded.

    One host sync per forward to find out lets every layer take the unmasked fast path.
    """
    if attention_mask is None:
        return None
    mask = attention_mask[:, -kv_length:].to(device=device, dtype=torch.bool)
    if bool(mask.all()):
        return None
    if mask.shape[0] != batch_size:
        mask = mask.expand(batch_size, -1)
    return mask


def hetero_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Attention over the hetero cache; exact, with any other cache too (then over `key`/`value`)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if attention_mask is not None and attention_mask.dim() != 2:
        raise ValueError("hetero attention expects the 2D padding mask its mask function produces")
    cache = getattr(module, _CACHE_ATTR, None)
    if isinstance(cache, HeteroCache):
        out = cache.attend(module.layer_idx, query, key, value, attention_mask, scale, sliding_window)
    else:
        out = _attend_whole(query, key, value, attention_mask, scale, sliding_window)
    return out.transpose(1, 2).contiguous(), None


def _attend_whole(query, key, value, mask, scale, sliding_window):
    """Causal attention when `key`/`value` already hold every token (another cache, or none)."""
    lq, lk = query.shape[2], key.shape[2]
    key_pos = torch.arange(lk, device=query.device)
    q_pos = key_pos[lk - lq :]
    valid = None if mask is None else mask[:, -lk:]
    out, _ = attend(query, key, value, scale, key_pos, q_pos, valid, sliding_window)
    return out.to(query.dtype)


def register() -> None:
    """Make `attn_implementation="hetero"` known to transformers (idempotent)."""
    AttentionInterface.register(ATTENTION_NAME, hetero_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, padding_mask)


def _bind_cache(module, args, kwargs):
    cache = kwargs.get("past_key_values")
    setattr(module, _CACHE_ATTR, cache)
    if isinstance(cache, HeteroCache) and cache.speculator is not None:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        cache.observe_input(module.layer_idx, hidden, kwargs.get("attention_mask"))


def _unbind_cache(module, args, output):
    setattr(module, _CACHE_ATTR, None)


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's self-attention modules, in layer order."""
    found = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "q_proj")]
    return sorted(found, key=lambda m: m.layer_idx)


def install(model: torch.nn.Module) -> None:
    """Route `model`'s attention through hetero and hand each module its forward's cache."""
    register()
    model.set_attn_implementation(ATTENTION_NAME)
    for module in attention_modules(model):
        if getattr(module, "_hetero_hooked", False):
            continue
        module.register_forward_pre_hook(_bind_cache, with_kwargs=True)
        module.register_forward_hook(_unbind_cache)
        module._hetero_hooked = True
