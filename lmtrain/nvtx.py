"""NVTX ranges that cost nothing unless enabled.

    from lmtrain.nvtx import nvtx_range
    with nvtx_range("FeedForward/w1"):
        ...

`nvtx_range(name)` returns a shared no-op context manager while ranges are disabled (the default), so
the model and the training loop can be instrumented unconditionally. `enable()` switches to real
NVTX push/pop ranges through the first backend that loads:

1. `ctypes` calls into `libnvToolsExt.so.1` (NVTX v2 C API: nvtxRangePushA / nvtxRangePop). Every
   Nsight Systems version records these, including 2022.4, which drops the ranges of the PyPI `nvtx`
   package 0.2.12-0.2.17.
2. The PyPI `nvtx` package (`nvtx.push_range` / `nvtx.pop_range`); current nsys versions record it.
3. `torch.cuda.nvtx` (needs a CUDA build of PyTorch).

Without a profiler attached, NVTX calls return at once (no injection library is loaded).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os

_NULL = contextlib.nullcontext()
_enabled = False
_backend: str | None = None
_push = None
_pop = None

BACKENDS = ("libnvtoolsext", "nvtx", "torch")


def enabled() -> bool:
    return _enabled


def backend() -> str | None:
    """Name of the loaded backend (`libnvtoolsext`, `nvtx`, `torch`), or None before enable()."""
    return _backend


class _Range:
    __slots__ = ("name",)

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        _push(self.name)
        return self

    def __exit__(self, *exc) -> None:
        _pop()


def nvtx_range(name: str):
    """A context manager around one NVTX push/pop range named `name` (a no-op when disabled)."""
    if not _enabled:
        return _NULL
    return _Range(name)


def push(name: str) -> None:
    """Open a range that a later pop() closes (for ranges that span hook calls); no-op when disabled."""
    if _enabled:
        _push(name)


def pop() -> None:
    if _enabled:
        _pop()


def _load_libnvtoolsext():
    candidates = ["libnvToolsExt.so.1", "libnvToolsExt.so"]
    found = ctypes.util.find_library("nvToolsExt")
    if found:
        candidates.append(found)
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if cuda_home:
        candidates.append(os.path.join(cuda_home, "lib64", "libnvToolsExt.so.1"))
    for name in candidates:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        push_a, pop_ = lib.nvtxRangePushA, lib.nvtxRangePop
        push_a.argtypes = [ctypes.c_char_p]
        push_a.restype = ctypes.c_int
        pop_.argtypes = []
        pop_.restype = ctypes.c_int
        return _encoding(push_a), pop_
    raise OSError("libnvToolsExt.so.1 not found (Debian/Ubuntu: libnvtoolsext1; or a CUDA toolkit's lib64)")


def _encoding(push_a):
    def push_text(text: str) -> None:
        push_a(text.encode())

    return push_text


def _load_nvtx_package():
    import nvtx

    return (lambda text: nvtx.push_range(text)), nvtx.pop_range


def _load_torch():
    import torch

    if not torch.cuda.is_available():
        raise OSError("torch.cuda.nvtx needs a CUDA build of PyTorch and a GPU")
    return torch.cuda.nvtx.range_push, torch.cuda.nvtx.range_pop


_LOADERS = {"libnvtoolsext": _load_libnvtoolsext, "nvtx": _load_nvtx_package, "torch": _load_torch}


def enable(prefer: str | None = None) -> str:
    """Switch NVTX ranges on; returns the backend used. `prefer` (or LMTRAIN_NVTX_BACKEND) picks one.

    Raises RuntimeError listing why each backend failed when none loads.
    """
    global _enabled, _backend, _push, _pop
    prefer = prefer or os.environ.get("LMTRAIN_NVTX_BACKEND") or None
    if prefer is not None and prefer not in _LOADERS:
        raise ValueError(f"unknown NVTX backend '{prefer}': expected one of {', '.join(BACKENDS)}")
    order = [prefer] if prefer else list(BACKENDS)
    errors = []
    for name in order:
        try:
            _push, _pop = _LOADERS[name]()
        except (OSError, ImportError, AttributeError) as exc:
            errors.append(f"{name}: {exc}")
            continue
        _backend, _enabled = name, True
        return name
    raise RuntimeError("no NVTX backend could be loaded: " + "; ".join(errors))


def disable() -> None:
    """Back to no-op ranges (ranges already open stay open in the profiler's view)."""
    global _enabled
    _enabled = False
