"""The main job's pieces on a tiny corpus: unigram entropy, the run, the summary and the sample."""

from __future__ import annotations

import json
import math
import sysconfig
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from lmtrain.data import load_tokenizer
from lmtrain.errors import UserError
from lmtrain.main_job import CONFIG, main, unigram_entropy


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_unigram_entropy_of_a_known_distribution(tmp_path):
    (tmp_path / "c").mkdir()
    pq.write_table(pa.table({"text": ["abab" * 50, "ab" * 100]}), tmp_path / "c" / "train.parquet")
    entropy, n = unigram_entropy(str(tmp_path / "c"), load_tokenizer("byte"))
    assert n == 400
    assert entropy == pytest.approx(math.log(2))


def test_config_is_the_documented_main_job():
    from lmtrain.config import load_config

    cfg = load_config(CONFIG)
    assert (cfg.model.preset, cfg.data.dataset, cfg.data.pipeline) == ("tiny", "data/stdlib", "packed")
    assert (cfg.precision.model_dtype, cfg.schedule.name, cfg.data.sequence_length) == ("fp32", "cosine", 256)


def test_main_job_end_to_end_on_a_small_corpus(tmp_path, capsys, one_thread):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:30]
    texts = [f.read_text(errors="replace")[:4000] for f in files]
    pq.write_table(pa.table({"text": texts[:26]}), corpus / "train.parquet")
    pq.write_table(pa.table({"text": texts[26:]}), corpus / "val.parquet")
    out = tmp_path / "run"
    code = main([
        "--dataset", str(corpus), "--data.tokenizer", "byte", "--model.dim", "64", "--model.n_layers", "1",
        "--model.n_heads", "2", "--model.n_kv_heads", "1", "--sequence-length", "64", "--batch-size", "8",
        "--training-steps", "12", "--learning-rate", "1e-2", "--training.eval_interval", "0", "--logging.peak_tflops", "1",
        "--logging.progress", "false", "--training.output_dir", str(out), "--data.interleave", "4",
    ])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert "unigram entropy" in printed and "sample (top-k 40" in printed
    assert summary["unigram_entropy"] < summary["initial_train_loss"]  # a fresh model is near uniform
    assert summary["final_train_loss"] < summary["initial_train_loss"]
    assert summary["final_train_loss_avg20"] < summary["initial_train_loss"]
    assert summary["final_train_loss_avg_steps"] == 12
    assert "mean of the last 12 steps" in printed  # the N it used, not the 20 it would use
    assert f"final val loss       {summary['final_val_loss']:.3f}" in printed
    assert "nats below the unigram entropy" in printed and "whole job" in printed
    assert f"unigram entropy      {summary['unigram_entropy']:.3f}" in printed
    assert summary["final_val_loss"] is not None


def test_missing_dataset_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        main(["--dataset", str(tmp_path / "nope"), "--data.tokenizer", "byte", "--training-steps", "1"])
