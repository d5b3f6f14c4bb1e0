"""Generate from a long prompt with the KV cache in host memory.

    python examples/generate_long.py --model path/to/llama --config examples/offload-24gb.toml --prompt-file book.txt
"""

import argparse
from pathlib import Path

import torch
from transformers import AutoTokenizer

import hetero


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--config", default="examples/offload-24gb.toml")
    parser.add_argument("--prompt-file", type=Path, required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = hetero.load(args.model, config=args.config, dtype=torch.bfloat16)
    ids = tokenizer(args.prompt_file.read_text(), return_tensors="pt").input_ids.to(model.device)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    print(model.hetero.last_stats.summary())


if __name__ == "__main__":
    main()
