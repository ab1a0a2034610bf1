"""Checkpoint files: atomic writes, keep-last, weights_only loading, RNG state, corrupt files."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from torch import nn

from lmtrain import checkpoint as ckpt
from lmtrain.errors import UserError


def _state(step: int, model: nn.Module | None = None) -> dict:
    model = model or nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(1, 3)).sum().backward()
    opt.step()
    return {
        "model": {f"_orig_mod.module.{k}": v for k, v in model.state_dict().items()},
        "model_args": {"dim": 3, "n_kv_heads": None, "norm": "rmsnorm"},
        "optimizer": opt.state_dict(),
        "scheduler": {"name": "cosine", "step": step},
        "scaler": {"kind": "LossScaler", "scale": 1.0},
        "rng": ckpt.capture_rng_state(),
        "data": {"epoch": 0, "position": step * 16, "order": torch.arange(5)},
        "step": step,
        "config": {"training": {"steps": 10}},
    }


def test_save_find_keep_last_and_weights_only_load(tmp_path):
    for step in (1, 2, 3, 4):
        path = ckpt.save_checkpoint(tmp_path, _state(step), keep_last=2)
        assert path.name == f"step-{step:08d}.pt"
    found = ckpt.find_checkpoints(tmp_path)
    assert [s for s, _ in found] == [3, 4]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-00000003.pt",
        "step-00000004.pt",
    ]  # no temporary files left behind
    state = torch.load(found[-1][1], weights_only=True)
    assert state["step"] == 4 and state["optimizer"]["state"]


def test_missing_required_key_is_an_invariant(tmp_path):
    state = _state(1)
    del state["model_args"]
    with pytest.raises(AssertionError, match="model_args"):
        ckpt.save_checkpoint(tmp_path, state)


def test_rng_roundtrip_reproduces_draws(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    ckpt.save_checkpoint(tmp_path, _state(7))
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    _, state = ckpt.load_latest_valid(tmp_path)
    ckpt.restore_rng_state(state["rng"])
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_corrupt_newest_falls_back_to_previous(tmp_path, caplog):
    ckpt.save_checkpoint(tmp_path, _state(5))
    newest = ckpt.save_checkpoint(tmp_path, _state(10))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # truncated copy
    logging.getLogger("lmtrain").propagate = True
    with caplog.at_level(logging.WARNING, logger="lmtrain"):
        path, state = ckpt.load_latest_valid(tmp_path)
    assert state["step"] == 5 and path.name == "step-00000005.pt"
    assert "step-00000010.pt" in caplog.text and "unreadable" in caplog.text


def test_load_for_inference_strips_prefixes(tmp_path):
    model = nn.Linear(3, 2)
    ckpt.save_checkpoint(tmp_path, _state(3, model))
    args, sd = ckpt.load_for_inference(tmp_path)
    assert args["dim"] == 3
    fresh = nn.Linear(3, 2)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.weight, model.weight)


def test_no_checkpoint_is_a_user_error(tmp_path):
    assert ckpt.load_latest_valid(tmp_path) is None
    with pytest.raises(UserError, match="no readable checkpoint"):
        ckpt.load_for_inference(tmp_path)
    with pytest.raises(UserError, match="checkpoint not found"):
        ckpt.load_checkpoint(tmp_path / "nope.pt")


def test_foreign_file_is_a_user_error(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"weights": torch.ones(1)}, path)
    with pytest.raises(UserError, match="not an lmtrain checkpoint"):
        ckpt.load_checkpoint(path)


def test_strip_prefixes():
    assert ckpt.strip_prefixes("_orig_mod.module.layers.0.w") == "layers.0.w"
    assert ckpt.strip_prefixes("layers.0.attention.wq.weight") == "layers.0.attention.wq.weight"
