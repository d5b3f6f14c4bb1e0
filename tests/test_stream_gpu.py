"""On the GPU, in bf16: the exact modes agree with transformers' own generation (gpu marker)."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import hetero
from hetero.demo import save_random_model

pytestmark = pytest.mark.gpu

CONFIG = {
    "mode": "stream",
    "block_size": 64,
    "sink_tokens": 64,
    "window_tokens": 128,
    "gpu_kv_bytes": "8MiB",
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
@pytest.mark.parametrize("mode", ["stream", "split"])
def test_bf16_matches_transformers(arch, lengths, mode, tmp_path):
    path = save_random_model(tmp_path, arch, seed=7, layers=4, hidden=256, heads=8, kv_heads=2, vocab=256)
    g = torch.Generator().manual_seed(8)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, 256, (n,), generator=g)
        mask[row, width - n:] = 1
    ids, mask = ids.cuda(), mask.cuda()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ref_tokens, ref_logits = _run(reference.generate, ids, mask)
    config = {**CONFIG, "mode": mode, "gpu_kv_bytes": f"{8 * len(lengths)}MiB"}
    model = hetero.load(path, config, dtype=torch.bfloat16, device="cuda")
    tokens, logits = _run(model.generate, ids, mask)
    assert model.hetero.last_stats.bytes_to_gpu > 0
    # bf16 logits are coarse: where the reference's top two are within the rounding noise, either
    # token is right. Tokens must agree up to the first such near-tie (and for 32 steps if none).
    tol = 0.02 * ref_logits.abs().amax().item()
    top2 = ref_logits.topk(2, dim=-1).values
    near_tie = ((top2[..., 0] - top2[..., 1]) <= 2 * tol).any(dim=0)
    first_tie = int(near_tie.long().argmax()) if near_tie.any() else STEPS
    same = (tokens == ref_tokens).all(dim=0)
    agree = int(same.long().cumprod(0).sum())
    assert agree >= min(32, first_tie), f"tokens agree for {agree} steps; the first near-tie is at step {first_tie}"
    diff = (logits[:, :agree] - ref_logits[:, :agree]).abs().amax().item()
    assert diff <= tol, f"logits differ by {diff:.4f} (tolerance {tol:.4f})"
    print(f"{arch} {mode} batch {len(lengths)}: {agree} identical steps, first near-tie {first_tie}, "
          f"max logit diff {diff:.4f}")
