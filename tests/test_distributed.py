"""Process environment (torchrun, Slurm), and real 2-process gloo runs: DDP equals one process with the
same global batch; FSDP2 trains, checkpoints in the single-process format and resumes exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from lmtrain import checkpoint as ckpt
from lmtrain.distributed import DistEnv, detect_env, expand_nodelist, resolve_device
from lmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ------------------------------------------------------------------------------------ environment


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("nid001234", ["nid001234"]),
        ("nid[001-003,007]", ["nid001", "nid002", "nid003", "nid007"]),
        ("nid[0098-0101],login1", ["nid0098", "nid0099", "nid0100", "nid0101", "login1"]),
        ("a[1,3],b[10-11]", ["a1", "a3", "b10", "b11"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_torchrun_variables():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "host0", "MASTER_PORT": "1234"}
    assert detect_env(env) == DistEnv(3, 8, 1, "host0", 1234)


def test_slurm_variables(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")  # no scontrol: the built-in parser expands the list
    env = {
        "SLURM_PROCID": "5",
        "SLURM_NTASKS": "8",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "nid[005-006]",
        "SLURM_JOB_ID": "123456",
    }
    got = detect_env(env)
    assert (got.rank, got.world_size, got.local_rank, got.master_addr) == (5, 8, 1, "nid005")
    assert got.master_port == 29500 + 123456 % 10000
    assert detect_env({**env, "MASTER_PORT": "4000", "MASTER_ADDR": "x"}).master_port == 4000


def test_single_process_defaults():
    assert detect_env({}) == DistEnv()
    assert detect_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}) == DistEnv()  # one task: no group


def test_bad_variable_is_a_user_error():
    with pytest.raises(UserError, match="SLURM_PROCID"):
        detect_env({"SLURM_PROCID": "x", "SLURM_NTASKS": "2"})


def test_bad_device_is_a_user_error():
    with pytest.raises(UserError, match="training.device"):
        resolve_device("tpu", DistEnv())
    assert resolve_device("cpu", DistEnv()) == torch.device("cpu")


# ------------------------------------------------------------------- DDP step equals one process


def _model() -> torch.nn.Module:
    """A one-layer Transformer: the loss (fused head + cross-entropy) runs inside the wrapped forward."""
    from lmtrain.model import Transformer, TransformerModelArgs

    torch.manual_seed(0)
    return Transformer(TransformerModelArgs(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=40,
                                            multiple_of=16, ffn_dim_multiplier=None, seq_len=8))  # fmt: skip


def _batches():
    g = torch.Generator().manual_seed(1)
    out = []
    for _ in range(3):
        tokens = torch.randint(0, 40, (4, 8), generator=g)
        labels = torch.randint(0, 40, (4, 8), generator=g)
        labels[0, :6] = -100  # ranks see different numbers of counted tokens
        out.append((tokens, labels))
    return out


def _steps(model, batches, rank: int | None, world: int):
    from lmtrain.config import OptimizerConfig
    from lmtrain.hooks import StepHooks
    from lmtrain.optim import build_optimizer
    from lmtrain.precision import LossScaler
    from lmtrain.train import train_step

    opt = build_optimizer(model, OptimizerConfig(lr=1e-2), "cpu")
    losses = []
    for tokens, labels in batches:
        if rank is not None:
            per = tokens.shape[0] // world
            tokens, labels = tokens[rank * per : (rank + 1) * per], labels[rank * per : (rank + 1) * per]
        result = train_step(
            model, opt, LossScaler(), [{"input_ids": tokens, "labels": labels}], device=torch.device("cpu"),
            amp=lambda: torch.autocast("cpu", enabled=False), max_norm=1.0, hooks=StepHooks(),
        )  # fmt: skip
        losses.append(result.loss)
    return losses


def _dp_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    from lmtrain.config import DistributedConfig
    from lmtrain.distributed import init_distributed, wrap_model

    torch.set_num_threads(1)
    env = DistEnv(rank, world, rank, "127.0.0.1", port)
    init_distributed(DistributedConfig(), torch.device("cpu"), env)
    results = {}
    for strategy in ("ddp", "fsdp"):
        model = wrap_model(_model(), DistributedConfig(strategy=strategy), env, torch.device("cpu"))
        results[strategy] = _steps(model, _batches(), rank, world)
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        results[f"{strategy}_params"] = {k: v.clone() for k, v in ckpt.clean_keys(full).items()}
    if rank == 0:
        torch.save(results, out)
    dist.barrier()  # no rank tears gloo down while another still talks to it (that aborts the process)
    dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_and_fsdp_match_one_process_with_the_same_global_batch(tmp_path):
    out = tmp_path / "dp.pt"
    mp.spawn(_dp_worker, args=(2, free_port(), str(out)), nprocs=2, join=True)
    got = torch.load(out, weights_only=True)
    model = _model()
    single = _steps(model, _batches(), None, 1)
    reference = model.state_dict()
    for strategy in ("ddp", "fsdp"):
        assert got[strategy] == pytest.approx(single, rel=1e-5), strategy
        assert got[f"{strategy}_params"].keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(got[f"{strategy}_params"][key], value, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------ end-to-end 2-process runs


def launch(stdlib_corpus: Path, out: Path, strategy: str, *extra: str, slurm: bool = False) -> None:
    """Two real processes on one host: torchrun-style variables, or Slurm's as `srun` sets them."""
    argv = [
        "--dataset", str(stdlib_corpus), "--data.tokenizer", "byte",
        "--model.preset", "tiny", "--model.dim", "32", "--model.n_layers", "2", "--model.n_heads", "2",
        "--model.n_kv_heads", "1", "--model.multiple_of", "32",
        "--sequence-length", "32", "--batch-size", "2", "--training-steps", "6",
        "--precision.model_dtype", "fp32", "--learning-rate", "3e-3", "--lr-warmup-steps", "2",
        "--logging.frequency", "1", "--logging.peak_tflops", "1", "--logging.progress", "false",
        "--training.eval_batches", "2", "--checkpoint.interval", "3",
        "--distributed.strategy", strategy, "--training.output_dir", str(out), *extra,
    ]  # fmt: skip
    port = str(free_port())
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE"))}
        env["OMP_NUM_THREADS"] = "1"
        if slurm:
            env.update(SLURM_PROCID=str(rank), SLURM_NTASKS="2", SLURM_LOCALID=str(rank),
                       SLURM_JOB_NODELIST="localhost", MASTER_PORT=port)  # fmt: skip
        else:
            env.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=port)  # fmt: skip
        procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "lmtrain.train", *argv],
                cwd=REPO,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )  # fmt: skip
        )
    for rank, p in enumerate(procs):
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, f"rank {rank}: {err.decode()[-3000:]}"


@pytest.mark.slow
def test_fsdp_run_under_slurm_variables_checkpoints_and_resumes(stdlib_corpus, tmp_path, read_losses):
    """`srun`-style launch of the real entry point with FSDP2; the checkpoint is the single-process
    format; resuming from its step-3 checkpoint in a fresh directory repeats steps 4-6 exactly."""
    fsdp, resumed = tmp_path / "fsdp", tmp_path / "resumed"
    launch(stdlib_corpus, fsdp, "fsdp", slurm=True)
    fsdp_losses = read_losses(fsdp)
    assert sorted(fsdp_losses) == list(range(1, 7))
    summary = json.loads((fsdp / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["final_train_loss"] < summary["initial_train_loss"]
    state = torch.load(ckpt.checkpoint_path(fsdp, 6), weights_only=True)
    from lmtrain.model import Transformer, TransformerModelArgs

    model = Transformer(TransformerModelArgs(**state["model_args"]))
    assert state["model"].keys() == model.state_dict().keys()
    model.load_state_dict(state["model"])  # full tensors, not DTensor shards
    assert all(type(v) is torch.Tensor for v in state["model"].values())
    assert state["optimizer"]["state"].keys() == state["model"].keys()
    assert len(state["data_ranks"]) == 2
    launch(stdlib_corpus, resumed, "fsdp", "--checkpoint.resume", str(ckpt.checkpoint_path(fsdp, 3)))
    again = read_losses(resumed)
    assert sorted(again) == [4, 5, 6]
    for step in again:
        assert again[step] == pytest.approx(fsdp_losses[step], rel=1e-6)
