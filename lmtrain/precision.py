"""Precision modes and loss scaling.

`precision.model_dtype` is the dtype of parameters, gradients and AdamW states (bf16 is the course's
mode: no master weights). `precision.amp` keeps fp32 master weights and runs the forward under autocast.
fp16 gradients underflow without loss scaling, so fp16 uses one of our scalers:

    python -c "from lmtrain.precision import DynamicLossScaler; s = DynamicLossScaler(); print(s.scale)"

A scaler multiplies the loss by `scale` before backward, divides the fp32 gradients by it before
clipping (`unscale_`), reports whether any gradient is inf/NaN (then the optimizer step is skipped)
and updates the scale (`update`). The dynamic scaler backs off on overflow and grows after
`growth_interval` clean steps, matching `torch.amp.GradScaler`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist

from lmtrain.config import PrecisionConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    return DTYPES[name]


def compute_dtype(cfg: PrecisionConfig) -> torch.dtype:
    """The dtype the matmuls run in (for the peak-FLOPs lookup)."""
    return DTYPES[cfg.amp] if cfg.amp != "none" else DTYPES[cfg.model_dtype]


def autocast(cfg: PrecisionConfig, device_type: str):
    """Autocast context for the forward pass; a no-op without `precision.amp`."""
    if cfg.amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=DTYPES[cfg.amp])


def _found_non_finite(grads: list[torch.Tensor]) -> bool:
    """True when any gradient element is inf/NaN on any process."""
    if grads:
        flags = torch.stack([(~torch.isfinite(_local(g))).any() for g in grads]).any().float()
    else:
        flags = torch.zeros(())
    if dist.is_available() and dist.is_initialized():
        # Sharded gradients: one shard's overflow must skip the step everywhere.
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return bool(flags.item())


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class LossScaler:
    """No scaling (scale 1). It does not scan the gradients: without scaling, an inf/NaN gradient makes
    the global gradient norm non-finite, which the clipping step detects anyway."""

    checks_overflow = False

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.scale != 1.0 else loss

    def unscale_(self, params: Iterable[torch.nn.Parameter]) -> bool:
        """Divide gradients by the scale in place; return True when any of them is inf/NaN."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.checks_overflow:
            assert self.scale == 1.0, "a scaled loss needs the overflow check of a scaler subclass"
            return False
        found_inf = _found_non_finite(grads)
        if self.scale != 1.0 and grads:
            assert all(g.dtype == torch.float32 for g in grads), "loss scaling needs fp32 master gradients"
            torch._foreach_mul_(grads, 1.0 / self.scale)
        return found_inf

    def update(self, found_inf: bool) -> None:
        """Called once per optimizer step, after unscale_."""

    def state_dict(self) -> dict:
        return {"kind": type(self).__name__, "scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        assert state["kind"] == type(self).__name__, (state["kind"], type(self).__name__)
        self.scale = float(state["scale"])


class StaticLossScaler(LossScaler):
    """A fixed scale; steps with inf/NaN gradients are skipped and the scale stays."""

    checks_overflow = True


class DynamicLossScaler(LossScaler):
    """Back off by `backoff_factor` on a step with inf/NaN gradients (and skip it); grow by
    `growth_factor` after `growth_interval` consecutive clean steps."""

    checks_overflow = True

    def __init__(
        self,
        init_scale: float = 2.0**16,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 2000,
    ):
        assert init_scale > 0 and growth_factor > 1 and 0 < backoff_factor < 1 and growth_interval >= 1
        super().__init__(init_scale)
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.clean_steps = 0
        self.skipped_steps = 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.clean_steps = 0
            self.skipped_steps += 1
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict:
        return {**super().state_dict(), "clean_steps": self.clean_steps, "skipped_steps": self.skipped_steps}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.clean_steps = int(state["clean_steps"])
        self.skipped_steps = int(state["skipped_steps"])


def build_loss_scaler(cfg: PrecisionConfig) -> LossScaler:
    """The scaler for this precision mode: fp16 autocast uses cfg.loss_scaler; everything else none."""
    if cfg.amp == "fp16" and cfg.loss_scaler == "dynamic":
        return DynamicLossScaler(cfg.init_scale, cfg.growth_factor, cfg.backoff_factor, cfg.growth_interval)
    if cfg.amp == "fp16" and cfg.loss_scaler == "static":
        return StaticLossScaler(cfg.init_scale)
    return LossScaler()
