"""NVTX ranges that cost nothing unless enabled.

    from profiling.nvtx import nvtx_range
    with nvtx_range("FeedForward/w1"):
        ...

`nvtx_range(name)` returns a shared no-op context manager while ranges are disabled (the default), so
the model and the training loop can be instrumented unconditionally. `enable()` switches to real
NVTX push/pop ranges.
"""

from __future__ import annotations

import contextlib

_NULL = contextlib.nullcontext()
_enabled = False


def enabled() -> bool:
    return _enabled


def nvtx_range(name: str):
    """A context manager around one NVTX push/pop range named `name` (a no-op when disabled)."""
    if not _enabled:
        return _NULL
    return _backend_range(name)


def _backend_range(name: str):  # replaced when the NVTX backend is loaded by enable()
    return _NULL


def enable() -> None:
    raise NotImplementedError("NVTX backend not implemented yet")
