"""Plain PyTorch versions of every kernel in this package: the CPU fallback and the tests' oracle."""

from __future__ import annotations

import torch

from .segment import Segment


def gather_tokens(pool, block_table, token_idx, token_count, out):
    """Copy the first token_count[b, h] tokens named by token_idx[b, h] from pool into out.

    pool [n_slots, 2, B, Hkv, bs, D]; block_table int32 [n_blocks]; token_idx int32 [B, Hkv, N];
    token_count int32 [B, Hkv]; out [2, B, Hkv, N, D]. Rows of out past the count are untouched.
    """
    B, Hkv, N = token_idx.shape
    bs = pool.shape[4]
    dev = pool.device
    idx = token_idx.to(dev).long()
    valid = torch.arange(N, device=dev) < token_count.to(dev).long()[..., None]
    idx = torch.where(valid, idx, torch.zeros_like(idx))
    slot = block_table.to(dev).long()[idx // bs]
    b = torch.arange(B, device=dev)[:, None, None].expand(B, Hkv, N)
    h = torch.arange(Hkv, device=dev)[None, :, None].expand(B, Hkv, N)
    rows = pool[slot[valid], :, b[valid], h[valid], (idx % bs)[valid]]  # [n_valid, 2, D]
    valid = valid.to(out.device)
    out[0][valid] = rows[:, 0].to(out.device, out.dtype)
    out[1][valid] = rows[:, 1].to(out.device, out.dtype)
    return out


def gather_blocks(pool, slots, out):
    """out[i] = pool[slots[i]] for whole blocks: pool [n_slots, 2, B, Hkv, bs, D], slots int32 [n]."""
    out.copy_(pool[slots.to(pool.device).long()])
    return out


def decode_attention(q, segments: list[Segment], scale: float, compute_dtype=torch.float32):
    """Decode attention of q [B, Hq, D] over the union of the segments' valid tokens.

    Returns out [B, Hq, D] and lse [B, Hq] in compute_dtype; a row with no token gets out 0,
    lse -inf.
    """
    B, Hq, D = q.shape
    ks, vs, masks = [], [], []
    for seg in segments:
        k, v = seg.logical_kv()
        ks.append(k.to(q.device, compute_dtype))
        vs.append(v.to(q.device, compute_dtype))
        masks.append(seg.valid_mask().to(q.device))
    if not ks:
        return _empty(B, Hq, D, q.device, compute_dtype)
    k, v, mask = torch.cat(ks, dim=2), torch.cat(vs, dim=2), torch.cat(masks, dim=2)
    Hkv = k.shape[1]
    G = Hq // Hkv
    qg = q.to(compute_dtype).reshape(B, Hkv, G, D)
    scores = torch.einsum("bhgd,bhld->bhgl", qg, k) * scale
    scores = scores.masked_fill(~mask[:, :, None, :], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    p = torch.exp(scores - lse_safe[..., None])
    out = torch.einsum("bhgl,bhld->bhgd", p, v)
    return out.reshape(B, Hq, D), lse.reshape(B, Hq)


def merge_partials(outs, lses):
    """Exact log-sum-exp merge of P partial attentions: outs [P, B, Hq, D], lses [P, B, Hq]."""
    m = lses.amax(dim=0)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp(lses - m_safe)
    total = w.sum(dim=0)
    weighted = torch.where(w[..., None] > 0, outs * w[..., None], torch.zeros_like(outs)).sum(dim=0)
    out = torch.where(total[..., None] > 0, weighted / total.clamp_min(1e-30)[..., None], torch.zeros_like(weighted))
    return out, m_safe + torch.log(total)


def merge_two(out_a, lse_a, out_b, lse_b):
    """Merge partial b into partial a in place; returns (out_a, lse_a)."""
    out, lse = merge_partials(torch.stack([out_a, out_b]), torch.stack([lse_a, lse_b]))
    out_a.copy_(out)
    lse_a.copy_(lse)
    return out_a, lse_a


def _empty(B, Hq, D, device, dtype):
    out = torch.zeros(B, Hq, D, dtype=dtype, device=device)
    return out, torch.full((B, Hq), float("-inf"), dtype=dtype, device=device)
