"""Synthetic Nsight Systems SQLite exports with known answers, for tests and benchmarks.

    python -c "from lmtrain.profiling.nsys_synth import write_export; print(write_export('/tmp/synth.sqlite', steps=2))"

The export has the tables and columns the report reads (StringIds, META_DATA_EXPORT, TARGET_INFO_GPU,
CUPTI_ACTIVITY_KIND_KERNEL/RUNTIME, NVTX_EVENTS) in the layout nsys writes: every kernel has a runtime
launch call with the same correlationId in the same process, nested NVTX push/pop ranges on the launching
thread (step > forward > layers.i > FeedForward/w1 > optional emit_nvtx op range > launch call). With
`backward=True`, each step also runs a backward pass on a second thread, as PyTorch's autograd thread does
on a GPU: per forward GEMM a `MmBackward0, seq = N` Function range (N = the forward op's seq) holding the
two gradient GEMMs, each under its own `aten::mm` op range, and no user range. Each GEMM kernel lasts
exactly its FLOPs / `gemm_tflops`, so the expected achieved rate is known.

`range_style` picks how the FFN ranges name their GEMMs: "emit_nvtx" (user ranges `FeedForward/w1` with
an `aten::mm, seq = N, op_id = N, sizes = ...` op range inside when `with_sizes`), "lmtrain" (lmtrain's
self-describing `FeedForward/w1 [gemm M=.. N=.. K=.. dtype=bf16]`, no op ranges) or "plain" (a script's
own `nvtx.annotate("w1")`: `w1`, `w3`, `w2` and no shapes). `gemm_name` is the GEMM kernel's name.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from pathlib import Path

from lmtrain.nvtx import gemm_label

PID = 4242
GLOBAL_PID = PID << 24
MAIN_TID = GLOBAL_PID | 4242
AUTOGRAD_TID = GLOBAL_PID | 4243
GEMM_NAME = "nvjet_tst_192x192_64x4_2x1_v_bz_coopB_bias_TNN"
SPLIT_K_NAME = (
    "void cublasLt::splitKreduce_kernel<32, 16, int, float, __nv_bfloat16, float, __nv_bfloat16, true, false, false>"
    "(cublasLt::cublasSplitKParams<float>, float const*, __nv_bfloat16 const*, __nv_bfloat16*, float const*, "
    "float const*, __nv_bfloat16 const*, float const*, __nv_bfloat16*, void*, long, float*, int*)"
)
OTHER_NAME = "void at::native::vectorized_elementwise_kernel<(int)4, at::native::CUDAFunctor_add<float>>(int)"
FFN_RANGES = ("FeedForward/w1", "FeedForward/w3", "FeedForward/w2")


@dataclass
class SynthResult:
    path: Path
    kernels: int
    gemm_kernels: int
    ffn_shapes: dict[str, tuple[int, int, int, int]]
    """(batch, M, N, K) per FFN range, as model_range_shapes would give them."""


def write_export(
    path: str | Path,
    *,
    steps: int = 2,
    n_layers: int = 2,
    tokens: int = 4096,
    dim: int = 512,
    hidden: int = 1536,
    with_sizes: bool = True,
    backward: bool = False,
    gemm_tflops: float = 500.0,
    extra_kernels_per_gemm: int = 1,
    device_name: str | None = "NVIDIA H100 80GB HBM3",
    range_style: str = "emit_nvtx",
    gemm_name: str = GEMM_NAME,
    gemm_names: dict[str, str] | None = None,
    split_k: bool = False,
    extra_kernels: tuple[str, ...] = (),
    device_id: int = 0,
    gpus: tuple[tuple[int, str], ...] | None = None,
    lmtrain_backward: bool = False,
) -> SynthResult:
    """Write the export; see the module docstring. `gemm_names` maps an FFN range to its GEMM kernel's name
    (default `gemm_name`); `split_k` adds a cuBLAS split-K reduction after each GEMM; `extra_kernels` are
    launched once per layer outside the FFN ranges (2-3 us). Kernels run on `device_id`; `gpus` are the
    (id, name) rows of TARGET_INFO_GPU (default: one row, `device_name` as device 0). With `backward` and
    `lmtrain_backward`, the backward thread opens lmtrain's own `FeedForward/wN (backward) [gemm ..] [gemm ..]`
    ranges (lmtrain.nvtx.linear_range) instead of emit_nvtx's Function and op ranges."""
    assert range_style in ("emit_nvtx", "lmtrain", "plain"), range_style
    gemm_names = {name: (gemm_names or {}).get(name, gemm_name) for name in FFN_RANGES}
    path = Path(path)
    path.unlink(missing_ok=True)
    conn = sqlite3.connect(path)
    conn.executescript(
        """
        CREATE TABLE StringIds (id INTEGER PRIMARY KEY, value TEXT NOT NULL);
        CREATE TABLE META_DATA_EXPORT (name TEXT, value TEXT);
        CREATE TABLE TARGET_INFO_GPU (id INTEGER, name TEXT);
        CREATE TABLE CUPTI_ACTIVITY_KIND_KERNEL (start INTEGER NOT NULL, "end" INTEGER NOT NULL,
            deviceId INTEGER, contextId INTEGER, streamId INTEGER, correlationId INTEGER, globalPid INTEGER,
            demangledName INTEGER NOT NULL, shortName INTEGER NOT NULL, gridX INTEGER, gridY INTEGER,
            gridZ INTEGER, blockX INTEGER, blockY INTEGER, blockZ INTEGER);
        CREATE TABLE CUPTI_ACTIVITY_KIND_RUNTIME (start INTEGER NOT NULL, "end" INTEGER NOT NULL,
            eventClass INTEGER, globalTid INTEGER, correlationId INTEGER, nameId INTEGER NOT NULL,
            returnValue INTEGER);
        CREATE TABLE NVTX_EVENTS (start INTEGER NOT NULL, "end" INTEGER, eventType INTEGER NOT NULL,
            rangeId INTEGER, text TEXT, globalTid INTEGER, textId INTEGER, domainId INTEGER);
        """
    )
    conn.executemany(
        "INSERT INTO META_DATA_EXPORT VALUES (?, ?)",
        [("EXPORT_PRODUCT_VERSION", "2024.5.1.113"), ("EXPORT_SCHEMA_VERSION", "3.13.2")],
    )
    if gpus is None:
        gpus = ((0, device_name),) if device_name else ()
    conn.executemany("INSERT INTO TARGET_INFO_GPU VALUES (?, ?)", gpus)
    strings = {gemm_name: 1, OTHER_NAME: 2, "cudaLaunchKernel": 3, "Kernel": 4}
    for name in (*gemm_names.values(), SPLIT_K_NAME, *extra_kernels):
        strings.setdefault(name, max(strings.values()) + 1)
    conn.executemany("INSERT INTO StringIds VALUES (?, ?)", [(i, s) for s, i in strings.items()])

    shapes = {
        "FeedForward/w1": (1, tokens, hidden, dim),
        "FeedForward/w3": (1, tokens, hidden, dim),
        "FeedForward/w2": (1, tokens, dim, hidden),
    }
    kernels: list[tuple] = []
    runtime: list[tuple] = []
    nvtx: list[tuple] = []
    t = 1_000_000  # CPU clock (ns)
    gpu = 1_000_000  # GPU clock (ns)
    corr = 0
    op_id = 0
    n_gemm = 0

    def launch(name_id: int, dur: int, tid: int = MAIN_TID) -> None:
        nonlocal t, gpu, corr
        corr += 1
        runtime.append((t, t + 2_000, 0, tid, corr, strings["cudaLaunchKernel"], 0))
        gpu = max(gpu, t + 5_000)
        kernels.append(
            (
                gpu,
                gpu + dur,
                device_id,
                1,
                7,
                corr,
                GLOBAL_PID,
                name_id,
                strings["Kernel"],
                1,
                132,
                1,
                384,
                1,
                1,
            )
        )
        gpu += dur + 1_000
        t += 3_000

    def push(name: str, tid: int = MAIN_TID) -> int:
        nonlocal t
        nvtx.append([t, None, 59, None, name, tid, None, 0])
        t += 500
        return len(nvtx) - 1

    def pop(index: int) -> None:
        nonlocal t
        t += 500
        nvtx[index][1] = t

    def gemm(m: int, n: int, k: int, op: str | None, tid: int = MAIN_TID, name: str = gemm_name) -> None:
        nonlocal op_id, n_gemm
        o = None
        if op is not None:
            op_id += 1
            sizes = f", sizes = [[{m}, {k}], [{k}, {n}]]" if with_sizes else ""
            o = push(f"{op}, op_id = {op_id}{sizes}", tid)
        launch(strings[name], round(2 * m * n * k / (gemm_tflops * 1e3)), tid)
        n_gemm += 1
        if split_k:
            launch(strings[SPLIT_K_NAME], 3_000, tid)
            n_gemm += 1
        if o is not None:
            pop(o)
        for _ in range(extra_kernels_per_gemm):
            launch(strings[OTHER_NAME], 2_000, tid)

    seq = 0
    for step in range(steps):
        s = push("step")
        f = push("forward")
        forward_seqs = []  # (seq of the forward mm, its shape, its range), in forward order
        for layer in range(n_layers):
            lr = push(f"layers.{layer}")
            for name in FFN_RANGES:
                _, m, n, k = shapes[name]
                if range_style == "lmtrain":
                    r = push(gemm_label(name, m, n, k, dtype="bf16"))
                else:
                    r = push(name if range_style == "emit_nvtx" else name.split("/")[-1])
                seq += 1
                emit_op = (with_sizes and range_style == "emit_nvtx") or (backward and not lmtrain_backward)
                gemm(m, n, k, f"aten::mm, seq = {seq}" if emit_op else None, name=gemm_names[name])
                forward_seqs.append((seq, (m, n, k), name))
                pop(r)
            for name in extra_kernels:  # durations that differ by layer and step, for medians
                launch(strings[name], 2_000 + 700 * (layer % 2) + 300 * step)
            pop(lr)
        pop(f)
        if backward:
            b = push("backward")
            for fwd_seq, (m, n, k), name in reversed(forward_seqs):
                # X (m, k) @ W (k, n): dX = dY (m, n) @ W^T (n, k); dW = X^T (k, m) @ dY (m, n).
                if lmtrain_backward:
                    label = gemm_label(f"{name} (backward)", m, k, n, dtype="bf16") + gemm_label(
                        "", k, n, m, dtype="bf16"
                    )
                    fn = push(label, AUTOGRAD_TID)
                    gemm(m, k, n, None, AUTOGRAD_TID, name=gemm_names[name])
                    gemm(k, n, m, None, AUTOGRAD_TID, name=gemm_names[name])
                    pop(fn)
                    continue
                op_id += 1
                fn = push(f"MmBackward0, seq = {fwd_seq}, op_id = {op_id}", AUTOGRAD_TID)
                gemm(m, k, n, "aten::mm, seq = 0", AUTOGRAD_TID)
                gemm(k, n, m, "aten::mm, seq = 0", AUTOGRAD_TID)
                pop(fn)
            pop(b)
        pop(s)
        del step
    conn.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_KERNEL VALUES (" + ",".join("?" * 15) + ")", kernels)
    conn.executemany("INSERT INTO CUPTI_ACTIVITY_KIND_RUNTIME VALUES (?, ?, ?, ?, ?, ?, ?)", runtime)
    conn.executemany("INSERT INTO NVTX_EVENTS VALUES (?, ?, ?, ?, ?, ?, ?, ?)", nvtx)
    conn.commit()
    conn.close()
    return SynthResult(path, len(kernels), n_gemm, shapes)
