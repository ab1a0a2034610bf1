"""Print the logs of the newest run of an experiment (or of a run directory).

python -m jobs.logs --exp smoke [--rank 0] [--tail 100] [--err]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from jobs.runs import newest_run
from lmtrain.errors import UserError


def log_files(log_dir: str | Path, rank: int = 0, err: bool = False, job_id: str = "*") -> list[Path]:
    """Task `rank`'s logs (requeues keep the job id; resubmissions add files), oldest first. A job array
    shares one log folder: `job_id` (`ARRAY_TASK`) picks one run's files."""
    suffix = "err" if err else "out"
    files = sorted(Path(log_dir).glob(f"{job_id}_{rank}_log.{suffix}"), key=lambda p: p.stat().st_mtime)
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.logs", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--exp", help="experiment name: its newest submitted run")
    group.add_argument("--run", help="a run directory")
    parser.add_argument("--rank", type=int, default=0, help="task rank (default 0)")
    parser.add_argument("--tail", type=int, default=200, help="last N lines (0: all)")
    parser.add_argument("--err", action="store_true", help="stderr instead of stdout")
    args = parser.parse_args(argv)
    if args.run:
        run_dir, log_dir, job_id = args.run, Path(args.run) / "submitit", "*"
    else:
        entry = newest_run(args.exp)
        run_dir = entry["run_dir"]
        log_dir = entry.get("log_dir") or f"{run_dir}/submitit"
        job_id = entry["job_id"] if "_" in entry["job_id"] else "*"
    files = log_files(log_dir, args.rank, args.err, job_id)
    if not files:
        raise UserError(
            f"no logs of rank {args.rank} of {run_dir} in {log_dir} yet: the job may still be pending (make status)"
        )
    for f in files:
        lines = f.read_text(errors="replace").splitlines()
        if args.tail:
            lines = lines[-args.tail :]
        print(f"==> {f} <==")
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
