"""Run workloads, write their JSON, then rebuild the markdown table and the plots from every
workload's JSON in the output directory (so that results of separate calls come together)."""

from __future__ import annotations

import faulthandler
import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from .plots import write_plots
from .report import load_results, markdown, print_checks
from .runner import add_agreement, machine, now, run_workload, write_result
from .systems import select_systems
from .workloads import WORKLOADS, scaled

RESULTS = Path(__file__).resolve().parent.parent / "results"


def default_out(scale: str) -> Path:
    return RESULTS if scale == "full" else RESULTS / scale


def run_suite(workloads: list[str], *, scale: str = "full", systems: list[str] | None = None, out: Path | None = None,
              device: str | None = None, attempt_oom: bool = False, ssd_dir: str | None = None,
              report_only: bool = False, command: str = "", isolate: bool | None = None,
              date: str | None = None, overrides: dict | None = None, system_timeout: float | None = None) -> list[Path]:
    """Returns the files written: one JSON per workload run, summary.md and the PNGs.

    `isolate` runs each system in a Python process of its own (None: on CUDA), so that none meets
    the memory another left cached (pinned host pools, the GPU allocator's blocks) or inherits its
    peak host memory. `date` joins this call's rows to a parent call's (set for those processes).
    `overrides`: offload config keys for every hetero system. `system_timeout`: seconds after which
    an isolated system's process is stopped (its stacks printed shortly before) and recorded as such.
    """
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        raise ValueError(f"--workload: got {', '.join(unknown)}, expected one of {', '.join(WORKLOADS)}")
    chosen = select_systems(systems)
    out = Path(out) if out is not None else default_out(scale)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if isolate is None:
        isolate = dev.type == "cuda" and len(chosen) > 1
    written = []
    for name in [] if report_only else workloads:
        if isolate:
            _run_isolated(name, chosen, out, machine(dev), scale=scale, device=device, attempt_oom=attempt_oom, ssd_dir=ssd_dir,
                          command=command, overrides=overrides or {}, timeout=system_timeout)
            written.append(out / f"{name}.json")
            continue
        if system_timeout is not None:  # in the process the parent stops: its stacks shortly before
            faulthandler.dump_traceback_later(max(1.0, system_timeout - 10), exit=False)
        result = run_workload(scaled(WORKLOADS[name], scale), chosen, dev, attempt_oom=attempt_oom,
                              ssd_dir=ssd_dir, command=command, save=lambda r: write_result(r, out), date=date,
                              overrides=overrides)
        written.append(out / f"{name}.json")
        print(f"  wrote {written[-1]} ({result['wall_s']:.0f} s)", flush=True)
    if date is not None:
        return written  # one system of a parent call: the parent writes the report
    results = load_results(out)
    if not results:
        raise FileNotFoundError(f"--out: no workload results under {out}")
    summary = out / "summary.md"
    summary.write_text(markdown(results))
    written += [summary, *write_plots(results, out)]
    print_checks(results)
    print("wrote " + ", ".join(str(p) for p in written[-3:]), flush=True)
    return written


def _run_isolated(workload: str, systems: list[str], out: Path, here: dict, *, scale: str, device: str | None, attempt_oom: bool,
                  ssd_dir: str | None, command: str, overrides: dict | None = None, timeout: float | None = None) -> None:
    """Each system of `workload` in a fresh `hetero bench` process; their rows land in one JSON.
    `here`: this machine, recorded when no system got as far as recording it."""
    date = now()
    for system in systems:
        child = [sys.executable, "-m", "hetero", "bench", "--workload", workload, "--systems", system, "--out", str(out),
                 "--same-process", "--run-date", date, "--record-command", command]
        child += {"quick": ["--quick"], "tiny": ["--tiny"]}.get(scale, [])
        child += ["--attempt-oom"] if attempt_oom else []
        child += ["--ssd-dir", ssd_dir] if ssd_dir else []
        child += ["--device", device] if device else []
        for key, value in (overrides or {}).items():
            child += ["--set", f"{key}={json.dumps(value) if not isinstance(value, str) else value}"]
        child += ["--system-timeout", f"{timeout:g}"] if timeout is not None else []
        print(f"  {system}: in a process of its own", flush=True)
        try:
            code = subprocess.run(child, timeout=timeout).returncode
            status, reason = "error", exit_reason(code)
        except subprocess.TimeoutExpired:
            code, status = None, "timeout"
            reason = f"stopped after {timeout:g} s (--system-timeout); its threads' stacks are in the log"
        if code != 0:  # a crash, a time-out (or the kernel's out-of-memory killer) is a result too
            path = out / f"{workload}.json"
            w = scaled(WORKLOADS[workload], scale)
            result = json.loads(path.read_text()) if path.exists() else {
                "workload": workload, "description": w.description, "context": w.context, "batch": w.batch,
                "decode_steps": w.decode_steps, "ceilings": {}, "machine": here, "command": command, "wall_s": 0.0}
            row = {"system": system, "context": w.context, "batch": w.batch, "decode_steps": w.decode_steps,
                   "status": status, "reason": reason}
            write_result(dict(result, scale=scale, date=date, rows=[row]), out)
    path = out / f"{workload}.json"
    result = json.loads(path.read_text())
    add_agreement(result["rows"])
    path.write_text(json.dumps(result, indent=2))
    print(f"  wrote {path}", flush=True)


def exit_reason(code: int) -> str:
    """Why a system's process ended badly, in words: a negative code is the signal that stopped it."""
    if code >= 0:
        return f"its benchmark process exited with code {code}"
    name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
    reason = f"its benchmark process was killed by {name}"
    if -code == signal.SIGKILL:
        total = psutil.virtual_memory().total / 2**30
        reason += f" (most often the kernel's out-of-memory killer: this machine has {total:.0f} GiB of RAM)"
    return reason
