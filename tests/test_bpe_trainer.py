"""BPE trainer: merges equal a slow full-recount reference; parallel chunking equals one pass; bad input."""

from __future__ import annotations

from collections import Counter

import pytest
import regex
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmtrain.errors import UserError
from lmtrain.tokenizer import train_bpe
from lmtrain.tokenizer import trainer as trainer_mod

PAT = regex.compile(r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def reference_bpe(text: str, vocab_size: int, specials: list[str]):
    """Obviously correct BPE: recount every pair of every word before each merge."""
    pieces = (
        regex.split("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)), text)
        if specials
        else [text]
    )
    words: Counter = Counter()
    for piece in pieces:
        for pre in PAT.findall(piece):
            words[tuple(bytes([b]) for b in pre.encode("utf-8"))] += 1
    vocab = [s.encode("utf-8") for s in specials] + [bytes([b]) for b in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        pairs: Counter = Counter()
        for word, c in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += c
        if not pairs:
            break
        best = max(pairs, key=lambda p: (pairs[p], p))  # highest count, then greatest (bytes, bytes)
        merges.append(best)
        merged = best[0] + best[1]
        if merged not in vocab[len(specials) :]:
            vocab.append(merged)
        new_words: Counter = Counter()
        for word, c in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            new_words[tuple(out)] += c
        words = new_words
    return dict(enumerate(vocab)), merges


def _check(tmp_path, text: str, vocab_size: int, specials: list[str]):
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    got_vocab, got_merges = train_bpe(path, vocab_size, specials)
    ref_vocab, ref_merges = reference_bpe(text, vocab_size, specials)
    assert got_merges == ref_merges
    assert got_vocab == ref_vocab


CORPORA = {
    # every pair occurs equally often: the order is decided by the tie rule alone
    "ties": "ab cd ef ab cd ef xy xy",
    "ties_shared_prefix": "a ab abc b bc bcd",
    "repeats": "aaaa aaa aa a bbbb abab abab",
    # "ab"+"c" and later "a"+"bc" both make "abc": the second reuses the first token
    "two_routes": "abc abc abc xbc xbc xbc xbc ab ab a" + " abcab" * 2,
    "specials": "the cat<|endoftext|>the hat<|endoftext|><|endoftext|>cathat",
    "unicode": "naïve café 日本語 日本 🙂🙂 e\u0301e\u0301 don't we'll 42 4242",
}


@pytest.mark.parametrize("name", sorted(CORPORA))
def test_merges_equal_reference(tmp_path, name):
    specials = ["<|endoftext|>"] if "special" in name else []
    _check(tmp_path, CORPORA[name], 256 + len(specials) + 40, specials)


def test_special_token_blocks_merges(tmp_path):
    # x and y are adjacent only across the special token, so they must never merge.
    _check(tmp_path, "x<|s|>y " * 50, 300, ["<|s|>"])
    vocab, merges = train_bpe(tmp_path / "corpus.txt", 300, ["<|s|>"])
    assert (b"y", b" ") in merges or (b" ", b"x") in merges
    assert b"xy" not in vocab.values() and (b"x", b"y") not in merges


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    text=st.text(alphabet=st.sampled_from("ab c\n'sé日🙂1"), min_size=1, max_size=120),
    extra=st.integers(0, 30),
)
def test_merges_equal_reference_random(tmp_path_factory, text, extra):
    _check(tmp_path_factory.mktemp("c"), text, 256 + extra, [])


def test_deterministic_and_layout(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello world " * 20 + "<|endoftext|>" + "hello there " * 5, encoding="utf-8")
    a = train_bpe(path, 270, ["<|endoftext|>", "<pad>"])
    b = train_bpe(path, 270, ["<|endoftext|>", "<pad>"])
    assert a == b
    vocab, merges = a
    assert vocab[0] == b"<|endoftext|>" and vocab[1] == b"<pad>"
    assert [vocab[2 + i] for i in range(256)] == [bytes([i]) for i in range(256)]
    assert len(vocab) == 270 and len(merges) >= 270 - 258
    assert merges[0] == (b" ", b"h") or merges[0][0] + merges[0][1] in (b"he", b"ll", b"lo", b" h")


def test_stops_when_nothing_left_to_merge(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("ab ab", encoding="utf-8")
    vocab, merges = train_bpe(path, 1000, [])
    assert merges == [(b"a", b"b"), (b" ", b"ab")]
    assert len(vocab) == 258


@pytest.mark.parametrize(
    "specials",
    [
        [],
        ["<|endoftext|>"],
        ["<|endoftext|>", "<|endoftext|><|endoftext|>"],
        ["<|endoftext|>", "x<|endoftext|>"],
    ],
)
def test_parallel_chunks_count_like_one_pass(tmp_path, monkeypatch, specials):
    # Small chunks and scan windows force many boundaries, including inside short windows.
    monkeypatch.setattr(trainer_mod, "_PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(trainer_mod, "_MIN_CHUNK_BYTES", 300)
    monkeypatch.setattr(trainer_mod, "_SCAN_BYTES", 64)
    # Whitespace runs before a line start ("\n\n\nd", " \nd", "\t\nx") must not become chunk boundaries.
    docs = [
        f"def f{i}(x):\n    return x  +  {i}\n\n\ndef g(): \nx=1\t\nx\n  # naïve {i}\n" * (i % 4 + 1)
        + "x" * (i % 2)  # "x<|endoftext|>" is a special token of its own in one case
        for i in range(80)
    ]
    sep = specials[0] if specials else ""
    text = sep.join(docs)
    if specials:
        text += specials[-1] + "tail"
    path = tmp_path / "c.txt"
    path.write_text(text, encoding="utf-8")
    ranges = trainer_mod._chunk_ranges(path, path.stat().st_size, [s.encode() for s in specials], 2)
    assert len(ranges) > 3
    assert ranges[0][0] == 0 and ranges[-1][1] == path.stat().st_size
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    expected: Counter = Counter()
    pieces = (
        regex.split("|".join(regex.escape(s) for s in sorted(specials, key=len, reverse=True)), text)
        if specials
        else [text]
    )
    for piece in pieces:
        expected.update(PAT.findall(piece))
    assert trainer_mod.count_pretokens(path, specials, num_workers=2) == expected
    assert train_bpe(path, 300, specials, num_workers=2) == train_bpe(path, 300, specials, num_workers=1)


def test_chunk_boundary_never_splits_a_special_token(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "_SCAN_BYTES", 16)
    specials = [b"<|endoftext|>", b"x<|endoftext|>"]
    data = b"ab x<|endoftext|>cd <|endoftext|>ef\n" * 10
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    spans = [(m.start(), m.end()) for m in regex.finditer(regex.escape(specials[1]), data)]
    with open(path, "rb") as fh:
        for start in range(len(data)):
            b = trainer_mod._find_boundary(fh, start, len(data), specials)
            assert b >= start
            assert not any(s < b < e for s, e in spans), (start, b)
            assert b == len(data) or any(data.startswith(sp, b) for sp in specials)


def test_newline_boundary_only_between_visible_characters(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer_mod, "_SCAN_BYTES", 16)
    data = b"a  \nb\n\nc \nd\te\nf" * 5
    path = tmp_path / "c.txt"
    path.write_bytes(data)
    with open(path, "rb") as fh:
        for start in range(len(data)):
            b = trainer_mod._find_boundary(fh, start, len(data), [])
            assert b == len(data) or data[b - 2 : b + 1] == b"e\nf", (start, b)


# ------------------------------------------------------------------------------------- bad input
def test_vocab_size_too_small(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(UserError, match=r"vocab_size=257 is too small.*at least 258"):
        train_bpe(path, 257, ["<|endoftext|>", "<pad>"])
    with pytest.raises(UserError, match="vocab_size"):
        train_bpe(path, "300", [])


def test_empty_file(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(UserError, match=r"empty\.txt is empty"):
        train_bpe(path, 300, [])


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        train_bpe(tmp_path / "nope.txt", 300, [])


@pytest.mark.parametrize("parallel", [False, True])
def test_not_utf8_reports_offset(tmp_path, monkeypatch, parallel):
    if parallel:
        monkeypatch.setattr(trainer_mod, "_PARALLEL_MIN_BYTES", 0)
        monkeypatch.setattr(trainer_mod, "_MIN_CHUNK_BYTES", 100)
        monkeypatch.setattr(trainer_mod, "_SCAN_BYTES", 32)
    good = ("hello world\n" * 100).encode()
    path = tmp_path / "latin1.txt"
    # Two bad bytes in different chunks: the first one in the file is reported.
    path.write_bytes(good + "café".encode("latin-1") + good + b"\xff" + good)
    offset = len(good) + 3
    with pytest.raises(UserError, match=rf"latin1\.txt: not valid UTF-8 at byte offset {offset}\b"):
        train_bpe(path, 300, [], num_workers=2)


@pytest.mark.parametrize(
    ("specials", "message"),
    [
        (["<|endoftext|>", ""], r"special_tokens\[1\] is empty"),
        (["<a>", "<a>"], r"'<a>' is given twice"),
        ("<a>", "a list of strings"),
        ([3], r"special_tokens\[0\]: expected a string"),
    ],
)
def test_bad_special_tokens(tmp_path, specials, message):
    path = tmp_path / "c.txt"
    path.write_text("hello", encoding="utf-8")
    with pytest.raises(UserError, match=message):
        train_bpe(path, 300, specials)
