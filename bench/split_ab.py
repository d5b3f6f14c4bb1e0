"""Settings of the `split` mode's CPU side, taking turns decode step by decode step within one
generation: which one gets through its KV faster inside the pipeline, beside the fetches?

Runs on one host and one prompt compare settings that separate runs cannot: the GPU machine's host
changes from call to call, and within a call its memory speed drifts by a fifth, more than most
knobs move the kernel. After `--settle` decode steps (and the "auto" share's tuning, which this
script then holds), each step runs the next setting in turn (A, B, C, ...), and the pipeline times
that step's host jobs (CPU attention, KV bytes per second of their own time) and its copies; the
step's record adds the share of CPU time the hypervisor stole from the guest (bench/proc_stat.py). A
setting is a set of module attributes ("package.module.NAME=VALUE": e.g.
`hetero.cpu_kernels.attention.UNITS_PER_THREAD=4`, `hetero.cpu_kernels.attention._threads=14` for
the threads, `hetero.pipeline.HOST_JOB_SWITCH_INTERVAL_S=0.0001` for the GIL's hand-over); A is the
defaults unless given, each `--b` adds one more. A flip takes effect at a step's first layer, whose
host job may already be under way: one layer in a step's 32 runs the other setting.

    python3 bench/split_ab.py --context 131072 --gpu-kv-bytes 4GiB --steps 40 \\
        --b hetero.cpu_kernels.attention.SPREAD_V_PREFETCH=true --b hetero.cpu_kernels.attention._threads=14 --out ab.json
    python3 bench/split_ab.py --tiny --steps 8 --settle 2 --b hetero.cpu_kernels.attention.UNITS_PER_THREAD=4

`--avoid-stolen K` adds a setting chosen afresh at each of its turns: the kernel's threads kept off
the (at most K) vCPUs the hypervisor stole most from over the last steps, those above
`--stolen-floor` (`hetero.cpu_kernels.attention.THREAD_CPUS`, and as many threads as CPUs left);
where none is, it runs the defaults. Each of its steps records the CPUs it kept off.
`--shares-around D` adds two settings that run the defaults at the held share less D and plus D:
whether the share the tuner settled on is where the steps are shortest. `--follow N` adds one whose
share follows the last N steps' windows (`SplitTuner(follow=N)`, fed every step's window), against
the share held since the tuning steps: whether following pays where the host's speed drifts.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

import hetero
from hetero.bench_cli import knob_target, knobs_set, parse_key_values, parse_overrides
from hetero.cpu_kernels.thread_cpus import ALL_CPUS, team_thread_ids
from hetero.split_tuner import SplitTuner

sys.path.insert(0, os.path.dirname(__file__))
from json_out import write_json  # noqa: E402
from proc_stat import cpu_jiffies, jiffies_by_cpu, mean_by_cpu, most_stolen, steal_share, steal_share_by_cpu  # noqa: E402
from step_times import TINY  # noqa: E402
from suite.measure import TokenClock  # noqa: E402
from suite.model import build_random_model, llama_8b_config, random_prompt, tiny_llama_config  # noqa: E402


class Alternator:
    """At each decode step's first layer (the cache's `progress` call): once settled, takes the
    pipeline's timings of the step before for the setting it ran, then puts the other in place."""

    def __init__(self, prompt: int, settle: int, settings: dict[str, dict], chosen: dict | None = None,
                 follow: int = 0):
        """`chosen`: settings whose knobs a function of the Alternator picks at each of their turns,
        returning (knobs, a note for the step's record). `follow`: windows a `SplitTuner` fed with
        every step's window from the turns' start balances on (`follower`; 0: none)."""
        self.prompt, self.settle, self.settings, self.chosen = prompt, settle, settings, chosen or {}
        self.follow, self.follower = follow, None
        self.readings: list = []  # proc_stat.jiffies_by_cpu at each decode step's start
        self.note = None
        self.names = list(settings)
        self.cache = None
        self.current: str | None = None  # the setting the step under way runs
        self.held_share: float | None = None  # the GPU share when the turns began
        self.share_ran: float | None = None  # the share the step under way runs at
        self.last_stamp: float | None = None
        self.last_ticks = self.last_by_cpu = None  # proc_stat.cpu_jiffies and jiffies_by_cpu at the last stamp
        self.steps: dict[str, list[dict]] = {name: [] for name in self.names}

    def __call__(self, tokens: int) -> None:
        now, ticks, by_cpu = time.perf_counter(), cpu_jiffies(), jiffies_by_cpu()
        step = tokens - self.prompt  # 1: the first decode step's first layer
        if step < 1:
            return
        self.readings.append(by_cpu)
        if self.current is not None:
            times = self.cache.pipeline.take_work_times()
            if self.follower is not None:
                self.follower.observe(times)
            self.steps[self.current].append({
                "step": step - 1, "ms": 1e3 * (now - self.last_stamp),
                "cpu_bytes": times.host_bytes, "cpu_s": times.host_seconds, "cpu_idle_s": times.host_idle_seconds,
                "copy_bytes": times.copy_bytes, "copy_s": times.copy_seconds,
                "steal": steal_share(self.last_ticks, ticks),
                "steal_by_cpu": steal_share_by_cpu(self.last_by_cpu, by_cpu), "share": self.share_ran,
                **({} if self.note is None else {"chosen": self.note})})
            self._put(self.names[(self.names.index(self.current) + 1) % len(self.names)])
        elif step >= self.settle and (self.cache.split_tuner is None or self.cache.split_tuner.done):
            self.cache.split_tuner = None  # the share holds; the windows are this script's from here
            self.held_share = self.cache.gpu_share
            if self.follow:
                self.follower = SplitTuner(self.held_share, skip=0, steps=0, follow=self.follow)
            self.cache.pipeline.time_work()
            self._put(self.names[0])
        self.last_stamp, self.last_ticks, self.last_by_cpu = now, ticks, by_cpu

    def _put(self, name: str) -> None:
        knobs, self.note = dict(self.settings[name]), None
        self.cache.gpu_share = self.held_share
        if name in self.chosen:
            picked, self.note = self.chosen[name](self)
            knobs.update(picked)
        for path, value in knobs.items():
            setattr(*knob_target(path), value)
        self.current, self.share_ran = name, self.cache.gpu_share

    def stolen_lately(self, steps: int = 8) -> list[float | None] | None:
        """Each CPU's stolen share over the last `steps` decode steps (fewer where fewer ran)."""
        known = [r for r in self.readings[-steps - 1:] if r]
        return steal_share_by_cpu(known[0], known[-1]) if len(known) > 1 else None

    def summary(self) -> dict:
        def rate(rows, nbytes, seconds):
            rates = [r[nbytes] / r[seconds] for r in rows if r[seconds] > 0]
            return statistics.median(rates) / 1e9 if rates else None

        return {name: {"steps": len(rows),
                       "median_step_ms": statistics.median(r["ms"] for r in rows) if rows else None,
                       "share": statistics.median(r["share"] for r in rows) if rows else None,
                       "cpu_gbs": rate(rows, "cpu_bytes", "cpu_s"), "copy_gbs": rate(rows, "copy_bytes", "copy_s"),
                       "median_cpu_idle_ms": 1e3 * statistics.median(r["cpu_idle_s"] for r in rows) if rows else None,
                       "mean_steal": _mean(r["steal"] for r in rows),
                       "mean_steal_by_cpu": mean_by_cpu([r["steal_by_cpu"] for r in rows])}
                for name, rows in self.steps.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--gpu-kv-bytes", default="4GiB")
    p.add_argument("--steps", type=int, default=40, help="decode steps in all, the settling ones included")
    p.add_argument("--settle", type=int, default=8, help="decode steps before the alternation starts")
    p.add_argument("--a", default="", metavar="KNOB=VALUE,...", help="setting A (default: the knobs' defaults)")
    p.add_argument("--b", action="append", default=[], metavar="KNOB=VALUE,...",
                   help="setting B; again for C, D, ... (each one more in the turns)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an offload config key, e.g. split_ratio=0.5")
    p.add_argument("--avoid-stolen", type=int, default=0, metavar="K",
                   help="add a setting that keeps the kernel's threads off the K most stolen vCPUs of late")
    p.add_argument("--stolen-floor", type=float, default=0.02, help="a vCPU stolen from less than this is never avoided")
    p.add_argument("--shares-around", type=float, default=0.0, metavar="D",
                   help="add two settings: the defaults at the held GPU share less D and plus D")
    p.add_argument("--follow", type=int, default=0, metavar="N",
                   help="add a setting whose share follows the last N steps' windows")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: a check of the script")
    p.add_argument("--out", default="split_ab.json")
    args = p.parse_args(argv)
    if not args.b and not args.avoid_stolen and not args.shares_around and not args.follow:
        p.error("give --b KNOB=VALUE,..., --avoid-stolen K, --shares-around D or --follow N")
    if args.follow < 0:
        p.error(f"--follow: got {args.follow}, expected a number of windows")
    if not 0 <= args.shares_around < 1:
        p.error(f"--shares-around: got {args.shares_around}, expected a share step in [0, 1)")
    texts = {"A": args.a, **{chr(ord("B") + i): text for i, text in enumerate(args.b)}}
    given = {name: parse_key_values(filter(None, text.split(",")), f"setting {name} ({text!r})",
                                    "hetero.cpu_kernels.attention.UNITS_PER_THREAD=4") for name, text in texts.items()}
    if not all(given[name] for name in given if name != "A"):
        p.error("--b: give at least one KNOB=VALUE")

    def added() -> str:
        """The next setting's name, for one that runs the defaults with what its chooser picks."""
        name = chr(ord("A") + len(given))
        given[name] = {}
        return name

    avoided = added() if args.avoid_stolen else None  # the --avoid-stolen setting's name
    moved = {added(): delta for delta in (-args.shares_around, args.shares_around)} if args.shares_around else {}
    following = added() if args.follow else None  # the --follow setting's name
    keys = sorted(set().union(*given.values(), [CPUS_KNOB, THREADS_KNOB] if args.avoid_stolen else []))
    try:
        for path in keys:
            knob_target(path)
    except (ValueError, ImportError) as error:
        p.error(str(error))

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    model = build_random_model(tiny_llama_config() if args.tiny else llama_8b_config(), device)
    context = 256 if args.tiny else args.context
    ids = random_prompt(model.config.vocab_size, 1, context, device)
    config = {**(TINY if args.tiny else {}), "mode": "split",
              "gpu_kv_bytes": "256KiB" if args.tiny else args.gpu_kv_bytes, **parse_overrides(args.set)}
    hetero.prepare(model, config)
    defaults = {path: getattr(*knob_target(path)) for path in keys}  # after prepare: it sets the threads
    settings = {name: {**defaults, **knobs} for name, knobs in given.items()}
    chosen = {avoided: _avoiding(args.avoid_stolen, args.stolen_floor, defaults[THREADS_KNOB])} if args.avoid_stolen else {}
    if chosen:
        team_thread_ids()  # compiled now, not in a timed step
    chosen.update({name: _share_moved(delta) for name, delta in moved.items()})
    if following:
        chosen[following] = _share_followed
    alternator = Alternator(context, args.settle, settings, chosen, args.follow)
    made = model.hetero.new_cache

    def new_cache(max_tokens):
        alternator.cache = made(max_tokens)
        return alternator.cache

    model.hetero.new_cache, model.hetero.progress = new_cache, alternator
    with knobs_set(defaults), torch.no_grad():  # every knob back as it was, whatever ran last
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.steps, min_new_tokens=args.steps,
                       do_sample=False, streamer=TokenClock(device=ids.device))
    model.hetero.progress = None
    summary = alternator.summary()
    print(f"{context} tokens x 1 on {device}, split, GPU share {alternator.cache.gpu_share:.2f}, steps alternated after {args.settle}")
    for name in settings:
        s = summary[name]
        knobs = ", ".join(f"{k.rpartition('.')[2]}={v}" for k, v in settings[name].items())
        if name in moved:
            knobs = f"the defaults at the held share {moved[name]:+.3f}"
        elif name == following:
            median = "-" if s["share"] is None else f"{s['share']:.3f}"
            knobs = f"the defaults at the share of the last {args.follow} windows, {median} (median)"
        elif name in chosen:
            offs = sorted({tuple(r["chosen"]["off"]) for r in alternator.steps[name]})
            knobs = f"threads off the {args.avoid_stolen} vCPUs most stolen from lately, above {args.stolen_floor:.0%}: {offs}"
        print(f"  {name} ({knobs}): {s['steps']} steps, median {_fmt(s['median_step_ms'])} ms, CPU parts "
              f"{_fmt(s['cpu_gbs'])} GB/s, copies {_fmt(s['copy_gbs'])} GB/s, CPU idle {_fmt(s['median_cpu_idle_ms'])} ms a step, "
              f"CPU time stolen {'-' if s['mean_steal'] is None else format(s['mean_steal'], '.1%')}")
        if s["mean_steal_by_cpu"]:
            print(f"    most stolen: {most_stolen(s['mean_steal_by_cpu'])}")
    write_json(args.out, {"context": context, "device": str(device), "config": config, "settle": args.settle,
                          "gpu_share": alternator.cache.gpu_share, "settings": settings, "summary": summary,
                          "steps": alternator.steps, "stats": model.hetero.last_stats.summary()})
    return 0


CPUS_KNOB, THREADS_KNOB = "hetero.cpu_kernels.attention.THREAD_CPUS", "hetero.cpu_kernels.attention._threads"


def _share_moved(delta: float):
    """A --shares-around setting's chooser: the held GPU share moved by `delta`, within [0, 1]."""

    def choose(alternator: Alternator) -> tuple[dict, dict]:
        alternator.cache.gpu_share = min(1.0, max(0.0, alternator.held_share + delta))
        return {}, {"share": alternator.cache.gpu_share}

    return choose


def _share_followed(alternator: Alternator) -> tuple[dict, dict]:
    """The --follow setting's chooser: the share its follower balances the last windows at."""
    alternator.cache.gpu_share = alternator.follower.share
    return {}, {"share": alternator.cache.gpu_share}


def _avoiding(most: int, floor: float, threads: int | None):
    """The --avoid-stolen setting's chooser: THREAD_CPUS without the (at most `most`) vCPUs stolen from
    most over the last steps, of those above `floor`, and no more threads than CPUs left."""

    def choose(alternator: Alternator) -> tuple[dict, dict]:
        shares = alternator.stolen_lately() or []
        ranked = sorted((c for c, v in enumerate(shares) if v is not None and v > floor), key=lambda c: -shares[c])
        off = sorted(ranked[:most])
        if not off:
            return {}, {"off": []}
        keep = [c for c in sorted(ALL_CPUS) if c not in off]
        return {CPUS_KNOB: keep, THREADS_KNOB: min(threads or len(keep), len(keep))}, {
            "off": off, "stolen": [shares[c] for c in off]}

    return choose


def _mean(values) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.fmean(known) if known else None


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.1f}"


if __name__ == "__main__":
    sys.exit(main())
