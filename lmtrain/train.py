"""The training loop: one flat step (forward, backward, clip, optimizer), checkpoints, metrics, eval.

    python -m lmtrain.train --config lmtrain/configs/tiny-cpu.yaml --training.steps 50

Also `lmtrain train ...` and, one process per GPU, `srun python -m lmtrain.train ...` or `torchrun`.
`_train` is the table of contents of a run: set_up, restore, write_run_files, start_metrics,
train_steps (the step loop), finish, write_summary; the step itself is `train_step`.
Exit codes: 0 finished, EXIT_REQUEUE (85) saved on a signal and stopped so that the launcher can requeue
(resume with `--checkpoint.resume auto --training.output_dir SAME`), EXIT_DIVERGED (3) stopped after
`training.max_bad_steps` consecutive non-finite steps (the last good checkpoint is kept).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from lmtrain import checkpoint as ckpt
from lmtrain.atomic import atomic_write_text
from lmtrain.config import TrainConfig, config_to_dict, parse_args, save_config
from lmtrain.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    detect_env,
    init_distributed,
    load_full_optimizer_state,
    resolve_device,
    wrap_model,
)
from lmtrain.errors import UserError
from lmtrain.hooks import StepHooks
from lmtrain.log import (
    Ticker,
    done_line,
    init_logging,
    logger,
    make_metric_logger,
    step_line,
    tail_mean,
    val_line,
)
from lmtrain.losses import DEFAULT_CHUNK, IGNORE_INDEX
from lmtrain.metrics import StepTimer, Throughput, mfu, peak_memory_gib, resolve_peak, write_loss_plot
from lmtrain.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from lmtrain.precision import LossScaler, autocast, build_loss_scaler, compute_dtype, torch_dtype
from lmtrain.runlock import DirectoryLock

EXIT_OK = 0
EXIT_REQUEUE = 85
EXIT_DIVERGED = 3


# ------------------------------------------------------------------------------------------- setup


def resolve_run_dir(cfg: TrainConfig, env: DistEnv) -> Path:
    """`training.output_dir`, else `<run_dir>/<name>-<timestamp>` (rank 0's clock, shared by all ranks)."""
    if cfg.training.output_dir:
        return Path(cfg.training.output_dir)
    stamp = broadcast_object(time.strftime("%Y%m%d-%H%M%S") if env.is_main else None)
    return Path(cfg.training.run_dir) / f"{cfg.training.name}-{stamp}"


RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "loss.png", "train.log", "tokenizer")


def previous_run(run_dir: Path) -> list[str]:
    """What of an earlier run `run_dir` holds (its files and checkpoints); empty for a new directory."""
    if not run_dir.is_dir():
        return []
    held = [name for name in RUN_FILES[:3] if (run_dir / name).exists()]
    steps = [s for s, _ in ckpt.find_checkpoints(run_dir)]
    if steps:
        held.append(f"{len(steps)} checkpoint(s) up to step {steps[-1]}")
    return held


def check_run_dir(run_dir: Path, cfg: TrainConfig) -> None:
    """Refuse an output_dir that is a file, and a new run into a directory that holds another run: its
    checkpoints would be mixed with the new ones and its metrics interleaved."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"training.output_dir {run_dir} is a file, not a directory: choose a directory path")
    held = previous_run(run_dir)
    if held and cfg.checkpoint.resume == "none" and not cfg.training.overwrite_output_dir:
        raise UserError(
            f"training.output_dir {run_dir} already holds a run ({', '.join(held)}): continue it with "
            "--checkpoint.resume auto, start it over with --training.overwrite_output_dir true (deletes "
            "its checkpoints, metrics and summary), or choose another output_dir"
        )


def clear_previous_run(run_dir: Path) -> None:
    """--training.overwrite_output_dir: remove what an earlier run wrote (call while holding the lock)."""
    import shutil

    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    for _, path in ckpt.find_checkpoints(run_dir):
        path.unlink()


def trim_metrics(path: Path, step: int) -> dict[str, Any]:
    """On resume from `step`: drop the records logged after it (a killed run logs steps past its last
    checkpoint, which the resumed run logs again) and lines cut short by a kill. Returns the metrics
    already logged at `step`, which the resumed run must not log twice."""
    if not path.is_file():
        return {}
    kept, at_step = [], {}
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
            if record.get("step") == step:
                at_step.update(record)
    atomic_write_text(path, "".join(kept))
    return at_step


def check_batch_shape(path: Path, state: dict, cfg: TrainConfig) -> None:
    """Resuming with another batch shape changes tokens per step and the data order from the saved
    step on; it needs --checkpoint.allow_batch_change."""
    saved = state.get("config") or {}
    keys = (("data", "batch_size"), ("data", "sequence_length"), ("training", "grad_accumulation_steps"))
    before = [saved.get(section, {}).get(key) for section, key in keys]
    now = [getattr(getattr(cfg, section), key) for section, key in keys]
    if None in before or before == now or cfg.checkpoint.allow_batch_change:
        return
    names = ", ".join(f"{section}.{key}" for section, key in keys)
    raise UserError(
        f"{path} (step {state['step']}) was written with {names} = {before} ({math.prod(before)} tokens per "
        f"step and process), this run has {now} ({math.prod(now)}): from here on every step would see another "
        "number of tokens and the data would continue in another order than the interrupted run's. Resume "
        "with the checkpoint's values (the run's config.yaml), or pass --checkpoint.allow_batch_change true"
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def parse_signals(spec: str) -> list[signal.Signals]:
    out = []
    for name in (s.strip() for s in spec.split(",")):
        if not name:
            continue
        try:
            out.append(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
        except KeyError:
            raise UserError(
                f"checkpoint.signals: unknown signal {name!r}; use names such as SIGUSR1,SIGUSR2,SIGTERM"
            ) from None
    return out


class StopRequest:
    """Signal handlers only set a flag; the loop saves and exits at the next step boundary."""

    def __init__(self, signals: list[signal.Signals]):
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum)

    def any_rank(self) -> bool:
        """True on every rank when any rank got a signal (Slurm may signal only some tasks)."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0])
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _build_step_hooks(cfg: TrainConfig, run_dir: Path, device: torch.device) -> StepHooks:
    from lmtrain.profiler import build_step_hooks

    return build_step_hooks(cfg.profiling, run_dir, device)


# -------------------------------------------------------------------------------------- the step


def no_grad_sync(model: nn.Module, enabled: bool):
    """Skip the gradient all-reduce/reduce-scatter on accumulation micro-batches but the last."""
    if not enabled:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):  # DDP
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2

        @contextlib.contextmanager
        def _fsdp():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)

        return _fsdp()
    return contextlib.nullcontext()


def loss_sum(model: nn.Module, batch: dict, device: torch.device, amp, loss_chunk: int) -> torch.Tensor:
    """Sum of next-token cross-entropy over the non-ignored labels of one micro-batch (fp32).

    The model computes it in its forward (`labels=`), fusing the output projection with the loss in
    chunks of `loss_chunk` tokens (0: plain logits, then F.cross_entropy); see lmtrain.losses.
    """
    tokens = batch["input_ids"].to(device, non_blocking=True)
    labels = batch["labels"].to(device, non_blocking=True)
    doc_ids = batch.get("doc_ids")
    if doc_ids is not None:
        doc_ids = doc_ids.to(device, non_blocking=True)
    with amp():
        return model(tokens, doc_ids, labels=labels, loss_chunk=loss_chunk)


@dataclasses.dataclass
class StepResult:
    loss: float  # mean over the non-ignored tokens of the global batch
    grad_norm: float
    tokens: int  # non-ignored label positions, all ranks
    positions: int  # all positions, all ranks
    skipped: bool  # optimizer step not taken (inf/NaN)
    finite_loss: bool


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: LossScaler,
    micro_batches: list[dict],
    *,
    device: torch.device,
    amp,
    max_norm: float,
    hooks: StepHooks,
    loss_chunk: int = DEFAULT_CHUNK,
) -> StepResult:
    """One optimizer step over `micro_batches` (gradient accumulation), loss normalised by the number
    of non-ignored tokens of the whole global batch, so that N processes with batch B/N give the same
    update as one process with batch B."""
    params = [p for p in model.parameters() if p.requires_grad]
    local_tokens = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in micro_batches)
    local_positions = sum(b["labels"].numel() for b in micro_batches)
    counts = all_reduce_sum(torch.tensor([local_tokens, local_positions], dtype=torch.float64))
    global_tokens, global_positions = int(counts[0]), int(counts[1])
    world = dist.get_world_size() if dist.is_initialized() else 1
    # DDP/FSDP average gradients over ranks; multiplying by world turns that average into a global sum.
    norm = world / max(global_tokens, 1)

    total = torch.zeros((), device=device)
    for i, batch in enumerate(micro_batches):
        with no_grad_sync(model, i < len(micro_batches) - 1):
            with hooks.forward():
                loss = loss_sum(model, batch, device, amp, loss_chunk)
            with hooks.backward():
                scaler.scale_loss(loss * norm).backward()
        total += loss.detach()

    with hooks.optimizer():
        loss_value = float(all_reduce_sum(total.float().cpu()) / max(global_tokens, 1))
        finite_loss = math.isfinite(loss_value)
        found_inf = scaler.unscale_(params)
        grad_norm, finite_norm = clip_grad_norm(params, max_norm if not found_inf else 0.0)
        skipped = found_inf or not finite_norm or not finite_loss
        if not skipped:
            optimizer.step()
        scaler.update(found_inf or not finite_norm)
        optimizer.zero_grad(set_to_none=True)
    return StepResult(loss_value, grad_norm, global_tokens, global_positions, skipped, finite_loss)


@torch.no_grad()
def evaluate(
    model: nn.Module, loader, max_batches: int, device: torch.device, amp, loss_chunk: int = DEFAULT_CHUNK
) -> float | None:
    """Mean loss over the non-ignored tokens of the first `max_batches` validation batches (all ranks)."""
    if loader is None:
        return None
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64)
    ticker = Ticker()  # a pass over a large split takes long enough to look like a hang without a line
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        total[0] += float(loss_sum(model, batch, device, amp, loss_chunk))
        total[1] += int((batch["labels"] != IGNORE_INDEX).sum())
        if ticker.due():
            logger.info("validation: %d batches in %.0f s", i + 1, ticker.elapsed())
    model.train(was_training)
    total = all_reduce_sum(total)
    return float(total[0] / total[1]) if total[1] > 0 else None


# ------------------------------------------------------------------------------------ checkpoints


def gather_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    step: int,
    model_args: dict,
    scaler: LossScaler,
    loader,
    cfg: TrainConfig,
    total_steps: int,
) -> dict | None:
    """Full (unsharded) training state; a collective under FSDP, so every rank calls it. None off rank 0."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(model, options=opts)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=opts)
    data_state = loader.state_dict() if hasattr(loader, "state_dict") else None
    data_ranks = None
    if dist.is_initialized():
        data_ranks = [None] * dist.get_world_size()
        dist.all_gather_object(data_ranks, data_state)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    optim_sd = {
        "state": ckpt.clean_keys(optim_sd["state"]),
        "param_groups": [
            {**g, "params": [ckpt.strip_prefixes(p) for p in g["params"]]} for g in optim_sd["param_groups"]
        ],
    }
    return {
        "model": ckpt.clean_keys(model_sd),
        "model_args": model_args,
        "optimizer": optim_sd,
        "scheduler": {"name": cfg.schedule.name, "step": step, "total_steps": total_steps},
        "scaler": scaler.state_dict(),
        "rng": ckpt.capture_rng_state(),
        "data": data_state,
        "data_ranks": data_ranks,
        "step": step,
        "config": config_to_dict(cfg),
    }


def restore_state(model: nn.Module, optimizer, scaler: LossScaler, loader, state: dict, env: DistEnv) -> int:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(model, state["model"], options=StateDictOptions(full_state_dict=True))
    load_full_optimizer_state(model, optimizer, state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    ckpt.restore_rng_state(state["rng"])
    data_state = state.get("data")
    if env.distributed and state.get("data_ranks") and len(state["data_ranks"]) == env.world_size:
        data_state = state["data_ranks"][env.rank]
    if data_state is not None and hasattr(loader, "load_state_dict"):
        loader.load_state_dict(data_state)
    return int(state["step"])


# -------------------------------------------------------------------------------------- the run


def _progress(cfg: TrainConfig, env: DistEnv, start: int, total: int):
    if not (cfg.logging.progress and env.is_main and sys.stderr.isatty()):
        return None
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(
        TextColumn("step {task.completed}/{task.total}"),
        BarColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        transient=True,
    )
    progress.start()
    progress.add_task("train", total=total, completed=start, info="")
    return progress


def train(cfg: TrainConfig, hooks: StepHooks | None = None) -> dict:
    """Run (or resume) a training job; returns the summary also written to `summary.json`.
    `hooks` replaces the ones `profiling.build_step_hooks` derives from cfg.profiling."""
    # Handlers first: a signal during the start-up (minutes for a large model) still ends in a checkpoint
    # and exit 85; they stay until the summary is written.
    stop = StopRequest(parse_signals(cfg.checkpoint.signals))
    try:
        env = detect_env()
        device = resolve_device(cfg.training.device, env)
        init_distributed(cfg.distributed, device, env)
        try:
            summary = _train(cfg, env, device, hooks, stop)
        except BaseException:
            cleanup()  # no barrier: the other ranks may be stuck in a collective or gone
            raise
        cleanup(synchronize=True)
    finally:
        stop.restore()
    return summary


def on_main(env: DistEnv, fn):
    """fn() on rank 0; its UserError is raised on every rank instead of leaving them in a collective."""
    result, error = None, None
    if env.is_main:
        try:
            result = fn()
        except UserError as exc:
            error = str(exc)
    error = broadcast_object(error)
    if error is not None:
        raise UserError(error)
    return result


def open_run_dir(run_dir: Path, cfg: TrainConfig) -> tuple[DirectoryLock, bool]:
    """Check, create and lock the run directory (rank 0). Returns the lock and whether it was created."""
    check_run_dir(run_dir, cfg)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # permissions, a read-only file system, a file in the way
        raise UserError(f"training.output_dir {run_dir}: cannot create it ({exc.strerror})") from exc
    lock = DirectoryLock(run_dir / ".lock", f"run directory {run_dir}").acquire()
    if cfg.training.overwrite_output_dir and cfg.checkpoint.resume == "none":
        clear_previous_run(run_dir)
    return lock, created


def _train(
    cfg: TrainConfig, env: DistEnv, device: torch.device, hooks: StepHooks | None, stop: StopRequest
) -> dict:
    """A run, phase by phase. Nothing is written to the run directory before every check has passed."""
    wall_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg, env)
    lock, created = on_main(env, lambda: open_run_dir(run_dir, cfg)) or (None, False)
    try:
        run = set_up(cfg, env, device, run_dir)  # logging, tokenizer, model, optimizer, data
        restore(run)  # --checkpoint.resume: check the checkpoint, then load it
        write_run_files(run)  # config.yaml, tokenizer/, metrics.jsonl trimmed to the resumed step
        start_metrics(run, hooks)  # FLOPs and MFU peak, metric sinks, profiler hooks, progress bar
        train_steps(run, stop)  # the step loop, with its evaluations and checkpoints
        finish(run, stop)  # the final checkpoint and evaluation
        return write_summary(run, wall_start)  # summary.json, loss.png and the "done" line
    except UserError:
        if created and env.is_main and not (run_dir / "config.yaml").exists():
            import shutil

            shutil.rmtree(run_dir, ignore_errors=True)  # refused before writing anything: leave no trace
        raise
    finally:
        if lock is not None:
            lock.release()


@dataclasses.dataclass
class Run:
    """What the phases of one run share: built by `set_up`, advanced by `restore` and `train_steps`."""

    cfg: TrainConfig
    env: DistEnv
    device: torch.device
    run_dir: Path
    tokenizer: Any
    args: Any  # TransformerModelArgs
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: LossScaler
    amp: Any  # () -> the autocast context of cfg.precision
    train_loader: Any
    val_loader: Any  # None without a validation split
    step: int = 0  # the last step taken (the resumed one before the loop)
    start_step: int = 0
    last_saved: int | None = None
    exit_reason: str = "completed"  # or "signal", "diverged"
    logged_at_start: dict[str, Any] = dataclasses.field(default_factory=dict)  # metrics of start_step
    losses: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    val_history: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    skipped_total: int = 0
    # Set by start_metrics:
    fpt: float = 0.0  # training FLOPs per token
    peak: Any = None
    metric_log: Any = None  # rank 0 only
    hooks: StepHooks | None = None
    progress: Any = None
    window: Throughput = dataclasses.field(default_factory=Throughput)  # since the last logged step
    run_tp: Throughput = dataclasses.field(default_factory=Throughput)  # the whole run but its first step

    @property
    def model_args(self) -> dict:
        return dataclasses.asdict(self.args)

    def save(self, at_step: int) -> None:
        """Checkpoint the full training state (a collective under FSDP: every rank calls it)."""
        cfg = self.cfg
        state = gather_state(
            self.model,
            self.optimizer,
            step=at_step,
            model_args=self.model_args,
            scaler=self.scaler,
            loader=self.train_loader,
            cfg=cfg,
            total_steps=cfg.training.steps,
        )
        if state is not None:
            path = ckpt.save_checkpoint(self.run_dir, state, keep_last=cfg.checkpoint.keep_last)
            logger.info("saved %s", path)
        barrier()
        self.last_saved = at_step

    def validate(self, step: int) -> float | None:
        """Validation loss at `step`, recorded in the history and metrics.jsonl."""
        cfg = self.cfg
        val = evaluate(
            self.model,
            self.val_loader,
            cfg.training.eval_batches,
            self.device,
            self.amp,
            cfg.training.loss_chunk,
        )
        if val is not None:
            self.val_history.append((step, val))
            if self.metric_log is not None:
                self.metric_log.log(step, {"val_loss": val})
        return val


def set_up(cfg: TrainConfig, env: DistEnv, device: torch.device, run_dir: Path) -> Run:
    """Logging, tokenizer, model (build, cast, move, compile, wrap), optimizer, loss scaler, data."""
    from lmtrain.data import build_dataloader, resolve_tokenizer
    from lmtrain.model import Transformer, model_args_from_config

    init_logging(env.rank, run_dir / "train.log")
    logger.info("run directory %s (rank %d of %d, device %s)", run_dir, env.rank, env.world_size, device)
    if env.is_main:
        for stale in ckpt.remove_stale_temporaries(run_dir):
            logger.warning("removed %s, left by a save that was killed", stale)

    seed_everything(cfg.training.seed)
    tokenizer = resolve_tokenizer(cfg.data)
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    seq_len = cfg.model.seq_len or cfg.data.sequence_length
    args = model_args_from_config(cfg.model, vocab_size=vocab_size, seq_len=seq_len)

    # Model: build, cast, move, compile, wrap (in that order; checkpoints stay prefix-free).
    model = Transformer(args).to(device=device, dtype=torch_dtype(cfg.precision.model_dtype))
    if cfg.training.compile:
        model = torch.compile(model, fullgraph=True)
    model = wrap_model(model, cfg.distributed, env, device)
    model.train()
    optimizer = build_optimizer(model, cfg.optim, device.type)
    scaler = build_loss_scaler(cfg.precision)
    amp = lambda: autocast(cfg.precision, device.type)  # noqa: E731

    train_loader = build_dataloader(
        cfg.data, tokenizer, "train", seed=cfg.training.seed, rank=env.rank, world_size=env.world_size
    )
    val_loader = build_dataloader(
        cfg.data, tokenizer, "val", seed=cfg.training.seed, rank=env.rank, world_size=env.world_size
    )
    return Run(
        cfg, env, device, run_dir, tokenizer, args, model, optimizer, scaler, amp, train_loader, val_loader
    )


def restore(run: Run) -> None:
    """--checkpoint.resume auto|PATH: check that the checkpoint fits this run, then load its state."""
    cfg, resume = run.cfg, run.cfg.checkpoint.resume
    if resume == "none":
        return
    found = (
        ckpt.load_latest_valid(run.run_dir)
        if resume == "auto"
        else (Path(resume), ckpt.load_checkpoint(resume))
    )
    if found is None:
        logger.info("checkpoint.resume=auto: no checkpoint in %s yet; starting from step 0", run.run_dir)
        return
    path, state = found
    check_batch_shape(path, state, cfg)
    model_args = run.model_args
    # Through the dataclass: a checkpoint from before a switch existed holds its default.
    saved_args = dataclasses.asdict(type(run.args)(**state["model_args"]))
    built_args = dict(model_args)
    if cfg.checkpoint.allow_batch_change and built_args.get("pos") != "learned":
        saved_args.pop("seq_len", None)  # only the size of the RoPE tables, not a weight
        built_args.pop("seq_len", None)
    if saved_args != built_args:
        raise UserError(
            f"{path} was written for model {state['model_args']}, but this run builds {model_args}; "
            "resume with the run's own config.yaml (--config) or start a new output_dir"
        )
    run.start_step = run.step = run.last_saved = restore_state(
        run.model, run.optimizer, run.scaler, run.train_loader, state, run.env
    )
    logger.info("resumed from %s at step %d", path, run.start_step)


def write_run_files(run: Run) -> None:
    """config.yaml and tokenizer/ (rank 0); on resume, metrics.jsonl keeps only what the checkpoint saw."""
    if not run.env.is_main:
        return
    save_config(run.cfg, run.run_dir / "config.yaml")
    if not (run.run_dir / "tokenizer").exists() and hasattr(run.tokenizer, "save_pretrained"):
        tmp = run.run_dir / f".tokenizer-tmp-{os.getpid()}"
        run.tokenizer.save_pretrained(str(tmp))
        os.replace(tmp, run.run_dir / "tokenizer")
    if run.cfg.checkpoint.resume != "none":
        run.logged_at_start = trim_metrics(run.run_dir / "metrics.jsonl", run.start_step)


def start_metrics(run: Run, hooks: StepHooks | None) -> None:
    """FLOPs per token and the MFU peak (logged with the model size), metric sinks, hooks, progress bar."""
    cfg, env = run.cfg, run.env
    run.fpt = model_flops_per_token(run.args, cfg.data.sequence_length)
    run.peak = resolve_peak(
        run.device, compute_dtype(cfg.precision), cfg.logging.peak_tflops, log=logger.info
    )
    logger.info(
        "model %s: %.2fM parameters, %.3g GFLOP/token; MFU peak %.4g TFLOP/s per device (%s)",
        cfg.model.preset,
        sum(p.numel() for p in run.model.parameters()) / 1e6,  # DTensor.numel() is the full size
        run.fpt / 1e9,
        run.peak.tflops,
        run.peak.source,
    )
    run.metric_log = (
        make_metric_logger(
            run.run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            name=run.run_dir.name,
            config=config_to_dict(cfg),
            console=False,
        )
        if env.is_main
        else None
    )
    run.hooks = hooks if hooks is not None else _build_step_hooks(cfg, run.run_dir, run.device)
    run.progress = _progress(cfg, env, run.start_step, cfg.training.steps)


def train_steps(run: Run, stop: StopRequest) -> None:
    """The step loop: data, learning rate, one optimizer step, metrics, evaluation, signal, checkpoint."""
    cfg, env, device = run.cfg, run.env, run.device
    model, optimizer, scaler, hooks, progress = run.model, run.optimizer, run.scaler, run.hooks, run.progress
    window, run_tp, metric_log, fpt, peak = run.window, run.run_tp, run.metric_log, run.fpt, run.peak
    total_steps, start_step, step = cfg.training.steps, run.start_step, run.step
    timer = StepTimer(device)
    bad_streak = 0
    train_iter = iter(run.train_loader)
    try:
        if stop.any_rank():  # a signal during the start-up
            logger.warning(
                "signal %s during start-up: saving at step %d and exiting for requeue",
                stop.received.name if stop.received else "on another rank",
                step,
            )
            if run.last_saved != step:
                run.save(step)
            run.exit_reason = "signal"
        while run.exit_reason == "completed" and step < total_steps:
            step += 1
            run.step = step
            hooks.on_step_start(step)
            timer.start()
            t_data = time.perf_counter()
            micro = [next(train_iter) for _ in range(cfg.training.grad_accumulation_steps)]
            data_seconds = time.perf_counter() - t_data
            lr = lr_at(step, cfg.schedule, cfg.optim.lr, total_steps)
            set_lr(optimizer, lr)
            result = train_step(
                model,
                optimizer,
                scaler,
                micro,
                device=device,
                amp=run.amp,
                max_norm=cfg.optim.grad_max_norm,
                hooks=hooks,
                loss_chunk=cfg.training.loss_chunk,
            )
            seconds = timer.stop()
            window.add(seconds, result.tokens, result.positions)
            if step > start_step + 1:  # the first step includes warm-up (allocation, compilation)
                run_tp.add(seconds, result.tokens, result.positions)

            if result.skipped:
                run.skipped_total += 1
                overflow_only = result.finite_loss and scaler.__class__.__name__ == "DynamicLossScaler"
                if not overflow_only:
                    bad_streak += 1
                    logger.warning(
                        "step %d: non-finite loss/gradients (loss %s, grad norm %s); optimizer step skipped "
                        "(%d in a row, limit training.max_bad_steps=%d)",
                        step,
                        result.loss,
                        result.grad_norm,
                        bad_streak,
                        cfg.training.max_bad_steps,
                    )
                    if bad_streak >= cfg.training.max_bad_steps:
                        run.exit_reason = "diverged"
                        logger.error(
                            "stopping: %d consecutive steps with a non-finite loss or gradients. Lower "
                            "optim.lr, keep optim.grad_max_norm > 0, or use precision.amp=bf16; the last "
                            "good checkpoint (step %s) is kept in %s",
                            bad_streak,
                            run.last_saved,
                            ckpt.checkpoint_dir(run.run_dir),
                        )
            else:
                bad_streak = 0
                run.losses.append((step, result.loss))

            if step % cfg.logging.frequency == 0 or step == total_steps or run.exit_reason == "diverged":
                rates = window.rates()
                per_device = rates["tokens_per_s"] / env.world_size
                metrics: dict[str, Any] = {
                    "loss": result.loss,
                    "lr": lr,
                    "grad_norm": result.grad_norm,
                    "step_time": rates["step_time"],
                    "data_time": data_seconds,
                    "tokens_per_s": rates["tokens_per_s"],
                    "tokens_per_s_per_device": per_device,
                    "positions_per_s": rates["positions_per_s"],
                    "tflops_per_device": fpt * rates["positions_per_s"] / env.world_size / 1e12,
                    "mfu": mfu(fpt, rates["positions_per_s"] / env.world_size, peak.tflops),
                    "loss_scale": scaler.scale,
                    "skipped_steps": run.skipped_total,
                }
                mem = peak_memory_gib(device)
                if mem is not None:
                    metrics["peak_memory_gib"] = mem
                if metric_log is not None:
                    metric_log.log(step, metrics)
                    logger.info(step_line(step, total_steps, metrics))
                window.reset()
            if progress is not None:
                progress.update(progress.task_ids[0], completed=step, info=f"loss {result.loss:.4f}")

            if cfg.training.eval_interval and step % cfg.training.eval_interval == 0 and step < total_steps:
                t_eval = time.perf_counter()
                val = run.validate(step)
                if val is not None:
                    logger.info(val_line(step, val, time.perf_counter() - t_eval))
            hooks.on_step_end(step)
            if run.exit_reason == "diverged":
                break

            if stop.any_rank():
                logger.warning(
                    "signal %s: saving at step %d and exiting for requeue",
                    stop.received.name if stop.received else "on another rank",
                    step,
                )
                run.save(step)
                run.exit_reason = "signal"
                break
            if (
                cfg.checkpoint.interval
                and step % cfg.checkpoint.interval == 0
                and step < total_steps
                and bad_streak == 0  # never replace a good checkpoint's role with a bad step's state
            ):
                run.save(step)
    finally:
        hooks.close()
        if progress is not None:
            progress.stop()


def finish(run: Run, stop: StopRequest) -> None:
    """After the last step: the final checkpoint and evaluation. A signal that arrived meanwhile still
    exits for requeue (the requeued job finds the final checkpoint and only writes the summary)."""
    if run.exit_reason != "completed":
        return
    step = run.step
    if run.last_saved != step:
        run.save(step)
    if step == run.start_step and "val_loss" in run.logged_at_start:  # requeued after its final evaluation
        run.val_history.append((step, float(run.logged_at_start["val_loss"])))
    else:
        t_eval = time.perf_counter()
        val = run.validate(step)
        if val is not None:
            logger.info(val_line(step, val, time.perf_counter() - t_eval))
    if stop.any_rank():
        logger.warning(
            "signal %s after the last step: exiting for requeue",
            stop.received.name if stop.received else "on another rank",
        )
        run.exit_reason = "signal"


def write_summary(run: Run, wall_start: float) -> dict:
    """summary.json, loss.png and the closing log line (rank 0); the summary on every rank."""
    env, losses, val_history = run.env, run.losses, run.val_history
    rates = run.run_tp.rates() if run.run_tp.steps else run.window.rates()
    summary = {
        "exit_reason": run.exit_reason,
        "steps": run.step,
        "resumed_from": run.start_step or None,
        "initial_train_loss": losses[0][1] if losses and run.start_step == 0 else None,
        "final_train_loss": losses[-1][1] if losses else None,
        # One batch's loss is noisy; the mean over the last 20 steps (fewer in a shorter run) is the number
        # to compare.
        "final_train_loss_avg20": tail_mean([x for _, x in losses], 20)[0],
        "final_train_loss_avg_steps": tail_mean([x for _, x in losses], 20)[1],
        "final_val_loss": val_history[-1][1] if val_history else None,
        "tokens_per_s": rates["tokens_per_s"],
        "positions_per_s": rates["positions_per_s"],
        "mfu": mfu(run.fpt, rates["positions_per_s"] / env.world_size, run.peak.tflops),
        "peak_tflops": run.peak.tflops,
        "peak_source": run.peak.source,
        "skipped_steps": run.skipped_total,
        "wall_time_s": time.perf_counter() - wall_start,
        "world_size": env.world_size,
        "run_dir": str(run.run_dir),
    }
    if env.is_main:
        if run.metric_log is not None:
            run.metric_log.close()
        atomic_write_text(run.run_dir / "summary.json", json.dumps(summary, indent=2) + "\n")
        try:
            write_loss_plot(run.run_dir / "metrics.jsonl", run.run_dir / "loss.png")
        except Exception as exc:  # a plot must never fail a finished run
            logger.warning("could not write loss.png: %s", exc)
        logger.info(done_line(summary))
    return summary


def model_flops_per_token(args, seq_len: int) -> float:
    """Training FLOPs per token of the full (unsharded) model: 6N + 12*L*H*Q*T."""
    try:
        from lmtrain.accounting import flops_per_token
    except ImportError:  # accounting ships separately; the formula needs only the architecture
        from lmtrain.model import Transformer

        with torch.device("meta"):
            meta = Transformer(args)
        n = sum(p.numel() for name, p in meta.named_parameters() if not name.startswith("tok_embeddings"))
        return 6.0 * n + 12.0 * args.n_layers * args.n_heads * args.head_dim * seq_len
    return float(flops_per_token(args, seq_len))


def exit_code(summary: dict) -> int:
    return {"completed": EXIT_OK, "signal": EXIT_REQUEUE, "diverged": EXIT_DIVERGED}[summary["exit_reason"]]


def main(argv: list[str] | None = None) -> int:
    cfg, _ = parse_args(argv, prog="lmtrain train")
    return exit_code(train(cfg))


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
