"""`lmtrain prepare --tokenizer bpe:N --bpe-impl lmtrain` trains with lmtrain's BPE and ships a tokenizer
that transformers loads and that encodes like lmtrain's own Tokenizer."""

from __future__ import annotations

import pyarrow.parquet as pq
from transformers import PreTrainedTokenizerFast

from lmtrain.cli import main
from lmtrain.data.tokenizers import BOS, SPECIAL_TOKENS
from lmtrain.tokenizer import Tokenizer, train_bpe


def test_prepare_with_lmtrain_bpe(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(12):
        (src / f"doc{i:02d}.txt").write_text(
            f"Document {i}: the quick brown fox jumps over the lazy dog {i * 7}.\n"
            f"def f{i}(x):\n    return x * {i}  # naïve café 🙂\n" * (i + 2),
            encoding="utf-8",
        )
    out = tmp_path / "out"
    rc = main(
        [
            "prepare",
            "--source",
            str(src),
            "--out",
            str(out),
            "--tokenizer",
            "bpe:300",
            "--bpe-impl",
            "lmtrain",
            "--glob",
            "*.txt",
        ]
    )
    assert rc == 0
    loaded = PreTrainedTokenizerFast.from_pretrained(str(out / "tokenizer"))

    # Train again exactly as prepare does: train documents joined with BOS.
    texts = pq.read_table(out / "train.parquet").column("text").to_pylist()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("".join(t + BOS for t in texts), encoding="utf-8")
    vocab, merges = train_bpe(corpus, 300, SPECIAL_TOKENS)
    ours = Tokenizer(vocab, merges, SPECIAL_TOKENS)
    assert len(loaded) == 300
    for text in texts[:3] + ["Document 99: café 🙂 def g(y):\n    return y"]:
        assert loaded.encode(text, add_special_tokens=False) == ours.encode(text)
        assert loaded.decode(ours.encode(text)) == text
