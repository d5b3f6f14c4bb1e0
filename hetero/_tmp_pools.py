"""TEMPORARY stand-ins for storage.HostPool / storage.GpuPool until they land."""
import math
from collections import deque

import torch


class HostPool:
    """Host slab; pinned by registering exactly its pages (the pinned allocator rounds to powers of 2)."""

    def __init__(self, n_slots, block_shape, dtype, pin=False):
        self.slab = torch.empty((n_slots, *block_shape), dtype=dtype)
        self.n_slots, self.block_shape, self.dtype = n_slots, tuple(block_shape), dtype
        self._registered = False
        if pin:
            nbytes = self.slab.numel() * self.slab.element_size()
            err = torch.cuda.cudart().cudaHostRegister(self.slab.data_ptr(), nbytes, 0)
            if int(err) != 0:
                raise RuntimeError(f"cudaHostRegister of {nbytes} bytes failed ({err})")
            self._registered = True

    def fits(self, n_slots, block_shape, dtype, pin):
        return n_slots <= self.n_slots and tuple(block_shape) == self.block_shape and dtype == self.dtype and pin == self._registered

    def __del__(self):
        if self._registered:
            torch.cuda.cudart().cudaHostUnregister(self.slab.data_ptr())
            self._registered = False


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


class HostPoolReuse:
    """Keeps the last host pool so that repeated generations do not pin memory again."""

    def __init__(self):
        self._pool = None

    def __call__(self, n_slots, block_shape, dtype, pin):
        if self._pool is None or not self._pool.fits(n_slots, block_shape, dtype, pin):
            self._pool = None
            self._pool = HostPool(n_slots, block_shape, dtype, pin)
        return self._pool
