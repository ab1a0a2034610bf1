"""The main job's pieces on a tiny corpus: unigram entropy, the run, the summary and the sample."""

from __future__ import annotations

import json
import math
import os
import pty
import re
import subprocess
import sys
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


TIMING = re.compile(r"[\d,.]+(e[-+]?\d+)? (ms/step|tok/s|tokens/s|s\)|s$)|MFU [\d.]+%|\(\d+(\.\d+)? s\)")


def run_trainer(corpus: Path, out: Path, tty: bool) -> str:
    """`python -m lmtrain.train` on a tiny model with stdout/stderr a pipe, or a pseudo-terminal."""
    cmd = [
        sys.executable, "-m", "lmtrain.train", "--dataset", str(corpus), "--data.tokenizer", "byte",
        "--model.dim", "32", "--model.n_layers", "1", "--model.n_heads", "2", "--model.n_kv_heads", "1",
        "--sequence-length", "32", "--batch-size", "4", "--training-steps", "8", "--logging.frequency", "2",
        "--training.eval_interval", "4", "--training.eval_batches", "2", "--logging.peak_tflops", "1",
        "--training.output_dir", str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "COLUMNS": "60"}
    if not tty:
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr
    main_fd, child_fd = pty.openpty()
    proc = subprocess.Popen(cmd, stdin=child_fd, stdout=child_fd, stderr=child_fd, env=env)
    os.close(child_fd)
    chunks = []
    while True:
        try:
            chunk = os.read(main_fd, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(main_fd)
    assert proc.wait(timeout=300) == 0, b"".join(chunks).decode(errors="replace")[-2000:]
    return b"".join(chunks).decode(errors="replace")


def log_content(run_dir: Path) -> list[str]:
    """train.log without what differs between two identical runs: timestamps, timings, the run path."""
    lines = []
    for line in (run_dir / "train.log").read_text().splitlines():
        line = line.split(" ", 2)[2]  # drop "2026-01-01 12:00:00,123"
        lines.append(TIMING.sub("T", line.replace(str(run_dir), "RUN")))
    return lines


@pytest.mark.slow
def test_train_log_is_the_same_with_and_without_a_terminal(tmp_path, stdlib_corpus):
    piped = run_trainer(stdlib_corpus, tmp_path / "piped", tty=False)
    on_tty = run_trainer(stdlib_corpus, tmp_path / "tty", tty=True)
    assert "\x1b[" in on_tty and "\x1b[" not in piped  # the terminal got rich's output, the pipe plain lines
    piped_log, tty_log = log_content(tmp_path / "piped"), log_content(tmp_path / "tty")
    assert piped_log == tty_log
    steps = [line for line in piped_log if line.startswith("INFO step ") and "| loss" in line]
    assert [s.split(" | ")[0] for s in steps] == [f"INFO step {n}/8" for n in (2, 4, 6, 8)]
    assert sum("validation loss" in line for line in piped_log) == 2  # step 4 and the end
    # Without a terminal, console lines are never wrapped: each step line is whole on one line.
    printed_steps = [line for line in piped.splitlines() if re.search(r"step \d/8 \| loss", line)]
    assert len(printed_steps) == 4 and all(line.rstrip().endswith("%") for line in printed_steps)


def test_closing_lines_round_say_the_n_and_flag_mfu_above_100():
    from lmtrain.main_job import closing_lines

    summary = {"run_dir": "runs/x", "steps": 10, "exit_reason": "completed", "initial_train_loss": 9.0123456,
               "final_train_loss": 4.708076477050781, "final_train_loss_avg20": 4.81234, "final_train_loss_avg_steps": 10,
               "final_val_loss": 5.1234, "tokens_per_s": 4014.2, "mfu": 1.0282, "peak_tflops": 0.0337,
               "peak_source": "cached CPU peak: X | 2 threads | fp32", "wall_time_s": 95.4}  # fmt: skip
    text = "\n".join(closing_lines(summary, 6.595, 8192, 130.2))
    assert "final train loss     4.812 (mean of the last 10 steps; last step 4.708)" in text
    assert "final val loss       5.123 (1.47 nats below the unigram entropy)" in text
    assert "4.708076" not in text and "above 100%" in text
    assert "training time        95 s; whole job 130 s" in text
