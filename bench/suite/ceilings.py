"""The ceilings that bound each path, measured in the same run as the figures they bound.

Measured: pinned host -> GPU `copy_` of 1 GiB (PCIe), a GPU-to-GPU copy (HBM), all cores
streaming through a host array (Numba prange sum), and the last two at once: both read host
memory, so side by side they may reach less than their sum, which `split`'s bound assumes. The
disk is not measured here (writing GiBs to measure it costs more than the runs it bounds):
LIMITS.md's figure, labelled as such.
"""

from __future__ import annotations

import time

import numba
import numpy as np
import torch
from numba import njit, prange

from hetero.plan import Ceilings

GiB = 2**30


@njit(parallel=True, fastmath=True, cache=True)
def _stream_sum(a, n_chunks):
    per = (a.size + n_chunks - 1) // n_chunks
    partial = np.zeros(n_chunks, a.dtype)
    for c in prange(n_chunks):
        part = a[c * per : min(a.size, (c + 1) * per)]
        s = a.dtype.type(0)
        for i in range(part.size):  # from 0 over a slice: the loop vectorizes
            s += part[i]
        partial[c] = s
    return partial.sum()


def cpu_stream_bytes_per_s(nbytes: int, reps: int = 5) -> float:
    a = np.ones(nbytes // 4, np.float32)
    chunks = 8 * numba.get_num_threads()
    _stream_sum(a, chunks)
    start = time.perf_counter()
    for _ in range(reps):
        _stream_sum(a, chunks)
    return reps * a.nbytes / (time.perf_counter() - start)


def _gpu_copy_bytes_per_s(dst: torch.Tensor, src: torch.Tensor, reps: int = 5) -> float:
    for _ in range(2):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return reps * src.numel() * src.element_size() / (time.perf_counter() - start)


def pinned_h2d_bytes_per_s(nbytes: int = GiB) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    return _gpu_copy_bytes_per_s(dst, src)


def pcie_and_cpu_at_once(cpu_array_bytes: int, seconds: float = 1.0, copy_bytes: int = GiB // 2) -> tuple[float, float]:
    """Bytes per second of pinned host -> GPU copies and of all cores streaming through a host array,
    while both run: the copies are queued for longer than the CPU reads, and only those that land
    within the CPU's window count."""
    src = torch.empty(copy_bytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(copy_bytes, dtype=torch.uint8, device="cuda")
    a = np.ones(cpu_array_bytes // 4, np.float32)
    chunks = 8 * numba.get_num_threads()
    _stream_sum(a, chunks)
    copies = int(2 * seconds * 60e9 / copy_bytes) + 2  # outlasts the window at up to 60 GB/s
    stream = torch.cuda.Stream()
    start = torch.cuda.Event(enable_timing=True)
    landed = [torch.cuda.Event(enable_timing=True) for _ in range(copies)]
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        start.record(stream)
        for event in landed:
            dst.copy_(src, non_blocking=True)
            event.record(stream)
    began, passes = time.perf_counter(), 0
    while time.perf_counter() - began < seconds:
        _stream_sum(a, chunks)
        passes += 1
    window = time.perf_counter() - began
    stream.synchronize()
    times = [start.elapsed_time(e) / 1e3 for e in landed]
    inside = [t for t in times if t <= window] or times[:1]
    return len(inside) * copy_bytes / inside[-1], passes * a.nbytes / window


def hbm_bytes_per_s(nbytes: int = GiB) -> float:
    """Bytes read and written per second by a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    return 2 * _gpu_copy_bytes_per_s(dst, src)


def measure_ceilings(device: torch.device, cpu_array_bytes: int = 2 * GiB) -> dict:
    """GB/s of each path and where each figure comes from; paths a CPU-only run lacks are None."""
    defaults = Ceilings()
    on_gpu = device.type == "cuda"
    figures = {
        "pcie_h2d_gbs": pinned_h2d_bytes_per_s() / 1e9 if on_gpu else None,
        "hbm_gbs": hbm_bytes_per_s() / 1e9 if on_gpu else None,
        "cpu_stream_gbs": cpu_stream_bytes_per_s(cpu_array_bytes) / 1e9,
        "disk_read_gbs": defaults.disk_read / 1e9 if on_gpu else None,
        "cpu_threads": numba.get_num_threads(),
    }
    if on_gpu:
        pcie, cpu = pcie_and_cpu_at_once(cpu_array_bytes)
        figures["pcie_h2d_beside_cpu_gbs"], figures["cpu_stream_beside_pcie_gbs"] = pcie / 1e9, cpu / 1e9
    figures["sources"] = {
        "pcie_h2d_gbs": "measured: pinned host -> GPU copy_ of 1 GiB",
        "hbm_gbs": "measured: GPU copy of 1 GiB, read + write",
        "cpu_stream_gbs": f"measured: Numba prange sum over {cpu_array_bytes / GiB:g} GiB, {numba.get_num_threads()} threads",
        "disk_read_gbs": "LIMITS.md (O_DIRECT, 16 threads), not measured in this run",
        "pcie_h2d_beside_cpu_gbs": "measured: the PCIe copy while every core streams through host memory",
        "cpu_stream_beside_pcie_gbs": "measured: the Numba sum while PCIe copies run",
    }
    if on_gpu:
        torch.cuda.empty_cache()  # the probe's buffers must not count against the systems
    return figures
