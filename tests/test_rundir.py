"""The run directory under abuse: occupied directories, locks, unreadable or foreign checkpoints, changed
batch shapes, signals at start-up and after the last step, kills at random moments (during saves too)."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmtrain import checkpoint as ckpt
from lmtrain.config import parse_args
from lmtrain.errors import UserError
from lmtrain.hooks import StepHooks
from lmtrain.runlock import DirectoryLock, _process_start
from lmtrain.train import EXIT_REQUEUE, exit_code, train
from tests.test_train import one_thread, tiny_args  # noqa: F401 (one_thread: an autouse fixture)

REPO = Path(__file__).resolve().parents[1]


def run(argv: list[str], hooks: StepHooks | None = None) -> dict:
    cfg, _ = parse_args(argv)
    return train(cfg, hooks)


def records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def finished(stdlib_corpus, tmp_path_factory) -> Path:
    """An uninterrupted 8-step run with checkpoints at 4 and 8."""
    out = tmp_path_factory.mktemp("finished") / "run"
    assert run(tiny_args(stdlib_corpus, out, 8))["exit_reason"] == "completed"
    return out


def copy_run(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.fixture
def sleeper():
    """A live process of this host that is not us: the holder of a lock that is still in use."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def write_lock(path: Path, pid: int) -> None:
    holder = {"host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid), "since": "then"}
    path.write_text(json.dumps(holder))


# --------------------------------------------------------------------------------- occupied directories


def test_a_new_run_into_a_directory_holding_a_run_is_refused(stdlib_corpus, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = ckpt.checkpoint_path(out, 8).read_bytes()
    with pytest.raises(UserError) as err:
        run(tiny_args(stdlib_corpus, out, 4))
    message = str(err.value)
    assert (
        f"training.output_dir {out} already holds a run (config.yaml, metrics.jsonl, summary.json" in message
    )
    assert "2 checkpoint(s) up to step 8" in message and "--checkpoint.resume auto" in message
    assert "--training.overwrite_output_dir true" in message
    assert ckpt.checkpoint_path(out, 8).read_bytes() == before  # untouched


def test_overwrite_replaces_the_previous_run(stdlib_corpus, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    summary = run(tiny_args(stdlib_corpus, out, 2, "--training.overwrite_output_dir", "true"))
    assert summary["exit_reason"] == "completed"
    assert [s for s, _ in ckpt.find_checkpoints(out)] == [2]  # the old step 4 and 8 are gone
    assert [r["step"] for r in records(out) if "loss" in r] == [1, 2]
    assert not (out / ".lock").exists()


def test_output_dir_that_is_a_file_is_a_user_error(stdlib_corpus, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file, not a directory"):
        run(tiny_args(stdlib_corpus, tmp_path / "file", 2))


def test_a_refused_run_leaves_no_half_made_directory(stdlib_corpus, tmp_path):
    argv = tiny_args(stdlib_corpus, tmp_path / "new" / "run", 2)
    argv[argv.index("--dataset") + 1] = str(tmp_path / "missing")
    with pytest.raises(UserError, match="does not exist"):
        run(argv)
    assert not (tmp_path / "new" / "run").exists()


# ----------------------------------------------------------------------------------------------- locks


def test_a_locked_run_directory_names_its_holder_and_a_stale_lock_is_taken_over(
    stdlib_corpus, finished, tmp_path, sleeper
):
    out = copy_run(finished, tmp_path / "run")
    write_lock(out / ".lock", sleeper.pid)
    argv = tiny_args(stdlib_corpus, out, 8, "--checkpoint.resume", "auto")
    with pytest.raises(UserError) as err:
        run(argv)
    assert f"is in use by PID {sleeper.pid} on host {socket.gethostname()}" in str(err.value)
    assert f"delete {out / '.lock'}" in str(err.value)
    sleeper.kill()
    sleeper.wait()
    assert run(argv)["exit_reason"] == "completed"  # its holder is gone: the lock was stale
    assert not (out / ".lock").exists()


def test_prepare_out_is_locked(tmp_path, sleeper):
    from lmtrain.data.prepare import main as prepare_main

    (tmp_path / "c.txt").write_text("<|endoftext|>".join(f"text number {i}" for i in range(10)))
    argv = ["--source", str(tmp_path / "c.txt"), "--out", str(tmp_path / "c")]
    write_lock(tmp_path / ".c.lock", sleeper.pid)
    with pytest.raises(UserError, match=f"--out {tmp_path / 'c'} is in use by PID {sleeper.pid}"):
        prepare_main(argv)
    assert not (tmp_path / "c").exists()
    sleeper.kill()
    sleeper.wait()
    assert prepare_main(argv) == 0 and (tmp_path / "c" / "prepare.json").is_file()
    assert not (tmp_path / ".c.lock").exists()


def test_two_lock_holders_exclude_each_other_and_a_requeued_job_takes_over(tmp_path, monkeypatch):
    path = tmp_path / ".lock"
    with DirectoryLock(path, "thing"):
        with pytest.raises(UserError, match=f"thing is in use by PID {os.getpid()}"):
            DirectoryLock(path, "thing").acquire()
    assert not path.exists()
    # A requeued Slurm job restarts (maybe on another node) with the same job id and a new restart count.
    path.write_text(json.dumps({"host": "nid001234", "pid": 1, "slurm_job": "77", "slurm_restart": "0"}))
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    with DirectoryLock(path, "thing") as lock:
        assert lock.held
    monkeypatch.setenv("SLURM_JOB_ID", "78")  # another job's lock on another node: may be alive
    path.write_text(json.dumps({"host": "nid001234", "pid": 1, "slurm_job": "77", "slurm_restart": "0"}))
    with pytest.raises(UserError, match="PID 1 on host nid001234 \\(Slurm job 77\\)"):
        DirectoryLock(path, "thing").acquire()


# ------------------------------------------------------------------------------------------ resuming


def test_all_unreadable_checkpoints_with_resume_auto_fail_listing_them(stdlib_corpus, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    for _, path in ckpt.find_checkpoints(out):
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(UserError) as err:
        run(tiny_args(stdlib_corpus, out, 8, "--checkpoint.resume", "auto"))
    assert "none of the 2 checkpoints" in str(err.value)
    assert "step-00000004.pt: " in str(err.value) and "step-00000008.pt: " in str(err.value)


def test_corrupt_file_given_to_resume_is_a_user_error(stdlib_corpus, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x80\x02not a zip")
    with pytest.raises(UserError, match="bad.pt is not a readable checkpoint"):
        run(tiny_args(stdlib_corpus, tmp_path / "run", 2, "--checkpoint.resume", str(bad)))


def test_a_rejected_resume_leaves_config_yaml_unchanged(stdlib_corpus, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    before = (out / "config.yaml").read_text()
    with pytest.raises(UserError, match="written for model"):
        run(tiny_args(stdlib_corpus, out, 8, "--model.dim", "64", "--checkpoint.resume", "auto"))
    assert (out / "config.yaml").read_text() == before  # so the error's advice (use it) still works
    summary = run(["--config", str(out / "config.yaml"), "--training.output_dir", str(out),
                   "--checkpoint.resume", "auto", "--training-steps", "9"])  # fmt: skip
    assert summary["resumed_from"] == 8 and summary["steps"] == 9


def test_resume_with_another_batch_shape_needs_a_flag(stdlib_corpus, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    argv = tiny_args(stdlib_corpus, out, 10, "--batch-size", "8", "--checkpoint.resume", "auto")
    with pytest.raises(UserError) as err:
        run(argv)
    message = str(err.value)
    assert "data.batch_size, data.sequence_length, training.grad_accumulation_steps = [4, 32, 1]" in message
    assert "(128 tokens per step and process), this run has [8, 32, 1] (256)" in message
    assert "--checkpoint.allow_batch_change true" in message
    summary = run([*argv, "--checkpoint.allow_batch_change", "true"])
    assert summary["resumed_from"] == 8 and summary["exit_reason"] == "completed"
    longer = tiny_args(stdlib_corpus, out, 12, "--sequence-length", "48", "--checkpoint.resume", "auto")
    with pytest.raises(UserError, match=r"this run has \[4, 48, 1\]"):
        run(longer)
    assert run([*longer, "--checkpoint.allow_batch_change", "true"])["steps"] == 12  # RoPE tables grow


def test_resume_removes_stale_temporaries_and_logs_each_step_once(stdlib_corpus, finished, tmp_path):
    out = copy_run(finished, tmp_path / "run")
    stale = ckpt.checkpoint_dir(out) / ".step-00000012.pt.tmp-4242"
    stale.write_bytes(b"half")
    ckpt.checkpoint_path(out, 8).unlink()  # as if killed after logging steps 5-8 but before saving step 8
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9, "loss": 1.0')  # a line cut by the kill
    run(tiny_args(stdlib_corpus, out, 8, "--checkpoint.resume", "auto"))
    assert not stale.exists()
    logged = [(r["step"], "loss" in r) for r in records(out)]
    assert len(logged) == len(set(logged))  # steps 5-8 and the final validation loss once each
    assert [s for s, is_loss in logged if is_loss] == list(range(1, 9))


# -------------------------------------------------------------------------------------------- signals


class SignalAfterTheLoop(StepHooks):
    """Sends SIGTERM to this process when the step loop closes its hooks, i.e. after the last step."""

    def close(self) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_a_signal_after_the_last_step_exits_for_requeue_and_the_requeued_job_finishes(
    stdlib_corpus, tmp_path
):
    out = tmp_path / "run"
    summary = run(tiny_args(stdlib_corpus, out, 3), hooks=SignalAfterTheLoop())
    assert summary["exit_reason"] == "signal" and exit_code(summary) == EXIT_REQUEUE
    assert [s for s, _ in ckpt.find_checkpoints(out)] == [3]  # the final checkpoint is there
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the summary
    requeued = run(tiny_args(stdlib_corpus, out, 3, "--checkpoint.resume", "auto"))
    assert requeued["exit_reason"] == "completed" and requeued["final_val_loss"] == summary["final_val_loss"]
    assert sum("val_loss" in r for r in records(out)) == 1  # the final evaluation is not logged twice


@pytest.mark.slow
def test_a_signal_during_start_up_saves_and_exits_85(stdlib_corpus, tmp_path):
    """The signal arrives as soon as the run directory is locked, before the model or data exist."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "lmtrain.train", *tiny_args(stdlib_corpus, out, 4)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    deadline = time.time() + 120
    while not (out / "train.log").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_REQUEUE, err.decode()[-2000:]
    assert "during start-up: saving at step 0" in (out / "train.log").read_text()
    saved = ckpt.find_checkpoints(out)
    assert saved and ckpt.load_checkpoint(saved[-1][1])["step"] == saved[-1][0]
    assert run(tiny_args(stdlib_corpus, out, 4, "--checkpoint.resume", "auto"))["exit_reason"] == "completed"


# ---------------------------------------------------------------------------- kills at random moments


def kill_plan(seed: int, kills: int) -> list[tuple[str, float]]:
    """(how, when): "save" kills as soon as a checkpoint's temporary file appears, "time" at a delay."""
    rng = random.Random(seed)
    return [("save", 0.0) if rng.random() < 0.5 else ("time", rng.uniform(0.0, 2.0)) for _ in range(kills)]


@pytest.mark.slow
def test_random_sigkills_then_resume_reproduce_the_uninterrupted_run(stdlib_corpus, tmp_path, read_losses):
    """SIGKILL at random moments (half of them while a checkpoint is being written), resume each time: the
    run ends with the same losses as an uninterrupted one, each step logged once, no temporary left."""
    steps = 10
    # A model of about 1.7M parameters: its checkpoint (with AdamW's moments, ~20 MB) takes long enough
    # to write that the poll below sees the temporary file; the tiny model's is written in under 1 ms.
    wider = ["--model.dim", "256", "--model.n_layers", "2", "--model.n_heads", "4", "--model.n_kv_heads", "2",
             "--model.multiple_of", "256"]  # fmt: skip
    reference = tmp_path / "reference"
    run(tiny_args(stdlib_corpus, reference, steps, "--checkpoint.interval", "1", *wider))
    out = tmp_path / "run"
    argv = tiny_args(
        stdlib_corpus, out, steps, "--checkpoint.interval", "1", "--checkpoint.resume", "auto", *wider
    )
    during_save = 0
    for how, delay in kill_plan(seed=2, kills=4):
        proc = subprocess.Popen([sys.executable, "-m", "lmtrain.train", *argv], cwd=REPO,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        started, log_size = time.time(), log_bytes(out)
        logging_since = None  # when this process first wrote to train.log: its start-up is under way
        while proc.poll() is None and time.time() - started < 120:
            if how == "save" and any(ckpt.checkpoint_dir(out).glob(".step-*.tmp-*")):
                during_save += 1
                break
            if logging_since is None and log_bytes(out) > log_size:
                logging_since = time.time()
            if how == "time" and logging_since is not None and time.time() - logging_since > delay:
                break
        proc.kill()
        proc.wait()
    summary = run(argv)
    assert summary["exit_reason"] == "completed" and summary["steps"] == steps
    assert read_losses(out) == read_losses(reference)
    logged = [r["step"] for r in records(out) if "loss" in r]
    assert logged == list(range(1, steps + 1))
    assert not list(ckpt.checkpoint_dir(out).glob(".*tmp*"))
    assert during_save >= 1, "no kill landed inside a save"
    print(f"{during_save} of 4 kills during a save")


def log_bytes(run_dir: Path) -> int:
    path = run_dir / "train.log"
    return path.stat().st_size if path.exists() else 0


def test_a_parquet_without_the_text_column_points_train_users_to_prepare(stdlib_corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a document"] * 8}), tmp_path / "data.parquet")
    argv = tiny_args(stdlib_corpus, tmp_path / "run", 2)
    argv[argv.index("--dataset") + 1] = str(tmp_path / "data.parquet")
    with pytest.raises(UserError) as err:
        run(argv)
    message = str(err.value)
    assert "has no column 'text'; its columns are ['content']" in message
    assert f"lmtrain prepare --source {tmp_path / 'data.parquet'} --text-field NAME --out DIR" in message
    assert not (tmp_path / "run").exists()
