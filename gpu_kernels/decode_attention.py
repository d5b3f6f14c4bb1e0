"""GQA decode attention (one query token per row) over KV segments on the GPU, split-K.

Each segment's tokens are split into ranges across programs (flash-decoding), so that a batch of
one with a few KV heads still fills the GPU; every program reads its K and V tiles once for all
G query heads of its KV head and writes a partial (out, lse). One merge over every partial of
every segment gives the result: by default done by the last program of each (b, KV head) of the
last launch (one launch per segment, nothing more), or by a separate merge kernel.

Measured on the H100 (bench/bench_gpu_kernels.py): the fused merge saves ~70 us of host time
per call (111 vs 181 us at B=1) and costs up to ~6% of GPU time at B=1, 128K (its merge runs
in one program per KV head); under CUDA graphs, where host time vanishes, prefer
DecodeLaunch(fused_merge=False).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import INTERPRET, next_pow2, use_triton
from .merge import merge_partials, merge_rows
from .segment import Segment

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch shape of the split kernel.

    block_n: tokens per tile; programs_per_sm: how many programs to aim for per SM;
    min_split: fewest tokens a program takes (a multiple of block_n), so short rows stay unsplit;
    fused_merge: the last program of each (b, KV head) merges the partials, instead of a second
    kernel (one launch fewer: less host time per call).
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: int = 2
    min_split: int = 256
    fused_merge: bool = True


_DEFAULT_LAUNCH = DecodeLaunch()


# Runtime sizes change as a context grows: specializing on them (Triton's default, by divisibility)
# would recompile the kernel in the middle of a generation.
@triton.jit(do_not_specialize=["B", "Hkv", "cap", "split_tokens", "split_offset", "P"])
def _decode_split_kernel(
    q, k, v, table, length, start, o_part, l_part, arrivals, out, lse,
    q_b, q_h, q_d,
    k_b, k_h, k_blk, k_tok, k_d,
    v_b, v_h, v_blk, v_tok, v_d,
    len_b, len_h,
    B, Hkv, cap, split_tokens, split_offset, P, scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_LEN: tl.constexpr,
    HAS_START: tl.constexpr, QK_F32: tl.constexpr, PV_F32: tl.constexpr,
    MERGE: tl.constexpr, MERGE_R: tl.constexpr, MERGE_P: tl.constexpr,
):
    split = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    lo = split * split_tokens
    hi = tl.minimum(lo + split_tokens, cap)
    if HAS_LEN:
        hi = tl.minimum(hi, tl.load(length + b * len_b + h * len_h))
    first = 0
    begin = lo
    if HAS_START:
        first = tl.load(start + b)
        # Tiles stay aligned to multiples of BLOCK_N; the tokens before `first` are masked.
        begin = tl.maximum(lo, (first // BLOCK_N) * BLOCK_N)
        # Every tile the loop visits then holds a valid token, so the running max stays finite.
        hi = tl.where(tl.maximum(lo, first) < hi, hi, 0)

    offs_g = tl.arange(0, BLOCK_G)
    offs_d = tl.arange(0, BLOCK_D)
    mask_g = offs_g < G
    mask_d = offs_d < D
    q_rows = q + b.to(tl.int64) * q_b + (h * G + offs_g[:, None]) * q_h + offs_d[None, :] * q_d
    qt = tl.load(q_rows, mask=mask_g[:, None] & mask_d[None, :], other=0.0)
    if QK_F32:
        qt = qt.to(tl.float32)
    k_head = k + b.to(tl.int64) * k_b + h.to(tl.int64) * k_h
    v_head = v + b.to(tl.int64) * v_b + h.to(tl.int64) * v_h

    m_i = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), tl.float32)
    for t0 in range(begin, hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = (t < hi) & (t >= first)
        if BS == 0:
            k_rows = t.to(tl.int64) * k_tok
            v_rows = t.to(tl.int64) * v_tok
        else:
            blk = t // BS
            if HAS_TABLE:
                blk = tl.load(table + blk, mask=valid, other=0)
            blk = blk.to(tl.int64)
            k_rows = blk * k_blk + (t % BS) * k_tok
            v_rows = blk * v_blk + (t % BS) * v_tok
        mask_kv = valid[:, None] & mask_d[None, :]
        kt = tl.load(k_head + k_rows[:, None] + offs_d[None, :] * k_d, mask=mask_kv, other=0.0)
        # V is requested before the scores are computed so that both loads are in flight at once.
        vt = tl.load(v_head + v_rows[:, None] + offs_d[None, :] * v_d, mask=mask_kv, other=0.0)
        if QK_F32:
            s = tl.dot(qt, tl.trans(kt.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(qt, tl.trans(kt))
        s = tl.where(valid[None, :], s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if PV_F32:
            pv = tl.dot(p, vt.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(vt.dtype), vt)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    has = l_i > 0
    acc_out = tl.where(has[:, None], acc / tl.where(has, l_i, 1.0)[:, None], 0.0)
    acc_lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    # Partials are contiguous [P, R, D] and [P, R], R = B * Hq rows of (b, query head).
    R = B * Hkv * G
    rows = (split_offset + split).to(tl.int64) * R + bh * G + offs_g
    tl.store(o_part + rows[:, None] * D + offs_d[None, :], acc_out, mask=mask_g[:, None] & mask_d[None, :])
    tl.store(l_part + rows, acc_lse, mask=mask_g)

    if MERGE:
        # The last program of this (b, KV head) to finish merges its G rows over all P partials
        # (those of earlier launches are complete by stream order). The barrier puts every
        # thread's stores before the release; the acquire puts them before the merge's loads.
        tl.debug_barrier()
        arrived = tl.atomic_add(arrivals + bh, 1, sem="acq_rel", scope="gpu")
        if arrived == tl.num_programs(0) - 1:
            merge_rows(o_part, l_part, out, lse, P, R, bh * G, G, D, BLOCK_D, MERGE_R, MERGE_P)


def decode_attention(q: torch.Tensor, segments: list[Segment], scale: float,
                     launch: DecodeLaunch | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention of q over the union of the segments' valid tokens.

    Args:
        q: [B, Hq, D] bf16, fp16 or fp32; Hq = G * Hkv, query head h reads KV head h // G.
        segments: pieces of the KV cache (see Segment); K and V of one dtype per segment.
        scale: multiplier of q . k.
        launch: launch shape of the split kernel; None for the default.

    Returns:
        out float32 [B, Hq, D] and lse float32 [B, Hq] (natural log); a row with no valid token
        gets out 0 and lse -inf.
    """
    B, Hq, D = q.shape
    for seg in segments:
        if seg.k.shape[0] != B or Hq % seg.k.shape[1] or seg.k.shape[-1] != D:
            raise ValueError(f"segment k {tuple(seg.k.shape)} does not fit q {tuple(q.shape)}")
    tensors = [q] + [t for s in segments for t in (s.k, s.v, s.length, s.start, s.block_table) if t is not None]
    if not use_triton(*tensors) or B == 0 or not segments:
        return reference.decode_attention(q, segments if B else [], scale)
    launch = launch or _DEFAULT_LAUNCH
    block_n = launch.block_n if D <= 128 else min(launch.block_n, 32)
    splits = [_split_count(s, block_n, launch, q.device) for s in segments]
    P = sum(n for n, _ in splits)
    o_part = torch.empty(P, B, Hq, D, dtype=torch.float32, device=q.device)
    l_part = torch.empty(P, B, Hq, dtype=torch.float32, device=q.device)
    fused = None
    if launch.fused_merge:
        out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
        fused = (torch.zeros(B * segments[-1].k.shape[1], dtype=torch.int32, device=q.device), out, lse)
    offset = 0
    for i, (seg, (n_splits, split_tokens)) in enumerate(zip(segments, splits)):
        merge = fused if i == len(segments) - 1 else None
        _launch_segment(q, seg, scale, o_part, l_part, offset, P, n_splits, split_tokens, block_n, launch, merge)
        offset += n_splits
    if fused is not None:
        return fused[1], fused[2]
    return merge_partials(o_part, l_part)


def _split_count(seg: Segment, block_n: int, launch: DecodeLaunch, device) -> tuple[int, int]:
    """(programs per row, tokens per program) for one segment."""
    B, Hkv = seg.k.shape[:2]
    tiles = max(1, triton.cdiv(seg.capacity, block_n))
    want = triton.cdiv(launch.programs_per_sm * _sm_count(device), max(1, B * Hkv))
    most = max(1, seg.capacity // max(launch.min_split, block_n))
    n_splits = max(1, min(want, most, tiles))
    split_tokens = triton.cdiv(tiles, n_splits) * block_n
    return triton.cdiv(max(1, seg.capacity), split_tokens), split_tokens


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    if INTERPRET or torch.device(device).type != "cuda":
        return 2  # few programs keep the interpreter fast, yet still split long rows
    return torch.cuda.get_device_properties(device).multi_processor_count


def _launch_segment(q, seg, scale, o_part, l_part, offset, P, n_splits, split_tokens, block_n, launch, merge):
    """One split kernel over one segment; `merge` = (arrivals, out, lse) when it also merges."""
    B, Hq, D = q.shape
    Hkv = seg.k.shape[1]
    G = Hq // Hkv
    k, v = seg.k, seg.v
    if seg.blocked:
        k_strides, v_strides, bs = k.stride(), v.stride(), k.shape[3]
    else:  # a dense segment: no block axis
        k_strides = (k.stride(0), k.stride(1), 0, k.stride(2), k.stride(3))
        v_strides = (v.stride(0), v.stride(1), 0, v.stride(2), v.stride(3))
        bs = 0
    length = seg.length
    len_strides = (0, 0)
    if length is not None:
        len_strides = (length.stride(0), 0) if length.dim() == 1 else tuple(length.stride())
    dummy = o_part  # stands in for absent pointer arguments; never read
    arrivals, out, lse = merge if merge is not None else (dummy, dummy, dummy)
    block_d = max(16, next_pow2(D))
    merge_r = next_pow2(G)
    # Triton 3.6's interpreter multiplies bf16 operands of tl.dot as raw bits; there, bf16 goes in fp32.
    half = (torch.float16,) if INTERPRET else (torch.float16, torch.bfloat16)
    _decode_split_kernel[(n_splits, B * Hkv)](
        q, k, v,
        seg.block_table if seg.block_table is not None else dummy,
        length if length is not None else dummy,
        seg.start if seg.start is not None else dummy,
        o_part, l_part, arrivals, out, lse,
        *q.stride(), *k_strides, *v_strides, *len_strides,
        B, Hkv, seg.capacity, split_tokens, offset, P, scale * _LOG2E,
        G=G, BLOCK_G=max(16, next_pow2(G)), D=D, BLOCK_D=block_d, BLOCK_N=block_n, BS=bs,
        HAS_TABLE=seg.block_table is not None, HAS_LEN=length is not None, HAS_START=seg.start is not None,
        QK_F32=not (q.dtype == k.dtype and k.dtype in half), PV_F32=v.dtype not in half,
        MERGE=merge is not None, MERGE_R=merge_r, MERGE_P=max(2, min(16, 4096 // (merge_r * block_d))),
        num_warps=launch.num_warps, num_stages=launch.num_stages,
    )
