"""Markdown report of an ablation study: a table, NLL curves and generations, from run directories.

    lmtrain ablation-report runs/ablation/attention-wasnt-all-300steps/*-seed* --out runs/ablation/report

Each RUN_DIR is a finished `lmtrain train` run (config.yaml, metrics.jsonl, summary.json, checkpoints/,
tokenizer/); a directory that holds such runs stands for all of them. A run is named
`<variant>-seed<S>` (the study runner's layout; another name is taken whole as the variant). Writes
`<out>/report.md` and `<out>/nll.png` (default out: the runs' common parent directory).

The table has one row per variant (the mean over its seeds), the switches are the config values
where a run differs from the baseline, and the difference to the baseline is taken seed by seed.
The seed-to-seed spread is the largest range of final validation NLL across the seeds of any one
variant; the conclusions name only differences larger than it, and say when it is unmeasured.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml

from lmtrain.atomic import atomic_savefig, atomic_write_text
from lmtrain.config import flatten_keys
from lmtrain.errors import UserError

DEFAULT_PROMPTS = ["def ", "import ", "The "]
# Config keys that differ between runs of one study without being a switch of the model or training.
NOT_SWITCHES = {
    "training.seed",
    "training.name",
    "training.output_dir",
    "training.run_dir",
    "checkpoint.resume",
    "logging.progress",
}


@dataclass
class Run:
    path: Path
    variant: str
    seed: int
    config: dict
    summary: dict
    metrics: list[dict]
    params: int | None = None
    generations: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.path.name

    def train_curve(self) -> tuple[list[int], list[float]]:
        pts = [(m["step"], m["loss"]) for m in self.metrics if _finite(m.get("loss"))]
        return [s for s, _ in pts], [v for _, v in pts]

    def val_curve(self) -> tuple[list[int], list[float]]:
        pts = [(m["step"], m["val_loss"]) for m in self.metrics if _finite(m.get("val_loss"))]
        return [s for s, _ in pts], [v for _, v in pts]

    @property
    def final_train(self) -> float | None:
        value = _pick(self.summary, "final_train_loss", "train_loss", "final_loss", "loss")
        if value is None:
            _, losses = self.train_curve()
            value = losses[-1] if losses else None
        return value

    @property
    def final_val(self) -> float | None:
        value = _pick(self.summary, "final_val_loss", "val_loss")
        if value is None:
            _, losses = self.val_curve()
            value = losses[-1] if losses else None
        return value

    @property
    def tokens_per_s(self) -> float | None:
        value = _pick(self.summary, "tokens_per_s", "tokens_per_second", "throughput_tokens_per_s")
        if value is None:
            rates = [m["tokens_per_s"] for m in self.metrics if _finite(m.get("tokens_per_s"))]
            value = statistics.median(rates[1:] or rates) if rates else None
        return value


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pick(data: dict, *keys: str) -> float | None:
    for key in keys:
        if _finite(data.get(key)):
            return float(data[key])
    return None


# --------------------------------------------------------------------------------------------------
# Reading runs
# --------------------------------------------------------------------------------------------------


def _is_run(path: Path) -> bool:
    return (path / "summary.json").is_file() or (path / "metrics.jsonl").is_file()


def expand_run_dirs(paths: list[str]) -> list[Path]:
    """RUN_DIR arguments -> run directories (a study directory stands for the runs inside it)."""
    out: list[Path] = []
    for arg in paths:
        path = Path(arg)
        if not path.is_dir():
            raise UserError(f"RUN_DIR {arg}: not a directory (expected a run directory of `lmtrain train`)")
        if _is_run(path):
            out.append(path)
            continue
        inner = sorted(p for p in path.iterdir() if p.is_dir() and _is_run(p))
        plan = path / "plan.json"
        if plan.is_file():  # the study runner's order
            try:
                order = [r["name"] for r in json.loads(plan.read_text())["runs"]]
            except (json.JSONDecodeError, KeyError, TypeError):
                order = []
            inner.sort(key=lambda p: order.index(p.name) if p.name in order else len(order))
        if not inner:
            raise UserError(
                f"RUN_DIR {arg}: neither a run directory (no summary.json or metrics.jsonl) nor a "
                "directory of runs; pass the directories that `lmtrain train` wrote"
            )
        out.extend(inner)
    seen: set[Path] = set()
    unique = [p for p in out if not (p.resolve() in seen or seen.add(p.resolve()))]
    return unique


def read_run(path: Path) -> Run:
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise UserError(f"{path}: no config.yaml; is this a run directory written by `lmtrain train`?")
    try:
        config = yaml.safe_load(config_path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"{config_path}: not valid YAML ({exc})") from None
    summary: dict = {}
    summary_path = path / "summary.json"
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{summary_path}: not valid JSON ({exc}); rerun the run to rewrite it") from None
    metrics: list[dict] = []
    metrics_path = path / "metrics.jsonl"
    if metrics_path.is_file():
        for lineno, line in enumerate(metrics_path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                # A run killed mid-write leaves a torn last line; anything earlier is corruption.
                if lineno == len(metrics_path.read_text().splitlines()):
                    continue
                raise UserError(f"{metrics_path}:{lineno}: not a JSON record") from None
            if isinstance(record, dict) and isinstance(record.get("step"), int):
                metrics.append(record)
    if not summary and not metrics:
        raise UserError(f"{path}: has neither summary.json nor metrics.jsonl records")
    match = re.fullmatch(r"(.+)-seed(\d+)", path.name)
    variant = match.group(1) if match else path.name
    seed = config.get("training", {}).get("seed")
    if not isinstance(seed, int):
        seed = int(match.group(2)) if match else 0
    params = summary.get("parameters", summary.get("n_params", summary.get("num_parameters")))
    return Run(path, variant, seed, config, summary, metrics, params if isinstance(params, int) else None)


def count_checkpoint_parameters(run: Run) -> int | None:
    """Parameters of the newest checkpoint's model (None when the run kept no checkpoint)."""
    try:
        from lmtrain.checkpoint import load_for_inference

        _, state = load_for_inference(run.path)
    except (UserError, ImportError):
        return None
    return sum(t.numel() for t in state.values() if hasattr(t, "numel"))


# --------------------------------------------------------------------------------------------------
# Analysis
# --------------------------------------------------------------------------------------------------


@dataclass
class VariantRow:
    variant: str
    switches: str
    runs: list[Run]
    params: int | None
    train: float | None
    val: float | None
    val_range: float | None
    """max - min of final val NLL across this variant's seeds (None with one seed)."""
    delta: float | None
    """mean over seeds of (variant - baseline of the same seed), final validation NLL."""
    tokens_per_s: float | None


def _mean(values: list[float | None]) -> float | None:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals else None


def find_baseline(runs: list[Run], name: str) -> str:
    variants = {r.variant for r in runs}
    if name in variants:
        return name
    raise UserError(
        f"--baseline: no run of variant '{name}' among {sorted(variants)}; pass --baseline VARIANT"
    )


def switch_list(run: Run, baseline: Run) -> list[str]:
    """`section.field=value` for every config value where `run` differs from the baseline run."""
    a, b = flatten_keys(run.config), flatten_keys(baseline.config)
    return [
        f"{k}={a.get(k)}" for k in sorted(set(a) | set(b)) if k not in NOT_SWITCHES and a.get(k) != b.get(k)
    ]


def switches(run: Run, baseline: Run) -> str:
    return ", ".join(switch_list(run, baseline)) or "—"


def analyse(runs: list[Run], baseline: str) -> list[VariantRow]:
    by_variant: dict[str, list[Run]] = {}
    for run in runs:
        by_variant.setdefault(run.variant, []).append(run)
    base_runs = {r.seed: r for r in by_variant[baseline]}
    any_base = by_variant[baseline][0]
    # Baseline first, then by number of switches (single changes before combinations), else as given.
    n_switches = {
        v: len(switch_list(g[0], base_runs.get(g[0].seed, any_base))) for v, g in by_variant.items()
    }
    order = sorted(by_variant, key=lambda v: (v != baseline, n_switches[v]))
    rows = []
    for variant in order:
        group = sorted(by_variant[variant], key=lambda r: r.seed)
        vals = [r.final_val for r in group if r.final_val is not None]
        deltas = [
            r.final_val - base_runs[r.seed].final_val
            for r in group
            if r.seed in base_runs and r.final_val is not None and base_runs[r.seed].final_val is not None
        ]
        params = [r.params for r in group if r.params is not None]
        rows.append(
            VariantRow(
                variant=variant,
                switches=switches(group[0], base_runs.get(group[0].seed, any_base)),
                runs=group,
                params=params[0] if params else None,
                train=_mean([r.final_train for r in group]),
                val=_mean(vals),
                val_range=(max(vals) - min(vals)) if len(vals) > 1 else None,
                delta=statistics.fmean(deltas) if deltas else None,
                tokens_per_s=_mean([r.tokens_per_s for r in group]),
            )
        )
    return rows


def seed_spread(rows: list[VariantRow]) -> float | None:
    ranges = [r.val_range for r in rows if r.val_range is not None]
    return max(ranges) if ranges else None


def conclusions(rows: list[VariantRow], baseline: str) -> list[str]:
    """Sentences that follow from the measured numbers and nothing else."""
    spread = seed_spread(rows)
    n_seeds = max(len(r.runs) for r in rows)
    lines = []
    if spread is None:
        lines.append(
            f"One seed per variant: the seed-to-seed spread is unmeasured, so no difference below is a "
            f"conclusion (rerun with `--seeds 2` or more). Single-seed differences to `{baseline}` in "
            "final validation NLL:"
        )
        for r in rows[1:]:
            if r.delta is not None:
                lines.append(f"- `{r.variant}`: {r.delta:+.4f} nats (unreplicated)")
        return lines
    lines.append(
        f"Seed-to-seed spread (the largest range of final validation NLL over {n_seeds} seeds of any one "
        f"variant): {spread:.4f} nats. Only differences larger than it are conclusions."
    )
    better, worse, unclear = [], [], []
    for r in rows[1:]:
        if r.delta is None:
            continue
        if abs(r.delta) <= spread:
            unclear.append(r)
        elif r.delta < 0:
            better.append(r)
        else:
            worse.append(r)
    for r in sorted(better, key=lambda r: r.delta):
        lines.append(
            f"- `{r.variant}` lowers validation NLL by {-r.delta:.4f} nats "
            f"({-r.delta / spread:.1f}× the spread): an improvement at this scale."
        )
    for r in sorted(worse, key=lambda r: -r.delta):
        lines.append(
            f"- `{r.variant}` raises validation NLL by {r.delta:.4f} nats "
            f"({r.delta / spread:.1f}× the spread): worse than `{baseline}` at this scale."
        )
    if unclear:
        items = ", ".join(f"`{r.variant}` ({r.delta:+.4f})" for r in unclear)
        lines.append(f"- Within the spread, so not distinguishable from `{baseline}`: {items}.")
    return lines


# --------------------------------------------------------------------------------------------------
# Generations
# --------------------------------------------------------------------------------------------------


def generate_samples(run: Run, prompts: list[str], max_new_tokens: int, seed: int = 0) -> list[dict]:
    """Greedy and sampled continuations of each prompt from the run's newest checkpoint."""
    import torch

    from lmtrain.generate import generate, latest_checkpoint, load_model, load_run_tokenizer

    model, _ = load_model(latest_checkpoint(run.path))
    tokenizer = load_run_tokenizer(run.path)
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_special_tokens=False)
        if tokenizer.bos_token_id is not None:
            ids = [tokenizer.bos_token_id, *ids]  # documents start after a BOS separator in training
        room = model.args.seq_len - len(ids)  # the model never saw positions beyond its context
        for mode, kwargs in (
            ("greedy", dict(temperature=0.0)),
            ("sampled", dict(temperature=0.8, top_k=40, top_p=0.95)),
        ):
            generator = torch.Generator().manual_seed(seed)  # the same random stream for every run
            with torch.no_grad():
                seq = generate(
                    model,
                    ids,
                    max_new_tokens=max(0, min(max_new_tokens, room)),
                    eos_id=tokenizer.eos_token_id,
                    generator=generator,
                    **kwargs,
                )
            new = seq.tolist()[len(ids) :]
            out.append(
                {"prompt": prompt, "mode": mode, "text": tokenizer.decode(new, skip_special_tokens=True)}
            )
    return out


# --------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def plot_curves(runs: list[Run], rows: list[VariantRow], path: Path) -> None:
    """NLL vs step: training loss as lines, validation NLL as markers, one colour per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colours = plt.get_cmap("tab10")
    styles = ["-", "--", ":", "-."]
    for i, row in enumerate(rows):
        for j, run in enumerate(row.runs):
            label = row.variant if j == 0 else None
            steps, losses = run.train_curve()
            if steps:
                ax.plot(steps, losses, styles[j % 4], color=colours(i % 10), lw=1.2, alpha=0.85, label=label)
                label = None
            vsteps, vlosses = run.val_curve()
            if vsteps:
                ax.plot(vsteps, vlosses, "o", color=colours(i % 10), ms=5, mec="black", mew=0.5, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("NLL (nats/token)")
    n_seeds = max(len(r.runs) for r in rows)
    seeds_note = f"; line style = seed ({n_seeds} seeds)" if n_seeds > 1 else ""
    ax.set_title(f"Ablation: training NLL (lines), validation NLL (markers){seeds_note}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)


def render_markdown(rows: list[VariantRow], runs: list[Run], baseline: str, plot_name: str) -> str:
    n_seeds = max(len(r.runs) for r in rows)
    steps = sorted({r.config.get("training", {}).get("steps") for r in runs} - {None})
    lines = [
        "# Ablation study",
        "",
        f"{len(rows)} variants × {n_seeds} seed(s), {len(runs)} runs"
        + (f", {', '.join(map(str, steps))} steps" if steps else "")
        + f". Baseline: `{baseline}`. NLL in nats per token; perplexity = exp(validation NLL)."
        + (" Values are means over seeds; ± is half the range across seeds." if n_seeds > 1 else ""),
        "",
        "| run | switches | parameters | final train NLL | final val NLL | val perplexity "
        "| Δ val NLL vs baseline | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        val = _fmt(r.val, ".4f")
        if r.val_range is not None:
            val += f" ± {r.val_range / 2:.4f}"
        ppl = _fmt(math.exp(r.val) if r.val is not None else None, ".2f")
        delta = "—" if r.variant == baseline else _fmt(r.delta, "+.4f")
        params = f"{r.params:,}" if r.params is not None else "n/a"
        lines.append(
            f"| {r.variant} | {r.switches} | {params} | {_fmt(r.train, '.4f')} | {val} | {ppl} | {delta} "
            f"| {_fmt(r.tokens_per_s, ',.0f')} |"
        )
    lines += ["", f"![NLL vs step]({plot_name})", "", "## Conclusions", ""]
    lines += conclusions(rows, baseline)
    if n_seeds > 1:
        lines += [
            "",
            "## Runs",
            "",
            "| run | seed | final train NLL | final val NLL | tokens/s |",
            "|---|---:|---:|---:|---:|",
        ]
        for r in rows:
            for run in r.runs:
                lines.append(
                    f"| {run.name} | {run.seed} | {_fmt(run.final_train, '.4f')} | "
                    f"{_fmt(run.final_val, '.4f')} | {_fmt(run.tokens_per_s, ',.0f')} |"
                )
    with_gen = [run for r in rows for run in r.runs[:1] if run.generations]
    if with_gen:
        lines += [
            "",
            "## Generations",
            "",
            "The same prompts for every variant (first seed): greedy, then sampled (temperature 0.8, "
            "top-k 40, top-p 0.95, the same random seed for every run).",
        ]
        for run in with_gen:
            lines += ["", f"### {run.variant} ({run.name})", ""]
            for g in run.generations:
                text = (g["prompt"] + g["text"]).replace("```", "ʼʼʼ")
                lines += [f"{g['mode']}, prompt {g['prompt']!r}:", "", "```text", text, "```", ""]
    return "\n".join(lines).rstrip() + "\n"


def print_table(rows: list[VariantRow], baseline: str) -> None:
    """The report's table on the terminal."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title="ablation study (validation NLL, nats/token)")
    for col in ("run", "switches", "parameters", "train NLL", "val NLL", "Δ vs baseline", "tokens/s"):
        table.add_column(col, justify="left" if col in ("run", "switches") else "right")
    for r in rows:
        val = _fmt(r.val, ".4f") + (f" ± {r.val_range / 2:.4f}" if r.val_range is not None else "")
        table.add_row(
            r.variant,
            r.switches,
            f"{r.params:,}" if r.params is not None else "n/a",
            _fmt(r.train, ".4f"),
            val,
            "—" if r.variant == baseline else _fmt(r.delta, "+.4f"),
            _fmt(r.tokens_per_s, ",.0f"),
        )
    Console(width=max(Console().width, 140)).print(table)


def build_report(
    run_dirs: list[Path],
    out: Path,
    baseline: str = "baseline",
    prompts: list[str] | None = None,
    max_new_tokens: int = 40,
    generations: bool = True,
) -> Path:
    runs = [read_run(p) for p in run_dirs]
    names = [r.name for r in runs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise UserError(f"RUN_DIR: two runs share the name {dupes[0]}; report one study at a time")
    baseline = find_baseline(runs, baseline)
    for run in runs:
        if run.params is None:
            run.params = count_checkpoint_parameters(run)
    rows = analyse(runs, baseline)
    if generations:
        for row in rows:
            first = row.runs[0]
            first.generations = generate_samples(first, prompts or DEFAULT_PROMPTS, max_new_tokens)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(runs, rows, out / "nll.png")
    report = out / "report.md"
    atomic_write_text(report, render_markdown(rows, runs, baseline, "nll.png"))
    print_table(rows, baseline)
    return report


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lmtrain ablation-report", description=__doc__.split("\n\n")[0], allow_abbrev=False
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or a study directory)")
    p.add_argument("--out", help="output directory (default: the runs' common parent)")
    p.add_argument("--baseline", default="baseline", help="variant the others are compared to")
    p.add_argument("--prompt", action="append", dest="prompts", help="generation prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=40, help="tokens generated per prompt")
    p.add_argument("--no-generations", action="store_true", help="skip the generations section")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    run_dirs = expand_run_dirs(args.run_dirs)
    out = Path(args.out) if args.out else Path(os.path.commonpath([p.resolve().parent for p in run_dirs]))
    report = build_report(
        run_dirs, out, args.baseline, args.prompts, args.max_new_tokens, generations=not args.no_generations
    )
    print(f"wrote {report} and {out / 'nll.png'}")
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
