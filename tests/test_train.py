"""The training loop end to end on a tiny model and corpus: run directory, resume, signals, divergence."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lmtrain import checkpoint as ckpt
from lmtrain.config import load_config, parse_args
from lmtrain.errors import UserError
from lmtrain.train import EXIT_DIVERGED, EXIT_REQUEUE, main, train

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matmuls are fastest on one thread (and do not fight other test processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_args(stdlib_corpus: Path, out: Path, steps: int = 12, *extra: str) -> list[str]:
    return [
        "--dataset", str(stdlib_corpus), "--data.tokenizer", "byte",
        "--model.preset", "tiny", "--model.dim", "32", "--model.n_layers", "1",
        "--model.n_heads", "2", "--model.n_kv_heads", "1", "--model.multiple_of", "32",
        "--sequence-length", "32", "--batch-size", "4", "--training-steps", str(steps),
        "--precision.model_dtype", "fp32", "--learning-rate", "3e-3", "--lr-warmup-steps", "2",
        "--logging.frequency", "1", "--logging.peak_tflops", "1", "--logging.progress", "false",
        "--training.eval_batches", "2", "--checkpoint.interval", "4",
        "--training.output_dir", str(out), *extra,
    ]  # fmt: skip


def run(argv: list[str]) -> dict:
    cfg, _ = parse_args(argv)
    return train(cfg)


@pytest.fixture(scope="module")
def reference(stdlib_corpus, tmp_path_factory) -> Path:
    """An uninterrupted 12-step run."""
    out = tmp_path_factory.mktemp("reference") / "run"
    summary = run(tiny_args(stdlib_corpus, out))
    assert summary["exit_reason"] == "completed"
    return out


def test_run_directory_contents(reference):
    names = {p.name for p in reference.iterdir()}
    assert {
        "config.yaml",
        "metrics.jsonl",
        "train.log",
        "tokenizer",
        "checkpoints",
        "loss.png",
        "summary.json",
    } <= names
    summary = json.loads((reference / "summary.json").read_text())
    assert summary["steps"] == 12 and summary["exit_reason"] == "completed"
    assert summary["final_train_loss"] < summary["initial_train_loss"]
    assert summary["final_val_loss"] is not None and summary["tokens_per_s"] > 0
    # Re-runs unchanged with --config.
    cfg = load_config(reference / "config.yaml")
    assert cfg.training.steps == 12 and cfg.model.dim == 32
    # Logged metrics.
    records = [json.loads(x) for x in (reference / "metrics.jsonl").read_text().splitlines()]
    step_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in step_recs] == list(range(1, 13))
    for key in (
        "lr",
        "grad_norm",
        "step_time",
        "tokens_per_s",
        "positions_per_s",
        "mfu",
        "tflops_per_device",
    ):
        assert key in step_recs[-1]
    assert step_recs[-1]["tokens_per_s"] <= step_recs[-1]["positions_per_s"]  # BOS labels are ignored
    assert any("val_loss" in r for r in records)
    # Checkpoints: every 4 steps and at the end, keep_last 3, loadable with weights_only.
    assert [s for s, _ in ckpt.find_checkpoints(reference)] == [4, 8, 12]
    state = torch.load(reference / "checkpoints" / "step-00000012.pt", weights_only=True)
    assert state["step"] == 12 and state["data"]["batches"] == 12
    assert not any(k.startswith(("_orig_mod", "module")) for k in state["model"])


def test_checkpoint_loads_for_inference(reference):
    from lmtrain.model import Transformer, TransformerModelArgs

    args, sd = ckpt.load_for_inference(reference)
    model = Transformer(TransformerModelArgs(**args))
    model.load_state_dict(sd)
    logits = model(torch.tensor([[1, 2, 3]]))
    assert logits.shape == (1, 3, args["vocab_size"])


@pytest.mark.slow
def test_resume_after_sigkill_reproduces_losses(stdlib_corpus, reference, tmp_path, read_losses):
    """Kill -9 a run after its step-4 checkpoint, resume in place: the losses equal the uninterrupted run's.
    Evaluating every step slows the killed run down (evaluation does not change training)."""
    out = tmp_path / "run"
    argv = tiny_args(stdlib_corpus, out, 12, "--training.eval_interval", "1", "--training.eval_batches", "20")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmtrain.train", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    first = ckpt.checkpoint_path(out, 4)
    deadline = time.time() + 120
    while not first.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert first.exists(), proc.stderr.read().decode()[-2000:]
    assert not (out / "summary.json").exists(), "the run finished before it was killed"
    killed_at = max(read_losses(out))
    assert 4 <= killed_at < 12
    summary = run(tiny_args(stdlib_corpus, out, 12, "--checkpoint.resume", "auto"))
    assert summary["resumed_from"] in (4, 8) and summary["steps"] == 12
    assert read_losses(out) == read_losses(reference)  # exact equality, step by step


@pytest.mark.slow
def test_signal_saves_and_exits_for_requeue(stdlib_corpus, reference, tmp_path, read_losses):
    out = tmp_path / "run"
    argv = tiny_args(stdlib_corpus, out, 12, "--training.eval_interval", "1", "--training.eval_batches", "20",
                     "--checkpoint.interval", "0")  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "lmtrain.train", *argv], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 120
    while (
        (not metrics.exists() or not metrics.read_text()) and proc.poll() is None and time.time() < deadline
    ):
        time.sleep(0.01)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err.decode()[-2000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_reason"] == "signal" and summary["steps"] < 12
    assert [s for s, _ in ckpt.find_checkpoints(out)] == [summary["steps"]]
    resumed = run(
        tiny_args(stdlib_corpus, out, 12, "--checkpoint.resume", "auto", "--checkpoint.interval", "0")
    )
    assert resumed["resumed_from"] == summary["steps"] and resumed["exit_reason"] == "completed"
    assert read_losses(out) == read_losses(reference)


def test_non_finite_loss_stops_after_max_bad_steps(stdlib_corpus, tmp_path, read_losses):
    out = tmp_path / "run"
    argv = tiny_args(stdlib_corpus, out, 30, "--learning-rate", "1e25", "--grad-max-norm", "0",
                     "--lr-warmup-steps", "0", "--training.max_bad_steps", "3",
                     "--checkpoint.interval", "1")  # fmt: skip
    assert main(argv) == EXIT_DIVERGED
    summary = json.loads((out / "summary.json").read_text())
    assert summary["exit_reason"] == "diverged" and summary["steps"] < 30
    recorded = read_losses(out)
    bad = [s for s, v in recorded.items() if isinstance(v, str)]  # NaN/inf are logged as strings
    assert bad[-3:] == [summary["steps"] - 2, summary["steps"] - 1, summary["steps"]]
    saved = [s for s, _ in ckpt.find_checkpoints(out)]
    assert saved and max(saved) < bad[0]  # only good steps were checkpointed; the last good one is kept


def test_fp16_autocast_with_dynamic_scaler(stdlib_corpus, tmp_path):
    out = tmp_path / "run"
    argv = tiny_args(stdlib_corpus, out, 4, "--precision.amp", "fp16", "--precision.growth_interval", "2",
                     "--precision.init_scale", "8")  # fmt: skip
    summary = run(argv)
    assert summary["exit_reason"] == "completed"
    scales = [json.loads(x).get("loss_scale") for x in (out / "metrics.jsonl").read_text().splitlines()]
    scales = [s for s in scales if s is not None]
    assert scales == [8.0, 16.0, 16.0, 32.0]  # doubled after every 2 clean steps (logged after update)
    state = torch.load(ckpt.checkpoint_path(out, 4), weights_only=True)
    assert state["scaler"]["kind"] == "DynamicLossScaler"
    assert all(v.dtype == torch.float32 for v in state["model"].values())  # fp32 master weights


def test_bf16_model_dtype_keeps_bf16_states(stdlib_corpus, tmp_path):
    out = tmp_path / "run"
    run(tiny_args(stdlib_corpus, out, 4, "--precision.model_dtype", "bf16"))
    state = torch.load(ckpt.checkpoint_path(out, 4), weights_only=True)
    assert all(v.dtype == torch.bfloat16 for v in state["model"].values())
    moments = [s["exp_avg"] for s in state["optimizer"]["state"].values()]
    assert moments and all(m.dtype == torch.bfloat16 for m in moments)


@pytest.mark.slow
def test_compiled_training_matches_eager_and_saves_plain_keys(stdlib_corpus, tmp_path, read_losses):
    """--compile: torch.compile(fullgraph=True) inside the real loop (inductor on CPU); the same losses as
    the same run in eager mode, and checkpoints without the `_orig_mod.` prefix, so eager runs load them."""
    eager_dir, compiled_dir = tmp_path / "eager", tmp_path / "compiled"
    from torch._dynamo.utils import counters

    run(tiny_args(stdlib_corpus, eager_dir, 4))
    counters.clear()
    summary = run(tiny_args(stdlib_corpus, compiled_dir, 4, "--compile"))
    assert summary["exit_reason"] == "completed"
    assert counters["stats"]["unique_graphs"] >= 1, "the model went through dynamo"
    assert not counters["graph_break"], f"fullgraph: no graph breaks, got {dict(counters['graph_break'])}"
    compiled, eager = read_losses(compiled_dir), read_losses(eager_dir)
    assert sorted(compiled) == sorted(eager) == [1, 2, 3, 4]
    for step, loss in compiled.items():
        assert loss == pytest.approx(eager[step], rel=2e-3), f"step {step}"
    state = torch.load(ckpt.checkpoint_path(compiled_dir, 4), weights_only=True)
    eager_keys = torch.load(ckpt.checkpoint_path(eager_dir, 4), weights_only=True)["model"].keys()
    assert set(state["model"]) == set(eager_keys)
    assert not any(k.startswith(("_orig_mod.", "module.")) for k in state["model"])


def test_grad_accumulation_equals_one_big_batch():
    from lmtrain.hooks import StepHooks
    from lmtrain.model import Transformer, TransformerModelArgs
    from lmtrain.precision import LossScaler
    from lmtrain.train import train_step

    args = TransformerModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=50, multiple_of=16,
                                ffn_dim_multiplier=None, seq_len=9)  # fmt: skip
    torch.manual_seed(0)
    model_a, model_b = Transformer(args), Transformer(args)
    model_b.load_state_dict(model_a.state_dict())
    tokens = torch.randint(0, 50, (4, 9))
    labels = torch.randint(0, 50, (4, 9))
    labels[0, :5] = -100  # uneven numbers of ignored labels per micro-batch
    big = [{"input_ids": tokens, "labels": labels}]
    small = [{"input_ids": tokens[:2], "labels": labels[:2]}, {"input_ids": tokens[2:], "labels": labels[2:]}]
    results = []
    for model, batches in ((model_a, big), (model_b, small)):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        results.append(
            train_step(model, opt, LossScaler(), batches, device=torch.device("cpu"),
                       amp=lambda: torch.autocast("cpu", enabled=False), max_norm=1.0, hooks=StepHooks())
        )  # fmt: skip
    assert results[0].loss == pytest.approx(results[1].loss, rel=1e-6)
    assert results[0].tokens == results[1].tokens == 36 - 5
    for pa_, pb in zip(model_a.parameters(), model_b.parameters()):
        torch.testing.assert_close(pa_, pb)


def test_unknown_signal_is_a_user_error(stdlib_corpus, tmp_path):
    with pytest.raises(UserError, match="checkpoint.signals"):
        run(tiny_args(stdlib_corpus, tmp_path / "run", 2, "--checkpoint.signals", "SIGNOPE"))


def test_missing_resume_path_is_a_user_error(stdlib_corpus, tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        run(tiny_args(stdlib_corpus, tmp_path / "run", 2, "--checkpoint.resume", str(tmp_path / "none.pt")))


def test_resume_with_another_model_is_a_user_error(stdlib_corpus, reference, tmp_path):
    path = ckpt.checkpoint_path(reference, 12)
    with pytest.raises(UserError, match="written for model"):
        run(
            tiny_args(
                stdlib_corpus, tmp_path / "run", 2, "--model.dim", "64", "--checkpoint.resume", str(path)
            )
        )


def test_checkpoint_from_before_the_later_model_switches_resumes(stdlib_corpus, reference, tmp_path):
    """A checkpoint whose model_args predate norm_position, parallel_block, dropout and d_ff resumes:
    the missing fields take their defaults, which are the architecture it was trained with."""
    state = ckpt.load_checkpoint(ckpt.checkpoint_path(reference, 8))
    for key in ("norm_position", "parallel_block", "dropout", "d_ff"):
        del state["model_args"][key]
    old = tmp_path / "old.pt"
    ckpt.atomic_torch_save(state, old)
    summary = run(tiny_args(stdlib_corpus, tmp_path / "run", 10, "--checkpoint.resume", str(old)))
    assert summary["resumed_from"] == 8 and summary["exit_reason"] == "completed"


def test_cuda_device_without_cuda_is_a_user_error(stdlib_corpus, tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present")
    with pytest.raises(UserError, match="CUDA is not available"):
        run(tiny_args(stdlib_corpus, tmp_path / "run", 2, "--training.device", "cuda"))


def test_module_runs_as_a_script():
    out = subprocess.run(
        [sys.executable, "-m", "lmtrain.train", "--help"], cwd=REPO, capture_output=True, text=True
    )
    assert out.returncode == 0 and "--checkpoint.resume" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "lmtrain.train", "--training-steps", "zero"], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "training.steps" in bad.stderr
