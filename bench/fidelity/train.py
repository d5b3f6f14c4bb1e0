"""Train a small Llama on long stretches of standard-library source with retrieval tasks planted in it.

One seeded run, short sequences first then long ones, bounded by a hard time limit checked every
step: when time runs out the learning-rate schedule has already been squeezed to end there, and
the model is saved all the same. Writes a transformers checkpoint (safetensors) and a byte-level
tokenizer to --ckpt, and a log to --log.

    python bench/fidelity/train.py --ckpt /tmp/fidelity_ckpt --log train_log.json            # H100, ~5 min
    python bench/fidelity/train.py --tiny --ckpt /tmp/fidelity_tiny --log train_log.json     # CPU, ~1.5 min
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

import tasks
from byte_tokenizer import BOS_ID, EOS_ID, PAD_ID, VOCAB_SIZE, check_tokenizer, save_tokenizer
from corpus import load_corpus

LABELS = tasks.KINDS  # what training_sequence's labels 1, 2, ... stand for


@dataclass(frozen=True)
class TrainPlan:
    """Model shape and schedule. `lengths` are the curriculum's stages, entered at `stage_starts`."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    lengths: tuple[int, ...]
    stage_starts: tuple[float, ...]  # share of progress at which each length begins
    densities: tuple[float, ...]  # how densely each stage plants facts (tasks.training_sequence)
    tokens_per_step: int
    steps: int
    time_limit_s: float
    lr: float
    answer_weight: float  # extra loss weight of answer tokens
    rope_theta: float
    max_positions: int


PLANS = {
    # ~22M parameters, 32K tokens a step. The step count is about what an H100 finishes in the time
    # limit; when it is slower, the time limit governs (the log says which did). The first stage plants
    # facts densely on short sequences, where the copying heads form; later stages lengthen the context.
    "gpu": TrainPlan(512, 8, 8, 2, 1408, (1024, 2048, 4096, 8192), (0.0, 0.3, 0.5, 0.7), (1.0, 0.75, 0.5, 0.5),
                     32768, 5000, 300.0, 2e-3, 4.0, 100000.0, 16384),
    "tiny": TrainPlan(128, 4, 4, 2, 384, (512, 1024), (0.0, 0.5), (1.0, 0.75), 8192, 700, 90.0,
                      3e-3, 4.0, 10000.0, 4096),
}


def model_config(plan: TrainPlan) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=VOCAB_SIZE, hidden_size=plan.hidden, intermediate_size=plan.ffn, num_hidden_layers=plan.layers,
        num_attention_heads=plan.heads, num_key_value_heads=plan.kv_heads, max_position_embeddings=plan.max_positions,
        rope_parameters={"rope_type": "default", "rope_theta": plan.rope_theta}, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
    )


class Schedule:
    """Progress is the larger of steps done and time spent, each as a share of its limit."""

    def __init__(self, plan: TrainPlan, started: float):
        self.plan = plan
        self.started = started

    def progress(self, step: int) -> float:
        return max(step / self.plan.steps, (time.perf_counter() - self.started) / self.plan.time_limit_s)

    def stage(self, progress: float) -> tuple[int, float]:
        """(sequence length, fact density) of the curriculum stage at `progress`."""
        stage = max(0, sum(progress >= start for start in self.plan.stage_starts) - 1)
        return self.plan.lengths[stage], self.plan.densities[stage]

    def lr(self, progress: float) -> float:
        warmup = 0.03
        if progress < warmup:
            return self.plan.lr * max(progress, 1e-3) / warmup
        cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - warmup) / (1 - warmup))))
        return self.plan.lr * (0.1 + 0.9 * cosine)


def batch(rng, corpus, stage: tuple[int, float], rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [rows, length] and each token's label (tasks.training_sequence)."""
    seqs = [tasks.training_sequence(rng, corpus, *stage) for _ in range(rows)]
    ids = torch.from_numpy(np.stack([s[0] for s in seqs]))
    labels = torch.from_numpy(np.stack([s[1] for s in seqs]))
    if device.type == "cuda":
        ids, labels = ids.pin_memory(), labels.pin_memory()
    return ids.to(device, non_blocking=True), labels.to(device, non_blocking=True).long()


def train(plan: TrainPlan, ckpt: str, seed: int, save_dtype: torch.dtype, log_every: int = 25) -> dict:
    started = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    corpus = load_corpus("train")
    model = LlamaForCausalLM._from_config(model_config(plan), attn_implementation="sdpa").to(device)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.1f}M parameters, {plan.layers} layers, {plan.heads}/{plan.kv_heads} heads; "
          f"train text {len(corpus.text) / 1e6:.1f} MB from {corpus.files} files; device {device}", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=plan.lr, betas=(0.9, 0.95), fused=device.type == "cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    loop_started = time.perf_counter()
    schedule = Schedule(plan, loop_started)
    history, step, tokens, stopped_by = [], 0, 0, "steps"
    pending = []  # [text loss, hits and counts per kind] tensors, read every log_every steps: no sync per step
    model.train()
    while True:
        progress = schedule.progress(step)
        if progress >= 1.0:
            stopped_by = "steps" if step >= plan.steps else "time limit"
            break
        stage = schedule.stage(progress)
        length = stage[0]
        for group in optimizer.param_groups:
            group["lr"] = schedule.lr(progress)
        ids, labels = batch(rng, corpus, stage, max(1, plan.tokens_per_step // length), device)
        with autocast:
            logits = model(input_ids=ids[:, :-1]).logits
        per_token = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view_as(ids[:, 1:])
        label = labels[:, 1:]
        is_answer = (label > 0).float()
        weights = 1.0 + plan.answer_weight * is_answer
        loss = (per_token * weights).sum() / weights.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        with torch.no_grad():
            plain = (label == 0).float()
            text = (per_token * plain).sum() / plain.sum()
            hit = (logits.argmax(-1) == ids[:, 1:]).float()
            of_kind = [label == 1 + k for k in range(len(LABELS))]
            pending.append(torch.stack([text] + [(hit * m).sum() for m in of_kind] + [m.sum() for m in of_kind]))
        step += 1
        tokens += ids.numel()
        if step % log_every == 0:
            stats = torch.stack(pending)
            pending.clear()
            kinds = len(LABELS)
            text_loss = float(stats[:, 0].mean())
            hits, counts = stats[:, 1 : 1 + kinds].sum(0), stats[:, 1 + kinds :].sum(0).clamp_min(1)
            per_kind = {k: round(float(h / c), 3) for k, h, c in zip(LABELS, hits, counts)}
            answer_acc = float(hits[: len(tasks.KINDS)].sum() / counts[: len(tasks.KINDS)].sum())
            elapsed = time.perf_counter() - loop_started
            history.append({"step": step, "seconds": round(elapsed, 1), "length": length, "lr": schedule.lr(progress),
                            "text_loss": round(text_loss, 4), "answer_token_acc": round(answer_acc, 4),
                            "answer_token_acc_by_kind": per_kind})
            print(f"step {step:5d}  {elapsed:6.1f}s  len {length:5d}  lr {schedule.lr(progress):.2e}  "
                  f"text loss {text_loss:.3f} nats/byte  answer-token acc {answer_acc:.3f} {per_kind}  "
                  f"{tokens / elapsed / 1e3:.0f}K tok/s", flush=True)
    loop_s = time.perf_counter() - loop_started
    model.config.use_cache = True
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.to(save_dtype).save_pretrained(ckpt)
    save_tokenizer(ckpt)
    check_tokenizer(ckpt, corpus.text[:4096].decode("utf-8", "replace"))
    summary = {
        "plan": asdict(plan), "seed": seed, "parameters": params, "device": str(device),
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "steps": step, "tokens": tokens, "loop_s": round(loop_s, 1), "total_s": round(time.perf_counter() - started, 1),
        "stopped_by": stopped_by, "tokens_per_s": round(tokens / loop_s), "saved_dtype": str(save_dtype),
        "history": history,
    }
    print(f"trained {step} steps, {tokens / 1e6:.1f}M tokens in {loop_s:.0f} s (stopped by {stopped_by}); "
          f"saved to {ckpt}", flush=True)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True, help="directory for the checkpoint and tokenizer")
    parser.add_argument("--log", help="JSON file for the training log")
    parser.add_argument("--tiny", action="store_true", help="a tiny model on short sequences, for a CPU")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="override the plan's step count")
    parser.add_argument("--time-limit", type=float, help="override the plan's training-loop time limit (s)")
    parser.add_argument("--plan-json", help='override any plan fields, e.g. \'{"lengths": [512], "stage_starts": [0]}\'')
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    plan = PLANS["tiny" if args.tiny else "gpu"]
    overrides = {k: v for k, v in (("steps", args.steps), ("time_limit_s", args.time_limit)) if v is not None}
    if args.plan_json:
        overrides.update({k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(args.plan_json).items()})
    plan = TrainPlan(**{**asdict(plan), **overrides})
    save_dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
    summary = train(plan, args.ckpt, args.seed, save_dtype)
    if args.log:
        with open(args.log, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
