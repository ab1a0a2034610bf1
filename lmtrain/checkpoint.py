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
import shutil
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


class CheckpointWriteError(UserError):
    """A checkpoint could not be written (disk full, quota, file size limit); the previous one is kept."""


def state_nbytes(obj: Any) -> int:
    """Bytes of the tensors in a (nested) state: about the size of its `torch.save` file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(state_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(state_nbytes(v) for v in obj)
    return 0


def _mib(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def atomic_torch_save(obj: Any, path: Path) -> None:
    """temp file in the same directory + fsync + rename (+ fsync of the directory).

    A failed write (no space left, quota, file size limit) removes the temporary file and raises a
    CheckpointWriteError naming the path, the space needed and the space free; `path` is untouched.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            torch.save(obj, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as a RuntimeError
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.strerror:
            reason = exc.strerror
        else:  # torch.save's "[enforce fail at inline_container.cc] unexpected pos" carries no errno
            reason = f"the write stopped after {_mib(written)}"
        free = shutil.disk_usage(path.parent).free
        raise CheckpointWriteError(
            f"could not write checkpoint {path}: {reason}; it needs about {_mib(state_nbytes(obj))} and "
            f"{_mib(free)} is free on that file system (unless a quota or file size limit is lower): free "
            "space or point training.output_dir elsewhere"
        ) from exc
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


def remove_stale_temporaries(run_dir: str | os.PathLike) -> list[Path]:
    """Delete `.step-N.pt.tmp-PID` files that a killed save left behind. Call while holding the run's
    lock: then no other process can be writing one."""
    d = checkpoint_dir(run_dir)
    stale = sorted(d.glob(".step-*.pt.tmp-*")) if d.is_dir() else []
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_checkpoint(run_dir: str | os.PathLike, state: dict, keep_last: int = 3) -> Path:
    """Write `state` (must contain `step`) as the checkpoint of that step and drop the oldest beyond
    `keep_last`. Call on rank 0 only; gather full state dicts first.

    Only checkpoints of this step or earlier are pruned: a run's steps only grow, so a file with a higher
    step was not written by it (a copied file, an abandoned future after a fallback) and is left alone.
    If the write fails, a CheckpointWriteError also names the newest checkpoint that is still intact.
    """
    required = {"model", "model_args", "optimizer", "step", "config"}
    missing = required - state.keys()
    assert not missing, f"checkpoint state lacks {sorted(missing)}"
    step = int(state["step"])
    path = checkpoint_path(run_dir, step)
    try:
        atomic_torch_save(state, path)
    except CheckpointWriteError as exc:
        previous = [s for s, _ in find_checkpoints(run_dir) if s < step]
        kept = (
            f"the previous checkpoint (step {previous[-1]}) is intact"
            if previous
            else "no earlier checkpoint"
        )
        raise CheckpointWriteError(f"{exc}; {kept}") from exc.__cause__
    ours = [p for s, p in find_checkpoints(run_dir) if s <= step]
    for old in ours[:-keep_last]:
        old.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load one checkpoint with weights_only=True (no arbitrary code from the file)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint not found: {path}; pass an existing .pt file or --checkpoint.resume auto"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, bad or malicious pickle, a foreign file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"{path} is not a readable checkpoint ({type(exc).__name__}: {first[:300]}); pass another "
            "checkpoint file or --checkpoint.resume auto"
        ) from exc
    if not isinstance(state, dict) or "model" not in state or "step" not in state:
        raise UserError(f"{path} is not an lmtrain checkpoint (expected a dict with `model` and `step`)")
    return state


def candidates(run_dir: str | os.PathLike, step: int | None = None) -> list[tuple[int, Path]]:
    """The checkpoints to try, newest first: all of them, or only the one of `step` (a UserError listing
    the steps there are when it is missing)."""
    found = find_checkpoints(run_dir)
    if step is None:
        return found[::-1]
    chosen = [(s, p) for s, p in found if s == step]
    if not chosen:
        raise UserError(
            f"no checkpoint of step {step} in {checkpoint_dir(run_dir)}; it has steps "
            f"{[s for s, _ in found] or 'none'}"
        )
    return chosen


def load_latest_valid(run_dir: str | os.PathLike, step: int | None = None) -> tuple[Path, dict] | None:
    """The newest checkpoint that loads (or the one of `step`); damaged newer ones are reported (and
    left for inspection). None when the run has no checkpoint; a UserError listing every file and its
    error when there are checkpoints but none can be read: "all unreadable" is not "none yet"."""
    errors = []
    for at, path in candidates(run_dir, step):
        try:
            return path, load_checkpoint(path)
        except Exception as exc:  # fall back to an older one
            logger.warning(
                "checkpoint %s (step %d) is unreadable (%s); trying the previous one", path, at, exc
            )
            errors.append(f"  {path.name}: {exc}")
    if errors:
        raise UserError(
            f"none of the {len(errors)} checkpoints in {checkpoint_dir(run_dir)} can be read:\n"
            + "\n".join(errors)
            + "\nrestore them from a copy, or move them away to start again from step 0"
        )
    return None


def load_for_inference(run_dir: str | os.PathLike, step: int | None = None) -> tuple[dict, dict]:
    """(model_args dict, prefix-free state dict) of a run's newest valid checkpoint (or of `step`)."""
    found = load_latest_valid(run_dir, step)
    if found is None:
        raise UserError(
            f"no readable checkpoint in {checkpoint_dir(run_dir)}; train with --checkpoint.interval N "
            "or let the run finish (it saves at the end)"
        )
    _, state = found
    return dict(state["model_args"]), clean_keys(state["model"])
