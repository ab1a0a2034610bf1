"""Nsight Systems capture ranges, NVTX ranges and torch.profiler windows for lmtrain runs."""

from __future__ import annotations

from pathlib import Path

from lmtrain.hooks import StepHooks


def build_step_hooks(cfg, run_dir: Path, device) -> StepHooks:
    """Hooks for a run's ProfilingConfig; the base StepHooks when nothing is enabled."""
    return StepHooks()
