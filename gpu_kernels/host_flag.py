"""A stream that waits, on the GPU, for a flag the host raises in pinned memory.

The CPU's half of an attention step finishes while the host thread has already queued the layers
after it: the compute stream, not the host thread, waits for the result. The flag is pinned host
memory read over PCIe (UVA, as the gathers read the KV), with volatile loads so that every poll
reaches the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import INTERPRET


# One to ten seconds of polls over PCIe (a poll waits behind the copies in flight): far beyond
# any one layer's CPU job.
MAX_POLLS = 1 << 21


# The target grows by one per job: specializing on its value would compile a variant per value class.
@triton.jit(do_not_specialize=["target", "max_polls"])
def _wait_kernel(flag, gave_up, target, max_polls):
    seen = tl.load(flag, volatile=True)
    polls = 0
    while (seen < target) & (polls < max_polls):
        seen = tl.load(flag, volatile=True)
        polls += 1
    if seen < target:
        tl.store(gave_up, 1)


def wait_for_flag(flag: torch.Tensor, target: int, gave_up: torch.Tensor, max_polls: int = MAX_POLLS) -> None:
    """Hold the current stream until `flag[0]` (int32, pinned host memory) is at least `target`.

    Whoever raises the flag must write the data it guards first. After `max_polls` polls the stream
    goes on and `gave_up[0]` (int32, pinned) is set to 1: the caller must then treat what the flag
    guards as lost. (A wait can only stall that long if the host thread itself waits for the GPU,
    e.g. on CUDA's lazy loading of a kernel first launched while the wait is pending.) On CPU
    tensors outside the interpreter there is no stream to hold: the flag must already be raised.
    """
    for name, t in (("flag", flag), ("gave_up", gave_up)):
        if t.dtype != torch.int32 or t.numel() != 1:
            raise ValueError(f"the {name} must be one int32, got {t.numel()} of {t.dtype}")
    if INTERPRET or (flag.is_pinned() and torch.cuda.is_available()):
        _wait_kernel[(1,)](flag, gave_up, target, max_polls)
    elif int(flag[0]) < target:
        gave_up.fill_(1)
