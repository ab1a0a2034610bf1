"""lmtrain gemm-report trace.sqlite [--run RUN_DIR | --model-config YAML] [--gpu gh200] [--markdown out.md]

GEMM roofline report of an Nsight Systems SQLite export (`nsys export --type sqlite trace.nsys-rep`).

GEMM kernels (cuBLAS xmma/nvjet, CUTLASS 2/3; flash-attention excluded) are attributed to their innermost
NVTX range through the CUDA runtime launch call, as `nsys stats` does, and grouped per kernel name, per
NVTX range (e.g. `FeedForward/w1`) and per layer (`layers.N`). M, N, K come from `emit_nvtx` shape
annotations (`, sizes = [[..], [..]]`) when present, else from the model config for the model's named
forward ranges. Then FLOPs = 2MNK, minimum bytes (bf16), arithmetic intensity, achieved TFLOP/s and GB/s,
the roofline bound min(peak, AI x bandwidth) and the share of it achieved.

Peaks: `--peak-tflops/--peak-bandwidth`, else `--gpu`, else the device named in the export, else the
GH200 reference (989 TFLOP/s, 4 TB/s); the report says which. A trace without CUDA kernels (a CPU trace
captured with `--trace=nvtx,osrt`) gets the NVTX range summary instead (also forced with `--nvtx`).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import csv
import io
import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.atomic import atomic_write_text  # noqa: E402
from lmtrain.errors import UserError  # noqa: E402
from lmtrain.profiling import nsys_sqlite as ns  # noqa: E402
from lmtrain.profiling.peaks import DEFAULT_KEY, PEAKS, DevicePeaks, device_peaks, peaks_for_device_name  # noqa: E402
from lmtrain.tables import fmt, markdown_table  # noqa: E402
from lmtrain.tools.common import run_tool  # noqa: E402

GROUP_TITLES = {"kernel": "GEMM kernels by name", "range": "GEMMs by NVTX range", "layer": "GEMMs by layer"}


# --------------------------------------------------------------------------------------------------
# Peaks and shapes
# --------------------------------------------------------------------------------------------------


def resolve_peaks(args, export: ns.Export) -> tuple[float, float, str]:
    """(peak FLOP/s, bandwidth B/s, description of where they came from)."""
    base: DevicePeaks | None = None
    source = ""
    if args.gpu:
        base = device_peaks(args.gpu)
        source = f"--gpu {base.key}"
    else:
        names = export.device_names()
        if names:
            found = peaks_for_device_name(names[0])
            if found is None and args.peak_tflops is None:
                raise UserError(
                    f"{export.path}: device '{names[0]}' is not in the peak table ({', '.join(PEAKS)}): pass "
                    "--gpu KEY or --peak-tflops T --peak-bandwidth BYTES_PER_S"
                )
            base, source = found, f"device in export: {names[0]}"
        elif args.peak_tflops is None or args.peak_bandwidth is None:
            base = PEAKS[DEFAULT_KEY]
            source = f"default reference {base.label} (the export names no device; use --gpu to change)"
    tflops = args.peak_tflops if args.peak_tflops is not None else base.tflops
    bandwidth = args.peak_bandwidth if args.peak_bandwidth is not None else base.bandwidth
    if args.peak_tflops is not None or args.peak_bandwidth is not None:
        source = (source + "; " if source else "") + "overridden by --peak-tflops/--peak-bandwidth"
    if not tflops > 0 or not bandwidth > 0:
        raise UserError("--peak-tflops and --peak-bandwidth must be > 0")
    return tflops * 1e12, bandwidth, source


def model_range_shapes(
    config_path: Path, tokens: int | None
) -> tuple[dict[str, tuple[int, int, int, int]], str]:
    """(batch, M, N, K) of each named forward GEMM range of the model, from a run's config YAML."""
    from lmtrain.config import ConfigError, config_from_dict, load_yaml_with_bases
    from lmtrain.model import model_args_from_config

    data = load_yaml_with_bases(config_path)
    if "model" not in data:  # a bare model section
        data = {"model": data}
    data = {k: v for k, v in data.items() if k in ("model", "data")}  # experiment files carry more sections
    try:
        cfg = config_from_dict(data, source=str(config_path))
    except ConfigError as exc:
        raise UserError(f"{config_path}: not a model/run config: {exc}") from None
    margs = model_args_from_config(
        cfg.model, vocab_size=cfg.model.vocab_size or 1, seq_len=cfg.model.seq_len or cfg.data.sequence_length
    )
    seq = cfg.data.sequence_length
    t = tokens if tokens is not None else cfg.data.batch_size * seq
    d, hd, hidden = margs.dim, margs.head_dim, margs.ffn_hidden_dim
    sequences = max(1, t // seq)
    shapes = {
        "Attention/wq": (1, t, margs.n_heads * hd, d),
        "Attention/wk": (1, t, margs.n_kv_heads * hd, d),
        "Attention/wv": (1, t, margs.n_kv_heads * hd, d),
        "Attention/wo": (1, t, d, margs.n_heads * hd),
        "FeedForward/w1": (1, t, hidden, d),
        "FeedForward/w2": (1, t, d, hidden),
    }
    if margs.mlp == "swiglu":
        shapes["FeedForward/w3"] = (1, t, hidden, d)
    # SDPA's math path (the only one whose kernels are GEMMs; flash kernels are not counted): per sequence
    # and head, Q K^T (T x hd @ hd x T) and P V (T x T @ T x hd), the same FLOPs and minimum bytes as
    # 2 x heads x sequences GEMMs of T x T x hd. Causal masking skips no work on that path.
    shapes["Attention/sdpa"] = (2 * sequences * margs.n_heads, seq, seq, hd)
    desc = f"{config_path}: dim={d}, ffn={hidden}, heads={margs.n_heads}/{margs.n_kv_heads}, tokens/call={t}"
    return shapes, desc


# --------------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------------


def derive(row: dict, peak_flops: float, bandwidth: float, total_ns: float) -> dict:
    """Add achieved rates and the roofline bound to a grouped row (FLOPs over the shaped kernels only)."""
    out = dict(row)
    out["time_ms"] = row["total_ns"] / 1e6
    out["time_share"] = row["total_ns"] / total_ns if total_ns else None
    flops, nbytes, shaped_ns = row.get("flops"), row.get("bytes"), row.get("shaped_ns")
    if flops and shaped_ns:
        seconds = shaped_ns / 1e9
        ai = flops / nbytes if nbytes else None
        bound = min(peak_flops, ai * bandwidth) if ai else peak_flops
        achieved = flops / seconds
        out.update(
            tflop=flops / 1e12,
            tflops=achieved / 1e12,
            gbps=nbytes / seconds / 1e9 if nbytes else None,
            ai=ai,
            bound_tflops=bound / 1e12,
            share_of_bound=achieved / bound,
        )
    else:
        out.update(tflop=None, tflops=None, gbps=None, ai=None, bound_tflops=None, share_of_bound=None)
    return out


def kernel_totals(path: Path) -> list[dict]:
    export = ns.open_export(path)
    try:
        return ns.kernel_summary(export)
    finally:
        export.conn.close()


def gemm_report(args, export: ns.Export) -> dict:
    range_shapes, shapes_source = {}, "emit_nvtx shape annotations only"
    config = None
    if args.run:
        config = Path(args.run) / "config.yaml"
        if not config.is_file():
            raise UserError(f"--run {args.run}: no config.yaml in it (expected a run directory of lmtrain)")
    elif args.model_config:
        config = Path(args.model_config)
    if config is not None:
        range_shapes, desc = model_range_shapes(config, args.tokens)
        shapes_source = f"emit_nvtx shape annotations, else the model config ({desc})"
    peak_flops, bandwidth, peak_source = resolve_peaks(args, export)
    # The per-name totals of all kernels need none of the GEMM tables: compute them on a second
    # connection meanwhile (SQLite runs each connection's statements on the calling thread only).
    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        totals = pool.submit(kernel_totals, export.path)
        n_gemm = ns.gemm_kernels(export, range_shapes)
        all_kernels = totals.result()
    if n_gemm == 0:
        top = "\n".join(
            f"  {r['total_ns'] / 1e6:10.3f} ms  {r['count']:6d}x  {r['name'][:100]}" for r in all_kernels[:10]
        )
        raise UserError(
            f"{export.path}: no GEMM kernels (cuBLAS xmma/nvjet, CUTLASS) among {len(all_kernels)} kernel names. "
            f"Top kernels by time:\n{top}"
        )
    groups = {}
    gemm_ns = None
    for by in ns.GROUPINGS:
        rows = ns.gemm_groups(export, by)
        gemm_ns = gemm_ns or sum(r["total_ns"] for r in rows)
        groups[by] = [derive(r, peak_flops, bandwidth, gemm_ns) for r in rows]
    return {
        "trace": str(export.path),
        "nsys_version": export.version(),
        "peak_tflops": peak_flops / 1e12,
        "peak_bandwidth": bandwidth,
        "peak_source": peak_source,
        "shapes_source": shapes_source,
        "gemm_kernels": n_gemm,
        "gemm_time_ns": gemm_ns,
        "all_kernel_time_ns": sum(r["total_ns"] for r in all_kernels),
        "groups": groups,
    }


GEMM_COLUMNS = [
    ("name", "name", None),
    ("kernels", "count", 0),
    ("time ms", "time_ms", 3),
    ("% GEMM", "time_share", "pct"),
    ("TFLOP", "tflop", 3),
    ("TFLOP/s", "tflops", 1),
    ("FLOP/B", "ai", 0),
    ("GB/s", "gbps", 0),
    ("bound TFLOP/s", "bound_tflops", 1),
    ("% of bound", "share_of_bound", "pct"),
]

NVTX_COLUMNS = [
    ("range", "label", None),
    ("style", "style", None),
    ("count", "count", 0),
    ("total ms", "total_ms", 3),
    ("avg ms", "avg_ms", 3),
    ("min ms", "min_ms", 3),
    ("max ms", "max_ms", 3),
    ("parent", "parent", None),
]


def _cell(row: dict, key: str, spec) -> str:
    value = row.get(key)
    if spec is None:
        return "" if value is None else str(value)
    if spec == "pct":
        return fmt(None if value is None else 100 * value, 1)
    if spec == 0 and isinstance(value, float):
        return fmt(value, 0)
    return fmt(value, spec)


def _rows(rows: list[dict], columns, top: int | None) -> list[list[str]]:
    return [[_cell(r, key, spec) for _, key, spec in columns] for r in rows[:top]]


def print_gemm_report(report: dict, top: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 160))
    console.print(
        f"[bold]{report['trace']}[/] (nsys {report['nsys_version']}): {report['gemm_kernels']} GEMM kernels, "
        f"{report['gemm_time_ns'] / 1e6:.3f} ms = {100 * report['gemm_time_ns'] / report['all_kernel_time_ns']:.1f}% "
        "of all kernel time"
    )
    console.print(
        f"peaks: {report['peak_tflops']:.0f} TFLOP/s, {report['peak_bandwidth'] / 1e12:.2f} TB/s "
        f"({report['peak_source']}); shapes: {report['shapes_source']}"
    )
    for by, rows in report["groups"].items():
        table = Table(title=GROUP_TITLES[by], title_justify="left")
        for i, (header, _, _) in enumerate(GEMM_COLUMNS):
            table.add_column(header, justify="left" if i == 0 else "right", overflow="fold")
        for cells in _rows(rows, GEMM_COLUMNS, top):
            cells[0] = cells[0] if len(cells[0]) <= 70 else cells[0][:67] + "..."
            table.add_row(*cells)
        console.print(table)


def gemm_markdown(report: dict) -> str:
    out = [
        f"# GEMM report: {report['trace']}\n\n",
        f"nsys {report['nsys_version']}; {report['gemm_kernels']} GEMM kernels, "
        f"{report['gemm_time_ns'] / 1e6:.3f} ms of {report['all_kernel_time_ns'] / 1e6:.3f} ms kernel time. "
        f"Peaks {report['peak_tflops']:.0f} TFLOP/s and {report['peak_bandwidth'] / 1e12:.2f} TB/s "
        f"({report['peak_source']}). Shapes: {report['shapes_source']}.\n",
    ]
    for by, rows in report["groups"].items():
        out.append(f"\n## {GROUP_TITLES[by]}\n\n")
        out.append(markdown_table([h for h, _, _ in GEMM_COLUMNS], _rows(rows, GEMM_COLUMNS, None)))
    return "".join(out)


def gemm_csv(report: dict) -> str:
    buf = io.StringIO()
    keys = ["group", "name", "count", "total_ns", "time_share", "flops", "bytes", "shaped_ns", "tflops", "ai",
            "gbps", "bound_tflops", "share_of_bound"]  # fmt: skip
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    for by, rows in report["groups"].items():
        for r in rows:
            writer.writerow({"group": by, **r})
    return buf.getvalue()


def nvtx_report(export: ns.Export, note: str) -> dict:
    rows = ns.nvtx_summary(export)
    for r in rows:
        r["label"] = "  " * r["depth"] + r["name"]
        for k in ("total", "avg", "min", "max"):
            r[f"{k}_ms"] = r[f"{k}_ns"] / 1e6
    return {"trace": str(export.path), "nsys_version": export.version(), "note": note, "ranges": rows}


def print_nvtx_report(report: dict, top: int | None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(Console().width, 140))
    console.print(f"[bold]{report['trace']}[/] (nsys {report['nsys_version']}): {report['note']}")
    table = Table(title="NVTX ranges (in order of first start; indented by nesting)", title_justify="left")
    for i, (header, _, _) in enumerate(NVTX_COLUMNS):
        table.add_column(header, justify="left" if i in (0, 1, 7) else "right")
    for cells in _rows(report["ranges"], NVTX_COLUMNS, top):
        table.add_row(*cells)
    console.print(table)


def nvtx_markdown(report: dict) -> str:
    return f"# NVTX ranges: {report['trace']}\n\n{report['note']}\n\n" + markdown_table(
        [h for h, _, _ in NVTX_COLUMNS], _rows(report["ranges"], NVTX_COLUMNS, None)
    )


def nvtx_csv(report: dict) -> str:
    buf = io.StringIO()
    keys = [
        "name",
        "style",
        "count",
        "total_ns",
        "avg_ns",
        "min_ns",
        "max_ns",
        "first_start",
        "parent",
        "depth",
    ]
    writer = csv.DictWriter(buf, fieldnames=keys, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(report["ranges"])
    return buf.getvalue()


# --------------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmtrain gemm-report",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("trace", help="nsys SQLite export (nsys export --type sqlite REPORT.nsys-rep)")
    shapes = p.add_mutually_exclusive_group()
    shapes.add_argument(
        "--run", metavar="RUN_DIR", help="run directory: GEMM shapes from RUN_DIR/config.yaml"
    )
    shapes.add_argument("--model-config", metavar="YAML", help="run or model config YAML for GEMM shapes")
    p.add_argument(
        "--tokens", type=int, help="tokens per forward call (default: batch_size x sequence_length)"
    )
    p.add_argument("--gpu", choices=list(PEAKS), help="peaks of this GPU (default: the device in the export)")
    p.add_argument("--peak-tflops", type=float, help="peak dense TFLOP/s (overrides --gpu)")
    p.add_argument("--peak-bandwidth", type=float, help="peak memory bandwidth in bytes/s, e.g. 4e12")
    p.add_argument("--nvtx", action="store_true", help="summarise NVTX ranges instead of GEMMs")
    p.add_argument("--top", type=int, default=25, help="rows per table on the terminal (default 25)")
    p.add_argument("--csv", metavar="PATH", help="also write the rows as CSV")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as markdown")
    p.add_argument("--quiet", action="store_true", help="do not print the tables")
    return p


def build_report(args) -> tuple[str, dict]:
    """('gemm' | 'nvtx', report dict) for parsed arguments."""
    export = ns.open_export(args.trace)
    if args.tokens is not None and args.tokens < 1:
        raise UserError(f"--tokens must be >= 1, got {args.tokens}")
    if args.nvtx:
        return "nvtx", nvtx_report(export, "NVTX range summary (--nvtx)")
    if not export.has(ns.KERNEL, "start", "end") and ns.has_nvtx(export):
        note = (
            f"no {ns.KERNEL} table (a trace without CUDA kernels): NVTX ranges instead. For the GEMM report, "
            + ns.RECAPTURE_HINT
        )
        return "nvtx", nvtx_report(export, note)
    return "gemm", gemm_report(args, export)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top is not None and args.top < 1:
        raise UserError(f"--top must be >= 1, got {args.top}")
    kind, report = build_report(args)
    if not args.quiet:
        (print_gemm_report if kind == "gemm" else print_nvtx_report)(report, args.top)
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=1) + "\n")
    if args.csv:
        atomic_write_text(args.csv, gemm_csv(report) if kind == "gemm" else nvtx_csv(report))
    if args.markdown:
        atomic_write_text(args.markdown, gemm_markdown(report) if kind == "gemm" else nvtx_markdown(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
