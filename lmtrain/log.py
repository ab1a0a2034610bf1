"""Logging and metric sinks.

    python -c "from lmtrain.log import step_line; print(step_line(10, 300, {'loss': 6.1, 'lr': 3e-3}))"

`init_logging(rank)` sets up Python logging once: rank 0 prints every record, the other ranks print
warnings and errors only (one log per job, not one per GPU). On a terminal the console handler is rich's;
anywhere else (CI, `nohup`, Slurm logs) it is a plain handler whose lines are never wrapped, so `grep`
finds whole step lines. The file handler (`train.log`) gets the same records either way. Metrics go
through `MetricSink`s: console, JSONL file, and TensorBoard / Weights & Biases when those are installed.
`Ticker` paces the progress lines of long loops outside training.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Protocol

logger = logging.getLogger("lmtrain")


LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"


def init_logging(rank: int = 0, log_file: str | os.PathLike | None = None, level: int = logging.INFO) -> None:
    """Configure the `lmtrain` logger for this process (idempotent: handlers are replaced)."""
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level if rank == 0 else logging.WARNING)
    prefix = "" if rank == 0 else f"[rank {rank}] "
    console: logging.Handler | None = None
    if sys.stdout.isatty():
        try:
            from rich.logging import RichHandler

            console = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
            console.setFormatter(logging.Formatter(prefix + "%(message)s"))
        except ImportError:  # rich is a dependency, but logging must never be what breaks a job
            pass
    if console is None:
        console = logging.StreamHandler(sys.stdout)
        console.setFormatter(logging.Formatter(LOG_FORMAT.replace("%(message)s", prefix + "%(message)s")))
    logger.addHandler(console)
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter(LOG_FORMAT))
        logger.addHandler(fh)


# metrics key -> how the step line shows it, in the order shown (MFU last).
_STEP_FIELDS = (
    ("loss", lambda v: f"loss {v:.4f}"),
    ("lr", lambda v: f"lr {v:.2e}"),
    ("grad_norm", lambda v: f"grad norm {v:.3g}"),
    ("step_time", lambda v: f"{1e3 * v:.1f} ms/step"),
    ("tokens_per_s", lambda v: f"{v:,.0f} tok/s"),
    ("mfu", lambda v: f"MFU {100 * v:.2f}%"),
)


def step_line(step: int, total: int, metrics: dict[str, Any]) -> str:
    """The nanoGPT-style line logged every `logging.frequency` steps, terminal or not:
    `step 10/300 | loss 6.1234 | lr 3.00e-03 | grad norm 1.23 | 85.3 ms/step | 24,012 tok/s | MFU 12.34%`."""
    parts = [f"step {step}/{total}"]
    for key, show in _STEP_FIELDS:
        if metrics.get(key) is not None:
            parts.append(show(metrics[key]))
    if (metrics.get("mfu") or 0) > 1:
        parts[-1] += " (above 100%: the peak is too low; set logging.peak_tflops)"
    return " | ".join(parts)


def val_line(step: int, loss: float, seconds: float) -> str:
    """`step 300: validation loss 5.1234 (4.2 s)`."""
    return f"step {step}: validation loss {loss:.4f} ({seconds:.1f} s)"


def round_or_none(value: float | None, digits: int = 4) -> str:
    """A loss for a closing line: `4.7081`, or `n/a` when missing or not finite."""
    if value is None or not math.isfinite(value):
        return "n/a"
    return f"{value:.{digits}f}"


def tail_mean(values: list[float], n: int = 20) -> tuple[float | None, int]:
    """Mean of the last `n` values and how many that was (fewer when the run is shorter)."""
    tail = values[-n:]
    return (sum(tail) / len(tail), len(tail)) if tail else (None, 0)


def done_line(summary: dict[str, Any]) -> str:
    """The closing line of a run, with rounded losses."""
    return (
        f"done ({summary['exit_reason']}): {summary['steps']} steps, final train loss "
        f"{round_or_none(summary.get('final_train_loss'))}, val loss {round_or_none(summary.get('final_val_loss'))}, "
        f"{summary['tokens_per_s']:,.0f} tokens/s, {summary['wall_time_s']:.1f} s"
    )


class Ticker:
    """Paces progress lines: `due()` is true at most once every `every` seconds.

    Long loops (corpus build, tokenizer training, evaluation, `data stats`) print a line when it is due,
    so a log without a terminal is never silent for longer than that."""

    def __init__(self, every: float = 5.0):
        self.every = every
        self.start = time.perf_counter()
        self._next = self.start + every

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def due(self) -> bool:
        now = time.perf_counter()
        if now < self._next:
            return False
        self._next = now + self.every
        return True


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


class LineProgress:
    """The part of rich's `Progress` that long loops use (context manager, `add_task`, `advance`,
    `update`), printed as a plain line on stderr when the work starts, every `every` seconds while it
    runs, and when it ends: the progress display where there is no terminal."""

    def __init__(self, description: str, every: float = 5.0):
        self.description = description
        self.every = every
        self.done: dict[int, float] = {}
        self.total: dict[int, float | None] = {}
        self.ticker = Ticker(every)

    def __enter__(self) -> LineProgress:
        self._say("started")
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            self._say(f"done in {self.ticker.elapsed():.1f} s")

    def add_task(self, _name: str = "", total: float | None = None, **_fields) -> int:
        task = len(self.done)
        self.done[task], self.total[task] = 0, total
        return task

    def advance(self, task: int, advance: float = 1) -> None:
        self.update(task, completed=self.done[task] + advance)

    def update(self, task: int, completed: float | None = None, **_fields) -> None:
        if completed is not None:
            self.done[task] = completed
        if self.ticker.due():
            total = self.total[task]
            of = f"/{total:,.0f}" if total else ""
            self._say(f"{self.done[task]:,.0f}{of} ({self.ticker.elapsed():.0f} s)")

    def _say(self, text: str) -> None:
        print(f"{self.description}: {text}", file=sys.stderr, flush=True)
