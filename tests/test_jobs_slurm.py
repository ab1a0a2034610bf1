"""The launcher against a real Slurm (the local cluster of ../shared/slurm): submitit round trip, ranks,
cancellation, the standalone sbatch script, `sbatch --test-only` of the clariden script, and requeue
after a real time limit. The task here is tests/stepcounter_trainer.py (same signal/exit contract as the
trainer, no torch); tests/test_jobs_train_slurm.py runs the real trainer.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import submitit

from jobs.cancel import cancel
from jobs.submit import make_executor, prepare, submit, write_run
from jobs.task import TrainTask

pytestmark = pytest.mark.slurm
REPO = Path(__file__).resolve().parents[1]
COUNTER = str(REPO / "tests" / "stepcounter_trainer.py")


@pytest.fixture(autouse=True)
def jobs_index(tmp_path, monkeypatch):
    monkeypatch.setenv("LMTRAIN_JOBS_INDEX", str(tmp_path / "jobs.jsonl"))


def local_run(tmp_path, overrides=()):
    # The task is the step counter: the dataset only has to exist for the launcher's checks.
    over = [f"job.output_root={tmp_path / 'runs'}", f"data.dataset={tmp_path}", *overrides]
    return prepare("smoke", "local", over)


def submit_counter(run, steps, dt):
    write_run(run)
    command = [sys.executable, COUNTER, run.plan.run_dir, str(steps), str(dt)]
    return make_executor(run.plan).submit(TrainTask(run.plan.run_dir, command, grace_s=20))


def wait_state(job, states, timeout=90):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = job.get_info(mode="force").get("State", "")
        if state in states:
            return state
        time.sleep(0.5)
    raise AssertionError(f"job {job.job_id} never reached {states}; last state {state}")


def result_within(job, timeout):
    box = {}

    def target():
        try:
            box["value"] = job.results()[0]  # rank 0's return value
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(timeout)
    assert not t.is_alive(), f"job.result() of {job.job_id} still blocked after {timeout} s"
    return box


def node_size() -> tuple[int, int]:
    out = subprocess.run(["sinfo", "-h", "-o", "%c %m"], capture_output=True, text=True, check=True)
    cpus, mem = out.stdout.split()[:2]
    return int(cpus.rstrip("+")), int(mem.rstrip("+"))


def test_submit_returns_the_summary_through_submitit(tmp_path):
    run = local_run(tmp_path)
    job = submit_counter(run, steps=3, dt=0.01)
    summary = result_within(job, 120)["value"]
    assert summary["steps"] == 3 and summary["exit_reason"] == "completed"
    assert summary["env"]["RANK"] == "0" and summary["env"]["WORLD_SIZE"] == "1"
    assert wait_state(job, {"COMPLETED", "FAILED"}) == "COMPLETED"  # state caches: ask Slurm again
    log = Path(run.plan.run_dir, "submitit", f"{job.job_id}_0_log.out").read_text()
    assert "lmtrain task rank 0/1" in log


def test_two_tasks_get_their_ranks(tmp_path):
    run = local_run(tmp_path, ["job.tasks_per_node=2", "job.cpus_per_task=1"])
    assert run.plan.world_size == 2
    job = submit_counter(run, steps=2, dt=0.01)
    box = result_within(job, 120)
    assert "value" in box, box
    summary = box["value"]
    wait_state(job, {"COMPLETED"})
    other = json.loads(Path(run.plan.run_dir, "summary-rank1.json").read_text())
    assert (summary["env"]["RANK"], other["env"]["RANK"]) == ("0", "1")
    assert summary["env"]["WORLD_SIZE"] == other["env"]["WORLD_SIZE"] == "2"
    assert other["env"]["LOCAL_RANK"] == "1"
    assert summary["env"]["MASTER_ADDR"] == other["env"]["MASTER_ADDR"]
    assert summary["env"]["MASTER_PORT"] == other["env"]["MASTER_PORT"]


def test_cancelled_job_reports_cancelled_not_a_hang(tmp_path):
    run = local_run(tmp_path)
    job = submit_counter(run, steps=10_000, dt=0.1)
    wait_state(job, {"RUNNING"})
    assert cancel(str(job.job_id)) == "CANCELLED"
    assert job.get_info(mode="force")["State"].startswith("CANCELLED")
    box = result_within(job, 60)
    assert isinstance(box.get("error"), submitit.core.utils.UncompletedJobError)


def test_cancel_rejects_bad_job_ids():
    from lmtrain.errors import UserError

    with pytest.raises(UserError, match="not a Slurm job id"):
        cancel("12; rm -rf /")


def test_standalone_sbatch_script_runs_the_task(tmp_path):
    run = local_run(tmp_path)
    run_dir = write_run(run)
    task = json.loads((run_dir / "task.json").read_text())
    task["command"] = [sys.executable, COUNTER, str(run_dir), "2", "0.01"]
    (run_dir / "task.json").write_text(json.dumps(task))
    out = subprocess.run(
        ["sbatch", "--parsable", str(run_dir / "job.sbatch")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    job_id = out.stdout.strip().split(";")[0]
    job = submitit.SlurmJob(folder=run_dir / "submitit", job_id=job_id)
    assert wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=120) == "COMPLETED"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["env"]["WORLD_SIZE"] == "1"
    assert "lmtrain task: summary" in (run_dir / "submitit" / f"{job_id}_0_log.out").read_text()


def test_clariden_script_passes_sbatch_test_only(tmp_path):
    cpus, mem = node_size()
    overrides = [f"job.output_root={tmp_path / 'runs'}"]
    if cpus < 288 or mem < 460000:
        # Not a GH200-shaped node (start the cluster with SLURM_LOCAL_CPUS=288 SLURM_LOCAL_MEM_MB=460000 for
        # the unscaled request): keep the layout (4 tasks, 4 GPUs), scale CPUs and memory to this node.
        # With fewer than 4 CPUs, fewer tasks (still one per GPU) fit.
        tasks = min(4, cpus)
        overrides += [f"job.gpus_per_node={tasks}", f"job.tasks_per_node={tasks}"]
        overrides += [f"job.cpus_per_task={max(1, cpus // tasks)}", f"job.mem_mb={mem}"]
    run = prepare("fused", "clariden", overrides, account="a-large-sc", dry_run=True)
    assert run.plan.edf and run.plan.gpus_per_task == 1
    run_dir = write_run(run)
    out = subprocess.run(
        ["sbatch", "--test-only", str(run_dir / "job.sbatch")], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "to start at" in out.stderr
    too_big = subprocess.run(
        ["sbatch", "--test-only", "--gpus-per-node=5", str(run_dir / "job.sbatch")],
        capture_output=True,
        text=True,
    )
    assert too_big.returncode != 0  # the check is real: an impossible request fails


def test_submit_records_the_run(tmp_path):
    run = local_run(tmp_path)
    job = submit(run)  # the real trainer on a directory that is no corpus: it fails, which is fine here
    entry = json.loads(Path(run.plan.run_dir, "job.json").read_text())
    assert entry["job_id"] == str(job.job_id) and entry["experiment"] == "smoke"
    index = [json.loads(line) for line in Path(tmp_path / "jobs.jsonl").read_text().splitlines()]
    assert index[-1]["run_dir"] == run.plan.run_dir
    cancel(str(job.job_id))
    env = {**os.environ, "LMTRAIN_JOBS_INDEX": str(tmp_path / "jobs.jsonl")}
    status = subprocess.run(
        [sys.executable, "-m", "jobs.status"], cwd=REPO, capture_output=True, text=True, env=env
    )
    assert status.returncode == 0, status.stderr
    line = next(x for x in status.stdout.splitlines() if x.strip().startswith(str(job.job_id)))
    assert "smoke" in line and run.plan.run_dir in line and ("CANCELLED" in line or "FAILED" in line)


@pytest.mark.slow
def test_time_limit_requeues_and_resumes(tmp_path):
    """A 2-minute time limit: Slurm signals 30 s before it (its checks run every 30 s, so the signal comes
    30-90 s into the job), the task checkpoints, submitit requeues. (With a 1-minute limit the signal can
    arrive while Python is still starting, before any handler exists, and kill the task.)"""
    run = local_run(tmp_path, ["job.time=2", "job.signal_delay_s=30", "job.max_num_timeout=6"])
    steps, dt = 250, 0.4  # 100 s of work: more than the first allocation can give before the signal
    job = submit_counter(run, steps, dt)
    box = result_within(job, 330)
    assert "value" in box, box
    summary = box["value"]
    assert summary["steps"] == steps
    assert len(summary["segments"]) >= 2 and summary["segments"][0] == 0 and summary["segments"][-1] >= 1
    acc = 1.0
    for step in range(1, steps + 1):  # the uninterrupted value
        acc = (acc * 1.000123 + step * 1e-4) % 1000
    assert summary["final_train_loss"] == pytest.approx(acc, rel=0, abs=0)
    log = "".join(p.read_text() for p in Path(run.plan.run_dir, "submitit").glob("*_0_log.out"))
    assert "requeueing to resume" in log
