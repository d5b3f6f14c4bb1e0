"""A stream that waits, on the GPU, for a flag the host raises in pinned memory.

The CPU's half of an attention step finishes while the host thread has already queued the layers
after it: the compute stream, not the host thread, waits for the result. The flag is pinned host
memory read over PCIe (UVA, as the gathers read the KV), with volatile loads so that every poll
reaches the host.
"""

from __future__ import annotations

import ctypes
import os

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
    if not INTERPRET and flag.is_pinned() and torch.cuda.is_available() and _driver_wait(flag, target):
        return
    if INTERPRET or (flag.is_pinned() and torch.cuda.is_available()):
        _wait_kernel[(1,)](flag, gave_up, target, max_polls)
    elif int(flag[0]) < target:
        gave_up.fill_(1)


_stream_wait_value = None  # cuStreamWaitValue32, False where the driver lacks it


def _driver_wait(flag: torch.Tensor, target: int) -> bool:
    """With HETERO_FLAG_WAIT=driver (an experiment), hold the stream in the GPU's front end
    (cuStreamWaitValue32: no kernel, no poll limit, hence no `gave_up`); False if unavailable."""
    global _stream_wait_value
    if os.environ.get("HETERO_FLAG_WAIT") != "driver":
        return False
    if _stream_wait_value is None:
        try:
            lib = ctypes.CDLL("libcuda.so.1")
            fn = getattr(lib, "cuStreamWaitValue32_v2", None) or lib.cuStreamWaitValue32
            fn.argtypes = [ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32, ctypes.c_uint]
            fn.restype = ctypes.c_int
            _stream_wait_value = fn
        except (OSError, AttributeError):
            _stream_wait_value = False
    if not _stream_wait_value:
        return False
    stream = torch.cuda.current_stream(flag.device if flag.is_cuda else None).cuda_stream
    return _stream_wait_value(stream, flag.data_ptr(), target & 0xFFFFFFFF, 0) == 0  # 0: wait until >= target
