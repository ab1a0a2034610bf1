"""Loss scalers against torch.amp.GradScaler, fp16 underflow, precision config errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lmtrain.config import ConfigError, PrecisionConfig, parse_args
from lmtrain.precision import (
    DynamicLossScaler,
    LossScaler,
    StaticLossScaler,
    autocast,
    build_loss_scaler,
    compute_dtype,
)


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4))


def test_dynamic_scaler_matches_grad_scaler_on_cpu_fp16():
    """Same scale trajectory, same skipped steps and the same weights as torch.amp.GradScaler."""
    ref, ours = _mlp(), _mlp()
    ours.load_state_dict(ref.state_dict())
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1)
    kwargs = dict(init_scale=2.0**10, growth_factor=2.0, backoff_factor=0.5, growth_interval=3)
    gs = torch.amp.GradScaler("cpu", **kwargs)
    ls = DynamicLossScaler(**kwargs)
    overflow_steps = {2, 3, 9}
    g = torch.Generator().manual_seed(1)
    scales_ref, scales_ours, skipped_ref, skipped_ours = [], [], [], []
    for step in range(14):
        x = torch.randn(8, 16, generator=g)
        if step in overflow_steps:
            x = x * 1e5  # activations beyond fp16's 65504: inf loss and gradients
        # torch's GradScaler
        opt_ref.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ref(x).float().pow(2).mean()
        gs.scale(loss).backward()
        gs.unscale_(opt_ref)
        before = gs.get_scale()
        gs.step(opt_ref)
        gs.update()
        skipped_ref.append(gs.get_scale() < before)
        scales_ref.append(gs.get_scale())
        # ours
        opt_ours.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = ours(x).float().pow(2).mean()
        ls.scale_loss(loss).backward()
        found_inf = ls.unscale_(ours.parameters())
        if not found_inf:
            opt_ours.step()
        ls.update(found_inf)
        skipped_ours.append(found_inf)
        scales_ours.append(ls.scale)
    assert scales_ours == scales_ref
    assert skipped_ours == skipped_ref
    assert [i for i, s in enumerate(skipped_ours) if s] == sorted(overflow_steps)
    assert any(b > a for a, b in zip(scales_ours, scales_ours[1:]))  # it also grew
    assert ls.skipped_steps == len(overflow_steps)
    for a, b in zip(ref.parameters(), ours.parameters()):
        torch.testing.assert_close(a, b)


def test_small_gradients_underflow_without_scaling():
    def grads(scaler: LossScaler) -> torch.Tensor:
        torch.manual_seed(0)
        lin = nn.Linear(16, 16)
        x = torch.randn(4, 16)
        with torch.autocast("cpu", dtype=torch.float16):
            out = lin(x)
        loss = (out.float() * 1e-9).sum()  # d loss / d out = 1e-9: below fp16's smallest subnormal
        scaler.scale_loss(loss).backward()
        assert not scaler.unscale_(lin.parameters())
        return lin.weight.grad

    unscaled = grads(LossScaler())
    scaled = grads(StaticLossScaler(2.0**16))
    assert torch.count_nonzero(unscaled) == 0
    assert torch.count_nonzero(scaled) == scaled.numel()
    torch.manual_seed(0)
    lin = nn.Linear(16, 16)
    x = torch.randn(4, 16)
    lin(x).mul(1e-9).sum().backward()  # fp32 reference
    torch.testing.assert_close(scaled, lin.weight.grad, rtol=2e-2, atol=1e-12)


def test_static_scaler_skips_without_changing_scale():
    s = StaticLossScaler(128.0)
    p = nn.Parameter(torch.ones(3))
    p.grad = torch.tensor([1.0, float("inf"), 2.0])
    assert s.unscale_([p]) is True
    s.update(True)
    assert s.scale == 128.0


def test_scaler_state_roundtrip():
    s = DynamicLossScaler(init_scale=8.0, growth_interval=2)
    s.update(False)
    s.update(True)
    s.update(False)
    t = DynamicLossScaler(init_scale=1.0, growth_interval=2)
    t.load_state_dict(s.state_dict())
    assert (t.scale, t.clean_steps, t.skipped_steps) == (4.0, 1, 1)
    t.update(False)
    assert t.scale == 8.0


def test_build_loss_scaler_by_mode():
    assert isinstance(build_loss_scaler(PrecisionConfig(model_dtype="fp32", amp="fp16")), DynamicLossScaler)
    assert type(build_loss_scaler(PrecisionConfig(model_dtype="fp32", amp="fp16", loss_scaler="static"))) is (
        StaticLossScaler
    )
    assert type(build_loss_scaler(PrecisionConfig(model_dtype="bf16"))) is LossScaler
    assert type(build_loss_scaler(PrecisionConfig(model_dtype="fp32", amp="bf16"))) is LossScaler


def test_autocast_and_compute_dtype():
    cfg = PrecisionConfig(model_dtype="fp32", amp="bf16")
    assert compute_dtype(cfg) == torch.bfloat16
    with autocast(cfg, "cpu"):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with autocast(PrecisionConfig(model_dtype="fp32"), "cpu"):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.float32


def test_amp_with_bf16_master_weights_is_rejected():
    with pytest.raises(ConfigError, match="precision.model_dtype=fp32"):
        parse_args(["--precision.amp", "fp16", "--precision.model_dtype", "bf16"])
