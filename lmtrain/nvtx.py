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

GEMM ranges describe themselves, so that a trace is read with no model config:

    FeedForward/w1 [gemm M=8192 N=1536 K=512 dtype=bf16]
    Attention/sdpa [gemm B=64 M=1024 N=1024 K=64 dtype=bf16]

`NAME [gemm B=.. M=.. N=.. K=.. dtype=..]`: the range's (batched) product is B independent M x K @ K x N
GEMMs, B omitted when 1; dtype is the input type (`bf16`, `fp16`, `fp32`, `fp8`, ...). `gemm_range(name,
m, n, k)` returns the plain no-op while ranges are disabled and formats the text only when enabled;
`parse_gemm_label(text)` reads it back. The FLOPs of a range are 2 B M N K, however many kernels it
launches.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re

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


def gemm_label(name: str, m: int, n: int, k: int, batch: int = 1, dtype: str | None = None) -> str:
    """`name [gemm B=.. M=.. N=.. K=.. dtype=..]`, the self-describing GEMM range text."""
    dims = (f"B={batch} " if batch != 1 else "") + f"M={m} N={n} K={k}"
    return f"{name} [gemm {dims}{f' dtype={dtype}' if dtype else ''}]"


_GEMM_LABEL = re.compile(r"^(?P<name>.*?) \[gemm (?P<fields>[^\]]*)\]$")
_GEMM_FIELD = re.compile(r"(B|M|N|K|dtype)=(\S+)")


def parse_gemm_label(text: str) -> tuple[str, tuple[int, int, int, int, str | None]] | None:
    """(name, (batch, M, N, K, dtype)) of a gemm_label() text, or None for any other range text."""
    match = _GEMM_LABEL.match(text)
    if not match:
        return None
    fields = dict(_GEMM_FIELD.findall(match.group("fields")))
    try:
        dims = tuple(int(fields[key]) for key in ("M", "N", "K"))
        batch = int(fields.get("B", 1))
    except (KeyError, ValueError):
        return None
    return match.group("name"), (batch, *dims, fields.get("dtype"))


def gemm_range(name: str, m: int, n: int, k: int, batch: int = 1, dtype=None):
    """nvtx_range() whose text carries the GEMM's shape (see the module docstring); free when disabled.

    `dtype` may be a torch.dtype or a string; the text is only formatted while ranges are enabled.
    """
    if not _enabled:
        return _NULL
    return _Range(gemm_label(name, m, n, k, batch, _dtype_name(dtype)))


def linear_range(name: str, x, linear):
    """gemm_range() of an nn.Linear on `x`, `x @ W.T`: M = rows of x, N = out features, K = in features."""
    if not _enabled:
        return _NULL
    k = x.shape[-1]
    n = linear.weight.shape[0]
    return _Range(gemm_label(name, x.numel() // k, n, k, 1, _dtype_name(_compute_dtype(x))))


def attention_range(name: str, q, k):
    """gemm_range() of attention's two products for q (B, H, T, hd) and k (B, Hkv, S, hd): Q K^T and P V
    are 2·B·H GEMMs with the FLOPs of T x S x hd each (the math path; flash kernels are not GEMMs)."""
    if not _enabled:
        return _NULL
    b, h, t, hd = q.shape
    return _Range(gemm_label(name, t, k.shape[-2], hd, 2 * b * h, _dtype_name(_compute_dtype(q))))


def _compute_dtype(x):
    """The dtype a matmul on `x` runs in: autocast's when it is on for x's device, else x's own."""
    import torch  # only reached with ranges enabled, from code that already uses torch

    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


_TORCH_DTYPE_NAMES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64",
                      "float8_e4m3fn": "fp8", "float8_e5m2": "fp8"}  # fmt: skip


def _dtype_name(dtype) -> str | None:
    if dtype is None:
        return None
    text = str(dtype).removeprefix("torch.")
    return _TORCH_DTYPE_NAMES.get(text, text)


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
