"""Shared test setup: markers for real external components and paths to ../shared fixtures.

Tests marked `slurm` need a reachable Slurm controller, tests marked `nsys` an `nsys` binary. Where the
component is missing they skip with the reason, unless LMTRAIN_REQUIRE_SLURM=1 / LMTRAIN_REQUIRE_NSYS=1
(set by CI), in which case they fail: CI must never go green by skipping the real thing.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

# One OpenMP thread per process: the suite runs on 2 cores and many tests start several processes
# (gloo ranks, DataLoader workers, trainer subprocesses); torch's default of one thread per core then
# oversubscribes the machine and small-model tests run many times slower. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Measured CPU peaks are cached per machine; the suite's own (measured on a busy machine) stay out of the
# user's cache, shared by this session and its subprocesses.
os.environ.setdefault("LMTRAIN_CACHE_DIR", tempfile.mkdtemp(prefix="lmtrain-test-cache-"))

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@functools.cache
def slurm_problem() -> str | None:
    """None when a Slurm controller answers `sinfo`, else why not."""
    if shutil.which("sinfo") is None:
        return "sinfo not on PATH (start ../shared/slurm/start-local-slurm.sh and source /tmp/slurm-local/env.sh)"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=20)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: slurmctld is not answering"
    if out.returncode != 0:
        # sinfo explains itself in several lines; the last one says what failed in the end.
        lines = [line.strip() for line in out.stderr.splitlines() if line.strip()]
        why = lines[-1].removeprefix("sinfo: ") if lines else f"exit status {out.returncode}"
        return (
            f"no Slurm controller answers sinfo ({why}); start one with ../shared/slurm/start-local-slurm.sh"
        )
    return None


@functools.cache
def nsys_problem() -> str | None:
    if shutil.which("nsys") is None:
        return "nsys not on PATH (install with ../shared/nsys/install-nsys.sh)"
    return None


def _require(env: str) -> bool:
    return os.environ.get(env, "") not in ("", "0", "false")


def pytest_runtest_setup(item: pytest.Item) -> None:
    for marker, problem, env in (
        ("slurm", slurm_problem, "LMTRAIN_REQUIRE_SLURM"),
        ("nsys", nsys_problem, "LMTRAIN_REQUIRE_NSYS"),
    ):
        if item.get_closest_marker(marker) is None:
            continue
        reason = problem()
        if reason is None:
            continue
        if _require(env):
            pytest.fail(f"{env}=1 but {reason}")
        pytest.skip(reason)


@pytest.fixture(scope="session")
def stdlib_corpus(tmp_path_factory) -> Path:
    """A small real corpus: the first characters of 48 stdlib modules as train (40) and val (8) parquet."""
    import sysconfig

    import pyarrow as pa
    import pyarrow.parquet as pq

    out = tmp_path_factory.mktemp("stdlib_corpus")
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:48]
    texts = [f.read_text(errors="replace")[:3000] for f in files]
    pq.write_table(pa.table({"text": texts[:40]}), out / "train.parquet")
    pq.write_table(pa.table({"text": texts[40:]}), out / "val.parquet")
    return out


@pytest.fixture(scope="session")
def read_losses():
    """read_losses(run_dir) -> {step: train loss} from metrics.jsonl, values as logged (NaN/inf are
    strings); a resumed run's repeated steps keep the last record."""

    def read(run_dir: Path) -> dict:
        out = {}
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            rec = json.loads(line)
            if "loss" in rec:
                out[rec["step"]] = rec["loss"]
        return out

    return read


@pytest.fixture
def shared_dir() -> Path:
    """../shared beside the checkout (notes, fixtures, scripts); skip where it is absent."""
    if not SHARED.is_dir():
        pytest.skip(f"{SHARED} is absent (it exists in development and CI, not in a user's clone)")
    return SHARED


@pytest.fixture
def nsys_fixtures(shared_dir: Path) -> Path:
    path = shared_dir / "fixtures" / "nsys"
    if not path.is_dir():
        pytest.skip(f"{path} is absent")
    return path
