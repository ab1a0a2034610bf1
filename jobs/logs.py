"""Print the logs of the newest run of an experiment (or of a run directory), and find why a job failed.

python -m jobs.logs --exp smoke [--rank 0|all] [--tail 100] [--err | --both]

Each task writes RUN/submitit/<job>_<rank>_log.out and .err (requeues append to the same files, a
resubmission adds files). Of a failed job the tail of stderr and its error line (the last line that
names an error) are printed after the log, for the rank where it happened.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from jobs.runs import newest_run, run_entry
from lmtrain.errors import UserError

# A line that says what went wrong: "error: ...", "ValueError: ...", "CUDA out of memory", "Killed", ...
_ERROR_LINE = re.compile(
    r"(^error:|\berror:|^\w*(Error|Exception)\b|out of memory|OutOfMemory|^Killed|slurmstepd: error|"
    r"DUE TO TIME LIMIT|CANCELLED AT)",
    re.IGNORECASE,
)
# Lines that only report that something below failed: the cause is the error line before them.
_GENERIC = re.compile(r"^lmtrain task:|training exited with code|^submitit ERROR|^Traceback|^srun: error:")
FAILED_STATES = ("FAILED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE", "PREEMPTED")


def log_files(log_dir: str | Path, rank: int | str = 0, err: bool = False, job_id: str = "*") -> list[Path]:
    """Task `rank`'s logs (`*`: every rank), oldest first. Requeues keep the job id; resubmissions add
    files. A job array shares one log folder: `job_id` (`ARRAY_TASK`) picks one run's files."""
    suffix = "err" if err else "out"
    files = sorted(
        Path(log_dir).glob(f"{job_id}_{rank}_log.{suffix}"), key=lambda p: (p.stat().st_mtime, p.name)
    )
    return files


def tail(path: Path, n: int) -> list[str]:
    lines = path.read_text(errors="replace").splitlines()
    return lines[-n:] if n else lines


@dataclass
class FailureCause:
    rank: str
    error_line: str | None
    stderr_tail: list[str]
    file: Path


def failure_cause(log_dir: str | Path, job_id: str, n_lines: int = 20) -> FailureCause | None:
    """The rank whose stderr names an error (the lowest such rank), its error line and stderr tail; None
    when no stderr of the job says anything."""
    found: list[FailureCause] = []
    for f in log_files(log_dir, "*", err=True, job_id=job_id):
        lines = f.read_text(errors="replace").splitlines()
        if not any(line.strip() for line in lines):
            continue
        errors = [line.strip() for line in lines if _ERROR_LINE.search(line.strip())]
        specific = [e for e in errors if not _GENERIC.search(e)]
        rank = f.name[len(job_id) + 1 :].split("_")[0] if job_id != "*" else f.name.split("_")[-2]
        found.append(FailureCause(rank, (specific or errors or [None])[-1], lines[-n_lines:], f))
    if not found:
        return None
    with_error = [c for c in found if c.error_line] or found
    return min(with_error, key=lambda c: int(c.rank) if c.rank.isdigit() else 0)


def describe_failure(job_id: str, state: str, log_dir: str | Path, n_lines: int = 20) -> str:
    """`job N STATE: <error line>` and the tail of the stderr it came from, for a message or a report."""
    cause = failure_cause(log_dir, job_id, n_lines)
    if cause is None:
        return f"job {job_id} {state}: no error output in {log_dir}"
    head = f"job {job_id} {state}: {cause.error_line or 'see the stderr tail below'} (rank {cause.rank})"
    return "\n".join([head, f"--- tail of {cause.file}", *cause.stderr_tail])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.logs", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--exp", help="experiment name: its newest submitted run")
    group.add_argument("--run", help="a run directory")
    parser.add_argument("--rank", default="0", help="task rank, or 'all' (default 0)")
    parser.add_argument(
        "--tail", type=int, default=200, help="last N lines of each file (0: all; default 200)"
    )
    stream = parser.add_mutually_exclusive_group()
    stream.add_argument("--err", action="store_true", help="stderr instead of stdout")
    stream.add_argument("--both", action="store_true", help="stdout and stderr")
    args = parser.parse_args(argv)
    if args.rank != "all" and not args.rank.isdigit():
        raise UserError(f"--rank {args.rank!r}: give a task rank (0, 1, ...) or 'all'")
    rank = "*" if args.rank == "all" else args.rank
    if args.run:
        run_dir = args.run
        entry = run_entry(run_dir) if Path(run_dir, "job.json").is_file() else {}
        log_dir = entry.get("log_dir") or f"{run_dir}/submitit"
    else:
        entry = newest_run(args.exp)
        run_dir = entry["run_dir"]
        log_dir = entry.get("log_dir") or f"{run_dir}/submitit"
    job_id = entry.get("job_id", "*") if "_" in entry.get("job_id", "") else "*"
    streams = [False, True] if args.both else [args.err]
    files = [f for err in streams for f in log_files(log_dir, rank, err, job_id)]
    if not files:
        raise UserError(
            f"no logs of rank {args.rank} of {run_dir} in {log_dir} yet: the job may still be pending (make status)"
        )
    for f in files:
        print(f"==> {f} <==")
        print("\n".join(tail(f, args.tail)))
    if entry.get("job_id"):
        from jobs.status import job_states

        state = job_states([entry["job_id"]]).get(entry["job_id"], "?")
        if state in FAILED_STATES or state.startswith("CANCELLED"):
            print()
            print(describe_failure(entry["job_id"], state, log_dir, n_lines=20 if args.tail else 0))
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
