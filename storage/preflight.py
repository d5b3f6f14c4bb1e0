"""Checks run before the first allocation, so that a setting that cannot work fails at once with
the config key and the fix, not hours into a generation."""

from __future__ import annotations

import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import psutil

from . import direct_io
from .errors import StorageConfigError


class BufferedIOWarning(RuntimeWarning):
    """The SSD directory's file system refuses O_DIRECT; the SSD tier uses buffered I/O there."""


@dataclass(frozen=True)
class PreflightResult:
    """What the checks found: whether O_DIRECT works under ssd_dir (None without one), the free
    bytes there, and the host memory available."""

    direct_io: bool | None
    ssd_free_bytes: int | None
    host_available_bytes: int


def _size(n: int) -> str:
    return f"{n} bytes ({n / 2**30:.2f} GiB)"


def check_host_budget(cpu_kv_bytes: int) -> int:
    """Raise StorageConfigError (`cpu_kv_bytes`) when the host budget exceeds the available
    memory; returns the available bytes."""
    available = psutil.virtual_memory().available
    if cpu_kv_bytes > available:
        raise StorageConfigError(
            "cpu_kv_bytes",
            f"cpu_kv_bytes: got {_size(cpu_kv_bytes)} but this machine has only {_size(available)} available; "
            "lower cpu_kv_bytes (and set ssd_dir/ssd_kv_bytes to hold the rest on disk)",
        )
    return available


def check_ssd_dir(ssd_dir: str | os.PathLike, ssd_kv_bytes: int) -> tuple[bool, int]:
    """Make sure `ssd_dir` exists (creating it, mode 0700), is writable and has room for
    `ssd_kv_bytes`; returns (O_DIRECT works there, free bytes). Warns `BufferedIOWarning` when
    O_DIRECT does not work; raises StorageConfigError naming `ssd_dir` or `ssd_kv_bytes`."""
    path = Path(ssd_dir).expanduser()
    if path.exists() and not path.is_dir():
        raise StorageConfigError("ssd_dir", f"ssd_dir: '{path}' is a file; point ssd_dir at a directory")
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as e:
        raise StorageConfigError(
            "ssd_dir", f"ssd_dir: cannot create '{path}' ({e.strerror}); create it or point ssd_dir at a writable directory"
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".hetero-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise StorageConfigError(
            "ssd_dir", f"ssd_dir: cannot write in '{path}' ({e.strerror}); point ssd_dir at a directory you can write"
        ) from None
    st = os.statvfs(path)
    free = st.f_bavail * st.f_frsize
    if ssd_kv_bytes > free:
        raise StorageConfigError(
            "ssd_kv_bytes",
            f"ssd_kv_bytes: got {_size(ssd_kv_bytes)} but only {_size(free)} are free under '{path}'; "
            "lower ssd_kv_bytes or point ssd_dir at a larger disk",
        )
    try:
        direct = direct_io.direct_io_supported(str(path))
    except OSError as e:
        raise StorageConfigError(
            "ssd_dir", f"ssd_dir: a test write in '{path}' failed ({e.strerror}); point ssd_dir at a working disk"
        ) from None
    if not direct:
        warnings.warn(
            f"ssd_dir: '{path}' does not support O_DIRECT (tmpfs or similar); the SSD tier falls back to buffered "
            "I/O through the page cache; point ssd_dir at a disk file system for direct I/O",
            BufferedIOWarning,
            stacklevel=3,
        )
    return direct, free


def preflight(cpu_kv_bytes: int = 0, ssd_dir: str | os.PathLike | None = None, ssd_kv_bytes: int = 0) -> PreflightResult:
    """Check the host budget and, with an `ssd_dir`, the SSD directory and budget.

    Raises StorageConfigError naming `cpu_kv_bytes`, `ssd_dir` or `ssd_kv_bytes` and the fix.
    """
    available = check_host_budget(cpu_kv_bytes)
    if ssd_dir is None:
        if ssd_kv_bytes:
            raise StorageConfigError("ssd_kv_bytes", "ssd_kv_bytes: set without ssd_dir; set ssd_dir too, or use 0")
        return PreflightResult(None, None, available)
    direct, free = check_ssd_dir(ssd_dir, ssd_kv_bytes)
    return PreflightResult(direct, free, available)
