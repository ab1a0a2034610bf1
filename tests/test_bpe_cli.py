"""`lmtrain tokenizer train|encode|decode` through the real entry point."""

from __future__ import annotations

import subprocess
import sys

import pytest
import tokenizers

from lmtrain.cli import main
from lmtrain.tokenizer import Tokenizer

TEXT = "def add(x, y):\n    return x + y\n<|endoftext|>class Point:\n    x: int = 0\n" * 40


@pytest.fixture
def trained_dir(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--input", str(corpus), "--vocab-size", "280", "--out", str(out)]) == 0
    return out


def test_train_writes_all_formats(trained_dir, capsys):
    assert {p.name for p in trained_dir.iterdir()} == {"tokenizer.json", "vocab.json", "merges.txt"}
    tok = Tokenizer.load(trained_dir)
    assert tok.special_ids == {"<|endoftext|>": 0} and max(tok.vocab) == 279
    hf = tokenizers.Tokenizer.from_file(str(trained_dir / "tokenizer.json"))
    assert hf.encode(TEXT).ids == tok.encode(TEXT)


def test_encode_decode(trained_dir, capsys, tmp_path):
    text = "def add(x, y):<|endoftext|>"
    assert main(["tokenizer", "encode", "--tokenizer", str(trained_dir), "--text", text]) == 0
    out = capsys.readouterr().out.strip()
    ids = [int(i) for i in out.split(",")]
    assert ids == Tokenizer.load(trained_dir).encode(text) and ids[-1] == 0
    assert main(["tokenizer", "decode", "--tokenizer", str(trained_dir), "--ids", out]) == 0
    assert capsys.readouterr().out == text + "\n"
    f = tmp_path / "in.txt"
    f.write_text(TEXT, encoding="utf-8")
    assert (
        main(["tokenizer", "encode", "--tokenizer", str(trained_dir / "tokenizer.json"), "--file", str(f)])
        == 0
    )
    assert capsys.readouterr().out.strip() == ",".join(map(str, Tokenizer.load(trained_dir).encode(TEXT)))


def test_console_script(trained_dir):
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "lmtrain",
            "tokenizer",
            "encode",
            "--tokenizer",
            str(trained_dir),
            "--text",
            "x",
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0 and run.stdout.strip().isdigit()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["decode", "--tokenizer", "{dir}", "--ids", "1,x,3"], "item 1 is 'x'"),
        (["decode", "--tokenizer", "{dir}", "--ids", "99999"], "id 99999 is not in the vocabulary"),
        (["encode", "--tokenizer", "{tmp}/nope", "--text", "x"], "no such file"),
        (["encode", "--tokenizer", "{dir}", "--file", "{tmp}/nope.txt"], "no such file"),
        (["train", "--input", "{tmp}/corpus.txt", "--vocab-size", "100", "--out", "{tmp}/o"], "too small"),
        (["train", "--input", "{tmp}/corpus.txt", "--vocab-size", "x", "--out", "{tmp}/o"], "invalid int"),
        (
            [
                "train",
                "--input",
                "{tmp}/corpus.txt",
                "--vocab-size",
                "300",
                "--out",
                "{tmp}/o",
                "--special-token",
                "",
            ],
            "is empty",
        ),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments(trained_dir, tmp_path, capsys, args, message):
    args = [a.format(dir=trained_dir, tmp=tmp_path) for a in args]
    assert main(["tokenizer", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err
