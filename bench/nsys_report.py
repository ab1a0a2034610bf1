"""lmtrain bench nsys_report [--kernels 1000000] [--sample 5000]

Times the nsys GEMM report (SQL aggregation) on a synthetic export of about `--kernels` kernels (half of
them GEMMs: forward ones under layers.N > FeedForward/wN > emit_nvtx op ranges, and twice as many
backward ones on an autograd thread, under `MmBackward0, seq = N` ranges) against the 10 s target, and
against a naive Python-loop baseline measured in the same run: every kernel row pulled into Python for
the per-name totals, and one lookup query per GEMM kernel for its launch call and innermost NVTX ranges
(timed on `--sample` GEMM kernels and extrapolated linearly to all of them).
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.profiling import nsys_sqlite as ns  # noqa: E402
from lmtrain.profiling.nsys_synth import write_export  # noqa: E402
from lmtrain.tools import nsys_gemm_report as report  # noqa: E402

TARGET_S = 10.0


def sql_report(path: Path) -> tuple[float, dict]:
    """The report exactly as `tools/nsys_gemm_report.py TRACE` computes it (without printing)."""
    args = report.build_parser().parse_args([str(path)])
    t0 = time.perf_counter()
    export = ns.open_export(path)
    result = report.gemm_report(args, export)
    elapsed = time.perf_counter() - t0
    export.conn.close()
    # Per-name totals for the check against the baseline, outside the timing (the report keeps only the sum).
    totals = {r["name"]: (r["count"], r["total_ns"]) for r in report.kernel_totals(path)}
    return elapsed, {"totals": totals, "gemm": result["gemm_kernels"], "groups": result["groups"]}


def naive_report(path: Path, sample: int) -> tuple[float, float, dict, int]:
    """(seconds for the totals loop, estimated seconds for all GEMM lookups, totals, GEMM count)."""
    conn = sqlite3.connect(path)
    t0 = time.perf_counter()
    names = dict(conn.execute("SELECT id, value FROM StringIds"))
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    gemms = []
    for start, end, name_id, corr in conn.execute(
        'SELECT start, "end", demangledName, correlationId FROM CUPTI_ACTIVITY_KIND_KERNEL'
    ):
        name = names[name_id]
        totals[name][0] += 1
        totals[name][1] += end - start
        if ns.is_gemm(name):
            gemms.append(corr)
    t_totals = time.perf_counter() - t0
    # Per-kernel lookups (indexes created first, outside the timing, to be fair to the baseline).
    conn.execute("CREATE INDEX IF NOT EXISTS rt_corr ON CUPTI_ACTIVITY_KIND_RUNTIME (correlationId)")
    conn.execute("CREATE INDEX IF NOT EXISTS nv_tid ON NVTX_EVENTS (globalTid, start)")
    subset = gemms[:sample]
    t1 = time.perf_counter()
    per_range: dict[str, int] = defaultdict(int)
    for corr in subset:
        tid, rs, re_ = conn.execute(
            'SELECT globalTid, start, "end" FROM CUPTI_ACTIVITY_KIND_RUNTIME WHERE correlationId = ?', (corr,)
        ).fetchone()
        enclosing = conn.execute(
            'SELECT text FROM NVTX_EVENTS WHERE globalTid = ? AND start <= ? AND "end" >= ? ORDER BY start DESC LIMIT 4',
            (tid, rs, re_),
        ).fetchall()
        user = next((t for (t,) in enclosing if ", op_id = " not in t), None)
        per_range[user] += 1
    t_lookup = (time.perf_counter() - t1) * len(gemms) / max(len(subset), 1)
    conn.close()
    return t_totals, t_lookup, {k: tuple(v) for k, v in totals.items()}, len(gemms)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[1])
    p.add_argument("--kernels", type=int, default=1_000_000)
    p.add_argument("--sample", type=int, default=5_000)
    args = p.parse_args(argv)
    n_layers = 32
    steps = max(1, round(args.kernels / (n_layers * 3 * 3 * 2)))  # 3 FFN GEMMs x (1 fwd + 2 bwd) x 2 kernels
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        synth = write_export(Path(tmp) / "bench.sqlite", steps=steps, n_layers=n_layers, tokens=4096, dim=4096,
                             hidden=14336, with_sizes=True, backward=True)  # fmt: skip
        print(f"synthetic export: {synth.kernels:,} kernels ({synth.gemm_kernels:,} GEMMs), "
              f"{synth.path.stat().st_size / 1e6:.0f} MB, built in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        sql_s, sql = sql_report(synth.path)
        assert sql["gemm"] == synth.gemm_kernels
        verdict = "within" if sql_s <= TARGET_S else "OVER"
        print(
            f"SQL report: {sql_s:.2f} s for {synth.kernels:,} kernels ({verdict} the {TARGET_S:.0f} s target)",
            flush=True,
        )
        t_totals, t_lookup, naive_totals, naive_gemm = naive_report(synth.path, args.sample)
        assert naive_totals == sql["totals"] and naive_gemm == sql["gemm"], "baseline and report disagree"
        naive_s = t_totals + t_lookup
        print(f"naive Python loop: {t_totals:.2f} s totals + {t_lookup:.1f} s lookups (timed on "
              f"{min(args.sample, naive_gemm):,} of {naive_gemm:,} GEMMs, extrapolated) = {naive_s:.1f} s")  # fmt: skip
        print(f"speed-up of the SQL report over the naive loop: {naive_s / sql_s:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
