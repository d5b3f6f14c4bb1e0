"""512-bit vectors for the Numba kernels on AVX-512 CPUs.

LLVM prefers 256-bit vectors on Intel AVX-512 servers (to spare the clock); for these kernels
512-bit code is faster (bench_cpu_attention on the H200 machine's Emerald Rapids, 16 threads,
128K tokens: 61.5 against 56.3 GB/s at batch 1, 59.8 against 53.0 at batch 4). Numba reads its
CPU features once, when its CPU target first compiles, and for every function of the process:
this sets them only where the user set none (NUMBA_CPU_FEATURES) and nothing has compiled yet.
"""

from __future__ import annotations

import os


def prefer_512_bit_vectors() -> bool:
    """Ask Numba for the host's features plus 512-bit vector preference; True if it took effect."""
    from numba.core import config
    from numba.core.registry import cpu_target

    if os.environ.get("NUMBA_CPU_FEATURES") or config.CPU_FEATURES is not None or config.CPU_NAME is not None:
        return False
    if "_toplevel_target_context" in vars(cpu_target):  # created (by the first @njit) with the defaults
        return False
    try:
        import llvmlite.binding as llvm

        features = llvm.get_host_cpu_features()
    except RuntimeError:  # hosts where LLVM cannot read the features
        return False
    if not features.get("avx512f"):
        return False
    config.CPU_FEATURES = features.flatten() + ",-prefer-256-bit"
    return True
