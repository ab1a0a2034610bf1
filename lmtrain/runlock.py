"""An exclusive lock on a directory for the lifetime of one process: a run directory, a `prepare --out`.

    python -c "from lmtrain.runlock import DirectoryLock; DirectoryLock('runs/x/.lock', 'run directory runs/x').acquire()"

The lock is a small JSON file created with O_EXCL (atomic on local disks and on Lustre/NFS, unlike
flock across nodes) holding the holder's host, PID, process start time and Slurm job. A second process
is refused with a message naming that holder. A lock is stale, and is taken over with a warning, when
its process is gone: the same host and no live process with that PID and start time, or the same Slurm
job on a new start (a requeued job restarts on any node with the same SLURM_JOB_ID).
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

from lmtrain.errors import UserError
from lmtrain.log import logger


def _process_start(pid: int) -> str | None:
    """The start time of `pid` in clock ticks since boot (Linux), None where it cannot be read. With
    the PID it names one process: a PID reused after a reboot or wrap-around has another start time."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]  # field 22; the command name before ")" may hold spaces


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        pass
    now = _process_start(pid)
    return start is None or now is None or now == start


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "process_start": _process_start(os.getpid()),
        "slurm_job": os.environ.get("SLURM_JOB_ID"),
        "slurm_restart": os.environ.get("SLURM_RESTART_COUNT", "0"),
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def stale_reason(holder: dict, me: dict) -> str | None:
    """Why the holder of a lock is certainly gone, or None when it may still run."""
    if holder.get("slurm_job") and holder.get("slurm_job") == me.get("slurm_job"):
        if holder.get("slurm_restart") != me.get("slurm_restart"):
            return f"Slurm job {holder['slurm_job']} was requeued"
    if holder.get("host") == me["host"] and not _alive(
        int(holder.get("pid", 0)), holder.get("process_start")
    ):
        return f"process {holder.get('pid')} is no longer running"
    return None


class DirectoryLock:
    """`with DirectoryLock(path, what):` or acquire()/release(). `what` names the locked thing in messages."""

    def __init__(self, path: str | os.PathLike, what: str):
        self.path, self.what = Path(path), what
        self.held = False

    def _create(self, me: dict) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as fh:
            fh.write(json.dumps(me) + "\n")
        return True

    def _holder(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}  # being written this instant, or damaged

    def acquire(self) -> DirectoryLock:
        me = _me()
        for _ in range(3):
            if self._create(me):
                self.held = True
                return self
            holder = self._holder()
            reason = stale_reason(holder, me) if holder else None
            if reason is None:
                if not holder and time.time() - self.path.stat().st_mtime > 60:
                    reason = "the lock file is empty or damaged"
                else:
                    break
            logger.warning("%s: removing the stale lock %s (%s)", self.what, self.path, reason)
            self.path.unlink(missing_ok=True)
        holder = self._holder()
        who = (
            f"PID {holder.get('pid')} on host {holder.get('host')}"
            + (f" (Slurm job {holder['slurm_job']})" if holder.get("slurm_job") else "")
            + f" since {holder.get('since')}"
            if holder
            else "another process"
        )
        raise UserError(
            f"{self.what} is in use by {who}: lock file {self.path}. Wait for that process to finish or stop "
            f"it; if it is no longer running anywhere, delete {self.path}"
        )

    def release(self) -> None:
        if self.held and self._holder().get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
