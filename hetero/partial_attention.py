"""Attention over one piece of the KV cache, returning (output, log-sum-exp), and the exact merge.

Any split of the keys into pieces gives the same attention once the pieces' partial results are
merged by their log-sum-exp; this is what lets the KV live in several places at once. This module
is the plain PyTorch path, used for prefill and wherever no faster kernel applies.
"""

from __future__ import annotations

import torch

from .gpu_kernels import merge_two as gpu_merge_two

# Upper bound on the elements of one score matrix; long query chunks are processed in slices.
_MAX_SCORE_ELEMENTS = 1 << 26


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    key_pos: torch.Tensor,
    q_pos: torch.Tensor | None = None,
    key_valid: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped-query attention of `q` over one piece of keys and values.

    Args:
        q: [B, Hq, Lq, D] queries.
        k, v: [B, Hkv, S, D] keys and values of the piece (Hq a multiple of Hkv).
        scale: multiplier of q.k.
        key_pos: [S] absolute positions of the piece's keys.
        q_pos: [Lq] absolute positions of the queries; None when every key precedes every query.
        key_valid: [B, S] bool, False for padding keys; None when all are valid.
        sliding_window: a query at p sees keys at positions > p - sliding_window; None for no limit.

    Returns:
        out [B, Hq, Lq, D] float32 and lse [B, Hq, Lq] float32; a query that sees no key gets
        out 0 and lse -inf.
    """
    B, Hq, Lq, D = q.shape
    S = k.shape[2]
    if S == 0:
        return _empty(q)
    if key_valid is None and sliding_window is None and _flash_applies(q, k):
        causal = q_pos is not None
        # A causal piece qualifies only when it is the queries' own tokens (the same positions object).
        if not causal or (q_pos is key_pos and Lq == S):
            return _flash(q, k, v, scale, causal)
    step = max(1, _MAX_SCORE_ELEMENTS // max(1, B * Hq * S))
    if Lq <= step:
        return _attend_slice(q, k, v, scale, key_pos, q_pos, key_valid, sliding_window)
    outs, lses = [], []
    for start in range(0, Lq, step):
        sl = slice(start, start + step)
        out, lse = _attend_slice(
            q[:, :, sl], k, v, scale, key_pos, None if q_pos is None else q_pos[sl], key_valid, sliding_window
        )
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


def _attend_slice(q, k, v, scale, key_pos, q_pos, key_valid, sliding_window):
    B, Hq, Lq, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    qf = q.float().reshape(B, Hkv, G * Lq, D)
    scores = torch.matmul(qf, k.float().transpose(-1, -2)).mul_(scale).view(B, Hkv, G, Lq, S)
    allowed = _allowed(B, Lq, key_pos, q_pos, key_valid, sliding_window)
    if allowed is not None:
        scores.masked_fill_(~allowed, float("-inf"))
    m = scores.amax(dim=-1, keepdim=True)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m_safe)
    total = p.sum(dim=-1, keepdim=True)
    out = torch.matmul(p.view(B, Hkv, G * Lq, S), v.float()).view(B, Hkv, G, Lq, D)
    out = torch.where(total > 0, out / total.clamp_min(1e-30), torch.zeros_like(out))
    lse = (m_safe + torch.log(total)).squeeze(-1)
    return out.reshape(B, Hq, Lq, D), lse.reshape(B, Hq, Lq)


def _flash_applies(q: torch.Tensor, k: torch.Tensor) -> bool:
    return (
        q.is_cuda
        and q.dtype in (torch.float16, torch.bfloat16)
        and k.dtype == q.dtype
        and q.shape[-1] % 8 == 0
        and q.shape[-1] <= 256
    )


def _flash(q, k, v, scale, causal):
    """FlashAttention through PyTorch's kernel, which also returns the log-sum-exp we merge by.

    Without causality the G query heads of a KV head fold into the query axis, so K and V are read
    once per KV head; a causal chunk attends to itself, so there K and V are repeated instead.
    """
    B, Hq, Lq, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    if causal:
        if G > 1:
            k = k.repeat_interleave(G, dim=1)
            v = v.repeat_interleave(G, dim=1)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
            q.contiguous(), k.contiguous(), v.contiguous(), 0.0, True, False, scale=scale
        )[:2]
        return out.float(), lse.float()
    qf = q.reshape(B, Hkv, G * Lq, D)
    out, lse = torch.ops.aten._scaled_dot_product_flash_attention(
        qf.contiguous(), k.contiguous(), v.contiguous(), 0.0, False, False, scale=scale
    )[:2]
    return out.float().reshape(B, Hq, Lq, D), lse.float().reshape(B, Hq, Lq)


def _allowed(B, Lq, key_pos, q_pos, key_valid, sliding_window):
    """Boolean [B|1, 1, 1, Lq|1, S] of the (query, key) pairs that may attend, or None for all."""
    allowed = None
    if key_valid is not None:
        allowed = key_valid[:, None, None, None, :]
    if q_pos is not None:
        causal = key_pos[None, :] <= q_pos[:, None]
        if sliding_window is not None:
            causal &= key_pos[None, :] > q_pos[:, None] - sliding_window
        causal = causal[None, None, None]
        allowed = causal if allowed is None else allowed & causal
    return allowed


def _empty(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    B, Hq, Lq, D = q.shape
    out = torch.zeros(B, Hq, Lq, D, dtype=torch.float32, device=q.device)
    lse = torch.full((B, Hq, Lq), float("-inf"), dtype=torch.float32, device=q.device)
    return out, lse


class PartialMerger:
    """Accumulates (out, lse) pieces; `result()` is the attention over their union.

    On CUDA, contiguous float32 pieces merge in place into the first piece's tensors, in one Triton
    launch each (the host thread's time between a layer's CPU part and the next is on `split`'s
    critical path, and the PyTorch merge is a dozen launches).
    """

    def __init__(self) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        if self.out is None:
            self.out, self.lse = out, lse
            return
        if out.is_cuda:
            self.out, self.lse = gpu_merge_two(self.out, self.lse, out, lse)
        else:
            self.out, self.lse = merge_two(self.out, self.lse, out, lse)

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.out is None:
            raise ValueError("no partial attention to merge")
        return self.out, self.lse


def merge_two(out_a, lse_a, out_b, lse_b):
    """Exact merge of two partial attentions over disjoint key sets; -inf safe."""
    m = torch.maximum(lse_a, lse_b)
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    wa = torch.exp(lse_a - m_safe)
    wb = torch.exp(lse_b - m_safe)
    total = wa + wb
    denom = total.clamp_min(1e-30).unsqueeze(-1)
    out = (out_a * wa.unsqueeze(-1) + out_b * wb.unsqueeze(-1)) / denom
    return out, m_safe + torch.log(total)
