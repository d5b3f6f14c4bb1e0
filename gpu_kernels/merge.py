"""Exact merge of partial attentions over disjoint key sets by their log-sum-exp."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler import CompiledKernel

from . import reference
from ._dispatch import next_pow2, run_compiled, use_triton


@triton.jit
def merge_rows(outs, lses, out, lse, P, R, r0, n_rows,
               D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_P: tl.constexpr):
    """Merge rows r0 .. r0 + n_rows - 1 of contiguous partials outs [P, R, D], lses [P, R] into
    out [R, D], lse [R]. Loads bypass L1: the partials may have been written by other programs
    of the same launch."""
    offs_r = r0 + tl.arange(0, BLOCK_R)
    offs_d = tl.arange(0, BLOCK_D)
    mask_r = offs_r < r0 + n_rows
    mask_rd = mask_r[:, None] & (offs_d < D)[None, :]
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, BLOCK_D), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        offs_p = p0 + tl.arange(0, BLOCK_P)
        mask_pr = (offs_p < P)[:, None] & mask_r[None, :]
        l = tl.load(lses + offs_p[:, None].to(tl.int64) * R + offs_r[None, :], mask=mask_pr, other=float("-inf"),
                    cache_modifier=".cg")
        m_new = tl.maximum(m, tl.max(l, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        w = tl.exp(l - m_safe[None, :])
        o_ptr = outs + (offs_p[:, None, None].to(tl.int64) * R + offs_r[None, :, None]) * D + offs_d[None, None, :]
        o = tl.load(o_ptr, mask=mask_pr[:, :, None] & mask_rd[None, :, :], other=0.0, cache_modifier=".cg")
        # A partial with no keys may hold anything in out; its weight is 0 and must stay 0.
        o = tl.where(w[:, :, None] > 0, o, 0.0)
        alpha = tl.exp(m - m_safe)
        acc = acc * alpha[:, None] + tl.sum(o * w[:, :, None], 0)
        total = total * alpha + tl.sum(w, 0)
        m = m_new
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    result = tl.where(total[:, None] > 0, acc / tl.maximum(total, 1e-30)[:, None], 0.0)
    tl.store(out + offs_r[:, None].to(tl.int64) * D + offs_d[None, :], result, mask=mask_rd)
    lse_r = tl.where(total > 0, m_safe + tl.log(tl.maximum(total, 1e-30)), float("-inf"))
    tl.store(lse + offs_r, lse_r, mask=mask_r)


_BLOCK_P = 16  # partials merged per step of the merge kernel's loop


# P and R change from call to call: specializing on them would compile a variant per value class.
@triton.jit(do_not_specialize=["P", "R"])
def _merge_partials_kernel(outs, lses, out, lse, P, R,
                           D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_P: tl.constexpr):
    merge_rows(outs, lses, out, lse, P, R, tl.program_id(0), 1, D, BLOCK_D, 1, BLOCK_P)


@triton.jit
def _merge_two_kernel(out_a, lse_a, out_b, lse_b, D: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    la = tl.load(lse_a + row)
    lb = tl.load(lse_b + row)
    m = tl.maximum(la, lb)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - m_safe)
    wb = tl.exp(lb - m_safe)
    oa = tl.load(out_a + row * D + offs_d, mask=mask_d)
    ob = tl.load(out_b + row * D + offs_d, mask=mask_d)
    total = wa + wb
    merged = tl.where(wa > 0, oa * wa, 0.0) + tl.where(wb > 0, ob * wb, 0.0)
    merged = tl.where(total > 0, merged / tl.maximum(total, 1e-30), 0.0)
    tl.store(out_a + row * D + offs_d, merged, mask=mask_d)
    tl.store(lse_a + row, tl.where(total > 0, m_safe + tl.log(tl.maximum(total, 1e-30)), float("-inf")))


def merge_partials(outs: torch.Tensor, lses: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of P disjoint key sets from their partial results.

    Args:
        outs: float32 [P, B, Hq, D], each partial's normalised output.
        lses: float32 [P, B, Hq], each partial's log-sum-exp (-inf for an empty key set).

    Returns:
        out float32 [B, Hq, D] and lse float32 [B, Hq]; rows empty in every partial get 0 and -inf.
    """
    P, B, Hq, D = outs.shape
    if lses.shape != (P, B, Hq):
        raise ValueError(f"lses: expected {(P, B, Hq)}, got {tuple(lses.shape)}")
    if not use_triton(outs, lses):
        return reference.merge_partials(outs.float(), lses.float())
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=outs.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=outs.device)
    if B * Hq == 0:
        return out, lse
    outs = outs.float().contiguous()
    lses = lses.float().contiguous()
    _merge_partials_kernel[(B * Hq,)](outs, lses, out, lse, P, B * Hq, D=D, BLOCK_D=next_pow2(D), BLOCK_P=_BLOCK_P)
    return out, lse


_flat_kernels: dict = {}


def merge_flat(work: torch.Tensor, P: int, B: int, Hq: int, D: int, device, stream) -> tuple[torch.Tensor, torch.Tensor]:
    """`merge_partials` of P partials laid out flat in float32 `work` (out [P, B*Hq, D], then lse
    [P, B*Hq]; on CUDA, or on the CPU in Triton's interpreter), with little host time: the compiled
    kernel is kept per kind of call and launched directly on `stream` (`device` and `stream` as
    Triton's driver names them)."""
    R = B * Hq
    out = torch.empty(B, Hq, D, dtype=torch.float32, device=work.device)
    lse = torch.empty(B, Hq, dtype=torch.float32, device=work.device)
    lses = work[P * R * D:]
    args = (work, lses, out, lse, P, R, D, next_pow2(D), _BLOCK_P)
    key = (device, D, lses.data_ptr() % 16 == 0)
    kernel = _flat_kernels.get(key)
    if kernel is None:
        kernel = _merge_partials_kernel[(R,)](*args)
        if isinstance(kernel, CompiledKernel):
            _flat_kernels[key] = kernel
    else:
        run_compiled(kernel, (R, 1), stream, args)
    return out, lse


def merge_two(out_a, lse_a, out_b, lse_b):
    """Merge partial b into partial a in place (contiguous float32 [..., D] and [...]); returns a."""
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or lse_a.shape != out_a.shape[:-1]:
        raise ValueError("merge_two: shapes of the two partials differ")
    tensors = (out_a, lse_a, out_b, lse_b)
    if not use_triton(*tensors) or not all(t.is_contiguous() and t.dtype == torch.float32 for t in tensors):
        return reference.merge_two(out_a, lse_a, out_b, lse_b)
    D = out_a.shape[-1]
    rows = lse_a.numel()
    if rows:
        _merge_two_kernel[(rows,)](out_a, lse_a, out_b, lse_b, D=D, BLOCK_D=next_pow2(D))
    return out_a, lse_a
