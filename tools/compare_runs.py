"""lmtrain compare-runs runs/baseline-* runs/fused-* [--warmup 1] [--markdown cmp.md] [--png cmp.png]

Compare training runs: tokens/s, TFLOP/s and MFU (mean and standard deviation over the logged steps,
skipping the first `--warmup` logged records), peak memory, final training and validation loss, and the
speed-up of each run's tokens/s over the first run (the baseline). Reads lmtrain run directories
(metrics.jsonl), metrics.jsonl files, and the course train.py's stdout logs (`Step: 5 | Loss: ... |
Tokens per second: ... | MFU (%): ... | TFLOPs: ...`). Writes a rich table, and optionally markdown, JSON
and a PNG bar chart.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.atomic import atomic_savefig, atomic_write_text  # noqa: E402
from lmtrain.errors import UserError  # noqa: E402
from lmtrain.tables import fmt, markdown_table  # noqa: E402
from lmtrain.tools.common import run_tool  # noqa: E402
from lmtrain.tools.runlog import Run, load_runs  # noqa: E402

HEADERS = ["run", "steps", "tokens/s", "±", "TFLOP/s", "±", "MFU %", "±", "peak mem GiB", "final loss",
           "final val loss", "speed-up"]  # fmt: skip


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summarise(run: Run, warmup: int) -> dict:
    train = run.train()
    if not train:
        raise UserError(f"{run.source}: no training records (no `loss` values)")
    steady = train[warmup:] if len(train) > warmup else train[-1:]
    row: dict = {"run": run.name, "source": str(run.source), "last_step": train[-1]["step"],
                 "records_used": len(steady)}  # fmt: skip
    for key in ("tokens_per_s", "tflops", "mfu_pct"):
        mean, std = _mean_std([r[key] for r in steady if key in r])
        row[key], row[f"{key}_std"] = mean, std
    mems = [r["peak_mem_gib"] for r in train if "peak_mem_gib" in r]
    row["peak_mem_gib"] = max(mems) if mems else None
    row["final_loss"] = train[-1]["loss"]
    val = run.val()
    row["final_val_loss"] = val[-1]["val_loss"] if val else None
    return row


def compare(runs: list[Run], warmup: int) -> list[dict]:
    rows = [summarise(run, warmup) for run in runs]
    base = rows[0].get("tokens_per_s")
    for row in rows:
        row["speedup"] = row["tokens_per_s"] / base if base and row.get("tokens_per_s") is not None else None
    return rows


def _sig(value: float | None) -> str:
    """Three significant digits: CPU runs reach milli-TFLOP/s, GPUs hundreds."""
    return "-" if value is None else f"{value:.3g}"


def cells(row: dict) -> list[str]:
    return [
        row["run"],
        str(row["last_step"]),
        fmt(row["tokens_per_s"], 1),
        fmt(row["tokens_per_s_std"], 1),
        _sig(row["tflops"]),
        _sig(row["tflops_std"]),
        fmt(row["mfu_pct"], 2),
        fmt(row["mfu_pct_std"], 2),
        fmt(row["peak_mem_gib"], 2),
        fmt(row["final_loss"], 4),
        fmt(row["final_val_loss"], 4),
        "-" if row["speedup"] is None else f"{row['speedup']:.2f}x",
    ]


def print_table(rows: list[dict], warmup: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"runs (means over logged steps after the first {warmup}; baseline: {rows[0]['run']})",
                  title_justify="left")  # fmt: skip
    for i, header in enumerate(HEADERS):
        table.add_column(header, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*cells(row))
    Console(width=max(Console().width, 150)).print(table)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["run"] for r in rows]
    panels = [("tokens_per_s", "tokens/s"), ("mfu_pct", "MFU (%)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 + 1.2 * len(rows), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], panels):
        values = [r[key] or 0.0 for r in rows]
        errors = [r[f"{key}_std"] or 0.0 for r in rows]
        bars = ax.bar(range(len(rows)), values, yerr=errors, capsize=4, color="tab:blue")
        bars[0].set_color("tab:gray")
        ax.set_xticks(range(len(rows)), names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(label)
        ax.set_title(label)
        if key == "tokens_per_s":
            for bar, row in zip(bars, rows):
                if row["speedup"] is not None:
                    ax.annotate(f"{row['speedup']:.2f}x", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                                ha="center", va="bottom", fontsize=8)  # fmt: skip
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=120)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lmtrain compare-runs", description=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("runs", nargs="+", help="run directories, metrics.jsonl files, course logs, or globs")
    p.add_argument("--warmup", type=int, default=1, help="logged records to skip at the start (default 1)")
    p.add_argument("--markdown", metavar="PATH", help="write the table as markdown")
    p.add_argument("--json", metavar="PATH", help="write the rows as JSON")
    p.add_argument("--png", metavar="PATH", help="write a bar chart of tokens/s and MFU")
    p.add_argument("--quiet", action="store_true", help="do not print the table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    rows = compare(load_runs(args.runs), args.warmup)
    if not args.quiet:
        print_table(rows, args.warmup)
    if args.markdown:
        atomic_write_text(args.markdown, markdown_table(HEADERS, [cells(r) for r in rows]))
    if args.json:
        atomic_write_text(args.json, json.dumps(rows, indent=1) + "\n")
    if args.png:
        plot(rows, Path(args.png))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
