"""What each decode step's window tells the `split` mode's "auto" share, the skipped ones included.

`SplitTuner` observes a window at each decode step's end. It does not count the first (which holds
the prefill's work too), but runs the second step at that window's balance without its gap, then
balances the share on the next few. A start share far off (the load-time probe put it at 0.87 where
the steps settled at 0.54, bench/results/split/README.md) costs every step run at it; this shows
whether the early windows already point where the later ones do.
Each window is printed with its copies' and CPU parts' rates and busy times and the share it
balances to (`measured_share`), beside the start share and the share each step ran at.

    python3 bench/tuner_windows.py --context 131072 --gpu-kv-bytes 4GiB --steps 8 --out tuner_windows.json
    python3 bench/tuner_windows.py --tiny
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

import hetero
from hetero.split_tuner import SplitTuner, measured_share

sys.path.insert(0, os.path.dirname(__file__))
from json_out import write_json  # noqa: E402
from step_times import TINY  # noqa: E402
from suite.model import build_random_model, llama_8b_config, random_prompt, tiny_llama_config  # noqa: E402


def _rate(nbytes: int, seconds: float) -> float | None:
    return nbytes / seconds / 1e9 if seconds > 0 else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--context", type=int, default=131072)
    p.add_argument("--gpu-kv-bytes", default="4GiB")
    p.add_argument("--steps", type=int, default=8, help="decode steps")
    p.add_argument("--tiny", action="store_true", help="a tiny Llama on the CPU: a check of the script")
    p.add_argument("--out", default="tuner_windows.json")
    args = p.parse_args(argv)

    device = torch.device("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    model = build_random_model(tiny_llama_config() if args.tiny else llama_8b_config(), device)
    context = 256 if args.tiny else args.context
    ids = random_prompt(model.config.vocab_size, 1, context, device)
    config = {**(TINY if args.tiny else {}), "mode": "split", "gpu_kv_bytes": "256KiB" if args.tiny else args.gpu_kv_bytes}
    hetero.prepare(model, config)
    model.hetero.refine_split = True  # on the CPU too, for --tiny
    windows: list[dict] = []
    observe = SplitTuner.observe

    def logged(tuner, times):
        ran = tuner.share
        share = observe(tuner, times)
        windows.append({"window": len(windows), "share_ran": ran, "share_next": share,
                        "copy_gbs": _rate(times.copy_bytes, times.copy_seconds),
                        "cpu_gbs": _rate(times.host_bytes, times.host_seconds),
                        "gap_ms": 1e3 * times.host_gap_seconds, "copies_busy_ms": 1e3 * times.copy_seconds,
                        "cpu_busy_ms": 1e3 * times.host_seconds, "balances_to": measured_share(times)})
        return share

    SplitTuner.observe = logged
    try:
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.steps,
                           min_new_tokens=args.steps, do_sample=False)
    finally:
        SplitTuner.observe = observe
    stats = model.hetero.last_stats
    probed = model.hetero.split_probe
    print(f"{context} tokens x 1 on {device}, split, start share {_fmt(stats.split_share_start)}"
          + ("" if probed is None else f" (probed at load: PCIe {probed.pcie_h2d / 1e9:.1f} GB/s, "
                                       f"CPU attention {probed.cpu_attention / 1e9:.1f} GB/s)"))
    for w in windows:
        print("  window {window}: ran at {ran}, copies {copy} GB/s busy {cb:.1f} ms, CPU parts {cpu} GB/s busy {pb:.1f} "
              "ms, gap {gap:.1f} ms, balances to {to}; next {nxt}".format(
                  window=w["window"], ran=_fmt(w["share_ran"]), copy=_fmt(w["copy_gbs"], 1), cb=w["copies_busy_ms"],
                  cpu=_fmt(w["cpu_gbs"], 1), pb=w["cpu_busy_ms"], gap=w["gap_ms"], to=_fmt(w["balances_to"]),
                  nxt=_fmt(w["share_next"])))
    write_json(args.out, {"context": context, "device": str(device), "config": config,
                          "start_share": stats.split_share_start, "windows": windows, "stats": stats.summary(),
                          "probed_gbs": None if probed is None else {"pcie_h2d": probed.pcie_h2d / 1e9,
                                                                     "cpu_attention": probed.cpu_attention / 1e9}})
    return 0


def _fmt(x, digits: int = 3) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


if __name__ == "__main__":
    raise SystemExit(main())
