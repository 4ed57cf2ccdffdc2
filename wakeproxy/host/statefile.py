"""Small state files the proxy keeps across restarts (what it learned): read with
bounds, written atomically. Both block: call them in a thread, never on the loop."""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from pathlib import Path


class Refused(ValueError):
    """A state file not read: not a regular file, or too big."""


def read_bounded(path: str, limit: int) -> bytes:
    """The bytes of the state file: a regular file of at most ``limit`` bytes;
    ``Refused`` saying why for anything else, OSError when it cannot be read.

    lstat first, so nothing but a regular file is ever opened (opening a device can do
    something by itself); then opened with O_NOFOLLOW and O_NONBLOCK and checked again
    with fstat, so a file swapped in between is caught (a FIFO is opened without waiting
    for a writer, and refused). Both look at the last component only: a state directory
    that is a symlink (/var/lib/wakeproxy -> /srv/...) is followed as any directory, a
    state file that is one is refused, since saves replace the file by a rename (the
    link itself, never what it points to)."""
    _regular(os.lstat(path), limit)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # it became a symlink since the lstat
            raise Refused("a symbolic link, not a regular file") from None
        raise
    with os.fdopen(fd, "rb") as file:
        _regular(os.fstat(fd), limit)
        # Bounded even if the file grows while read.
        data = file.read(limit + 1)
    if len(data) > limit:
        raise Refused(f"more than {limit} bytes")
    return data


def _regular(info: os.stat_result, limit: int) -> None:
    if stat.S_ISLNK(info.st_mode):
        raise Refused("a symbolic link, not a regular file")
    if not stat.S_ISREG(info.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(info.st_mode) else "a device, socket or directory"
        raise Refused(f"{kind}, not a regular file")
    if info.st_size > limit:
        raise Refused(f"{info.st_size} bytes (at most {limit} are read)")


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
