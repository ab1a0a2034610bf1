"""BPE tokenizer: round trips, streaming, special tokens, and equality with Hugging Face byte-level BPE."""

from __future__ import annotations

import json
import sysconfig
import unicodedata
from pathlib import Path

import pytest
import tokenizers
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from lmtrain.errors import UserError
from lmtrain.tokenizer import Tokenizer, train_bpe
from lmtrain.tokenizer import tokenizer as tokenizer_mod
from lmtrain.tokenizer.pretokenize import GPT2_REGEX, bytes_to_unicode

EOT = "<|endoftext|>"
SPECIALS = [EOT, EOT + EOT, "<pad>"]


def stdlib_sample(max_chars: int) -> list[str]:
    """Texts of stdlib .py files (sorted by name, skipping site-packages) up to about max_chars."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out, total = [], 0
    for path in sorted(root.glob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue
        out.append(text)
        total += len(text)
        if total >= max_chars:
            break
    return out


# Text that stresses the pre-tokeniser: whitespace runs of every kind, contractions, digits, marks.
TRICKY = (
    "Hello  world!\n\n\n  x\t\ty \r\n  \n 'll don't WE'RE it's 12345 3.14 1,000\u00a0nbsp\u2003em "
    "日本語のテキスト、句読点。 한국어 مرحبا שלום e\u0301\u0308 🙂👍🏽👨‍👩‍👧 \x00\x1f\x7f \u2028\u2029 tail   "
)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Tokenizer, Path, str]:
    """A tokenizer trained on part of the stdlib plus TRICKY; its directory; the training text."""
    d = tmp_path_factory.mktemp("bpe")
    text = EOT.join(stdlib_sample(200_000) + [TRICKY * 3])
    corpus = d / "corpus.txt"
    corpus.write_text(text, encoding="utf-8")
    vocab, merges = train_bpe(corpus, 1200, SPECIALS)
    tok = Tokenizer(vocab, merges, SPECIALS)
    tok.save(d / "tokenizer.json")
    tok.save_gpt2_files(d)
    return tok, d, text


def hf_from_json(d: Path) -> tokenizers.Tokenizer:
    return tokenizers.Tokenizer.from_file(str(d / "tokenizer.json"))


def hf_from_gpt2_files(d: Path) -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens(SPECIALS)
    return hf


# Code points unassigned in Python's Unicode database are left out of comparisons with Hugging Face:
# the `regex` module already knows Unicode 17.0 letters that Oniguruma in `tokenizers` does not (see
# test_hf_pretokenizer_agrees_on_every_assigned_code_point). Round trips use every code point.
any_text = st.text(st.characters(codec="utf-8"), max_size=200)
unicode_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cn"]), max_size=200)
any_with_specials = st.lists(
    st.one_of(any_text, st.sampled_from(SPECIALS + ["<|endoftext", "|>", "<pad", " ", "\n\n"])), max_size=8
).map("".join)
text_with_specials = st.lists(
    st.one_of(unicode_text, st.sampled_from(SPECIALS + ["<|endoftext", "|>", "<pad", " ", "\n\n"])),
    max_size=8,
).map("".join)


def test_bytes_to_unicode_is_gpt2s_map():
    table = bytes_to_unicode()
    assert sorted(table) == list(range(256)) and len(set(table.values())) == 256
    assert table[ord("A")] == "A" and table[ord(" ")] == "Ġ" and table[ord("\n")] == "Ċ" and table[0] == "Ā"
    # Hugging Face's ByteLevel alphabet is the same set of 256 characters.
    assert set(pre_tokenizers.ByteLevel.alphabet()) == set(table.values())


# ------------------------------------------------------------------------------------ round trips
@settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=any_with_specials)
def test_round_trip_unicode(trained, text):
    tok = trained[0]
    assert tok.decode(tok.encode(text)) == text


def test_round_trip_examples(trained):
    tok = trained[0]
    for text in [TRICKY, "", " ", EOT, EOT * 3, f"a{EOT}b<pad>{EOT}{EOT}c", "e\u0301" * 20, "👨‍👩‍👧" * 5]:
        assert tok.decode(tok.encode(text)) == text


def test_special_tokens_longest_first(trained):
    tok = trained[0]
    eot, eot2, pad = (tok.special_ids[s] for s in SPECIALS)
    assert len({eot, eot2, pad}) == 3
    assert tok.encode(EOT) == [eot]
    assert tok.encode(EOT * 2) == [eot2]
    assert tok.encode(EOT * 3) == [eot2, eot]
    assert tok.encode(f"x{EOT}<pad>") == tok.encode("x") + [eot, pad]
    # Without being declared special, the same text is ordinary bytes.
    plain = Tokenizer(tok.vocab, tok.merges)
    assert len(plain.encode(EOT)) > 1


def test_decode_replaces_invalid_utf8(trained):
    tok = trained[0]
    snowman = "☃".encode()
    byte_ids = [tok._byte_ids[b] for b in snowman]
    assert tok.decode(byte_ids[:2]) == "\ufffd"
    assert tok.decode(byte_ids[1:] + byte_ids) == "\ufffd\ufffd☃"
    with pytest.raises(UserError, match="id 999999 is not in the vocabulary"):
        tok.decode([999999])


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=text_with_specials, cuts=st.lists(st.integers(0, 400), max_size=12), buffer=st.integers(1, 40))
def test_encode_iterable_equals_encode(trained, monkeypatch, text, cuts, buffer):
    # A tiny buffer makes every chunk boundary a potential mistake.
    monkeypatch.setattr(tokenizer_mod, "_STREAM_BUFFER", buffer)
    tok = trained[0]
    points = sorted({min(c, len(text)) for c in cuts})
    chunks = [text[a:b] for a, b in zip([0, *points], [*points, len(text)])]
    assert list(tok.encode_iterable(chunks)) == tok.encode(text)


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    text=st.text(st.sampled_from(" \t\n\r\u3000ab1.'s<>|"), max_size=30).map(
        lambda t: t.replace("<>", "<pad>")
    ),
    buffer=st.integers(1, 6),
)
def test_encode_iterable_whitespace_and_punctuation(trained, monkeypatch, text, buffer):
    monkeypatch.setattr(tokenizer_mod, "_STREAM_BUFFER", buffer)
    tok = trained[0]
    assert list(tok.encode_iterable(iter(text))) == tok.encode(text)


def test_encode_iterable_without_safe_cuts(trained, monkeypatch):
    # One long letter run and one long space run: no cut is possible inside either; the result must
    # still be exact.
    monkeypatch.setattr(tokenizer_mod, "_STREAM_BUFFER", 8)
    tok = trained[0]
    text = "x" + "a" * 3000 + " " * 500 + "b1"
    assert list(tok.encode_iterable(iter(text))) == tok.encode(text)


def test_encode_iterable_is_lazy_over_a_file(trained, tmp_path):
    tok, _, text = trained
    path = tmp_path / "big.txt"
    path.write_text(text, encoding="utf-8")
    consumed = 0

    def lines(fh):
        nonlocal consumed
        for line in fh:
            consumed += len(line)
            yield line

    with open(path, encoding="utf-8", newline="") as fh:  # newline="": keep "\r\n" as written
        gen = tok.encode_iterable(lines(fh))
        first = [next(gen) for _ in range(50)]
        # Only about a buffer's worth of text has been read when the first ids come out.
        assert consumed < 2 * tokenizer_mod._STREAM_BUFFER < len(text)
        rest = list(gen)
    assert first + rest == tok.encode(text)


# -------------------------------------------------------------------------------- Hugging Face
def test_hf_equal_on_stdlib(trained):
    tok, d, _ = trained
    hf_json, hf_files = hf_from_json(d), hf_from_gpt2_files(d)
    # Files not seen in training, plus the training ones; compared file by file for a readable failure.
    for text in stdlib_sample(700_000)[::3] + [TRICKY]:
        ours = tok.encode(text)
        assert hf_json.encode(text).ids == ours
        assert hf_files.encode(text).ids == ours
        assert hf_json.decode(ours, skip_special_tokens=False) == text


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(text=text_with_specials)
def test_hf_equal_on_random_unicode(trained, text):
    tok, d, _ = trained
    ours = tok.encode(text)
    assert _hf(d, "json").encode(text).ids == ours
    assert _hf(d, "files").encode(text).ids == ours


@settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    text=st.text(
        st.sampled_from(" \t\n\r\x0b\x0c\x1c\x1d\x85\xa0\u1680\u2000\u200b\u2028\u3000\ufeffa1.'s"),
        max_size=40,
    )
)
def test_hf_equal_on_whitespace_runs(trained, text):
    tok, d, _ = trained
    assert _hf(d, "json").encode(text).ids == tok.encode(text)


_HF_CACHE: dict = {}


def _hf(d: Path, kind: str) -> tokenizers.Tokenizer:
    key = (d, kind)
    if key not in _HF_CACHE:
        _HF_CACHE[key] = hf_from_json(d) if kind == "json" else hf_from_gpt2_files(d)
    return _HF_CACHE[key]


@pytest.mark.slow
def test_hf_pretokenizer_agrees_on_every_assigned_code_point():
    """Every code point Python's Unicode database assigns, in letter, digit, space and punctuation
    contexts, splits into the same pre-tokens as Hugging Face's ByteLevel pre-tokenizer."""
    hf = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    chars = [
        chr(c)
        for c in range(0x110000)
        if unicodedata.category(chr(c)) not in ("Cn", "Cs") and not 0xE000 <= c <= 0xF8FF and c < 0xF0000
    ]
    assert len(chars) > 140_000
    for start in range(0, len(chars), 20_000):
        text = "".join(f"a{ch}1{ch} {ch}{ch}\n{ch}." for ch in chars[start : start + 20_000])
        # Same text, same character spans: same pre-tokens (Hugging Face reports offsets in characters).
        ours = [m.span() for m in GPT2_REGEX.finditer(text)]
        assert ours == [span for _, span in hf.pre_tokenize_str(text)]


def test_transformers_loads_saved_tokenizer(trained):
    tok, d, _ = trained
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"))
    text = f"def main():\n    return 0{EOT}x = 'naïve 🙂'\n"
    ids = tok.encode(text)
    assert fast.encode(text, add_special_tokens=False) == ids
    assert fast.decode(ids) == text
    assert fast.convert_tokens_to_ids(EOT) == tok.special_ids[EOT]


def test_tokenizer_json_layout(trained):
    tok, d, _ = trained
    doc = json.loads((d / "tokenizer.json").read_text(encoding="utf-8"))
    assert doc["pre_tokenizer"] == {
        "type": "ByteLevel",
        "add_prefix_space": False,
        "trim_offsets": True,
        "use_regex": True,
    }
    assert doc["decoder"]["type"] == "ByteLevel" and doc["model"]["type"] == "BPE"
    assert [(t["content"], t["special"]) for t in doc["added_tokens"]] == [(s, True) for s in SPECIALS]
    assert len(doc["model"]["merges"]) == len(tok.merges)


def test_save_load_round_trip(trained, tmp_path):
    tok, d, text = trained
    again = Tokenizer.load(d)
    assert again.vocab == tok.vocab and again.merges == tok.merges and again.special_ids == tok.special_ids
    files = Tokenizer.from_files(d / "vocab.json", d / "merges.txt", SPECIALS)
    assert files.special_ids == tok.special_ids
    sample = text[:20_000]
    assert files.encode(sample) == again.encode(sample) == tok.encode(sample)


def test_two_routes_to_the_same_bytes_encode_like_hf(tmp_path):
    # Merges ("a", "bc") and ("ab", "c") both make "abc", and id 300 repeats the bytes of id 299:
    # Hugging Face keys its vocabulary by string, so there is one "abc"; we must pick the same id.
    vocab = {i: bytes([i]) for i in range(256)}
    vocab.update({256: b"bc", 257: b"ab", 299: b"abc", 300: b"abc", 301: b" abc"})
    merges = [(b"b", b"c"), (b"a", b"b"), (b"a", b"bc"), (b"ab", b"c"), (b" ", b"abc")]
    tok = Tokenizer(vocab, merges)
    tok.save(tmp_path / "tokenizer.json")
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    for text in ["abc", "xbc abcabc", " abc a bc", "aabcc", "ababc"]:
        assert hf.encode(text).ids == tok.encode(text)
        assert 300 not in tok.encode(text)
    assert tok.encode("abc") == [299] and tok.encode(" abc") == [301]


# ------------------------------------------------------------------------------------ bad input
def test_merges_disagreeing_with_vocab(trained, tmp_path):
    tok, d, _ = trained
    merges = (d / "merges.txt").read_text(encoding="utf-8").splitlines()
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    # Drop the token the 5th merge produces from the vocabulary.
    left, right = merges[5].split(" ")
    del vocab[left + right]
    (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (tmp_path / "merges.txt").write_text("\n".join(merges) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"merges\[4\].*not in the vocabulary.*do not belong together"):
        Tokenizer.from_files(tmp_path / "vocab.json", tmp_path / "merges.txt", SPECIALS)


def test_malformed_gpt2_files(trained, tmp_path):
    _, d, _ = trained
    (tmp_path / "merges.txt").write_text("#version: 0.2\nĠ t\nonly-one-token\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"merges\.txt:3: expected two"):
        Tokenizer.from_files(d / "vocab.json", tmp_path / "merges.txt", SPECIALS)
    (tmp_path / "vocab.json").write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(UserError, match="expected a JSON object"):
        Tokenizer.from_files(tmp_path / "vocab.json", d / "merges.txt", SPECIALS)
    (tmp_path / "vocab.json").write_text('{"a": 0, "<x>": 1}', encoding="utf-8")
    with pytest.raises(UserError, match=r"'<x>'.*not|needs all 256"):
        Tokenizer.from_files(tmp_path / "vocab.json", d / "merges.txt", SPECIALS)
    with pytest.raises(UserError, match="no such file"):
        Tokenizer.from_files(tmp_path / "missing.json", d / "merges.txt", SPECIALS)
    # A special token missing from vocab.json that is not byte-mapped text is reported, not guessed.
    (tmp_path / "vocab.json").write_text('{"\\u3042": 0}', encoding="utf-8")
    with pytest.raises(UserError, match="outside GPT-2's byte mapping"):
        Tokenizer.from_files(tmp_path / "vocab.json", d / "merges.txt", SPECIALS)


def test_special_token_spelled_like_a_byte_token(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)}
    tok = Tokenizer(vocab, [], ["!"])  # "!" is also the byte-level spelling of byte 0x21
    assert tok.encode("!") == [256]
    with pytest.raises(UserError, match="rename the special token"):
        tok.save(tmp_path / "tokenizer.json")


def test_bad_constructor_input(trained):
    tok = trained[0]
    with pytest.raises(UserError, match="is empty"):
        Tokenizer(tok.vocab, tok.merges, [EOT, ""])
    with pytest.raises(UserError, match="given twice"):
        Tokenizer(tok.vocab, tok.merges, [EOT, EOT])
    with pytest.raises(UserError, match="needs all 256 single bytes"):
        Tokenizer({0: b"a"}, [])
    with pytest.raises(UserError, match="expected a str"):
        tok.encode(b"bytes")


@pytest.mark.parametrize("specials", [[], ["|"]])
def test_encode_iterable_of_long_text_without_or_with_one_character_special(specials):
    """Streams longer than the 65,536-character buffer: the cut never reads past the buffer's end."""
    vocab = {i: bytes([i]) for i in range(256)}
    vocab[256] = b"ab"
    tok = Tokenizer(vocab, [(b"a", b"b")], specials)
    text = "ab cd. 12 " * 7000 + "x" * 5  # 70,005 characters
    assert list(tok.encode_iterable(iter([text]))) == tok.encode(text)
    chunks = [text[i : i + 1000] for i in range(0, len(text), 1000)]
    assert list(tok.encode_iterable(chunks)) == tok.encode(text)


def test_saved_files_follow_the_umask(tmp_path):
    import os

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], [EOT])
    old = os.umask(0o027)
    try:
        paths = [tok.save(tmp_path / "tokenizer.json"), *tok.save_gpt2_files(tmp_path)]
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {"0o640"}  # as open() would create them
