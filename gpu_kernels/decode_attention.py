"""GQA decode attention (one query token per row) over KV segments on the GPU, split-K.

Each segment's tokens are split into ranges across programs (flash-decoding), so that a batch of
one with a few KV heads still fills the GPU; every program reads its K and V tiles once for all
G query heads of its KV head and writes a partial (out, lse). One merge over every partial of
every segment gives the result: by default done by the last program of each (b, KV head) of the
last launch (one launch per segment, nothing more), or by a separate merge kernel.

On Hopper and later, the K and V tiles of a 16-bit segment whose tiles are consecutive rows in
memory (dense, or blocks a whole number of tiles long) come by the tensor memory accelerator,
through tensor descriptors made on the host; Triton's software pipeline keeps num_stages - 1 of
them in flight. Other segments are read by the threads' own loads.

Host time per call counts as much as GPU time here (one call per layer per decode step, and a
slow host): launch parameters are cached per geometry, the kernel compiled for it is launched
directly (Triton's argument binding skipped; tensor descriptors encoded once per buffer and
kept), the partials and both results take one allocation each, and the arrival counters of the
fused merge live across calls (the last program of each row resets its own), so no memset runs
per call.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from triton import knobs
from triton.compiler import CompiledKernel
from triton.runtime import driver
from triton.tools.tensor_descriptor import TensorDescriptor

from . import reference
from ._dispatch import INTERPRET, launch_hooked, next_pow2, run_compiled
from .merge import merge_flat, merge_rows
from .segment import Segment

_LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    """Launch shape of the split kernel.

    block_n: tokens per tile; programs_per_sm: programs to aim for per SM (the split count per
    row is rounded down, so that the grid is at most that many programs per SM: a partial second
    wave would cost as much as a full one); min_split: fewest tokens a program takes (a multiple
    of block_n), so short rows stay unsplit; fused_merge: the last program of each (b, KV head)
    merges the partials, instead of a second kernel (one launch fewer: less host time per call);
    tma: K and V tiles come by the tensor memory accelerator (Hopper and later) wherever a segment
    allows it (16-bit K, V and query of one dtype; rows of a tile consecutive in memory), which
    keeps more bytes in flight per program than the threads' own loads.
    """

    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 3
    programs_per_sm: float = 2
    min_split: int = 256
    fused_merge: bool = True
    tma: bool = True


@dataclass(frozen=True)
class _Launches:
    """A default launch shape, and another for calls over at most `most_rows` (batch row, KV head)
    rows and at least `least_tokens` of batch x tokens."""

    default: DecodeLaunch
    other: DecodeLaunch
    most_rows: int
    least_tokens: int


# Tuned on an H200 (bench_gpu_kernels.py --sweep, then --sections rounds, 2026-12-01). Tiles by the
# tensor memory accelerator are deep in flight (num_stages - 1 of them), so one program per SM fills
# the GPU. Merging in the last program of each row saves a launch and host time; at batch 8 it is
# about as fast on the GPU as the merge kernel (within 1% at 32K; at 64K and 128K level, or 1-3%
# faster in two of three runs), and at batch 1 the slower (1.02-1.07x SDPA against 0.995-1.007x,
# eager calls), where a call is GPU-bound from about 64K tokens. The threads' own loads are not
# pipelined by Triton here, and need more programs per SM.
_TMA_LAUNCHES = _Launches(
    DecodeLaunch(block_n=128, num_warps=4, num_stages=3, programs_per_sm=1, fused_merge=True),
    DecodeLaunch(block_n=128, num_warps=8, num_stages=3, programs_per_sm=1, fused_merge=False),
    most_rows=16, least_tokens=64 * 1024)
_THREAD_LAUNCHES = _Launches(
    DecodeLaunch(block_n=128, num_warps=4, num_stages=3, programs_per_sm=2, fused_merge=True),
    DecodeLaunch(block_n=64, num_warps=4, num_stages=2, programs_per_sm=4, fused_merge=False),
    most_rows=1 << 62, least_tokens=256 * 1024)


def default_launches(q: torch.Tensor) -> tuple[DecodeLaunch, DecodeLaunch]:
    """The launch shapes calls with this query may take (what a caller compiles ahead)."""
    launches = _launches(q)
    return launches.default, launches.other


def default_launch(q: torch.Tensor, kv_heads: int, tokens: int) -> DecodeLaunch:
    """The launch shape for `q`'s rows over `kv_heads` KV heads of about `tokens` tokens each."""
    launches = _launches(q)
    B = q.shape[0]
    if B * kv_heads <= launches.most_rows and B * tokens >= launches.least_tokens:
        return launches.other
    return launches.default


def _launches(q: torch.Tensor) -> _Launches:
    tma = q.dtype in (torch.float16, torch.bfloat16) and _has_tma(q.device)
    return _TMA_LAUNCHES if tma else _THREAD_LAUNCHES


# Runtime sizes change as a context grows: specializing on them (Triton's default, by divisibility)
# would recompile the kernel in the middle of a generation.
@triton.jit(do_not_specialize=["B", "Hkv", "cap", "split_tokens", "split_offset", "P"])
def _decode_split_kernel(
    q, k, v, k_desc, v_desc, table, length, start, work, arrivals, out, lse,
    q_b, q_h, q_d,
    k_b, k_h, k_blk, k_tok, k_d,
    v_b, v_h, v_blk, v_tok, v_d,
    len_b, len_h,
    B, Hkv, cap, split_tokens, split_offset, P, scale_log2,
    G: tl.constexpr, BLOCK_G: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr, BS: tl.constexpr, HAS_TABLE: tl.constexpr, HAS_LEN: tl.constexpr,
    HAS_START: tl.constexpr, QK_F32: tl.constexpr, PV_F32: tl.constexpr,
    MERGE: tl.constexpr, MERGE_R: tl.constexpr, MERGE_P: tl.constexpr, TMA: tl.constexpr,
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
    if BLOCK_D == D:  # an all-true constant: the loads and stores go unmasked along D
        mask_d = tl.full((BLOCK_D,), 1, tl.int1)
    else:
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
    if TMA:  # each row's first row in the descriptors' [rows, D] views (the host checked the strides divide)
        k_first = (b.to(tl.int64) * k_b + h.to(tl.int64) * k_h) // k_tok
        v_first = (b.to(tl.int64) * v_b + h.to(tl.int64) * v_h) // v_tok
    if BS != 0 and BS % BLOCK_N == 0 and HAS_TABLE:
        # Tiles start at multiples of BLOCK_N, so a tile lies in one block: one table entry per
        # tile, read a tile ahead, so that no load of this tile waits on a load of the same tile
        # (the software pipeline would spend a stage on that chain, leaving fewer tiles in flight).
        blk_next = tl.load(table + begin // BS, mask=begin < hi, other=0)
    for t0 in range(begin, hi, BLOCK_N):
        t = t0 + tl.arange(0, BLOCK_N)
        valid = (t < hi) & (t >= first)
        if BS != 0 and BS % BLOCK_N == 0:
            # The tile's rows are consecutive in memory.
            if HAS_TABLE:
                blk0 = blk_next.to(tl.int64)
                blk_next = tl.load(table + (t0 + BLOCK_N) // BS, mask=t0 + BLOCK_N < hi, other=0)
            else:
                blk0 = (t0 // BS).to(tl.int64)
        if TMA:
            # The tensor memory accelerator copies the tile into shared memory, K and V each in one
            # request; rows past the view read as zeros, and rows beyond `hi` are masked below.
            if BS == 0:
                k_at = k_first + t0
                v_at = v_first + t0
            else:
                k_at = k_first + blk0 * (k_blk // k_tok) + t0 % BS
                v_at = v_first + blk0 * (v_blk // v_tok) + t0 % BS
            kt = k_desc.load([k_at.to(tl.int32), 0])
            # Rows past the valid ones may hold anything, NaN too: p is 0 there, but 0 * NaN is not.
            vt = tl.where(valid[:, None], v_desc.load([v_at.to(tl.int32), 0]), 0.0)
        else:
            if BS == 0:
                k_rows = t.to(tl.int64) * k_tok
                v_rows = t.to(tl.int64) * v_tok
            elif BS % BLOCK_N == 0:
                k_rows = blk0 * k_blk + (t % BS) * k_tok
                v_rows = blk0 * v_blk + (t % BS) * v_tok
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
    # `work` holds the partials: out [P, R, D] then lse [P, R], R = B * Hq rows of (b, query head).
    R = B * Hkv * G
    o_part = work
    l_part = work + P.to(tl.int64) * R * D
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
            # Every program of this row has arrived: the counter is free for the next call.
            tl.store(arrivals + bh, 0)


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
        shape = seg.k.shape
        if shape[0] != B or Hq % shape[1] or shape[-1] != D:
            raise ValueError(f"segment k {tuple(shape)} does not fit q {tuple(q.shape)}")
    if B == 0 or not segments or not (INTERPRET or _all_cuda(q, segments)):
        return reference.decode_attention(q, segments if B else [], scale)
    launch = launch or default_launch(q, segments[0].k.shape[1], sum(seg.capacity for seg in segments))
    fused = launch.fused_merge
    device = None if INTERPRET else driver.active.get_current_device()
    last = len(segments) - 1
    plans = [_plan(q, seg, launch, fused and i == last, device) for i, seg in enumerate(segments)]  # (plan, rows)
    sms = _sm_count(q.device)
    caps, splits, P = [], [], 0
    for seg, (plan, _) in zip(segments, plans):
        cap = seg.capacity
        if plan.int_length:
            cap = max(0, min(cap, seg.length))
        n_splits, split_tokens = _split_count(cap, B * plan.hkv, plan.block_n, launch, sms)
        caps.append(cap)
        splits.append((n_splits, split_tokens))
        P += n_splits
    R = B * Hq
    work = torch.empty(P * R * (D + 1), dtype=torch.float32, device=q.device)
    stream = None if INTERPRET else driver.active.get_current_stream(device)
    if fused:
        out = torch.empty(B, Hq, D, dtype=torch.float32, device=q.device)
        lse = torch.empty(B, Hq, dtype=torch.float32, device=q.device)
        arrivals = _arrivals(q.device, device, stream, B * plans[-1][0].hkv)
    else:
        out = lse = arrivals = work  # stand-ins, never touched without MERGE
    scale_log2 = scale * _LOG2E
    offset = 0
    for seg, (plan, rows), cap, (n_splits, split_tokens) in zip(segments, plans, caps, splits):
        length = seg.length
        descs = plan.descriptors(seg.k, seg.v, rows) if plan.tma else (seg.k, seg.v)
        args = (q, seg.k, seg.v, *descs,
                work if seg.block_table is None else seg.block_table,
                work if length is None or plan.int_length else length,
                work if seg.start is None else seg.start,
                work, arrivals, out, lse, *plan.strides,
                B, plan.hkv, cap, split_tokens, offset, P, scale_log2, *plan.constexprs)
        _launch(plan, (n_splits, B * plan.hkv, 1), stream, args)
        offset += n_splits
    if fused:
        return out, lse
    return merge_flat(work, P, B, Hq, D, device, stream)


def _all_cuda(q: torch.Tensor, segments: list[Segment]) -> bool:
    if not q.is_cuda:
        return False
    for seg in segments:
        if not (seg.k.is_cuda and seg.v.is_cuda):
            return False
        for t in (seg.length, seg.start, seg.block_table):
            if isinstance(t, torch.Tensor) and not t.is_cuda:
                return False
    return True


class _Plan:
    """What one kind of segment needs for a launch, apart from the sizes that change per call."""

    __slots__ = ("hkv", "block_n", "block", "tma", "int_length", "strides", "constexprs", "num_warps", "num_stages",
                 "kernel", "direct")

    def __init__(self, q, seg: Segment, launch: DecodeLaunch, merge: bool, tma_spans: bool):
        _, Hq, D = q.shape
        k, v = seg.k, seg.v
        self.hkv = Hkv = k.shape[1]
        G = Hq // Hkv
        self.block_n = block_n = launch.block_n if D <= 128 else min(launch.block_n, 32)
        if seg.blocked:
            k_strides, v_strides, bs = k.stride(), v.stride(), k.shape[3]
        else:  # a dense segment: no block axis
            k_strides = (k.stride(0), k.stride(1), 0, k.stride(2), k.stride(3))
            v_strides = (v.stride(0), v.stride(1), 0, v.stride(2), v.stride(3))
            bs = 0
        length = seg.length
        self.int_length = isinstance(length, int)
        has_len = length is not None and not self.int_length
        len_strides = (0, 0)
        if has_len:
            len_strides = (length.stride(0), 0) if length.dim() == 1 else tuple(length.stride())
        self.strides = (*q.stride(), *k_strides, *v_strides, *len_strides)
        block_d = max(16, next_pow2(D))
        self.block = (block_n, block_d)  # a tensor descriptor's tile
        merge_r = next_pow2(G)
        # Triton 3.6's interpreter multiplies bf16 operands of tl.dot as raw bits; there, bf16 goes in fp32.
        half = (torch.float16,) if INTERPRET else (torch.float16, torch.bfloat16)
        self.tma = (launch.tma and tma_spans and q.dtype == k.dtype == v.dtype and k.dtype in half
                    and (bs == 0 or bs % block_n == 0) and _has_tma(q.device)
                    and all(_rows_divide(t) for t in (k, v)))
        self.constexprs = (
            G, max(16, next_pow2(G)), D, block_d, block_n, bs,
            seg.block_table is not None, has_len, seg.start is not None,
            not (q.dtype == k.dtype and k.dtype in half), v.dtype not in half,
            merge, merge_r, max(2, min(16, 4096 // (merge_r * block_d))), self.tma,
        )
        self.num_warps, self.num_stages = launch.num_warps, launch.num_stages
        self.kernel = None  # the compiled kernel, once Triton has chosen it for these arguments
        self.direct = None  # its _DescriptorLaunch, when K and V come as tensor descriptors

    def descriptors(self, k: torch.Tensor, v: torch.Tensor, rows: tuple[int, int]) -> tuple:
        """K's and V's tensor descriptors, over `rows` rows each, as this plan's launch takes them."""
        if self.direct is not None and not launch_hooked():
            return self.direct.encoded(k, 0, rows[0]), self.direct.encoded(v, 1, rows[1])
        return _descriptor(k, rows[0], self.block), _descriptor(v, rows[1], self.block)


_plans: dict = {}


def _plan(q, seg: Segment, launch: DecodeLaunch, merge: bool, device) -> tuple[_Plan, tuple[int, int]]:
    """The cached plan for this segment's kind, and the rows K and V span as [rows, D] matrices (0
    when the launch loads no tensor descriptors). The key holds everything Triton specializes the
    kernel on (dtypes, strides, 16-byte alignment of the pointers), so that the kernel compiled
    for one call is the one Triton would pick for every call of the same key."""
    k, v, length, start, table = seg.k, seg.v, seg.length, seg.start, seg.block_table
    ptrs = q.data_ptr() | k.data_ptr() | v.data_ptr()
    if isinstance(length, torch.Tensor):
        ptrs |= length.data_ptr()
        length_key = (length.dtype, length.stride())
    else:
        length_key = length is None
    if start is not None:
        ptrs |= start.data_ptr()
    if table is not None:
        ptrs |= table.data_ptr()
    aligned = ptrs & 15 == 0
    rows = (_rows_spanned(k), _rows_spanned(v)) if launch.tma else (0, 0)
    tma_spans = launch.tma and aligned and 0 < min(rows) and max(rows) < 2**31
    key = (device, launch, merge, tma_spans, q.dtype, q.shape[1:], q.stride(), k.dtype, v.dtype, k.shape[1:2], k.shape[3:],
           k.stride(), v.stride(), length_key, None if start is None else start.dtype,
           None if table is None else table.dtype, aligned)
    plan = _plans.get(key)
    if plan is None:
        plan = _plans[key] = _Plan(q, seg, launch, merge, tma_spans)
    return plan, rows


def _rows_divide(t: torch.Tensor) -> bool:
    """Whether K or V is a [rows, D] matrix that a tensor descriptor reads: the last axis
    contiguous, and every other axis's step a whole number of rows 16-byte aligned."""
    *steps, row, last = t.stride()
    return last == 1 and row > 0 and row * t.element_size() % 16 == 0 and all(s >= 0 and s % row == 0 for s in steps)


def _rows_spanned(t: torch.Tensor) -> int:
    """Rows of the [rows, D] view from `t`'s first element to its last row (0 when t is empty)."""
    strides = t.stride()
    row = strides[-2]
    if row <= 0 or t.numel() == 0:
        return 0
    last = 0
    for n, step in zip(t.shape[:-1], strides[:-1]):
        last += (n - 1) * step
    return last // row + 1


def _descriptor(t: torch.Tensor, rows: int, block: tuple[int, int]) -> TensorDescriptor:
    """The tensor descriptor of K or V as [rows, D] with tiles of `block` (columns past D read as 0)."""
    return TensorDescriptor(t, [rows, t.shape[-1]], [t.stride(-2), 1], list(block))


@functools.lru_cache(maxsize=None)
def _has_tma(device) -> bool:
    """Whether `device` has NVIDIA's tensor memory accelerator (Hopper on; ROCm reports its own
    capabilities through the same call)."""
    if INTERPRET:
        return True
    return (torch.device(device).type == "cuda" and torch.version.hip is None
            and torch.cuda.get_device_capability(device) >= (9, 0))


def _launch(plan: _Plan, grid, stream, args) -> None:
    kernel = plan.kernel
    if kernel is None:
        kernel = _decode_split_kernel[grid](*args, num_warps=plan.num_warps, num_stages=plan.num_stages)
        if isinstance(kernel, CompiledKernel):  # not in the interpreter
            plan.kernel = kernel
            plan.direct = _DescriptorLaunch.of(kernel, plan.block) if plan.tma else None
        return
    if plan.direct is not None and not isinstance(args[3], TensorDescriptor):
        plan.direct(grid, stream, args)
        return
    run_compiled(kernel, grid, stream, args)


class _DescriptorLaunch:
    """Launches a compiled kernel whose K and V are tensor descriptors with less host work than
    Triton's launcher, which encodes every descriptor anew on each call, after a Python pass over
    all the arguments: here each descriptor is encoded once per (address, rows, row step) and kept,
    and the launcher's C function is called with the encoded arguments directly. It relies on
    Triton 3.6's launcher; `of` gives None where that does not hold, and Triton's own path is used."""

    _KEPT = 512  # encoded descriptors kept: 128 bytes each, and stale ones are merely unused

    def __init__(self, kernel: CompiledKernel, launch, metas, encode, block: tuple[int, int]):
        self.kernel, self.launch, self.metas, self.encode, self.block = kernel, launch, metas, encode, block
        self.encoded_by_key: dict = {}

    @classmethod
    def of(cls, kernel: CompiledKernel, block: tuple[int, int]) -> "_DescriptorLaunch | None":
        try:
            from triton.backends.nvidia.driver import make_tensordesc_arg
            wrapper = kernel.run.launch
            free = dict(zip(wrapper.__code__.co_freevars, (cell.cell_contents for cell in wrapper.__closure__ or ())))
            launch, metas = free.get("launcher"), getattr(kernel.metadata, "tensordesc_meta", None)
            if launch is None or not metas or len(metas) != 2:
                return None
            if kernel.run.global_scratch_size or kernel.run.profile_scratch_size:
                return None
        except (AttributeError, ImportError, TypeError, ValueError):
            return None
        return cls(kernel, launch, metas, make_tensordesc_arg, block)

    def encoded(self, t: torch.Tensor, which: int, rows: int) -> tuple:
        """K's (which 0) or V's (1) descriptor over `rows` rows, as the launcher's C function takes it."""
        key = (t.data_ptr(), rows, t.stride(-2), t.shape[-1], which)
        arg = self.encoded_by_key.get(key)
        if arg is None:
            if len(self.encoded_by_key) >= self._KEPT:
                self.encoded_by_key.clear()
            arg = self.encoded_by_key[key] = tuple(self.encode(_descriptor(t, rows, self.block), self.metas[which]))
        return arg

    def __call__(self, grid, stream, args) -> None:
        kernel, run = self.kernel, self.kernel.run
        self.launch(grid[0], grid[1], 1, stream, kernel.function, run.launch_cooperative_grid, run.launch_pdl, None, None,
                    kernel.packed_metadata, None, None, knobs.runtime.launch_exit_hook,
                    *args[:3], *args[3], *args[4], *args[5:])


def _split_count(cap: int, rows: int, block_n: int, launch: DecodeLaunch, sms: int) -> tuple[int, int]:
    """(programs per row, tokens per program) for a segment of `cap` tokens and `rows` (b, KV head) rows."""
    tiles = max(1, -(-cap // block_n))
    want = max(1, int(launch.programs_per_sm * sms) // rows)
    most = max(1, cap // max(launch.min_split, block_n))
    split_tokens = -(-tiles // min(want, most, tiles)) * block_n
    return -(-max(1, cap) // split_tokens), split_tokens


@functools.lru_cache(maxsize=None)
def _sm_count(device) -> int:
    if INTERPRET or torch.device(device).type != "cuda":
        return 2  # few programs keep the interpreter fast, yet still split long rows
    return torch.cuda.get_device_properties(device).multi_processor_count


_arrival_counters: dict = {}


def _arrivals(where, device, stream, n: int) -> torch.Tensor:
    """Zeroed int32 counters, at least n, for the fused merge on this stream: kept across calls,
    since every launch leaves them at zero. Calls on one stream run in order, so one set per
    stream; a call being captured into a CUDA graph gets its own, zeroed within the graph."""
    if not INTERPRET and torch.cuda.is_current_stream_capturing():
        return torch.zeros(n, dtype=torch.int32, device=where)
    counters = _arrival_counters.get((device, stream))
    if counters is None or counters.numel() < n:
        counters = _arrival_counters[(device, stream)] = torch.zeros(max(n, 1024), dtype=torch.int32, device=where)
    return counters
