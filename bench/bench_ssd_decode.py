"""Decode with a share of the KV on the SSD, beside the same decode with all of it in host memory,
and beside the prediction from the SSD's and PCIe's bandwidths measured in the same run.

    python bench/bench_ssd_decode.py --ssd-dir /tmp --out ssd_decode.json    # on the GPU machine

An 8B-class Llama (random weights, bf16) prefills `--context` tokens, then decodes in `stream` mode.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings

import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.generation.streamers import BaseStreamer

import hetero
from hetero.host_home import HostHome

sys.path.insert(0, os.path.dirname(__file__))
from bench_tiers import raw_io  # noqa: E402  (the O_DIRECT threaded read ceiling)


def llama_8b(layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers,
                       num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                       rope_theta=500000.0, tie_word_embeddings=False)


class Clock(BaseStreamer):
    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def decode_rate(model, ids, steps) -> float:
    clock = Clock()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.generate(ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, streamer=clock)
    t = clock.times[2:]  # [prompt, first token (prefill), ...]: the decode steps after the first
    return (len(t) - 1) / (t[-1] - t[0])


def ssd_read_ceiling(directory: str, nbytes: int, chunk: int, threads: int) -> float:
    """GB/s of threaded O_DIRECT reads of `chunk`-byte pieces of a fresh file, as the store reads."""
    path = os.path.join(directory, f"bench-ssd-ceiling-{os.getpid()}.bin")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.posix_fallocate(fd, 0, nbytes)
        os.close(fd)
        raw_io(path, nbytes, chunk, threads, write=True)  # real blocks, not holes
        return raw_io(path, nbytes, chunk, threads)
    finally:
        os.remove(path)


def pcie_ceiling(nbytes: int = 1 << 30) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    return 5 * nbytes / (time.perf_counter() - t) / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--ssd-share", type=float, default=0.25, help="share of the KV to place on the SSD")
    ap.add_argument("--ssd-dir", default="/tmp", help="a directory on the NVMe drive")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    with torch.device("cuda"):
        model = LlamaForCausalLM._from_config(llama_8b(args.layers), dtype=torch.bfloat16).eval()
    ids = torch.randint(0, 128256, (1, args.context), generator=torch.Generator().manual_seed(0)).cuda()
    block, io_threads = 256, 8
    base = {"mode": "stream", "gpu_kv_bytes": "1GiB", "block_size": block, "io_threads": io_threads}
    nl, bpl = args.layers, math.ceil((args.context + args.steps) / block)
    block_bytes = 2 * 8 * block * 128 * 2
    kv_bytes = nl * bpl * block_bytes
    ssd_blocks = round(args.ssd_share * bpl)
    host_bytes = HostHome.slots_needed(nl, bpl, ssd_blocks) * block_bytes

    rows = []
    hetero.prepare(model, {**base, "cpu_kv_bytes": "64GiB"})
    rate_host = decode_rate(model, ids, args.steps)
    rows.append({"system": "stream, all KV in host memory", "decode_tok_s": rate_host})
    hetero.prepare(model, {**base, "cpu_kv_bytes": host_bytes, "ssd_dir": args.ssd_dir, "ssd_kv_bytes": "64GiB"})
    rate_ssd = decode_rate(model, ids, args.steps)
    stats = model.hetero.last_stats
    ssd_share = stats.ssd_kv_bytes / kv_bytes

    pcie = pcie_ceiling()
    ssd = ssd_read_ceiling(args.ssd_dir, 2 << 30, block_bytes, io_threads)
    ssd_bytes_per_step = nl * ssd_blocks * block_bytes
    t_ssd = ssd_bytes_per_step / (ssd * 1e9)
    t_pcie = kv_bytes / (pcie * 1e9)
    rows.append({"system": f"stream, {ssd_share:.0%} of the KV on the SSD", "decode_tok_s": rate_ssd,
                 "predicted_tok_s_overlapped": 1 / max(t_ssd, t_pcie), "predicted_tok_s_serial": 1 / (t_ssd + t_pcie)})
    result = {"context": args.context, "layers": nl, "kv_bytes": kv_bytes, "ssd_kv_bytes": stats.ssd_kv_bytes,
              "bytes_from_ssd_per_step": ssd_bytes_per_step, "ssd_read_ceiling_GBps": ssd, "pcie_ceiling_GBps": pcie,
              "rows": rows, "device": torch.cuda.get_device_name()}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"SSD O_DIRECT read ceiling (same run): {ssd:.2f} GB/s; PCIe pinned copy: {pcie:.1f} GB/s; "
          f"KV {kv_bytes / 2**30:.2f} GiB, {ssd_bytes_per_step / 2**30:.2f} GiB of it read from the SSD per step")
    for row in rows:
        extra = ""
        if "predicted_tok_s_overlapped" in row:
            extra = (f"  (SSD-bound prediction {row['predicted_tok_s_overlapped']:.2f} tok/s overlapped, "
                     f"{row['predicted_tok_s_serial']:.2f} serial; measured/overlapped "
                     f"{row['decode_tok_s'] / row['predicted_tok_s_overlapped']:.0%})")
        print(f"{row['system']:<40} {row['decode_tok_s']:8.2f} tok/s{extra}")


if __name__ == "__main__":
    main()
