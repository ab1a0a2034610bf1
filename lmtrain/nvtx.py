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

    FeedForward/w1 (backward) [gemm M=8192 N=512 K=1536 dtype=bf16] [gemm M=1536 N=512 K=8192 dtype=bf16]

`NAME [gemm B=.. M=.. N=.. K=.. dtype=..]`: the range's (batched) product is B independent M x K @ K x N
GEMMs, B omitted when 1; dtype is the input type (`bf16`, `fp16`, `fp32`, `fp8`, ...). A range holding
several GEMMs lists one group each, as the backward range of a linear layer does (dgrad, then wgrad).
`gemm_range(name, m, n, k)` returns the plain no-op while ranges are disabled and formats the text only
when enabled; `parse_gemm_labels(text)` reads it back. The FLOPs of a range are the sum of 2 B M N K over
its groups, however many kernels it launches.

`linear_range(name, x, linear)` also opens `NAME (backward)` around the layer's backward node when
autograd records the forward: a pre-hook on the node that receives the output's gradient pushes it, a
hook on the matmul node that computes the input and weight gradients pops it. Backward runs on
autograd's own thread on a GPU, where no forward range is open; this range is what ties the two
gradient GEMMs to their layer there.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import re

_NULL = contextlib.nullcontext()
NO_RANGE = _NULL  # the shared no-op context manager every disabled range returns
_enabled = False
_backend: str | None = None
_push = None
_pop = None

BACKENDS = ("libnvtoolsext", "nvtx", "torch")


def enabled() -> bool:
    return _enabled


def eager_enabled() -> bool:
    """enabled(), and not inside torch.compile's tracing: there a push/pop is a Python side effect that
    would break the graph (fullgraph=True fails), and the compiled kernels no longer map onto the code
    the ranges name. Callers return `NO_RANGE` when this is False; it checks the flag first, so the
    common case (ranges off) costs one global read."""
    if not _enabled:
        return False
    import torch  # only reached with ranges enabled, from code that already uses torch

    return not torch.compiler.is_compiling()


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


_GEMM_GROUP = re.compile(r" \[gemm ([^\]]*)\]")
_GEMM_FIELD = re.compile(r"(B|M|N|K|dtype)=(\S+)")


def parse_gemm_labels(text: str) -> tuple[str, list[tuple[int, int, int, int, str | None]]] | None:
    """(name, [(batch, M, N, K, dtype), ...]) of a text ending in one or more `[gemm ...]` groups, else None."""
    first = text.find(" [gemm ")
    if first < 0 or not text.endswith("]"):
        return None
    rest = text[first:]
    if _GEMM_GROUP.sub("", rest):  # anything but groups after the name
        return None
    shapes = []
    for group in _GEMM_GROUP.findall(rest):
        fields = dict(_GEMM_FIELD.findall(group))
        try:
            dims = tuple(int(fields[key]) for key in ("M", "N", "K"))
            batch = int(fields.get("B", 1))
        except (KeyError, ValueError):
            return None
        shapes.append((batch, *dims, fields.get("dtype")))
    return text[:first], shapes


def parse_gemm_label(text: str) -> tuple[str, tuple[int, int, int, int, str | None]] | None:
    """(name, (batch, M, N, K, dtype)) of a gemm_label() text with one group, or None for any other text."""
    parsed = parse_gemm_labels(text)
    if parsed is None or len(parsed[1]) != 1:
        return None
    return parsed[0], parsed[1][0]


def gemm_range(name: str, m: int, n: int, k: int, batch: int = 1, dtype=None):
    """nvtx_range() whose text carries the GEMM's shape (see the module docstring); free when disabled.

    `dtype` may be a torch.dtype or a string; the text is only formatted while ranges are enabled.
    """
    if not _enabled:
        return _NULL
    return _Range(gemm_label(name, m, n, k, batch, _dtype_name(dtype)))


def gemms_range(name: str, shapes: list[tuple[int, int, int]], dtype=None):
    """nvtx_range() around several GEMMs, one `[gemm M=.. N=.. K=..]` group per (M, N, K) in `shapes`
    (the form of a linear layer's backward range); free when disabled."""
    if not _enabled:
        return _NULL
    dtype = _dtype_name(dtype)
    first, *rest = shapes
    return _Range(gemm_label(name, *first, 1, dtype) + "".join(gemm_label("", *s, 1, dtype) for s in rest))


def linear_range(name: str, x, linear):
    """gemm_range() of an nn.Linear on `x`, `x @ W.T`: M = rows of x, N = out features, K = in features;
    with autograd recording, also the `NAME (backward)` range of its two gradient GEMMs (module docstring)."""
    if not _enabled:
        return _NULL
    k = x.shape[-1]
    m, n = x.numel() // k, linear.weight.shape[0]
    dtype = _dtype_name(_compute_dtype(x))
    backward = None
    if x.requires_grad or linear.weight.requires_grad:
        import torch

        if torch.is_grad_enabled():
            # dgrad: dY (M, N) @ W (N, K); wgrad: dY^T (N, M) @ X (M, K).
            backward = gemm_label(f"{name} (backward)", m, k, n, 1, dtype) + gemm_label("", n, k, m, 1, dtype)
    return _LinearRange(gemm_label(name, m, n, k, 1, dtype), linear, backward)


class _LinearRange(_Range):
    """The forward range of a linear layer; a forward hook on the layer adds the backward range's hooks."""

    __slots__ = ("linear", "backward", "handle")

    def __init__(self, name: str, linear, backward: str | None):
        super().__init__(name)
        self.linear, self.backward, self.handle = linear, backward, None

    def __enter__(self):
        _push(self.name)
        if self.backward is not None:
            self.handle = self.linear.register_forward_hook(self._on_output)
        return self

    def __exit__(self, *exc) -> None:
        if self.handle is not None:
            self.handle.remove()
        _pop()

    def _on_output(self, module, inputs, output) -> None:
        node = getattr(output, "grad_fn", None)
        if node is None:
            return
        # The node computing the gradients: the output's own (2-D input) or the matmul below a view (3-D).
        end, seen = node, 0
        while (
            not _MATMUL_NODE.search(end.name())
            and seen < 3
            and end.next_functions
            and end.next_functions[0][0]
        ):
            end, seen = end.next_functions[0][0], seen + 1
        if not _MATMUL_NODE.search(end.name()):
            end = node
        push_, pop_, text = _push, _pop, self.backward

        def open_backward(grad_outputs) -> None:  # hooks return None: the gradients stay as they are
            push_(text)

        def close_backward(grad_inputs, grad_outputs) -> None:
            pop_()

        node.register_prehook(open_backward)
        end.register_hook(close_backward)


_MATMUL_NODE = re.compile(r"^(Mm|Addmm|Bmm|Baddbmm|Matmul|Linear)Backward")


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
