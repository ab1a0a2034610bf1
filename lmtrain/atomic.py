"""Atomic file writes: a reader sees the old file or the new one, never half of one.

from lmtrain.atomic import atomic_write_text
atomic_write_text("runs/x/summary.md", text)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def shared_file_mode() -> int:
    """The mode `open()` gives a new file (0o666 less the umask); mkstemp's 0600 would hide it."""
    return 0o666 & ~current_umask()


def share_directory(path: str | os.PathLike) -> None:
    """Give a directory from `tempfile.mkdtemp` (0700) the mode `mkdir` would (0o777 less the umask)."""
    os.chmod(path, 0o777 & ~current_umask())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write through a temporary file in the same directory and rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, shared_file_mode())
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_savefig(fig, path: str | os.PathLike, **kwargs) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", **kwargs)
    return atomic_write_bytes(path, buf.getvalue())
