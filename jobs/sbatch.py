"""The sbatch script of a job plan: a pure function of the plan, tested against tests/golden/*.sbatch.

    python -m jobs.submit --exp fused --cluster clariden --dry-run --account ACCOUNT

The script is standalone (`sbatch RUN/job.sbatch` works) and has the same #SBATCH and srun options and
log files under RUN/submitit/ as what submitit submits. Each task runs `python -m jobs.task RUN`, which
exports the torch.distributed variables and runs the task command; on the time-limit or preemption
signal (USR2, or USR1) the trainer saves a checkpoint and the task exits 85. The batch script itself,
outside the container where Slurm's tools are, then requeues the job (`scontrol requeue`): a signal
near the time limit counts against job.max_num_timeout, an earlier one (preemption) does not. Every
value that comes from the user is shell-quoted.
"""

from __future__ import annotations

import shlex

from jobs.spec import EXIT_REQUEUE, JobPlan


def _flag(key: str, value: object) -> str:
    if value is None:
        return f"#SBATCH --{key}"
    return f"#SBATCH --{key}={shlex.quote(str(value))}"


def sbatch_options(plan: JobPlan) -> list[tuple[str, str | None]]:
    """(option, value) pairs of the #SBATCH header, in a fixed order (value None: a bare flag)."""
    opts: list[tuple[str, str | None]] = [("job-name", plan.job_name)]
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
        ("requeue", None),
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


# Slurm's time formats ([D-]H:MM:SS, MM:SS, SS) -> seconds; empty for anything else (UNLIMITED, INVALID).
_SECONDS_FUNCTION = [
    "seconds() {",
    "  local t=$1 d=0 a b c",
    "  case $t in *-*) d=${t%%-*}; t=${t#*-};; esac",
    '  case $t in ""|*[!0-9:]*) return;; esac',
    '  IFS=: read -r a b c <<< "$t"',
    '  if [ -n "$c" ]; then echo $(( d*86400 + 10#$a*3600 + 10#$b*60 + 10#$c ))',
    '  elif [ -n "$b" ]; then echo $(( d*86400 + 10#$a*60 + 10#$b ))',
    "  else echo $(( d*86400 + 10#$a )); fi",
    "}",
]


def requeue_lines(plan: JobPlan) -> list[str]:
    """After srun: on the task's exit code EXIT_REQUEUE (the trainer saved a checkpoint on a signal),
    requeue from the batch shell. A signal when at most a minute more than signal_delay_s was left of
    the time limit (as Slurm reports it now: `sbatch --time` and `scontrol update` count) is a time-out,
    at most max_num_timeout of them per job (counted in RUN/requeues.log); an earlier one is a
    preemption and does not count. This holds for time limits under 10 minutes too."""
    q = shlex.quote
    log = q(f"{plan.run_dir}/requeues.log")
    fallback_after = max(0, plan.seconds - plan.signal_delay_s - 60)
    return [
        "rc=$?",
        f'if [ "$rc" -eq {EXIT_REQUEUE} ]; then',
        "  elapsed=$(( $(date +%s) - started ))",
        '  left=$(seconds "$(squeue -h -j "$SLURM_JOB_ID" -o %L 2>/dev/null)")',
        f'  if [ -n "$left" ]; then near_limit=$(( left <= {plan.signal_delay_s + 60} )); '
        f"else near_limit=$(( elapsed >= {fallback_after} )); fi",
        '  if [ "$near_limit" -eq 1 ]; then kind=timeout; else kind=preemption; fi',
        f'  timeouts=$(grep -c "^timeout job=$SLURM_JOB_ID " {log} 2>/dev/null || true)',
        f'  if [ "$kind" = timeout ] && [ "${{timeouts:-0}}" -ge {plan.max_num_timeout} ]; then',
        f'    echo "lmtrain: error: {plan.max_num_timeout} time-out requeues used up; the checkpoint is kept: '
        f'make resume RUN="{q(plan.run_dir)} >&2',
        f"    exit {EXIT_REQUEUE}",
        "  fi",
        f'  echo "$kind job=$SLURM_JOB_ID restart=${{SLURM_RESTART_COUNT:-0}} elapsed=${{elapsed}}s left=${{left:-?}}s" >> {log}',
        '  echo "lmtrain: the trainer saved a checkpoint ($kind); requeueing job $SLURM_JOB_ID"',
        '  scontrol requeue "$SLURM_JOB_ID" && exit 0',
        "fi",
        'exit "$rc"',
    ]


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
        *_SECONDS_FUNCTION,
        "started=$(date +%s)",
        "",
        shlex.join(srun_command(plan)),
        *requeue_lines(plan),
        "",
    ]
    return "\n".join(lines)
