"""Measure, at load, the two bandwidths the `split` mode divides each layer's offloaded KV by.

PCIe: pinned host memory copied to the GPU, as the fetch ring copies it. CPU: the (already compiled)
Numba decode attention kernel scanning a host pool of the model's KV layout, with the configured
threads. Both over fresh buffers of a size that outgrows the caches, a couple of repeats each; the
whole probe takes well under a second on the GPU machine. Mechanism only: hetero.split_tuner turns
the two figures into a share.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from .cache import KVLayout
from .cpu_kernels import host_decode_attention
from .pipeline import Pipeline

COPY_BYTES = 192 << 20  # host -> GPU per timed copy
SCAN_BYTES = 96 << 20  # KV the CPU kernel scans per timed pass


@dataclass(frozen=True)
class Bandwidths:
    """What the probe measured, bytes/s."""

    pcie_h2d: float  # pinned host -> GPU copy
    cpu_attention: float  # KV scanned by the host attention kernel


def probe(device: torch.device, layout: KVLayout, q_heads: int, copy_bytes: int = COPY_BYTES,
          scan_bytes: int = SCAN_BYTES, repeats: int = 2) -> Bandwidths | None:
    """Both bandwidths on `device` for KV blocks of `layout` (one sequence) read by `q_heads` query
    heads; None without CUDA (a copy to the CPU measures nothing useful)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return Bandwidths(pcie_h2d(device, copy_bytes, repeats), cpu_attention(layout, q_heads, scan_bytes, repeats))


def pcie_h2d(device: torch.device, nbytes: int = COPY_BYTES, repeats: int = 2) -> float:
    """Bytes/s of a pinned host -> `device` copy of `nbytes` (the fastest of `repeats`)."""
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    seconds = Pipeline(device).time_copy(dst, src, repeats)
    del dst, src
    torch.cuda.empty_cache()  # the probe's buffer must not shrink the "auto" GPU budget
    return nbytes / seconds


def cpu_attention(layout: KVLayout, q_heads: int, nbytes: int = SCAN_BYTES, repeats: int = 2) -> float:
    """Bytes/s of KV the host decode attention kernel reads: the fastest of `repeats` pools of about
    `nbytes` each, all written before the first is timed (so that little of them is still cached),
    after an untimed call over one block that starts the kernel's threads (a first parallel call
    spends milliseconds on that, as long as a timed pass)."""
    slots = max(1, nbytes // layout.block_bytes)
    tokens = slots * layout.block_size
    block = torch.empty(layout.block_shape, dtype=layout.dtype).uniform_(-1, 1)
    # Written afresh (random values in every block): filling each whole pool by the random generator
    # would take longer than the probe itself.
    pools = [torch.empty((slots, *layout.block_shape), dtype=layout.dtype).copy_(block) for _ in range(repeats)]
    query = torch.randn(layout.batch, q_heads, layout.head_dim)
    table = np.arange(slots, dtype=np.int32)
    ranges = np.zeros((layout.batch, layout.kv_heads, 1, 2), np.int32)
    ranges[..., 1] = tokens
    scale = layout.head_dim ** -0.5
    one_block = np.minimum(ranges, layout.block_size)
    host_decode_attention(query, pools[0], table, one_block, scale)
    fastest = float("inf")
    for pool in pools:
        started = time.perf_counter()
        host_decode_attention(query, pool, table, ranges, scale)
        fastest = min(fastest, time.perf_counter() - started)
    return slots * layout.block_bytes / fastest
