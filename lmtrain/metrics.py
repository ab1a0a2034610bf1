"""Throughput and MFU: a per-device peak table, a cached CPU peak, a measured peak, step timers.

    python -c "import torch; from lmtrain.metrics import cpu_peak; print(cpu_peak(torch.float32))"

MFU = FLOPs per token x tokens per second / peak FLOP/s. The peak comes from `logging.peak_tflops`, else
from PEAK_TFLOPS by device name and compute dtype, else on CPU from a matmul benchmark run once per
machine (several rounds of about a second, the best kept) and cached by CPU model, thread count and dtype
in `$LMTRAIN_CACHE_DIR` (default `~/.cache/lmtrain/cpu-peak.json`; delete the file to measure again), so
the MFU of two runs on one machine is comparable. An unknown GPU gets a matmul timed at start-up. The
source is always logged, never silently assumed.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is used: the peak table serves torch-free tools too
    import torch

# Dense (not sparse) peak TFLOP/s per GPU: bf16/fp16 tensor cores, and fp32 without TF32.
# Matched against torch.cuda.get_device_name() in this order (GH200 before H200 before H100).
PEAK_TFLOPS: list[tuple[tuple[str, ...], dict[str, float]]] = [
    (("GH200",), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (("H200",), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (("H100", "PCIE"), {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0}),
    (("H100",), {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0}),
    (("A100",), {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5}),
]

_DTYPE_KEYS = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
    "bf16": "bf16",
    "fp16": "fp16",
    "fp32": "fp32",
}


def dtype_key(dtype) -> str | None:
    """`bf16`/`fp16`/`fp32` for a torch dtype or one of those names, else None."""
    return _DTYPE_KEYS.get(str(dtype).removeprefix("torch."))


def table_peak_tflops(device_name: str, dtype: torch.dtype) -> float | None:
    """Peak from the table for a device name (e.g. 'NVIDIA GH200 480GB'), or None when unknown."""
    name = device_name.upper()
    key = dtype_key(dtype)
    for needles, peaks in PEAK_TFLOPS:
        if all(n in name for n in needles):
            return peaks.get(key) if key else None
    return None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def measure_peak_tflops(
    device: torch.device, dtype: torch.dtype, size: int = 0, seconds: float = 0.5
) -> float:
    """TFLOP/s of a square matmul on `device` in `dtype`, best of repeated timings (an achievable peak)."""
    import torch

    if size <= 0:
        size = 8192 if device.type == "cuda" else 1024
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.matmul(a, b)  # warm-up (library initialisation, kernel selection)
    synchronize(device)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    runs = 0
    while runs < 3 or time.perf_counter() < deadline:
        t0 = time.perf_counter()
        torch.matmul(a, b)
        synchronize(device)
        best = min(best, time.perf_counter() - t0)
        runs += 1
    return 2.0 * size**3 / best / 1e12


@dataclass
class Peak:
    tflops: float
    source: str  # "config", "table: <device>", "measured peak: <device>"


def cpu_model() -> str:
    """The CPU's model name (`/proc/cpuinfo` on Linux), else what `platform` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        import torch

        return torch.cuda.get_device_name(device)
    return f"{device.type} {cpu_model()}".strip()


def cache_dir() -> Path:
    """Where per-machine measurements are kept: $LMTRAIN_CACHE_DIR, else $XDG_CACHE_HOME/lmtrain."""
    if os.environ.get("LMTRAIN_CACHE_DIR"):
        return Path(os.environ["LMTRAIN_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lmtrain"


CPU_PEAK_ROUNDS = 5
CPU_PEAK_ROUND_SECONDS = 1.0
CPU_PEAK_SIZE = 1024


def cpu_peak_key(dtype: torch.dtype) -> str:
    import torch

    return f"{cpu_model()} | {torch.get_num_threads()} threads | {dtype_key(dtype) or dtype}"


def cpu_peak(dtype: torch.dtype, log=None) -> tuple[float, str]:
    """(TFLOP/s, key) of this machine's CPU matmul peak at the current thread count, measured once
    (CPU_PEAK_ROUNDS rounds of CPU_PEAK_ROUND_SECONDS, the best round kept) and then read from the cache.
    `log(message)` hears about a measurement before it starts (it takes a few seconds)."""
    import torch

    from lmtrain.atomic import atomic_write_text

    path = cache_dir() / "cpu-peak.json"
    key = cpu_peak_key(dtype)
    try:
        cached = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        cached = {}
    entry = cached.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("tflops"), (int, float)) and entry["tflops"] > 0:
        return float(entry["tflops"]), key
    if log is not None:
        log(
            f"measuring the CPU matmul peak once for this machine ({key}): {CPU_PEAK_ROUNDS} rounds of "
            f"{CPU_PEAK_ROUND_SECONDS:g} s, cached in {path}"
        )
    rounds = [
        measure_peak_tflops(torch.device("cpu"), dtype, CPU_PEAK_SIZE, CPU_PEAK_ROUND_SECONDS)
        for _ in range(CPU_PEAK_ROUNDS)
    ]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    cached[key] = {
        "tflops": max(rounds),
        "rounds": rounds,
        "size": CPU_PEAK_SIZE,
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "load_average": round(load, 2),
    }
    if log is not None and load > (os.cpu_count() or 1):
        log(
            f"the machine was busy during the measurement (load {load:.1f} on {os.cpu_count()} cores), so "
            f"the peak ({max(rounds):.3g} TFLOP/s) is likely too low and MFU too high; delete {path} to "
            "measure again on an idle machine"
        )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(cached, indent=2) + "\n")
    except OSError:  # a read-only home still gets an MFU, measured again next time
        pass
    return max(rounds), key


def resolve_peak(device: torch.device, dtype: torch.dtype, configured: float | None, log=None) -> Peak:
    """The peak used for MFU, with where it came from."""
    if configured is not None:
        return Peak(float(configured), "logging.peak_tflops")
    name = device_name(device)
    if device.type == "cuda":
        value = table_peak_tflops(name, dtype)
        if value is not None:
            return Peak(value, f"table: {name}")
    if device.type == "cpu":
        value, key = cpu_peak(dtype, log)
        return Peak(value, f"cached CPU peak: {key}")
    return Peak(measure_peak_tflops(device, dtype), f"measured peak: {name} {dtype_key(dtype) or dtype}")


def mfu(flops_per_token: float, tokens_per_s: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation as a fraction (0..1) of the peak."""
    return flops_per_token * tokens_per_s / (peak_tflops * 1e12)


class StepTimer:
    """Wall time between synchronised marks: `start()` then `stop()` -> seconds."""

    def __init__(self, device: torch.device):
        self.device = device
        self._t0 = 0.0

    def start(self) -> None:
        synchronize(self.device)
        self._t0 = time.perf_counter()

    def stop(self) -> float:
        synchronize(self.device)
        return time.perf_counter() - self._t0


def peak_memory_gib(device: torch.device) -> float | None:
    """Peak allocated memory since the last reset (GPUs only; None on CPU)."""
    if device.type != "cuda":
        return None
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30


class Throughput:
    """Accumulates tokens and time between logging steps."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.seconds = 0.0
        self.tokens = 0  # non-ignored label positions
        self.positions = 0  # all positions, padding included
        self.steps = 0

    def add(self, seconds: float, tokens: int, positions: int) -> None:
        self.seconds += seconds
        self.tokens += tokens
        self.positions += positions
        self.steps += 1

    def rates(self) -> dict[str, float]:
        s = max(self.seconds, 1e-12)
        return {
            "step_time": self.seconds / max(self.steps, 1),
            "tokens_per_s": self.tokens / s,
            "positions_per_s": self.positions / s,
        }


def write_loss_plot(metrics_jsonl: str | os.PathLike, out_png: str | os.PathLike) -> bool:
    """Train (and validation) loss against step from a run's metrics.jsonl, written atomically.
    Returns False when there is nothing to plot. A resumed run's repeated steps keep the last value."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train: dict[int, float] = {}
    val: dict[int, float] = {}
    with open(metrics_jsonl) as fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a killed job
            for key, into in (("loss", train), ("val_loss", val)):
                if isinstance(rec.get(key), (int, float)):
                    into[int(rec["step"])] = float(rec[key])
    if not train and not val:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(sorted(train), [train[s] for s in sorted(train)], label="train")
    if val:
        ax.plot(sorted(val), [val[s] for s in sorted(val)], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out = Path(out_png)
    tmp = out.with_name(f".{out.stem}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
    return True
