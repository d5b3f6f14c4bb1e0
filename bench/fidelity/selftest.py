"""Checks of the selection attention on a random small Llama, in float32 on the CPU (a few seconds).

    python bench/fidelity/selftest.py
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.integrations.sdpa_attention import repeat_kv

import selection
from selection import Selection


def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=67, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    return LlamaForCausalLM(config).eval()


def continuation_logits(model, ids, prefix, sel, meter=None, seed=0):
    """Exact prefill of ids[:, :prefix], then the rest in one forward through the selection."""
    model.set_attn_implementation(selection.ATTENTION_NAME)
    selection.use(None)
    cache = model(input_ids=ids[:, :prefix], use_cache=True).past_key_values
    selection.use(sel, meter, seed)
    logits = model(input_ids=ids[:, prefix:], past_key_values=cache, use_cache=True).logits
    selection.use(None)
    return logits


def stepwise_logits(model, ids, prefix, sel):
    """The same, one decode step at a time."""
    model.set_attn_implementation(selection.ATTENTION_NAME)
    selection.use(None)
    cache = model(input_ids=ids[:, :prefix], use_cache=True).past_key_values
    selection.use(sel)
    steps = [model(input_ids=ids[:, t : t + 1], past_key_values=cache, use_cache=True).logits
             for t in range(prefix, ids.shape[1])]
    selection.use(None)
    return torch.cat(steps, dim=1)


def manual_window_attention(q, k, v, q_pos, sink, window, fetch, scale):
    """Plain reference: each row attends to [0, sink), the window + fetch tokens before it and itself."""
    group = q.shape[1] // k.shape[1]
    k, v = repeat_kv(k, group), repeat_kv(v, group)
    k_pos = torch.arange(k.shape[2])
    keep = (k_pos[None] < sink) | (k_pos[None] >= q_pos[:, None] - window - fetch)
    keep &= k_pos[None] <= q_pos[:, None]
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.softmax(scores.masked_fill(~keep, float("-inf")), -1) @ v.double()


def main() -> None:
    selection.register()
    model = tiny_model()
    ids = torch.randint(0, 67, (3, 301))
    prefix = 200
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        exact = model(input_ids=ids).logits[:, prefix:]
        full = continuation_logits(model, ids, prefix, Selection("full", 0, 0, 0))
        assert torch.allclose(full, exact, atol=1e-4), (full - exact).abs().max()
        wide = continuation_logits(model, ids, prefix, Selection("window", 4, 16, 400))
        assert torch.allclose(wide, exact, atol=1e-4), "a window covering everything must be exact"
        narrow = Selection("window", 4, 16, 20)
        parallel, stepwise = continuation_logits(model, ids, prefix, narrow), stepwise_logits(model, ids, prefix, narrow)
        assert torch.allclose(parallel, stepwise, atol=1e-4), "teacher-forced rows must equal decode steps"
        assert (parallel - exact).abs().max() > 1e-3, "a narrow window must change the logits"

        q, k, v = (torch.randn(2, 4, 5, 8), torch.randn(2, 2, 90, 8), torch.randn(2, 2, 90, 8))
        q_pos = torch.arange(85, 90)
        out, recall, middle = selection._attend_rows(q, k, v, q_pos, 8**-0.5, Selection("window", 3, 10, 7))
        ref = manual_window_attention(q, k, v, q_pos, 3, 10, 7, 8**-0.5)
        assert torch.allclose(out.double(), ref, atol=1e-5), (out.double() - ref).abs().max()
        assert recall.shape == (2, 4, 5) and bool((recall > 0).all() and (recall < 1).all())
        assert bool((middle < recall).all()), "the middle recall leaves out the sink and window"
        # Blocks: the sink and window are whole blocks, as hetero's cache keeps them.
        lo, hi = Selection("window", 3, 10, 7, block=8).middle(q_pos)
        assert lo == 8 and hi.tolist() == [64, 64, 64, 72, 72], (lo, hi)
        out_b, _, _ = selection._attend_rows(q, k, v, q_pos, 8**-0.5, Selection("window", 8, 16, 7, block=8))
        keep = [(k_pos < 8) | (k_pos >= h - 7) for h, k_pos in zip(hi.tolist(), [torch.arange(90)] * 5)]
        for row, kept in enumerate(keep):
            kept &= torch.arange(90) <= q_pos[row]
            scores = (q[:, :, row : row + 1].double() @ repeat_kv(k, 2).double().transpose(-1, -2)) * 8**-0.5
            want = torch.softmax(scores.masked_fill(~kept, float("-inf")), -1) @ repeat_kv(v, 2).double()
            assert torch.allclose(out_b[:, :, row : row + 1].double(), want, atol=1e-5), row

        recalls = {}
        for policy in ("window", "random", "oracle"):
            meter = selection.RecallMeter(2)
            continuation_logits(model, ids, prefix, Selection(policy, 4, 16, 20), meter)
            recalls[policy] = meter.by_layer()
        for layer in range(2):
            assert recalls["oracle"][layer] >= max(recalls["window"][layer], recalls["random"][layer]) - 1e-6, recalls
        a = continuation_logits(model, ids, prefix, Selection("random", 4, 16, 20), seed=5)
        b = continuation_logits(model, ids, prefix, Selection("random", 4, 16, 20), seed=5)
        assert torch.equal(a, b), "random selection must be reproducible from its seed"
    print(f"selection self-test passed; recall per layer {recalls}")


if __name__ == "__main__":
    main()
