"""Checkpoints: one `torch.save` dict per step in `<run_dir>/checkpoints/step-XXXXXXXX.pt`.

    python -c "from lmtrain.checkpoint import find_checkpoints; print(find_checkpoints('runs/tiny-cpu-20260101-000000'))"

Keys: `model` (full state dict without `_orig_mod.`/`module.` prefixes), `model_args` (dict),
`optimizer` (full, keyed by parameter name), `scheduler`, `scaler`, `rng` (python, numpy, torch CPU and
CUDA), `data` (loader state), `step`, `config` (dict). Everything is a type that
`torch.load(weights_only=True)` accepts. Writes go to a temporary file, are fsynced and renamed, so a
killed job never leaves a half-written `step-*.pt`; a corrupt newest file (a damaged disk copy) is
reported and the previous checkpoint is used.
"""

from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmtrain.errors import UserError
from lmtrain.log import logger

_NAME = re.compile(r"^step-(\d{8,})\.pt$")
_PREFIXES = ("_orig_mod.", "module.")


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def checkpoint_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step-{step:08d}.pt"


def strip_prefixes(key: str) -> str:
    """`_orig_mod.module.layers.0.w` -> `layers.0.w` (torch.compile and DDP wrappers)."""
    return ".".join(part for part in key.split(".") if part not in ("_orig_mod", "module"))


def clean_keys(state: dict[str, Any]) -> dict[str, Any]:
    return {strip_prefixes(k): v for k, v in state.items()}


# -------------------------------------------------------------------------------------------- RNG


def capture_rng_state() -> dict:
    """RNG states of python, numpy, torch CPU and every CUDA device, in weights_only-loadable types."""
    version, internal, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": version, "state": list(internal), "gauss": gauss},
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------- save and find


def atomic_torch_save(obj: Any, path: Path) -> None:
    """temp file in the same directory + fsync + rename (+ fsync of the directory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def find_checkpoints(run_dir: str | os.PathLike) -> list[tuple[int, Path]]:
    """(step, path) of every checkpoint in the run directory, oldest first."""
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _NAME.match(p.name)
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


def save_checkpoint(run_dir: str | os.PathLike, state: dict, keep_last: int = 3) -> Path:
    """Write `state` (must contain `step`) as the checkpoint of that step and drop the oldest beyond
    `keep_last`. Call on rank 0 only; gather full state dicts first."""
    required = {"model", "model_args", "optimizer", "step", "config"}
    missing = required - state.keys()
    assert not missing, f"checkpoint state lacks {sorted(missing)}"
    path = checkpoint_path(run_dir, int(state["step"]))
    atomic_torch_save(state, path)
    for _, old in find_checkpoints(run_dir)[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load one checkpoint with weights_only=True (no arbitrary code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint not found: {path}; pass an existing .pt file or --checkpoint.resume auto"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"{path} is not an lmtrain checkpoint (expected a dict with `model` and `step`)")
    return state


def load_latest_valid(run_dir: str | os.PathLike) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads; damaged newer ones are reported (and left for inspection).
    None when the run has no checkpoint."""
    for step, path in reversed(find_checkpoints(run_dir)):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # truncated zip, bad pickle, wrong content: fall back to an older one
            logger.warning(
                "checkpoint %s (step %d) is unreadable (%s); trying the previous one", path, step, exc
            )
    return None


def load_for_inference(run_dir: str | os.PathLike) -> tuple[dict, dict]:
    """(model_args dict, prefix-free state dict) of a run's newest valid checkpoint."""
    found = load_latest_valid(run_dir)
    if found is None:
        raise UserError(
            f"no readable checkpoint in {checkpoint_dir(run_dir)}; train with --checkpoint.interval N "
            "or let the run finish (it saves at the end)"
        )
    _, state = found
    return dict(state["model_args"]), clean_keys(state["model"])
