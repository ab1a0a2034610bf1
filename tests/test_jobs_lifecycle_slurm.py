"""A job's life on the local Slurm, as a user lives it: requeues owned by the batch script until they run
out, `make resume`, a failed job's cause in --wait/status/logs, cancelling an unknown job, an EDF in
CSCS's form, and `make submit EXP=smoke` on a fresh checkout (the corpus built on the way).

The requeue tests run tests/stepcounter_trainer.py (the trainer's signal/exit contract without torch);
the failure and fresh-checkout tests run the real trainer.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from jobs.submit import prepare, write_run

REPO = Path(__file__).resolve().parents[1]
COUNTER = str(REPO / "tests" / "stepcounter_trainer.py")
pytestmark = pytest.mark.slurm


@pytest.fixture(autouse=True)
def own_jobs_index(tmp_path, monkeypatch):
    """Each test records its submissions in its own index (what make status and make logs read)."""
    monkeypatch.setenv("LMTRAIN_JOBS_INDEX", str(tmp_path / "jobs.jsonl"))
    yield tmp_path / "jobs.jsonl"


def env_with_index(tmp_path) -> dict:
    return {**os.environ, "LMTRAIN_JOBS_INDEX": str(tmp_path / "jobs.jsonl"), "PYTHONPATH": str(REPO)}


def jobs_cli(tmp_path, module, *argv, timeout=600):
    return subprocess.run(
        [sys.executable, "-m", module, *argv], cwd=REPO, capture_output=True, text=True,
        env=env_with_index(tmp_path), timeout=timeout,
    )  # fmt: skip


def counter_run(tmp_path, steps, dt, overrides=()):
    """A local run directory whose task is the step counter, submitted as its own job.sbatch."""
    over = [f"job.output_root={tmp_path / 'runs'}", f"data.dataset={tmp_path}", *overrides]
    run = prepare("smoke", "local", over)
    run_dir = write_run(run)
    task = json.loads((run_dir / "task.json").read_text())
    task["command"] = [sys.executable, COUNTER, str(run_dir), str(steps), str(dt)]
    (run_dir / "task.json").write_text(json.dumps(task))
    return run, run_dir


def state_of(job_id: str) -> str:
    from jobs.status import job_states

    return job_states([job_id]).get(job_id, "?")


def wait_final(job_id: str, timeout: float) -> str:
    from jobs.status import FINAL_STATES

    deadline = time.time() + timeout
    while time.time() < deadline:
        state = state_of(job_id)
        if state.startswith(FINAL_STATES):
            return state
        time.sleep(1)
    raise AssertionError(f"job {job_id} did not end within {timeout} s (last state {state})")


def uninterrupted(steps: int) -> float:
    acc = 1.0
    for step in range(1, steps + 1):
        acc = (acc * 1.000123 + step * 1e-4) % 1000
    return acc


@pytest.mark.slow
def test_batch_script_requeues_until_the_time_outs_run_out_then_make_resume_finishes(tmp_path):
    """2-minute limit, one time-out requeue allowed: the batch shell (not the task) requeues once on exit
    85, the second time-out ends the job with the resume command; `jobs.submit --resume` (make resume)
    with a longer limit finishes the run in its own directory to the uninterrupted result."""
    from jobs.submit import record_job

    steps, dt = 200, 1.0  # 200 s of work: more than two allocations give before their signals (<= 90 s each)
    run, run_dir = counter_run(
        tmp_path, steps, dt, ["job.time=2", "job.signal_delay_s=30", "job.max_num_timeout=1"]
    )
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(run_dir / "job.sbatch")], capture_output=True, text=True, check=True
    ).stdout.strip()
    record_job(job_id, "smoke", "local", str(run_dir), str(run_dir / "submitit"), "sbatch")
    assert wait_final(job_id, 420) == "FAILED"
    requeues = (run_dir / "requeues.log").read_text().splitlines()
    assert len(requeues) == 1 and requeues[0].startswith(f"timeout job={job_id} restart=0 ")
    out = (run_dir / "submitit" / f"{job_id}_0_log.out").read_text()
    assert (
        f"lmtrain: the trainer saved a checkpoint (timeout); requeueing job {job_id}" in out
    )  # the batch shell
    assert "(restart 1)" in out
    err = (run_dir / "submitit" / f"{job_id}_0_log.err").read_text()
    assert (
        f"lmtrain: error: 1 time-out requeues used up; the checkpoint is kept: make resume RUN={run_dir}"
        in err
    )
    state = json.loads((run_dir / "state-0.json").read_text())
    assert 0 < state["step"] < steps and state["segments"] == [0, 1]

    status = jobs_cli(tmp_path, "jobs.status")
    assert status.returncode == 0, status.stderr
    assert "cause (rank 0): lmtrain: error: 1 time-out requeues used up" in status.stdout

    resumed = jobs_cli(tmp_path, "jobs.submit", "--resume", str(run_dir), "job.time=00:10:00", "--wait")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumes {run_dir}" in resumed.stdout
    summary = json.loads(resumed.stdout[resumed.stdout.index("{") :])
    assert summary["steps"] == steps and summary["segments"] == [0, 1, 0]
    assert summary["final_train_loss"] == pytest.approx(uninterrupted(steps), rel=0, abs=0)
    entries = [json.loads(x) for x in (tmp_path / "jobs.jsonl").read_text().splitlines()]
    assert (
        entries[-1]["run_dir"] == str(run_dir) and entries[-1]["resumed"] is True
    )  # make status/logs know it
    again = jobs_cli(tmp_path, "jobs.submit", "--resume", str(run_dir))
    assert again.returncode == 2 and "has finished" in again.stderr


@pytest.mark.slow
def test_a_failed_job_shows_its_cause_in_wait_status_and_logs(tmp_path):
    """The real trainer on a directory that is no corpus: --wait, make status and make logs name why."""
    bad = tmp_path / "not-a-corpus"
    bad.mkdir()
    out = jobs_cli(
        tmp_path, "jobs.submit", "--exp", "smoke", "--cluster", "local", "--wait",
        f"job.output_root={tmp_path / 'runs'}", f"data.dataset={bad}", "training.steps=2",
    )  # fmt: skip
    assert out.returncode == 2, out.stdout + out.stderr
    last = out.stderr.strip().splitlines()
    head = next(line for line in last if line.startswith("error: job "))
    assert " FAILED: " in head and "(rank 0)" in head
    assert "training exited with code" not in head  # the trainer's own error line, not the task's report
    assert "--- tail of " in out.stderr and "_0_log.err" in out.stderr
    status = jobs_cli(tmp_path, "jobs.status")
    assert "FAILED" in status.stdout and "cause (rank 0): " in status.stdout
    (run_dir,) = list((tmp_path / "runs" / "smoke").iterdir())
    logs = jobs_cli(tmp_path, "jobs.logs", "--run", str(run_dir), "--err", "--rank", "all")
    assert logs.returncode == 0, logs.stderr
    assert "_0_log.err <==" in logs.stdout and "FAILED: " in logs.stdout
    bad_rank = jobs_cli(tmp_path, "jobs.logs", "--run", str(run_dir), "--rank", "first")
    assert bad_rank.returncode == 2 and "--rank 'first': give a task rank" in bad_rank.stderr


def test_cancelling_an_unknown_job_says_so_at_once(tmp_path):
    start = time.monotonic()
    out = jobs_cli(tmp_path, "jobs.cancel", "987654321", timeout=60)
    assert out.returncode == 2
    assert "job 987654321 is not known to Slurm: nothing cancelled" in out.stderr
    assert time.monotonic() - start < 20


@pytest.mark.slow
def test_resume_and_cancel_refuse_a_running_job_and_an_ended_one(tmp_path):
    from jobs.submit import record_job

    run, run_dir = counter_run(tmp_path, 10_000, 0.1)
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(run_dir / "job.sbatch")], capture_output=True, text=True, check=True
    ).stdout.strip()
    record_job(job_id, "smoke", "local", str(run_dir), str(run_dir / "submitit"), "sbatch")
    running = jobs_cli(tmp_path, "jobs.submit", "--resume", str(run_dir))
    assert running.returncode == 2
    assert (
        f"job {job_id} of {run_dir} is still " in running.stderr
        and f"make cancel JOB={job_id}" in running.stderr
    )
    cancelled = jobs_cli(tmp_path, "jobs.cancel", job_id)
    assert cancelled.returncode == 0 and f"job {job_id}: CANCELLED" in cancelled.stdout
    again = jobs_cli(tmp_path, "jobs.cancel", job_id)
    assert (
        again.returncode == 2
        and f"job {job_id} has already ended (CANCELLED): nothing to cancel" in again.stderr
    )
    bad_time = jobs_cli(tmp_path, "jobs.submit", "--resume", str(run_dir), "job.time=2h")
    assert bad_time.returncode == 2 and "job.time = '2h' is not a Slurm time limit" in bad_time.stderr


def test_resume_refuses_what_it_cannot_resume(tmp_path):
    out = jobs_cli(tmp_path, "jobs.submit", "--resume", str(tmp_path))
    assert out.returncode == 2 and "is not a submitted run directory (no job.json)" in out.stderr
    empty = jobs_cli(tmp_path, "jobs.submit", "--resume", "")
    assert empty.returncode == 2 and "no run directory to resume: make resume RUN=<run dir>" in empty.stderr
    extra = jobs_cli(tmp_path, "jobs.submit", "--resume", str(tmp_path), "optim.lr=1")
    assert extra.returncode == 2 and "takes job.time=HH:MM:SS and --wait, not optim.lr=1" in extra.stderr


def test_a_job_with_an_edf_in_cscs_form_runs(tmp_path):
    """An EDF as CSCS's docs write it (unquoted dotted annotations, bare mounts) passes the checks, and the
    job's env.toml, passed to srun --environment (accepted by the local SPANK stub), runs the task."""
    edf = tmp_path / "cscs.toml"
    edf.write_text(
        'image = "nvcr.io#nvidia/pytorch:25.01-py3"\n'
        f'mounts = ["{tmp_path}"]\n'
        'workdir = "/workspace"\n\n'
        "[annotations]\n"
        'com.hooks.aws_ofi_nccl.enabled = "true"\n'
        'com.hooks.aws_ofi_nccl.variant = "cuda12"\n'
    )
    run, run_dir = counter_run(tmp_path, 2, 0.01, [f"job.environment={edf}"])
    assert run.plan.edf == f"{run_dir}/env.toml"
    import tomllib

    written = tomllib.loads((run_dir / "env.toml").read_text())
    assert written["annotations"] == {
        "com.hooks.aws_ofi_nccl.enabled": "true",
        "com.hooks.aws_ofi_nccl.variant": "cuda12",
    }
    assert f"--environment={run_dir}/env.toml" in (run_dir / "job.sbatch").read_text()
    job_id = subprocess.run(
        ["sbatch", "--parsable", str(run_dir / "job.sbatch")], capture_output=True, text=True
    )
    assert job_id.returncode == 0, job_id.stderr
    assert wait_final(job_id.stdout.strip(), 120) == "COMPLETED"
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 2


def fresh_checkout(tmp_path) -> Path:
    """The tracked and new files of this checkout, without data/, runs/ or a virtualenv."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO, capture_output=True, check=True,
    ).stdout.decode().split("\0")  # fmt: skip
    dest = tmp_path / "lmtrain"
    for name in filter(None, listed):
        src = REPO / name
        if src.is_file() and not name.startswith(("data/", "runs/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name, follow_symlinks=False)
    (tmp_path / "stamp").touch()  # newer than pyproject.toml: make's setup is done (this venv has lmtrain)
    return dest


def make(checkout: Path, tmp_path: Path, *targets: str, timeout=900):
    """`make TARGET` as a user's shell runs it: a top-level make, even when the suite itself runs under
    `make test` (whose MAKELEVEL would make it print `make[1]: ***`)."""
    venv = Path(sys.executable).parent.parent
    env = {k: v for k, v in env_with_index(tmp_path).items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    return subprocess.run(
        ["make", "-s", *targets, f"STAMP={tmp_path / 'stamp'}"], cwd=checkout, capture_output=True,
        text=True, timeout=timeout, env={**env, "VIRTUAL_ENV": str(venv), "PYTHONPATH": str(checkout)},
    )  # fmt: skip


@pytest.mark.slow
def test_fresh_checkout_corpus_failure_names_the_command_in_make(tmp_path):
    checkout = fresh_checkout(tmp_path)
    (checkout / "data").write_text("a file where the corpus directory should go\n")
    out = make(checkout, tmp_path, "dry-run", "EXP=smoke", "CLUSTER=local")
    assert out.returncode != 0
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("make: ***")
    assert lines[-2].startswith("error: building data/stdlib failed (")
    assert (
        "build it by hand: lmtrain prepare --source stdlib --tokenizer bpe:8192 --pretokenize --out data/stdlib"
        in lines[-2]
    )


@pytest.mark.slow
def test_make_submit_smoke_on_a_fresh_checkout_builds_the_corpus_and_trains(tmp_path):
    checkout = fresh_checkout(tmp_path)
    assert not (checkout / "data").exists()
    args = f"--wait job.output_root={tmp_path / 'runs'} training.steps=2 training.eval_batches=1 data.batch_size=2"
    out = make(checkout, tmp_path, "submit", "EXP=smoke", "CLUSTER=local", f"ARGS={args}")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert (
        "building the embedded corpus data/stdlib that smoke trains on (once): lmtrain prepare" in out.stdout
    )
    assert (checkout / "data" / "stdlib" / "prepare.json").is_file()
    summary = json.loads(out.stdout[out.stdout.index("{") :])
    assert summary["exit_reason"] == "completed" and summary["steps"] == 2
    status = make(checkout, tmp_path, "status")
    assert status.returncode == 0 and "COMPLETED" in status.stdout and "smoke" in status.stdout
