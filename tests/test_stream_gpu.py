"""On the GPU, in bf16: the exact modes agree with transformers' own generation (gpu marker)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hetero
from hetero.demo import save_random_model

from batches import left_padded

pytestmark = pytest.mark.gpu

CONFIG = {
    "mode": "stream",
    "block_size": 64,
    "sink_tokens": 64,
    "window_tokens": 128,
    "cpu_kv_bytes": "1GiB",
    "prefill_chunk_tokens": 512,
}
STEPS = 40


def _run(generate, ids, mask):
    with torch.no_grad():
        out = generate(ids, attention_mask=mask, max_new_tokens=STEPS, min_new_tokens=STEPS, do_sample=False,
                       output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    return out.sequences[:, ids.shape[1]:], torch.stack(out.logits, dim=1).float()


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("lengths", [[1800], [1500, 777, 1203]])
@pytest.mark.parametrize("mode,mib_per_row", [("stream", 1), ("split", 1), ("split-hostwait", 1), ("stream", 64),
                                               ("speculative", 1), ("speculative-reuse", 1), ("speculative-bounded", 1)])
def test_bf16_matches_transformers(arch, lengths, mode, mib_per_row, tmp_path):
    """1 MiB per row forces most of the KV through the fetch ring (and the CPU, in split mode);
    64 MiB holds it all on the GPU."""
    path = save_random_model(tmp_path, arch, seed=7, layers=4, hidden=256, heads=8, kv_heads=2, vocab=256)
    ids, mask = (t.cuda() for t in left_padded(lengths, seed=8))
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ref_tokens, _ = _run(reference.generate, ids, mask)
    config = {**CONFIG, "mode": mode.split("-")[0], "gpu_kv_bytes": f"{mib_per_row * len(lengths)}MiB"}
    if mode.endswith("hostwait"):
        config["cpu_part_wait"] = "host"
    if mode.startswith("speculative"):
        config["min_partial_columns"] = 0  # heads of 32: a quarter of their columns
        config["cpu_remainder"] = "all"  # the CPU attends over what was not fetched: exact
        config["reuse_rows"] = mode.endswith("reuse")
        if mode.endswith("bounded"):  # every block within alpha: the CPU reads them all, exact
            config.update(cpu_remainder="bounded", alpha=1e9)
    model = hetero.load(path, config, dtype=torch.bfloat16, device="cuda")
    tokens, logits = _run(model.generate, ids, mask)
    stats = model.hetero.last_stats
    assert (stats.bytes_to_gpu > 0) == (mib_per_row == 1)
    assert (stats.bytes_read_by_cpu > 0) == (mode != "stream")
    if config.get("reuse_rows"):
        assert stats.reused_token_share > 0
    # Ground truth: the float32 model on hetero's own tokens, in one full forward. hetero's bf16
    # logits must be as close to it as transformers' bf16 forward is, within a small factor.
    sequence = torch.cat([ids, tokens], dim=1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], dim=1)
    truth = _forced_logits(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), sequence, full_mask)
    bf16_forward = _forced_logits(reference, sequence, full_mask)
    ours = (logits - truth).abs().amax().item()
    theirs = (bf16_forward - truth).abs().amax().item()
    assert ours <= 2 * theirs + 1e-3, f"hetero's bf16 logits are off by {ours:.4f}; transformers' by {theirs:.4f}"
    # Greedy tokens can only differ where the true top two are within the bf16 noise.
    top2 = truth.topk(2, dim=-1).values
    near_tie = ((top2[..., 0] - top2[..., 1]) <= 2 * max(ours, theirs)).any(dim=0)
    first_tie = int(near_tie.long().argmax()) if near_tie.any() else STEPS
    agree = int((tokens == ref_tokens).all(dim=0).long().cumprod(0).sum())
    assert agree >= min(32, first_tie), f"tokens agree for {agree} steps; the first near-tie is at step {first_tie}"
    print(f"{arch} {mode} batch {len(lengths)}: {agree} identical steps (first near-tie {first_tie}); "
          f"max logit error vs float32: hetero {ours:.4f}, transformers bf16 {theirs:.4f}")


def _forced_logits(model, sequence, mask):
    """Logits predicting each generated token, from one forward over the whole sequence."""
    model = model.cuda().eval()
    with torch.no_grad():
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)  # as generate numbers left-padded rows
        out = model(sequence, attention_mask=mask, position_ids=positions).logits.float()
    return out[:, -STEPS - 1 : -1]


def _compiled_variants(kernel) -> int:
    return sum(len(cache[0]) for cache in kernel.device_caches.values())


def test_speculative_decode_compiles_nothing_after_load(tmp_path):
    """`hetero.load` compiles the gather and every decode-attention variant speculation uses, so the
    first decode steps of a generation (a fresh process on a fresh machine) do not stall on Triton."""
    from hetero.gpu_kernels.decode_attention import _decode_split_kernel
    from hetero.gpu_kernels.gather import _gather_tokens_kernel

    path = save_random_model(tmp_path, "llama", seed=7, layers=4, hidden=256, heads=8, kv_heads=2, vocab=256)
    config = {**CONFIG, "mode": "speculative", "gpu_kv_bytes": "1MiB", "min_partial_columns": 0}
    model = hetero.load(path, config, dtype=torch.bfloat16, device="cuda")
    before = _compiled_variants(_gather_tokens_kernel), _compiled_variants(_decode_split_kernel)
    ids = torch.randint(1, 256, (1, 1500), device="cuda")
    _run(model.generate, ids, torch.ones_like(ids))
    assert model.hetero.last_stats.fetched_token_share > 0
    assert (_compiled_variants(_gather_tokens_kernel), _compiled_variants(_decode_split_kernel)) == before
