"""Where submitted runs are recorded, and how to find the newest run of an experiment.

python -c "from jobs.runs import newest_run; print(newest_run('smoke'))"
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

from lmtrain.errors import UserError


def jobs_index_path(environ: Mapping[str, str] | None = None) -> Path:
    """Submissions, one JSON line each (newest last): $LMTRAIN_JOBS_INDEX or ~/.cache/lmtrain/jobs.jsonl."""
    environ = os.environ if environ is None else environ
    if environ.get("LMTRAIN_JOBS_INDEX"):
        return Path(environ["LMTRAIN_JOBS_INDEX"])
    return Path(environ.get("HOME", str(Path.home()))) / ".cache" / "lmtrain" / "jobs.jsonl"


def record(entry: dict) -> None:
    index = jobs_index_path()
    index.parent.mkdir(parents=True, exist_ok=True)
    with open(index, "a") as f:  # one short line per append: concurrent submissions do not interleave
        f.write(json.dumps(entry) + "\n")


def entries() -> list[dict]:
    index = jobs_index_path()
    if not index.is_file():
        return []
    out = []
    for line in index.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def newest_run(experiment: str) -> dict:
    """The newest submission of `experiment` (UserError if there is none)."""
    found = [e for e in entries() if e.get("experiment") == experiment]
    if not found:
        known = sorted({e.get("experiment", "?") for e in entries()})
        raise UserError(
            f"no submitted run of experiment '{experiment}' in {jobs_index_path()}"
            + (f" (submitted experiments: {', '.join(known)})" if known else "")
            + "; submit one with `make submit EXP=...`, or pass --run RUN_DIR"
        )
    return found[-1]


def run_entry(run_dir: str) -> dict:
    path = Path(run_dir) / "job.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not a submitted run directory (no job.json)")
    return json.loads(path.read_text())
