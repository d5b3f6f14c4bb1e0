"""`hetero bench`: the benchmark suite of a source checkout (bench/suite) from the command line.

The suite is imported only when the command runs: it lives beside the package, not in it."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import shlex
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent / "bench"


def add_bench_parser(sub) -> None:
    bench = sub.add_parser("bench", help="benchmark workloads: transformers' caches and each hetero mode side by side")
    add_arguments(bench)
    bench.set_defaults(run=run)


def add_arguments(parser: argparse.ArgumentParser, workload_required: bool = True) -> None:
    parser.add_argument("--workload", required=workload_required,
                        help="fits | small-card | many-sequences | beyond-ram | sweep")
    scale = parser.add_mutually_exclusive_group()
    scale.add_argument("--quick", action="store_true", help="quarter contexts, at most 8 decode steps and batch 2")
    scale.add_argument("--tiny", action="store_true", help="a tiny Llama and contexts of a few hundred tokens (CPU)")
    parser.add_argument("--systems", help="comma-separated subset, e.g. transformers-offloaded,stream "
                                          "(default: every system); results of earlier calls are kept")
    parser.add_argument("--out", type=Path, help="results directory (default: bench/results, with quick/ or tiny/ below it)")
    parser.add_argument("--ssd-dir", help="where beyond-ram's SSD tier writes (default: the temporary directory)")
    parser.add_argument("--attempt-oom", action="store_true",
                        help="run transformers' caches even where they are predicted to run out of GPU or host memory")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: rebuild summary.md and the plots from the JSON under --out")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="an offload config key for every hetero system, e.g. --set cpu_part_wait=host (repeatable)")
    parser.add_argument("--system-timeout", type=float, metavar="SECONDS",
                        help="run each system in a process of its own and stop it after this long, its threads' "
                             "stacks printed shortly before; the row reads 'timeout' and the next system runs")
    parser.add_argument("--same-process", action="store_true",
                        help="run every system in this process (default on CUDA: each in a process of its own, "
                             "so that none meets the memory another left cached)")
    # Set by the parent call for the process it starts per system.
    parser.add_argument("--run-date", help=argparse.SUPPRESS)
    parser.add_argument("--record-command", help=argparse.SUPPRESS)


def run(args, workloads: list[str] | None = None, program: str = "hetero bench") -> int:
    if not (BENCH_DIR / "suite" / "__init__.py").is_file():
        raise FileNotFoundError(f"hetero bench runs bench/suite of a source checkout (pip install -e .); "
                                f"none beside {Path(__file__).parent}")
    if str(BENCH_DIR) not in sys.path:
        sys.path.insert(0, str(BENCH_DIR))
    from suite.main import run_suite

    overrides = parse_overrides(args.set)
    if args.system_timeout is not None and args.same_process and args.run_date is None:
        raise SystemExit("--system-timeout needs each system in a process of its own: drop --same-process")
    run_suite(
        workloads or ([args.workload] if args.workload else []),
        scale="tiny" if args.tiny else "quick" if args.quick else "full",
        systems=args.systems.split(",") if args.systems else None,
        out=args.out, device=args.device, attempt_oom=args.attempt_oom, ssd_dir=args.ssd_dir,
        report_only=args.report_only, command=args.record_command or _command_line(program, args, workloads),
        isolate=False if args.same_process else True if args.system_timeout is not None else None,
        date=args.run_date, overrides=overrides, system_timeout=args.system_timeout,
    )
    return 0


def parse_overrides(items: list[str]) -> dict:
    """--set KEY=VALUE items as a config mapping (values read as JSON where they parse: numbers,
    booleans), checked against the offload config's keys before anything runs."""
    import hetero

    overrides = parse_key_values(items, "--set", "cpu_part_wait=host")
    hetero.OffloadConfig.from_dict(overrides)  # an unknown key or a bad value stops here, named
    return overrides


def parse_key_values(items, source: str, example: str) -> dict:
    """KEY=VALUE items as a mapping, values read as JSON where they parse (numbers, booleans, null)
    and "None" as None, as the knobs' own Python spells it; `source` and `example` name the option
    in the error."""
    import json

    settings = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"{source}: got {item!r}, expected KEY=VALUE, e.g. {example}")
        if value == "None":
            settings[key] = None
            continue
        try:
            settings[key] = json.loads(value)
        except json.JSONDecodeError:
            settings[key] = value
    return settings


def knob_target(path: str):
    """(module, attribute name) of a tuning knob "package.module.NAME"; a clear error where it has none."""
    module_name, _, name = path.rpartition(".")
    module = importlib.import_module(module_name)
    if not hasattr(module, name):
        raise ValueError(f"knob {path}: {module_name} has no attribute {name}")
    return module, name


@contextlib.contextmanager
def knobs_set(knobs: dict):
    """Set module attributes ("package.module.NAME": value) for the block, then restore them."""
    saved = []
    try:
        for path, value in knobs.items():
            module, name = knob_target(path)
            saved.append((module, name, getattr(module, name)))
            setattr(module, name, value)
        yield
    finally:
        for module, name, value in reversed(saved):
            setattr(module, name, value)


def _command_line(program: str, args, workloads: list[str] | None) -> str:
    """The call as typed, rebuilt from its arguments, for the results' record."""
    words = ["--all"] if workloads else ["--workload", args.workload] if args.workload else []
    for flag in ("quick", "tiny", "attempt_oom", "report_only", "same_process"):
        if getattr(args, flag):
            words.append("--" + flag.replace("_", "-"))
    for option in ("systems", "out", "ssd_dir", "device", "system_timeout"):
        if getattr(args, option) is not None:
            words += ["--" + option.replace("_", "-"), f"{getattr(args, option):g}" if option == "system_timeout"
                      else str(getattr(args, option))]
    for item in args.set:
        words += ["--set", item]
    return " ".join([program, *map(shlex.quote, words)])
