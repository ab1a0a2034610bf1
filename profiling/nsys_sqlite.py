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


def open_export(path: str | Path) -> Export:
    """Open an nsys SQLite export read-only; UserError when it is missing, not SQLite or not nsys."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file (expected an nsys SQLite export: `nsys export --type sqlite`)")
    with open(path, "rb") as fh:
        header = fh.read(16)
    if header != b"SQLite format 3\x00":
        hint = ""
        if path.suffix in (".nsys-rep", ".qdrep"):
            hint = f" Convert it first: `nsys export --type sqlite --output {path.with_suffix('.sqlite')} {path}`."
        raise UserError(f"{path}: not an SQLite file (expected an nsys SQLite export).{hint}")
    conn = _connect(path)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not a readable SQLite database ({exc})") from None
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

_GEMM = re.compile(r"gemm|\bnvjet_|xmma_", re.IGNORECASE)
_NOT_GEMM = re.compile(r"flash|fmha|attention|attn|splitkreduce|gemv", re.IGNORECASE)


def is_gemm(name: str) -> bool:
    """True for cuBLAS (xmma, nvjet, sm*_gemm) and CUTLASS 2/3 GEMM kernels; not for flash-attention."""
    return bool(_GEMM.search(name)) and not _NOT_GEMM.search(name)


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


def gemm_cost(batch: int, m: int, n: int, k: int, bytes_per_element: int = 2) -> tuple[float, float]:
    """(FLOPs, minimum bytes moved) of a (batched) M×K @ K×N GEMM: 2MNK and (MK+KN+MN)·element size."""
    return 2.0 * batch * m * n * k, float(batch * (m * k + k * n + m * n) * bytes_per_element)


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


def _build_nvtx_table(export: Export) -> None:
    """Temp table `nv` of all closed NVTX ranges with their names and styles (for nvtx_summary)."""
    conn = export.conn
    conn.execute("DROP TABLE IF EXISTS temp.nv")
    name, joins = _nvtx_name_sql(export)
    conn.execute(
        f"""CREATE TEMP TABLE nv AS
            SELECT e.globalTid AS tid, e.start AS start, e."end" AS "end", {name} AS name,
                   CASE e.eventType WHEN 59 THEN 'PushPop' ELSE 'StartEnd' END AS style
            FROM {NVTX} AS e {joins}
            WHERE e.eventType IN {RANGE_TYPES} AND e."end" IS NOT NULL"""
    )


def nvtx_summary(export: Export) -> list[dict]:
    """Per NVTX range name and style: count, total/avg/min/max ns, first start, parent range and depth.

    Totals match `nsys stats --report nvtxsum` (marks excluded, ranges of a named domain as `domain:name`).
    """
    if not has_nvtx(export):
        raise UserError(
            f"{export.path}: no {NVTX} table: nothing was recorded with NVTX. Capture with "
            "`nsys profile --trace=nvtx,...` and run with `--lmtrain.nvtx=true`."
        )
    _build_nvtx_table(export)
    conn = export.conn
    conn.execute("CREATE INDEX temp.nv_i ON nv (tid, start)")
    rows = _dicts(
        conn.execute(
            """
            WITH parented AS (
                SELECT n.name, n.style, n."end" - n.start AS dur, n.start,
                       (SELECT p.name FROM nv AS p WHERE p.tid = n.tid AND p.start <= n.start AND p."end" >= n."end"
                               AND p.rowid != n.rowid ORDER BY p.start DESC, p.rowid LIMIT 1) AS parent
                FROM nv AS n
            ), counted AS (
                SELECT name, style, parent, COUNT(*) AS c FROM parented GROUP BY name, style, parent
            ), top_parent AS (
                SELECT name, style, parent FROM (
                    SELECT name, style, parent, ROW_NUMBER() OVER (PARTITION BY name, style ORDER BY c DESC) AS rn
                    FROM counted) WHERE rn = 1
            )
            SELECT p.name AS name, p.style AS style, COUNT(*) AS count, SUM(p.dur) AS total_ns,
                   AVG(p.dur) AS avg_ns, MIN(p.dur) AS min_ns, MAX(p.dur) AS max_ns, MIN(p.start) AS first_start,
                   t.parent AS parent
            FROM parented AS p JOIN top_parent AS t ON t.name = p.name AND t.style = p.style
            GROUP BY p.name, p.style ORDER BY first_start
            """
        )
    )
    if not rows:
        raise UserError(f"{export.path}: {NVTX} has no closed NVTX ranges (only marks or domain events)")
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


def _collect_gemms(export: Export) -> tuple[int, str, str]:
    """Temp table `g` of the GEMM kernels (by demangled name), clustered on correlationId so that one pass
    over the launch calls finds each one's kernel. Returns (count, correlation and process columns)."""
    conn, col = export.conn, kernel_name_column(export)
    names = conn.execute(
        f"SELECT s.id, s.value FROM StringIds AS s WHERE s.id IN (SELECT DISTINCT {col} FROM {KERNEL})"
    )
    conn.execute("CREATE TEMP TABLE gemm_ids (id INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO gemm_ids VALUES (?)", ((i,) for i, v in names if v and is_gemm(v)))
    kcols = export.cols(KERNEL)
    pid = "k.globalPid" if "globalPid" in kcols else "NULL"
    corr = "k.correlationId" if "correlationId" in kcols else "NULL"
    conn.execute(
        "CREATE TEMP TABLE g (corr INTEGER, kid INTEGER, nameId INTEGER, dur INTEGER, pid INTEGER, "
        "PRIMARY KEY (corr, kid)) WITHOUT ROWID"
    )
    conn.execute(
        f"""INSERT INTO g SELECT {corr}, k.rowid, k.{col}, k."end" - k.start, {pid}
            FROM {KERNEL} AS k WHERE k.{col} IN (SELECT id FROM gemm_ids) ORDER BY 1, 2"""
    )
    return conn.execute("SELECT COUNT(*) FROM g").fetchone()[0], corr, pid


def gemm_kernels(export: Export, range_shapes: dict[str, tuple[int, int, int, int]] | None = None) -> int:
    """Build temp table `ga`: one row per GEMM kernel with its ranges, FLOPs and minimum bytes.

    Columns: nameId, dur, op_id, user_id, layer_id (NVTX_EVENTS rowids; names in `nv_names` and `op_sz`),
    backward (1 when the kernel ran in a backward Function that was mapped to its forward op), flops,
    bytes (NULL when the shape is unknown). A kernel launched inside a backward Function range
    (`MmBackward0, seq = N`, usually on PyTorch's autograd thread where no user range is open) takes the
    user and layer ranges of the latest forward op of the same process with `seq = N`. FLOPs come from the
    emit_nvtx `sizes` of the enclosing op range, else from `range_shapes[user range] = (batch, M, N, K)`
    once per range instance. Returns the GEMM count.
    """
    require_kernels(export)
    conn = export.conn
    for t in ("gemm_ids", "g", "ga", "ga0", "op_first", "op_sz", "op_shapes", "range_shapes",
              "user_first", "bwd", "bwd_map", "fwd_of", "f_seq", "nv_names", "r_user", "r_layer"):  # fmt: skip
        conn.execute(f"DROP TABLE IF EXISTS temp.{t}")

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
            n_gemm, corr, pid = _collect_gemms(export)
            _build_user_ranges(export)
        finally:
            thread.join()
        if failure:
            raise failure[0]
        conn.execute("ATTACH DATABASE ? AS w", (work,))  # while the helper still holds it open
        helper.close()
        _attribute_gemms(export, corr, pid, range_shapes)
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


def _attribute_gemms(
    export: Export, corr: str, pid: str, range_shapes: dict[str, tuple[int, int, int, int]] | None
) -> None:
    """Temp table `ga` from `g`, the range tables (`w.r_op`, `w.r_bwd`, `r_user`, `r_layer`) and shapes."""
    conn = export.conn
    conn.execute(
        "CREATE TEMP TABLE ga0 (kid INTEGER PRIMARY KEY, nameId INTEGER, dur INTEGER, op_id INTEGER, "
        "user_id INTEGER, layer_id INTEGER, bwd_id INTEGER)"
    )
    if export.has(RUNTIME, "correlationId", "globalTid", "start", "end") and corr != "NULL":
        same_process = "AND (r.globalTid >> 24) = (g.pid >> 24)" if pid != "NULL" else ""
        lookups = ", ".join(
            _innermost(conn, t, "r", tid="globalTid") for t in ("w.r_op", "r_user", "r_layer", "w.r_bwd")
        )
        # OR IGNORE: without globalPid, a correlationId may match launches of several processes; keep one.
        conn.execute(
            f"""INSERT OR IGNORE INTO ga0
                SELECT g.kid, g.nameId, g.dur, {lookups}
                FROM {RUNTIME} AS r JOIN g ON g.corr = r.correlationId {same_process}"""
        )
    conn.execute("INSERT OR IGNORE INTO ga0 (kid, nameId, dur) SELECT kid, nameId, dur FROM g")

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
        "CREATE TEMP TABLE op_shapes (op TEXT, sizes TEXT, flops REAL, bytes REAL, PRIMARY KEY (op, sizes))"
    )
    for op, sizes_text in conn.execute(
        "SELECT DISTINCT op, sizes FROM op_sz WHERE sizes IS NOT NULL"
    ).fetchall():
        sizes = parse_sizes(sizes_text)
        dims = gemm_dims(op, sizes) if sizes else None
        if dims:
            conn.execute("INSERT INTO op_shapes VALUES (?, ?, ?, ?)", (op, sizes_text, *gemm_cost(*dims)))

    # Kernels outside any op range take the shape of their user range, once per range instance.
    cost_joins = "LEFT JOIN op_sz AS z ON z.id = a.op_id LEFT JOIN op_shapes AS os ON os.op = z.op AND os.sizes = z.sizes"
    if range_shapes:
        conn.execute("CREATE TEMP TABLE range_shapes (name TEXT PRIMARY KEY, flops REAL, bytes REAL)")
        for range_name, dims in range_shapes.items():
            conn.execute("INSERT INTO range_shapes VALUES (?, ?, ?)", (range_name, *gemm_cost(*dims)))
        conn.execute("CREATE TEMP TABLE user_first (id INTEGER PRIMARY KEY, first_kid INTEGER)")
        conn.execute(
            "INSERT INTO user_first SELECT user_id, MIN(kid) FROM ga0 "
            "WHERE op_id IS NULL AND user_id IS NOT NULL GROUP BY user_id"
        )
        cost_joins += (
            " LEFT JOIN nv_names AS u ON u.id = a.user_id AND a.op_id IS NULL"
            " LEFT JOIN range_shapes AS rs ON rs.name = u.name LEFT JOIN user_first AS uf ON uf.id = a.user_id"
        )

    def cost(col: str) -> str:
        ranged = (
            f" WHEN rs.{col} IS NOT NULL AND a.op_id IS NULL THEN CASE WHEN uf.first_kid = a.kid THEN rs.{col} ELSE 0 END"
            if range_shapes
            else ""
        )
        return f"CASE WHEN os.{col} IS NOT NULL THEN CASE WHEN z.first_kid = a.kid THEN os.{col} ELSE 0 END{ranged} END"

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
            SELECT a.nameId, a.dur, a.op_id, {backward_cols}, {cost("flops")} AS flops, {cost("bytes")} AS bytes
            FROM ga0 AS a {cost_joins} {backward_joins}"""
    )
    conn.execute("DROP TABLE temp.ga0")


BACKWARD_SUFFIX = " (backward)"
# grouping -> (SQL key over `ga` joined with its names, joins)
GROUPINGS = {
    "kernel": "k.value",
    "range": f"COALESCE(u.name, z.op, '(no NVTX range)') || CASE WHEN ga.backward THEN '{BACKWARD_SUFFIX}' ELSE '' END",
    "layer": "COALESCE(l.name, '(outside layers.N)')",
}
_GROUP_JOINS = {
    "kernel": "JOIN StringIds AS k ON k.id = ga.nameId",
    "range": "LEFT JOIN nv_names AS u ON u.id = ga.user_id LEFT JOIN op_sz AS z ON z.id = ga.op_id",
    "layer": "LEFT JOIN nv_names AS l ON l.id = ga.layer_id",
}


def gemm_groups(export: Export, by: str) -> list[dict]:
    """Grouped rows of the `ga` table built by gemm_kernels: count, time, and FLOPs/bytes where known."""
    key = GROUPINGS[by]
    if by == "kernel":  # aggregate on integer ids first, then name them
        sql = """SELECT k.value AS name, SUM(c) AS count, SUM(t) AS total_ns, SUM(f) AS flops, SUM(b) AS bytes,
                        SUM(s) AS shaped_ns
                 FROM (SELECT nameId, COUNT(*) AS c, SUM(dur) AS t, SUM(flops) AS f, SUM(bytes) AS b,
                              SUM(CASE WHEN flops IS NOT NULL THEN dur END) AS s FROM ga GROUP BY nameId) AS g
                      JOIN StringIds AS k ON k.id = g.nameId
                 GROUP BY k.value ORDER BY total_ns DESC, name"""
    else:
        sql = f"""SELECT {key} AS name, COUNT(*) AS count, SUM(dur) AS total_ns, SUM(flops) AS flops,
                         SUM(bytes) AS bytes, SUM(CASE WHEN flops IS NOT NULL THEN dur END) AS shaped_ns
                  FROM ga {_GROUP_JOINS[by]} GROUP BY 1 ORDER BY total_ns DESC, name"""
    return _dicts(export.conn.execute(sql))


def _dicts(cursor: sqlite3.Cursor) -> list[dict]:
    names = [d[0] for d in cursor.description]
    return [dict(zip(names, row)) for row in cursor.fetchall()]
