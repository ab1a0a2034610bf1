"""Submit an experiment to a Slurm cluster through submitit, or dry-run it on the login node.

    python -m jobs.submit --exp smoke --cluster local --wait
    python -m jobs.submit --exp fused --cluster clariden --dry-run --account ACCOUNT optim.lr=1e-4 job.nodes=2

Resolves the experiment (`jobs/experiments/NAME.yaml` + `key=value` overrides, training keys like
`optim.lr=1e-4` and job keys like `job.nodes=2`), combines it with the cluster profile
(`jobs/clusters/NAME.yaml`) and writes a run directory `<output_root>/<exp>/<timestamp>/` with the
resolved training config (`config.yaml`, whose `training.output_dir` is that directory), the container
environment file the job uses (`env.toml`), the standalone sbatch script (`job.sbatch`) and the task
spec (`task.json`). Then it submits a `jobs.task.TrainTask` with submitit, unless `--dry-run`: that
submits nothing, prints the script, EDF, command and a summary, and checks what can be checked here.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import itertools
import json
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jobs import edf as edfmod
from jobs import runs
from jobs.sbatch import render_sbatch
from jobs.spec import (
    REPO_DIR,
    ClusterProfile,
    Experiment,
    JobPlan,
    choose_strategy,
    estimated_tokens,
    load_cluster,
    load_experiment,
    make_plan,
    resolved_train_config,
)
from lmtrain.config import TrainConfig, save_config
from lmtrain.errors import UserError

_DATA_SUFFIXES = (".parquet", ".jsonl", ".json", ".bin", ".txt")


@dataclass
class PreparedRun:
    experiment: Experiment
    cluster: ClusterProfile
    plan: JobPlan
    train: TrainConfig
    edf: dict[str, Any] | None
    edf_source: str | None
    sbatch: str
    warnings: list[str]
    writable: bool  # False when the output root has unresolved $VARS (dry run away from the cluster)
    strategy_note: str | None = None  # why a multi-GPU job runs DDP or FSDP


def slurm_problem() -> str | None:
    """None when the Slurm controller answers, else what is wrong and how to check."""
    how = (
        "check with `sinfo`; for the local test cluster run "
        "`bash ../shared/slurm/start-local-slurm.sh && source /tmp/slurm-local/env.sh`"
    )
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        return f"Slurm is not reachable: sbatch/sinfo are not on PATH ({how})"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return f"Slurm is not reachable: sinfo timed out ({how})"
    if out.returncode != 0:
        return f"Slurm is not reachable: sinfo failed: {out.stderr.strip()[:300]} ({how})"
    return None


def _unique_run_dir(root: Path, exp: str, now: _dt.datetime) -> Path:
    base = root / exp / now.strftime("%Y%m%d-%H%M%S")
    candidate, n = base, 1
    while candidate.exists():
        candidate = base.with_name(f"{base.name}-{n}")
        n += 1
    return candidate


def prepare(
    exp_name: str,
    cluster_name: str,
    overrides: list[str] | None = None,
    account: str | None = None,
    environ: Mapping[str, str] | None = None,
    cwd: str | None = None,
    now: _dt.datetime | None = None,
    dry_run: bool = False,
    which=shutil.which,
    run_dir: str | None = None,
    shared_dir: str | None = None,
) -> PreparedRun:
    """Resolve experiment + cluster + overrides into everything a submission needs (writes nothing).

    `shared_dir`: for the runs of one job array, the directory holding their run directories; the
    container environment file is then `shared_dir/env.toml`, common to all of them."""
    environ = os.environ if environ is None else environ
    cwd = cwd or os.getcwd()
    overrides = list(overrides or [])
    if account:
        overrides.append(f"job.account={account}")
    exp = load_experiment(exp_name, overrides)
    cluster = load_cluster(cluster_name)
    warnings: list[str] = []
    writable = True
    if run_dir is None:
        root = exp.job.output_root or cluster.output_root
        expanded = os.path.expanduser(os.path.expandvars(root))
        if "$" in expanded:
            if not dry_run:
                raise UserError(
                    f"output root {root!r} of cluster '{cluster.name}' uses an unset variable: set it, or pass "
                    "job.output_root=/absolute/path"
                )
            warnings.append(f"output root {root!r} uses an unset variable: the run directory is not written")
            writable = False
        root_path = Path(
            expanded if os.path.isabs(expanded) or "$" in expanded else os.path.join(cwd, expanded)
        )
        run_dir = str(_unique_run_dir(root_path, exp.name, now or _dt.datetime.now()))
    workdir = str(REPO_DIR)
    edf_src = exp.job.environment if exp.job.environment is not None else cluster.environment
    if edf_src is not None and edf_src.lower() in ("none", "null", ""):
        edf_src = None
    edf_data = None
    if edf_src is not None:
        src = Path(edf_src)
        if not src.is_absolute():
            src = (
                (REPO_DIR / src)
                if (REPO_DIR / src).exists() or not (Path(cwd) / src).exists()
                else Path(cwd) / src
            )
        warnings += edfmod.check_edf(src, variables={**environ, **cluster.variables()})
        edf_src = str(src)
    mount_dir = shared_dir or run_dir
    edf_path = f"{mount_dir}/env.toml" if edf_src else None
    plan = make_plan(
        exp, cluster, run_dir, workdir, environ, edf_path, which=which,
        python=None if cluster.python else sys.executable, require_account=not dry_run,
    )  # fmt: skip
    if cluster.account_required and not plan.account:
        warnings.append(str(_account_hint(cluster)))
    if edf_src:
        edf_data = edfmod.render_edf(
            edfmod.read_edf(edf_src), mount_dir, workdir, dict(plan.env), cluster.variables()
        )
        warnings += edfmod.environment_path_warnings(edf_path or "")
    train = resolved_train_config(exp, run_dir, cwd, cluster)
    strategy_note = None
    choice = choose_strategy(train, cluster, plan.world_size)
    if choice is not None:
        strategy, why = choice
        if "distributed.strategy" in exp.set_keys:
            strategy_note = f"{train.distributed.strategy} (set by the experiment; {why})"
        else:
            train = dataclasses.replace(
                train, distributed=dataclasses.replace(train.distributed, strategy=strategy)
            )
            strategy_note = f"{strategy} (chosen: {why})"
    warnings += list(plan.warnings)
    problems = _dataset_problems(train, edf_data)
    if problems and not dry_run:
        raise UserError("; ".join(problems))
    warnings += problems
    return PreparedRun(
        exp, cluster, plan, train, edf_data, edf_src, render_sbatch(plan), warnings, writable, strategy_note
    )


def _account_hint(cluster: ClusterProfile) -> str:
    from jobs.spec import account_error

    return f"no account: {account_error(cluster)}"


def _dataset_problems(train: TrainConfig, edf: dict | None) -> list[str]:
    """What is visibly wrong with data.dataset from here (the login node sees the shared filesystems)."""
    ds = train.data.dataset
    out = []
    if "://" in ds:
        return out
    if edf is not None:
        if not os.path.isabs(ds):
            out.append(
                f"data.dataset = {ds!r} is relative: inside the container it resolves from the checkout"
            )
        elif not edfmod.path_is_mounted(ds, edf):
            out.append(f"data.dataset = {ds!r} is not under a mount of the container environment file")
        if os.path.isabs(ds) and not ds.endswith(_DATA_SUFFIXES) and "." in Path(ds).name:
            out.append(f"data.dataset = {ds!r}: expected a directory or a .parquet/.jsonl/.bin file")
    top = Path(ds).parts[:2] if os.path.isabs(ds) else ()
    visible = edf is None or (len(top) == 2 and Path(*top).exists())  # e.g. /capstor is mounted here
    if visible and not Path(ds).exists():
        out.append(
            f"data.dataset = {ds!r} does not exist (build the embedded corpus with `lmtrain prepare --source "
            "stdlib --out data/stdlib --tokenizer bpe:8192`, or set data.dataset=PATH)"
        )
    return out


def write_run(run: PreparedRun) -> Path:
    """Write the run directory (each file atomically)."""
    plan = run.plan
    run_dir = Path(plan.run_dir)
    (run_dir / "submitit").mkdir(parents=True, exist_ok=True)
    save_config(run.train, run_dir / "config.yaml")
    if run.edf is not None:
        assert plan.edf is not None
        Path(plan.edf).parent.mkdir(parents=True, exist_ok=True)
        edfmod.write_edf(run.edf, plan.edf)
    _atomic_write(run_dir / "job.sbatch", run.sbatch)
    task = {"command": list(plan.command), "max_num_timeout": plan.max_num_timeout, "grace_s": _grace(plan)}
    _atomic_write(run_dir / "task.json", json.dumps(task, indent=2) + "\n")
    return run_dir


def _grace(plan: JobPlan) -> float:
    return float(max(5, plan.signal_delay_s - 10))


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _record(run: PreparedRun, job_id: str, log_dir: str | None = None) -> None:
    entry = {
        "job_id": job_id,
        "experiment": run.plan.experiment,
        "cluster": run.plan.cluster,
        "run_dir": run.plan.run_dir,
        "log_dir": log_dir or run.plan.submitit_folder,
        "submitted": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    _atomic_write(Path(run.plan.run_dir) / "job.json", json.dumps(entry, indent=2) + "\n")
    runs.record(entry)


def make_executor(plan: JobPlan, folder: str | None = None):
    import submitit

    executor = submitit.SlurmExecutor(
        folder=folder or plan.submitit_folder,
        max_num_timeout=plan.max_num_timeout,
        python=shlex.quote(plan.python),
    )
    executor.update_parameters(**plan.submitit_parameters())
    return executor


def submit(run: PreparedRun):
    """Write the run directory and submit it; returns the submitit job."""
    from jobs.task import TrainTask

    problem = slurm_problem()
    if problem:
        raise UserError(problem)
    if not run.plan.account and run.cluster.account_required:
        from jobs.spec import account_error

        raise account_error(run.cluster)
    write_run(run)
    executor = make_executor(run.plan)
    job = executor.submit(TrainTask(run.plan.run_dir, list(run.plan.command), _grace(run.plan)))
    _record(run, str(job.job_id))
    return job


# --------------------------------------------------------------------------------------------------
# Job arrays: one run per combination of swept values
# --------------------------------------------------------------------------------------------------


def parse_array(items: list[str]) -> list[list[str]]:
    """`KEY=V1,V2` items -> the override lists of every combination (cartesian product)."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v for v in values.split(",") if v != ""]
        if not sep or not key or not vals:
            raise UserError(f"--array {item!r}: expected KEY=V1,V2,... (e.g. --array optim.lr=1e-4,3e-4)")
        if key.startswith("job."):
            raise UserError(f"--array {item!r}: the runs of one job array share their job.* settings")
        axes.append([f"{key}={v}" for v in vals])
    return [list(c) for c in itertools.product(*axes)]


def prepare_array(
    exp_name: str,
    cluster_name: str,
    overrides: list[str],
    array: list[str],
    account: str | None = None,
    dry_run: bool = False,
    now: _dt.datetime | None = None,
) -> list[PreparedRun]:
    """The runs of a job array: `<output_root>/<exp>/<timestamp>-array/NN-key=value/`, sharing one EDF."""
    combos = parse_array(array)
    probe = prepare(exp_name, cluster_name, [*overrides, *combos[0]], account, dry_run=True, now=now)
    shared = f"{probe.plan.run_dir}-array"
    runs = []
    for i, combo in enumerate(combos):
        label = ",".join(c.split(".", 1)[-1] for c in combo).replace("/", "_")
        run_dir = f"{shared}/{i:02d}-{label}"
        runs.append(
            prepare(
                exp_name,
                cluster_name,
                [*overrides, *combo],
                account,
                dry_run=dry_run,
                run_dir=run_dir,
                shared_dir=shared,
            )  # fmt: skip
        )
    first = runs[0].plan.submitit_parameters()
    for run in runs[1:]:
        other = run.plan.submitit_parameters()
        diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
        if diff:
            raise UserError(f"the runs of a job array must share their job resources; these differ: {diff}")
    return runs


def submit_array(runs: list[PreparedRun]):
    """Write every run directory and submit them as one Slurm job array (submitit `executor.batch()`)."""
    from jobs.task import TrainTask

    problem = slurm_problem()
    if problem:
        raise UserError(problem)
    plan0 = runs[0].plan
    if not plan0.account and runs[0].cluster.account_required:
        from jobs.spec import account_error

        raise account_error(runs[0].cluster)
    for run in runs:
        write_run(run)
    folder = str(Path(plan0.run_dir).parent / "submitit")
    executor = make_executor(plan0, folder=folder)
    with executor.batch():
        jobs = [
            executor.submit(TrainTask(r.plan.run_dir, list(r.plan.command), _grace(r.plan))) for r in runs
        ]
    for run, job in zip(runs, jobs):
        _record(run, str(job.job_id), log_dir=folder)
    return jobs


# --------------------------------------------------------------------------------------------------
# Dry run output
# --------------------------------------------------------------------------------------------------


def layout_rows(plan: JobPlan) -> list[tuple[int, int, int, str]]:
    """(rank, node, local rank, GPUs) of every task."""
    rows = []
    for rank in range(plan.world_size):
        node, local = divmod(rank, plan.tasks_per_node)
        gpus = (
            ",".join(str(local * plan.gpus_per_task + g) for g in range(plan.gpus_per_task))
            if plan.gpus_per_task
            else "-"
        )
        rows.append((rank, node, local, gpus))
    return rows


def print_dry_run(run: PreparedRun, file=None) -> None:
    from rich.console import Console
    from rich.table import Table

    file = file or sys.stdout
    plan, train = run.plan, run.train
    print(f"# ---- sbatch script ({plan.run_dir}/job.sbatch)", file=file)
    print(run.sbatch, file=file)
    if run.edf is not None:
        import tomli_w

        print(f"# ---- container environment file ({plan.edf}, from {run.edf_source})", file=file)
        print(tomli_w.dumps(run.edf), file=file)
    print("# ---- task command (each rank)", file=file)
    print(shlex.join(plan.command), file=file)
    print(file=file)
    console = Console(file=file, width=110, force_terminal=False, color_system=None)
    table = Table(
        title=f"{plan.experiment} on {plan.cluster} (dry run: nothing submitted)", show_header=False
    )
    table.add_column("what")
    table.add_column("value")
    node_hours = plan.nodes * plan.seconds / 3600
    tokens = estimated_tokens(train, plan)
    table.add_row("account / partition", f"{plan.account or '(not set)'} / {plan.partition}")
    table.add_row(
        "time limit", f"{plan.time} (requeued at most {plan.max_num_timeout} times after time-outs)"
    )
    table.add_row("nodes x tasks", f"{plan.nodes} x {plan.tasks_per_node} = {plan.world_size} ranks")
    table.add_row("GPUs", f"{plan.total_gpus} ({plan.gpus_per_node} per node, {plan.gpus_per_task} per task)")
    table.add_row("CPUs per task / memory", f"{plan.cpus_per_task} / {plan.mem_mb} MB per node")
    if run.strategy_note:
        table.add_row("data parallel", run.strategy_note)
    table.add_row("node-hours (upper bound)", f"{node_hours:.2f}")
    table.add_row(
        "estimated tokens",
        f"{tokens:,} = {train.training.steps} steps x {train.data.batch_size} batch x "
        f"{train.data.sequence_length} seq x {train.training.grad_accumulation_steps} accum x "
        f"{plan.world_size} data-parallel ranks",
    )
    table.add_row("model / dataset", f"{train.model.preset} / {train.data.dataset}")
    table.add_row("run directory", plan.run_dir)
    console.print(table)
    lay = Table(title="layout (MASTER_ADDR = first node)")
    for col in ("rank", "node", "local rank", "GPU"):
        lay.add_column(col)
    rows = layout_rows(plan)
    shown = rows if len(rows) <= 16 else rows[:8] + rows[-4:]
    for r in shown:
        lay.add_row(*(str(x) for x in r))
    console.print(lay)
    for w in run.warnings:
        console.print(f"warning: {w}")
    console.print(
        "checks: config valid, time/partition/resources fit the cluster, container environment file valid"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.submit",
        description="Submit an experiment to a Slurm cluster (or --dry-run it).",
        epilog="Overrides: training keys (optim.lr=1e-4, training.steps=50) and job keys (job.nodes=2, "
        "job.time=00:30:00, job.account=..., job.partition=debug, job.nsys=true).",
    )
    from jobs.spec import list_clusters, list_experiments

    parser.add_argument("--exp", required=True, help=f"experiment: {', '.join(list_experiments())}")
    parser.add_argument(
        "--cluster", default="clariden", help=f"cluster profile: {', '.join(list_clusters())}"
    )
    parser.add_argument(
        "--account", help="Slurm account (overrides the profile and its environment variable)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print and check; submit nothing")
    parser.add_argument("--wait", action="store_true", help="wait for the job and print its summary")
    parser.add_argument(
        "--array", action="append", default=[], metavar="KEY=V1,V2",
        help="one run per value (repeat for a grid), submitted as one Slurm job array",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.array:
        return _main_array(args)
    run = prepare(args.exp, args.cluster, args.overrides, args.account, dry_run=args.dry_run)
    if args.dry_run:
        if run.writable:
            write_run(run)
        print_dry_run(run)
        if run.writable:
            print(
                f"wrote {run.plan.run_dir} (nothing submitted; `sbatch {run.plan.run_dir}/job.sbatch` also works)"
            )
        return 0
    job = submit(run)
    print(
        f"submitted job {job.job_id}: {run.plan.experiment} on {run.plan.cluster}, run directory {run.plan.run_dir}"
    )
    print(f"  logs: python -m jobs.logs --exp {run.plan.experiment}    status: python -m jobs.status")
    if args.wait:
        summary = job.results()[0]  # rank 0 returns the run's summary
        print(json.dumps(summary, indent=2))
    return 0


def _main_array(args) -> int:
    runs = prepare_array(
        args.exp, args.cluster, args.overrides, args.array, args.account, dry_run=args.dry_run
    )
    if args.dry_run:
        if runs[0].writable:
            for run in runs:
                write_run(run)
        print_dry_run(runs[0])
        print(f"job array of {len(runs)} runs (nothing submitted):")
        for run in runs:
            print(f"  {run.plan.run_dir}")
        return 0
    jobs = submit_array(runs)
    for run, job in zip(runs, jobs):
        print(f"submitted {job.job_id}: {run.plan.run_dir}")
    if args.wait:
        for job in jobs:
            print(json.dumps(job.results()[0]))
    return 0


def cli() -> int:
    from lmtrain.cli import run_user_facing

    return run_user_facing(main, sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(cli())
