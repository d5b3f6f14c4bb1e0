"""The built-in default: a random-weight model, a long prompt, budgets that force the KV off the GPU.

`hetero demo` runs it and checks the tokens against transformers' own generation.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, MistralConfig, Qwen2Config

from .api import default_device, load

_ARCHITECTURES = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def small_config(arch: str = "llama", *, layers: int = 4, hidden: int = 128, heads: int = 8, kv_heads: int = 2,
                 vocab: int = 512, context: int = 8192, **overrides):
    """A small GQA decoder config of a supported architecture, for random-weight runs."""
    cls = _ARCHITECTURES[arch]
    extra = {"sliding_window": None} if arch in ("mistral", "qwen2") else {}
    # A wide initializer makes logits decisive, so greedy tokens do not hinge on rounding.
    return cls(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context,
        initializer_range=0.08, tie_word_embeddings=False, **{**extra, **overrides},
    )


def save_random_model(path: str | Path, arch: str = "llama", seed: int = 0, **config_overrides) -> Path:
    """Build a random-weight model from `small_config` and `save_pretrained` it to `path`."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(small_config(arch, **config_overrides))
    model.save_pretrained(path)
    return Path(path)


@dataclass
class DemoResult:
    matches: bool
    first_mismatch: int | None
    prompt_tokens: int
    new_tokens: int
    reference_seconds: float
    stats: object


def run_demo(prompt_tokens: int = 3000, new_tokens: int = 32, seed: int = 0, device=None, progress=None) -> DemoResult:
    """Generate through `stream` with a tiny GPU budget and compare with transformers' DynamicCache."""
    device = torch.device(device or default_device())
    config = {
        "mode": "stream",
        "block_size": 64,
        "sink_tokens": 64,
        "window_tokens": 256,
        "gpu_kv_bytes": "2MiB",
        "cpu_kv_bytes": "256MiB",
        "prefill_chunk_tokens": 1024,
    }
    with tempfile.TemporaryDirectory(prefix="hetero-demo-") as tmp:
        save_random_model(tmp, "llama", seed=seed, layers=4, hidden=256, heads=8, kv_heads=2)
        model = load(tmp, config, device=device)
        model.hetero.progress = progress
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=generator).to(device)
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
            stats = model.hetero.last_stats
            reference = AutoModelForCausalLM.from_pretrained(tmp).to(device).eval()
            started = time.perf_counter()
            expected = reference.generate(ids, max_new_tokens=new_tokens, do_sample=False, min_new_tokens=new_tokens)
            ref_seconds = time.perf_counter() - started
    mismatch = (out[0] != expected[0]).nonzero()
    first = None if mismatch.numel() == 0 else int(mismatch[0]) - prompt_tokens
    return DemoResult(first is None, first, prompt_tokens, new_tokens, ref_seconds, stats)
