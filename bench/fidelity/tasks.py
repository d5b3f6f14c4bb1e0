"""Retrieval tasks planted in real text, for training and for held-out probes.

Three kinds of fact, each a line planted in source code, and a question that asks for it later:

    passkey  "# The pass key is 48213. Remember it. 48213 is the pass key."   "# What is the pass key? The pass key is" -> " 48213"
    kv       "registry['K'] = V"          "assert registry['K'] ==" -> " V"         (16-32 pairs per document)
    copy     "# note N: abcdef"           "# recall note N:" -> " abcdef"           (4 notes per document)

Keys and values are written in private byte alphabets, bytes >= 0x80 that the text (ASCII only,
corpus.py) never holds, one alphabet per role; K, V and N are single symbols, the pass key 5 distinct
digits, a note 6 symbols distinct within the document. So a fact stands out from the code around
it the way a number stands out from words for a real tokenizer, and one token of context suffices
to find and copy it: a small byte-level model learns that in minutes, whereas matching several bytes
of ASCII (what plain-text keys would ask) takes it far longer. The facts are random per document;
evaluation pass keys are disjoint from training ones (a hash parity), and so is the text.
Planted lines begin and end with a newline, so they stand on lines of their own wherever they land.
Every document holds facts of all three kinds (the others are distractors). Each answer starts with
a space that the prompt fully determines, so in a probe every informative answer token is produced
by a decode step, none by the exact prefill.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from byte_tokenizer import BOS_ID
from corpus import Corpus

KINDS = ("passkey", "kv", "copy")
PROBE_DEPTH = (0.05, 0.8)  # where the asked-for fact lies in a probe, as a share of the document
PASSKEY_DIGITS = bytes.maketrans(b"0123456789", bytes(range(0x80, 0x8A)))
VALUES = np.arange(0x90, 0xB0, dtype=np.uint8)
KEYS = np.arange(0xB0, 0xD0, dtype=np.uint8)
NOTE_IDS = np.arange(0xD0, 0xE0, dtype=np.uint8)
NOTE_SYMBOLS = np.arange(0xE0, 0x100, dtype=np.uint8)
NOTE_LENGTH = 6
MAX_NOTES = len(NOTE_SYMBOLS) // NOTE_LENGTH
_READABLE = {0x80 + i: ord(str(i)) for i in range(10)}


@dataclass(frozen=True)
class Probe:
    """A held-out question: the prompt ends right before the answer."""

    kind: str
    prompt: np.ndarray  # int64 token ids, BOS first
    answer: np.ndarray  # int64 token ids
    depth: float  # position of the asked-for fact / prompt length


@dataclass(frozen=True)
class _Fact:
    kind: str
    needle: bytes  # the planted line
    question: bytes  # a query line up to the answer
    answer: bytes
    tail: bytes  # what ends the query line in training text


# Facts and questions per 1024 tokens of a training sequence at density 1, per kind. A question may
# ask a fact asked before: every question after the first is answered by copying, which is the
# signal that makes the copying heads form early in training.
TRAIN_RATES = {"passkey": (0.0, 1.0), "kv": (4.0, 8.0), "copy": (2.0, 4.0)}  # kind: (facts, questions)


def training_sequence(rng: np.random.Generator, corpus: Corpus, length: int,
                      density: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """One training sequence of exactly `length` tokens, and for each token the kind of answer it
    belongs to: 0 for text, 1 + KINDS.index(kind) for an answer token (the caller weighs those).

    `density` scales how many facts and questions are planted (TRAIN_RATES at 1).
    """
    def count(rate: float, cap: int = 1 << 30) -> int:
        return min(cap, max(1, round(rate * density * length / 1024)))

    facts = _facts(rng, "train", kv_pairs=count(TRAIN_RATES["kv"][0], len(KEYS)),
                   notes=count(TRAIN_RATES["copy"][0], MAX_NOTES))
    inserts = [(rng.random(), [(fact.needle, 0)]) for fact in facts]
    for kind in KINDS:
        of_kind = [(i, f) for i, f in enumerate(facts) if f.kind == kind]
        label = 1 + KINDS.index(kind)
        for pick in rng.integers(0, len(of_kind), count(TRAIN_RATES[kind][1])):
            i, fact = of_kind[pick]
            at = inserts[i][0]
            query_at = at + (1.0 - at) * rng.random()
            inserts.append((query_at, [(fact.question, 0), (fact.answer, label), (fact.tail, 0)]))
    return _assemble(rng, corpus.text, length, inserts)


def probe(rng: np.random.Generator, corpus: Corpus, length: int, kind: str, kv_pairs: int = 16, notes: int = 4) -> Probe:
    """A held-out document of exactly `length` tokens ending in a question of `kind`."""
    facts = _facts(rng, "eval", kv_pairs=kv_pairs, notes=notes)
    target = facts[[i for i, f in enumerate(facts) if f.kind == kind][int(rng.integers(0, {"passkey": 1, "kv": kv_pairs, "copy": notes}[kind]))]]
    inserts = []
    for fact in facts:
        frac = rng.uniform(*PROBE_DEPTH) if fact is target else rng.uniform(0.0, 0.9)
        inserts.append((frac, [(fact.needle, 0)]))
    ids, _ = _assemble(rng, corpus.text, length - len(target.question), inserts)
    needle = np.frombuffer(target.needle, dtype=np.uint8)
    depth = _find(ids, needle) / length
    prompt = np.concatenate([ids, np.frombuffer(target.question, dtype=np.uint8).astype(np.int64)])
    return Probe(kind, prompt, np.frombuffer(target.answer, dtype=np.uint8).astype(np.int64), depth)


def text_sequence(rng: np.random.Generator, corpus: Corpus, length: int) -> np.ndarray:
    """Plain held-out text of exactly `length` tokens, BOS first (for the next-token loss)."""
    ids, _ = _assemble(rng, corpus.text, length, [])
    return ids


def readable(ids) -> str:
    """Text of token ids, pass-key digits shown as digits, other private symbols as \\xNN."""
    return bytes(_READABLE.get(int(i), int(i)) if int(i) < 256 else ord("?") for i in ids).decode("ascii", "backslashreplace")


def _facts(rng, split: str, kv_pairs: int, notes: int) -> list[_Fact]:
    key = _key(rng, split, lambda: "".join(map(str, rng.choice(10, 5, replace=False))).encode()).translate(PASSKEY_DIGITS)
    facts = [_Fact(
        "passkey",
        b"\n# The pass key is " + key + b". Remember it. " + key + b" is the pass key.\n",
        b"\n# What is the pass key? The pass key is",
        b" " + key,
        b".\n",
    )]
    for name in rng.choice(KEYS, kv_pairs, replace=False):
        name, value = bytes([name]), bytes([rng.choice(VALUES)])
        facts.append(_Fact("kv", b"\nregistry['" + name + b"'] = " + value + b"\n",
                           b"\nassert registry['" + name + b"'] ==", b" " + value, b"\n"))
    symbols = rng.choice(NOTE_SYMBOLS, notes * NOTE_LENGTH, replace=False).tobytes()
    for i, note in enumerate(rng.choice(NOTE_IDS, notes, replace=False)):
        text = symbols[i * NOTE_LENGTH : (i + 1) * NOTE_LENGTH]
        facts.append(_Fact("copy", b"\n# note " + bytes([note]) + b": " + text + b"\n",
                           b"\n# recall note " + bytes([note]) + b":", b" " + text, b"\n"))
    return facts


def _key(rng, split: str, draw) -> bytes:
    """A key whose hash parity belongs to `split`: training and evaluation keys never coincide."""
    while True:
        key = draw()
        if zlib.crc32(key) % 2 == (split == "eval"):
            return key


def _assemble(rng, text: bytes, length: int, inserts: list) -> tuple[np.ndarray, np.ndarray]:
    """BOS, then text with each insert placed at the line start nearest after its fraction.

    `inserts` holds (fraction, [(bytes, label), ...]); returns (ids, labels), both `length` long.
    """
    insert_bytes = sum(len(b) for _, parts in inserts for b, _ in parts)
    budget = length - 1 - insert_bytes
    if budget < 0:
        raise ValueError(f"length {length} is too short for {insert_bytes} bytes of planted facts")
    start = int(rng.integers(0, len(text) - budget))
    chunk = text[start : start + budget]
    pieces, labels, cursor = [np.array([BOS_ID])], [np.zeros(1, np.int8)], 0
    for frac, parts in sorted(inserts, key=lambda item: item[0]):
        at = min(budget, max(cursor, int(frac * budget)))
        newline = chunk.find(b"\n", at)
        at = budget if newline < 0 else newline + 1
        pieces.append(np.frombuffer(chunk[cursor:at], dtype=np.uint8))
        labels.append(np.zeros(at - cursor, np.int8))
        cursor = at
        for data, label in parts:
            pieces.append(np.frombuffer(data, dtype=np.uint8))
            labels.append(np.full(len(data), label, np.int8))
    pieces.append(np.frombuffer(chunk[cursor:], dtype=np.uint8))
    labels.append(np.zeros(budget - cursor, np.int8))
    ids = np.concatenate([p.astype(np.int64) for p in pieces])
    assert len(ids) == length
    return ids, np.concatenate(labels)


def _find(ids: np.ndarray, needle: np.ndarray) -> int:
    windows = np.lib.stride_tricks.sliding_window_view(ids, len(needle))
    hits = np.flatnonzero((windows == needle).all(axis=1))
    return int(hits[0]) if len(hits) else -1
