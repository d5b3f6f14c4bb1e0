"""What the approximate attention costs in accuracy: retrieval from long held-out contexts, and loss.

For each setting of settings.py, on held-out documents (other files and keys than training):
- retrieval accuracy: the greedy answer to a planted question is exactly right (per kind and mean);
- next-token loss (nats per byte) on the last `scored` tokens of plain held-out text, those tokens
  run through the setting's decode path (teacher-forced) after an exact prefill of the rest;
- attention-mass recall per layer, for the selection rows and (spec_recall.py) hetero's speculation;
- for the speculative rows, the share of the context hetero actually fetched per layer and step.
Writes fidelity.json, fidelity.md and fidelity.png under --out.

    python bench/fidelity/evaluate.py --ckpt /tmp/fidelity_ckpt --out results/     # H100, ~3 min
    python bench/fidelity/evaluate.py --tiny --ckpt /tmp/fidelity_tiny --out results/
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from dataclasses import asdict, dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

import report
import selection
import spec_recall
import tasks
from byte_tokenizer import check_tokenizer
from corpus import load_corpus
from settings import Residency, Setting, build_settings, speculation_settings


@dataclass(frozen=True)
class EvalPlan:
    context: int  # tokens of every probe prompt and text sequence
    probes_per_kind: int
    text_seqs: int
    scored: int  # tokens at the end of each text sequence whose loss is measured
    residency: Residency
    time_limit_s: float  # rows not started by then are reported as skipped
    kv_pairs: int = 8
    notes: int = 4
    short_context: int = 1024  # the reference is also probed this short: did training teach retrieval at all?
    recall_text_positions: int = 64  # teacher-forced text positions the speculation recall is measured at


# The sink and window are whole blocks of hetero's (Residency checks), so that hetero's residency and
# the baselines' are the same tokens. The time limit keeps the run inside one 10-minute call on an
# H100 (training <= 5.5 min); of the speculative rows, which come last, the default one runs first.
PLANS = {
    "gpu": EvalPlan(8192, 64, 16, 256, Residency(sink=64, window=256, block=64), 200.0, kv_pairs=16, notes=4),
    # 32-token blocks: a whole-block sink and window stay small beside the 1K context
    "tiny": EvalPlan(1024, 8, 4, 128, Residency(sink=32, window=64, block=32), 120.0, kv_pairs=4, notes=2,
                     short_context=512),
}


@dataclass
class EvalData:
    probes: dict[str, list[tasks.Probe]]
    texts: torch.Tensor  # [N, context]

    def prompts(self, kind: str, device) -> torch.Tensor:
        return torch.from_numpy(np.stack([p.prompt for p in self.probes[kind]])).to(device)


def make_data(plan: EvalPlan, seed: int, context: int | None = None) -> EvalData:
    corpus = load_corpus("eval")
    rng = np.random.default_rng(10_000 + seed + (context or 0))  # never the training stream
    context = context or plan.context
    probes = {kind: [tasks.probe(rng, corpus, context, kind, plan.kv_pairs, plan.notes)
                     for _ in range(plan.probes_per_kind)] for kind in tasks.KINDS}
    texts = torch.from_numpy(np.stack([tasks.text_sequence(rng, corpus, context) for _ in range(plan.text_seqs)]))
    return EvalData(probes, texts)


def score_answers(probes: list[tasks.Probe], generated: torch.Tensor) -> tuple[list[int], list[dict]]:
    """Exact match (1/0) per probe, and up to three wrong answers, decoded."""
    right, wrong = [], []
    for probe, row in zip(probes, generated.tolist()):
        got = row[: len(probe.answer)]
        right.append(int(got == probe.answer.tolist()))
        if not right[-1] and len(wrong) < 3:
            wrong.append({"expected": tasks.readable(probe.answer), "got": tasks.readable(got),
                          "depth": round(probe.depth, 3)})
    return right, wrong


def record(row: dict, kind: str, probes: list[tasks.Probe], generated: torch.Tensor) -> None:
    right, wrong = score_answers(probes, generated)
    row["accuracy"][kind], row["wrong"][kind], row["correct"][kind] = sum(right) / len(right), wrong, right


def text_loss(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Mean next-token loss; logits[:, i] predicts targets[:, i]."""
    return float(F.cross_entropy(logits.float().flatten(0, 1), targets.flatten()))


def answer_steps(probes: list[tasks.Probe]) -> int:
    return max(len(p.answer) for p in probes)


# Runners ---------------------------------------------------------------------------------------


def run_reference(model, data: EvalData, plan: EvalPlan, scored: int | None = None) -> dict:
    """transformers' own path: SDPA and generate() with its default cache."""
    scored = scored or plan.scored
    model.set_attn_implementation("sdpa")
    row = {"accuracy": {}, "wrong": {}, "correct": {}}
    with torch.no_grad():
        for kind, probes in data.probes.items():
            ids = data.prompts(kind, model.device)
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=answer_steps(probes),
                                 do_sample=False)
            record(row, kind, probes, out[:, ids.shape[1]:])
        texts = data.texts.to(model.device)
        logits = model(input_ids=texts, logits_to_keep=scored).logits
        row["text_loss"] = text_loss(logits[:, :-1], texts[:, -scored + 1:])
    return row


class Prefills:
    """Exact prefills shared by every selection row; each row decodes from them, then crops back."""

    def __init__(self, model, data: EvalData, plan: EvalPlan):
        model.set_attn_implementation(selection.ATTENTION_NAME)
        selection.use(None)
        self.probe = {}
        with torch.no_grad():
            for kind in data.probes:
                ids = data.prompts(kind, model.device)
                out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
                self.probe[kind] = (out.past_key_values, out.logits[:, -1].argmax(-1))
            texts = data.texts.to(model.device)
            prefix = texts[:, : -plan.scored]
            self.text_cache = model(input_ids=prefix, use_cache=True, logits_to_keep=1).past_key_values
            self.text_tail = texts[:, -plan.scored:]
        self.context = plan.context


def run_select(model, data: EvalData, plan: EvalPlan, setting: Setting, prefills: Prefills, seed: int) -> dict:
    """The selection attention: exact prefill, then decode steps over the selected tokens."""
    model.set_attn_implementation(selection.ATTENTION_NAME)
    layers = model.config.num_hidden_layers
    answers_meter, text_meter = selection.RecallMeter(layers), selection.RecallMeter(layers)
    row = {"accuracy": {}, "wrong": {}, "correct": {}}
    with torch.no_grad():
        selection.use(setting.selection, answers_meter, seed, model.device)
        for kind, probes in data.probes.items():
            cache, first = prefills.probe[kind]
            tokens = [first]
            for _ in range(answer_steps(probes) - 1):
                logits = model(input_ids=tokens[-1][:, None], past_key_values=cache, use_cache=True).logits
                tokens.append(logits[:, -1].argmax(-1))
            if cache.get_seq_length() > prefills.context:
                cache.crop(prefills.context - cache.get_seq_length())
            record(row, kind, probes, torch.stack(tokens, dim=1))
        selection.use(setting.selection, text_meter, seed + 1, model.device)
        tail = prefills.text_tail
        logits = model(input_ids=tail, past_key_values=prefills.text_cache, use_cache=True).logits
        prefills.text_cache.crop(-plan.scored)
        row["text_loss"] = text_loss(logits[:, :-1], tail[:, 1:])
        selection.use(None)
    if setting.selection.policy != "full":
        row["recall_by_layer_answers"] = answers_meter.by_layer()
        row["recall_by_layer_text"] = text_meter.by_layer()
        row["recall_middle_by_layer_answers"] = answers_meter.middle_by_layer()
        row["recall_middle_by_layer_text"] = text_meter.middle_by_layer()
    return row


def run_hetero(ckpt: str, data: EvalData, plan: EvalPlan, setting: Setting, text_gpu_kv_bytes: int) -> dict:
    """`hetero.load(ckpt, config=...)`: generate() over hetero's cache; the text loss through its cache too.

    The speculative mode speculates in decode steps only (a forward of several tokens attends over
    everything), so its text loss runs the scored tokens one decode step each; the exact modes take
    them in one forward. `text_gpu_kv_bytes` is the GPU budget for the text batch (hetero must offload
    there too)."""
    import hetero

    model = hetero.load(ckpt, config=setting.hetero_config)
    row = {"accuracy": {}, "wrong": {}, "correct": {}, "hetero_stats": {}}
    offloaded, shares = [], []
    with torch.no_grad():
        for kind, probes in data.probes.items():
            ids = data.prompts(kind, model.device)
            out = model.generate(ids, max_new_tokens=answer_steps(probes), do_sample=False)
            record(row, kind, probes, out[:, ids.shape[1]:])
            stats = getattr(getattr(model, "hetero", None), "last_stats", None)  # optional: what hetero moved
            row["hetero_stats"][kind] = stats.to_dict() if hasattr(stats, "to_dict") else None
            offloaded.append(bool(getattr(stats, "host_kv_bytes", 0)))
            shares.append(getattr(stats, "fetched_token_share", None))
        model.hetero.config = replace(model.hetero.config, gpu_kv_bytes=text_gpu_kv_bytes)
        try:
            row["text_loss"], text_stats = _hetero_text_loss(model, data, plan, stepwise=setting.speculative)
            offloaded.append(bool(text_stats.host_kv_bytes))
            row["fetched_share_text"] = text_stats.fetched_token_share
        except Exception as exc:  # noqa: BLE001 - the loss through hetero's cache is optional; say why it is absent
            row["text_loss"] = None
            row["text_loss_error"] = f"{type(exc).__name__}: {exc}"
    row["offloaded"] = all(offloaded)  # False: the KV fit the GPU budget, nothing was fetched (nor speculated)
    if setting.speculative:
        measured = [s for s in shares if s is not None]
        row["fetched_share"] = float(np.mean(measured)) if measured else None  # answers' decode steps
    del model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return row


def _hetero_text_loss(model, data: EvalData, plan: EvalPlan, stepwise: bool = False):
    """Loss of the scored tail after a chunked prefill of the rest, through hetero's cache; and its CacheStats."""
    texts = data.texts.to(model.device)
    prefix, tail = texts[:, : -plan.scored], texts[:, -plan.scored:]
    cache = model.hetero.new_cache(plan.context)
    cache.prompt_tokens = prefix.shape[1]
    try:
        chunk = model.hetero.config.prefill_chunk_tokens
        for start in range(0, prefix.shape[1], chunk):
            model(input_ids=prefix[:, start : start + chunk], past_key_values=cache, use_cache=True, logits_to_keep=1)
        if stepwise:  # one decode step per token, teacher-forced; the last token predicts nothing scored
            logits = torch.cat([model(input_ids=tail[:, t : t + 1], past_key_values=cache, use_cache=True).logits
                                for t in range(tail.shape[1] - 1)], dim=1)
        else:
            logits = model(input_ids=tail, past_key_values=cache, use_cache=True).logits[:, :-1]
        stats = cache.stats
    finally:
        cache.close()
    return text_loss(logits, tail[:, 1:]), stats


def measure_speculation_recall(model, data: EvalData, plan: EvalPlan, settings: list[Setting]) -> dict[str, dict]:
    """Per speculative setting that leaves tokens out: recall per layer (whole context and middle) at the
    answers' decode steps (the true answers, teacher-forced) and at spread text positions."""
    named = {s.name: speculation_settings(s.hetero_config) for s in settings}
    if not named:
        return {}
    res = plan.residency
    meter = spec_recall.SpeculationRecall(model, named, res.sink, res.window, res.block)
    layers = model.config.num_hidden_layers
    answers = {name: selection.RecallMeter(layers) for name in named}
    texts = {name: selection.RecallMeter(layers) for name in named}
    shares: dict[str, list] = {}
    model.set_attn_implementation("sdpa")
    selection.use(None)
    for kind, probes in data.probes.items():
        steps = min(len(p.answer) for p in probes)
        if steps < 2:
            continue
        ids = np.stack([np.concatenate([p.prompt, p.answer[: steps - 1]]) for p in probes])
        meter.measure(torch.from_numpy(ids).to(model.device), spec_recall.answer_positions(plan.context, steps),
                      answers, shares)
    positions = spec_recall.text_positions(plan.context, plan.scored, plan.recall_text_positions)
    meter.measure(data.texts.to(model.device), positions, texts)
    return {name: {"recall_by_layer_answers": answers[name].by_layer(),
                   "recall_middle_by_layer_answers": answers[name].middle_by_layer(),
                   "recall_by_layer_text": texts[name].by_layer(),
                   "recall_middle_by_layer_text": texts[name].middle_by_layer(),
                   "recall_selected_share": float(torch.stack(shares[name]).mean()) if shares.get(name) else None}
            for name in named}


# Driver ----------------------------------------------------------------------------------------


def gpu_kv_budget(model_config, plan: EvalPlan, batch: int, dtype: torch.dtype, max_share: float = 0.1,
                  extra_tokens: int = 64) -> int:
    """A GPU KV budget (bytes) for `batch` sequences of the plan's context that forces hetero to offload.

    A quarter of the batch's KV, or, when more, what hetero takes besides fetched blocks: the resident
    sink and window slots, the speculative mode's partial keys and gather buffers (for a `max_share`
    cap) and a few fetch buffers. Raises if that would hold the whole KV (nothing would be offloaded)."""
    layers, kv_heads = model_config.num_hidden_layers, model_config.num_key_value_heads
    head_dim = getattr(model_config, "head_dim", None) or model_config.hidden_size // model_config.num_attention_heads
    size = torch.finfo(dtype).bits // 8
    res = plan.residency
    tokens = plan.context + extra_tokens  # prompt and answer: what hetero sizes its cache for
    block_bytes = 2 * batch * kv_heads * res.block * head_dim * size
    resident = layers * (res.sink // res.block + 2 * res.window // res.block + 2) * block_bytes  # slots_per_layer
    kept_columns = min(head_dim, max(1, round(0.25 * head_dim), 32))  # hetero's default partial_ratio and min_partial_columns
    partial_keys = (layers - 1) * batch * kv_heads * tokens * kept_columns * size
    gather = 2 * 2 * batch * kv_heads * int(max_share * tokens) * head_dim * size
    need = resident + partial_keys + gather + 2 * 4 * block_bytes  # two fetch buffers of >= 4 blocks
    budget = max(plan.context * 2 * layers * kv_heads * head_dim * size * batch // 4, need + need // 8)
    whole = layers * (-(-tokens // res.block) + 2) * block_bytes  # what hetero keeps all on the GPU with
    if budget >= whole:
        raise ValueError(f"a GPU KV budget of {budget} bytes would hold the whole KV ({whole}) of {batch} x "
                         f"{plan.context} tokens: hetero would not offload; lengthen the context or shrink the window")
    return budget


def all_layers_share(share: float | None, plan: EvalPlan, layers: int) -> float | None:
    """The fetched share averaged over every layer: speculation's `share` in layers 1+, and layer 0,
    which hetero fetches whole (its middle at the first decode step)."""
    if share is None:
        return None
    res = plan.residency
    lo, hi = spec_recall.middle_span(res.sink, res.window, res.block, plan.context)
    return ((layers - 1) * share + (hi - lo) / plan.context) / layers


def evaluate(ckpt: str, plan: EvalPlan, seed: int, oracle: bool = True, results: dict | None = None,
             on_row=None) -> dict:
    """Run every setting; `results["rows"]` grows as they finish, `on_row(results)` after each."""
    started = time.perf_counter()
    results = {} if results is None else results
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    AutoTokenizer.from_pretrained(ckpt)  # the checkpoint's tokenizer must load offline
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto").to(device).eval()
    data = make_data(plan, seed)
    check_tokenizer(ckpt, bytes(data.probes["copy"][0].prompt[1:200].tolist()).decode("utf-8", "replace"))
    selection.register()
    probes_gpu_kv_bytes = gpu_kv_budget(model.config, plan, plan.probes_per_kind, model.dtype)
    settings = build_settings(plan.context, plan.residency, probes_gpu_kv_bytes, oracle=oracle)
    text_gpu_kv_bytes = gpu_kv_budget(model.config, plan, plan.text_seqs, model.dtype)
    prefills = None
    spec_recalls = None  # measured for every speculative row at once, when the first one runs
    results.update({
        "plan": asdict(plan), "seed": seed, "ckpt": ckpt, "device": str(device),
        "gpu_kv_bytes": {"probes": probes_gpu_kv_bytes, "text": text_gpu_kv_bytes},
        "device_name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "dtype": str(model.dtype), "parameters": sum(p.numel() for p in model.parameters()),
        "depth_range": tasks.PROBE_DEPTH, "rows": [],
        "probe_depths": {k: [round(p.depth, 4) for p in v] for k, v in data.probes.items()},
    })
    rows = results["rows"]
    if plan.short_context < plan.context:
        short = run_reference(model, make_data(plan, seed, plan.short_context), plan, scored=128)
        short["accuracy"]["mean"] = float(np.mean([short["accuracy"][k] for k in tasks.KINDS]))
        results["reference_short_context"] = {"context": plan.short_context, "accuracy": short["accuracy"],
                                              "text_loss": short["text_loss"], "wrong": short["wrong"]}
        print(f"reference at {plan.short_context} tokens: accuracy {short['accuracy']}", flush=True)
    for setting in settings:
        row = {"name": setting.name, "method": setting.method, "runner": setting.runner, "budget": setting.budget,
               "fetch_tokens": None if setting.budget is None else round(setting.budget * plan.context)}
        if setting.hetero_config:
            row["hetero_config"] = setting.hetero_config
        elapsed = time.perf_counter() - started
        if setting.skip_reason is None and elapsed > plan.time_limit_s:
            setting = replace(setting, skip_reason=f"evaluation time limit ({plan.time_limit_s:.0f} s) reached")
        if setting.skip_reason is not None:
            rows.append({**row, "skipped": setting.skip_reason})
            print(f"{setting.name:40s} skipped: {setting.skip_reason}", flush=True)
            continue
        t0 = time.perf_counter()
        try:
            if setting.runner == "reference":
                row.update(run_reference(model, data, plan))
            elif setting.runner == "select":
                prefills = prefills or Prefills(model, data, plan)
                row.update(run_select(model, data, plan, setting, prefills, seed))
            else:
                if setting.approximate and spec_recalls is None:
                    t_recall = time.perf_counter()
                    spec_recalls = measure_speculation_recall(model, data, plan, [s for s in settings if s.approximate
                                                                                   and s.skip_reason is None])
                    results["speculation_recall_seconds"] = round(time.perf_counter() - t_recall, 2)
                    print(f"speculation recall measured for {len(spec_recalls)} settings in "
                          f"{results['speculation_recall_seconds']:.1f} s", flush=True)
                row.update(run_hetero(ckpt, data, plan, setting, text_gpu_kv_bytes))
                row.update((spec_recalls or {}).get(setting.name, {}))
                if setting.speculative:
                    row["fetched_share_all_layers"] = all_layers_share(row.get("fetched_share"), plan,
                                                                       model.config.num_hidden_layers)
        except Exception as exc:  # noqa: BLE001 - a row that fails is reported and the others still run
            rows.append({**row, "skipped": f"{type(exc).__name__}: {exc}"})
            print(f"{setting.name:40s} failed: {type(exc).__name__}: {exc}", flush=True)
            if on_row is not None:
                on_row(results)
            continue
        row["accuracy"]["mean"] = float(np.mean([row["accuracy"][k] for k in tasks.KINDS]))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        rows.append(row)
        print(report.row_line(row), flush=True)
        results["seconds"] = round(time.perf_counter() - started, 1)
        if on_row is not None:
            on_row(results)
    results["seconds"] = round(time.perf_counter() - started, 1)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--out", required=True, help="directory for fidelity.json, .md and .png")
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-oracle", action="store_true", help="leave out the oracle (top true attention) rows")
    parser.add_argument("--train-log", help="the training log JSON, to quote in the report")
    parser.add_argument("--context", type=int, help="override the plan's context (tokens)")
    parser.add_argument("--probes", type=int, help="override the plan's probes per kind")
    args = parser.parse_args()
    hf_logging.disable_progress_bar()
    results = {"command": "python3 bench/fidelity/evaluate.py " + " ".join(sys.argv[1:]),
               "date": datetime.datetime.now().isoformat(timespec="seconds")}
    if args.train_log:
        with open(args.train_log) as f:
            train = json.load(f)
        results["training"] = {k: v for k, v in train.items() if k != "history"}
        results["training"]["last_log"] = train["history"][-1] if train.get("history") else None
    # Written after every row, so that a run cut short still leaves what it measured.
    plan = PLANS["tiny" if args.tiny else "gpu"]
    plan = replace(plan, context=args.context or plan.context, probes_per_kind=args.probes or plan.probes_per_kind)
    evaluate(args.ckpt, plan, args.seed, oracle=not args.no_oracle,
             results=results, on_row=lambda r: report.write_all(args.out, r))
    for path in report.write_all(args.out, results):
        print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
