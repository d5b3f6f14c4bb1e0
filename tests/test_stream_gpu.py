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
    path = save_random_model(tmp_path, arch, seed=7, layers=4, hidden=256, heads=8, kv_heads=2, vocab=1024)
    g = torch.Generator().manual_seed(8)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(1, 1024, (n,), generator=g)
        mask[row, width - n:] = 1
    ids, mask = ids.cuda(), mask.cuda()
    reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda().eval()
    ref_tokens, ref_logits = _run(reference.generate, ids, mask)
    config = {**CONFIG, "mode": mode, "gpu_kv_bytes": f"{8 * len(lengths)}MiB"}
    model = hetero.load(path, config, dtype=torch.bfloat16, device="cuda")
    tokens, logits = _run(model.generate, ids, mask)
    assert model.hetero.last_stats.bytes_to_gpu > 0
    same = (tokens == ref_tokens).all(dim=0)
    agree = int(same.long().cumprod(0).sum())
    if agree < 32:
        top2 = ref_logits[:, agree].topk(2, dim=-1).values
        gap = (top2[..., 0] - top2[..., 1]).min().item()
        diff = (logits[:, agree] - ref_logits[:, agree]).abs().amax().item()
        pytest.fail(f"tokens agree for {agree} steps only; at step {agree} the reference's top-2 gap is "
                    f"{gap:.4f} and the logits differ by up to {diff:.4f}")
    scale = ref_logits[:, :agree].abs().amax()
    assert (logits[:, :agree] - ref_logits[:, :agree]).abs().amax() <= 0.03 * scale
