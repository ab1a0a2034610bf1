"""Pieces shared by the BPE trainer and tokenizer: the GPT-2 pre-tokeniser, special-token splitting and
GPT-2's printable mapping of bytes (`bytes_to_unicode`) used by `vocab.json`, `merges.txt` and
Hugging Face `tokenizer.json` files.
"""

from __future__ import annotations

import functools

import regex

# GPT-2's pre-tokenisation pattern. Hugging Face's ByteLevel pre-tokenizer (use_regex=True) uses the
# same pattern spelled as `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|...`; both split text identically.
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT2_REGEX = regex.compile(GPT2_PATTERN)


def special_splitter(special_tokens: list[str]) -> regex.Pattern | None:
    """A pattern matching any special token, longest first at each position.

    Alternatives are tried in order, so sorting by length (longest first) makes `<|a|><|a|>` win over
    `<|a|>` when both start at the same place: leftmost-longest, as Hugging Face's added tokens match.
    """
    if not special_tokens:
        return None
    ordered = sorted(set(special_tokens), key=lambda s: (-len(s), s))
    return regex.compile("|".join(regex.escape(s) for s in ordered))


def split_on_specials(text: str, splitter: regex.Pattern | None) -> list[tuple[str, bool]]:
    """[(piece, is_special)] covering `text` in order; empty ordinary pieces are dropped."""
    if splitter is None:
        return [(text, False)] if text else []
    out: list[tuple[str, bool]] = []
    pos = 0
    for m in splitter.finditer(text):
        if m.start() > pos:
            out.append((text[pos : m.start()], False))
        out.append((m.group(), True))
        pos = m.end()
    if pos < len(text):
        out.append((text[pos:], False))
    return out


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, soft hyphen, ...)
    are shifted to code points 256, 257, ... in byte order, so every token is a visible, space-free
    string that JSON and a whitespace-separated merges.txt can hold.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    kept = set(keep)
    mapping: dict[int, str] = {b: chr(b) for b in keep}
    shift = 0
    for b in range(256):
        if b not in kept:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@functools.cache
def unicode_to_bytes() -> dict[str, int]:
    return {ch: b for b, ch in bytes_to_unicode().items()}


def encode_token(token: bytes) -> str:
    """Bytes -> GPT-2 printable string."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def decode_token(text: str) -> bytes | None:
    """GPT-2 printable string -> bytes, or None when a character is outside the mapping."""
    table = unicode_to_bytes()
    try:
        return bytes(table[ch] for ch in text)
    except KeyError:
        return None
