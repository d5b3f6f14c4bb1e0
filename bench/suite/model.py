"""The model every system runs: Llama-3.1-8B's architecture with random bf16 weights, built where it
computes (no save/load), or a tiny Llama of the same family for CPU runs."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def llama_8b_config(layers: int = 32, max_positions: int = 131072 + 4096) -> LlamaConfig:
    """Llama-3.1-8B's shapes; positions past 128K so that a 128K prompt can still decode."""
    return LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=max_positions,
        rope_theta=500000.0, tie_word_embeddings=False,
    )


def tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=False,
    )


def build_random_model(config: LlamaConfig, device: torch.device, seed: int = 0) -> LlamaForCausalLM:
    """Random bf16 weights allocated and initialised on `device` itself (fast on a GPU)."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    model.generation_config.pad_token_id = 0  # random ids, no tokenizer: silences the missing-pad warning
    return model.eval()


def random_prompt(vocab_size: int, batch: int, context: int, device: torch.device, seed: int = 1) -> torch.Tensor:
    """The same token ids for every system: drawn on the CPU from a seeded generator; no 0, the pad id."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, vocab_size, (batch, context), generator=g).to(device)


def kv_bytes(config: LlamaConfig, batch: int, tokens: int, dtype_bytes: int = 2) -> int:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * dtype_bytes * batch * tokens


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())
