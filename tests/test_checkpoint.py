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


def test_restored_optimizer_equals_the_saved_one():
    """AdamW's betas tuple comes back a tuple (torch's state-dict helpers turn it into a list)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    from lmtrain.distributed import load_full_optimizer_state

    torch.manual_seed(0)
    saved_model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    saved = torch.optim.AdamW(saved_model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    saved_model(torch.randn(3, 4)).sum().backward()
    saved.step()
    full = get_optimizer_state_dict(saved_model, saved, options=StateDictOptions(full_state_dict=True))
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
    model.load_state_dict(saved_model.state_dict())
    restored = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    load_full_optimizer_state(model, restored, full)
    assert restored.param_groups[0]["betas"] == (0.9, 0.95)
    assert isinstance(restored.param_groups[0]["betas"], tuple)
    assert restored.state_dict()["param_groups"] == saved.state_dict()["param_groups"]


def test_pruning_keeps_new_checkpoints_when_a_higher_step_is_present(tmp_path):
    """A file of a higher step (another run's, a copy, a corrupt one) never makes the new ones be pruned."""
    foreign = ckpt.checkpoint_path(tmp_path, 500)
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"not a checkpoint")
    for step in (2, 4, 6, 8):
        ckpt.save_checkpoint(tmp_path, _state(step), keep_last=2)
    assert [s for s, _ in ckpt.find_checkpoints(tmp_path)] == [6, 8, 500]
    path, state = ckpt.load_latest_valid(tmp_path)  # the corrupt step 500 is skipped
    assert state["step"] == 8


def test_all_unreadable_checkpoints_fail_with_each_file_and_error(tmp_path):
    for step in (3, 6):
        ckpt.save_checkpoint(tmp_path, _state(step))
    ckpt.checkpoint_path(tmp_path, 3).write_bytes(b"PK\x03\x04 truncated")
    ckpt.checkpoint_path(tmp_path, 6).write_bytes(b"")
    with pytest.raises(UserError) as err:
        ckpt.load_latest_valid(tmp_path)
    message = str(err.value)
    assert "none of the 2 checkpoints" in message
    assert "step-00000003.pt: " in message and "step-00000006.pt: " in message
    assert "move them away" in message
    with pytest.raises(UserError, match="none of the 2 checkpoints"):
        ckpt.load_for_inference(tmp_path)


@pytest.mark.parametrize("content", [b"", b"\x80\x02garbage pickle", b"PK\x03\x04" + b"\0" * 40])
def test_corrupt_file_is_a_user_error_naming_it(tmp_path, content):
    path = tmp_path / "given.pt"
    path.write_bytes(content)
    with pytest.raises(UserError, match=r"given\.pt is not a readable checkpoint"):
        ckpt.load_checkpoint(path)


def test_step_picks_one_checkpoint_and_a_missing_step_lists_the_others(tmp_path):
    for step in (2, 4):
        ckpt.save_checkpoint(tmp_path, _state(step))
    path, state = ckpt.load_latest_valid(tmp_path, step=2)
    assert state["step"] == 2 and path == ckpt.checkpoint_path(tmp_path, 2)
    with pytest.raises(UserError, match=r"no checkpoint of step 3 .* it has steps \[2, 4\]"):
        ckpt.load_latest_valid(tmp_path, step=3)


def test_stale_temporaries_are_removed(tmp_path):
    ckpt.save_checkpoint(tmp_path, _state(2))
    stale = ckpt.checkpoint_dir(tmp_path) / ".step-00000004.pt.tmp-999999"
    stale.write_bytes(b"half a checkpoint")
    assert ckpt.remove_stale_temporaries(tmp_path) == [stale]
    assert not stale.exists() and ckpt.checkpoint_path(tmp_path, 2).exists()


DISK_FULL_SCRIPT = """
import resource, signal, sys, torch
from lmtrain import checkpoint as ckpt
from lmtrain.errors import UserError
run = sys.argv[1]
base = {"model_args": {}, "optimizer": {}, "config": {}}
ckpt.save_checkpoint(run, {**base, "model": {"w": torch.zeros(1000)}, "step": 5})
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
try:
    ckpt.save_checkpoint(run, {**base, "model": {"w": torch.zeros(1 << 20)}, "step": 10})
except UserError as exc:
    print(exc)
    sys.exit(2)
"""


def test_a_failed_write_is_one_line_naming_path_space_and_the_intact_checkpoint(tmp_path):
    """A real write failure: the file size limit (RLIMIT_FSIZE) stops the write as a full disk would."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", DISK_FULL_SCRIPT, str(tmp_path)], cwd=repo,
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    line = out.stdout.strip()
    assert "\n" not in line
    assert f"could not write checkpoint {ckpt.checkpoint_path(tmp_path, 10)}" in line
    assert "needs about 4.0 MiB" in line and "MiB is free" in line
    assert line.endswith("the previous checkpoint (step 5) is intact")
    assert [s for s, _ in ckpt.find_checkpoints(tmp_path)] == [5]
    assert ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path, 5))["step"] == 5
    assert not list(ckpt.checkpoint_dir(tmp_path).glob(".*tmp*"))  # no half-written file left
