"""The host tier, the home of the KV: one slab of block slots in (pinned) host memory.

The slab is allocated once, as anonymous memory starting on a 2 MiB boundary. With CUDA it is
pinned by registering exactly its pages (`cudaHostRegister`) rather than allocated with
`pin_memory=True`: PyTorch's pinned allocator rounds each request up to a power of two (3 GiB asked
reserved 4 GiB on the GPU machine; a 40 GiB pool would pin 64 GiB), and registering was as fast (1.3 s
for 3 GiB against 2.1 s). Copies run at the same 55 GB/s either way, provided the tensor's storage
begins at the registered address: torch then sees the slab as pinned (`is_pinned()`); a slab carved
out of a larger torch allocation (`is_pinned()` False) copied ~20% slower in our first measurement.
Each slot starts on a 4096-byte boundary so that the SSD tier can read into and write out of a
slot with O_DIRECT, no bounce copy.
"""

from __future__ import annotations

import ctypes
import mmap
import weakref
from typing import Sequence

import torch

from .tier import PAGE, SlabTier, block_bytes_of, round_up

# cudaHostRegisterPortable | cudaHostRegisterMapped: pinned for every context, and mapped so that
# GPU kernels can read it in place (UVA).
_REGISTER_FLAGS = 1 | 2


class HostPool(SlabTier):
    """`n_slots` blocks in host memory, pinned when CUDA is present.

    Args:
        n_slots: blocks the pool holds.
        block_shape: [2, B, Hkv, bs, D].
        dtype: KV dtype.
        pin: pin the slab (page-locked, registered with CUDA); None: pin when CUDA is available.
        huge_pages: advise transparent huge pages for the slab, as NumPy does for large arrays (the
            CPU attention's streaming-read ceiling ran on them all along); Linux grants them while it
            finds free 2 MiB runs (`huge_page_share` tells). The slab used to be a shared mapping,
            which Linux backs with huge pages only where `shmem_enabled` allows ("never" on the GPU
            machine, bench/results/split/host_thp_2026-12-02b.txt), so it never had them. Private
            now, it sat wholly on huge pages there, and the kernel on a 4 KiB-page copy ran at 0.95x
            (0.77-1.01x) of it (bench/results/split/kernel_rounds_knobs_b1_2026-12-02b.json).
        slot_align: each slot's stride in bytes is a multiple of this (4096: O_DIRECT straight into a
            slot). When a block's bytes are not a multiple of it, slots are padded and `slab` is a
            strided view (each block contiguous); pass 1 for a packed, C-contiguous slab.

    Attributes:
        slab: [n_slots, *block_shape] view of the pool, zero-copy; `slab[s]` is slot s, contiguous.
        slot_bytes: the stride between slots, in bytes.
        pinned: whether the slab is registered with CUDA.
    """

    name = "host"

    def __init__(self, n_slots: int, block_shape: Sequence[int], dtype: torch.dtype = torch.bfloat16,
                 pin: bool | None = None, slot_align: int = PAGE, huge_pages: bool = True):
        if slot_align < 1 or PAGE % slot_align and slot_align % PAGE:
            raise ValueError(f"slot_align: got {slot_align}, expected a divisor or multiple of {PAGE}")
        block_bytes = block_bytes_of(block_shape, dtype)
        elem = torch.empty((), dtype=dtype).element_size()
        super().__init__(n_slots, block_shape, dtype, round_up(block_bytes, max(slot_align, elem)))
        if pin is None:
            pin = torch.cuda.is_available()
        elif pin and not torch.cuda.is_available():
            raise ValueError("pin: got True, but CUDA is not available here; pass pin=None or False")
        total = n_slots * self.slot_bytes
        raw = _page_aligned_bytes(total, huge_pages)
        stride0 = self.slot_bytes // elem
        inner = torch.empty(self.block_shape, dtype=dtype, device="meta").stride()
        self.slab = raw.view(dtype).as_strided((n_slots, *self.block_shape), (stride0, *inner))
        self.pinned = False
        if pin and total:
            err = torch.cuda.cudart().cudaHostRegister(raw.data_ptr(), total, _REGISTER_FLAGS)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {total} bytes of host KV failed (CUDA error {int(err)}); "
                                   "lower cpu_kv_bytes")
            self.pinned = True
        # Unregister before the memory can be freed: the finalizer holds the memory until then.
        self._finalizer = weakref.finalize(self, _release, raw, raw.data_ptr() if self.pinned else None)

    def fits(self, n_slots: int, block_shape: Sequence[int], dtype: torch.dtype, pin: bool) -> bool:
        """Whether this pool can serve a request for that many slots of that shape (for reuse)."""
        return (self._finalizer.alive and n_slots <= self.n_slots and tuple(block_shape) == self.block_shape
                and dtype == self.dtype and bool(pin) == self.pinned)

    def close(self) -> None:
        """Unpin and drop the slab. Views handed out stay valid memory, no longer pinned."""
        self.slab = torch.empty((0, *self.block_shape), dtype=self.dtype)
        self.pinned = False
        self._finalizer()


HUGE_PAGE = 2 << 20


def _page_aligned_bytes(nbytes: int, huge_pages: bool) -> torch.Tensor:
    """A uint8 tensor of `nbytes` of fresh anonymous memory starting on a 2 MiB boundary, whose
    storage begins at that address (so that torch sees registered memory as pinned). The tensor
    keeps the mapping alive; untouched pages take no memory."""
    if nbytes == 0:
        return torch.empty(0, dtype=torch.uint8)
    # Private: Python's anonymous mmap is shared by default, and Linux backs shared anonymous memory
    # (shmem) with huge pages only where shmem_enabled allows (never, by default), whatever madvise asks.
    area = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE)
    start = -ctypes.addressof(ctypes.c_char.from_buffer(area)) % HUGE_PAGE
    if huge_pages and hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            area.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
        except OSError:
            pass  # a kernel without transparent huge pages: 4 KiB pages then
    window = (ctypes.c_char * nbytes).from_buffer(area, start)  # holds `area` alive
    return torch.frombuffer(window, dtype=torch.uint8)


def mapping_fields(tensor: torch.Tensor, field: str, smaps: str = "/proc/self/smaps") -> list[str] | None:
    """The values of `field` (e.g. "AnonHugePages", "THPeligible") of each mapping in `smaps` that a
    CPU tensor's storage lies in, in address order; None where the file cannot be read (not Linux)."""
    storage = tensor.untyped_storage()
    first = storage.data_ptr()
    last = first + storage.nbytes()
    values, inside = [], False
    try:
        with open(smaps) as f:
            for line in f:
                words = line.split()
                if not words:
                    continue
                if "-" in words[0] and not words[0].endswith(":"):  # a mapping's header: start-end perms ...
                    start, end = (int(x, 16) for x in words[0].split("-"))
                    inside = start < last and end > first
                elif inside and words[0] == field + ":":
                    values.append(" ".join(words[1:]))
    except OSError:
        return None
    return values


def huge_page_share(tensor: torch.Tensor, smaps: str = "/proc/self/smaps") -> float | None:
    """The share of a CPU tensor's storage that Linux backs with transparent huge pages: the
    AnonHugePages of the mappings its bytes lie in, over its size (madvise asks; Linux grants only
    while it finds free 2 MiB runs). None where the file cannot be read (not Linux)."""
    sizes = mapping_fields(tensor, "AnonHugePages", smaps)
    if sizes is None:
        return None
    huge = sum(int(size.split()[0]) * 1024 for size in sizes)
    return min(1.0, huge / max(1, tensor.untyped_storage().nbytes()))


def _release(raw: torch.Tensor, registered_ptr: int | None) -> None:
    if registered_ptr is not None:
        torch.cuda.cudart().cudaHostUnregister(registered_ptr)
    del raw
