"""Byte-level BPE tokenizer: encode, decode, and the GPT-2 / Hugging Face file formats.

Encoding follows GPT-2: split out special tokens (longest first), split the rest with the GPT-2
pattern, turn each pre-token into its byte tokens, then repeatedly merge the adjacent pair with the
lowest merge rank. The result equals Hugging Face's byte-level BPE for the same vocabulary and merges;
`save()` writes a `tokenizer.json` that `tokenizers` and `transformers` load as such.

One known difference: letters and digits (the pattern's \\p{L} and \\p{N}) follow the Unicode version of
the `regex` module, which is newer than that of Oniguruma inside `tokenizers` 0.23: about 17,500 code
points that recent Unicode versions assigned (none of them in Python's own Unicode database) count as
letters or digits here and as symbols there, so text holding them can split into other pre-tokens.
Every code point Python's `unicodedata` assigns agrees; the tests check each one.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import regex

from lmtrain.atomic import atomic_write_text
from lmtrain.errors import UserError
from lmtrain.tokenizer.pretokenize import (
    GPT2_REGEX,
    decode_token,
    encode_token,
    special_splitter,
    split_on_specials,
)
from lmtrain.tokenizer.trainer import validate_special_tokens

# Pre-token -> ids cache; cleared when full so memory stays bounded on endless streams.
_CACHE_MAX = 1 << 18
# encode_iterable encodes once this many characters are buffered.
_STREAM_BUFFER = 1 << 16

_LETTER = regex.compile(r"\p{L}")
_NUMBER = regex.compile(r"\p{N}")
_SPACE = regex.compile(r"\s")


def _char_class(ch: str) -> str:
    """L letter, N number, S the space character, W other whitespace, P anything else."""
    if _LETTER.match(ch):
        return "L"
    if _NUMBER.match(ch):
        return "N"
    if ch == " ":
        return "S"
    if _SPACE.match(ch):
        return "W"
    return "P"


def _is_safe_cut(buf: str, p: int) -> bool:
    r"""Whether GPT-2 pre-tokens of buf[:p] and of the text from p on are those of the whole text,
    whatever follows: no alternative of the pattern can hold both buf[p-1] and buf[p], and the token
    ending at p-1 does not depend on what follows it.

    A letter run ends before a non-letter and a number run before a non-digit; punctuation ends before
    a digit or whitespace (not before a letter: "'s" is one pre-token); a whitespace character other
    than the space ends before a non-space only when it stands alone (a longer run gives its last
    character to the next pre-token, `\s+(?!\S)`, but stays whole at the end of a text). The space
    itself never ends a pre-token before a non-space (" word").
    """
    x, y = _char_class(buf[p - 1]), _char_class(buf[p])
    if x == "L":
        return y != "L"
    if x == "N":
        return y != "N"
    if x == "P":
        return y in ("N", "S", "W")
    if x == "W":
        return y in ("L", "N", "P") and (p < 2 or _char_class(buf[p - 2]) not in ("S", "W"))
    return False


class Tokenizer:
    """Byte-level BPE from a vocabulary (id -> bytes) and an ordered list of merges."""

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: list[str] | None = None,
    ):
        specials = validate_special_tokens(special_tokens)
        self.vocab: dict[int, bytes] = {}
        for i, tok in vocab.items():
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise UserError(f"vocab: ids must be non-negative integers, got {i!r}")
            if not isinstance(tok, bytes | bytearray):
                raise UserError(f"vocab[{i}]: expected bytes, got {type(tok).__name__}")
            self.vocab[i] = bytes(tok)
        self.merges = [(bytes(a), bytes(b)) for a, b in merges]

        # Special tokens take the lowest id holding their bytes, or a new id after the vocabulary when
        # there is none, or when the only one is a single byte, which byte-level encoding needs.
        by_bytes: dict[bytes, list[int]] = {}
        for i in sorted(self.vocab):
            by_bytes.setdefault(self.vocab[i], []).append(i)
        self.special_tokens = specials
        self.special_ids: dict[str, int] = {}
        for s in specials:
            raw = s.encode("utf-8")
            holders = by_bytes.get(raw, [])
            sid = holders[0] if holders and not (len(raw) == 1 and len(holders) == 1) else None
            if sid is None:
                sid = max(self.vocab, default=-1) + 1
                self.vocab[sid] = raw
            self.special_ids[s] = sid
        special_id_set = set(self.special_ids.values())

        # Ids that merges produce and consume: the lowest non-special id for each byte string, so a
        # vocabulary with repeated bytes still encodes like Hugging Face (whose vocab is keyed by string).
        self._token_id: dict[bytes, int] = {}
        for i in sorted(self.vocab):
            if i not in special_id_set:
                self._token_id.setdefault(self.vocab[i], i)
        missing = [b for b in range(256) if bytes([b]) not in self._token_id]
        if missing:
            raise UserError(
                f"vocab: the byte(s) {', '.join(hex(b) for b in missing[:8])} have no token; a byte-level "
                f"vocabulary needs all 256 single bytes"
            )
        self._byte_ids = [self._token_id[bytes([b])] for b in range(256)]
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for rank, (left, right) in enumerate(self.merges):
            ids = [self._token_id.get(left), self._token_id.get(right), self._token_id.get(left + right)]
            if None in ids:
                what = [left, right, left + right][ids.index(None)]
                raise UserError(
                    f"merges[{rank}] ({left!r}, {right!r}) uses or produces {what!r}, which is not in the "
                    f"vocabulary: the vocab and merges files do not belong together; use the pair "
                    f"written by the same training run"
                )
            self._ranks.setdefault((ids[0], ids[1]), (rank, ids[2]))
        self._splitter = special_splitter(specials)
        self._max_special = max((len(s) for s in specials), default=1)
        self._cache: dict[str, list[int]] = {}

    # ----------------------------------------------------------------------------------- encoding
    def _bpe(self, pretoken: str) -> list[int]:
        word = [self._byte_ids[b] for b in pretoken.encode("utf-8")]
        ranks = self._ranks
        while len(word) > 1:
            best_rank = None
            best_pair = None
            for pair in zip(word, word[1:]):
                r = ranks.get(pair)
                if r is not None and (best_rank is None or r[0] < best_rank):
                    best_rank, best_pair, new = r[0], pair, r[1]
            if best_pair is None:
                break
            a, b = best_pair
            out: list[int] = []
            i, n = 0, len(word)
            while i < n:
                if i + 1 < n and word[i] == a and word[i + 1] == b:
                    out.append(new)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            word = out
        return word

    def _encode_ordinary(self, text: str, out: list[int]) -> None:
        cache = self._cache
        for pre in GPT2_REGEX.findall(text):
            ids = cache.get(pre)
            if ids is None:
                ids = self._bpe(pre)
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[pre] = ids
            out.extend(ids)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens in it become their single ids."""
        if not isinstance(text, str):
            raise UserError(f"encode: expected a str, got {type(text).__name__}")
        ids: list[int] = []
        for piece, is_special in split_on_specials(text, self._splitter):
            if is_special:
                ids.append(self.special_ids[piece])
            else:
                self._encode_ordinary(piece, ids)
        return ids

    def _safe_cut(self, buf: str) -> int:
        """The largest p such that encode(buf[:p]) + encode(rest) == encode(buf + rest) for any rest.

        A special token starting in the last (longest special - 1) characters could still grow into a
        longer one, so cuts stay before that zone; inside it, ends of special tokens and pre-token
        boundaries that no continuation can change (see _is_safe_cut) qualify. 0 when there is none.
        """
        # A cut at p reads buf[p], so p < len(buf) even without special tokens.
        limit = len(buf) - max(self._max_special - 1, 1)
        if limit <= 0:
            return 0
        spans = [] if self._splitter is None else [m.span() for m in self._splitter.finditer(buf)]
        # Special-token ends that were decided with full information.
        best = 0
        for s, e in spans:
            if s + self._max_special <= len(buf) and e <= limit:
                best = max(best, e)
        # Scan back from `limit` for a character-class boundary outside every special token.
        lo = best
        p = limit
        while p > lo:
            if _is_safe_cut(buf, p) and not any(s < p < e for s, e in spans):
                return p
            p -= 1
        return best

    def encode_iterable(self, iterable: Iterable[str]) -> Iterator[int]:
        """Ids of the concatenated strings, lazily: memory is bounded by a buffer and the longest
        pre-token, not by the input (e.g. iterate over an open file line by line)."""
        buf = ""
        threshold = _STREAM_BUFFER
        for chunk in iterable:
            if not isinstance(chunk, str):
                raise UserError(f"encode_iterable: expected str items, got {type(chunk).__name__}")
            buf += chunk
            if len(buf) >= threshold:
                cut = self._safe_cut(buf)
                if cut:
                    yield from self.encode(buf[:cut])
                    buf = buf[cut:]
                    threshold = _STREAM_BUFFER
                else:
                    # No safe cut (one giant pre-token): look again only when the buffer has doubled,
                    # so rescanning stays linear in the input.
                    threshold = 2 * len(buf)
        if buf:
            yield from self.encode(buf)

    # ----------------------------------------------------------------------------------- decoding
    def decode(self, ids: Iterable[int]) -> str:
        """Text of the ids; byte sequences that are not valid UTF-8 become U+FFFD, never an error."""
        vocab = self.vocab
        parts = []
        for i in ids:
            tok = vocab.get(i)
            if tok is None:
                raise UserError(f"decode: id {i!r} is not in the vocabulary (ids 0..{max(vocab)})")
            parts.append(tok)
        return b"".join(parts).decode("utf-8", errors="replace")

    def id_to_token(self, i: int) -> bytes:
        return self.vocab[i]

    @property
    def vocab_size(self) -> int:
        return max(self.vocab) + 1

    # ------------------------------------------------------------------------------- GPT-2 files
    def _string_vocab(self) -> dict[str, int]:
        """Token string -> id as GPT-2 and Hugging Face store it: special tokens verbatim, the rest
        through the byte -> printable map. Ids repeating bytes of a lower id are left out (a string
        can name one id only); encoding never produces them."""
        out: dict[str, int] = {}
        special_ids = set(self.special_ids.values())
        for s, i in self.special_ids.items():
            out[s] = i
        for i in sorted(self.vocab):
            if i in special_ids:
                continue
            key = encode_token(self.vocab[i])
            if key not in out:
                out[key] = i
            elif out[key] in special_ids and self._token_id.get(self.vocab[i]) == i:
                raise UserError(
                    f"special token {key!r} is spelled like the byte-level form of token {i} "
                    f"({self.vocab[i]!r}); one vocabulary string cannot name both: rename the special token"
                )
        return out

    def save_gpt2_files(self, directory: str | os.PathLike) -> tuple[Path, Path]:
        """Write `vocab.json` and `merges.txt` (GPT-2's format) into `directory`."""
        d = Path(directory)
        vocab_path, merges_path = d / "vocab.json", d / "merges.txt"
        atomic_write_text(vocab_path, json.dumps(self._string_vocab(), ensure_ascii=False, indent=0) + "\n")
        lines = ["#version: 0.2"] + [f"{encode_token(a)} {encode_token(b)}" for a, b in self.merges]
        atomic_write_text(merges_path, "\n".join(lines) + "\n")
        return vocab_path, merges_path

    @classmethod
    def from_files(
        cls,
        vocab_path: str | os.PathLike,
        merges_path: str | os.PathLike,
        special_tokens: list[str] | None = None,
    ) -> Tokenizer:
        """Load GPT-2's `vocab.json` (string -> id) and `merges.txt` ("left right" per line)."""
        specials = validate_special_tokens(special_tokens)
        try:
            raw = json.loads(Path(vocab_path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(
                f"{vocab_path}: no such file; pass the vocab.json of a GPT-2 style tokenizer"
            ) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{vocab_path}: not a JSON object of token -> id ({exc})") from None
        if not isinstance(raw, dict):
            raise UserError(f"{vocab_path}: expected a JSON object mapping token strings to ids")
        vocab = cls._vocab_from_strings(raw, specials, str(vocab_path))
        merges = cls._read_merges(Path(merges_path))
        return cls(vocab, merges, specials)

    @staticmethod
    def _vocab_from_strings(raw: dict, specials: list[str], where: str) -> dict[int, bytes]:
        vocab: dict[int, bytes] = {}
        special_set = set(specials)
        for key, i in raw.items():
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise UserError(f"{where}: token {key!r} has id {i!r}; expected a non-negative integer")
            tok = key.encode("utf-8") if key in special_set else decode_token(key)
            if tok is None:
                raise UserError(
                    f"{where}: token {key!r} (id {i}) has characters outside GPT-2's byte mapping; if it is a "
                    f"special token, list it among the special tokens"
                )
            if i in vocab:
                raise UserError(f"{where}: id {i} is used by two tokens ({vocab[i]!r} and {tok!r})")
            vocab[i] = tok
        return vocab

    @staticmethod
    def _read_merges(path: Path) -> list[tuple[bytes, bytes]]:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"{path}: no such file; pass the merges.txt of a GPT-2 style tokenizer") from None
        merges: list[tuple[bytes, bytes]] = []
        for lineno, line in enumerate(text.split("\n"), start=1):
            if lineno == 1 and line.startswith("#version"):
                continue
            if not line.strip():
                continue
            parts = line.split(" ")
            left = decode_token(parts[0]) if len(parts) == 2 else None
            right = decode_token(parts[1]) if len(parts) == 2 else None
            if left is None or right is None:
                raise UserError(
                    f"{path}:{lineno}: expected two GPT-2 byte-mapped tokens separated by one space, got {line!r}"
                )
            merges.append((left, right))
        return merges

    # ---------------------------------------------------------------------- Hugging Face tokenizer.json
    def to_hf_json(self) -> dict:
        """The Hugging Face `tokenizer.json` document of this tokenizer."""
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
        added = [
            {
                "id": i,
                "content": s,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for s, i in sorted(self.special_ids.items(), key=lambda kv: kv[1])
        ]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": None,
            "pre_tokenizer": byte_level,
            "post_processor": None,
            "decoder": byte_level,
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": self._string_vocab(),
                "merges": [[encode_token(a), encode_token(b)] for a, b in self.merges],
            },
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write a Hugging Face `tokenizer.json` (a directory gets `tokenizer.json` inside it)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        atomic_write_text(p, json.dumps(self.to_hf_json(), ensure_ascii=False, indent=1) + "\n")
        return p

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        """Read a `tokenizer.json` written by `save()` (or a directory holding one)."""
        p = Path(path)
        if p.is_dir():
            p = p / "tokenizer.json"
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise UserError(f"{p}: no such file; pass a tokenizer directory or tokenizer.json") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UserError(f"{p}: not valid JSON ({exc})") from None
        model = doc.get("model") if isinstance(doc, dict) else None
        if not isinstance(model, dict) or model.get("type") != "BPE":
            raise UserError(f"{p}: expected a Hugging Face tokenizer.json with a BPE model")
        pre = doc.get("pre_tokenizer") or {}
        if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or pre.get("use_regex") is False:
            raise UserError(
                f"{p}: pre_tokenizer must be ByteLevel with add_prefix_space=false and use_regex=true, "
                f"got {pre!r}"
            )
        specials = [t["content"] for t in sorted(doc.get("added_tokens") or [], key=lambda t: t["id"])]
        vocab = cls._vocab_from_strings(model.get("vocab") or {}, specials, f"{p} model.vocab")
        for t in doc.get("added_tokens") or []:
            vocab.setdefault(t["id"], t["content"].encode("utf-8"))
        merges = []
        for k, m in enumerate(model.get("merges") or []):
            pair = m.split(" ") if isinstance(m, str) else m
            sides = [decode_token(x) for x in pair] if len(pair) == 2 else [None]
            if None in sides:
                raise UserError(f"{p}: model.merges[{k}] = {m!r} is not a pair of byte-mapped tokens")
            merges.append((sides[0], sides[1]))
        return cls(vocab, merges, specials)
