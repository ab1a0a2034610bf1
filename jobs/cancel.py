"""Cancel a Slurm job (its requeues included) and report its final state.

python -m jobs.cancel JOB_ID
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time

from jobs.status import FINAL_STATES, job_states
from jobs.submit import slurm_problem
from lmtrain.errors import UserError


def cancel(job_id: str, wait_s: float = 60.0) -> str:
    """scancel the job and wait until Slurm reports it finished; returns the final state."""
    if not re.fullmatch(r"\d+(_\d+)?", job_id or ""):
        raise UserError(f"job id {job_id!r} is not a Slurm job id (digits, or ARRAY_TASK for array jobs)")
    problem = slurm_problem()
    if problem:
        raise UserError(problem)
    before = job_states([job_id]).get(job_id)
    if before is None:
        raise UserError(
            f"job {job_id} is not known to Slurm: nothing cancelled (`make status` lists your jobs)"
        )
    if before.startswith(FINAL_STATES):
        raise UserError(f"job {job_id} has already ended ({before}): nothing to cancel")
    out = subprocess.run(["scancel", job_id], capture_output=True, text=True, timeout=60)
    if out.returncode != 0:
        raise UserError(f"scancel {job_id} failed: {out.stderr.strip()} (check the id with `make status`)")
    deadline = time.time() + wait_s
    state = "?"
    while time.time() < deadline:
        state = job_states([job_id]).get(job_id, "?")
        if state not in ("PENDING", "RUNNING", "REQUEUED", "COMPLETING", "?"):
            break
        time.sleep(1)
    return state


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.cancel", description=__doc__.splitlines()[0])
    parser.add_argument("job_id", nargs="?", help="the job id (see `make status`)")
    args = parser.parse_args(argv)
    if not args.job_id:
        raise UserError("no job id: make cancel JOB=<id> (see `make status` for ids)")
    state = cancel(args.job_id)
    print(f"job {args.job_id}: {state}")
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
