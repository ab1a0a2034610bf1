"""AdamW parameter groups, fused/foreach selection, schedules, clipping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lmtrain.config import OptimizerConfig, ScheduleConfig
from lmtrain.optim import build_optimizer, clip_grad_norm, fused_supported, lr_at, param_groups


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 8)
        self.norm = nn.LayerNorm(8)
        self.proj = nn.Linear(8, 8, bias=True)
        self.head = nn.Linear(8, 11, bias=False)

    def forward(self, x):
        return self.head(self.proj(self.norm(self.emb(x))))


def test_no_weight_decay_for_norms_biases_embeddings():
    model = Tiny()
    decay, no_decay = param_groups(model, 0.1)
    ids = lambda ps: {id(p) for p in ps}  # noqa: E731
    assert ids(decay["params"]) == {id(model.proj.weight), id(model.head.weight)}
    assert ids(no_decay["params"]) == {
        id(model.emb.weight),
        id(model.norm.weight),
        id(model.norm.bias),
        id(model.proj.bias),
    }
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0


def test_shared_parameter_listed_once():
    model = Tiny()
    model.head.weight = model.emb.weight  # tied: must not appear twice (AdamW would refuse)
    groups = param_groups(model, 0.1)
    all_ids = [id(p) for g in groups for p in g["params"]]
    assert len(all_ids) == len(set(all_ids))


def test_fused_on_cpu_when_supported_else_foreach():
    model = Tiny()
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, fused=True), "cpu")
    if fused_supported("cpu"):
        assert opt.defaults["fused"] is True
    else:
        assert opt.defaults["foreach"] is True
    opt = build_optimizer(model, OptimizerConfig(lr=1e-3, fused=False), "cpu")
    assert opt.defaults["foreach"] is True and not opt.defaults["fused"]
    # And both take a real step.
    model(torch.tensor([[1, 2, 3]])).sum().backward()
    before = model.proj.weight.detach().clone()
    opt.step()
    assert not torch.equal(before, model.proj.weight)


def test_fused_and_foreach_agree():
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    oa = build_optimizer(a, OptimizerConfig(lr=1e-2, fused=True), "cpu")
    ob = build_optimizer(b, OptimizerConfig(lr=1e-2, fused=False), "cpu")
    x = torch.randint(0, 11, (4, 5))
    for _ in range(3):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            m(x).pow(2).mean().backward()
            o.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-5, atol=1e-6)


def test_constant_schedule_warms_up_then_stays():
    cfg = ScheduleConfig(name="constant", warmup_steps=4)
    assert [lr_at(s, cfg, 1.0, 100) for s in (1, 2, 4, 5, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]


def test_cosine_schedule_ends_at_min_lr():
    cfg = ScheduleConfig(name="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(10, cfg, 2.0, 110) == pytest.approx(2.0)
    assert lr_at(60, cfg, 2.0, 110) == pytest.approx(0.2 + 1.8 * 0.5)  # half way: mean of peak and min
    assert lr_at(110, cfg, 2.0, 110) == pytest.approx(0.2)
    lrs = [lr_at(s, cfg, 2.0, 110) for s in range(10, 111)]
    assert all(x >= y for x, y in zip(lrs, lrs[1:]))  # monotone decay after warmup


def test_wsd_schedule_is_flat_then_decays_linearly():
    cfg = ScheduleConfig(name="wsd", warmup_steps=5, min_lr_ratio=0.0, decay_fraction=0.2)
    total = 100
    assert lr_at(50, cfg, 1.0, total) == 1.0
    assert lr_at(80, cfg, 1.0, total) == 1.0
    assert lr_at(90, cfg, 1.0, total) == pytest.approx(0.5)
    assert lr_at(100, cfg, 1.0, total) == pytest.approx(0.0)


def test_no_warmup_starts_at_peak():
    cfg = ScheduleConfig(name="cosine", warmup_steps=0)
    assert lr_at(1, cfg, 1.0, 1000) == pytest.approx(1.0, rel=1e-4)


def two_equal_models_with_large_gradients() -> tuple[Tiny, Tiny]:
    torch.manual_seed(0)
    a, b = Tiny(), Tiny()
    b.load_state_dict(a.state_dict())
    x = torch.randint(0, 11, (4, 5))
    for m in (a, b):
        (m(x) * 100).sum().backward()
    return a, b


def test_clip_matches_torch_and_detects_non_finite():
    a, b = two_equal_models_with_large_gradients()
    norm, finite = clip_grad_norm(list(a.parameters()), 1.0)
    ref = torch.nn.utils.clip_grad_norm_(list(b.parameters()), 1.0)
    assert finite and norm == pytest.approx(float(ref), rel=1e-5)
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
    a.proj.weight.grad[0, 0] = math.nan
    kept = a.head.weight.grad.clone()
    norm, finite = clip_grad_norm(list(a.parameters()), 1.0)
    assert not finite and math.isnan(norm)
    assert torch.equal(kept, a.head.weight.grad)  # left untouched for the caller to skip


def test_clip_zero_measures_only():
    m = Tiny()
    m(torch.tensor([[1, 2]])).sum().mul(1000).backward()
    before = [p.grad.clone() for p in m.parameters()]
    norm, finite = clip_grad_norm(list(m.parameters()), 0.0)
    assert finite and norm > 1.0
    assert all(torch.equal(g, p.grad) for g, p in zip(before, m.parameters()))


def test_clip_accepts_a_generator_like_torch():
    a, b = two_equal_models_with_large_gradients()
    norm, finite = clip_grad_norm(a.parameters(), 1.0)  # a generator, as users write it
    ref = torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
    assert finite and norm == pytest.approx(float(ref), rel=1e-5) and norm > 1.0
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad)
