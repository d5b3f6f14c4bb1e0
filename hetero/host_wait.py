"""A host thread's wait for a counter that the GPU (or another thread) raises, without the GIL.

The host worker waits this way for each layer's query: a Python loop over the counter would hold
the GIL, which the host thread needs meanwhile to run the model, and its sleeps would add their
granularity (tens of microseconds) to every layer's start.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from .cpu_kernels._intrinsics import load_acquire, spin_pause


@njit(nogil=True, cache=True)
def wait_at_least(counter, number, spins):
    """Whether counter[0] (int64, C-contiguous 1-D) reached `number` within `spins` polls, each
    followed by a pause (a few tens of nanoseconds); the GIL is released meanwhile."""
    for _ in range(spins):
        if load_acquire(counter, 0) >= number:
            return True
        spin_pause()
    return load_acquire(counter, 0) >= number


def warmup() -> None:
    """Compile (or load from Numba's cache) `wait_at_least` now, not in a decode step."""
    wait_at_least(np.ones(1, np.int64), 1, 1)
