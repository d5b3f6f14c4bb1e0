"""Where a `split` decode step's time goes: each layer's fetch and CPU part on one clock.

Generates with an 8B-class Llama in `split` mode and records, for the last `--show` steps, per layer:
when the host thread queued the fetch and the CPU part, when the copy engine started and ended the
fetch (CUDA events, put on the host clock), when the CPU part started (its query landed) and ended.
Prints per-step sums: the copy engine busy, the CPU busy, the CPU's waits for the query (the GPU
behind) and for the host thread (its gap), and writes every event to JSON. With cpu_part_wait
"host" the gap is cut into the host thread's phases between one CPU part's end and the next one's
queueing: late (it was still queueing the layer's GPU side when the part ended), collect (taking
the result), merge, model (the model's code up to the next layer's cache update), store (the
update) and start. With "gpu" (the default) the host thread runs ahead and those waits say little;
the CPU's idle time between parts is cut by timed GPU events instead (`gpu_phases`).

    python bench/split_timeline.py --context 131072 --gpu-kv-bytes 4GiB --out timeline.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

import hetero
from hetero import pipeline as pl
from hetero.bench_cli import knobs_set, parse_key_values, parse_overrides

sys.path.insert(0, os.path.dirname(__file__))
from suite.model import build_random_model, llama_8b_config, random_prompt, tiny_llama_config  # noqa: E402

TINY = {"block_size": 16, "sink_tokens": 16, "window_tokens": 32, "prefill_chunk_tokens": 64}


class Recorder:
    """Patches the pipeline to note host times and keep the copies' timed events."""

    def __init__(self):
        self.jobs = []  # dicts: queued, started, ended
        self.copies = []  # (submitted host time, start event, ready event, bytes)
        self.refs = []  # (event, host time) pairs: see `mark`
        self.marks = []  # (name, host time) of the host thread's calls into the cache
        # Timed events on the compute stream, one per CPU part, in job order: after its query's copy
        # to the host was queued ("sent"), before and after the GPU's wait for its result ("reached",
        # "seen"): the GPU's side of the CPU's gap between two parts.
        self.gpu = {"sent": [], "reached": [], "seen": []}

    def install(self):
        rec = self
        run_on_host, pump = pl.Pipeline.run_on_host, pl.FetchRing._pump
        to_host, host_result = pl.Pipeline.to_host, pl.Pipeline.host_result

        def stamp(name):
            if torch.cuda.is_available():
                event = torch.cuda.Event(enable_timing=True)
                event.record()
                rec.gpu[name].append(event)

        def stamped_to_host(self, *tensors, **kwargs):
            result = to_host(self, *tensors, **kwargs)
            stamp("sent")
            return result

        def stamped_host_result(self, job):
            stamp("reached")
            result = host_result(self, job)
            stamp("seen")
            return result

        def timed_run_on_host(self, ready, fn, *args, **kwargs):
            entry = {"queued": time.perf_counter()}
            rec.jobs.append(entry)

            def timed(*a):
                entry["started"] = time.perf_counter()
                try:
                    return fn(*a)
                finally:
                    entry["ended"] = time.perf_counter()

            return run_on_host(self, ready, timed, *args, **kwargs)

        def timed_pump(self):
            clock = self.pipeline._clock
            if clock is None:
                self.pipeline.time_work()
                clock = self.pipeline._clock
            before = len(clock.copies)
            pump(self)
            now = time.perf_counter()
            for start, ready, nbytes in list(clock.copies)[before:]:
                rec.copies.append((now, start, ready, nbytes))
            clock.copies.clear()  # kept here instead: the tuner then sees no copies and holds its share

        def marked(name, fn):
            def wrapper(*a, **kw):
                rec.marks.append((name + "_in", time.perf_counter()))
                try:
                    return fn(*a, **kw)
                finally:
                    rec.marks.append((name + "_out", time.perf_counter()))

            return wrapper

        from hetero.cache import HeteroCache

        self._originals = (run_on_host, pump, HeteroCache.update, HeteroCache.attend, host_result, to_host)
        pl.Pipeline.run_on_host = timed_run_on_host
        pl.Pipeline.to_host = stamped_to_host
        pl.FetchRing._pump = timed_pump
        HeteroCache.update = marked("update", HeteroCache.update)
        HeteroCache.attend = marked("attend", HeteroCache.attend)
        pl.Pipeline.host_result = marked("result", stamped_host_result)

    def uninstall(self):
        from hetero.cache import HeteroCache

        (pl.Pipeline.run_on_host, pl.FetchRing._pump, HeteroCache.update, HeteroCache.attend, pl.Pipeline.host_result,
         pl.Pipeline.to_host) = self._originals

    def host_phases(self, jobs):
        """The host thread's phases (seconds) between each job's end and the next one's queueing."""
        phases = dict(late=0.0, collect=0.0, merge=0.0, model=0.0, store=0.0, start=0.0)
        for a, b in zip(jobs, jobs[1:]):
            after = [(n, t) for n, t in self.marks if a["ended"] - 1 < t <= b["queued"]]
            first = lambda name, since: next((t for n, t in after if n == name and t >= since), None)  # noqa: E731
            result_in = max((t for n, t in after if n == "result_in" and t <= a["ended"] + 1 and t >= a["queued"]),
                            default=None)
            result_out = first("result_out", a["queued"])
            attend_out = first("attend_out", result_out or a["queued"])
            update_in = first("update_in", attend_out or a["queued"])
            attend_in = first("attend_in", update_in or a["queued"])
            if None in (result_in, result_out, attend_out, update_in, attend_in):
                continue
            phases["late"] += max(0.0, result_in - a["ended"])
            phases["collect"] += result_out - max(result_in, a["ended"])
            phases["merge"] += attend_out - result_out
            phases["model"] += update_in - attend_out
            phases["store"] += attend_in - update_in
            phases["start"] += b["queued"] - attend_in
        return phases

    def mark(self):
        """A reference point for `on_host_clock`: an event and the host time it completed at. Called
        before and after generating: the two clocks drift apart by milliseconds over a long prefill,
        more than the phases timed here, so events map onto the host clock through both points."""
        torch.cuda.synchronize()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        event.synchronize()
        self.refs.append((event, time.perf_counter()))

    def on_host_clock(self, event) -> float:
        (first, host0), (last, host1) = self.refs[0], self.refs[-1]
        span = first.elapsed_time(last) / 1e3
        rate = (host1 - host0) / span if span > 0 else 1.0
        return host0 + rate * first.elapsed_time(event) / 1e3


COLLECT = pl.Pipeline._collect


def _collect_by_copy_engine(self, job):
    """`Pipeline._collect` as it was: the flag's wait, then the slots copied by the copy engine."""
    from hetero.gpu_kernels.host_flag import wait_for_flag

    self.check_host_jobs()
    mailbox = job.mailbox
    if self._gave_up is None:
        self._gave_up = torch.zeros(1, dtype=torch.int32, pin_memory=True)
    wait_for_flag(mailbox.flag, job.number, self._gave_up)
    moved = tuple(slot.to(self.device, non_blocking=True) for slot in mailbox.slots)
    mailbox.emptied = torch.cuda.Event()
    mailbox.emptied.record(torch.cuda.current_stream(self.device))
    self._posting.append(job)
    return moved


def gpu_phases(jobs) -> dict:
    """Between one CPU part's end and the next one's start, as the GPU saw it (seconds, summed): `flag`
    from the part's end to the GPU having its result (when the GPU already waited there), `between`
    the GPU's work from there to the next query's copy, `wake` from that copy to the next part's start
    (the copy landing, the worker seeing it, the job's own preparation). Also `idle`: the CPU between
    parts in all."""
    phases = dict(flag=0.0, between=0.0, wake=0.0, idle=0.0)
    for a, b in zip(jobs, jobs[1:]):
        if "seen" not in a or "sent" not in b:
            return {}
        phases["flag"] += max(0.0, a["seen"] - max(a["ended"], a["reached"]))
        phases["between"] += max(0.0, b["sent"] - a["seen"])
        phases["wake"] += max(0.0, b["started"] - max(b["sent"], a["ended"]))
        phases["idle"] += b["started"] - a["ended"]
    return phases


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--gpu-kv-bytes", default="4GiB")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--show", type=int, default=3, help="steps at the end to report")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="an offload config key")
    p.add_argument("--knob", action="append", default=[], metavar="MODULE.NAME=VALUE",
                   help="a tuning knob, e.g. hetero.cache.LOOK_PAST_STEP_END=false")
    p.add_argument("--result-copy", choices=("loads", "engine"), default="loads",
                   help="how the GPU takes a CPU part's result: its own loads (hetero's way) or, to compare, "
                        "a copy-engine copy after the flag")
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--out")
    args = p.parse_args(argv)
    knobs = parse_key_values(args.knob, "--knob", "hetero.cache.LOOK_PAST_STEP_END=false")
    cuda = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if cuda else "cpu")
    model = build_random_model(tiny_llama_config() if args.tiny else llama_8b_config(), device)
    context = 256 if args.tiny else args.context
    ids = random_prompt(model.config.vocab_size, 1, context, device)
    config = {**(TINY if args.tiny else {}), "mode": "split", "split_ratio": 0.6,
              "gpu_kv_bytes": "256KiB" if args.tiny else args.gpu_kv_bytes}
    config.update(parse_overrides(args.set))
    rec = Recorder()
    with knobs_set(knobs):
        steps = _generate(model, ids, config, args.steps, rec, cuda, args.result_copy)
    copies = [dict(submitted=s, start=rec.on_host_clock(a) if cuda else s, end=rec.on_host_clock(b) if cuda else s,
                   bytes=n) for s, a, b, n in rec.copies]
    if cuda and all(len(v) == len(rec.jobs) for v in rec.gpu.values()):
        for job, sent, reached, seen in zip(rec.jobs, *(rec.gpu[k] for k in ("sent", "reached", "seen"))):
            job.update(sent=rec.on_host_clock(sent), reached=rec.on_host_clock(reached), seen=rec.on_host_clock(seen))
    report = []
    print(f"{context} tokens, split at share {config['split_ratio']}: per step, ms")
    print(f"{'step':>4} {'wall':>7} {'copy busy':>9} {'CPU busy':>8} {'CPU waits query':>15} {'CPU waits host':>14}")
    for (_, t0, j0, c0), (_, t1, j1, c1) in list(zip(steps, steps[1:]))[-args.show:]:
        jobs = rec.jobs[j0:j1]
        busy_copy = sum(c["end"] - c["start"] for c in copies[c0:c1])
        busy_cpu = sum(j["ended"] - j["started"] for j in jobs)
        wait_query = sum(j["started"] - j["queued"] for j in jobs)
        wait_host = sum(b["queued"] - a["ended"] for a, b in zip(jobs, jobs[1:]))
        row = dict(wall=t1 - t0, copy_busy=busy_copy, cpu_busy=busy_cpu, cpu_waits_query=wait_query,
                   cpu_waits_host=wait_host, jobs=[{k: v - t0 for k, v in j.items()} for j in jobs],
                   copies=[{k: (v - t0 if k != "bytes" else v) for k, v in c.items()} for c in copies[c0:c1]])
        report.append(row)
        host_waits = config.get("cpu_part_wait") == "host"
        row["host_phases"] = rec.host_phases(jobs) if host_waits else {}
        row["gpu_phases"] = gpu_phases(jobs)
        phases = ("host", row["host_phases"]) if host_waits else ("gpu", row["gpu_phases"])
        print(f"{len(report):>4} {1e3 * row['wall']:7.1f} {1e3 * busy_copy:9.1f} {1e3 * busy_cpu:8.1f} "
              f"{1e3 * wait_query:15.1f} {1e3 * wait_host:14.1f}   {phases[0]}: "
              + " ".join(f"{k} {1e3 * v:.1f}" for k, v in phases[1].items()))
    last = report[-1]
    print("last step (ms from its start): the copies' submitted/start/end, then the CPU parts' queued/started/ended")
    print("  copies: " + "  ".join(f"{1e3 * c['submitted']:.1f}/{1e3 * c['start']:.1f}/{1e3 * c['end']:.1f}" for c in last["copies"]))
    print("  CPU:    " + "  ".join(f"{1e3 * j['queued']:.1f}/{1e3 * j['started']:.1f}/{1e3 * j['ended']:.1f}" for j in last["jobs"]))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"context": context, "config": config, "knobs": knobs, "result_copy": args.result_copy,
                       "steps": report}, f, indent=1)
    return 0


def _generate(model, ids, config, new_tokens, rec, cuda, result_copy) -> list:
    """Generate with the recorder installed; returns (tokens, time, jobs so far, copies so far) per token."""
    rec.install()
    if result_copy == "engine":
        pl.Pipeline._collect = _collect_by_copy_engine
    try:
        hetero.prepare(model, config)
        steps = []
        model.hetero.progress = lambda tokens: steps.append((tokens, time.perf_counter(), len(rec.jobs), len(rec.copies)))
        if cuda:
            rec.mark()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False)
        if cuda:
            rec.mark()
        return steps
    finally:
        rec.uninstall()
        pl.Pipeline._collect = COLLECT


if __name__ == "__main__":
    sys.exit(main())
