"""`stream` on an 8B-class Llama (random weights, bf16) beside transformers' offloaded cache.

Prints and writes JSON: prefill seconds, decode tokens/s, peak GPU memory, and the PCIe-bound
prediction from a pinned-copy ceiling measured in the same run.

    python bench/bench_stream.py --context 32768 --new-tokens 32 --out stream.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from transformers import LlamaForCausalLM

import hetero
from suite.ceilings import pinned_h2d_bytes_per_s as pinned_copy_ceiling
from suite.measure import TokenClock
from suite.model import llama_8b_config


def measure(name, generate, ids, new_tokens, **kwargs):
    """Time to first token, and decode tokens/s over the steps after it, from one run."""
    clock = TokenClock()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad():
        out = generate(ids, max_new_tokens=new_tokens + 1, min_new_tokens=new_tokens + 1, do_sample=False,
                       streamer=clock, **kwargs)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    first_token = clock.times[1] - start
    decode = new_tokens * ids.shape[0] / (clock.times[-1] - clock.times[1])
    row = {"system": name, "prefill_s": first_token, "decode_tok_s": decode, "peak_gpu_gib": peak / 2**30}
    print(f"{name:28s} prefill {first_token:7.2f} s   decode {decode:7.2f} tok/s   peak GPU {peak / 2**30:6.2f} GiB",
          flush=True)
    return row, out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--gpu-kv-bytes", default="1GiB")
    parser.add_argument("--out", default="bench_stream.json")
    args = parser.parse_args()

    config = llama_8b_config(args.layers)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(config, dtype=torch.bfloat16).eval()
    ids = torch.randint(0, config.vocab_size, (args.batch, args.context), device="cuda")
    pcie = pinned_copy_ceiling()
    kv_per_token = 2 * config.num_hidden_layers * config.num_key_value_heads * 128 * 2 * args.batch
    offload = {"mode": "stream", "gpu_kv_bytes": args.gpu_kv_bytes, "cpu_kv_bytes": "64GiB"}
    cfg = hetero.OffloadConfig.coerce(offload)
    resident_tokens = cfg.sink_tokens + cfg.window_tokens
    streamed = (args.context - resident_tokens) * kv_per_token
    rows = []

    model.set_attn_implementation("sdpa")
    original_generate = model.generate
    row, ref_out = measure("transformers offloaded", original_generate, ids, args.new_tokens,
                           cache_implementation="offloaded")
    row["bound_tok_s"] = args.batch / (args.context * kv_per_token / pcie)
    rows.append(row)

    hetero.prepare(model, offload)
    row, out = measure("hetero stream", model.generate, ids, args.new_tokens)
    row["bound_tok_s"] = args.batch / (streamed / pcie)
    stats = model.hetero.last_stats
    row["hetero_stats"] = stats.to_dict()
    same = (out == ref_out)[:, args.context:].all(dim=0).long().cumprod(0).sum().item()
    row["tokens_agreeing_with_offloaded"] = int(same)
    rows.append(row)

    for r in rows:
        r["ratio_to_bound"] = r["decode_tok_s"] / r["bound_tok_s"]
    speedup = rows[1]["decode_tok_s"] / rows[0]["decode_tok_s"]
    print(f"\nPCIe pinned copy ceiling (same run): {pcie / 1e9:.1f} GB/s; KV {kv_per_token * args.context / 2**30:.2f} GiB")
    print(f"{'system':28s} {'decode tok/s':>12s} {'PCIe bound':>11s} {'of bound':>9s}")
    for r in rows:
        print(f"{r['system']:28s} {r['decode_tok_s']:12.2f} {r['bound_tok_s']:11.2f} {r['ratio_to_bound']:9.0%}")
    print(f"hetero stream / transformers offloaded: {speedup:.2f}x; tokens agreeing: {rows[1]['tokens_agreeing_with_offloaded']}")
    result = {"context": args.context, "batch": args.batch, "layers": args.layers, "pcie_gbs": pcie / 1e9,
              "kv_gib": kv_per_token * args.context / 2**30, "rows": rows, "speedup_vs_offloaded": speedup,
              "device": torch.cuda.get_device_name()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
