"""The real trainer through the launcher on the local Slurm: the smoke experiment returns its final loss,
two tasks train together over gloo, and a preempted job resumes to the same final loss as an
uninterrupted run. (The time-limit path itself is in tests/test_jobs_slurm.py.)
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.submit import prepare, submit
from lmtrain.config import load_config

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[1]
# A tiny, short run: the launcher is under test, not the model.
TINY = [
    "data.sequence_length=32",
    "data.batch_size=2",
    "checkpoint.interval=0",
    "training.eval_batches=1",
    "logging.frequency=1",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    out = tmp_path_factory.mktemp("corpus") / "stdlib"
    done = subprocess.run(
        [sys.executable, "-m", "lmtrain", "prepare", "--source", "stdlib", "--out", str(out),
         "--tokenizer", "byte", "--max-documents", "20", "--val-fraction", "0.25"],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return out


@pytest.fixture(autouse=True)
def jobs_index(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_JOBS_INDEX", str(tmp_path / "jobs.jsonl"))


def test_smoke_experiment_trains_and_returns_its_final_loss(tmp_path, corpus):
    env = {**os.environ, "LMTRAIN_JOBS_INDEX": str(tmp_path / "jobs.jsonl")}
    out = subprocess.run(
        [sys.executable, "-m", "jobs.submit", "--exp", "smoke", "--cluster", "local", "--wait",
         f"job.output_root={tmp_path}", f"data.dataset={corpus}", "training.steps=3", *TINY],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout[out.stdout.index("{") :])
    assert summary["exit_reason"] == "completed" and summary["steps"] == 3
    assert math.isfinite(summary["final_train_loss"])
    (run_dir,) = list((tmp_path / "smoke").iterdir())
    assert summary["run_dir"] == str(run_dir)
    assert load_config(run_dir / "config.yaml").training.output_dir == str(run_dir)


def test_two_tasks_train_together_with_gloo(tmp_path, corpus):
    run = prepare(
        "smoke", "local",
        [f"job.output_root={tmp_path}", f"data.dataset={corpus}", "training.steps=2", "job.tasks_per_node=2",
         "job.cpus_per_task=1", "distributed.backend=gloo", *TINY],
    )  # fmt: skip
    job = submit(run)
    summary = job.results()[0]
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert math.isfinite(summary["final_train_loss"])
    log = Path(run.plan.run_dir, "submitit", f"{job.job_id}_1_log.out").read_text()
    assert "lmtrain task rank 1/2" in log


def test_preempted_job_resumes_to_the_same_final_loss(tmp_path, corpus):
    steps = 40
    over = [f"data.dataset={corpus}", f"training.steps={steps}", *TINY]
    run = prepare("smoke", "local", [f"job.output_root={tmp_path / 'slurm'}", *over])
    job = submit(run)
    # The uninterrupted reference, meanwhile, outside Slurm with the same resolved config.
    ref = prepare("smoke", "local", [f"job.output_root={tmp_path / 'ref'}", *over], dry_run=True)
    from jobs.submit import write_run

    ref_dir = write_run(ref)
    reference = subprocess.Popen(
        [sys.executable, "-m", "lmtrain.train", "--config", str(ref_dir / "config.yaml")],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    metrics = Path(run.plan.run_dir, "metrics.jsonl")
    deadline = time.time() + 400
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.5)
    assert metrics.is_file(), "the job never logged a training step"
    job._interrupt()  # scancel --signal=USR2: what Slurm sends on preemption and before the time limit
    summary = job.results()[0]
    assert reference.wait(timeout=600) == 0
    expected = json.loads((ref_dir / "summary.json").read_text())
    assert summary["exit_reason"] == "completed" and summary["steps"] == steps
    assert summary["resumed_from"], "the job was not interrupted and resumed"
    assert summary["final_train_loss"] == pytest.approx(expected["final_train_loss"], rel=1e-6)
    logs = "".join(p.read_text() for p in Path(run.plan.run_dir, "submitit").glob("*_0_log.out"))
    assert "requeueing to resume" in logs and "(restart 1)" in logs


def test_job_array_trains_one_run_per_value(tmp_path, corpus):
    from jobs.logs import main as logs_main
    from jobs.submit import prepare_array, submit_array

    over = [f"job.output_root={tmp_path}", f"data.dataset={corpus}", "training.steps=2", *TINY]
    runs = prepare_array("smoke", "local", over, ["optim.lr=1e-3,1e-2"])
    jobs = submit_array(runs)
    assert len({j.job_id.split("_")[0] for j in jobs}) == 1  # one Slurm array
    summaries = [j.results()[0] for j in jobs]
    assert [s["run_dir"] for s in summaries] == [r.plan.run_dir for r in runs]
    assert all(s["steps"] == 2 and math.isfinite(s["final_train_loss"]) for s in summaries)
    assert summaries[0]["final_train_loss"] != summaries[1]["final_train_loss"]  # the lr differs
    assert logs_main(["--exp", "smoke"]) == 0  # the newest run's log, found in the array's log folder
