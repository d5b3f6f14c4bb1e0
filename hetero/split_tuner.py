"""The `split` mode's GPU share r: which share of each layer's offloaded blocks the GPU fetches.

A decode step ends when the slower side does: the GPU fetching r of the offloaded KV (K bytes) over
PCIe at P bytes/s, or the CPU attending over the other 1 - r where it lies at C bytes/s, plus the
time g it waits each step for the host thread to queue the next layer's part (with cpu_part_wait
"host", the host thread takes one layer's CPU result before it runs the rest of the layer and the
next one's projections; with GPU-side waits, g is a few milliseconds). Both
finish together when r K / P = (1 - r) K / C + g, that is r = (K / C + g) / (K / P + K / C); with no
gap, r = P / (P + C). `split_ratio = "auto"` starts from the bandwidths probed at load
(hetero.bandwidth_probe) or, without CUDA, from the ceilings of LIMITS.md, and `SplitTuner` refines
r from what the first decode steps measured, then holds it. A number in the config is used as is.

Policy only: the pipeline measures, the cache applies r at a step boundary.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import replace
from typing import Sequence

from .pipeline import WorkTimes
from .plan import Ceilings


def balanced_share(pcie_bytes_per_s: float, cpu_bytes_per_s: float) -> float:
    """The GPU share at which fetching and CPU attention take equally long."""
    return pcie_bytes_per_s / (pcie_bytes_per_s + cpu_bytes_per_s)


def ceiling_share(ceilings: Ceilings = Ceilings()) -> float:
    """The GPU share the nominal ceilings give: what "auto" means where nothing was measured."""
    return balanced_share(ceilings.pcie_h2d, ceilings.cpu_stream)


def measured_share(times: WorkTimes) -> float | None:
    """The balanced share from one window of measured work (the module's formula, within [0, 1]), or
    None when it does not tell: a side that did no work, or a time that is not a finite number."""
    values = (times.copy_bytes, times.copy_seconds, times.host_bytes, times.host_seconds)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) and v > 0 for v in values):
        return None
    gap = times.host_gap_seconds
    if not (isinstance(gap, (int, float)) and math.isfinite(gap) and gap >= 0):
        return None
    kv = times.copy_bytes + times.host_bytes
    pcie_s, cpu_s = kv * times.copy_seconds / times.copy_bytes, kv * times.host_seconds / times.host_bytes
    return min(1.0, (cpu_s + gap) / (pcie_s + cpu_s))


def refine_share(start: float, windows: Sequence[WorkTimes]) -> float:
    """The share the measured windows point to, within [0, 1]: the median of each window's balance
    (`measured_share`; a window that does not tell is left out), `start` while none told. The first
    window that tells sets the share: `start` comes from probing each side alone at load, which put
    it at 0.76 and 0.87 in two runs on the GPU machine whose windows settled at 0.56 and 0.55
    (bench/results/split/steps_{knobs,tuner}_2026-12-02b.json); moving halfway from it cost a step more.
    Later windows outvote an odd one, which a mean of few would follow."""
    votes = [s for s in map(measured_share, windows) if s is not None]
    return min(1.0, max(0.0, statistics.median(votes) if votes else start))


# Windows a generation's share keeps following after its first `steps` (0: it holds). The host's CPU
# speed can change mid-run: on one host split's steps went from 147-155 ms to 166-240 from the eighth
# on at a held share (bench/results/split/suite_small_card_first_part_hostQ_2026-12-02e.json), and
# on another its CPU parts from 50-62 GB/s to 23-28 once the hypervisor stole 10-15% of the CPU time.
# Following keeps the copies and host jobs timed (an event pair per copy). Off until measured:
# `bench/split_ab.py --follow N` runs it in turns with the held share.
FOLLOW_WINDOWS = 0


class SplitTuner:
    """Refines one generation's GPU share from its first decode steps, then holds it (or follows the
    last `follow` windows).

    `observe` is called once per decode step, as the next step's first layer is planned (during the
    step's last layer), with the work measured since the last call: the first `skip` windows are not
    counted; after each of the next `steps`, the share is `refine_share` of the windows so far. The
    first window holds the prefill's work and the first decode step's, whose first CPU part waits on
    the host (when the whole step did, its CPU side's gap read 47-58 ms): it balanced 0.03 high in
    two runs on the GPU machine, where the second step's window gave 0.426 and 0.479 and the next
    four 0.414-0.446 and 0.438-0.473 (`bench/tuner_windows.py`,
    bench/results/split/tuner_windows_*_2026-12-02d.json). So the second counts. The second step
    runs at the first window's balance without its gap all the same (each side's rate measured inside
    the pipeline, where the load-time probe times each alone and has put the share 0.3 off): the
    probe's 0.79 cost a step of 207 ms among steps of 144-157 at about 0.51 in a suite run (small card,
    bench/results/split/suite_small_card_hostO_2026-12-02e.json); at the first window's balance, the
    next run's second step took 144 ms (suite_small_card_hostP_*).
    """

    def __init__(self, share: float, skip: int = 1, steps: int = 4, follow: int | None = None):
        self.start = share
        self.share = share
        self.windows: list[WorkTimes] = []
        self._skip = skip
        self._steps = steps
        self._follow = FOLLOW_WINDOWS if follow is None else follow
        if self._follow < 0:
            raise ValueError(f"follow: got {self._follow}, expected a number of windows >= 0")
        self._observed = False  # whether any window came yet
        self._first_told = False  # the first window's balance set the share

    @property
    def done(self) -> bool:
        """Whether it holds the share from now on (never, while it follows)."""
        return not self._follow and len(self.windows) >= self._steps

    @property
    def told(self) -> bool:
        """Whether a measured window has set the share (the first window's balance, or a counted one)."""
        return self._first_told or self.refined_steps > 0

    @property
    def refined_steps(self) -> int:
        """Windows whose measurement counted."""
        return len(self._told())

    def _told(self) -> list[WorkTimes]:
        return [w for w in self.windows if measured_share(w) is not None]

    def rates(self) -> tuple[float, float, float] | None:
        """(PCIe bytes/s, CPU attention bytes/s, the CPU side's gap in seconds per window) as the
        counted windows measured them, each the median over windows; None before any window told.
        Each side's rate alone, not the step's: what the share balances, and where a side runs slower
        inside the pipeline than in the probe."""
        told = self._told()
        if not told:
            return None
        return (statistics.median(w.copy_bytes / w.copy_seconds for w in told),
                statistics.median(w.host_bytes / w.host_seconds for w in told),
                statistics.median(w.host_gap_seconds for w in told))

    def idle_seconds(self) -> float | None:
        """The host worker's idle time per window between its jobs (`WorkTimes.host_idle_seconds`), the
        median over the counted windows; None before any window told. Reported beside `rates`."""
        told = self._told()
        return statistics.median(w.host_idle_seconds for w in told) if told else None

    def observe(self, times: WorkTimes) -> float:
        """Fold one step's measured work in; returns the share for the next step."""
        first, self._observed = not self._observed, True
        if self._skip:
            self._skip -= 1
            balance = measured_share(replace(times, host_gap_seconds=0.0)) if first else None
            if balance is not None:
                self.share, self._first_told = balance, True
        elif not self.done:
            self.windows.append(times)
            if self._follow and len(self.windows) > max(self._steps, self._follow):
                del self.windows[: len(self.windows) - self._follow]  # past the first steps: the last few
            self.share = refine_share(self.share, self.windows)  # while none told, the share it ran at
        return self.share
