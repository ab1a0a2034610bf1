"""The training loop: one flat step (forward, backward, clip, optimizer), checkpoints, metrics, eval.

    python -m lmtrain.train --config lmtrain/configs/tiny-cpu.yaml --training.steps 50

Also `lmtrain train ...` and, one process per GPU, `srun python -m lmtrain.train ...` or `torchrun`.
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
from lmtrain.config import TrainConfig, config_to_dict, parse_args, save_config
from lmtrain.distributed import (
    DistEnv,
    all_reduce_sum,
    barrier,
    broadcast_object,
    cleanup,
    detect_env,
    init_distributed,
    resolve_device,
    wrap_model,
)
from lmtrain.errors import UserError
from lmtrain.hooks import StepHooks
from lmtrain.log import done_line, init_logging, logger, make_metric_logger, step_line, tail_mean, val_line
from lmtrain.losses import DEFAULT_CHUNK, IGNORE_INDEX
from lmtrain.metrics import StepTimer, Throughput, mfu, peak_memory_gib, resolve_peak, write_loss_plot
from lmtrain.optim import build_optimizer, clip_grad_norm, lr_at, set_lr
from lmtrain.precision import LossScaler, autocast, build_loss_scaler, compute_dtype, torch_dtype

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
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        total[0] += float(loss_sum(model, batch, device, amp, loss_chunk))
        total[1] += int((batch["labels"] != IGNORE_INDEX).sum())
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
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, state["model"], options=opts)
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=opts)
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
    env = detect_env()
    device = resolve_device(cfg.training.device, env)
    init_distributed(cfg.distributed, device, env)
    try:
        summary = _train(cfg, env, device, hooks)
    except BaseException:
        cleanup()  # no barrier: the other ranks may be stuck in a collective or gone
        raise
    cleanup(synchronize=True)
    return summary


def _train(cfg: TrainConfig, env: DistEnv, device: torch.device, hooks: StepHooks | None) -> dict:
    from lmtrain.data import build_dataloader, resolve_tokenizer
    from lmtrain.model import Transformer, model_args_from_config

    wall_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg, env)
    if env.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    init_logging(env.rank, run_dir / "train.log")
    stop = StopRequest(parse_signals(cfg.checkpoint.signals))
    logger.info("run directory %s (rank %d of %d, device %s)", run_dir, env.rank, env.world_size, device)

    seed_everything(cfg.training.seed)
    tokenizer = resolve_tokenizer(cfg.data)
    vocab_size = cfg.model.vocab_size or len(tokenizer)
    seq_len = cfg.model.seq_len or cfg.data.sequence_length
    args = model_args_from_config(cfg.model, vocab_size=vocab_size, seq_len=seq_len)
    if env.is_main:
        save_config(cfg, run_dir / "config.yaml")
        if not (run_dir / "tokenizer").exists() and hasattr(tokenizer, "save_pretrained"):
            tmp = run_dir / f".tokenizer-tmp-{os.getpid()}"
            tokenizer.save_pretrained(str(tmp))
            os.replace(tmp, run_dir / "tokenizer")

    # Model: build, cast, move, compile, wrap (in that order; checkpoints stay prefix-free).
    model = Transformer(args).to(device=device, dtype=torch_dtype(cfg.precision.model_dtype))
    model_args = dataclasses.asdict(args)
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

    start_step = 0
    resume = cfg.checkpoint.resume
    if resume != "none":
        found = (
            ckpt.load_latest_valid(run_dir)
            if resume == "auto"
            else (Path(resume), ckpt.load_checkpoint(resume))
        )
        if found is None:
            logger.info("checkpoint.resume=auto: no checkpoint in %s yet; starting from step 0", run_dir)
        else:
            path, state = found
            if state["model_args"] != model_args:
                raise UserError(
                    f"{path} was written for model {state['model_args']}, but this run builds {model_args}; "
                    "resume with the run's own config.yaml (--config) or start a new output_dir"
                )
            start_step = restore_state(model, optimizer, scaler, train_loader, state, env)
            logger.info("resumed from %s at step %d", path, start_step)
            del state

    total_steps = cfg.training.steps
    fpt = model_flops_per_token(args, cfg.data.sequence_length)
    peak = resolve_peak(device, compute_dtype(cfg.precision), cfg.logging.peak_tflops, log=logger.info)
    logger.info(
        "model %s: %.2fM parameters, %.3g GFLOP/token; MFU peak %.4g TFLOP/s per device (%s)",
        cfg.model.preset,
        sum(p.numel() for p in model.parameters()) / 1e6,  # DTensor.numel() is the full size
        fpt / 1e9,
        peak.tflops,
        peak.source,
    )
    metric_log = (
        make_metric_logger(
            run_dir,
            tensorboard=cfg.logging.tensorboard,
            wandb=cfg.logging.wandb,
            name=run_dir.name,
            config=config_to_dict(cfg),
            console=False,
        )
        if env.is_main
        else None
    )
    hooks = hooks if hooks is not None else _build_step_hooks(cfg, run_dir, device)
    timer = StepTimer(device)
    window = Throughput()
    run_tp = Throughput()
    losses: list[tuple[int, float]] = []
    val_history: list[tuple[int, float]] = []
    exit_reason = "completed"
    bad_streak = 0
    skipped_total = 0
    step = start_step
    last_saved = start_step if start_step else None
    progress = _progress(cfg, env, start_step, total_steps)

    def save(at_step: int) -> None:
        nonlocal last_saved
        state = gather_state(
            model,
            optimizer,
            step=at_step,
            model_args=model_args,
            scaler=scaler,
            loader=train_loader,
            cfg=cfg,
            total_steps=total_steps,
        )
        if state is not None:
            path = ckpt.save_checkpoint(run_dir, state, keep_last=cfg.checkpoint.keep_last)
            logger.info("saved %s", path)
        barrier()
        last_saved = at_step

    train_iter = iter(train_loader)
    try:
        while step < total_steps:
            step += 1
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
                amp=amp,
                max_norm=cfg.optim.grad_max_norm,
                hooks=hooks,
                loss_chunk=cfg.training.loss_chunk,
            )
            seconds = timer.stop()
            window.add(seconds, result.tokens, result.positions)
            if step > start_step + 1:  # the first step includes warm-up (allocation, compilation)
                run_tp.add(seconds, result.tokens, result.positions)

            if result.skipped:
                skipped_total += 1
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
                        exit_reason = "diverged"
                        logger.error(
                            "stopping: %d consecutive steps with a non-finite loss or gradients. Lower "
                            "optim.lr, keep optim.grad_max_norm > 0, or use precision.amp=bf16; the last "
                            "good checkpoint (step %s) is kept in %s",
                            bad_streak,
                            last_saved,
                            ckpt.checkpoint_dir(run_dir),
                        )
            else:
                bad_streak = 0
                losses.append((step, result.loss))

            if step % cfg.logging.frequency == 0 or step == total_steps or exit_reason == "diverged":
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
                    "skipped_steps": skipped_total,
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
                val = evaluate(
                    model, val_loader, cfg.training.eval_batches, device, amp, cfg.training.loss_chunk
                )
                if val is not None:
                    val_history.append((step, val))
                    if metric_log is not None:
                        metric_log.log(step, {"val_loss": val})
                    logger.info(val_line(step, val, time.perf_counter() - t_eval))
            hooks.on_step_end(step)
            if exit_reason == "diverged":
                break

            if stop.any_rank():
                logger.warning(
                    "signal %s: saving at step %d and exiting for requeue",
                    stop.received.name if stop.received else "on another rank",
                    step,
                )
                save(step)
                exit_reason = "signal"
                break
            if (
                cfg.checkpoint.interval
                and step % cfg.checkpoint.interval == 0
                and step < total_steps
                and bad_streak == 0  # never replace a good checkpoint's role with a bad step's state
            ):
                save(step)
    finally:
        hooks.close()
        stop.restore()
        if progress is not None:
            progress.stop()

    if exit_reason == "completed":
        if last_saved != step:
            save(step)
        t_eval = time.perf_counter()
        val = evaluate(model, val_loader, cfg.training.eval_batches, device, amp, cfg.training.loss_chunk)
        if val is not None:
            val_history.append((step, val))
            if metric_log is not None:
                metric_log.log(step, {"val_loss": val})
            logger.info(val_line(step, val, time.perf_counter() - t_eval))

    rates = run_tp.rates() if run_tp.steps else window.rates()
    summary = {
        "exit_reason": exit_reason,
        "steps": step,
        "resumed_from": start_step or None,
        "initial_train_loss": losses[0][1] if losses and start_step == 0 else None,
        "final_train_loss": losses[-1][1] if losses else None,
        # One batch's loss is noisy; the mean over the last 20 steps (fewer in a shorter run) is the number
        # to compare.
        "final_train_loss_avg20": tail_mean([x for _, x in losses], 20)[0],
        "final_train_loss_avg_steps": tail_mean([x for _, x in losses], 20)[1],
        "final_val_loss": val_history[-1][1] if val_history else None,
        "tokens_per_s": rates["tokens_per_s"],
        "positions_per_s": rates["positions_per_s"],
        "mfu": mfu(fpt, rates["positions_per_s"] / env.world_size, peak.tflops),
        "peak_tflops": peak.tflops,
        "peak_source": peak.source,
        "skipped_steps": skipped_total,
        "wall_time_s": time.perf_counter() - wall_start,
        "world_size": env.world_size,
        "run_dir": str(run_dir),
    }
    if env.is_main:
        if metric_log is not None:
            metric_log.close()
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        os.replace(tmp, run_dir / "summary.json")
        try:
            write_loss_plot(run_dir / "metrics.jsonl", run_dir / "loss.png")
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
