"""The systems a workload runs: transformers' default and offloaded caches, then each hetero mode.

transformers runs before hetero on a model: hetero pins host memory that it keeps for reuse.
"""

from __future__ import annotations

import shutil

import psutil
import torch

import hetero
from hetero.config import IMPLEMENTED_MODES, MODES
from hetero.residency import ResidencyPolicy

from .model import kv_bytes
from .workloads import Workload

GiB = 2**30
DEFAULT = "transformers-default"
OFFLOADED = "transformers-offloaded"
# transformers' offloaded cache: its peak host memory over its KV in this suite's runs on the H200
# (25 GiB for fits' 4 GiB of KV, 99 GiB for small-card's 16 GiB).
OFFLOADED_HOST_PER_KV = 6
TINY_OFFLOAD = {"block_size": 16, "sink_tokens": 16, "window_tokens": 32, "prefill_chunk_tokens": 128}


def all_systems() -> list[str]:
    return [DEFAULT, OFFLOADED] + [f"hetero-{m}" for m in MODES if m in IMPLEMENTED_MODES]


def select_systems(names: list[str] | None) -> list[str]:
    """The named systems ("stream" means "hetero-stream"), in the order they must run."""
    known = all_systems()
    if not names:
        return known
    wanted = {n if n in known else f"hetero-{n}" for n in names}
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError(f"--systems: unknown {', '.join(unknown)}; expected some of {', '.join(known)}")
    return [s for s in known if s in wanted]


def hetero_mode(system: str) -> str | None:
    return system.removeprefix("hetero-") if system.startswith("hetero-") else None


def offload_config(mode: str, workload: Workload, context: int, model_config, tiny: bool, ssd_dir: str | None) -> dict:
    """hetero's config for this workload: its budgets as shares of the KV, bytes resolved here."""
    config = {"mode": mode, **(TINY_OFFLOAD if tiny else {})}
    tokens = context + workload.decode_steps + 1
    if workload.gpu_kv_share is not None:
        share = int(workload.gpu_kv_share * kv_bytes(model_config, workload.batch, workload.context))
        config["gpu_kv_bytes"] = max(share, _least_gpu_bytes(config, model_config, workload.batch))
    if workload.host_kv_share is not None:
        total = kv_bytes(model_config, workload.batch, tokens)
        config["cpu_kv_bytes"] = int(workload.host_kv_share * total)
        config["ssd_dir"] = ssd_dir
        wanted = int((1 - workload.host_kv_share) * total * 1.5) + 64 * 2**20  # blocks round up; staging
        config["ssd_kv_bytes"] = min(wanted, int(0.95 * shutil.disk_usage(ssd_dir).free))
    return config


def _least_gpu_bytes(config: dict, model_config, batch: int) -> int:
    """Twice the GPU tier's floor (resident blocks, two fetch buffers of 16 blocks): room for what a mode
    adds (speculation's partial keys); far below the workloads' shares at full scale."""
    defaults = hetero.OffloadConfig()
    block = config.get("block_size", defaults.block_size)
    policy = ResidencyPolicy.from_tokens(block, config.get("sink_tokens", defaults.sink_tokens),
                                         config.get("window_tokens", defaults.window_tokens))
    block_bytes = kv_bytes(model_config, batch, block) // model_config.num_hidden_layers
    return 2 * (model_config.num_hidden_layers * policy.slots_per_layer() + 2 * 16) * block_bytes


def skip_reason(system: str, workload: Workload, context: int, model, device: torch.device,
                attempt_oom: bool, ssd_dir: str) -> tuple[str, str] | None:
    """(status, reason) for a system this workload should not run, or None to run it."""
    kv = kv_bytes(model.config, workload.batch, context + workload.decode_steps + 1)
    if system == OFFLOADED:
        if device.type != "cuda":
            return "skipped", "transformers' offloaded cache needs CUDA (it prefetches on a CUDA stream)"
        available = psutil.virtual_memory().available
        if kv > 0.9 * available:
            return "skipped", (f"its KV ({kv / GiB:.0f} GiB) lives in host memory, which has "
                               f"{available / GiB:.0f} GiB available; transformers has no disk tier")
        if not attempt_oom and OFFLOADED_HOST_PER_KV * kv > available:
            return "oom-predicted", (f"out of host memory (predicted, not run): its host memory peaked at about "
                                     f"{OFFLOADED_HOST_PER_KV}x its KV in this suite's runs (99 GiB for 16 GiB), here "
                                     f"{OFFLOADED_HOST_PER_KV * kv / GiB:.0f} GiB against {available / GiB:.0f} GiB available")
    if system == DEFAULT and device.type == "cuda" and not attempt_oom:
        room = gpu_room(device, workload.gpu_card_bytes)
        margin = 2 * kv // model.config.num_hidden_layers + GiB  # a layer's concatenation and the activations
        if kv + margin > room:
            return "oom-predicted", (f"out of GPU memory (predicted, not run): KV {kv / GiB:.1f} GiB + "
                                     f"{margin / GiB:.1f} GiB working memory > {room / GiB:.1f} GiB left beside the weights")
    if hetero_mode(system) and workload.host_kv_share is not None:
        on_ssd, free = (1 - workload.host_kv_share) * kv, shutil.disk_usage(ssd_dir).free
        if on_ssd > free:
            return "skipped", f"the SSD's share of the KV ({on_ssd / GiB:.1f} GiB) exceeds the free disk under {ssd_dir}"
    return None


def gpu_room(device: torch.device, card_bytes: int | None) -> int:
    """GPU memory a system can still allocate: the card (or the emulated card) less what is allocated."""
    total = torch.cuda.get_device_properties(device).total_memory
    return min(total, card_bytes or total) - torch.cuda.memory_allocated(device)


def generate_kwargs(system: str, workload: Workload, context: int, tiny: bool) -> dict:
    """Everything but the prompt: the same decode steps for every system, EOS ignored, and the prompt
    prefilled in the same chunks hetero uses (transformers' generate takes `prefill_chunk_size` too)."""
    steps = workload.decode_steps + 1  # the first new token comes out of the prefill
    kwargs = {"max_new_tokens": steps, "min_new_tokens": steps, "do_sample": False}
    if not hetero_mode(system):
        chunk = (TINY_OFFLOAD if tiny else {}).get("prefill_chunk_tokens", hetero.OffloadConfig().prefill_chunk_tokens)
        if context > chunk:
            kwargs["prefill_chunk_size"] = chunk
    if system == OFFLOADED:
        kwargs["cache_implementation"] = "offloaded"
    return kwargs
