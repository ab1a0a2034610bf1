"""Nsight Systems capture ranges, NVTX ranges and torch.profiler windows for lmtrain runs.

    hooks = build_step_hooks(cfg.profiling, run_dir, device)   # the trainer calls the hooks each step

- `lmtrain.nvtx` (or `profiling.profile`): NVTX ranges `step`, `forward`, `backward`, `optimizer` from
  the hooks, and the model's own ranges (`layers.N`, `Attention/wq`, `FeedForward/w1`, ...).
- `profiling.profile`: on CUDA, cudaProfilerStart at the start of step `profile_step_start` and
  cudaProfilerStop after step `profile_step_end` (for `nsys profile --capture-range=cudaProfilerApi`),
  with `profiling.emit_nvtx` entering `torch.autograd.profiler.emit_nvtx(record_shapes=True)` inside that
  window only. On CPU, where there is no CUDA profiler API, the same window runs torch.profiler instead.
- `profiling.torch_profile`: torch.profiler over the window; a Chrome trace and a summary (forward /
  backward / optimizer / data-loader wait, top operators by self time) in the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

from lmtrain import nvtx
from lmtrain.hooks import StepHooks

logger = logging.getLogger("lmtrain")

LABELS = ("lmtrain/data_wait", "lmtrain/forward", "lmtrain/backward", "lmtrain/optimizer")


def build_step_hooks(cfg, run_dir: Path, device) -> StepHooks:
    """Hooks for a run's ProfilingConfig; the base StepHooks when nothing is enabled."""
    if not (cfg.nvtx or cfg.profile or cfg.torch_profile or cfg.emit_nvtx):
        return StepHooks()
    return ProfilingHooks(cfg, Path(run_dir), device)


def _is_cuda(device) -> bool:
    return str(getattr(device, "type", device)).startswith("cuda")


class _Both:
    """Enter an NVTX range and (inside the torch.profiler window) a record_function label together."""

    __slots__ = ("hooks", "name", "label", "_rf")

    def __init__(self, hooks: ProfilingHooks, name: str):
        self.hooks, self.name, self.label, self._rf = hooks, name, f"lmtrain/{name}", None

    def __enter__(self):
        self.hooks._end_data_wait()
        if self.hooks.nvtx_on:
            nvtx.push(self.name)
        if self.hooks.torch_prof is not None:
            import torch

            self._rf = torch.profiler.record_function(self.label)
            self._rf.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._rf is not None:
            self._rf.__exit__(*exc)
            self._rf = None
        if self.hooks.nvtx_on:
            nvtx.pop()


class ProfilingHooks(StepHooks):
    def __init__(self, cfg, run_dir: Path, device):
        self.cfg = cfg
        self.run_dir = run_dir
        self.device = device
        self.cuda = _is_cuda(device)
        self.nvtx_on = bool(cfg.nvtx or cfg.profile)
        if self.nvtx_on:
            try:
                logger.info("NVTX ranges on (backend: %s)", nvtx.enable())
            except RuntimeError as exc:
                logger.warning("NVTX ranges off: %s", exc)
                self.nvtx_on = False
        # torch.profiler runs over the window when asked, and on CPU in place of the CUDA capture range.
        self.use_torch_profiler = bool(cfg.torch_profile or (cfg.profile and not self.cuda))
        if cfg.emit_nvtx and not self.cuda:
            logger.warning(
                "profiling.emit_nvtx needs CUDA; on CPU the window records shapes with torch.profiler"
            )
        self.torch_prof = None
        self.cuda_capture = False
        self.emit_ctx = None
        self.step_open = False
        self.data_wait_rf = None
        self.window_done = False
        self.summary_path: Path | None = None
        self.trace_path: Path | None = None

    # ------------------------------------------------------------------ window
    def _in_window(self, step: int) -> bool:
        return self.cfg.profile_step_start <= step <= self.cfg.profile_step_end

    def _start_window(self) -> None:
        if self.cfg.profile and self.cuda:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.profiler.start()  # cudaProfilerStart
            self.cuda_capture = True
            if self.cfg.emit_nvtx:
                self.emit_ctx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
                self.emit_ctx.__enter__()
        if self.use_torch_profiler:
            import torch

            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.torch_prof = torch.profiler.profile(activities=activities, record_shapes=True)
            self.torch_prof.start()
        logger.info("profile window: steps %d-%d", self.cfg.profile_step_start, self.cfg.profile_step_end)

    def _stop_window(self) -> None:
        if self.emit_ctx is not None:
            ctx, self.emit_ctx = self.emit_ctx, None
            ctx.__exit__(None, None, None)
        if self.cuda_capture:
            import torch

            torch.cuda.synchronize(self.device)
            torch.cuda.profiler.stop()  # cudaProfilerStop
            self.cuda_capture = False
        if self.torch_prof is not None:
            prof, self.torch_prof = self.torch_prof, None
            self._end_data_wait()
            prof.stop()
            self._write_torch_outputs(prof)
        self.window_done = True

    def _write_torch_outputs(self, prof) -> None:
        from lmtrain.torch_summary import summarise, write_summary

        rank = _rank()
        suffix = f"_rank{rank}" if rank else ""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.trace_path = self.run_dir / f"torch_trace{suffix}.json"
        tmp = self.trace_path.with_name(self.trace_path.name + ".tmp")
        prof.export_chrome_trace(str(tmp))
        tmp.replace(self.trace_path)
        summary = summarise(prof, steps=self.cfg.profile_step_end - self.cfg.profile_step_start + 1)
        self.summary_path = write_summary(
            summary, self.run_dir / f"torch_profile{suffix}.md", print_it=rank == 0
        )
        logger.info("torch profile: %s, %s", self.trace_path, self.summary_path)

    # ------------------------------------------------------------------ data wait
    def _end_data_wait(self) -> None:
        if self.data_wait_rf is not None:
            rf, self.data_wait_rf = self.data_wait_rf, None
            rf.__exit__(None, None, None)

    # ------------------------------------------------------------------ hooks
    def on_step_start(self, step: int) -> None:
        if (
            step == self.cfg.profile_step_start
            and not self.window_done
            and (self.cfg.profile or self.use_torch_profiler)
        ):
            self._start_window()
        if self.nvtx_on:
            nvtx.push("step")
            self.step_open = True
        if self.torch_prof is not None:
            import torch

            self.data_wait_rf = torch.profiler.record_function("lmtrain/data_wait")
            self.data_wait_rf.__enter__()

    def on_step_end(self, step: int) -> None:
        self._end_data_wait()
        if self.step_open:
            nvtx.pop()
            self.step_open = False
        if step >= self.cfg.profile_step_end and (self.torch_prof is not None or self.cuda_capture):
            self._stop_window()

    def forward(self):
        return _Both(self, "forward")

    def backward(self):
        return _Both(self, "backward")

    def optimizer(self):
        return _Both(self, "optimizer")

    def close(self) -> None:
        self._end_data_wait()
        if self.step_open:
            nvtx.pop()
            self.step_open = False
        if self.torch_prof is not None or self.cuda_capture or self.emit_ctx is not None:
            self._stop_window()


def _rank() -> int:
    try:
        import torch.distributed as dist

        return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    except Exception:  # noqa: BLE001 - a profiler must not break a job over its file name
        return 0


__all__ = ["build_step_hooks", "ProfilingHooks", "LABELS"]
