"""The `hetero` command: generate, plan, demo, bench."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"hetero {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("hetero: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hetero", description="Long-context generation with the KV cache off the GPU.")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text from a prompt")
    gen.add_argument("--model", required=True, help="directory of a Hugging Face model")
    gen.add_argument("--config", help="offload configuration file (TOML or YAML); defaults if omitted")
    source = gen.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--prompt-file", type=Path, help="a file holding the prompt text")
    gen.add_argument("--max-new-tokens", type=_positive_int, default=128)
    gen.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    gen.add_argument("--temperature", type=float, default=1.0)
    gen.add_argument("--json", type=Path, help="also write the run's stats to this JSON file")
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(run=_generate)

    plan = sub.add_parser("plan", help="where the KV would live and the predicted step time, without loading weights")
    plan.add_argument("--model", required=True)
    plan.add_argument("--context", type=_positive_int, required=True, help="tokens per sequence")
    plan.add_argument("--batch", type=_positive_int, default=1)
    plan.add_argument("--config")
    plan.set_defaults(run=_plan)

    demo = sub.add_parser("demo", help="built-in check: a random-weight model through `stream` vs transformers")
    demo.add_argument("--prompt-tokens", type=_positive_int, default=3000)
    demo.add_argument("--new-tokens", type=_positive_int, default=32)
    demo.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(run=_demo)

    from .bench_cli import add_bench_parser

    add_bench_parser(sub)
    return parser


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"got {text!r}, expected a positive integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"got {value}, expected a positive integer")
    return value


def _generate(args) -> int:
    import torch
    from transformers import AutoTokenizer

    from .api import load, load_model_config
    from .config import OffloadConfig

    config = OffloadConfig.coerce(args.config)
    load_model_config(args.model)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model)
    except (OSError, ValueError) as exc:
        raise ValueError(f"model: {args.model} has no tokenizer that transformers can load ({exc})") from exc
    prompt = args.prompt if args.prompt is not None else _read_prompt(args.prompt_file)
    model = load(args.model, config)
    ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
    progress = None if args.quiet else _progress_bar(ids.shape[1] + args.max_new_tokens)
    model.hetero.progress = progress
    try:
        with torch.no_grad():
            out = model.generate(
                ids, max_new_tokens=args.max_new_tokens, do_sample=args.sample, temperature=args.temperature
            )
    finally:
        if progress is not None:
            progress.close()
    print(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    stats = model.hetero.last_stats
    print(stats.summary(), file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(stats.to_dict(), indent=2))
    return 0


def _read_prompt(path: Path) -> str:
    if not path.is_file():
        raise FileNotFoundError(f"--prompt-file: {path} does not exist")
    return path.read_text()


def _plan(args) -> int:
    from .api import load_model_config
    from .config import MachineMemory, OffloadConfig, resolve_budgets
    from .plan import Ceilings, KVGeometry, make_plan

    config = OffloadConfig.coerce(args.config)
    model_config = load_model_config(args.model)
    budgets = resolve_budgets(config, MachineMemory.probe())
    plan = make_plan(KVGeometry.from_model_config(model_config), args.context, args.batch, config, budgets, Ceilings())
    print(plan.format())
    return 0


def _demo(args) -> int:
    from .demo import run_demo

    progress = None if args.quiet else _progress_bar(args.prompt_tokens + args.new_tokens)
    try:
        result = run_demo(args.prompt_tokens, args.new_tokens, device=args.device, progress=progress)
    finally:
        if progress is not None:
            progress.close()
    verdict = "tokens match transformers' DynamicCache" if result.matches else (
        f"MISMATCH at new token {result.first_mismatch}"
    )
    print(f"hetero demo (stream mode, random-weight Llama): {verdict}")
    print(result.stats.summary())
    return 0 if result.matches else 1


class _progress_bar:
    """Token progress on stderr, fed by the cache as layer 0 stores tokens."""

    def __init__(self, total: int):
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="tok", file=sys.stderr, leave=False)

    def __call__(self, tokens: int) -> None:
        self._bar.update(tokens - self._bar.n)

    def close(self) -> None:
        self._bar.close()


if __name__ == "__main__":
    sys.exit(main())
