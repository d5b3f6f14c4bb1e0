"""The CPUs a calling thread's kernel team may run on: a way to keep the kernels off vCPUs that the
hypervisor takes time from.

A CPU part of the `split` mode is a parallel region that ends with its slowest thread; on a host
that steals a tenth of the guest's CPU time, split's CPU parts ran at half their rate
(bench/results/split/README.md, 2026-12-02 fifth session). If the stolen time sits on a few vCPUs,
threads kept off them are spared. Numba's OpenMP layer gives every thread that starts parallel work
a team of its own (the split mode's host worker has one, the main thread another), so `pin_team`
works on the calling thread's team: one parallel pass records each member's Linux thread id, and
each is then confined to the CPU set. Linux only (glibc's `gettid`); elsewhere it reports that it
could not.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numba
import numpy as np
from numba import njit, prange


def _gettid():
    if not sys.platform.startswith("linux"):
        return None
    fn = getattr(ctypes.CDLL(None), "gettid", None)  # glibc 2.30 and later
    if fn is None:
        return None
    fn.argtypes, fn.restype = [], ctypes.c_int
    return fn


_GETTID = _gettid()
ALL_CPUS = frozenset(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else frozenset()

if _GETTID is not None:
    @njit(parallel=True)
    def _record_team(tids):
        for _ in prange(tids.shape[0]):
            tids[numba.get_thread_id()] = _GETTID()


def team_thread_ids(attempts: int = 20) -> np.ndarray | None:
    """Linux thread ids of the calling thread's team at Numba's current thread count (its own first);
    None where they cannot be read, or some member never took a turn in `attempts` passes."""
    if _GETTID is None:
        return None
    tids = np.full(numba.get_num_threads(), -1, np.int64)
    previous = numba.set_parallel_chunksize(0)  # static: one iteration for each member
    try:
        for _ in range(attempts):
            _record_team(tids)
            if (tids >= 0).all():
                return tids
    finally:
        numba.set_parallel_chunksize(previous)
    return None


def pin_team(cpus) -> bool:
    """Confine every member of the calling thread's team (itself included) to `cpus` (None: the CPUs
    the process began with); True where it did."""
    allowed = set(ALL_CPUS if cpus is None else cpus)
    if not allowed:
        raise ValueError("cpus: expected at least one CPU")
    if not allowed <= ALL_CPUS:
        raise ValueError(f"cpus: {sorted(allowed - ALL_CPUS)} not among this process's CPUs {sorted(ALL_CPUS)}")
    tids = team_thread_ids()
    if tids is None:
        return False
    for tid in tids:
        os.sched_setaffinity(int(tid), allowed)
    return True
