"""Your queued and running Slurm jobs, and the recent lmtrain submissions with their state.

python -m jobs.status [--all]
"""

from __future__ import annotations

import argparse
import getpass
import subprocess
import sys

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
            print(f"  {e['job_id']:>10}  {state:<11} {e['experiment']:<24} {e['cluster']:<10} {e['run_dir']}")
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
