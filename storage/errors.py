"""Errors raised by the storage tiers.

`StorageConfigError` is a bad setting the user can fix (it names the config key); `TierFull` is a
tier without free slots (the placement must spill or evict first); `StorageIOError` is a failed
read or write of the SSD tier (it names the file); `ChecksumError` is a block read back from the
SSD tier that is not the block written there.
"""

from __future__ import annotations


class StorageConfigError(ValueError):
    """A storage setting that cannot work on this machine.

    The message is one line that starts with the config key (`ssd_dir`, `ssd_kv_bytes`,
    `cpu_kv_bytes`) and says how to fix it; the key is also in `.key`.
    """

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key

    def __reduce__(self):
        return (type(self), (self.key, str(self)))


class TierFull(RuntimeError):
    """A tier has fewer free slots than were asked for."""

    def __init__(self, tier: str, asked: int, free: int, n_slots: int, block_bytes: int):
        super().__init__(
            f"{tier} tier full: asked for {asked} block slot(s), {free} free of {n_slots} "
            f"({block_bytes} bytes each); free or spill blocks first, or raise the tier's budget"
        )
        self.tier, self.asked, self.free = tier, asked, free

    def __reduce__(self):
        return (_rebuild, (type(self), self.args, self.__dict__))


class StorageIOError(OSError):
    """A read or write of the SSD tier failed; `.filename` is the file, `.slot` the block slot."""

    def __init__(self, errno: int, message: str, filename: str, slot: int | None = None):
        super().__init__(errno, message)
        self.filename = filename
        self.slot = slot

    def __str__(self):
        return self.strerror

    def __reduce__(self):
        return (type(self), (self.errno, self.strerror, self.filename, self.slot))


class ChecksumError(StorageIOError):
    """A block read from the SSD tier does not match the checksum taken when it was written."""


def _rebuild(cls, args, state):
    obj = cls.__new__(cls)
    obj.args = args
    obj.__dict__.update(state)
    return obj
