"""Low-level helpers for O_DIRECT block I/O: page-aligned buffers, raw memory views of tensors,
whole-length preadv/pwritev, and a probe of whether a directory's file system takes O_DIRECT."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import tempfile

from .tier import PAGE

O_DIRECT = getattr(os, "O_DIRECT", 0)


def memory_at(address: int, nbytes: int) -> memoryview:
    """A writable byte view of `nbytes` of process memory at `address` (e.g. a tensor's data).
    The caller keeps the owner alive while the view is used."""
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def aligned_buffer(nbytes: int) -> mmap.mmap:
    """A zeroed, page-aligned buffer of `nbytes` (anonymous mmap), for bounce copies."""
    return mmap.mmap(-1, max(nbytes, PAGE))


def _rest(buffers: list[memoryview], done: int) -> list[memoryview]:
    out = []
    for b in buffers:
        if done >= len(b):
            done -= len(b)
            continue
        out.append(b[done:])
        done = 0
    return out


def preadv_full(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Fill `buffers` from `offset`, retrying short reads; EOF before the end is EIO."""
    want = sum(len(b) for b in buffers)
    done = 0
    while done < want:
        n = os.preadv(fd, _rest(buffers, done) if done else buffers, offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"end of file after {done} of {want} bytes")
        done += n


def pwritev_full(fd: int, buffers: list[memoryview], offset: int) -> None:
    """Write all of `buffers` at `offset`, retrying short writes."""
    want = sum(len(b) for b in buffers)
    done = 0
    while done < want:
        n = os.pwritev(fd, _rest(buffers, done) if done else buffers, offset + done)
        if n == 0:
            raise OSError(errno.EIO, f"wrote nothing after {done} of {want} bytes")
        done += n


def direct_io_supported(directory: str) -> bool:
    """Whether files in `directory` can be opened, written and read with O_DIRECT.

    False when the file system refuses O_DIRECT (EINVAL, EOPNOTSUPP: e.g. tmpfs before Linux 6.6)
    or the platform has no O_DIRECT. Other errors (permissions, a full disk) propagate.
    """
    if not O_DIRECT:
        return False
    fd, path = tempfile.mkstemp(prefix=".hetero-odirect-", dir=directory)
    os.close(fd)
    try:
        try:
            fd = os.open(path, os.O_RDWR | O_DIRECT)
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise
        try:
            buf = aligned_buffer(PAGE)
            buf[:8] = b"hetero\0\0"
            pwritev_full(fd, [memoryview(buf)], 0)
            preadv_full(fd, [memoryview(buf)], 0)
            return True
        except OSError as e:
            if e.errno in (errno.EINVAL, errno.EOPNOTSUPP):
                return False
            raise
        finally:
            os.close(fd)
    finally:
        os.remove(path)
