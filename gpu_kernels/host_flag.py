"""A stream that waits, on the GPU, for a flag the host raises in pinned memory.

The CPU's half of an attention step finishes while the host thread has already queued the layers
after it: the compute stream, not the host thread, waits for the result. The flag is pinned host
memory read over PCIe (UVA, as the gathers read the KV), with volatile loads so that every poll
reaches the host. `copy_when_raised` also brings the data the flag guards over by the GPU's own
loads: a copy-engine copy would queue behind the fetch that engine is busy with, for the rest of it
(up to a layer's share of the KV, milliseconds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._dispatch import INTERPRET


# One to ten seconds of polls over PCIe (a poll waits behind the copies in flight): far beyond
# any one layer's CPU job.
MAX_POLLS = 1 << 21


@triton.jit
def _poll(flag, target, max_polls):
    """The flag's value once it reaches `target`, or after `max_polls` polls."""
    seen = tl.load(flag, volatile=True)
    polls = 0
    while (seen < target) & (polls < max_polls):
        seen = tl.load(flag, volatile=True)
        polls += 1
    return seen


# The target grows by one per job: specializing on its value would compile a variant per value class.
@triton.jit(do_not_specialize=["target", "max_polls"])
def _wait_kernel(flag, gave_up, target, max_polls):
    seen = _poll(flag, target, max_polls)
    if seen < target:
        tl.store(gave_up, seen + 1)


def wait_for_flag(flag: torch.Tensor, target: int, gave_up: torch.Tensor, max_polls: int = MAX_POLLS) -> None:
    """Hold the current stream until `flag[0]` (int32, pinned host memory) is at least `target`.

    Whoever raises the flag must write the data it guards first. After `max_polls` polls the stream
    goes on and `gave_up[0]` (int32, pinned) is set to one more than the flag's last value read
    (never 0: a flag never falls below 0); the caller must then treat what the flag guards as
    lost. (A wait can only stall that long if the host thread or the worker raising the flag waits
    for the GPU, e.g. on CUDA's lazy loading of a kernel first launched while the wait is pending.)
    On CPU tensors outside the interpreter there is no stream to hold: the flag must already be
    raised.
    """
    _check_int32_scalars(flag, gave_up)
    if INTERPRET or (flag.is_pinned() and torch.cuda.is_available()):
        _wait_kernel[(1,)](flag, gave_up, target, max_polls)
    elif int(flag[0]) < target:
        gave_up.fill_(int(flag[0]) + 1)


COPY_WORDS = 4096  # int32 words copied per step once the flag is up


# One program: as many polls over PCIe as `wait_for_flag` makes, beside the fetches in flight.
@triton.jit(do_not_specialize=["target", "max_polls", "words"])
def _copy_when_raised_kernel(flag, gave_up, target, max_polls, source, out, words, BLOCK: tl.constexpr):
    seen = _poll(flag, target, max_polls)
    if seen < target:
        tl.store(gave_up, seen + 1)
    else:
        for first in range(0, words, BLOCK):
            offs = first + tl.arange(0, BLOCK)
            # Volatile: the source is a mailbox reused from job to job, never to be read from a cache.
            tl.store(out + offs, tl.load(source + offs, mask=offs < words, volatile=True), mask=offs < words)


def copy_when_raised(flag: torch.Tensor, target: int, gave_up: torch.Tensor, source: torch.Tensor, out: torch.Tensor,
                     max_polls: int = MAX_POLLS) -> None:
    """`wait_for_flag`, then copy `source` (int32, pinned host memory, what the flag guards) into `out`
    (int32, same length, on the device), both on the current stream, with no copy engine involved.
    When the wait gives up, `out` is left as it was. On CPU tensors outside the interpreter: the
    flag must already be raised, and the copy is made at once."""
    for name, t in (("source", source), ("out", out)):
        if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
            raise ValueError(f"the {name} must be a contiguous 1-d int32 tensor, got {t.dtype} of shape {tuple(t.shape)}")
    if source.numel() != out.numel():
        raise ValueError(f"source and out differ in length: {source.numel()} against {out.numel()}")
    _check_int32_scalars(flag, gave_up)
    if out.is_cuda and not (flag.is_pinned() and source.is_pinned()):
        raise ValueError("the flag and the source must be pinned host memory: the GPU reads them over PCIe")
    if INTERPRET or out.is_cuda:
        _copy_when_raised_kernel[(1,)](flag, gave_up, target, max_polls, source, out, source.numel(), BLOCK=COPY_WORDS)
    elif int(flag[0]) >= target:
        out.copy_(source)
    else:
        gave_up.fill_(int(flag[0]) + 1)


def _check_int32_scalars(flag: torch.Tensor, gave_up: torch.Tensor) -> None:
    for name, t in (("flag", flag), ("gave_up", gave_up)):
        if t.dtype != torch.int32 or t.numel() != 1:
            raise ValueError(f"the {name} must be one int32, got {t.numel()} of {t.dtype}")
