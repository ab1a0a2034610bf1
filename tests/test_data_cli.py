"""`lmtrain data stats|show` on a real prepared corpus."""

from __future__ import annotations

import pytest

from lmtrain.cli import main as lmtrain_main
from lmtrain.config import DataConfig
from lmtrain.data import load_tokenizer
from lmtrain.data.cli import pipeline_stats
from lmtrain.data.prepare import main as prepare_main


@pytest.fixture
def corpus(tmp_path):
    src = tmp_path / "c.txt"
    src.write_text("<|endoftext|>".join(f"document {i} " + "word " * (i % 13) for i in range(60)))
    prepare_main(["--source", str(src), "--out", str(tmp_path / "c"), "--val-fraction", "0.1"])
    return tmp_path / "c"


def test_stats_counts_padding_only_in_the_padded_pipeline(corpus, capsys):
    tok = load_tokenizer(str(corpus / "tokenizer"))
    padded = pipeline_stats(
        DataConfig(dataset=str(corpus), sequence_length=128, batch_size=4, pipeline="padded"), tok, 5
    )
    packed = pipeline_stats(DataConfig(dataset=str(corpus), sequence_length=128, batch_size=4), tok, 5)
    assert padded["tokens"] == packed["tokens"] == 5 * 4 * 128
    assert packed["padding"] == 0 and packed["ignored"] > 0  # only the masked BOS labels
    assert padded["padding"] > 0.5 * padded["tokens"]  # documents are 10-75 bytes, samples 128
    code = lmtrain_main(
        ["data", "stats", "--dataset", str(corpus), "--sequence-length", "128", "--batch-size", "4"]
    )
    out = capsys.readouterr().out
    assert code == 0 and "padded" in out and "packed" in out and "0.00%" in out


def test_show_decodes_the_first_tokens(corpus, capsys):
    assert (
        lmtrain_main(
            [
                "data",
                "show",
                "--dataset",
                str(corpus),
                "--split",
                "val",
                "--tokens",
                "12",
                "--sequence-length",
                "64",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "<s>document " in out


def test_missing_dataset_is_a_clean_error(tmp_path, capsys):
    assert lmtrain_main(["data", "show", "--dataset", str(tmp_path / "nope")]) == 2
    assert "nope does not exist" in capsys.readouterr().err
