"""Read Nsight Systems SQLite exports (nsys 2022-2026): kernel totals, GEMM attribution, NVTX ranges.

    from lmtrain.profiling.nsys_sqlite import open_export, kernel_summary, gemm_kernels, nvtx_summary
    export = open_export("trace.sqlite")
    kernel_summary(export)[:5]

Every table and column is probed before use (exports create tables lazily and versions add columns).
All aggregation runs in SQLite; Python only sees distinct kernel names, distinct shape strings and the
grouped rows. Kernels are attributed to NVTX ranges as `nsys stats` does: kernel -> CUDA runtime launch
call through (correlationId, process) -> the innermost push/pop or start/end range enclosing the launch
call on the launching thread.
"""

from __future__ import annotations

import ast
import contextlib
import itertools
import os
import re
import sqlite3
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from lmtrain.errors import UserError
from lmtrain.nvtx import parse_gemm_labels

KERNEL = "CUPTI_ACTIVITY_KIND_KERNEL"
RUNTIME = "CUPTI_ACTIVITY_KIND_RUNTIME"
NVTX = "NVTX_EVENTS"
RANGE_TYPES = (59, 60)  # NvtxPushPopRange, NvtxStartEndRange
DOMAIN_CREATE = 75

RECAPTURE_HINT = (
    "re-capture with CUDA tracing, e.g. `nsys profile --trace=cuda,nvtx,osrt --capture-range=cudaProfilerApi "
    "--capture-range-end=stop -o trace python -m lmtrain.train --profile ...` and export it with "
    "`nsys export --type sqlite trace.nsys-rep`"
)


@dataclass
class Export:
    path: Path
    conn: sqlite3.Connection
    tables: set[str]
    columns: dict[str, set[str]] = field(default_factory=dict)

    def has(self, table: str, *cols: str) -> bool:
        return table in self.tables and all(c in self.cols(table) for c in cols)

    def cols(self, table: str) -> set[str]:
        if table not in self.columns:
            if table not in self.tables:
                self.columns[table] = set()
            else:
                self.columns[table] = {r[1] for r in self.conn.execute(f'PRAGMA table_info("{table}")')}
        return self.columns[table]

    def metadata(self) -> dict[str, str]:
        """EXPORT_META_DATA (up to nsys 2023.x) or META_DATA_EXPORT (2024.x on), as a dict."""
        for table in ("META_DATA_EXPORT", "EXPORT_META_DATA"):
            if self.has(table, "name", "value"):
                return {str(n): str(v) for n, v in self.conn.execute(f"SELECT name, value FROM {table}")}
        return {}

    def version(self) -> str:
        meta = self.metadata()
        return meta.get("EXPORT_PRODUCT_VERSION") or meta.get("EXPORT_SCHEMA_VERSION") or "unknown"

    def device_names(self) -> list[str]:
        if not self.has("TARGET_INFO_GPU", "name"):
            return []
        return [
            r[0]
            for r in self.conn.execute("SELECT DISTINCT name FROM TARGET_INFO_GPU WHERE name IS NOT NULL")
        ]


def _connect(path: Path, check_same_thread: bool = True) -> sqlite3.Connection:
    """A read-only connection to the export (URI filenames on, so that memdb databases can be attached)."""
    conn = sqlite3.connect(
        f"file:{urllib.parse.quote(str(path.resolve()))}?mode=ro",
        uri=True,
        check_same_thread=check_same_thread,
        isolation_level=None,  # autocommit: no transaction left open that would lock a shared memdb
    )
    # Temp tables of a large capture do not fit SQLite's default 2 MB cache: keep them in memory. Reading
    # the (read-only) export through mmap and sorting on a helper thread cut the report time by a third.
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute("PRAGMA cache_size = -262144")
    conn.execute(f"PRAGMA mmap_size = {8 << 30}")
    conn.execute("PRAGMA threads = 2")
    return conn


def is_corruption(exc: sqlite3.DatabaseError) -> bool:
    """True for SQLite errors that mean a damaged file rather than a wrong query."""
    text = str(exc).lower()
    return not isinstance(exc, sqlite3.OperationalError) or any(
        m in text for m in ("malformed", "not a database", "disk i/o", "corrupt", "truncated", "short read")
    )


def corrupt_message(path: Path, exc: Exception) -> str:
    return (
        f"{path}: the export is damaged or truncated ({exc}); copy it again or re-export it with "
        "`nsys export --type sqlite --force-overwrite true REPORT.nsys-rep`"
    )


def open_export(path: str | Path) -> Export:
    """Open an nsys SQLite export read-only; UserError when it is missing, a directory, a Git LFS pointer,
    an `.nsys-rep`, not SQLite, damaged, or not from nsys."""
    path = Path(path)
    if path.is_dir():
        inside = sorted(p.name for p in path.glob("*.sqlite"))[:5]
        hint = f" It holds: {', '.join(inside)}." if inside else ""
        raise UserError(f"{path}: a directory; pass the .sqlite export file itself.{hint}")
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected an nsys SQLite export: `nsys export --type sqlite`)")
    with open(path, "rb") as fh:
        header = fh.read(100)
    if header.startswith(b"version https://git-lfs"):
        raise UserError(f"{path}: a Git LFS pointer, not the export itself: fetch it with `git lfs pull`")
    if not header.startswith(b"SQLite format 3\x00"):
        if path.suffix in (".nsys-rep", ".qdrep"):
            hint = f"an Nsight Systems report; convert it first: `nsys export --type sqlite --output {path.with_suffix('.sqlite')} {path}`"
        else:
            hint = "expected an nsys SQLite export (`nsys export --type sqlite REPORT.nsys-rep`)"
        raise UserError(f"{path}: not an SQLite file: {hint}")
    try:
        conn = _connect(path)
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise UserError(corrupt_message(path, exc)) from None
    export = Export(path, conn, tables)
    markers = {"StringIds", KERNEL, RUNTIME, NVTX, "EXPORT_META_DATA", "META_DATA_EXPORT"}
    if "StringIds" not in tables or not (tables & (markers - {"StringIds"})):
        raise UserError(
            f"{path}: an SQLite file but not an Nsight Systems export (no StringIds / "
            f"{KERNEL} / {NVTX} tables; found: {', '.join(sorted(tables)[:8]) or 'none'})"
        )
    return export


def require_kernels(export: Export) -> None:
    """UserError unless the export has a non-empty kernel table."""
    if not export.has(KERNEL, "start", "end"):
        raise UserError(
            f"{export.path}: no {KERNEL} table: the trace was captured without CUDA tracing; {RECAPTURE_HINT}"
        )
    name_col = kernel_name_column(export)
    if name_col is None:
        raise UserError(f"{export.path}: {KERNEL} has neither demangledName nor shortName columns")
    if export.conn.execute(f"SELECT 1 FROM {KERNEL} LIMIT 1").fetchone() is None:
        raise UserError(
            f"{export.path}: {KERNEL} is empty: no kernel ran inside the capture window. Check that the "
            "profile window (profiling.profile_step_start/end) lies inside the run and that "
            "`--capture-range=cudaProfilerApi` matches `--profile`."
        )


def kernel_name_column(export: Export) -> str | None:
    for col in ("demangledName", "shortName"):
        if col in export.cols(KERNEL):
            return col
    return None


def kernel_summary(export: Export, limit: int | None = None) -> list[dict]:
    """Per kernel name: count and total/avg/min/max time (ns), as `nsys stats --report gpukernsum`."""
    require_kernels(export)
    col = kernel_name_column(export)
    # Aggregate on the integer name ids first (one pass, no string joins per kernel), then name them.
    sql = f"""
        SELECT s.value AS name, SUM(c) AS count, SUM(t) AS total_ns, 1.0 * SUM(t) / SUM(c) AS avg_ns,
               MIN(lo) AS min_ns, MAX(hi) AS max_ns
        FROM (SELECT {col} AS nameId, COUNT(*) AS c, SUM("end" - start) AS t, MIN("end" - start) AS lo,
                     MAX("end" - start) AS hi FROM {KERNEL} GROUP BY {col}) AS k
             JOIN StringIds AS s ON s.id = k.nameId
        GROUP BY s.value ORDER BY total_ns DESC, name
    """
    if limit is not None:
        sql += f" LIMIT {int(limit)}"
    return _dicts(export.conn.execute(sql))


# --------------------------------------------------------------------------------------------------
# GEMM recognition and shapes
# --------------------------------------------------------------------------------------------------

# Which kernels are GEMMs: one rule, applied in this order to the demangled kernel name.
#  1. A `--gemm-pattern` regex the user gave matches anywhere in the name: GEMM (e.g. nvFuser matmuls).
#  2. Fused attention (`flash`, `fmha`, `attention`, `attn` anywhere): not a GEMM, even though its
#     template arguments name CUTLASS GEMM pieces.
#  3. The rest looks only at the kernel's own name, its "head": the function name without return type,
#     namespaces and template arguments; for a generic CUTLASS launcher (`cutlass::Kernel<X>`,
#     `cutlass::Kernel2<X>`, `cutlass::device_kernel<X>`) the head of X. Template arguments are skipped
#     because cuBLAS GEMMs carry GEMV parameter types (`gemmSN_NN_kernel<..., cublasGemvTensor...>`).
#  4. Convolution (implicit-GEMM `fprop`/`dgrad`/`wgrad`, `implicit_convolve`, `winograd`, `conv`, cuDNN's
#     own `*_scudnn_*`/`*1688cudnn*` kernels, also inside TensorRT): class "conv".
#  5. GEMV, pooling and cuDNN's helpers (`computeOffsetsKernel`, `compute_gemm_pointers`): not GEMMs.
#  6. cuBLAS split-K reductions (`splitKreduce_kernel`): class "gemm", counted with the GEMM they finish.
#  7. `gemm` anywhere in the head (cuBLAS `gemmSN_*`, `gemmk1_kernel`, `ampere_sgemm_*`, `volta_h884gemm_*`,
#     `sm90_xmma_gemm_*`, CUTLASS `cutlass_80_tensorop_s16816gemm_*`, `cutlass3x_sm90_tensorop_gemm_*`,
#     `GemmUniversal`, TensorRT `trt_*gemm*`) or an `nvjet_` prefix (cuBLAS on Hopper/Blackwell): "gemm".
GEMM, CONV = "gemm", "conv"
_ATTENTION = re.compile(r"flash|fmha|attention|attn", re.IGNORECASE)
_CUTLASS_LAUNCHERS = {"Kernel", "Kernel2", "device_kernel"}
_CONV = re.compile(r"conv|fprop|dgrad|wgrad|winograd|cudnn", re.IGNORECASE)
_NOT_GEMM_HEAD = re.compile(r"gemv|pool|computeOffsets|compute_gemm_pointers", re.IGNORECASE)
_SPLIT_K = re.compile(r"split_?k_?reduce|reduce_?split_?k", re.IGNORECASE)
_GEMM_HEAD = re.compile(r"gemm|^nvjet_", re.IGNORECASE)


def kernel_head(name: str) -> str:
    """The kernel's own name: `void cublasLt::splitKreduce_kernel<...>(...)` -> `splitKreduce_kernel`."""
    text = name.strip()
    for _ in range(4):  # unwrap generic launchers, at most a few levels
        text = re.sub(r"^(?:void|static|__global__)\s+", "", text)
        cut = min((i for i in (text.find("<"), text.find("(")) if i >= 0), default=len(text))
        qualified = text[:cut].strip()
        head = qualified.rsplit("::", 1)[-1].strip()
        if head in _CUTLASS_LAUNCHERS and cut < len(text) and text[cut] == "<":
            text = text[cut + 1 :]
            continue
        return head
    return head


def kernel_class(name: str, user_pattern: re.Pattern | None = None) -> str | None:
    """ "gemm", "conv" or None for a demangled kernel name, by the rule above."""
    if user_pattern is not None and user_pattern.search(name):
        return GEMM
    if _ATTENTION.search(name):
        return None
    head = kernel_head(name)
    if _CONV.search(head):
        return CONV
    if _NOT_GEMM_HEAD.search(head):
        return None
    if _SPLIT_K.search(head) or _GEMM_HEAD.search(head):
        return GEMM
    return None


def is_gemm(name: str, user_pattern: re.Pattern | None = None) -> bool:
    """True for GEMM kernels (cuBLAS, nvjet, xmma, CUTLASS 2/3, TensorRT, split-K reductions); see above."""
    return kernel_class(name, user_pattern) == GEMM


# The GEMM's input type from its kernel name, for the peak it is judged against and the bytes per
# element. nvjet names code the types in letters after `nvjet_[smNN_]` (`tst`: bf16 in, `hsh`: fp16,
# `sss`: fp32, `sss_tf32`: tf32, `q`/`e`: fp8, `d`: fp64); the others spell them (xmma `bf16bf16_bf16f32`,
# CUTLASS `tensorop_bf16_s16816gemm`, `f32f32_tf32f32`) or use the BLAS letter (`sgemm`, `hgemm`, `dgemm`,
# `h884gemm`); cuBLAS templates name the C type (`gemmSN_NN_kernel<float, ...>`). Checked in this order:
# the first that matches wins.
_NVJET_TYPES = {"q": "fp8", "e": "fp8", "t": "bf16", "h": "fp16", "s": "fp32", "d": "fp64"}
_DTYPE_PATTERNS: tuple[tuple[str, str], ...] = (
    (r"e4m3|e5m2|fp8|f8f8", "fp8"),
    (r"bf16|bfloat16", "bf16"),
    (r"tf32", "tf32"),
    (r"f16|fp16|half|h884|h1688|h16816|hgemm|\bh\d*gemm", "fp16"),
    (r"f64|fp64|double|dgemm|d884|dmma", "fp64"),
    (r"s1688gemm|s1684gemm", "tf32"),  # the 16x8x8 tensor-core MMA with fp32 operands is TF32
    (r"f32|fp32|float|sgemm|s884|single", "fp32"),
)
BYTES_PER_ELEMENT = {"fp8": 1, "bf16": 2, "fp16": 2, "tf32": 4, "fp32": 4, "fp64": 8}


def kernel_dtype(name: str) -> str | None:
    """Input data type of a GEMM kernel (`bf16`, `fp16`, `tf32`, `fp32`, `fp64`, `fp8`), None if unnamed."""
    nvjet = re.match(r"(?:void\s+)?nvjet_(?:sm\d+_)?([a-z]+)_", name)
    if nvjet:
        return "tf32" if "_tf32" in name else _NVJET_TYPES.get(nvjet.group(1)[0])
    for pattern, dtype in _DTYPE_PATTERNS:
        if re.search(pattern, name, flags=re.IGNORECASE):
            return dtype
    return None


_SIZES = re.compile(r"sizes = (\[.*\])")


def parse_sizes(text: str) -> list[list[int]] | None:
    """The `sizes = [[..], [..]]` list of an `emit_nvtx(record_shapes=True)` range name, or None."""
    match = _SIZES.search(text)
    if not match:
        return None
    raw = match.group(1)
    end = raw.find("]]")
    raw = raw[: end + 2] if end >= 0 else raw
    try:
        sizes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    if not isinstance(sizes, list) or not all(isinstance(s, list) for s in sizes):
        return None
    return sizes


def gemm_dims(op: str, sizes: list[list[int]]) -> tuple[int, int, int, int] | None:
    """(batch, M, N, K) of a matmul-like ATen op from its input sizes, or None when unknown."""
    op = op.strip().split("::")[-1].rstrip("_")
    mats = [s for s in sizes if len(s) >= 2]
    try:
        if op in ("mm", "matmul", "_scaled_mm") and len(mats) >= 2:
            a, b = mats[0], mats[1]
            if len(a) == 2 and len(b) == 2:
                return 1, a[0], b[1], a[1]
            batch = 1
            for d in a[:-2]:
                batch *= d
            if len(b) == 2:  # (..., M, K) @ (K, N)
                return 1, batch * a[-2], b[1], a[-1]
            return batch, a[-2], b[-1], a[-1]
        if op in ("addmm", "baddbmm", "addbmm") and len(mats) >= 2:
            a, b = mats[-2], mats[-1]
            batch = a[0] if len(a) == 3 else 1
            return batch, a[-2], b[-1], a[-1]
        if op == "bmm" and len(mats) >= 2:
            a, b = mats[0], mats[1]
            return a[0], a[1], b[2], a[2]
        if op == "linear" and len(mats) >= 2:
            x, w = mats[0], mats[1]
            rows = 1
            for d in x[:-1]:
                rows *= d
            return 1, rows, w[0], w[1]
    except (IndexError, TypeError):
        return None
    return None


def gemm_flops_elems(batch: int, m: int, n: int, k: int) -> tuple[float, float]:
    """(FLOPs, elements read and written at least) of a (batched) M×K @ K×N GEMM: 2MNK and MK+KN+MN."""
    return 2.0 * batch * m * n * k, float(batch * (m * k + k * n + m * n))


def gemm_cost(batch: int, m: int, n: int, k: int, bytes_per_element: int = 2) -> tuple[float, float]:
    """(FLOPs, minimum bytes moved) of a (batched) M×K @ K×N GEMM: 2MNK and (MK+KN+MN)·element size."""
    return 2.0 * batch * m * n * k, float(batch * (m * k + k * n + m * n) * bytes_per_element)


def parse_pyprof_marker(text: str) -> tuple[str, str, list[list[int]], str | None] | None:
    """(module, op, input shapes, dtype) of a pyprof/DLProf-style NVTX dict range, or None.

    Those ranges are a Python dict's repr: `{'mod': 'torch.nn.functional', 'op': 'linear', 'args':
    [{'name': '', 'type': 'tensor', 'shape': (8, 16), 'dtype': 'float16'}, ...]}`.
    """
    try:
        marker = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    if not isinstance(marker, dict) or "op" not in marker:
        return None
    shapes, dtype = [], None
    for arg in marker.get("args") or []:
        if (
            isinstance(arg, dict)
            and arg.get("type") == "tensor"
            and isinstance(arg.get("shape"), (list, tuple))
        ):
            shapes.append([int(d) for d in arg["shape"]])
            dtype = dtype or arg.get("dtype")
    return str(marker.get("mod", "")), str(marker["op"]), shapes, _DTYPE_NAMES.get(str(dtype), dtype)


_DTYPE_NAMES = {"float16": "fp16", "torch.float16": "fp16", "bfloat16": "bf16", "torch.bfloat16": "bf16",
                "float32": "fp32", "torch.float32": "fp32", "float64": "fp64", "torch.float64": "fp64"}  # fmt: skip


# --------------------------------------------------------------------------------------------------
# NVTX ranges
# --------------------------------------------------------------------------------------------------


def _op_base_sql(expr: str) -> str:
    """SQL: the range name without its emit_nvtx `, seq = .., op_id = .., sizes = ..` suffix."""
    return (
        f"CASE WHEN instr({expr}, ', ') > 0 THEN substr({expr}, 1, instr({expr}, ', ') - 1) ELSE {expr} END"
    )


def has_nvtx(export: Export) -> bool:
    return export.has(NVTX, "start", "end", "eventType", "globalTid")


def _raw_text_sql(export: Export) -> tuple[str, str]:
    """(expression, join): the range text of NVTX_EVENTS row `e` without its domain prefix."""
    cols = export.cols(NVTX)
    parts = (["e.text"] if "text" in cols else []) + (["ts.value"] if "textId" in cols else [])
    raw = f"COALESCE({', '.join(parts)}, '')" if parts else "''"
    join = " LEFT JOIN StringIds AS ts ON ts.id = e.textId" if "textId" in cols else ""
    return raw, join


def _nvtx_name_sql(export: Export) -> tuple[str, str]:
    """(expression, joins) naming an NVTX_EVENTS row `e`: text or StringIds via textId, domain-prefixed."""
    cols = export.cols(NVTX)
    base, joins = _raw_text_sql(export)
    if "domainId" in cols:
        dom_parts = ["d.text"] if "text" in cols else []
        dom_join = ""
        if "textId" in cols:
            dom_parts.append("ds.value")
            dom_join = " LEFT JOIN StringIds AS ds ON ds.id = d.textId"
        if dom_parts:
            joins += (
                f" LEFT JOIN (SELECT d.domainId AS domainId, MIN(COALESCE({', '.join(dom_parts)})) AS name"
                f" FROM {NVTX} AS d{dom_join} WHERE d.eventType = {DOMAIN_CREATE} GROUP BY d.domainId) AS dom"
                " ON dom.domainId = e.domainId AND e.domainId != 0"
            )
            base = f"CASE WHEN dom.name IS NOT NULL THEN dom.name || ':' || {base} ELSE {base} END"
    return base, joins


_OP_IDS = re.compile(r", (?:seq|op_id) = \d+|, input_op_ids = \[[^\]]*\]")


def nvtx_group_name(name: str) -> str:
    """A range name without emit_nvtx's per-call `seq = N`, `op_id = N` and `input_op_ids = [..]` and
    without the shape of a self-describing GEMM range (`FeedForward/w1 [gemm M=..]` -> `FeedForward/w1`)."""
    if name.endswith("]") and " [gemm " in name:
        parsed = parse_gemm_labels(name)
        return parsed[0] if parsed else name
    return _OP_IDS.sub("", name) if ", " in name else name


def nvtx_summary(export: Export) -> list[dict]:
    """Per NVTX range name and style: count, total/avg/min/max ns, first start, parent range and depth.

    Totals match `nsys stats --report nvtxsum` (marks excluded, ranges of a named domain as `domain:name`),
    except that emit_nvtx's per-call ids (`seq = N`, `op_id = N`) and self-describing GEMM shapes are not
    part of the name (nvtx_group_name). The parent is
    the range that most often encloses it on its thread, found in one pass per thread with a stack.
    """
    if not has_nvtx(export):
        raise UserError(
            f"{export.path}: no {NVTX} table: nothing was recorded with NVTX. Capture with "
            "`nsys profile --trace=nvtx,...` and run with `--profiling.nvtx=true`."
        )
    name_sql, joins = _nvtx_name_sql(export)
    cursor = export.conn.execute(
        f"""SELECT e.globalTid, e.start, e."end", {name_sql}, e.eventType
            FROM {NVTX} AS e {joins} WHERE {_CLOSED} ORDER BY e.globalTid, e.start, e."end" DESC"""
    )
    stats: dict[tuple[str, str], list] = {}  # (name, style) -> [count, total, min, max, first start, parents]
    stack: list[tuple[int, str]] = []  # (end, name) of the ranges open at the current start
    tid_now = None
    for tid, start, end, raw, event_type in cursor:
        name = nvtx_group_name(raw)
        if tid != tid_now:
            stack.clear()
            tid_now = tid
        while stack and stack[-1][0] < end:
            stack.pop()
        parent = stack[-1][1] if stack else None
        stack.append((end, name))
        key = (name, "PushPop" if event_type == 59 else "StartEnd")
        dur = end - start
        entry = stats.get(key)
        if entry is None:
            stats[key] = [1, dur, dur, dur, start, {parent: 1}]
            continue
        entry[0] += 1
        entry[1] += dur
        entry[2] = min(entry[2], dur)
        entry[3] = max(entry[3], dur)
        entry[4] = min(entry[4], start)
        entry[5][parent] = entry[5].get(parent, 0) + 1
    if not stats:
        raise UserError(f"{export.path}: {NVTX} has no closed NVTX ranges (only marks or domain events)")
    rows = []
    for (name, style), (count, total, lo, hi, first, parents) in stats.items():
        parent = max(parents.items(), key=lambda kv: (kv[1], kv[0] is not None))[0]
        rows.append(dict(name=name, style=style, count=count, total_ns=total, avg_ns=total / count, min_ns=lo,
                         max_ns=hi, first_start=first, parent=parent))  # fmt: skip
    rows.sort(key=lambda r: (r["first_start"], r["name"]))
    parents = {r["name"]: r["parent"] for r in rows}
    for r in rows:
        depth, seen, p = 0, {r["name"]}, r["parent"]
        while p is not None and p not in seen:
            depth += 1
            seen.add(p)
            p = parents.get(p)
        r["depth"] = depth
    return rows


# --------------------------------------------------------------------------------------------------
# GEMM kernels attributed to NVTX ranges
# --------------------------------------------------------------------------------------------------


# Range tables for the innermost-range lookups: (tid, start, end, id = NVTX_EVENTS rowid, seq), clustered
# on (tid, start) so that one index seek finds the innermost range enclosing a launch call.
_RANGE_TABLE = '(tid INTEGER, start INTEGER, "end" INTEGER, id INTEGER, seq INTEGER, PRIMARY KEY (tid, start, id)) WITHOUT ROWID'
_CLOSED = f'e.eventType IN {RANGE_TYPES} AND e."end" IS NOT NULL'
_WORK_IDS = itertools.count()
SCRATCH_VFS = "memdb"  # in-memory databases shared by the connections of one process (SQLite >= 3.36)


def _is_op_sql(raw: str) -> str:
    """SQL: the range is an emit_nvtx op range (`aten::mm, seq = 3, op_id = 7, sizes = [..]`)."""
    return f"(instr({raw}, ', seq = ') OR instr({raw}, ', op_id = ') OR instr({raw}, ', sizes = '))"


def _build_op_ranges(export: Export, conn: sqlite3.Connection, schema: str) -> None:
    """`{schema}.r_op`: emit_nvtx op ranges, backward Function ranges included, and `{schema}.r_bwd`: the
    backward Function ranges (`MmBackward0, seq = N`, N being the seq of the forward op that created them).
    instr() is several times faster than LIKE on a million rows."""
    for t in ("r_op", "r_bwd"):
        conn.execute(f"CREATE TABLE {schema}.{t} {_RANGE_TABLE}")
    if not has_nvtx(export):
        return
    raw, join = _raw_text_sql(export)
    is_backward = f"instr(substr({raw}, 1, instr({raw}, ', ')), 'Backward')"
    seq = f"CAST(substr({raw}, instr({raw}, ', seq = ') + 8) AS INTEGER)"
    # A backward Function range keeps its seq as -1 - seq: r_bwd is then an integer filter of r_op.
    conn.execute(
        f"""INSERT INTO {schema}.r_op SELECT e.globalTid, e.start, e."end", e.rowid,
                   CASE WHEN NOT instr({raw}, ', seq = ') THEN NULL WHEN {is_backward} THEN -1 - {seq} ELSE {seq} END
            FROM {NVTX} AS e{join} WHERE {_CLOSED} AND {_is_op_sql(raw)}"""
    )
    conn.execute(
        f'INSERT INTO {schema}.r_bwd SELECT tid, start, "end", id, -1 - seq FROM {schema}.r_op WHERE seq < 0'
    )


def _build_user_ranges(export: Export) -> None:
    """Temp tables `nv_names` (id, tid, start, end, name) of all non-op ranges, `r_user` (the same, as a
    range table) and `r_layer` (the `layers.N` ones). Op range texts, one per op call, are read back later
    only for the ops that hold GEMMs."""
    conn = export.conn
    conn.execute('CREATE TEMP TABLE nv_names (id INTEGER PRIMARY KEY, tid INTEGER, start INTEGER, "end" INTEGER, '
                 "name TEXT)")  # fmt: skip
    for t in ("r_user", "r_layer"):
        conn.execute(f"CREATE TEMP TABLE {t} {_RANGE_TABLE}")
    if not has_nvtx(export):
        return
    raw, _ = _raw_text_sql(export)
    name, name_joins = _nvtx_name_sql(export)
    conn.execute(
        f'INSERT INTO nv_names SELECT e.rowid, e.globalTid, e.start, e."end", {name} FROM {NVTX} AS e {name_joins} '
        f"WHERE {_CLOSED} AND NOT {_is_op_sql(raw)}"
    )
    conn.execute('INSERT INTO r_user SELECT tid, start, "end", id, NULL FROM nv_names')
    conn.execute(
        "INSERT INTO r_layer SELECT tid, start, \"end\", id, NULL FROM nv_names WHERE name GLOB 'layers.[0-9]*'"
    )


def _innermost(conn: sqlite3.Connection, table: str, at: str, tid: str = "tid") -> str:
    """SQL: id of the latest-starting range of `table` enclosing row `at` (tid, start, end), on its thread.

    The lower bound on start (the table's longest range) keeps the backward index scan short when no range
    encloses the call.
    """
    longest = conn.execute(f'SELECT MAX("end" - start) FROM {table}').fetchone()[0]
    if longest is None:  # an empty table: skip the lookups
        return "NULL"
    return (
        f"(SELECT x.id FROM {table} AS x WHERE x.tid = {at}.{tid} AND x.start <= {at}.start "
        f'AND x.start >= {at}.start - {int(longest)} AND x."end" >= {at}."end" ORDER BY x.start DESC LIMIT 1)'
    )


def _collect_gemms(export: Export, gemm_pattern: re.Pattern | None) -> tuple[int, str, str]:
    """Temp table `g` of the GEMM kernels (by demangled name), clustered on correlationId so that one pass
    over the launch calls finds each one's kernel, and `kcls` (nameId, class, dtype) of every kernel name
    that is a GEMM or a convolution. Returns (GEMM count, correlation and process columns)."""
    conn, col = export.conn, kernel_name_column(export)
    names = conn.execute(
        f"SELECT s.id, s.value FROM StringIds AS s WHERE s.id IN (SELECT DISTINCT {col} FROM {KERNEL})"
    ).fetchall()
    conn.execute("CREATE TEMP TABLE kcls (nameId INTEGER PRIMARY KEY, cls TEXT, dtype TEXT)")
    rows = ((i, kernel_class(v, gemm_pattern), kernel_dtype(v)) for i, v in names if v)
    conn.executemany("INSERT INTO kcls VALUES (?, ?, ?)", (r for r in rows if r[1] is not None))
    kcols = export.cols(KERNEL)
    pid = "k.globalPid" if "globalPid" in kcols else "NULL"
    corr = "k.correlationId" if "correlationId" in kcols else "NULL"
    device = "k.deviceId" if "deviceId" in kcols else "NULL"
    conn.execute(
        "CREATE TEMP TABLE g (corr INTEGER, kid INTEGER, nameId INTEGER, dur INTEGER, pid INTEGER, device INTEGER, "
        "PRIMARY KEY (corr, kid)) WITHOUT ROWID"
    )
    conn.execute(
        f"""INSERT INTO g SELECT {corr}, k.rowid, k.{col}, k."end" - k.start, {pid}, {device}
            FROM {KERNEL} AS k WHERE k.{col} IN (SELECT nameId FROM kcls WHERE cls = '{GEMM}') ORDER BY 1, 2"""
    )
    return conn.execute("SELECT COUNT(*) FROM g").fetchone()[0], corr, pid


def conv_summary(export: Export) -> list[dict]:
    """Per convolution kernel name (class "conv", built by gemm_kernels): count and total ns."""
    col = kernel_name_column(export)
    return _dicts(
        export.conn.execute(
            f"""SELECT s.value AS name, COUNT(*) AS count, SUM(k."end" - k.start) AS total_ns
                FROM {KERNEL} AS k JOIN kcls AS c ON c.nameId = k.{col} AND c.cls = '{CONV}'
                JOIN StringIds AS s ON s.id = k.{col} GROUP BY s.value ORDER BY total_ns DESC"""
        )
    )


Shape = tuple  # (batch, M, N, K, dtype or None)
ShapeOf = "Callable[[str], Shape | None]"


def gemm_kernels(
    export: Export,
    range_shapes: dict[str, tuple] | None = None,
    *,
    range_shape_of=None,
    kernel_shape_of=None,
    gemm_pattern: re.Pattern | None = None,
) -> int:
    """Build temp table `ga`: one row per GEMM kernel with its ranges, FLOPs and minimum elements moved.

    Columns: nameId, device, dur, op_id, user_id, layer_id (NVTX_EVENTS rowids; names in
    `nv_names` and `op_sz`), backward (1 when the kernel ran in a backward Function that was mapped to its
    forward op), flops, elems (NULL when the shape is unknown) and dtype (the kernel name's, else the
    shape's). A kernel launched inside a backward Function range (`MmBackward0, seq = N`, usually on
    PyTorch's autograd thread where no user range is open) takes the user and layer ranges of the latest
    forward op of the same process with `seq = N`.

    FLOPs, first source that knows them: `kernel_shape_of(kernel name)` (every kernel of that name), the
    emit_nvtx `sizes` of the enclosing op range, `range_shape_of(user range name)` or
    `range_shapes[user range name]` (once per range instance, on its first GEMM kernel). A shape is
    (batch, M, N, K) or (batch, M, N, K, dtype). Returns the GEMM count.
    """
    require_kernels(export)
    conn = export.conn
    for t in ("gemm_ids", "kcls", "g", "ga", "ga0", "gk", "op_first", "op_sz", "op_shapes", "rname", "kshape",
              "user_first", "bwd", "bwd_map", "fwd_of", "f_seq", "nv_names", "r_user", "r_layer"):  # fmt: skip
        conn.execute(f"DROP TABLE IF EXISTS temp.{t}")

    def shape_of_range(name: str):
        found = range_shape_of(name) if range_shape_of is not None else None
        if found is None and range_shapes:
            found = range_shapes.get(name)
        return found

    # The op ranges (the bulk: one per op call) go into a scratch database on a second connection while
    # this one collects the GEMMs and the user ranges; two cores nearly halve that phase. The scratch
    # database is detached again on every way out.
    has_nvtx(export)  # fill the column cache here: the helper thread must not touch this connection
    with contextlib.ExitStack() as cleanup:
        helper = _connect(export.path, check_same_thread=False)
        cleanup.callback(helper.close)
        work = _attach_scratch(helper, cleanup)
        cleanup.callback(_detach_scratch, conn)
        failure: list[BaseException] = []

        def build_op_ranges() -> None:
            try:
                _build_op_ranges(export, helper, "w")
            except BaseException as exc:  # re-raised on the calling thread
                failure.append(exc)

        thread = threading.Thread(target=build_op_ranges, name="nsys-op-ranges", daemon=True)
        thread.start()
        try:
            n_gemm, corr, pid = _collect_gemms(export, gemm_pattern)
            _build_user_ranges(export)
        finally:
            thread.join()
        if failure:
            raise failure[0]
        conn.execute("ATTACH DATABASE ? AS w", (work,))  # while the helper still holds it open
        helper.close()
        _attribute_gemms(export, corr, pid, shape_of_range, kernel_shape_of)
    return n_gemm


def _attach_scratch(conn: sqlite3.Connection, cleanup: contextlib.ExitStack) -> str:
    """Attach a scratch database as `w` that another connection of this process can attach too, and
    return its URI: an in-memory `memdb` database, or where SQLite lacks that VFS (before 3.36) a file
    in a temporary directory that `cleanup` removes."""
    uri = f"file:/lmtrain-nsys-{os.getpid()}-{next(_WORK_IDS)}?vfs={SCRATCH_VFS}"
    try:
        conn.execute("ATTACH DATABASE ? AS w", (uri,))
        return uri
    except sqlite3.OperationalError:
        tmp = cleanup.enter_context(tempfile.TemporaryDirectory(prefix="lmtrain-nsys-"))
        uri = f"file:{urllib.parse.quote(str(Path(tmp) / 'scratch.sqlite'))}"
        conn.execute("ATTACH DATABASE ? AS w", (uri,))
        conn.execute("PRAGMA w.journal_mode = OFF")
        conn.execute("PRAGMA w.synchronous = OFF")
        return uri


def _detach_scratch(conn: sqlite3.Connection) -> None:
    if "w" in {r[1] for r in conn.execute("PRAGMA database_list")}:
        conn.execute("DETACH DATABASE w")


def _attribute_gemms(export: Export, corr: str, pid: str, shape_of_range, kernel_shape_of) -> None:
    """Temp table `ga` from `g`, the range tables (`w.r_op`, `w.r_bwd`, `r_user`, `r_layer`) and shapes."""
    conn = export.conn
    conn.execute(
        "CREATE TEMP TABLE ga0 (kid INTEGER PRIMARY KEY, nameId INTEGER, dur INTEGER, op_id INTEGER, "
        "user_id INTEGER, layer_id INTEGER, bwd_id INTEGER, device INTEGER)"
    )
    if export.has(RUNTIME, "correlationId", "globalTid", "start", "end") and corr != "NULL":
        same_process = "AND (r.globalTid >> 24) = (g.pid >> 24)" if pid != "NULL" else ""
        lookups = ", ".join(
            _innermost(conn, t, "r", tid="globalTid") for t in ("w.r_op", "r_user", "r_layer", "w.r_bwd")
        )
        # OR IGNORE: without globalPid, a correlationId may match launches of several processes; keep one.
        conn.execute(
            f"""INSERT OR IGNORE INTO ga0
                SELECT g.kid, g.nameId, g.dur, {lookups}, g.device
                FROM {RUNTIME} AS r JOIN g ON g.corr = r.correlationId {same_process}"""
        )
    conn.execute(
        "INSERT OR IGNORE INTO ga0 (kid, nameId, dur, device) SELECT kid, nameId, dur, device FROM g"
    )

    # Backward Functions -> the forward op with the same seq in the same process that ran last before them.
    conn.execute("CREATE TEMP TABLE bwd_map (bwd_id INTEGER PRIMARY KEY, fwd_id INTEGER)")
    conn.execute("CREATE TEMP TABLE fwd_of (fwd_id INTEGER PRIMARY KEY, user_id INTEGER, layer_id INTEGER)")
    if conn.execute("SELECT 1 FROM ga0 WHERE bwd_id IS NOT NULL LIMIT 1").fetchone():
        conn.execute(
            'CREATE TEMP TABLE f_seq (seq INTEGER, pid INTEGER, start INTEGER, id INTEGER, tid INTEGER, "end" INTEGER, '
            "PRIMARY KEY (seq, pid, start, id)) WITHOUT ROWID"
        )
        conn.execute(
            "CREATE TEMP TABLE bwd (id INTEGER PRIMARY KEY, tid INTEGER, start INTEGER, seq INTEGER)"
        )
        conn.execute(
            "INSERT INTO bwd SELECT id, tid, start, seq FROM w.r_bwd WHERE id IN (SELECT bwd_id FROM ga0)"
        )
        conn.execute(
            """INSERT OR IGNORE INTO f_seq SELECT seq, tid >> 24, start, id, tid, "end" FROM w.r_op
                WHERE seq IN (SELECT seq FROM bwd)"""
        )
        conn.execute(
            """INSERT INTO bwd_map
               SELECT b.id, (SELECT f.id FROM f_seq AS f WHERE f.seq = b.seq AND f.pid = b.tid >> 24
                             AND f.start < b.start ORDER BY f.start DESC LIMIT 1)
               FROM bwd AS b"""
        )
        conn.execute(
            f"""INSERT INTO fwd_of
                SELECT f.id, {_innermost(conn, "r_user", "f")}, {_innermost(conn, "r_layer", "f")}
                FROM f_seq AS f WHERE f.id IN (SELECT fwd_id FROM bwd_map)"""
        )

    # The emit_nvtx op ranges holding GEMMs: base name, `sizes = ...` text, and their first GEMM kernel
    # (one op may launch several GEMM kernels: its FLOPs count once, on the first).
    conn.execute("CREATE TEMP TABLE op_sz (id INTEGER PRIMARY KEY, first_kid INTEGER, op TEXT, sizes TEXT)")
    if has_nvtx(export):
        # The first kernel per op: the first insert wins, scanning ga0 in kernel order (no sort).
        conn.execute("CREATE TEMP TABLE op_first (op_id INTEGER PRIMARY KEY, first_kid INTEGER)")
        conn.execute(
            "INSERT OR IGNORE INTO op_first SELECT op_id, kid FROM ga0 WHERE op_id IS NOT NULL ORDER BY kid"
        )
        raw, join = _raw_text_sql(export)
        conn.execute(
            f"""INSERT INTO op_sz
                SELECT o.op_id, o.first_kid, {_op_base_sql(raw)},
                       CASE WHEN instr({raw}, 'sizes = ') > 0 THEN substr({raw}, instr({raw}, 'sizes = ')) END
                FROM op_first AS o JOIN {NVTX} AS e ON e.rowid = o.op_id{join}"""
        )
    conn.execute(
        "CREATE TEMP TABLE op_shapes (op TEXT, sizes TEXT, flops REAL, elems REAL, PRIMARY KEY (op, sizes))"
    )
    for op, sizes_text in conn.execute(
        "SELECT DISTINCT op, sizes FROM op_sz WHERE sizes IS NOT NULL"
    ).fetchall():
        sizes = parse_sizes(sizes_text)
        dims = gemm_dims(op, sizes) if sizes else None
        if dims:
            conn.execute(
                "INSERT INTO op_shapes VALUES (?, ?, ?, ?)", (op, sizes_text, *gemm_flops_elems(*dims))
            )

    # User ranges holding GEMMs: their label (the name without a self-describing shape) and shape, if any.
    conn.execute(
        "CREATE TEMP TABLE rname (name TEXT PRIMARY KEY, label TEXT, flops REAL, elems REAL, dtype TEXT)"
    )
    names = conn.execute(
        "SELECT DISTINCT name FROM nv_names WHERE id IN (SELECT user_id FROM ga0) OR id IN "
        "(SELECT layer_id FROM ga0)"
    ).fetchall()
    for (name,) in names:
        shape = shape_of_range(name)
        conn.execute(
            "INSERT OR IGNORE INTO rname VALUES (?, ?, ?, ?, ?)",
            (name, range_label(name), *(_shape_cost(shape) if shape else (None, None, None))),
        )
    conn.execute("CREATE TEMP TABLE user_first (id INTEGER PRIMARY KEY, first_kid INTEGER)")
    conn.execute(
        "INSERT INTO user_first SELECT user_id, MIN(kid) FROM ga0 WHERE user_id IS NOT NULL GROUP BY user_id"
    )
    conn.execute("CREATE TEMP TABLE kshape (nameId INTEGER PRIMARY KEY, flops REAL, elems REAL, dtype TEXT)")
    if kernel_shape_of is not None:
        for name_id, name in conn.execute(
            "SELECT id, value FROM StringIds WHERE id IN (SELECT DISTINCT nameId FROM ga0)"
        ).fetchall():
            shape = kernel_shape_of(name)
            if shape:
                conn.execute("INSERT INTO kshape VALUES (?, ?, ?, ?)", (name_id, *_shape_cost(shape)))
    cost_joins = (
        "LEFT JOIN op_sz AS z ON z.id = a.op_id LEFT JOIN op_shapes AS os ON os.op = z.op AND os.sizes = z.sizes"
        " LEFT JOIN nv_names AS u ON u.id = a.user_id LEFT JOIN rname AS rs ON rs.name = u.name"
        " LEFT JOIN user_first AS uf ON uf.id = a.user_id LEFT JOIN kshape AS ks ON ks.nameId = a.nameId"
        " LEFT JOIN kcls AS kc ON kc.nameId = a.nameId"
    )

    def cost(col: str) -> str:
        return (
            f"CASE WHEN ks.{col} IS NOT NULL THEN ks.{col}"
            f" WHEN os.{col} IS NOT NULL THEN CASE WHEN z.first_kid = a.kid THEN os.{col} ELSE 0 END"
            f" WHEN rs.{col} IS NOT NULL THEN CASE WHEN uf.first_kid = a.kid THEN rs.{col} ELSE 0 END END"
        )

    mapped = conn.execute("SELECT 1 FROM bwd_map WHERE fwd_id IS NOT NULL LIMIT 1").fetchone() is not None
    if mapped:
        backward_cols = """CASE WHEN m.fwd_id IS NOT NULL THEN fo.user_id ELSE a.user_id END AS user_id,
                           CASE WHEN m.fwd_id IS NOT NULL THEN fo.layer_id ELSE a.layer_id END AS layer_id,
                           m.fwd_id IS NOT NULL AS backward"""
        backward_joins = (
            "LEFT JOIN bwd_map AS m ON m.bwd_id = a.bwd_id LEFT JOIN fwd_of AS fo ON fo.fwd_id = m.fwd_id"
        )
    else:
        backward_cols, backward_joins = "a.user_id, a.layer_id, 0 AS backward", ""
    conn.execute(
        f"""CREATE TEMP TABLE ga AS
            SELECT a.kid, a.nameId, a.device, a.dur, a.op_id, {backward_cols}, {cost("flops")} AS flops,
                   {cost("elems")} AS elems, COALESCE(kc.dtype, ks.dtype, rs.dtype) AS dtype
            FROM ga0 AS a {cost_joins} {backward_joins}"""
    )
    conn.execute("DROP TABLE temp.ga0")


def _shape_cost(shape) -> tuple[float, float, str | None]:
    """(FLOPs, elements moved, dtype) of a (batch, M, N, K[, dtype]) shape, or summed over a list of them."""
    shapes = shape if isinstance(shape[0], (tuple, list)) else [shape]
    flops = elems = 0.0
    dtype = None
    for batch, m, n, k, *rest in shapes:
        f, e = gemm_flops_elems(batch, m, n, k)
        flops, elems, dtype = flops + f, elems + e, dtype or (rest[0] if rest else None)
    return flops, elems, dtype


def range_label(name: str) -> str:
    """The grouping label of a range name: without a self-describing `[gemm ...]` shape; a pyprof dict
    range as `module.op`."""
    parsed = parse_gemm_labels(name)
    if parsed:
        return parsed[0]
    if name.startswith("{"):
        marker = parse_pyprof_marker(name)
        if marker:
            return f"{marker[0]}.{marker[1]}"
    return name


BACKWARD_SUFFIX = " (backward)"
GROUPINGS = ("kernel", "range", "layer", "device")


def gemm_devices(export: Export) -> list[tuple[int | None, str | None]]:
    """(deviceId, dtype) pairs of the GEMM kernels in `ga` (dtype None where neither name nor shape says)."""
    return export.conn.execute("SELECT DISTINCT device, dtype FROM ga ORDER BY 1, 2").fetchall()


def gemm_rates(export: Export, peaks: dict | None = None, default_dtype: str = "bf16") -> None:
    """Temp table `gk` from `ga`: per GEMM kernel its grouping keys, bytes, and with `peaks`
    {(deviceId, dtype): (peak FLOP/s or None, bandwidth B/s or None)} the time its FLOPs take at the peak
    (`ideal_s`) and at the roofline bound max(FLOPs / peak, bytes / bandwidth) (`bound_s`). Kernels whose
    dtype neither name nor shape gives count as `default_dtype`."""
    conn = export.conn
    for t in ("gk", "pk"):
        conn.execute(f"DROP TABLE IF EXISTS temp.{t}")
    conn.execute(
        "CREATE TEMP TABLE pk (device INTEGER, dtype TEXT, peak REAL, bw REAL, PRIMARY KEY (device, dtype))"
    )
    conn.executemany(
        "INSERT OR REPLACE INTO pk VALUES (?, ?, ?, ?)",
        ((-1 if d is None else d, t, p, b) for (d, t), (p, b) in (peaks or {}).items()),
    )
    bpe = "CASE y.dt " + " ".join(f"WHEN '{t}' THEN {n}" for t, n in BYTES_PER_ELEMENT.items()) + " END"
    conn.execute(
        f"""CREATE TEMP TABLE gk AS
            WITH y AS (
                SELECT ga.nameId, ga.dur, COALESCE(ga.device, -1) AS device, ga.flops, ga.elems,
                       COALESCE(ga.dtype, '{default_dtype}') AS dt, ga.nameId AS k_kernel,
                       COALESCE(rn.label, z.op, '(no NVTX range)')
                           || CASE WHEN ga.backward THEN '{BACKWARD_SUFFIX}' ELSE '' END AS k_range,
                       COALESCE(ln.label, '(outside layers.N)') AS k_layer, COALESCE(ga.device, -1) AS k_device
                FROM ga
                     LEFT JOIN nv_names AS u ON u.id = ga.user_id LEFT JOIN rname AS rn ON rn.name = u.name
                     LEFT JOIN op_sz AS z ON z.id = ga.op_id
                     LEFT JOIN nv_names AS l ON l.id = ga.layer_id LEFT JOIN rname AS ln ON ln.name = l.name),
            x AS (SELECT y.*, y.elems * ({bpe}) AS bytes FROM y)
            SELECT x.*, x.flops / pk.peak AS ideal_s, MAX(x.flops / pk.peak, x.bytes / pk.bw) AS bound_s
            FROM x LEFT JOIN pk ON pk.device = x.device AND pk.dtype = x.dt"""
    )


MEDIAN_GROUPINGS = ("kernel", "range")
"""Groupings that get a median duration (one sort of all GEMM kernels each: not worth it per layer/device)."""


def gemm_groups(export: Export, by: str) -> list[dict]:
    """Grouped rows of the `gk` table (built by gemm_rates; without peaks when it was not called).

    Per group: count, total/min/max/median ns, FLOPs and bytes (over the kernels with a known shape), the
    time those took (`shaped_ns`), the time at peak (`ideal_ns`) and at the roofline bound (`bound_ns`),
    the dtypes and devices, and for kernel names the most common launch configuration (`launch`, with the
    number of distinct ones in `launches`).
    """
    assert by in GROUPINGS, by
    conn = export.conn
    if not conn.execute("SELECT 1 FROM sqlite_temp_master WHERE name = 'gk'").fetchone():
        gemm_rates(export)
    key = f"k_{by}"
    rows = _dicts(
        conn.execute(
            f"""SELECT {key} AS name, COUNT(*) AS count, SUM(dur) AS total_ns, MIN(dur) AS min_ns, MAX(dur) AS max_ns,
                       SUM(flops) AS flops, SUM(bytes) AS bytes, SUM(CASE WHEN flops IS NOT NULL THEN dur END) AS shaped_ns,
                       SUM(ideal_s) * 1e9 AS ideal_ns, SUM(bound_s) * 1e9 AS bound_ns, COUNT(ideal_s) AS n_ideal,
                       COUNT(bound_s) AS n_bound, COUNT(flops) AS n_shaped, GROUP_CONCAT(DISTINCT dt) AS dtypes,
                       GROUP_CONCAT(DISTINCT device) AS devices
                FROM gk GROUP BY 1 ORDER BY total_ns DESC"""
        )
    )
    medians = _medians(conn, key) if by in MEDIAN_GROUPINGS else {}
    names = {}
    if by == "kernel":  # grouped on the name ids: the names are long, read them once per group
        names = dict(
            conn.execute("SELECT id, value FROM StringIds WHERE id IN (SELECT DISTINCT k_kernel FROM gk)")
        )
    for r in rows:
        r["median_ns"] = medians.get(r["name"])
        r["name"] = names.get(r["name"], r["name"])
        # A group is judged against the peak only when every shaped kernel in it has one.
        if r["n_ideal"] != r["n_shaped"]:
            r["ideal_ns"] = None
        if r["n_bound"] != r["n_shaped"]:
            r["bound_ns"] = None
        for k in ("n_ideal", "n_bound", "n_shaped"):
            r.pop(k)
    rows.sort(key=lambda r: (-r["total_ns"], str(r["name"])))
    if by == "kernel":
        launches = kernel_launches(export)
        for r in rows:
            configs = launches.get(r["name"], {})
            r["launch"] = min(configs, key=lambda x: (-configs[x], x)) if configs else None
            r["launches"] = len(configs)
    return rows


def kernel_launches(export: Export) -> dict[str, dict[str, int]]:
    """Per GEMM kernel name: {`gridX x gridY x gridZ / blockX x blockY x blockZ`: launches}, from the
    kernel table grouped on its integer columns."""
    col, kcols = kernel_name_column(export), export.cols(KERNEL)
    dims = [
        f"k.{c}" if c in kcols else "1" for c in ("gridX", "gridY", "gridZ", "blockX", "blockY", "blockZ")
    ]
    out: dict[str, dict[str, int]] = {}
    columns = ", ".join(f"{d} AS d{i}" for i, d in enumerate(dims))
    for name, gx, gy, gz, bx, by, bz, n in export.conn.execute(
        f"""SELECT s.value, c.d0, c.d1, c.d2, c.d3, c.d4, c.d5, c.n
            FROM (SELECT k.{col} AS nameId, {columns}, COUNT(*) AS n FROM {KERNEL} AS k
                  WHERE k.{col} IN (SELECT nameId FROM kcls WHERE cls = '{GEMM}') GROUP BY 1, 2, 3, 4, 5, 6, 7) AS c
                 JOIN StringIds AS s ON s.id = c.nameId"""
    ):
        launch = f"{gx}x{gy}x{gz} / {bx}x{by}x{bz}"
        configs = out.setdefault(name, {})
        configs[launch] = configs.get(launch, 0) + n
    return out


def _medians(conn: sqlite3.Connection, key: str) -> dict:
    """Median kernel duration per group (the mean of the two middle ones for an even count), in one sorted pass."""
    out = {}
    for name, group in itertools.groupby(
        conn.execute(f"SELECT {key}, dur FROM gk ORDER BY 1, 2"), key=lambda r: r[0]
    ):
        durs = [d for _, d in group]
        mid = len(durs) // 2
        out[name] = float(durs[mid]) if len(durs) % 2 else (durs[mid - 1] + durs[mid]) / 2
    return out


def _dicts(cursor: sqlite3.Cursor) -> list[dict]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]
