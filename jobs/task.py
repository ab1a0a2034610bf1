"""What one Slurm task of an lmtrain job runs: the training command, stopped cleanly for a requeue.

    python -m jobs.task RUN_DIR        # inside an allocation (the standalone RUN/job.sbatch does this)

Standalone (RUN/job.sbatch, the default where a container runs the task or the time limit is under 10
minutes): `main` exports the torch.distributed variables (MASTER_ADDR/PORT, RANK, WORLD_SIZE,
LOCAL_RANK) of this Slurm task and runs the task command (`[nsys ...] [numactl ...] python -m
lmtrain.train --config RUN/config.yaml`) as a child process. On USR2 (Slurm's signal before the time
limit, and on preemption) or USR1 it lets the trainer save and stop, and exits with the trainer's
EXIT_REQUEUE; the batch script, outside the container, requeues the job. Nothing here needs Slurm's
tools, so an image without `scontrol` works.

Under submitit the job is a `TrainTask` (a `submitit.helpers.Checkpointable`): `__call__` does the same
and returns the run's summary.json; on the signal submitit calls `checkpoint()`, which stops the trainer
and returns the resubmission of the same task, and submitit requeues the job. submitit decides "timed
out" versus "preempted" from the elapsed time: with a time limit under 10 minutes every signal counts as
a time-out, which is why such jobs go through the batch script.

Either way the job starts again in the same run directory and resumes (`checkpoint.resume: auto`).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import submitit

from jobs.spec import EXIT_REQUEUE

# The signal Slurm sends before the time limit (#SBATCH --signal=USR2@N); the trainer saves on it.
STOP_SIGNAL = signal.SIGUSR2
# Signals that ask the task to stop for a requeue: USR1 (some sites preempt with it) is taken like USR2.
REQUEUE_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def read_summary(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    path = Path(run_dir) / "summary.json"
    if not path.is_file():
        return None
    return json.loads(path.read_text())


def export_distributed_env() -> dict[str, str]:
    """Set the torch.distributed env:// variables for this Slurm task (one task per GPU).

    CUDA_VISIBLE_DEVICES is left to Slurm (`--gpus-per-task=1` gives each task its own GPU)."""
    dist = submitit.helpers.TorchDistributedEnvironment().export(
        set_cuda_visible_devices=False, overwrite=True
    )
    return {
        "MASTER_ADDR": dist.master_addr,
        "MASTER_PORT": str(dist.master_port),
        "RANK": str(dist.rank),
        "WORLD_SIZE": str(dist.world_size),
        "LOCAL_RANK": str(dist.local_rank),
    }


def rank_command(command: list[str], local_rank: str) -> list[str]:
    """The task command of one rank: `{local_rank}` (per-rank NUMA binding) becomes the rank's number."""
    return [arg.replace("{local_rank}", local_rank) for arg in command]


class TrainTask(submitit.helpers.Checkpointable):
    """Run the task command of one run directory; checkpointable through the trainer's own checkpoints."""

    def __init__(self, run_dir: str, command: list[str], grace_s: float = 80.0) -> None:
        self.run_dir = str(run_dir)
        self.command = list(command)
        self.grace_s = float(grace_s)
        self._proc: subprocess.Popen | None = None
        self._terminated = False

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_proc"] = None
        state["_terminated"] = False
        return state

    def __call__(self) -> dict[str, Any] | None:
        env = export_distributed_env()
        restart = os.environ.get("SLURM_RESTART_COUNT", "0")
        print(
            f"lmtrain task rank {env['RANK']}/{env['WORLD_SIZE']} (restart {restart}): "
            f"{' '.join(self.command)}",
            flush=True,
        )
        # Remember a SIGTERM (otherwise ignored, as submitit does: the trainer handles it itself) so
        # that a cancelled job is not mistaken for one to requeue.
        signal.signal(signal.SIGTERM, self._on_sigterm)
        # submitit listens on USR2 only: USR1 takes the same path.
        signal.signal(signal.SIGUSR1, lambda s, f: os.kill(os.getpid(), STOP_SIGNAL))
        self._proc = subprocess.Popen(rank_command(self.command, env["LOCAL_RANK"]))
        # Poll rather than wait(): a signal handler that runs meanwhile (checkpoint) must be able to reap
        # the child, and Popen.wait() holds a lock that would make it wait out its whole timeout.
        while (rc := self._proc.poll()) is None:
            time.sleep(0.2)
        return self._finish(rc)

    def _finish(self, rc: int) -> dict[str, Any] | None:
        if rc == EXIT_REQUEUE and self._terminated:
            # SIGTERM reached the task too: scancel, or the hard time limit after the requeue window.
            # The trainer saved a checkpoint, but a cancelled job must stay cancelled; only the
            # pre-timeout/preemption signal (STOP_SIGNAL) leads to a requeue.
            print(f"lmtrain task: stopped by SIGTERM; the checkpoint in {self.run_dir} is kept", flush=True)
            raise SystemExit(EXIT_REQUEUE)
        if rc == EXIT_REQUEUE:
            # The trainer saved a checkpoint and stopped without submitit having been signalled (the
            # trainer got SIGTERM at the time limit, or a signal meant only for it): take the same path
            # as a preemption signal. On rank 0, submitit's handler checkpoints, requeues and exits;
            # the other ranks wait for the requeue to end them.
            os.kill(os.getpid(), STOP_SIGNAL)
            deadline = time.time() + 120
            while time.time() < deadline:
                time.sleep(0.5)
            raise RuntimeError(
                f"the trainer saved a checkpoint and stopped for a requeue (exit {EXIT_REQUEUE}), but the "
                f"job was not requeued; submit again with training.output_dir={self.run_dir} to resume"
            )
        if rc != 0:
            raise RuntimeError(
                f"training exited with code {rc}; see the task logs in {self.run_dir}/submitit/ "
                f"(python -m jobs.logs --run {self.run_dir})"
            )
        return read_summary(self.run_dir)

    def _on_sigterm(self, signum: int, frame: Any) -> None:  # noqa: ARG002
        self._terminated = True

    def stop_child(self) -> int | None:
        """Ask the trainer to save and stop; wait for it (at most grace_s). Returns its exit code."""
        proc = self._proc
        if proc is None or proc.poll() is not None:
            return None if proc is None else proc.returncode
        try:
            proc.send_signal(STOP_SIGNAL)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + self.grace_s
        while (rc := proc.poll()) is None:
            if time.monotonic() > deadline:
                print(f"lmtrain task: the trainer did not stop within {self.grace_s:.0f} s", flush=True)
                return None
            time.sleep(0.2)
        return rc

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        rc = self.stop_child()
        print(
            f"lmtrain task: trainer stopped (exit {rc}); requeueing to resume from its checkpoint", flush=True
        )
        return submitit.helpers.DelayedSubmission(TrainTask(self.run_dir, self.command, self.grace_s))


# --------------------------------------------------------------------------------------------------
# Standalone: `srun python -m jobs.task RUN` from RUN/job.sbatch (no submitit pickles)
# --------------------------------------------------------------------------------------------------


def load_task(run_dir: str | os.PathLike) -> tuple[TrainTask, int]:
    spec = json.loads((Path(run_dir) / "task.json").read_text())
    return TrainTask(str(run_dir), spec["command"], spec.get("grace_s", 80.0)), int(spec["max_num_timeout"])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m jobs.task RUN_DIR", file=sys.stderr)
        return 2
    task, _ = load_task(argv[0])
    env = export_distributed_env()
    received: list[str] = []

    def on_stop(signum, frame):  # noqa: ARG001
        received.append(signal.Signals(signum).name)
        task.stop_child()

    for sig in REQUEUE_SIGNALS:
        signal.signal(sig, on_stop)
    signal.signal(signal.SIGTERM, lambda s, f: None)  # the trainer handles SIGTERM itself
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    command = rank_command(task.command, env["LOCAL_RANK"])
    print(
        f"lmtrain task rank {env['RANK']}/{env['WORLD_SIZE']} (restart {restart}): {' '.join(command)}",
        flush=True,
    )
    task._proc = subprocess.Popen(command)
    while (rc := task._proc.poll()) is None:  # poll: the handler reaps the child itself
        time.sleep(0.2)
    if rc == EXIT_REQUEUE:
        why = f" on {received[0]}" if received else ""
        print(f"lmtrain task: the trainer saved a checkpoint and stopped{why} (exit {rc})", flush=True)
    elif rc != 0:
        print(
            f"lmtrain task: error: training exited with code {rc} (rank {env['RANK']})",
            file=sys.stderr,
            flush=True,
        )
    elif env["RANK"] == "0":
        print(f"lmtrain task: summary {json.dumps(read_summary(task.run_dir))}", flush=True)
    return rc


if __name__ == "__main__":
    raise SystemExit(main())
