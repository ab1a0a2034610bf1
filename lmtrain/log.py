"""Logging and metric sinks.

`init_logging(rank)` sets up Python logging once: rank 0 prints through a rich console handler, the
other ranks print warnings and errors only (one log per job, not one per GPU). Metrics go through
`MetricSink`s: console, JSONL file, and TensorBoard / Weights & Biases when those are installed.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("lmtrain")


def init_logging(rank: int = 0, log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Configure the `lmtrain` logger for this process (idempotent: handlers are replaced)."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level if rank == 0 else logging.WARNING)
    try:
        from rich.logging import RichHandler

        console: logging.Handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
        console.setFormatter(logging.Formatter("%(message)s" if rank == 0 else f"[rank {rank}] %(message)s"))
    except ImportError:  # rich is a dependency, but logging must never be what breaks a job
        console = logging.StreamHandler(sys.stderr)
        console.setFormatter(logging.Formatter(f"%(asctime)s [rank {rank}] %(levelname)s %(message)s"))
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logger.addHandler(fh)


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/inf; keep them visible as strings
    return value


class JsonlSink:
    """One JSON object per line, flushed each time so a killed job keeps its metrics."""

    def __init__(self, path: str | os.PathLike):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._fh = open(path, "a", buffering=1)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        self._fh.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._fh.close()


class ConsoleSink:
    """A compact one-line summary per logging step through the `lmtrain` logger."""

    def __init__(self, keys: tuple[str, ...] = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu")):
        self.keys = keys

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        parts = [f"step {step}"]
        for key in self.keys:
            if key in metrics and metrics[key] is not None:
                value = metrics[key]
                parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        logger.info(" | ".join(parts))

    def close(self) -> None:
        pass


class TensorBoardSink:
    def __init__(self, log_dir: str | os.PathLike):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(key, value, step)

    def close(self) -> None:
        self._writer.close()


class WandbSink:
    """Weights & Biases in offline mode: compute nodes often have no internet; `wandb sync` later."""

    def __init__(self, run_dir: str | os.PathLike, name: str, config: dict):
        import wandb

        self._run = wandb.init(dir=str(run_dir), name=name, config=config, mode="offline")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricLogger:
    """Fan one metrics dict out to every sink."""

    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def make_metric_logger(
    run_dir: str | os.PathLike,
    *,
    tensorboard: bool = False,
    wandb: bool = False,
    name: str = "run",
    config: dict | None = None,
    console: bool = True,
) -> MetricLogger:
    """Sinks for rank 0: console, `metrics.jsonl`, and the optional ones if their package is installed."""
    sinks: list[MetricSink] = []
    if console:
        sinks.append(ConsoleSink())
    sinks.append(JsonlSink(Path(run_dir) / "metrics.jsonl"))
    if tensorboard:
        try:
            sinks.append(TensorBoardSink(Path(run_dir) / "tensorboard"))
        except ImportError:
            logger.warning(
                "logging.tensorboard is set but the tensorboard package is not installed; skipping it"
            )
    if wandb:
        try:
            sinks.append(WandbSink(run_dir, name, config or {}))
        except ImportError:
            logger.warning("logging.wandb is set but the wandb package is not installed; skipping it")
    return MetricLogger(sinks)
