"""Your queued and running Slurm jobs, and the recent lmtrain submissions with their state (and, for a
failed one, its error line).

python -m jobs.status [--all]
"""

from __future__ import annotations

import argparse
import getpass
import subprocess
import sys
import time

from jobs.logs import FAILED_STATES, failure_cause
from jobs.runs import entries
from jobs.submit import slurm_problem
from lmtrain.errors import UserError


def job_states(job_ids: list[str]) -> dict[str, str]:
    """job id -> Slurm state, from sacct (the local test cluster provides a sacct shim)."""
    if not job_ids:
        return {}
    out = subprocess.run(
        ["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(job_ids)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    states = {}
    for line in out.stdout.splitlines():
        parts = line.split("|")
        if len(parts) >= 2:
            states[parts[0]] = parts[1].split()[0] if parts[1] else "?"
    return states


# States in which a job will not run again by itself.
FINAL_STATES = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED")  # fmt: skip


def wait_for(job_id: str, poll_s: float = 2.0, log=None) -> str:
    """Wait until Slurm reports job `job_id` in a final state (requeues included); returns it."""
    last = None
    while True:
        state = job_states([job_id]).get(job_id, "?")
        if state != last and log is not None and state != "?":
            log(f"job {job_id}: {state}")
        last = state
        if state.startswith(FINAL_STATES):
            return state
        time.sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.status", description=__doc__.splitlines()[0])
    parser.add_argument("--all", action="store_true", help="all recorded submissions, not only the last 10")
    args = parser.parse_args(argv)
    problem = slurm_problem()
    if problem:
        raise UserError(problem)
    queue = subprocess.run(
        ["squeue", "-u", getpass.getuser(), "-o", "%.10i %.9P %.24j %.8T %.10M %.10l %.5D %R"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    print(queue.stdout.rstrip() or "(no queued or running jobs)")
    recent = entries() if args.all else entries()[-10:]
    if recent:
        states = job_states([e["job_id"] for e in recent])
        print("\nlmtrain submissions (newest last):")
        for e in recent:
            state = states.get(e["job_id"], "?")
            what = f"{e['experiment']} (resumed)" if e.get("resumed") else e["experiment"]
            print(f"  {e['job_id']:>10}  {state:<11} {what:<24} {e['cluster']:<10} {e['run_dir']}")
            if state.startswith(FAILED_STATES) and state != "CANCELLED":
                cause = failure_cause(e.get("log_dir") or f"{e['run_dir']}/submitit", e["job_id"])
                if cause is not None and cause.error_line:
                    print(f"{'':14}cause (rank {cause.rank}): {cause.error_line}")
                print(f"{'':14}logs: make logs RUN={e['run_dir']} ERR=1")
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
