"""lmtrain gemm-report trace.sqlite [--shape 'w1=8192x1536x512:bf16'] [--shapes shapes.yaml] [--gpu h100-sxm] [--markdown out.md]

How close do the GEMMs of a step come to the GPU's peak? A GEMM report of an Nsight Systems SQLite export
(`nsys export --type sqlite trace.nsys-rep`).

Which kernels are GEMMs (`lmtrain.profiling.nsys_sqlite.kernel_class`): cuBLAS (`gemmSN_*`, `gemmk1_*`,
`*sgemm*`, `sm80/sm90_xmma_gemm_*`, `nvjet_*`, with their `splitKreduce` kernels), CUTLASS 2/3, Volta/
Ampere/Turing cuBLAS kernels and TensorRT `trt_*gemm*`; not fused attention, GEMV, pooling or cuDNN
helpers; implicit-GEMM convolutions are counted apart as "conv". `--gemm-pattern REGEX` adds kernels.

Each GEMM kernel is attributed to its innermost NVTX range through the CUDA launch call (as `nsys stats`
does), backward kernels to their forward op through emit_nvtx's `seq`, and grouped per kernel name, per
range, per layer (`layers.N`) and per device. M, N, K come from, first match wins: `--shape`/`--shapes`
for a kernel name; PyTorch `emit_nvtx(record_shapes=True)` op ranges (`aten::mm, seq = 3, op_id = 9,
sizes = [[8, 16], [16, 32]]`); `--shape`/`--shapes` for a range name; lmtrain's self-describing ranges
(`FeedForward/w1 [gemm M=8192 N=1536 K=512 dtype=bf16]`, see lmtrain.nvtx); pyprof/DLProf dict ranges;
`--run`/`--model-config` for lmtrain's range names. Then FLOPs = 2·B·M·N·K, minimum bytes =
B·(MK+KN+MN)·element size, TFLOP/s, % of the peak of the kernel's dtype on its device, arithmetic
intensity and the roofline bound min(peak, AI x bandwidth). GEMMs without a shape keep count and time.

Peaks (lmtrain.profiling.peaks): the device each kernel ran on (TARGET_INFO_GPU by deviceId), `--gpu` for
all, `--peak-tflops`/`--peak-tbs` over both; an export naming no device is judged against the GH200
reference and says so. A trace without CUDA kernels gets the NVTX range summary (also with `--nvtx`).

Shapes file (`--shapes`), one entry per range or kernel name (shell-style patterns):
  - {range: "FeedForward/w1", M: 8192, N: 1536, K: 512, dtype: bf16}
  - {kernel: "nvjet_tst_192x192*", M: 4096, N: 4096, K: 4096, batch: 1}
"""

from __future__ import annotations

import argparse
import csv
import fnmatch
import io
import json
import re
import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.atomic import atomic_write_text  # noqa: E402
from lmtrain.errors import UserError  # noqa: E402
from lmtrain.nvtx import parse_gemm_labels  # noqa: E402
from lmtrain.profiling import nsys_sqlite as ns  # noqa: E402
from lmtrain.profiling.peaks import (  # noqa: E402
    DEFAULT_KEY,
    DTYPES,
    PEAKS,
    device_peaks,
    peaks_for_device_name,
)
from lmtrain.tables import fmt, markdown_table  # noqa: E402
from lmtrain.tools.common import run_tool  # noqa: E402

GROUP_TITLES = {
    "kernel": "GEMM kernels by name",
    "range": "GEMMs by NVTX range",
    "layer": "GEMMs by layer",
    "device": "GEMMs by device",
}
ASSUMED_DTYPE = "bf16"
"""The dtype of a GEMM whose kernel name and shape name none (its peak and bytes per element)."""


# --------------------------------------------------------------------------------------------------
# Shapes
# --------------------------------------------------------------------------------------------------


@dataclass
class ShapeSpec:
    """One user-given shape: a shell-style pattern over range names and/or kernel names."""

    pattern: str
    target: str
    """"range", "kernel" or "any"."""
    shape: tuple
    """(batch, M, N, K, dtype or None)."""
    origin: str
    """Where it was given, for messages: `--shape 'w1=...'` or `shapes.yaml entry 3`."""
    matched: int = 0

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern) or fnmatch.fnmatchcase(
            ns.range_label(name), self.pattern
        )


_SHAPE_ARG = re.compile(
    r"^(?P<pattern>.+)=(?:(?P<b>\d+)x)?(?P<m>\d+)x(?P<n>\d+)x(?P<k>\d+)(?::(?P<dtype>\w+))?$"
)


def _check_dtype(dtype, origin: str):
    if dtype is not None and dtype not in DTYPES:
        raise UserError(f"{origin}: unknown dtype '{dtype}': expected one of {', '.join(DTYPES)}")
    return dtype


def parse_shape_arg(text: str) -> ShapeSpec:
    """`PATTERN=MxNxK[:dtype]` or `PATTERN=BxMxNxK[:dtype]` (batch first) of `--shape`."""
    match = _SHAPE_ARG.match(text.strip())
    origin = f"--shape '{text}'"
    if not match:
        raise UserError(
            f"{origin}: expected PATTERN=MxNxK[:dtype] or PATTERN=BxMxNxK[:dtype], e.g. 'w1=8192x1536x512:bf16'"
        )
    g = match.groupdict()
    dims = [int(g[x]) for x in ("m", "n", "k")]
    batch = int(g["b"]) if g["b"] else 1
    if min(dims + [batch]) < 1:
        raise UserError(f"{origin}: every dimension must be >= 1")
    return ShapeSpec(g["pattern"], "any", (batch, *dims, _check_dtype(g["dtype"], origin)), origin)


def load_shapes_file(path: str) -> list[ShapeSpec]:
    """The entries of a `--shapes` YAML file (a list of {range|kernel: PATTERN, M, N, K[, batch][, dtype]})."""
    import yaml

    file = Path(path)
    if not file.is_file():
        raise UserError(f"--shapes {path}: no such file")
    try:
        data = yaml.safe_load(file.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"--shapes {path}: not valid YAML ({exc})") from None
    if isinstance(data, dict) and "shapes" in data:
        data = data["shapes"]
    if not isinstance(data, list):
        raise UserError(
            f"--shapes {path}: expected a list of entries like {{range: w1, M: 8192, N: 1536, K: 512}}"
        )
    specs = []
    for i, entry in enumerate(data, 1):
        origin = f"{path} entry {i}"
        if not isinstance(entry, dict):
            raise UserError(f"{origin}: expected a mapping with range or kernel, M, N, K, got {entry!r}")
        targets = [t for t in ("range", "kernel") if t in entry]
        if len(targets) != 1:
            raise UserError(
                f"{origin}: give exactly one of 'range' or 'kernel' (a name or shell-style pattern)"
            )
        unknown = set(entry) - {"range", "kernel", "M", "N", "K", "batch", "dtype"}
        if unknown:
            raise UserError(
                f"{origin}: unknown keys {', '.join(sorted(unknown))} (expected M, N, K, batch, dtype)"
            )
        try:
            dims = [int(entry[x]) for x in ("M", "N", "K")]
            batch = int(entry.get("batch", 1))
        except KeyError as exc:
            raise UserError(f"{origin}: missing {exc.args[0]} (every entry needs M, N and K)") from None
        except (TypeError, ValueError):
            raise UserError(f"{origin}: M, N, K and batch must be integers") from None
        if min(dims + [batch]) < 1:
            raise UserError(f"{origin}: every dimension must be >= 1")
        dtype = _check_dtype(entry.get("dtype"), origin)
        specs.append(ShapeSpec(str(entry[targets[0]]), targets[0], (batch, *dims, dtype), origin))
    return specs


class ShapeSources:
    """Shape lookups for range and kernel names, counting which source gave shapes."""

    def __init__(self, specs: list[ShapeSpec], model_shapes: dict[str, tuple] | None):
        self.specs = specs
        self.model_shapes = model_shapes or {}
        self.used: dict[str, int] = {}

    def _count(self, source: str) -> None:
        self.used[source] = self.used.get(source, 0) + 1

    def range_shape(self, name: str):
        for spec in self.specs:
            if spec.target in ("range", "any") and spec.matches(name):
                spec.matched += 1
                self._count("--shape/--shapes")
                return spec.shape
        parsed = parse_gemm_labels(name)
        if parsed:
            self._count("lmtrain self-describing ranges")
            return parsed[1]
        if name.startswith("{"):
            marker = ns.parse_pyprof_marker(name)
            dims = ns.gemm_dims(marker[1], marker[2]) if marker else None
            if dims:
                self._count("pyprof/DLProf dict ranges")
                return (*dims, marker[3])
        if name in self.model_shapes:
            self._count("model config")
            return self.model_shapes[name]
        return None

    def kernel_shape(self, name: str):
        for spec in self.specs:
            if spec.target in ("kernel", "any") and fnmatch.fnmatchcase(name, spec.pattern):
                spec.matched += 1
                self._count("--shape/--shapes")
                return spec.shape
        return None


# --------------------------------------------------------------------------------------------------
# Peaks
# --------------------------------------------------------------------------------------------------


def device_names(export: ns.Export) -> dict[int, str]:
    """CUDA device id -> name, from TARGET_INFO_GPU (id is the kernels' deviceId)."""
    if not export.has("TARGET_INFO_GPU", "name"):
        return {}
    id_col = "id" if "id" in export.cols("TARGET_INFO_GPU") else "rowid - 1"
    rows = export.conn.execute(
        f"SELECT {id_col}, name FROM TARGET_INFO_GPU WHERE name IS NOT NULL ORDER BY 1"
    )
    out: dict[int, str] = {}
    for dev, name in rows:
        out.setdefault(dev, name)
    return out


def resolve_peaks(args, export: ns.Export, devices: list[int | None]) -> tuple[dict, dict, list[str]]:
    """({device: DevicePeaks or None}, {device: label}, notes) for the devices the GEMMs ran on."""
    names = device_names(export)
    base: dict = {}
    labels: dict = {}
    notes: list[str] = []
    for dev in devices:
        name = names.get(dev) if dev is not None else None
        if name is None and len(set(names.values())) == 1:
            name = next(iter(names.values()))  # one kind of GPU in the export
        labels[dev] = f"{'?' if dev is None else dev}: {name or '(not named in the export)'}"
        if args.gpu:
            base[dev] = device_peaks(args.gpu)
        elif name is not None:
            base[dev] = peaks_for_device_name(name)
            if base[dev] is None and args.peak_tflops is None:
                notes.append(
                    f"device {dev} '{name}' is not in the peak table: TFLOP/s without % of peak. Pass --gpu KEY "
                    f"({', '.join(PEAKS)}) or --peak-tflops T --peak-tbs B."
                )
        elif not names:
            base[dev] = PEAKS[DEFAULT_KEY]
        else:
            base[dev] = None
            notes.append(
                f"device {dev} is not in TARGET_INFO_GPU: pass --gpu KEY or --peak-tflops T --peak-tbs B."
            )
    if args.gpu:
        notes.insert(
            0, f"every device judged against the peaks of --gpu {args.gpu} ({PEAKS[args.gpu].label})."
        )
    elif not names:
        notes.insert(
            0,
            f"the export names no device: judged against the {PEAKS[DEFAULT_KEY].label} reference "
            f"(default reference); pass --gpu KEY to change.",
        )
    return base, labels, notes


def peak_table(args, base: dict, dtypes: set) -> dict:
    """{(device, dtype): (peak FLOP/s or None, bandwidth B/s or None)} with the command-line overrides."""
    bandwidth_override = args.peak_tbs * 1e12 if args.peak_tbs is not None else args.peak_bandwidth
    out = {}
    for dev, peaks in base.items():
        for dtype in dtypes:
            tflops = peaks.tflops(dtype) if peaks is not None else None
            if args.peak_tflops is not None:
                tflops = args.peak_tflops
            bw = (
                bandwidth_override if bandwidth_override is not None else (peaks.bandwidth if peaks else None)
            )
            out[(dev, dtype)] = (tflops * 1e12 if tflops else None, bw)
    return out


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


def derive(row: dict, gemm_ns: float) -> dict:
    """Add times in ms, the share of GEMM time, achieved rates and the roofline figures to a grouped row.

    Rates are over the kernels with a known shape (`shaped_ns`): TFLOP/s = FLOPs / shaped time; % of peak
    = the time those FLOPs take at the peak of each kernel's dtype and device / shaped time; the roofline
    bound per kernel is max(FLOPs / peak, bytes / bandwidth) in time, i.e. min(peak, AI x bandwidth).
    """
    out = dict(row)
    for key in ("total", "min", "max", "median"):
        value = row.get(f"{key}_ns")
        out[f"{key}_ms"] = None if value is None else value / 1e6
    out["avg_ns"] = row["total_ns"] / row["count"]
    out["avg_ms"] = out["avg_ns"] / 1e6
    out["time_share"] = row["total_ns"] / gemm_ns if gemm_ns else None
    flops, nbytes, shaped_ns = row.get("flops"), row.get("bytes"), row.get("shaped_ns")
    out.update(
        tflop=None, tflops=None, gbps=None, ai=None, pct_peak=None, bound_tflops=None, share_of_bound=None
    )
    if flops and shaped_ns:
        seconds = shaped_ns / 1e9
        out.update(tflop=flops / 1e12, tflops=flops / seconds / 1e12)
        if nbytes:
            out.update(gbps=nbytes / seconds / 1e9, ai=flops / nbytes)
        if row.get("ideal_ns"):
            out["pct_peak"] = row["ideal_ns"] / shaped_ns
        if row.get("bound_ns"):
            out.update(bound_tflops=flops / row["bound_ns"] / 1e3, share_of_bound=row["bound_ns"] / shaped_ns)
    out["shaped_share"] = (shaped_ns or 0) / row["total_ns"] if row["total_ns"] else None
    return out


def kernel_totals(path: Path) -> list[dict]:
    export = ns.open_export(path)
    try:
        return ns.kernel_summary(export)
    finally:
        export.conn.close()


def _shape_sources(args) -> tuple[ShapeSources, str | None]:
    specs = [parse_shape_arg(text) for text in args.shape or []]
    if args.shapes:
        specs += load_shapes_file(args.shapes)
    config = None
    if args.run:
        config = Path(args.run) / "config.yaml"
        if not config.is_file():
            raise UserError(f"--run {args.run}: no config.yaml in it (expected a run directory of lmtrain)")
    elif args.model_config:
        config = Path(args.model_config)
    model_shapes, desc = ({}, None) if config is None else model_range_shapes(config, args.tokens)
    return ShapeSources(specs, model_shapes), desc


def _gemm_pattern(args) -> re.Pattern | None:
    if not args.gemm_pattern:
        return None
    try:
        return re.compile(args.gemm_pattern)
    except re.error as exc:
        raise UserError(
            f"--gemm-pattern '{args.gemm_pattern}': not a valid regular expression ({exc})"
        ) from None


def gemm_report(args, export: ns.Export) -> dict:
    sources, model_desc = _shape_sources(args)
    pattern = _gemm_pattern(args)
    all_kernels = ns.kernel_summary(export)
    n_gemm = ns.gemm_kernels(
        export, range_shape_of=sources.range_shape, kernel_shape_of=sources.kernel_shape, gemm_pattern=pattern
    )
    convs = ns.conv_summary(export)
    if n_gemm == 0:
        top = "\n".join(
            f"  {r['total_ns'] / 1e6:10.3f} ms  {r['count']:6d}x  {r['name'][:100]}" for r in all_kernels[:10]
        )
        conv = f" ({len(convs)} convolution kernel names, not counted as GEMMs)" if convs else ""
        raise UserError(
            f"{export.path}: no GEMM kernels (cuBLAS, nvjet, xmma, CUTLASS, TensorRT) among {len(all_kernels)} "
            f"kernel names{conv}. Name yours with --gemm-pattern REGEX. Top kernels by time:\n{top}"
        )
    pairs = ns.gemm_devices(export)
    devices = sorted({d for d, _ in pairs}, key=lambda d: -1 if d is None else d)
    base, labels, notes = resolve_peaks(args, export, devices)
    dtypes = {t or ASSUMED_DTYPE for _, t in pairs}
    peaks = peak_table(args, base, dtypes)
    for (dev, dtype), (peak, _) in sorted(peaks.items(), key=lambda x: (str(x[0][0]), x[0][1])):
        if peak is None and base.get(dev) is not None:
            notes.append(
                f"{base[dev].label} has no {dtype} peak in the table: its {dtype} GEMMs get no % of peak."
            )
    groups = {}
    gemm_ns = None
    ns.gemm_rates(export, peaks, default_dtype=ASSUMED_DTYPE)
    for by in ns.GROUPINGS:
        if by == "device" and len(devices) < 2:
            continue
        rows = ns.gemm_groups(export, by)
        gemm_ns = gemm_ns or sum(r["total_ns"] for r in rows)
        if by == "device":
            for r in rows:
                r["name"] = labels.get(None if r["name"] == -1 else r["name"], str(r["name"]))
        groups[by] = [derive(r, gemm_ns) for r in rows]
    notes += _shape_notes(export, sources, gemm_ns, model_desc)
    if any(t is None for _, t in pairs):
        notes.append(f"GEMMs whose kernel name and shape give no dtype are taken as {ASSUMED_DTYPE}.")
    if convs:
        conv_ns = sum(r["total_ns"] for r in convs)
        notes.append(
            f"{sum(r['count'] for r in convs)} convolution kernels ({len(convs)} name{'s' * (len(convs) != 1)}, "
            f"{conv_ns / 1e6:.3f} ms) "
            "are implicit GEMMs: counted apart, not in these tables."
        )
    if not export.metadata():
        notes.append("the export has no META_DATA_EXPORT/EXPORT_META_DATA table (nsys version unknown).")
    return {
        "trace": str(export.path),
        "nsys_version": export.version(),
        "devices": {str(k): v for k, v in labels.items()},
        "peaks": [
            {"device": d, "dtype": t, "peak_tflops": None if p is None else p / 1e12, "bandwidth": b}
            for (d, t), (p, b) in sorted(peaks.items(), key=lambda x: (str(x[0][0]), x[0][1]))
        ],
        "peak_source": _peak_source(args, labels),
        "shapes_source": _shapes_source(export, sources),
        "notes": notes,
        "gemm_kernels": n_gemm,
        "gemm_time_ns": gemm_ns,
        "all_kernel_time_ns": sum(r["total_ns"] for r in all_kernels),
        "conv_kernels": convs,
        "groups": groups,
    }


def _shapes_source(export: ns.Export, sources: ShapeSources) -> str:
    """Which sources gave shapes, and to how many op ranges or names."""
    (ops,) = export.conn.execute(
        "SELECT COUNT(*) FROM op_sz AS z JOIN op_shapes AS s ON s.op = z.op AND s.sizes = z.sizes"
    ).fetchone()
    parts = [f"emit_nvtx record_shapes sizes ({ops} op ranges)"] if ops else []
    parts += [f"{k} ({v} names)" for k, v in sources.used.items()]
    return ", ".join(parts) or "none"


def _peak_source(args, labels: dict) -> str:
    parts = ["; ".join(labels.values())]
    if args.gpu:
        parts.append(f"--gpu {args.gpu}")
    elif all(": (not named" in label for label in labels.values()):
        parts.append(f"default reference {PEAKS[DEFAULT_KEY].label}")
    if args.peak_tflops is not None or args.peak_tbs is not None or args.peak_bandwidth is not None:
        parts.append("overridden by --peak-tflops/--peak-tbs")
    return "; ".join(parts)


def _shape_notes(export, sources: ShapeSources, gemm_ns: float, model_desc) -> list[str]:
    """One line per user shape that matched nothing, and one saying which source would give the GEMMs
    without a shape their FLOPs."""
    notes = [f"model config: {model_desc}"] if model_desc else []
    if model_desc and "model config" not in sources.used:
        notes.append(
            f"the model config's range names ({', '.join(sources.model_shapes)}) matched no NVTX range holding GEMMs."
        )
    targets = {"range": "NVTX range", "kernel": "GEMM kernel", "any": "NVTX range or GEMM kernel"}
    for spec in sources.specs:
        if spec.matched == 0:
            notes.append(f"{spec.origin} matched no {targets[spec.target]} name ('{spec.pattern}').")
    count, time_ns, in_ops, in_ranges = export.conn.execute(
        "SELECT COUNT(*), SUM(dur), COUNT(op_id), SUM(op_id IS NULL AND user_id IS NOT NULL) FROM ga "
        "WHERE flops IS NULL"
    ).fetchone()
    if not count:
        return notes
    hints = []
    if in_ops:
        hints.append(f"{in_ops} run in emit_nvtx op ranges without sizes: profile under "
                     "torch.autograd.profiler.emit_nvtx(record_shapes=True)")  # fmt: skip
    if in_ranges:
        hints.append(f"{in_ranges} run in NVTX ranges without a shape: lmtrain's own ranges carry one with "
                     "profiling.nvtx on; for others pass --shape 'RANGE=MxNxK[:dtype]' or --shapes FILE.yaml")  # fmt: skip
    if count - in_ops - in_ranges:
        hints.append(f"{count - in_ops - in_ranges} run outside any NVTX range (or their launch call is not in the "
                     "export): only --shape 'KERNEL_NAME=MxNxK' gives them FLOPs")  # fmt: skip
    notes.append(
        f"{count} GEMM kernels ({time_ns / 1e6:.3f} ms, {100 * time_ns / gemm_ns:.1f}% of GEMM time) have no shape, "
        f"so no FLOPs: {'; '.join(hints)}."
    )
    return notes


GEMM_COLUMNS = [
    ("name", "name", None),
    ("dtype", "dtypes", None),
    ("count", "count", 0),
    ("total ms", "total_ms", 3),
    ("avg ms", "avg_ms", 4),
    ("median ms", "median_ms", 4),
    ("min ms", "min_ms", 4),
    ("max ms", "max_ms", 4),
    ("% GEMM", "time_share", "pct"),
    ("TFLOP", "tflop", 3),
    ("TFLOP/s", "tflops", 1),
    ("% peak", "pct_peak", "pct"),
    ("FLOP/B", "ai", 0),
    ("GB/s", "gbps", 0),
    ("bound TFLOP/s", "bound_tflops", 1),
    ("% bound", "share_of_bound", "pct"),
]
KERNEL_EXTRA = [("grid / block", "launch", None)]

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


def _columns(by: str):
    return GEMM_COLUMNS[:8] + KERNEL_EXTRA + GEMM_COLUMNS[8:] if by == "kernel" else GEMM_COLUMNS


def _cell(row: dict, key: str, spec) -> str:
    value = row.get(key)
    if key == "launch" and value is not None and row.get("launches", 1) > 1:
        return f"{value} (+{row['launches'] - 1} more)"
    if spec is None:
        return "" if value is None else str(value)
    if spec == "pct":
        return fmt(None if value is None else 100 * value, 1)
    if spec == 0 and isinstance(value, float):
        return fmt(value, 0)
    return fmt(value, spec)


def _rows(rows: list[dict], columns, top: int | None) -> list[list[str]]:
    return [[_cell(r, key, spec) for _, key, spec in columns] for r in rows[:top]]


def shorten_names(names: list[str], width: int) -> list[str]:
    """Names longer than `width` cut in the middle (`head…tail`), widening the cut until no two shown names
    are equal; names that fit stay whole."""
    out = list(names)
    for w in range(max(width, 8), max((len(n) for n in names), default=0) + 1):
        out = [
            n if len(n) <= w else n[: (w - 1) // 2] + "…" + n[len(n) - (w - 1 - (w - 1) // 2) :]
            for n in names
        ]
        if len(set(out)) == len(set(names)):
            return out
    return list(names)


def _header_lines(report: dict) -> list[str]:
    gemm_ms, all_ms = report["gemm_time_ns"] / 1e6, report["all_kernel_time_ns"] / 1e6
    return [
        f"{report['trace']} (nsys {report['nsys_version']}): {report['gemm_kernels']} GEMM kernels, "
        f"{gemm_ms:.3f} ms = {100 * gemm_ms / all_ms:.1f}% of {all_ms:.3f} ms kernel time",
        f"devices: {report['peak_source']}",
        "peaks (TFLOP/s, TB/s): "
        + ", ".join(
            f"{p['device']}/{p['dtype']} {fmt(p['peak_tflops'], 1)}, {fmt(None if p['bandwidth'] is None else p['bandwidth'] / 1e12, 2)}"
            for p in report["peaks"]
        ),
        f"shapes from: {report['shapes_source']}",
        *report["notes"],
    ]


def print_gemm_report(report: dict, top: int | None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console(width=max(Console().width, 260))  # every column of the widest table, unabridged
    lines = _header_lines(report)
    console.print(f"[bold]{escape(lines[0])}[/]")
    for line in lines[1:]:
        console.print(escape(line))
    for by, rows in report["groups"].items():
        columns = _columns(by)
        table = Table(title=GROUP_TITLES[by], title_justify="left")
        for header, _, _ in columns:
            table.add_column(
                header,
                justify="left" if header in ("name", "dtype", "grid / block") else "right",
                no_wrap=header in ("name", "grid / block"),
            )
        cells = _rows(rows, columns, top)
        short = shorten_names([c[0] for c in cells], 60)
        for row_cells, name in zip(cells, short):
            table.add_row(escape(name), *(escape(c) for c in row_cells[1:]))
        console.print(table)


def gemm_markdown(report: dict) -> str:
    lines = _header_lines(report)
    out = [f"# GEMM report: {report['trace']}\n\n", "\n".join(f"- {line}" for line in lines[1:]), "\n"]
    out.insert(1, lines[0] + "\n\n")
    for by, rows in report["groups"].items():
        columns = _columns(by)
        out.append(f"\n## {GROUP_TITLES[by]}\n\n")
        cells = _rows(rows, columns, None)
        for c in cells:
            c[0] = f"`{c[0]}`" if by == "kernel" else c[0]
        out.append(markdown_table([h for h, _, _ in columns], cells))
    return "".join(out)


CSV_KEYS = ["group", "name", "dtypes", "count", "total_ns", "avg_ns", "median_ns", "min_ns", "max_ns", "launch",
            "launches", "time_share", "flops", "bytes", "shaped_ns", "ideal_ns", "bound_ns", "tflop", "tflops",
            "pct_peak", "ai", "gbps", "bound_tflops", "share_of_bound", "devices"]  # fmt: skip


def gemm_csv(report: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_KEYS, extrasaction="ignore")
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
    shapes = p.add_argument_group("shapes (where the trace carries none)")
    shapes.add_argument("--shape", action="append", metavar="PATTERN=MxNxK[:dtype]",
                        help="shape of the GEMM in NVTX ranges or kernels whose name matches PATTERN (shell-style; "
                        "BxMxNxK for B batched products), e.g. 'w1=8192x1536x512:bf16'; repeatable")  # fmt: skip
    shapes.add_argument(
        "--shapes", metavar="YAML", help="file of shapes: [{range|kernel: PATTERN, M, N, K, batch, dtype}]"
    )
    model = shapes.add_mutually_exclusive_group()
    model.add_argument(
        "--run", metavar="RUN_DIR", help="lmtrain run directory: shapes of its named ranges from config.yaml"
    )
    model.add_argument("--model-config", metavar="YAML", help="lmtrain run or model config YAML, as --run")
    shapes.add_argument(
        "--tokens",
        type=int,
        help="with --run: tokens per forward call (default batch_size x sequence_length)",
    )
    p.add_argument(
        "--gemm-pattern", metavar="REGEX", help="also count kernels whose name matches REGEX as GEMMs"
    )
    peaks = p.add_argument_group("peaks (default: the device each kernel ran on)")
    peaks.add_argument("--gpu", choices=list(PEAKS), help="judge every device against this GPU's peaks")
    peaks.add_argument(
        "--peak-tflops", type=float, help="peak dense TFLOP/s for every GEMM (overrides --gpu)"
    )
    bandwidth = peaks.add_mutually_exclusive_group()
    bandwidth.add_argument("--peak-tbs", type=float, help="peak memory bandwidth in TB/s, e.g. 4")
    bandwidth.add_argument("--peak-bandwidth", type=float, help="peak memory bandwidth in bytes/s, e.g. 4e12")
    p.add_argument("--nvtx", action="store_true", help="summarise NVTX ranges instead of GEMMs")
    p.add_argument(
        "--top", type=int, default=25, help="rows per table on the terminal (default: %(default)s)"
    )
    p.add_argument("--csv", metavar="PATH", help="also write every row and column as CSV")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.add_argument("--markdown", metavar="PATH", help="also write the tables as markdown (for a write-up)")
    p.add_argument("--quiet", action="store_true", help="do not print the tables")
    return p


def build_report(args) -> tuple[str, dict]:
    """('gemm' | 'nvtx', report dict) for parsed arguments."""
    for flag in ("tokens", "top"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag} must be >= 1, got {value}")
    for flag in ("peak_tflops", "peak_tbs", "peak_bandwidth"):
        value = getattr(args, flag)
        if value is not None and not value > 0:
            raise UserError(f"--{flag.replace('_', '-')} must be > 0, got {value}")
    export = ns.open_export(args.trace)
    try:
        if args.nvtx:
            return "nvtx", nvtx_report(export, "NVTX range summary (--nvtx)")
        if not export.has(ns.KERNEL, "start", "end") and ns.has_nvtx(export):
            note = (
                f"no {ns.KERNEL} table (a trace without CUDA kernels): NVTX ranges instead. For the GEMM report, "
                + ns.RECAPTURE_HINT
            )
            return "nvtx", nvtx_report(export, note)
        return "gemm", gemm_report(args, export)
    except sqlite3.DatabaseError as exc:
        if isinstance(exc, sqlite3.OperationalError) and not ns.is_corruption(exc):
            raise
        raise UserError(ns.corrupt_message(export.path, exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
