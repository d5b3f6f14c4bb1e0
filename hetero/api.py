"""The Python API: `load` a Hugging Face model onto hetero's tiers, `generate` through it."""

from __future__ import annotations

import functools
import time
from dataclasses import replace
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from . import attention
from .cache import HeteroCache, HostPoolReuse
from .config import MachineMemory, OffloadConfig, resolve_budgets
from .errors import ModelPathError, PromptTooLongError, UnsupportedModelError
from .split_tuner import SplitTuner, balanced_share, ceiling_share
from .stats import GenerationStats

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def load_model_config(model_path: str | Path):
    """The model's transformers config, with clear errors for a bad path or architecture."""
    path = Path(model_path)
    if not (path / "config.json").is_file():
        raise ModelPathError(
            "model",
            f"model: got {str(model_path)!r}, expected a directory holding a Hugging Face model (config.json)",
        )
    try:
        model_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelPathError("model", f"model: {model_path} has no readable config.json ({exc})") from exc
    check_supported(model_config)
    return model_config


def check_supported(model_config) -> None:
    model_type = getattr(model_config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            "model",
            f"model: architecture {model_type!r} is not supported; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}",
        )


def load(
    model_path: str | Path,
    config: OffloadConfig | dict | str | Path | None = None,
    *,
    dtype: torch.dtype | str = "auto",
    device: torch.device | str | None = None,
) -> PreTrainedModel:
    """Load a causal LM and make its `generate()` run over hetero's tiered KV cache.

    Args:
        model_path: a directory saved by `save_pretrained` (Llama, Mistral, Qwen2, Qwen3).
        config: an OffloadConfig, a dict of its keys, or a path to a TOML/YAML file; None for defaults.
        dtype: weight dtype ("auto" keeps the checkpoint's).
        device: where the model computes; the GPU when there is one.
    """
    offload = OffloadConfig.coerce(config)
    load_model_config(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype)
    model.to(device or default_device()).eval()
    return prepare(model, offload)


def prepare(model: PreTrainedModel, config: OffloadConfig | dict | str | Path | None = None) -> PreTrainedModel:
    """Install hetero on an already loaded model (in place) and return it."""
    check_supported(model.config)
    offload = OffloadConfig.coerce(config)
    resolve_budgets(offload, MachineMemory.probe(model.device))  # a budget the machine lacks fails here
    attention.install(model)
    if offload.mode == "split" or (offload.mode == "speculative" and offload.cpu_attends_remainder):
        _ready_cpu_kernels(offload, model.dtype)  # these modes have the CPU attend
    if model.device.type == "cuda":
        _ready_gpu_kernels(offload, model)
    if not hasattr(model, "hetero"):
        model.hetero = Runtime(model, offload)
        model.generate = _generate_over_hetero(model, model.generate)
    elif model.hetero.config != offload:
        model.hetero.config = offload
        model.hetero.split_probe = model.hetero.split_share_refined = None  # measured for another config
    model.hetero.speculator = _speculator(model, offload)
    if model.hetero.split_probe is None and model.hetero.splits_auto():
        model.hetero.split_probe = _probe_split(model, offload)
    if model.device.type == "cuda" and not model.hetero.decode_kernels_loaded:
        load_decode_kernels(model)
    return model


def load_decode_kernels(model: PreTrainedModel) -> None:
    """Generate two tokens from a two-token prompt now, through hetero, and forget the run.

    CUDA loads a kernel's module at its first launch. A decode step launches kernels the prefill
    did not (one-row matmuls, generate's own reductions): in the first decode step on the GPU
    machine, loading them took about 33 of its 314 ms (bench/step_times.py --profile-first-gap). Each
    module loads once per process, so every later step and generation launches them loaded."""
    runtime: Runtime = model.hetero
    kept = runtime.last_stats, runtime.refine_split
    runtime.refine_split = False  # four tokens' timings are no share to start the next generation from
    ids = torch.zeros(1, 2, dtype=torch.long, device=model.device)
    pad = model.generation_config.pad_token_id
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2,
                           pad_token_id=0 if pad is None else pad)
    finally:
        runtime.last_stats, runtime.refine_split = kept
    runtime.decode_kernels_loaded = True


def _probe_split(model: PreTrainedModel, config: OffloadConfig):
    """PCIe and CPU attention bandwidths for the split mode's "auto" share; None without CUDA."""
    from .bandwidth_probe import probe
    from .cache import KVLayout

    if model.device.type != "cuda":
        return None
    c = model.config
    head_dim, kv_dtype = _kv_head_dim_and_dtype(config, model)
    layout = KVLayout(1, 1, c.num_key_value_heads, head_dim, config.block_size, kv_dtype)  # one layer, one sequence
    return probe(model.device, layout, c.num_attention_heads)


def _kv_head_dim_and_dtype(config: OffloadConfig, model: PreTrainedModel) -> tuple[int, torch.dtype]:
    """The model's head dimension and the dtype its KV is stored in under `config`."""
    c = model.config
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return head_dim, model.dtype if config.kv_dtype == "auto" else getattr(torch, config.kv_dtype)


def _speculator(model: PreTrainedModel, config: OffloadConfig):
    """The speculative mode's predictor, skewed from a calibration prompt now, at load."""
    if config.mode != "speculative":
        return None
    from .speculate import SpeculationSettings, calibrate

    return calibrate(model, settings=SpeculationSettings.from_config(config))


def _ready_cpu_kernels(config: OffloadConfig, dtype: torch.dtype) -> None:
    """Compile the CPU attention kernels now (not on the first decode step) and set their threads.

    "auto" leaves one core to the thread that drives the GPU.
    """
    import numba

    from . import cpu_kernels, host_wait

    cores = numba.config.NUMBA_NUM_THREADS
    threads = max(1, cores - 1) if config.cpu_threads == "auto" else min(int(config.cpu_threads), cores)
    cpu_kernels.set_threads(threads)
    kv_dtype = dtype if config.kv_dtype == "auto" else getattr(torch, config.kv_dtype)
    cpu_kernels.warmup((kv_dtype,))
    host_wait.warmup()  # the host worker's wait for each layer's query, where the pipeline uses it


def _ready_gpu_kernels(config: OffloadConfig, model: PreTrainedModel) -> None:
    """Compile the Triton decode kernel's variants for this model now, not in the first decode steps."""
    from . import gpu_decode

    c = model.config
    head_dim, kv_dtype = _kv_head_dim_and_dtype(config, model)
    cpu_part = config.mode == "split" or config.cpu_remainder != "none"
    gpu_decode.warmup(model.device, model.dtype, kv_dtype, c.num_attention_heads, c.num_key_value_heads, head_dim,
                      config.block_size, gathers=config.mode == "speculative",
                      host_waits=cpu_part and config.cpu_part_wait == "gpu")


class Runtime:
    """hetero's state attached to a model as `model.hetero`: its config and the last run's stats."""

    def __init__(self, model: PreTrainedModel, config: OffloadConfig):
        self.model = model
        self.config = config
        self.last_stats: GenerationStats | None = None
        self.progress = None  # called with the tokens stored so far, e.g. by the CLI's progress bar
        self.host_pools = HostPoolReuse()
        self.speculator = None  # set by `prepare` in the speculative mode
        # split_ratio "auto": the bandwidths probed at load (CUDA only), then the share the first
        # decode steps of the last generation refined, which the next generation starts from.
        self.split_probe = None  # hetero.bandwidth_probe.Bandwidths | None
        self.split_share_refined: float | None = None
        self.refine_split: bool | None = None  # None: refine on CUDA only (timings of a CPU device mean little)
        self.decode_kernels_loaded = False  # see load_decode_kernels

    def new_cache(self, max_tokens: int) -> HeteroCache:
        device = self.model.device
        machine = MachineMemory.probe(device)
        # The pinned pool kept from the last generation is this cache's to reuse: count it as available.
        held = self.host_pools.held_bytes
        machine = replace(machine, host_available_bytes=machine.host_available_bytes + held)
        budgets = resolve_budgets(self.config, machine)
        share = self.gpu_share()
        refine = self.refine_split if self.refine_split is not None else device.type == "cuda"
        tuner = SplitTuner(share) if refine and self.splits_auto() else None
        cache = HeteroCache(
            self.config, budgets, self.model.config.num_hidden_layers, max_tokens, device, share,
            self.host_pools, self.speculator, tuner,
        )
        cache.progress = self.progress
        return cache

    def gpu_share(self) -> float:
        """Share of each layer's offloaded blocks fetched to the GPU in decode; the CPU takes the rest.

        With split_ratio "auto": the last generation's refined share, else the probed bandwidths'
        balance, else (no CUDA) the balance of the nominal ceilings."""
        if self.config.mode != "split" or getattr(self.model.config, "sliding_window", None) is not None:
            return 1.0  # the host kernels know no sliding window: such models stream
        ratio = self.config.split_ratio
        if ratio != "auto":
            return float(ratio)
        if self.split_share_refined is not None:
            return self.split_share_refined
        if self.split_probe is not None:
            return balanced_share(self.split_probe.pcie_h2d, self.split_probe.cpu_attention)
        return ceiling_share()

    def splits_auto(self) -> bool:
        """Whether the split mode's share is this runtime's to choose (split_ratio "auto")."""
        return (self.config.mode == "split" and self.config.split_ratio == "auto"
                and getattr(self.model.config, "sliding_window", None) is None)

    def remember_split(self, cache: HeteroCache) -> None:
        """Keep the share a generation refined, for the next one to start from."""
        tuner = cache.split_tuner
        if tuner is not None and tuner.told:
            self.split_share_refined = tuner.share


def _generate_over_hetero(model: PreTrainedModel, original):
    @functools.wraps(original)
    def generate(inputs=None, *args, **kwargs):
        if inputs is None:
            inputs = kwargs.pop("input_ids", None)
        if inputs is None or kwargs.get("past_key_values") is not None or kwargs.get("use_cache") is False:
            return original(inputs, *args, **kwargs)
        prompt_tokens = inputs.shape[1]
        max_new = _max_new_tokens(model, prompt_tokens, kwargs)
        runtime: Runtime = model.hetero
        cache = runtime.new_cache(prompt_tokens + max_new)
        cache.prompt_tokens = prompt_tokens
        kwargs["past_key_values"] = cache
        kwargs.setdefault("max_new_tokens", max_new)
        if prompt_tokens > runtime.config.prefill_chunk_tokens:
            kwargs.setdefault("prefill_chunk_size", runtime.config.prefill_chunk_tokens)
        started = time.perf_counter()
        try:
            output = original(inputs, *args, **kwargs)
        finally:
            cache.close()
        runtime.remember_split(cache)
        finished = time.perf_counter()
        sequences = output if isinstance(output, torch.Tensor) else output.sequences
        runtime.last_stats = GenerationStats.from_run(
            cache, inputs.shape[0], prompt_tokens, sequences.shape[1] - prompt_tokens, started, finished
        )
        return output

    return generate


def _max_new_tokens(model: PreTrainedModel, prompt_tokens: int, kwargs: dict) -> int:
    gen_config = kwargs.get("generation_config") or model.generation_config
    max_new = kwargs.get("max_new_tokens") or gen_config.max_new_tokens
    if max_new is None:
        max_length = kwargs.get("max_length") or gen_config.max_length or prompt_tokens + 20
        max_new = max(1, max_length - prompt_tokens)
    context = getattr(model.config, "max_position_embeddings", None)
    if context is not None and prompt_tokens + max_new > context:
        raise PromptTooLongError(
            "prompt",
            f"prompt: {prompt_tokens} tokens + max_new_tokens {max_new} exceed the model's context of {context} "
            "tokens; shorten the prompt or lower max_new_tokens",
        )
    return max_new


def generate(
    model: PreTrainedModel | str | Path,
    input_ids: torch.Tensor,
    config: OffloadConfig | dict | str | Path | None = None,
    **generate_kwargs,
) -> torch.Tensor:
    """One call: load (if given a path) and generate; returns the token ids, prompt included."""
    if not isinstance(model, PreTrainedModel):
        model = load(model, config)
    elif config is not None or not hasattr(model, "hetero"):
        prepare(model, config)
    input_ids = input_ids.to(model.device)
    if "attention_mask" in generate_kwargs and generate_kwargs["attention_mask"] is not None:
        generate_kwargs["attention_mask"] = generate_kwargs["attention_mask"].to(model.device)
    return model.generate(input_ids, **generate_kwargs)
