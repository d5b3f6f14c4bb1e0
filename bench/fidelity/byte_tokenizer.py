"""A byte-level tokenizer: token i < 256 is byte i, then a few specials.

Built with the `tokenizers` library and saved through PreTrainedTokenizerFast, so that
`AutoTokenizer.from_pretrained(dir)` loads it offline. Training and evaluation encode text as raw
bytes (`encode_bytes`), which `check_tokenizer` proves identical to what the saved tokenizer does.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

BYTE_TOKENS = 256
SPECIALS = ("<pad>", "<bos>", "<eos>")
PAD_ID, BOS_ID, EOS_ID = BYTE_TOKENS, BYTE_TOKENS + 1, BYTE_TOKENS + 2
VOCAB_SIZE = BYTE_TOKENS + len(SPECIALS)


def encode_bytes(text: str | bytes) -> list[int]:
    """Token ids of `text`: its UTF-8 bytes."""
    return list(text.encode("utf-8") if isinstance(text, str) else text)


def build_tokenizer() -> PreTrainedTokenizerFast:
    """The byte-level tokenizer, ids 0..255 the bytes, then <pad>, <bos>, <eos>."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins of the bytes
    byte_to_char = _bytes_to_unicode()
    assert sorted(alphabet) == sorted(byte_to_char.values())
    vocab = {byte_to_char[b]: b for b in range(BYTE_TOKENS)}
    for i, special in enumerate(SPECIALS):
        vocab[special] = BYTE_TOKENS + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIALS))
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", model_max_length=1 << 20
    )


def save_tokenizer(directory) -> None:
    build_tokenizer().save_pretrained(directory)


def check_tokenizer(directory, sample: str) -> None:
    """Fail unless the saved tokenizer encodes and decodes `sample` exactly as raw bytes."""
    tok = AutoTokenizer.from_pretrained(directory)
    ids = tok(sample, add_special_tokens=False)["input_ids"]
    if ids != encode_bytes(sample):
        raise AssertionError("saved tokenizer disagrees with byte encoding")
    if tok.decode(ids) != sample or len(tok) != VOCAB_SIZE or tok.bos_token_id != BOS_ID:
        raise AssertionError("saved tokenizer does not round-trip")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (the ByteLevel pre-tokenizer's alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))
