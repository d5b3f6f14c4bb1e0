"""CPU time the hypervisor took from this guest: the "steal" column of Linux's /proc/stat.

On a shared host another tenant's vCPUs run on this guest's physical cores while its own wait: a
parallel region whose barrier waits for a descheduled thread runs at the pace of that thread.
"""

from __future__ import annotations


def cpu_jiffies() -> tuple[int, int] | None:
    """(steal, total) clock ticks summed over every CPU since boot; None where /proc/stat is missing."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    return _steal_and_total(fields) if fields and fields[0] == "cpu" else None


def jiffies_by_cpu() -> list[tuple[int, int]] | None:
    """`cpu_jiffies` for each CPU ("cpu0", "cpu1", ... in /proc/stat's order); None where /proc/stat
    is missing."""
    try:
        with open("/proc/stat") as f:
            return [_steal_and_total(line.split()) for line in f if line.startswith("cpu") and line[3].isdigit()]
    except OSError:
        return None


def _steal_and_total(fields: list[str]) -> tuple[int, int]:
    """(steal, total) of one /proc/stat "cpu" line, split into its fields."""
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    ticks += [0] * (8 - len(ticks))
    return ticks[7], sum(ticks)


def steal_share_by_cpu(before: list[tuple[int, int]] | None, after: list[tuple[int, int]] | None) -> list[float | None] | None:
    """`steal_share` of each CPU between two `jiffies_by_cpu` readings; None without both."""
    if before is None or after is None or len(before) != len(after):
        return None
    return [steal_share(b, a) for b, a in zip(before, after)]


def mean_by_cpu(rows: list) -> list[float | None] | None:
    """Each CPU's mean over a list of `steal_share_by_cpu` results (None ones, and None entries,
    skipped); None where none is known."""
    known = [r for r in rows if r]
    if not known:
        return None
    means = []
    for c in range(len(known[0])):
        values = [r[c] for r in known if r[c] is not None]
        means.append(sum(values) / len(values) if values else None)
    return means


def most_stolen(shares: list[float | None] | None, n: int = 4) -> str:
    """The n CPUs with the largest stolen shares, e.g. "cpu3 12.0%, cpu7 0.4%"; "-" without shares."""
    if not shares:
        return "-"
    ranked = sorted(enumerate(shares), key=lambda c: -(c[1] or 0))[:n]
    return ", ".join(f"cpu{c} {'-' if v is None else format(v, '.1%')}" for c, v in ranked)


def steal_share(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float | None:
    """The share of all CPUs' time stolen between two `cpu_jiffies` readings; None without both or
    when no tick passed."""
    if before is None or after is None or after[1] <= before[1]:
        return None
    return (after[0] - before[0]) / (after[1] - before[1])
