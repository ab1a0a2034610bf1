#!/usr/bin/env python
"""The course's experiment sweeps: run (or submit) a set of experiments, then one comparison report.

    python -m jobs.sweep --sweep throughput

`throughput` is baseline, fused, compile, seq4096 and fused-compile-seq4096 (jobs/experiments/*.yaml):
the same training job with fused AdamW, torch.compile, sequence length 4096, and all three.
`precision` is the mixed-precision study, one process over seven precision modes: every argument
after `--sweep precision` goes to `python -m jobs.precision_study` (see its --help).

Sizes. `--size full` runs the experiments as written (Llama-3 8B on a GH200 node); that is the
default with `--cluster clariden`. `--size cpu` (the default without `--cluster` and with
`--cluster local`) keeps every experiment's switches (fused, compile, padded pipeline, the *ratio*
of sequence lengths) but trains the `tiny` preset narrowed to dim 128 x 2 layers, in fp32, on the
embedded corpus as bytes (data/stdlib-bytes, built by `make ablation`) for a few steps, with sequence
lengths divided by 16 (2048 -> 128, 4096 -> 256). On a CPU this measures what the switches do
to a CPU step: the optimizer's fused kernel, Inductor's generated C++ kernels, and the extra attention
work of longer sequences. It says nothing about GPU speed-ups; only a `--size full` run on the cluster
measures those. On a shared or busy CPU run it with OMP_NUM_THREADS=1: a two-thread step whose second
thread is descheduled waits at every parallel region (measured here under load: 12 s instead of
0.35 s per step), which swamps the switches.

Without `--cluster` the runs train here one after another; with `--cluster` each is submitted through
the jobs launcher (`jobs/submit.py`, one Slurm job per experiment: their time limits differ) and
`--wait` waits for them. A run whose summary.json exists is not redone. The report is
`<out>/report.md` with `tools/compare_runs.py`'s table and chart and, per run, why it is faster or
slower than the baseline, worked out from the measured numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lmtrain.atomic import atomic_write_text
from lmtrain.errors import UserError

SWEEPS: dict[str, list[str]] = {
    "throughput": ["baseline", "fused", "compile", "seq4096", "fused-compile-seq4096"],
}
SEQ_DIVISOR = 16
CPU_STEPS = 30
# Differences smaller than this are never called faster or slower: run-to-run variation (other load,
# memory placement) is not visible in the windows of one run.
MIN_BAND = 0.03


@dataclass
class SweepRun:
    experiment: str
    run_dir: Path
    overrides: list[str]
    """`section.field=value` overrides of the experiment (the CPU sizes, the steps)."""

    @property
    def done(self) -> bool:
        from jobs.ablation import run_finished

        return run_finished(self.run_dir)


def cpu_overrides(experiment: str, steps: int, dataset: str) -> list[str]:
    """The CPU-sized version of an experiment: its switches kept, its size cut (see the docstring)."""
    from jobs.spec import load_experiment

    train = load_experiment(experiment).train
    seq = max(8, train.data.sequence_length // SEQ_DIVISOR)
    return [
        "model.preset=tiny",
        "model.dim=128",
        "model.n_layers=2",
        "precision.model_dtype=fp32",
        f"data.dataset={dataset}",
        "data.tokenizer=",
        f"data.sequence_length={seq}",
        "training.device=cpu",
        f"training.steps={steps}",
        "training.eval_batches=1",
        f"logging.frequency={max(1, steps // 10)}",
        f"schedule.warmup_steps={min(train.schedule.warmup_steps, steps // 10)}",
    ]


def plan(
    sweep: str, out_dir: Path, size: str, steps: int | None, dataset: str, extra: list[str]
) -> list[SweepRun]:
    if sweep not in SWEEPS:
        raise UserError(f"--sweep: unknown sweep '{sweep}'; valid: {', '.join(SWEEPS)}")
    if steps is not None and steps < 2:
        raise UserError(f"--steps must be >= 2 (the first step is excluded from tokens/s), got {steps}")
    runs = []
    for exp in SWEEPS[sweep]:
        if size == "cpu":
            overrides = cpu_overrides(exp, steps or CPU_STEPS, dataset)
        else:
            overrides = [f"training.steps={steps}"] if steps else []
        runs.append(SweepRun(exp, out_dir / exp, overrides + list(extra)))
    return runs


def resolved_config(run: SweepRun):
    """The experiment with the run's overrides, pinned to its run directory (as the launcher does)."""
    from jobs.spec import load_experiment, resolved_train_config

    return resolved_train_config(
        load_experiment(run.experiment, run.overrides), str(run.run_dir), os.getcwd()
    )


def run_local(runs: list[SweepRun], log=print) -> None:
    from lmtrain.config import save_config

    todo = [r for r in runs if not r.done]
    for r in runs:
        if r.done:
            log(f"[skip] {r.experiment}: finished (summary.json present)")
    for i, r in enumerate(todo, 1):
        cfg = resolved_config(r)
        r.run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, r.run_dir / "config.yaml")
        cmd = [sys.executable, "-m", "lmtrain.train", "--config", str(r.run_dir / "config.yaml")]
        log(f"[{i}/{len(todo)}] {r.experiment}: {' '.join(cmd[1:])}")
        start = time.perf_counter()
        with open(r.run_dir / "stdout.log", "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT)
        if proc.returncode != 0 or not r.done:
            tail = "".join((r.run_dir / "stdout.log").read_text().splitlines(keepends=True)[-15:])
            raise RuntimeError(f"run {r.experiment} failed (exit {proc.returncode}):\n{tail}")
        log(f"[{i}/{len(todo)}] {r.experiment}: done in {time.perf_counter() - start:.0f} s")


def submit(runs: list[SweepRun], cluster: str, account: str | None, log=print) -> list:
    """One launcher job per unfinished run (their job sections differ, so they cannot share an array)."""
    from jobs import submit as launcher

    jobs = []
    for r in runs:
        if r.done:
            log(f"[skip] {r.experiment}: finished (summary.json present)")
            continue
        prepared = launcher.prepare(
            r.experiment, cluster, r.overrides, account, run_dir=str(r.run_dir.resolve())
        )
        for warning in prepared.warnings:
            log(f"warning: {r.experiment}: {warning}")
        job = launcher.submit(prepared)
        log(f"submitted {r.experiment} as job {job.job_id} on {cluster}: {r.run_dir}")
        jobs.append(job)
    return jobs


# --------------------------------------------------------------------------------------------------
# Explanations from the measured numbers
# --------------------------------------------------------------------------------------------------


@dataclass
class Measured:
    name: str
    config: dict
    tokens_per_s: float
    positions_per_s: float
    mfu: float | None
    flops_per_position: float | None
    noise: float
    """Relative standard error of this run's tokens/s, from its logged windows (0 with fewer than 3)."""

    @property
    def padding(self) -> float:
        return max(0.0, 1.0 - self.tokens_per_s / self.positions_per_s) if self.positions_per_s else 0.0


def measure(run_dir: Path, row: dict | None = None) -> Measured:
    """A run's numbers; with `row` (tools/compare_runs.py's summary of it), its tokens/s and noise are
    the table's: the mean and spread of the logged windows after the first."""
    import yaml

    summary = json.loads((run_dir / "summary.json").read_text())
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    tps, pps = summary.get("tokens_per_s"), summary.get("positions_per_s")
    if not tps or not pps:
        raise UserError(f"{run_dir}/summary.json has no tokens_per_s/positions_per_s: did the run train?")
    world = summary.get("world_size") or 1
    fpp = None
    if summary.get("mfu") and summary.get("peak_tflops"):
        fpp = summary["mfu"] * summary["peak_tflops"] * 1e12 / (pps / world)
    rates = []
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec.get("tokens_per_s"), (int, float)):
                rates.append(rec["tokens_per_s"])
    rates = rates[1:]  # the first window holds the warm-up step (allocation, compilation)
    noise = (
        statistics.stdev(rates) / statistics.fmean(rates) / math.sqrt(len(rates)) if len(rates) >= 3 else 0.0
    )
    if row is not None and row.get("tokens_per_s"):
        # Keep the summary's share of real tokens among positions; take the rate itself from the table.
        pps = pps * row["tokens_per_s"] / tps
        tps = row["tokens_per_s"]
        used = max(1, row.get("records_used") or 1)
        noise = (row.get("tokens_per_s_std") or 0.0) / tps / math.sqrt(used) if used > 1 else 0.0
    return Measured(run_dir.name, config, float(tps), float(pps), summary.get("mfu"), fpp, noise)


def _changes(run: Measured, base: Measured) -> dict[str, tuple[Any, Any]]:
    keys = [("optim", "fused"), ("training", "compile"), ("data", "sequence_length")]
    out = {}
    for section, key in keys:
        a, b = base.config[section][key], run.config[section][key]
        if a != b:
            out[f"{section}.{key}"] = (a, b)
    return out


def explain(run: Measured, base: Measured, singles: dict[str, float]) -> str:
    """Why `run` is faster or slower than `base`, from their measured numbers.

    `singles` maps a changed key to the tokens/s ratio of the run that changed only that key."""
    ratio = run.tokens_per_s / base.tokens_per_s
    band = max(MIN_BAND, 2 * math.hypot(run.noise, base.noise))
    if abs(ratio - 1) <= band:
        verdict = f"{ratio:.2f}× the baseline's tokens/s: within the measurement noise (±{band:.0%})"
    else:
        verdict = (
            f"{ratio:.2f}× the baseline's tokens/s: {'faster' if ratio > 1 else 'slower'} (noise ±{band:.0%})"
        )
    changes = _changes(run, base)
    parts = [verdict + "."]
    for key, (a, b) in changes.items():
        if key == "optim.fused":
            parts.append(
                "Fused AdamW updates all parameters in one multi-tensor kernel instead of a loop of per-tensor "
                "ops; it touches only the optimizer step, so its effect is bounded by that step's share."
            )
        elif key == "training.compile":
            parts.append(
                "torch.compile fuses the elementwise ops (norms, activations, rotary, residual adds) into "
                "generated kernels and removes Python overhead from the step; compilation itself is in the "
                "first step, which tokens/s excludes."
            )
        elif key == "data.sequence_length":
            text = f"Sequence length {a} → {b}:"
            if run.flops_per_position and base.flops_per_position:
                f_ratio = run.flops_per_position / base.flops_per_position
                text += (
                    f" attention's FLOPs grow with the length, {f_ratio:.2f}× the FLOPs per position, so at "
                    f"equal hardware efficiency tokens/s would be {1 / f_ratio:.2f}×"
                )
                if run.mfu and base.mfu:
                    text += f"; the measured MFU went {base.mfu:.2%} → {run.mfu:.2%}"
                text += "."
                predicted = 1 / f_ratio
                if len(changes) > 1:
                    pass  # the ratio mixes several changes; the product below compares them
                elif ratio > predicted * (1 + band):
                    text += (
                        f" Measured {ratio:.2f}× instead: the hardware was used better, as each step's fixed "
                        f"costs (optimizer update, Python and kernel-launch overhead) are spread over "
                        f"{b / a:.1f}× the positions."
                    )
                elif ratio < predicted * (1 - band):
                    text += f" Measured {ratio:.2f}× instead: the hardware was used less well at this length."
            text += (
                f" Padding: {base.padding:.1%} → {run.padding:.1%} of the positions are padding (tokens/s "
                "counts real tokens only)."
            )
            parts.append(text)
    if len(changes) > 1 and all(k in singles for k in changes):
        expected = math.prod(singles[k] for k in changes)
        parts.append(
            f"The single changes alone measured {' × '.join(f'{singles[k]:.2f}' for k in changes)} = "
            f"{expected:.2f}×; combined {ratio:.2f}×."
        )
    return " ".join(parts)


def write_report(runs: list[SweepRun], out_dir: Path, size: str, log=print) -> Path:
    from lmtrain.tools import compare_runs

    finished = [r for r in runs if r.done]
    if not finished:
        raise UserError(f"no finished run in {out_dir} to report on")
    from lmtrain.tables import markdown_table
    from lmtrain.tools.runlog import load_runs

    rows = compare_runs.compare(load_runs([str(r.run_dir) for r in finished]), warmup=1)
    compare_runs.print_table(rows, 1)
    measured = {r.experiment: measure(r.run_dir, row) for r, row in zip(finished, rows)}
    base_name = runs[0].experiment
    if base_name not in measured:
        raise UserError(f"the {base_name} run has not finished: it is the reference of every row")
    base = measured[base_name]
    singles: dict[str, float] = {}
    for m in measured.values():
        changes = _changes(m, base)
        if len(changes) == 1:
            singles[next(iter(changes))] = m.tokens_per_s / base.tokens_per_s
    table_md = markdown_table(compare_runs.HEADERS, [compare_runs.cells(row) for row in rows])
    chart = out_dir / "throughput.png"
    compare_runs.plot(rows, chart)
    where = (
        "CPU-sized runs (the `tiny` preset at dim 128 x 2 layers, fp32, byte tokens, sequence lengths / 16) on this machine's CPU: they measure "
        "what each switch does to a CPU step, not GPU speed-ups"
        if size == "cpu"
        else "the experiments as written"
    )
    lines = [
        f"# Sweep: {', '.join(r.experiment for r in runs)}",
        "",
        f"{where}. tokens/s is the mean over the logged windows after the first (which holds the warm-up "
        f"and compilation), ± their standard deviation; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} when the report was written. A run is called faster or slower only beyond ± twice "
        "the standard error of its logged windows' tokens/s and the baseline's, and never within "
        f"±{MIN_BAND:.0%} (variation between runs, such as load from other processes, is not in those windows).",
        "",
        table_md.rstrip(),
        "",
        f"![comparison]({chart.name})",
        "",
        "## Why each run is faster or slower than the baseline",
        "",
    ]
    for r in finished:
        if r.experiment == base_name:
            continue
        lines.append(f"- **{r.experiment}**: {explain(measured[r.experiment], base, singles)}")
    path = out_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    log(f"report: {path}")
    return path


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--sweep")
    chosen, rest = first.parse_known_args(argv)
    if chosen.sweep == "precision":
        from jobs import precision_study

        return precision_study.main(rest)
    p = argparse.ArgumentParser(prog="python -m jobs.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep", required=True, help=f"sweep name: {', '.join(SWEEPS)}, precision")
    p.add_argument("--cluster", help="submit through the jobs launcher to this cluster (local, clariden)")
    p.add_argument(
        "--size", choices=["cpu", "full"], help="cpu: CPU-sized runs; full: as written (see --help)"
    )
    p.add_argument("--steps", type=int, help=f"training steps (default: {CPU_STEPS} with --size cpu)")
    p.add_argument(
        "--dataset", default="data/stdlib-bytes", help="corpus of --size cpu runs (default: %(default)s)"
    )
    p.add_argument("--out", help="sweep directory (default: runs/sweeps/<sweep>-<size>)")
    p.add_argument("--account", help="with --cluster: Slurm account")
    p.add_argument("--wait", action="store_true", help="with --cluster: wait for the jobs, then report")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report of finished runs")
    p.add_argument("--dry-run", action="store_true", help="print the resolved runs and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="training overrides for every run")
    args = p.parse_args(argv)
    size = args.size or ("full" if args.cluster and args.cluster != "local" else "cpu")
    out_dir = Path(args.out) if args.out else Path("runs") / "sweeps" / f"{args.sweep}-{size}"
    runs = plan(args.sweep, out_dir, size, args.steps, args.dataset, args.overrides)
    # Resolve every run's config first: a mistyped override is reported before anything else.
    configs = [resolved_config(r) for r in runs]
    if args.dry_run:
        for r, cfg in zip(runs, configs):
            print(
                f"{r.experiment}: {r.run_dir} preset={cfg.model.preset} seq={cfg.data.sequence_length} "
                f"fused={cfg.optim.fused} compile={cfg.training.compile} steps={cfg.training.steps}"
            )
        return 0
    if not args.report_only:
        if size == "cpu" and not Path(args.dataset).exists():
            raise UserError(
                f"--dataset {args.dataset} does not exist: build it with "
                f"`lmtrain prepare --source stdlib --out {args.dataset} --tokenizer byte`"
            )
        if args.cluster:
            jobs = submit(runs, args.cluster, args.account)
            if jobs and not args.wait:
                print("once the jobs have finished: python -m jobs.sweep ... --report-only (same arguments)")
                return 0
            for job in jobs:
                job.result()
        else:
            run_local(runs)
    write_report(runs, out_dir, size)
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
