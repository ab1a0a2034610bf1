"""AdamW with weight-decay parameter groups, learning-rate schedules as pure functions of the step, and
gradient clipping with non-finite detection.

    python -c "from lmtrain.optim import lr_at; from lmtrain.config import ScheduleConfig; print(lr_at(5, ScheduleConfig(), 1e-3, 100))"
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from lmtrain.config import OptimizerConfig, ScheduleConfig
from lmtrain.errors import UserError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: matrices decay; norms, biases (any parameter with fewer than 2 dims) and embedding
    tables do not. Each parameter appears once, even when shared."""
    decay: list[nn.Parameter] = []
    no_decay: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            if isinstance(module, nn.Embedding) or param.ndim < 2:
                no_decay.append(param)
            else:
                decay.append(param)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fused_supported(device_type: str) -> bool:
    """Whether torch has a fused AdamW kernel for this device type (CUDA, and CPU in torch >= 2.4)."""
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device_type in _get_fused_kernels_supported_devices()
    except ImportError:  # older torch: only CUDA had the fused kernel
        return device_type == "cuda"


def build_optimizer(model: nn.Module, cfg: OptimizerConfig, device_type: str) -> torch.optim.AdamW:
    """torch AdamW, fused when asked for and supported on `device_type`, else the foreach kernel."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise UserError("the model has no trainable parameters: nothing for the optimizer to update")
    use_fused = cfg.fused and fused_supported(device_type)
    if cfg.fused and not use_fused:
        from lmtrain.log import logger

        logger.warning("optim.fused: no fused AdamW kernel for device type %s; using foreach", device_type)
    kwargs = dict(fused=True) if use_fused else dict(foreach=True)
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, weight_decay=cfg.weight_decay, **kwargs
    )


def lr_at(step: int, cfg: ScheduleConfig, peak_lr: float, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (counted from 1) out of `total_steps`.

    All schedules warm up linearly: step s <= warmup_steps gets peak * s / warmup_steps.
    """
    assert step >= 1, step
    warmup = cfg.warmup_steps
    if warmup > 0 and step <= warmup:
        return peak_lr * step / warmup
    if cfg.name == "constant":
        return peak_lr
    min_lr = peak_lr * cfg.min_lr_ratio
    if cfg.name == "cosine":
        span = max(total_steps - warmup, 1)
        progress = min(max(step - warmup, 0) / span, 1.0)
        return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if cfg.name == "wsd":
        decay_steps = max(1, math.ceil(cfg.decay_fraction * total_steps))
        decay_start = max(total_steps - decay_steps, warmup)
        if step <= decay_start:
            return peak_lr
        progress = min((step - decay_start) / max(total_steps - decay_start, 1), 1.0)
        return peak_lr + (min_lr - peak_lr) * progress
    raise AssertionError(f"unknown schedule {cfg.name}")


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def _grads(params: Iterable[nn.Parameter]) -> list[torch.Tensor]:
    return [p.grad for p in params if p.grad is not None]


def grad_norm(params: Iterable[nn.Parameter]) -> torch.Tensor:
    """Global L2 norm of the gradients as a 0-d fp32 tensor (full norm, also for sharded DTensor grads)."""
    grads = _grads(params)
    if not grads:
        return torch.zeros(())
    norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0, foreach=True)
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor partial over the shards
        norm = norm.full_tensor()
    return norm.float()


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> tuple[float, bool]:
    """Clip to `max_norm` (0: measure only). Returns (norm before clipping, finite). Non-finite gradients
    are left untouched: the caller skips the step. `params` may be any iterable, a generator included
    (`model.parameters()`), as for torch.nn.utils.clip_grad_norm_."""
    params = list(params)  # read twice: once for the norm, once to scale
    norm = grad_norm(params)
    value = float(norm)
    finite = math.isfinite(value)
    if finite and max_norm > 0 and value > max_norm:
        # A python scalar multiplies plain tensors and sharded DTensors alike.
        torch._foreach_mul_(_grads(params), max_norm / (value + 1e-6))
    return value, finite
