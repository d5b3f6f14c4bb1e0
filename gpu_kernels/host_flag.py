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


# The target grows by one per job: specializing on its value would compile a variant per value class.
@triton.jit(do_not_specialize=["target"])
def _wait_kernel(flag, target):
    seen = tl.load(flag, volatile=True)
    while seen < target:
        seen = tl.load(flag, volatile=True)


def wait_for_flag(flag: torch.Tensor, target: int) -> None:
    """Hold the current stream until `flag[0]` (int32, pinned host memory) is at least `target`.

    Whoever raises the flag must write the data it guards first. On CPU tensors outside the
    interpreter there is no stream to hold: the flag must already be raised.
    """
    if flag.dtype != torch.int32 or flag.numel() != 1:
        raise ValueError(f"the flag must be one int32, got {flag.numel()} of {flag.dtype}")
    if INTERPRET or (flag.is_pinned() and torch.cuda.is_available()):
        _wait_kernel[(1,)](flag, target)
    elif int(flag[0]) < target:
        raise RuntimeError(f"flag at {int(flag[0])} below {target} with no GPU stream to wait on it")
