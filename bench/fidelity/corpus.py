"""Real text found on any machine: the Python standard library's source files.

The text is made ASCII (other bytes become "?"): bytes >= 0x80 are reserved for the planted facts
(tasks.py). Files are split into training and evaluation sets by a hash of their path inside the library, so
the split is the same on every machine that has the same library, and the two sets never share a
file.
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

_ASCII_ONLY = bytes(range(128)) + b"?" * 128
EVAL_SHARE_PER_MILLE = 100  # one file in ten is held out
COPY_LINE_CHARS = (16, 40)


@dataclass(frozen=True)
class Corpus:
    """One split's text, concatenated, and lines fit to be copied."""

    text: bytes
    lines: tuple[bytes, ...]
    files: int


def stdlib_files() -> list[tuple[str, Path]]:
    """(path inside the library, file) for every .py file of the standard library, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root).as_posix()
        if "site-packages" in rel or "dist-packages" in rel:
            continue
        found.append((rel, path))
    return sorted(found)


def is_eval_file(rel: str) -> bool:
    return zlib.crc32(rel.encode()) % 1000 < EVAL_SHARE_PER_MILLE


def load_corpus(split: str, max_bytes: int | None = None) -> Corpus:
    """The concatenated text of the `split` ("train" or "eval") files, each headed by its name."""
    if split not in ("train", "eval"):
        raise ValueError(f"split: got {split!r}, expected 'train' or 'eval'")
    parts, size, files = [], 0, 0
    for rel, path in stdlib_files():
        if is_eval_file(rel) != (split == "eval"):
            continue
        try:
            body = path.read_bytes()
        except OSError:
            continue
        parts.append(b"\n\n# file: " + rel.encode() + b"\n" + body)
        size += len(parts[-1])
        files += 1
        if max_bytes is not None and size >= max_bytes:
            break
    text = b"".join(parts).translate(_ASCII_ONLY)
    if len(text) < 1 << 16:
        raise RuntimeError(f"only {len(text)} bytes of {split} text in {sysconfig.get_paths()['stdlib']}")
    return Corpus(text, _copy_lines(text), files)


def _copy_lines(text: bytes) -> tuple[bytes, ...]:
    low, high = COPY_LINE_CHARS
    lines = set()
    for line in text.split(b"\n"):
        line = line.strip()
        if low <= len(line) <= high and line.isascii() and all(32 <= c < 127 for c in line):
            lines.add(line)
    return tuple(sorted(lines))
