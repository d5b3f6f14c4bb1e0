"""TEMPORARY stand-ins for storage.HostPool / storage.GpuPool until they land."""
from collections import deque

import torch


class HostPool:
    def __init__(self, n_slots, block_shape, dtype, pin=False):
        self.slab = torch.empty((n_slots, *block_shape), dtype=dtype, pin_memory=pin)

    def close(self):
        pass


class GpuPool:
    def __init__(self, n_slots, block_shape, dtype, device):
        self.slab = torch.empty((n_slots, *block_shape), dtype=dtype, device=device)
        self._free = deque(range(n_slots))

    def allocate(self, n):
        if n > len(self._free):
            raise RuntimeError("gpu pool full")
        return [self._free.popleft() for _ in range(n)]

    def free(self, slots):
        self._free.extend(slots)
