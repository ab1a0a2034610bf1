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
from typing import TYPE_CHECKING, Any

from jobs import edf as edfmod
from jobs import runs
from jobs.sbatch import render_sbatch
from jobs.spec import (
    REPO_DIR,
    ClusterProfile,
    Experiment,
    JobPlan,
    estimated_tokens,
    load_cluster,
    load_experiment,
    make_plan,
    resolved_train_config,
)
from lmtrain.config import TrainConfig, save_config
from lmtrain.errors import UserError

if TYPE_CHECKING:
    from jobs.memory_fit import MemoryFit

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
    memory: MemoryFit | None = None  # the per-GPU memory estimate against the GPU


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
    if run_dir is None and "training.output_dir" in exp.set_keys and exp.train.training.output_dir:
        # An explicit output directory is the run directory (e.g. to continue a run there): never replaced.
        run_dir = os.path.abspath(os.path.join(cwd, os.path.expanduser(exp.train.training.output_dir)))
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
    from jobs import memory_fit as memfit  # torch: imported only where a plan is made

    strategy_note = None
    choice = memfit.choose_strategy(train, cluster, plan)
    if choice is not None:
        strategy, why = choice
        if "distributed.strategy" in exp.set_keys:
            strategy_note = f"{train.distributed.strategy} (set by the experiment; {why})"
        else:
            train = memfit.with_strategy(train, strategy)
            strategy_note = f"{strategy} (chosen: {why})"
    fit = memfit.check_fit(train, cluster, plan)
    if fit is not None and not fit.fits:
        problem = f"{fit.line()}; {fit.suggestion} would fit"
        if dry_run or not exp.job.memory_check:
            warnings.append(problem + ("" if dry_run else " (submitted anyway: job.memory_check=false)"))
        else:
            raise UserError(f"{problem}; job.memory_check=false submits it anyway")
    warnings += list(plan.warnings)
    problems = _dataset_problems(train, edf_data)
    if problems and not dry_run:
        raise UserError("; ".join(problems))
    warnings += problems
    return PreparedRun(
        exp,
        cluster,
        plan,
        train,
        edf_data,
        edf_src,
        render_sbatch(plan),
        warnings,
        writable,
        strategy_note,
        fit,
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


def _record(run: PreparedRun, job_id: str, log_dir: str | None = None, via: str = "submitit") -> None:
    record_job(
        job_id,
        run.plan.experiment,
        run.plan.cluster,
        run.plan.run_dir,
        log_dir or run.plan.submitit_folder,
        via,
    )


def record_job(
    job_id: str, experiment: str, cluster: str, run_dir: str, log_dir: str, via: str, resumed: bool = False
) -> dict:
    """Write RUN/job.json and append the submission to the jobs index (`make status`, `make logs`)."""
    entry = {
        "job_id": job_id,
        "experiment": experiment,
        "cluster": cluster,
        "run_dir": run_dir,
        "log_dir": log_dir,
        "via": via,
        "submitted": _dt.datetime.now().isoformat(timespec="seconds"),
    }
    if resumed:
        entry["resumed"] = True
    _atomic_write(Path(run_dir) / "job.json", json.dumps(entry, indent=2) + "\n")
    runs.record(entry)
    return entry


def make_executor(plan: JobPlan, folder: str | None = None):
    import submitit

    executor = submitit.SlurmExecutor(
        folder=folder or plan.submitit_folder,
        max_num_timeout=plan.max_num_timeout,
        python=shlex.quote(plan.python),
    )
    executor.update_parameters(**plan.submitit_parameters())
    return executor


# submitit classifies a signal as a time-out when the job ran past min(80% of its limit, limit - 10 min):
# under 10 minutes that is every signal, preemptions included.
SUBMITIT_MIN_SECONDS = 600


def requeue_owner(plan: JobPlan, via: str = "auto") -> str:
    """Who submits and requeues the job: "sbatch" (RUN/job.sbatch; its batch shell requeues on exit 85)
    or "submitit" (a pickled TrainTask; submitit requeues from inside the task). `auto` takes submitit
    only where its requeue works: no container (it calls scontrol inside the task) and a limit of at
    least 10 minutes."""
    if via == "sbatch":
        return "sbatch"
    if via == "submitit":
        if plan.edf:
            raise UserError(
                "--via submitit: submitit requeues from inside the task, here inside the container, which "
                "then needs Slurm's scontrol in the image; use --via sbatch (the default with a container)"
            )
        if plan.seconds < SUBMITIT_MIN_SECONDS:
            raise UserError(
                f"--via submitit with job.time = {plan.time}: under 10 minutes submitit counts every signal, "
                "preemptions too, as a time-out; use --via sbatch (the default for such limits) or "
                "job.time=00:10:00 or longer"
            )
        return "submitit"
    if via != "auto":
        raise UserError(f"--via {via!r}: use auto, sbatch or submitit")
    return "sbatch" if plan.edf or plan.seconds < SUBMITIT_MIN_SECONDS else "submitit"


@dataclass
class ScriptJob:
    """A job submitted as `sbatch RUN/job.sbatch` (the counterpart of a submitit job)."""

    job_id: str
    run_dir: str
    log_dir: str

    def results(self) -> list[dict | None]:
        """Wait for the job; [summary.json of the run] when it completed, else UserError with the cause."""
        return [wait_and_summarize(self.job_id, self.run_dir, self.log_dir)]


def sbatch_file(script: str | os.PathLike, options: list[str] | None = None) -> str:
    """`sbatch --parsable [OPTIONS] SCRIPT` -> job id."""
    argv = ["sbatch", "--parsable", *(options or []), str(script)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    if out.returncode != 0:
        raise UserError(f"sbatch {script} failed: {out.stderr.strip() or out.stdout.strip()}")
    return out.stdout.strip().split(";")[0]


def wait_and_summarize(job_id: str, run_dir: str, log_dir: str, log=None) -> dict | None:
    """Wait for a job; its run's summary when it completed, else a UserError naming the cause."""
    from jobs.logs import describe_failure
    from jobs.status import wait_for
    from jobs.task import read_summary

    state = wait_for(job_id, log=log)
    if state == "COMPLETED":
        return read_summary(run_dir)
    raise UserError(describe_failure(job_id, state, log_dir) + f"\n(make logs RUN={run_dir} ERR=1 RANK=all)")


def _check_submittable(run: PreparedRun) -> None:
    problem = slurm_problem()
    if problem:
        raise UserError(problem)
    if not run.plan.account and run.cluster.account_required:
        from jobs.spec import account_error

        raise account_error(run.cluster)


def submit(run: PreparedRun, via: str = "auto"):
    """Write the run directory and submit it; returns the submitit job or a ScriptJob."""
    from jobs.task import TrainTask

    owner = requeue_owner(run.plan, via)
    _check_submittable(run)
    run_dir = write_run(run)
    if owner == "sbatch":
        job_id = sbatch_file(run_dir / "job.sbatch")
        _record(run, job_id, via=owner)
        return ScriptJob(job_id, run.plan.run_dir, run.plan.submitit_folder)
    executor = make_executor(run.plan)
    job = executor.submit(TrainTask(run.plan.run_dir, list(run.plan.command), _grace(run.plan)))
    _record(run, str(job.job_id), via=owner)
    return job


def resume(run_dir: str, time: str | None = None, log=print) -> ScriptJob:
    """Submit a run directory's own RUN/job.sbatch again: an exhausted, failed or cancelled run continues
    in its directory from its newest checkpoint (its config resumes: `checkpoint.resume: auto`). `time`
    replaces the script's time limit (`sbatch --time`)."""
    from jobs.spec import format_seconds, parse_seconds

    options = [f"--time={format_seconds(parse_seconds(time))}"] if time is not None else []
    from jobs.status import FINAL_STATES, job_states
    from jobs.task import read_summary

    run_path = Path(run_dir).resolve()
    entry = runs.run_entry(str(run_path))  # UserError unless it is a submitted run directory
    for name in ("job.sbatch", "config.yaml", "task.json"):
        if not (run_path / name).is_file():
            raise UserError(f"{run_path} has no {name}: not a complete run directory, cannot resume it")
    summary = read_summary(run_path)
    if summary and summary.get("exit_reason") == "completed":
        raise UserError(
            f"{run_path} has finished (summary.json: {summary.get('steps')} steps): nothing to resume"
        )
    problem = slurm_problem()
    if problem:
        raise UserError(problem)
    state = job_states([entry["job_id"]]).get(entry["job_id"], "?")
    if state != "?" and not state.startswith(FINAL_STATES):
        raise UserError(
            f"job {entry['job_id']} of {run_path} is still {state}: wait for it, or `make cancel JOB={entry['job_id']}`"
        )
    from lmtrain.checkpoint import find_checkpoints

    found = find_checkpoints(run_path)
    log(
        f"resuming {run_path} from its step-{found[-1][0]} checkpoint (last job {entry['job_id']}: {state})"
        if found
        else f"{run_path} has no checkpoint yet: the job starts it from step 0 (last job {entry['job_id']}: {state})"
    )
    job_id = sbatch_file(run_path / "job.sbatch", options)
    log_dir = entry.get("log_dir") or str(run_path / "submitit")
    record_job(job_id, entry["experiment"], entry["cluster"], str(run_path), log_dir, "sbatch", resumed=True)
    return ScriptJob(job_id, str(run_path), log_dir)


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
    if run.memory is not None:
        from jobs.memory_fit import memory_rows

        mem = Table(title="memory per GPU (lmtrain.memory estimate; GPU-only terms are estimates)")
        for col in ("term", "GiB", "note"):
            mem.add_column(col)
        for row in memory_rows(run.memory):
            mem.add_row(*row)
        console.print(mem)
        console.print(run.memory.line())
    for w in run.warnings:
        console.print(f"warning: {w}")
    console.print(
        "checks: config valid, time/partition/resources fit the cluster, container environment file valid"
    )


EMBEDDED_CORPUS = "data/stdlib"


def ensure_corpus(exp_name: str, overrides: list[str], cwd: str, log=print) -> None:
    """Build the embedded corpus (what `make train` trains on) when the experiment names it and it is
    missing here; a failure names the command to run by hand."""
    from lmtrain.main_job import CORPUS_ARGS, prepare_corpus

    exp = load_experiment(exp_name, [o for o in overrides if not o.startswith("job.")])
    out = Path(cwd) / EMBEDDED_CORPUS
    if exp.train.data.dataset != EMBEDDED_CORPUS or (out / "prepare.json").is_file():
        return
    command = shlex.join(["lmtrain", "prepare", *CORPUS_ARGS, "--out", EMBEDDED_CORPUS])
    log(
        f"building the embedded corpus {EMBEDDED_CORPUS} that {exp_name} trains on (once): {command}",
        flush=True,
    )
    try:
        prepare_corpus(str(out))
    except Exception as exc:  # noqa: BLE001 - any failure gets the one line that says what to run
        raise UserError(f"building {EMBEDDED_CORPUS} failed ({exc}); build it by hand: {command}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m jobs.submit",
        description="Submit an experiment to a Slurm cluster (or --dry-run it), or resume a run.",
        epilog="Overrides: training keys (optim.lr=1e-4, training.steps=50) and job keys (job.gpus=4, "
        "job.nodes=2, job.time=00:30:00, job.account=..., job.partition=debug, job.nsys=true). "
        "training.output_dir=DIR makes DIR the run directory (it is never replaced by a new one).",
    )
    from jobs.spec import list_clusters, list_experiments

    parser.add_argument("--exp", help=f"experiment: {', '.join(list_experiments())}")
    parser.add_argument(
        "--cluster",
        default="clariden",
        help=f"cluster profile: {', '.join(list_clusters())} (default: %(default)s)",
    )
    parser.add_argument(
        "--account", help="Slurm account (overrides the profile and its environment variable)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print and check; submit nothing")
    parser.add_argument(
        "--wait", action="store_true", help="wait for the job; print its summary or its failure"
    )
    parser.add_argument(
        "--resume", metavar="RUN_DIR",
        help="submit RUN_DIR/job.sbatch again: an exhausted, failed or cancelled run continues from its newest checkpoint",
    )  # fmt: skip
    parser.add_argument(
        "--via", choices=("auto", "sbatch", "submitit"), default="auto",
        help="who submits and requeues: the batch script (sbatch; with a container or under 10 minutes) or "
        "submitit (auto: the first where needed, else submitit)",
    )  # fmt: skip
    parser.add_argument(
        "--array", action="append", default=[], metavar="KEY=V1,V2",
        help="one run per value (repeat for a grid), submitted as one Slurm job array",
    )  # fmt: skip
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    if args.resume is not None:
        if not args.resume.strip():
            raise UserError("no run directory to resume: make resume RUN=<run dir> (make status lists them)")
        other = [o for o in args.overrides if not o.startswith("job.time=")]
        if args.exp or other or args.array or args.dry_run:
            raise UserError(
                "--resume RUN_DIR reruns the run as written: it takes job.time=HH:MM:SS and --wait, "
                f"not {' '.join(other) or '--exp/--array/--dry-run'}"
            )
        times = [o.split("=", 1)[1] for o in args.overrides if o.startswith("job.time=")]
        job = resume(args.resume, times[-1] if times else None)
        print(f"submitted job {job.job_id}: resumes {job.run_dir}")
        print("  logs: make logs RUN=" + shlex.quote(job.run_dir) + "    status: make status")
        return _wait(job) if args.wait else 0
    if not args.exp:
        raise UserError(
            f"no experiment: pass --exp NAME (one of {', '.join(list_experiments())}) or --resume RUN_DIR"
        )
    ensure_corpus(args.exp, args.overrides, os.getcwd())
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
    for w in run.warnings:
        print(f"warning: {w}", file=sys.stderr)
    job = submit(run, args.via)
    via = "batch script" if isinstance(job, ScriptJob) else "submitit"
    print(
        f"submitted job {job.job_id}: {run.plan.experiment} on {run.plan.cluster} ({via} requeues), "
        f"run directory {run.plan.run_dir}"
    )
    if run.strategy_note:
        print(f"  data parallel: {run.strategy_note}")
    if run.memory is not None:
        print(f"  {run.memory.line()}")
    print(f"  logs: make logs EXP={run.plan.experiment}    status: make status")
    return _wait(job) if args.wait else 0


def _wait(job) -> int:
    """--wait: poll Slurm (requeues included) and print the summary, or raise with the failure's cause."""
    if isinstance(job, ScriptJob):
        summary = wait_and_summarize(job.job_id, job.run_dir, job.log_dir, log=print)
    else:  # a submitit job: its folder is RUN/submitit
        folder = Path(job.paths.folder)
        summary = wait_and_summarize(str(job.job_id), str(folder.parent), str(folder), log=print)
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
