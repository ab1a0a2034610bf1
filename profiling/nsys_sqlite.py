"""Read Nsight Systems SQLite exports (nsys 2022-2026): kernel totals, GEMM attribution, NVTX ranges.

    from profiling.nsys_sqlite import open_export, kernel_summary, gemm_kernels, nvtx_summary
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
import re
import sqlite3
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
    conn = sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)
    try:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    except sqlite3.DatabaseError as exc:
        raise UserError(f"{path}: not a readable SQLite database ({exc})") from None
    # Temp tables of a large capture do not fit SQLite's default 2 MB cache: keep them in memory.
    conn.execute("PRAGMA temp_store = MEMORY")
    conn.execute("PRAGMA cache_size = -262144")
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
    sql = f"""
        SELECT s.value AS name, COUNT(*) AS count, SUM(k."end" - k.start) AS total_ns,
               AVG(k."end" - k.start) AS avg_ns, MIN(k."end" - k.start) AS min_ns, MAX(k."end" - k.start) AS max_ns
        FROM {KERNEL} AS k JOIN StringIds AS s ON s.id = k.{col}
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

# Ranges that emit_nvtx writes per autograd op: `aten::mm, seq = 3, op_id = 7, sizes = [...]`.
_OP_RANGE_SQL = "(name LIKE '%, op_id = %' OR name LIKE '%, seq = %' OR name LIKE '%, sizes = %')"


def _op_base_sql(expr: str) -> str:
    """SQL: the range name without its emit_nvtx `, seq = .., op_id = .., sizes = ..` suffix."""
    return (
        f"CASE WHEN instr({expr}, ', ') > 0 THEN substr({expr}, 1, instr({expr}, ', ') - 1) ELSE {expr} END"
    )


def has_nvtx(export: Export) -> bool:
    return export.has(NVTX, "start", "end", "eventType", "globalTid")


def _nvtx_name_sql(export: Export) -> tuple[str, str]:
    """(expression, joins) naming an NVTX_EVENTS row `e`: text or StringIds via textId, domain-prefixed."""
    cols = export.cols(NVTX)
    parts = []
    joins = ""
    if "text" in cols:
        parts.append("e.text")
    if "textId" in cols:
        parts.append("ts.value")
        joins += " LEFT JOIN StringIds AS ts ON ts.id = e.textId"
    base = f"COALESCE({', '.join(parts)}, '')" if parts else "''"
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


def _build_nvtx_tables(export: Export) -> bool:
    """Temp tables of closed NVTX ranges: nv (all), nv_op (emit_nvtx ops), nv_user (others), nv_layer."""
    conn = export.conn
    for t in ("nv", "nv_op", "nv_user", "nv_layer"):
        conn.execute(f"DROP TABLE IF EXISTS temp.{t}")
    if not has_nvtx(export):
        for t in ("nv", "nv_op", "nv_user", "nv_layer"):
            conn.execute(
                f'CREATE TEMP TABLE {t} (id INTEGER, tid INTEGER, start INTEGER, "end" INTEGER, name TEXT)'
            )
        return False
    name, joins = _nvtx_name_sql(export)
    conn.execute(
        f"""CREATE TEMP TABLE nv AS
            SELECT e.globalTid AS tid, e.start AS start, e."end" AS "end", {name} AS name,
                   CASE e.eventType WHEN 59 THEN 'PushPop' ELSE 'StartEnd' END AS style
            FROM {NVTX} AS e {joins}
            WHERE e.eventType IN {RANGE_TYPES} AND e."end" IS NOT NULL"""
    )
    # Integer primary keys: the attribution joins back to these tables by range id.
    cols = 'id INTEGER PRIMARY KEY, tid INTEGER, start INTEGER, "end" INTEGER'
    conn.execute(f"CREATE TEMP TABLE nv_op ({cols})")
    conn.execute(f'INSERT INTO nv_op SELECT rowid, tid, start, "end" FROM nv WHERE {_OP_RANGE_SQL}')
    conn.execute(f"CREATE TEMP TABLE nv_user ({cols}, name TEXT)")
    conn.execute(
        f'INSERT INTO nv_user SELECT rowid, tid, start, "end", name FROM nv WHERE NOT {_OP_RANGE_SQL}'
    )
    conn.execute(f"CREATE TEMP TABLE nv_layer ({cols}, name TEXT)")
    conn.execute("INSERT INTO nv_layer SELECT * FROM nv_user WHERE name GLOB 'layers.[0-9]*'")
    for t in ("nv_op", "nv_user", "nv_layer"):
        conn.execute(f"CREATE INDEX temp.{t}_i ON {t} (tid, start)")
    return True


def nvtx_summary(export: Export) -> list[dict]:
    """Per NVTX range name and style: count, total/avg/min/max ns, first start, parent range and depth.

    Totals match `nsys stats --report nvtxsum` (marks excluded, ranges of a named domain as `domain:name`).
    """
    if not has_nvtx(export):
        raise UserError(
            f"{export.path}: no {NVTX} table: nothing was recorded with NVTX. Capture with "
            "`nsys profile --trace=nvtx,...` and run with `--profiling.nvtx=true`."
        )
    _build_nvtx_tables(export)
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


def gemm_kernels(export: Export, range_shapes: dict[str, tuple[int, int, int, int]] | None = None) -> int:
    """Build temp table `ga`: one row per GEMM kernel with its ranges, FLOPs and minimum bytes.

    Columns: nameId, dur, op_id, user_id, layer_id (rowids of temp table nv), flops, bytes
    (NULL when the shape is unknown). FLOPs come from the emit_nvtx `sizes` of the enclosing op range, else
    from `range_shapes[user range] = (batch, M, N, K)` once per range instance. Returns the GEMM count.
    """
    require_kernels(export)
    conn = export.conn
    col = kernel_name_column(export)
    for t in ("gemm_ids", "g", "rt", "ga", "ga0", "op_sz", "op_shapes", "range_shapes", "first_k"):
        conn.execute(f"DROP TABLE IF EXISTS temp.{t}")

    names = conn.execute(
        f"SELECT s.id, s.value FROM StringIds AS s WHERE s.id IN (SELECT DISTINCT {col} FROM {KERNEL})"
    )
    conn.execute("CREATE TEMP TABLE gemm_ids (id INTEGER PRIMARY KEY)")
    conn.executemany("INSERT INTO gemm_ids VALUES (?)", ((i,) for i, v in names if v and is_gemm(v)))

    kcols = export.cols(KERNEL)
    pid = "k.globalPid" if "globalPid" in kcols else "NULL"
    corr = "k.correlationId" if "correlationId" in kcols else "NULL"
    conn.execute(
        f"""CREATE TEMP TABLE g AS
            SELECT k.rowid AS kid, k.{col} AS nameId, k.start AS start, k."end" - k.start AS dur,
                   {corr} AS corr, {pid} AS pid
            FROM {KERNEL} AS k WHERE k.{col} IN (SELECT id FROM gemm_ids)"""
    )
    n_gemm = conn.execute("SELECT COUNT(*) FROM g").fetchone()[0]

    have_rt = export.has(RUNTIME, "correlationId", "globalTid", "start", "end") and "correlationId" in kcols
    if have_rt:
        conn.execute(
            f"""CREATE TEMP TABLE rt AS SELECT r.correlationId AS corr, r.globalTid AS tid, r.start AS start,
                       r."end" AS "end" FROM {RUNTIME} AS r WHERE r.correlationId IN (SELECT corr FROM g)"""
        )
    else:
        conn.execute('CREATE TEMP TABLE rt (corr INTEGER, tid INTEGER, start INTEGER, "end" INTEGER)')
    conn.execute("CREATE INDEX temp.rt_i ON rt (corr)")
    _build_nvtx_tables(export)

    def innermost(table: str) -> str:
        # Latest-starting range that encloses the launch call. The lower bound (the longest range of the
        # table) keeps the backward index scan short when no range encloses the call.
        longest = conn.execute(f'SELECT COALESCE(MAX("end" - start), 0) FROM {table}').fetchone()[0]
        return (
            f"(SELECT x.id FROM {table} AS x WHERE x.tid = r.tid AND x.start <= r.start AND x.start >= r.start - {int(longest)} "
            'AND x."end" >= r."end" ORDER BY x.start DESC LIMIT 1)'
        )

    same_process = "AND (r.tid >> 24) = (g.pid >> 24)" if pid != "NULL" else ""
    conn.execute(
        f"""CREATE TEMP TABLE ga0 AS
            SELECT g.kid, g.nameId, g.start, g.dur,
                   {innermost("nv_op")} AS op_id, {innermost("nv_user")} AS user_id, {innermost("nv_layer")} AS layer_id
            FROM g LEFT JOIN rt AS r ON r.corr = g.corr {same_process}
            GROUP BY g.kid"""
    )
    # The enclosing emit_nvtx op ranges: base name and `sizes = ...` text (few distinct values).
    conn.execute("CREATE TEMP TABLE op_sz (id INTEGER PRIMARY KEY, op TEXT, sizes TEXT)")
    conn.execute(
        f"""INSERT INTO op_sz
            SELECT o.rowid AS id, {_op_base_sql("o.name")} AS op,
                   CASE WHEN instr(o.name, 'sizes = ') > 0 THEN substr(o.name, instr(o.name, 'sizes = ')) END AS sizes
            FROM nv AS o WHERE o.rowid IN (SELECT op_id FROM ga0)"""
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
    conn.execute("CREATE TEMP TABLE range_shapes (name TEXT PRIMARY KEY, flops REAL, bytes REAL)")
    for name, dims in (range_shapes or {}).items():
        conn.execute("INSERT INTO range_shapes VALUES (?, ?, ?)", (name, *gemm_cost(*dims)))
    # One op (or one user-range instance) may launch several GEMM kernels: its FLOPs count once, on the first.
    conn.execute("CREATE TEMP TABLE first_k (kid INTEGER PRIMARY KEY)")
    conn.execute(
        """INSERT INTO first_k SELECT MIN(kid) FROM ga0 WHERE op_id IS NOT NULL GROUP BY op_id
           UNION ALL SELECT MIN(kid) FROM ga0 WHERE op_id IS NULL AND user_id IS NOT NULL GROUP BY user_id"""
    )
    conn.execute(
        """CREATE TEMP TABLE ga AS
           SELECT a.nameId, a.dur, a.op_id, a.user_id, a.layer_id,
                  CASE WHEN os.flops IS NOT NULL OR (rs.flops IS NOT NULL AND a.op_id IS NULL) THEN
                       CASE WHEN f.kid IS NOT NULL THEN COALESCE(os.flops, rs.flops) ELSE 0 END END AS flops,
                  CASE WHEN os.flops IS NOT NULL OR (rs.flops IS NOT NULL AND a.op_id IS NULL) THEN
                       CASE WHEN f.kid IS NOT NULL THEN COALESCE(os.bytes, rs.bytes) ELSE 0 END END AS bytes
           FROM ga0 AS a LEFT JOIN first_k AS f ON f.kid = a.kid LEFT JOIN op_sz AS z ON z.id = a.op_id
                LEFT JOIN op_shapes AS os ON os.op = z.op AND os.sizes = z.sizes
                LEFT JOIN nv_user AS u ON u.id = a.user_id AND a.op_id IS NULL
                LEFT JOIN range_shapes AS rs ON rs.name = u.name"""
    )
    conn.execute("DROP TABLE temp.ga0")
    return n_gemm


# grouping -> (SQL key over `ga` joined with its names, joins)
GROUPINGS = {
    "kernel": "k.value",
    "range": "COALESCE(u.name, z.op, '(no NVTX range)')",
    "layer": "COALESCE(l.name, '(outside layers.N)')",
}
_GROUP_JOINS = {
    "kernel": "JOIN StringIds AS k ON k.id = ga.nameId",
    "range": "LEFT JOIN nv_user AS u ON u.id = ga.user_id LEFT JOIN op_sz AS z ON z.id = ga.op_id",
    "layer": "LEFT JOIN nv_layer AS l ON l.id = ga.layer_id",
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
