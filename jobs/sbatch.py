"""The sbatch script of a job plan: a pure function of the plan, tested against tests/golden/*.sbatch.

    python -m jobs.submit --exp fused --cluster clariden --dry-run --account ACCOUNT

The script is standalone (`sbatch RUN/job.sbatch` works) and equivalent to what submitit submits: the
same #SBATCH options, the same srun options, the same log files under RUN/submitit/, and each task runs
`python -m jobs.task RUN`, which exports the torch.distributed variables, runs the task command and, on
the time-limit signal, lets the trainer checkpoint and requeues the job - what `jobs.task.TrainTask`
does under submitit. Every value that comes from the user is shell-quoted.
"""

from __future__ import annotations

import shlex

from jobs.spec import JobPlan


def _flag(key: str, value: object) -> str:
    return f"#SBATCH --{key}={shlex.quote(str(value))}"


def sbatch_options(plan: JobPlan) -> list[tuple[str, str]]:
    """(option, value) pairs of the #SBATCH header, in a fixed order."""
    opts: list[tuple[str, str]] = [("job-name", plan.job_name)]
    if plan.account:
        opts.append(("account", plan.account))
    opts += [
        ("partition", plan.partition),
        ("time", plan.time),
        ("nodes", str(plan.nodes)),
        ("ntasks-per-node", str(plan.tasks_per_node)),
        ("cpus-per-task", str(plan.cpus_per_task)),
    ]
    if plan.gpus_per_node:
        opts += [("gpus-per-node", str(plan.gpus_per_node)), ("gpus-per-task", str(plan.gpus_per_task))]
    opts.append(("mem", str(plan.mem_mb)))
    if plan.constraint:
        opts.append(("constraint", plan.constraint))
    if plan.qos:
        opts.append(("qos", plan.qos))
    opts += [
        ("signal", f"USR2@{plan.signal_delay_s}"),
        ("output", f"{plan.submitit_folder}/%j_0_log.out"),
        ("error", f"{plan.submitit_folder}/%j_0_log.err"),
        ("open-mode", "append"),
        ("chdir", plan.workdir),
    ]
    return opts


def srun_command(plan: JobPlan) -> list[str]:
    folder = plan.submitit_folder
    return [
        "srun", "--unbuffered",
        "--output", f"{folder}/%j_%t_log.out",
        "--error", f"{folder}/%j_%t_log.err",
        *plan.srun_args(),
        plan.python, "-u", "-m", "jobs.task", plan.run_dir,
    ]  # fmt: skip


def render_sbatch(plan: JobPlan) -> str:
    """The standalone sbatch script of `plan` (no I/O, no clock: the same plan gives the same text)."""
    q = shlex.quote
    lines = [
        "#!/bin/bash",
        f"# lmtrain: experiment {plan.experiment} on {plan.cluster}; submit with: sbatch {q(plan.run_dir + '/job.sbatch')}",
        f"# {plan.nodes} node(s) x {plan.tasks_per_node} task(s), {plan.total_gpus} GPU(s); "
        f"each task runs: {shlex.join(plan.command)}",
    ]
    lines += [_flag(k, v) for k, v in sbatch_options(plan)]
    lines += ["", *plan.setup_lines(), "export SUBMITIT_EXECUTOR=slurm"]
    lines += [
        f"mkdir -p {q(plan.submitit_folder)}",
        "",
        shlex.join(srun_command(plan)),
        "",
    ]
    return "\n".join(lines)
