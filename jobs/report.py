"""Nsight Systems export and GEMM report of the newest profiled run of an experiment.

    python -m jobs.report --exp profile          # or: --run RUN_DIR

Finds the run's trace (`RUN/trace.nsys-rep`, or rank 0's `RUN/trace_rank0.nsys-rep` for a multi-rank
profile), exports it with `nsys export --type sqlite` (once; again when the trace is newer) and runs
`tools/nsys_gemm_report.py trace.sqlite --run RUN`.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

from jobs.runs import newest_run
from lmtrain.errors import UserError

REPO = Path(__file__).resolve().parents[1]
GEMM_REPORT = REPO / "tools" / "nsys_gemm_report.py"


def find_trace(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    for name in ("trace.nsys-rep", "trace_rank0.nsys-rep", "trace.qdrep"):
        if (run_dir / name).is_file():
            return run_dir / name
    others = sorted(run_dir.glob("*.nsys-rep"))
    if others:
        return others[0]
    raise UserError(
        f"no Nsight Systems trace in {run_dir} (expected trace.nsys-rep): was the run submitted with "
        "job.nsys=true (e.g. EXP=profile), and has it finished? Check with `make status` and `make logs`"
    )


def export_sqlite(trace: Path, nsys: str | None = None) -> Path:
    """`nsys export --type sqlite` of `trace` beside it (skipped when an up-to-date export exists)."""
    out = trace.with_suffix(".sqlite")
    if out.is_file() and out.stat().st_mtime >= trace.stat().st_mtime:
        return out
    nsys = nsys or shutil.which("nsys")
    if nsys is None:
        raise UserError(
            "nsys is not on PATH: run the report where Nsight Systems is installed (on clariden inside the "
            "container: srun --environment=RUN/env.toml python -m jobs.report ...), or copy the trace"
        )
    tmp = out.with_name(out.stem + ".tmp.sqlite")
    cmd = [nsys, "export", "--type", "sqlite", "--force-overwrite", "true", "-o", str(tmp), str(trace)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0 or not tmp.is_file():
        raise UserError(f"`{' '.join(cmd)}` failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    tmp.replace(out)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m jobs.report", description=__doc__.splitlines()[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--exp", help="experiment name: its newest submitted run")
    group.add_argument("--run", help="a run directory")
    parser.add_argument("extra", nargs="*", help="more arguments for tools/nsys_gemm_report.py (after --)")
    args = parser.parse_args(argv)
    run_dir = Path(args.run or newest_run(args.exp)["run_dir"])
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist")
    sqlite = export_sqlite(find_trace(run_dir))
    print(f"exported {sqlite}", flush=True)
    if not GEMM_REPORT.is_file():
        raise UserError(f"{GEMM_REPORT} is missing from this checkout")
    return subprocess.run(
        [sys.executable, str(GEMM_REPORT), str(sqlite), "--run", str(run_dir), *args.extra]
    ).returncode


if __name__ == "__main__":
    from lmtrain.cli import run_user_facing

    raise SystemExit(run_user_facing(main, sys.argv[1:]))
