"""The workloads: context, batch, decode steps and the budgets that make each one what it is."""

from __future__ import annotations

from dataclasses import dataclass, replace

GiB = 2**30


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    context: int  # prompt tokens per sequence
    batch: int
    decode_steps: int
    gpu_kv_share: float | None = None  # hetero's GPU budget as a share of the KV (None: "auto")
    host_kv_share: float | None = None  # hetero's host budget as a share of the KV; the rest goes to the SSD
    gpu_card_bytes: int | None = None  # emulate a smaller card: every system's GPU memory is capped to this
    sweep_contexts: tuple[int, ...] = ()  # a sweep runs each of these contexts instead of `context`
    scale: str = "full"

    @property
    def contexts(self) -> tuple[int, ...]:
        return self.sweep_contexts or (self.context,)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("fits", "32K tokens, batch 1: the whole KV fits on the GPU", 32768, 1, 32),
        Workload("small-card", "128K tokens, batch 1, GPU KV budget 4 GiB (a quarter of the KV) and GPU memory capped at 24 GB (a 24 GB card)",
                 131072, 1, 16, gpu_kv_share=0.25, gpu_card_bytes=24 * 10**9),
        # The card is capped to an H100's 80 GB, so that the KV does not fit on a larger GPU either.
        Workload("many-sequences", "128K tokens, batch 4, default budgets, GPU memory capped at 80 GB (an H100): the KV "
                 "(64 GiB) does not fit beside the weights", 131072, 4, 16, gpu_card_bytes=80 * 10**9),
        # The SSD bounds each step (a quarter of 128 GiB read at ~1.5 GB/s): few steps keep it in one run.
        Workload("beyond-ram", "128K tokens, batch 8, host budget 3/4 of the KV: a quarter of it on the SSD",
                 131072, 8, 4, host_kv_share=0.75),
        Workload("sweep", "decode step time against context, batch 1, GPU KV budget 1/8 of the KV at 64K (1 GiB)", 65536, 1, 8,
                 gpu_kv_share=1 / 8, sweep_contexts=(4096, 16384, 65536)),
    )
}


def scaled(workload: Workload, scale: str) -> Workload:
    """"full" as defined; "quick": quarter contexts, at most 8 steps and batch 2 (a smoke run on the GPU);
    "tiny": contexts of a few hundred tokens for the tiny CPU model (the tests)."""
    if scale == "full":
        return workload
    if scale == "quick":
        shrink, contexts = 4, tuple(c // 4 for c in workload.sweep_contexts[:2])
        batch, steps = min(workload.batch, 2), min(workload.decode_steps, 8)
    elif scale == "tiny":
        shrink, contexts = workload.context // 512, (128, 256) if workload.sweep_contexts else ()
        batch, steps = min(workload.batch, 2), 3
    else:
        raise ValueError(f"scale: got {scale!r}, expected full, quick or tiny")
    context = workload.context // shrink
    card = workload.gpu_card_bytes if scale == "quick" else None
    gpu_share = workload.gpu_kv_share
    if scale == "tiny" and gpu_share is None:
        gpu_share = 0.25  # "auto" would hold a tiny KV whole: keep it off the GPU as at full scale
    return replace(workload, context=context, batch=batch, decode_steps=steps, gpu_kv_share=gpu_share,
                   gpu_card_bytes=card, sweep_contexts=contexts, scale=scale)
