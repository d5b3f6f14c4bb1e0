"""The SSD tier: blocks beyond the host budget, in one preallocated file per store, moved with
O_DIRECT by a pool of I/O threads straight into and out of pinned host slots.

Each store owns a private directory under `ssd_dir` (mode 0700, the file 0600) that is removed on
`close()`, when the store is garbage collected, and at interpreter exit (which a KeyboardInterrupt
reaches too). Every block written carries a CRC-32 kept in memory and checked on read: a mismatch
raises `ChecksumError`, never data. The threads call os.preadv/os.pwritev, which release the GIL;
zlib.crc32 releases it too, so the checksums run in parallel with the I/O.
"""

from __future__ import annotations

import ctypes
import errno as errno_codes
import os
import shutil
import tempfile
import threading
import weakref
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import torch

from . import direct_io
from .errors import ChecksumError, StorageConfigError, StorageIOError
from .preflight import check_ssd_dir
from .tier import PAGE, Pending, Tier, block_bytes_of, round_up

_HINTS = {
    errno_codes.ENOSPC: "the disk under ssd_dir is full: free space there or lower ssd_kv_bytes",
    errno_codes.EIO: "the disk reported an I/O error: check the device under ssd_dir",
}


@dataclass
class Fault:
    """For tests: make the `nth` (1-based) `op` ("write" or "read") of a store fail with
    OSError(`errno`), or every one from the nth on when `every`."""

    op: str = "write"
    nth: int = 1
    errno: int = errno_codes.ENOSPC
    every: bool = False


class NvmeStore(Tier):
    """`n_slots` blocks in a file under `ssd_dir`.

    Args:
        ssd_dir: the directory to hold the store's private directory; checked (and created) first.
        n_slots: blocks the store holds; the file is preallocated to n_slots * slot_bytes.
        block_shape, dtype: the blocks.
        io_threads: threads running the reads and writes.
        direct: None: O_DIRECT when the file system takes it (a BufferedIOWarning otherwise);
            False: buffered I/O.
        fault: a `Fault` to inject (tests); also settable as the `fault` attribute.

    `write` and `read_into` return at once; `Pending.wait()` raises `StorageIOError` (naming the
    file and slot) when the I/O failed and `ChecksumError` when a block read back is not the block
    written. Blocks are read into and written from CPU tensors; a page-aligned contiguous block
    (a HostPool slot) moves with no copy, anything else through a per-thread aligned bounce buffer.
    """

    name = "ssd"

    def __init__(self, ssd_dir: str | os.PathLike, n_slots: int, block_shape: Sequence[int],
                 dtype: torch.dtype = torch.bfloat16, io_threads: int = 8, direct: bool | None = None,
                 fault: Fault | None = None):
        if io_threads < 1:
            raise ValueError(f"io_threads: got {io_threads}, expected >= 1")
        slot_bytes = round_up(block_bytes_of(block_shape, dtype), PAGE)
        probed, _ = check_ssd_dir(ssd_dir, n_slots * slot_bytes)  # before anything is allocated
        super().__init__(n_slots, block_shape, dtype, slot_bytes)
        self.direct = probed if direct is None else bool(direct) and probed
        self.fault = fault
        self.dir = tempfile.mkdtemp(prefix="hetero-kv-", dir=os.path.expanduser(ssd_dir))  # mode 0700
        self.path = os.path.join(self.dir, "kv.bin")
        flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(self.path, flags | (direct_io.O_DIRECT if self.direct else 0), 0o600)
        except OSError as e:
            shutil.rmtree(self.dir, ignore_errors=True)
            raise StorageIOError(e.errno or errno_codes.EIO, f"ssd tier: cannot create {self.path}: {e.strerror}",
                                 self.path) from None
        self._fd = fd
        self._pool = ThreadPoolExecutor(io_threads, thread_name_prefix="hetero-ssd-io")
        # The finalizer must not hold the store: it gets the parts it removes.
        self._finalizer = weakref.finalize(self, _remove_store, self._pool, self.dir, fd)
        try:
            if self.budget:
                os.posix_fallocate(fd, 0, self.budget)
        except OSError as e:
            self._finalizer()
            if e.errno == errno_codes.ENOSPC:
                raise StorageConfigError("ssd_kv_bytes", f"ssd_kv_bytes: cannot preallocate {self.budget} bytes "
                                         f"under '{ssd_dir}' (no space left); lower ssd_kv_bytes") from None
            raise StorageIOError(e.errno or errno_codes.EIO, f"ssd tier: cannot preallocate {self.path}: "
                                 f"{e.strerror}", self.path) from None
        self._lock = threading.Lock()
        self._crc: dict[int, int] = {}  # slot -> CRC-32 of its block, only once a write succeeded
        self._writing: dict[int, tuple[object, Future]] = {}  # slot -> (token, latest write)
        self._ops = {"write": 0, "read": 0}
        self._tls = threading.local()
        self.bytes_written = 0
        self.bytes_read = 0

    # ---- the tier interface ----

    def write(self, slot: int, src: torch.Tensor) -> Pending:
        """Start writing block `src` to `slot`; `src` must stay unchanged until the Pending is done
        (a GPU or non-contiguous `src` is copied first, synchronously)."""
        self._check_open()
        self._check_block("src", src)
        slot = self._check_slot(slot)
        if src.device.type != "cpu" or not src.is_contiguous():
            src = src.to("cpu").contiguous()
        token = object()
        with self._lock:
            self._crc.pop(slot, None)
            prev = self._writing.get(slot)
            fut = self._pool.submit(self._do_write, slot, src, token, prev[1] if prev else None)
            self._writing[slot] = (token, fut)
        return Pending(fut)

    def read_into(self, slot: int, dst: torch.Tensor) -> Pending:
        """Start reading `slot` into CPU tensor `dst` (after any write to the slot still running)."""
        self._check_open()
        self._check_block("dst", dst)
        slot = self._check_slot(slot)
        if dst.device.type != "cpu":
            raise ValueError("dst: the SSD tier reads into host memory (a HostPool slot); copy to the GPU from there")
        with self._lock:
            prev = self._writing.get(slot)
            fut = self._pool.submit(self._do_read, slot, dst, prev[1] if prev else None)
        return Pending(fut)

    def free(self, slots) -> None:
        """Give slots back, after any write to them still running has finished."""
        slots = [int(s) for s in slots]
        with self._lock:
            running = [self._writing.pop(s, (None, None))[1] for s in slots]
            for s in slots:
                self._crc.pop(s, None)
        for fut in running:
            if fut is not None:
                fut.exception()  # waits; the error was (or will be) reported through its Pending
        super().free(slots)

    def close(self) -> None:
        """Stop the I/O threads (queued transfers are cancelled), close and remove the file and its
        directory. Idempotent."""
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    # ---- the I/O threads ----

    def _do_write(self, slot: int, src: torch.Tensor, token: object, prev: Future | None) -> None:
        if prev is not None:
            prev.exception()  # keep writes to one slot in order
        offset = slot * self.slot_bytes
        try:
            self._maybe_fault("write")
            crc = zlib.crc32(direct_io.memory_at(src.data_ptr(), self.block_bytes))
            bufs, bounced = self._iovec(src.data_ptr())
            if bounced is not None:
                start, length = bounced
                ctypes.memmove(self._bounce()[1], src.data_ptr() + start, length)
            direct_io.pwritev_full(self._fd, bufs, offset)
        except OSError as e:
            self._end_write(slot, token, None)
            raise self._io_error(e, "writing", slot, offset) from None
        self._end_write(slot, token, crc)

    def _end_write(self, slot: int, token: object, crc: int | None) -> None:
        with self._lock:
            entry = self._writing.get(slot)
            if entry is not None and entry[0] is token:
                del self._writing[slot]
                if crc is not None:
                    self._crc[slot] = crc
                    self.bytes_written += self.block_bytes

    def _do_read(self, slot: int, dst: torch.Tensor, prev: Future | None) -> None:
        if prev is not None:
            prev.exception()
        offset = slot * self.slot_bytes
        with self._lock:
            want = self._crc.get(slot)
        if want is None:
            raise StorageIOError(errno_codes.ENODATA, f"ssd tier: block slot {slot} of {self.path} holds no data "
                                 "(never written, or its write failed)", self.path, slot)
        target = dst if dst.is_contiguous() else torch.empty(self.block_shape, dtype=self.dtype)
        ptr = target.data_ptr()
        try:
            self._maybe_fault("read")
            bufs, bounced = self._iovec(ptr)
            direct_io.preadv_full(self._fd, bufs, offset)
        except OSError as e:
            raise self._io_error(e, "reading", slot, offset) from None
        if bounced is None:
            got = zlib.crc32(direct_io.memory_at(ptr, self.block_bytes))
        else:
            start, length = bounced
            got = zlib.crc32(direct_io.memory_at(ptr, start))
            got = zlib.crc32(memoryview(self._bounce()[0])[:length], got)
        if got != want:
            if bounced is None or start:
                dst.fill_(float("nan"))  # part of it already holds the bad bytes: never let them pass
            raise ChecksumError(errno_codes.EIO, f"ssd tier: block slot {slot} of {self.path} (bytes {offset}.."
                                f"{offset + self.block_bytes - 1}) failed its checksum (CRC-32 {got:#010x}, written "
                                f"{want:#010x}); the disk returned corrupted data", self.path, slot)
        if bounced is not None:
            ctypes.memmove(ptr + start, self._bounce()[1], length)
        if target is not dst:
            dst.copy_(target)
        with self._lock:
            self.bytes_read += self.block_bytes

    def _iovec(self, ptr: int) -> tuple[list[memoryview], tuple[int, int] | None]:
        """Buffers for one block at `ptr`, and which bytes (start, length) go through the bounce buffer."""
        n = self.block_bytes
        if not self.direct:
            return [direct_io.memory_at(ptr, n)], None
        if ptr % PAGE:
            return [memoryview(self._bounce()[0])[:self.slot_bytes]], (0, n)
        main = n - n % PAGE
        bufs = [direct_io.memory_at(ptr, main)] if main else []
        if main == n:
            return bufs, None
        return bufs + [memoryview(self._bounce()[0])[:PAGE]], (main, n - main)

    def _bounce(self):
        """This thread's page-aligned bounce buffer of one slot, and its address."""
        b = getattr(self._tls, "bounce", None)
        if b is None:
            buf = direct_io.aligned_buffer(self.slot_bytes)
            b = self._tls.bounce = (buf, ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        return b

    def _maybe_fault(self, op: str) -> None:
        with self._lock:
            self._ops[op] += 1
            n = self._ops[op]
        f = self.fault
        if f is not None and f.op == op and (n == f.nth or f.every and n >= f.nth):
            raise OSError(f.errno, os.strerror(f.errno))

    def _io_error(self, e: OSError, doing: str, slot: int, offset: int) -> StorageIOError:
        code = e.errno or errno_codes.EIO
        name = errno_codes.errorcode.get(code, str(code))
        hint = _HINTS.get(code, "check the disk under ssd_dir")
        return StorageIOError(code, f"ssd tier: {doing} block slot {slot} of {self.path} at byte {offset} failed: "
                              f"{e.strerror or e} ({name}); {hint}", self.path, slot)

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError(f"ssd tier: the store under {self.dir} is closed")


def _remove_store(pool: ThreadPoolExecutor, directory: str, fd: int) -> None:
    pool.shutdown(wait=True, cancel_futures=True)
    try:
        os.close(fd)
    except OSError:
        pass
    shutil.rmtree(directory, ignore_errors=True)
