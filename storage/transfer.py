"""Moving many blocks between two slabs with as few copies as possible."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


def _as_index_array(slots) -> np.ndarray:
    if isinstance(slots, range):
        return np.arange(slots.start, slots.stop, slots.step, dtype=np.int64)
    if isinstance(slots, torch.Tensor):
        return slots.detach().to("cpu", torch.int64).numpy().reshape(-1)
    return np.asarray(slots, dtype=np.int64).reshape(-1)


def slot_runs(src_slots, dst_slots) -> list[tuple[int, int, int]]:
    """Group slot pairs into runs consecutive on both sides: [(src_first, dst_first, length), ...].

    Vectorised: for a layer of tens of thousands of blocks a Python loop over the slots costs about
    as much time as copying them over PCIe.
    """
    src, dst = _as_index_array(src_slots), _as_index_array(dst_slots)
    if src.size != dst.size:
        raise ValueError(f"src_slots and dst_slots: got {src.size} and {dst.size} slots, expected as many")
    if src.size == 0:
        return []
    breaks = np.flatnonzero((np.diff(src) != 1) | (np.diff(dst) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [src.size])))
    return list(zip(src[starts].tolist(), dst[starts].tolist(), lengths.tolist()))


def copy_slots(src_slab: torch.Tensor, src_slots: Sequence[int], dst_slab: torch.Tensor, dst_slots: Sequence[int],
               non_blocking: bool = False) -> int:
    """Copy blocks `src_slab[src_slots[i]]` to `dst_slab[dst_slots[i]]`, one `copy_` per run of slots
    consecutive in both slabs (per slot where a run is not contiguous in memory, e.g. a padded host
    slab). Runs on the current CUDA stream; returns the number of copies issued.

    With `non_blocking=True` the caller must keep both slabs alive and unchanged until the stream
    has passed the copies (pinned host memory is needed for a copy to be asynchronous).
    """
    copies = 0
    for s, d, n in slot_runs(src_slots, dst_slots):
        src, dst = src_slab[s:s + n], dst_slab[d:d + n]
        if src.is_contiguous() and dst.is_contiguous():
            dst.copy_(src, non_blocking=non_blocking)
            copies += 1
        else:
            for i in range(n):
                dst[i].copy_(src[i], non_blocking=non_blocking)
            copies += n
    return copies
