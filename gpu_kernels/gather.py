"""Gathers of KV rows or whole blocks into a GPU buffer, straight from pinned host memory or the GPU.

A pinned host tensor is handed to the kernel as it is: Triton's launcher asks the driver for the
device address of every pointer argument, and pinned memory allocated through CUDA is mapped into
the GPU's address space (UVA), so the kernel's loads travel over PCIe with no staging copy.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from ._dispatch import use_triton, next_pow2

# Tokens per program: each moves BLOCK_N K rows and BLOCK_N V rows, 16 bytes per thread per load.
_TOKENS_PER_PROGRAM = 64
# Elements per program of the whole-block copy.
_BLOCK_CHUNK = 8192


# The index rows' strides follow the selection's width, which grows with the context: specializing
# on their divisibility would recompile the kernel in the middle of a generation.
@triton.jit(do_not_specialize=["i_b", "i_h"])
def _gather_tokens_kernel(
    pool, table, idx, count, out,
    s_slot, s_kv, s_b, s_h, s_tok, s_d,
    i_b, i_h, i_n, c_b, c_h,
    o_kv, o_b, o_h, o_n, o_d,
    Hkv,
    BS: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // Hkv
    h = bh % Hkv
    n_valid = tl.load(count + b * c_b + h * c_h)
    n0 = pid_n * BLOCK_N
    if n0 < n_valid:
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_valid
        t = tl.load(idx + b * i_b + h * i_h + offs_n * i_n, mask=mask_n, other=0)
        slot = tl.load(table + t // BS, mask=mask_n, other=0).to(tl.int64)
        row = slot * s_slot + b.to(tl.int64) * s_b + h * s_h + (t % BS) * s_tok
        offs_d = tl.arange(0, BLOCK_D)
        mask = mask_n[:, None] & (offs_d < D)[None, :]
        src = pool + row[:, None] + offs_d[None, :] * s_d
        k = tl.load(src, mask=mask)
        v = tl.load(src + s_kv, mask=mask)
        dst = out + b.to(tl.int64) * o_b + h * o_h + offs_n[:, None].to(tl.int64) * o_n + offs_d[None, :] * o_d
        tl.store(dst, k, mask=mask)
        tl.store(dst + o_kv, v, mask=mask)


@triton.jit
def _gather_blocks_kernel(pool, slots, out, s_slot, o_slot, E, chunks, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    i = pid // chunks
    offs = (pid % chunks) * CHUNK + tl.arange(0, CHUNK)
    mask = offs < E
    slot = tl.load(slots + i).to(tl.int64)
    x = tl.load(pool + slot * s_slot + offs, mask=mask)
    tl.store(out + i.to(tl.int64) * o_slot + offs, x, mask=mask)


def gather_tokens(pool, block_table, token_idx, token_count, out, *, tokens_per_program=_TOKENS_PER_PROGRAM,
                  num_warps=4):
    """Copy selected token rows of K and V from a pool into a GPU buffer.

    Args:
        pool: [n_slots, 2, B, Hkv, bs, D], pinned host memory (read by the GPU over PCIe, zero-copy)
            or a CUDA tensor, any strides (a contiguous last axis gives 16-byte loads).
        block_table: int32 [n_blocks] on the GPU: logical block -> slot.
        token_idx: int32 [B, Hkv, N] logical token indices; only the first token_count[b, h] of
            each row are read.
        token_count: int32 [B, Hkv].
        out: [2, B, Hkv, N, D] on the GPU; rows past the count are left untouched.
        tokens_per_program, num_warps: launch shape (a power of two, and warps per program).

    Returns:
        out.
    """
    B, Hkv, N = token_idx.shape
    bs, D = pool.shape[4], pool.shape[5]
    if out.shape != (2, B, Hkv, N, D):
        raise ValueError(f"out: expected {(2, B, Hkv, N, D)}, got {tuple(out.shape)}")
    if not use_triton(out, block_table, token_idx, token_count):
        return reference.gather_tokens(pool, block_table, token_idx, token_count, out)
    _check_pool_readable(pool)
    if N == 0 or B * Hkv == 0:
        return out
    grid = (triton.cdiv(N, tokens_per_program), B * Hkv)
    _gather_tokens_kernel[grid](
        pool, block_table, token_idx, token_count, out,
        *pool.stride(), *token_idx.stride(), *token_count.stride(), *out.stride(),
        Hkv, BS=bs, D=D, BLOCK_D=next_pow2(D), BLOCK_N=tokens_per_program, num_warps=num_warps,
    )
    return out


def gather_blocks(pool, slots, out, *, chunk=_BLOCK_CHUNK, num_warps=4):
    """Copy whole blocks: out[i] = pool[slots[i]].

    Args:
        pool: [n_slots, 2, B, Hkv, bs, D], pinned host memory or a CUDA tensor, each block contiguous.
        slots: int32 [n] on the GPU.
        out: [n, 2, B, Hkv, bs, D] on the GPU, each block contiguous.
        chunk, num_warps: elements per program (a power of two) and warps per program.

    Returns:
        out.
    """
    n = slots.shape[0]
    if out.shape[0] != n or out.shape[1:] != pool.shape[1:]:
        raise ValueError(f"out: expected {(n, *pool.shape[1:])}, got {tuple(out.shape)}")
    if not use_triton(out, slots):
        return reference.gather_blocks(pool, slots, out)
    _check_pool_readable(pool)
    if n == 0 or out[0].numel() == 0:
        return out
    if not (pool[0].is_contiguous() and out[0].is_contiguous()):
        raise ValueError("each block of pool and out must be contiguous")
    E = out[0].numel()
    chunks = triton.cdiv(E, chunk)
    _gather_blocks_kernel[(n * chunks,)](pool, slots, out, pool.stride(0), out.stride(0), E, chunks,
                                         CHUNK=chunk, num_warps=num_warps)
    return out


_PINNED: set[int] = set()  # host addresses already seen pinned: asking CUDA costs time on every call


def _check_pool_readable(pool: torch.Tensor) -> None:
    # Pageable host memory is not mapped for the GPU; the launcher would fail with a vaguer error.
    if pool.device.type != "cpu" or not torch.cuda.is_available() or pool.data_ptr() in _PINNED:
        return
    if not pool.is_pinned():
        raise ValueError("a host pool must be pinned (torch.empty(..., pin_memory=True)) for the GPU to read it")
    _PINNED.add(pool.data_ptr())
