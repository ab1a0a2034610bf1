"""What the two examples share and is not their lesson: the pre-norm transformer block, and the loop
that runs N steps over a DataLoader with a torch.profiler window over the last three.

    from shared import Block, run_steps
    seconds_per_step = run_steps(loader, train_step, steps=6, device=device, profile_out="trace.json")
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

ACTIVE_STEPS = 3  # the profiler records the last three steps, after one warm-up step


def fused_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool = False
) -> torch.Tensor:
    """All heads at once: (B, H, T, D) x3 -> (B, H, T, D). On a CPU under bf16 autocast the flash kernel's
    backward is slower than the math path (fwd+bwd at (32, 4, 65, 16): 89 ms flash vs 28 ms math, one
    thread, torch 2.13), so CPUs take the math path; GPUs pick their fused kernels."""
    if q.device.type == "cpu":
        with sdpa_kernel([SDPBackend.MATH]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=is_causal)


class Block(nn.Module):
    """Pre-norm transformer block around the example's own attention module."""

    def __init__(self, dim: int, attn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, C) -> (B, T, C)
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


def example_parser(doc: str) -> argparse.ArgumentParser:
    """The flags both examples take; each adds its model's sizes."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--fixed", action="store_true", help="run the version with all six problems fixed")
    p.add_argument(
        "--profile-out", metavar="PATH", help="write a torch.profiler Chrome trace of the last steps"
    )
    p.add_argument(
        "--steps", type=int, default=6, help=f"training steps (the profiler records the last {ACTIVE_STEPS})"
    )
    p.add_argument("--log-every", type=int, default=10, help="fixed version: read metrics every N steps")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--lockstep",
        action="store_true",
        help="before each step print 'lockstep ready' and wait for a line on stdin; after it print "
        "'lockstep step N: W s wall, C s CPU' (lets a benchmark alternate two runs step by step)",
    )
    return p


def start_profiler(steps: int, device: torch.device) -> torch.profiler.profile:
    """torch.profiler with shapes and memory (what `lmtrain doctor` reads), recording the last steps."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    schedule = torch.profiler.schedule(wait=max(steps - ACTIVE_STEPS - 1, 0), warmup=1, active=ACTIVE_STEPS)
    prof = torch.profiler.profile(
        activities=activities, schedule=schedule, record_shapes=True, profile_memory=True
    )
    prof.start()
    return prof


def lockstep_gate(step: int) -> None:
    """--lockstep: say this process is between steps, then wait until the benchmark driving it says go."""
    print(f"lockstep ready for step {step + 1}", flush=True)
    if not sys.stdin.readline():
        raise SystemExit(
            f"lockstep: stdin closed before step {step + 1}; the benchmark driving this run stopped"
        )


def run_steps(loader: Iterable, train_step: Callable[[int, object], None], steps: int, device: torch.device,
              profile_out: str | None = None, lockstep: bool = False) -> tuple[float, float]:  # fmt: skip
    """Call train_step(step, batch) `steps` times, epoch after epoch; (wall, CPU) seconds of a step, mean
    over the steps after the first two (those include warm-up and compilation). CPU time is this process's,
    all threads: on a busy machine it is steadier than wall time. A step's time includes fetching its batch.
    With `lockstep`, each step waits for a go line on stdin (untimed) and reports its times on stdout."""
    prof = start_profiler(steps, device) if profile_out else None
    times, batches = [], iter(loader)
    for step in range(steps):
        if lockstep:
            lockstep_gate(step)
        start = (time.perf_counter(), time.process_time())
        batch = next(batches, None)
        if batch is None:  # a new epoch
            batches = iter(loader)
            batch = next(batches)
        train_step(step, batch)
        if prof is not None:
            prof.step()  # marks the step: ProfilerStep#N in the trace
        if device.type == "cuda":
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - start[0], time.process_time() - start[1]
        times.append((wall, cpu))
        if lockstep:
            print(f"lockstep step {step + 1}: {wall:.6f} s wall, {cpu:.6f} s CPU", flush=True)
    if prof is not None:
        prof.stop()
        prof.export_chrome_trace(profile_out)
        print(f"trace: {profile_out}")
    steady = times[2:] or times
    return sum(w for w, _ in steady) / len(steady), sum(c for _, c in steady) / len(steady)


def report(seconds: tuple[float, float]) -> None:
    print(f"mean step time: {1e3 * seconds[0]:.1f} ms wall, {1e3 * seconds[1]:.1f} ms CPU")
