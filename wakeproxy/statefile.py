"""Small state files the proxy keeps across restarts (what it learned): read with
bounds, written atomically. Both block: call them in a thread, never on the loop."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path


class StateFileRefused(OSError):
    """The path is not a regular file of a sane size (a FIFO, a device, a huge file)."""


def read_bounded(path: str, limit: int) -> bytes:
    """The file's bytes. Refused: anything but a regular file (opened without blocking,
    so a FIFO cannot hang the reader; a symlink is followed to what it names and that
    is checked), or one over ``limit`` bytes (checked before reading, and again while
    reading: the file may grow)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StateFileRefused(f"{path} is not a regular file")
        if info.st_size > limit:
            raise StateFileRefused(f"{path} is {info.st_size} bytes (at most {limit} are read)")
        with os.fdopen(fd, "rb", closefd=False) as stream:
            data = stream.read(limit + 1)
        if len(data) > limit:
            raise StateFileRefused(f"{path} grew past {limit} bytes while being read")
        return data
    finally:
        os.close(fd)


def write_atomically(path: str, data: bytes) -> None:
    """A reader (or a crash) sees the old file or the new one, never a part."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
