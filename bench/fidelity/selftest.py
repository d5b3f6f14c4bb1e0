"""Checks of the selection attention, and of the speculation recall meter against what hetero's
speculative mode really selects, on random small Llamas, in float32 on the CPU (seconds).

    python bench/fidelity/selftest.py
"""

from __future__ import annotations

import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
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
    check_speculation_recall()


def check_speculation_recall() -> None:
    """spec_recall asks hetero's Speculator what hetero's cache asks it, at the same steps: with
    cpu_remainder "all" (exact attention, so the same hidden states) the selections must agree."""
    import hetero
    import spec_recall
    from settings import speculation_settings

    torch.manual_seed(1)
    config = LlamaConfig(vocab_size=67, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    sink, window, block = 16, 32, 16
    offload = {"mode": "speculative", "gpu_kv_bytes": "256KiB", "block_size": block, "sink_tokens": sink,
               "window_tokens": window, "cpu_remainder": "all", "min_tokens": 0, "max_tokens": 0.1,
               "min_partial_columns": 0}  # heads of 16: a quarter of their columns, as 128-wide heads keep
    ids = torch.randint(3, 67, (2, 230), generator=torch.Generator().manual_seed(2))
    with tempfile.TemporaryDirectory() as ckpt, torch.no_grad():
        LlamaForCausalLM(config).eval().save_pretrained(ckpt)
        model = hetero.load(ckpt, config=offload, device="cpu")
        seen = {}
        select = model.hetero.speculator.select

        def recording(layer, hidden, position, lo, hi, *args, **kwargs):
            idx, count = select(layer, hidden, position, lo, hi, *args, **kwargs)
            seen[(layer, position)] = (lo, hi, idx.clone(), count.clone())
            return idx, count

        model.hetero.speculator.select = recording
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
        assert model.hetero.last_stats.host_kv_bytes > 0, "the cache must offload for speculation to run"

        plain = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
        meter = spec_recall.SpeculationRecall(plain, {"x": speculation_settings(offload)}, sink, window, block)
        measured = {}
        spec = meter.speculators["x"]
        inner = spec.select

        def recording_meter(layer, hidden, position, lo, hi, *args, **kwargs):
            idx, count = inner(layer, hidden, position, lo, hi, *args, **kwargs)
            measured[(layer, position)] = (lo, hi, idx.clone(), count.clone())
            return idx, count

        spec.select = recording_meter
        positions = spec_recall.answer_positions(ids.shape[1], 6)
        meters = {"x": selection.RecallMeter(3)}
        meter.measure(out[:, :-1], positions, meters)
    assert set(seen) == set(measured) and seen, (sorted(seen), sorted(measured))
    same = total = 0
    for key, (lo, hi, idx, count) in seen.items():
        m_lo, m_hi, m_idx, m_count = measured[key]
        assert (lo, hi) == (m_lo, m_hi), (key, lo, hi, m_lo, m_hi)
        assert torch.equal(count, m_count), (key, count, m_count)
        for (b, h), n in zip(((b, h) for b in range(count.shape[0]) for h in range(count.shape[1])), count.flatten()):
            got, want = set(idx[b, h, :n].tolist()), set(m_idx[b, h, :n].tolist())
            same += len(got & want)
            total += int(n)
    assert same >= 0.98 * total, f"the meter's selections differ from hetero's: {same}/{total} positions agree"
    middle = meters["x"].middle_by_layer()
    assert middle[0] is None and all(0 < m < 1 for m in middle[1:]), middle
    print(f"speculation recall self-test passed: {len(seen)} selections agree ({same}/{total} tokens); "
          f"middle recall per layer {middle}")


if __name__ == "__main__":
    main()
