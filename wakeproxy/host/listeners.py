"""Who listens on a TCP port, read from /proc (Linux, this network namespace).

A readiness connect succeeds against any listener on the backend's port: a frozen
leftover of an earlier run, or an unrelated server, would pass it while the command just
started fails to bind. These reads tell the command's own listener from someone else's.
The kernel's fast path (``host.steering``) finds the backend's listening socket here too.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

_TABLES = ("/proc/net/tcp", "/proc/net/tcp6")
_LISTEN = "0A"  # st column: TCP_LISTEN


def listening_inodes(port: int) -> set[int]:
    """Socket inodes listening on ``port`` (any address); empty when none or unreadable."""
    found: set[int] = set()
    for table in _TABLES:
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            # local_address is HEX_IP:HEX_PORT; st; ...; inode is the tenth column.
            listening = len(fields) > 9 and fields[3] == _LISTEN
            if listening and int(fields[1].rsplit(":", 1)[1], 16) == port:
                found.add(int(fields[9]))
    return found


def _sockets(pid: int) -> list[tuple[int, int]] | None:
    """(descriptor, socket inode) for each socket ``pid`` holds; None when its fd table
    cannot be read (gone, or not ours to read)."""
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return None
    found = []
    for name in names:
        with contextlib.suppress(OSError, ValueError):
            target = os.readlink(f"{fd_dir}/{name}")
            if target.startswith("socket:["):
                found.append((int(name), int(target[8:-1])))
    return found


def socket_inodes(pids: Iterable[int]) -> set[int] | None:
    """Inodes of the sockets these processes hold; None when no fd table was readable."""
    found: set[int] = set()
    readable = False
    for pid in pids:
        sockets = _sockets(pid)
        if sockets is not None:
            readable = True
            found.update(inode for _, inode in sockets)
    return found if readable else None


def listener_fd(pids: Iterable[int], port: int) -> tuple[int, int] | None:
    """(pid, descriptor) by which one of these processes holds a socket listening on
    ``port``, or None (the kernel's fast path takes the backend's own listener)."""
    inodes = listening_inodes(port)
    if not inodes:
        return None
    for pid in pids:
        for fd, inode in _sockets(pid) or ():
            if inode in inodes:
                return pid, fd
    return None


def holders(inodes: set[int]) -> list[int]:
    """Every process holding one of these sockets (a full /proc scan: for error texts)."""
    pids = [int(entry) for entry in os.listdir("/proc") if entry.isdigit()]
    return [pid for pid in pids if (socket_inodes([pid]) or set()) & inodes]


def describe_pid(pid: int) -> str:
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").strip()
    except OSError:
        return f"pid {pid}"
    return f"pid {pid} ({command.decode(errors='replace')[:80]})"
