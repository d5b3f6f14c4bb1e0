"""The storage tiers of hetero: block slots on the GPU, in pinned host memory and on NVMe, one
interface for all (`Tier`), and the block table that records where each block lives.

Tiers move bytes only; which block lives where is the placement's decision (hetero.placement).
"""

from .block_table import BlockTable, group_by_tier
from .errors import ChecksumError, StorageConfigError, StorageIOError, TierFull
from .gpu_pool import GpuPool
from .host_pool import HostPool
from .nvme_store import Fault, NvmeStore
from .preflight import BufferedIOWarning, PreflightResult, check_host_budget, check_ssd_dir, preflight
from .tier import PAGE, Pending, Tier, block_bytes_of, wait_all
from .transfer import copy_slots, slot_runs

__all__ = [
    "BlockTable", "group_by_tier",
    "ChecksumError", "StorageConfigError", "StorageIOError", "TierFull",
    "GpuPool", "HostPool", "NvmeStore", "Fault",
    "BufferedIOWarning", "PreflightResult", "check_host_budget", "check_ssd_dir", "preflight",
    "PAGE", "Pending", "Tier", "block_bytes_of", "wait_all",
    "copy_slots", "slot_runs",
]
