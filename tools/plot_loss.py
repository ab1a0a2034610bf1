"""lmtrain plot-loss runs/baseline-* runs/fused-* [--smooth 10] [--out loss.png]

Plot the training loss (NLL) against the step for one or many runs in one PNG, with the validation loss
where the run logged it (markers, same colour). `--smooth N` draws a trailing N-record moving average of
the training loss over the faint raw curve. Reads lmtrain run directories (metrics.jsonl), metrics.jsonl
files and the course train.py's stdout logs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.atomic import atomic_savefig  # noqa: E402
from lmtrain.errors import UserError  # noqa: E402
from lmtrain.tools.common import run_tool  # noqa: E402
from lmtrain.tools.runlog import Run, load_runs  # noqa: E402


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over up to `window` values (the first points average what exists so far)."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot(runs: list[Run], out: Path, smooth: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, run in enumerate(runs):
        color = colors[i % len(colors)]
        train = run.train()
        if not train:
            raise UserError(f"{run.source}: no training records (no `loss` values) to plot")
        steps = [r["step"] for r in train]
        loss = [r["loss"] for r in train]
        if smooth > 1:
            ax.plot(steps, loss, color=color, alpha=0.25, linewidth=1)
            ax.plot(
                steps,
                moving_average(loss, smooth),
                color=color,
                label=f"{run.name} (train, mean of {smooth})",
            )
        else:
            ax.plot(steps, loss, color=color, label=f"{run.name} (train)")
        val = run.val()
        if val:
            ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], color=color, linestyle="--",
                    marker="o", markersize=4, label=f"{run.name} (validation)")  # fmt: skip
    ax.set_xlabel("step")
    ax.set_ylabel("loss (NLL, nats/token)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_savefig(fig, out, dpi=120)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lmtrain plot-loss", description=__doc__.split("\n\n", 1)[1])
    p.add_argument("runs", nargs="+", help="run directories, metrics.jsonl files, course logs, or globs")
    p.add_argument(
        "--smooth", type=int, default=1, help="moving average over N logged records (default 1: none)"
    )
    p.add_argument("--out", default="loss.png", help="PNG to write (default loss.png)")
    args = p.parse_args(argv)
    if args.smooth < 1:
        raise UserError(f"--smooth must be >= 1, got {args.smooth}")
    if not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out}: expected a .png path")
    print(plot(load_runs(args.runs), Path(args.out), args.smooth))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_tool(main))
