"""What killed proxies left of their commands: each run's record (its token, the proxy's
pid and start time, the command), and the reaping at start-up of every run whose proxy
is gone (its cgroup's processes and those with its token in their environment)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path

from ..host.memory import Cgroup, command_cgroups, parent_pid, remove_cgroup

log = logging.getLogger("wakeproxy.runtime.process")


def stat_fields(pid: int) -> list[str] | None:
    """/proc/PID/stat's fields after the command name (state first), or None."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


# Put in each command's environment (inherited by its children): which run it belongs to.
TOKEN_ENV = "WAKEPROXY_COMMAND_TOKEN"


def _state_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return Path(base) / f"wakeproxy-{os.getuid()}"


def start_time(pid: int) -> str | None:
    """A process's start time (clock ticks since boot): with the pid, who it is."""
    fields = stat_fields(pid)
    return fields[19] if fields is not None and len(fields) > 19 else None


def record_path(token: str) -> Path:
    return _state_dir() / f"run-{token}"


# An empty cgroup with no record is left this long: it may be another proxy's, made
# for a command a moment ago by a version that recorded its run only afterwards.
_STALE_AFTER = 60.0


def _records() -> dict[str, tuple[Path, bool, str]]:
    """Every run record: token -> (its file, whether its proxy still runs, command)."""
    try:
        paths = list(_state_dir().glob("run-*"))
    except OSError:
        return {}
    found = {}
    for record in paths:
        try:
            owner, started, command = record.read_text().split(maxsplit=2)
        except (OSError, ValueError):
            continue
        # The pid alone could be reused: with its start time it is that proxy (or gone).
        alive = owner.isdigit() and start_time(int(owner)) == started
        found[record.name.removeprefix("run-")] = (record, alive, command.strip())
    return found


def _abandoned(members: list[int]) -> bool:
    """A cgroup with no record says whose it is by its processes: a live proxy's
    command is a child of that proxy; a killed proxy's command died with it
    (PR_SET_PDEATHSIG), so what is left has only its own members or init as parents."""
    inside = set(members)
    for pid in members:
        parent = parent_pid(pid)
        if parent is not None and parent not in inside and parent > 1:
            return False
    return True


def kill_all(pids: list[int]) -> int:
    """SIGCONT (a frozen process thaws first) then SIGKILL each; how many were signalled."""
    ended = 0
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
            ended += 1
    return ended


async def empty_then_remove(cgroup: Cgroup, within: float = 2.0) -> int:
    """Kill whatever is in ``cgroup`` (again for any process forked meanwhile) until it
    is empty, then rmdir it; at most ``within`` seconds. Returns the processes killed."""
    ended, seen = 0, set()
    deadline = time.monotonic() + within
    while True:
        members = cgroup.pids()
        fresh = [pid for pid in members if pid not in seen]
        seen.update(fresh)
        ended += kill_all(fresh)
        if not members:
            remove_cgroup(cgroup)
            if not cgroup.exists():
                return ended
        if time.monotonic() >= deadline:
            return ended
        await asyncio.sleep(0.01)


def _reap_by_environ(tokens: set[str], killed: set[int]) -> dict[str, int]:
    """Kill each process (not in ``killed`` already) whose environment holds one of
    ``tokens``; how many per token. procfs reads: quick, never on disk."""
    ended: dict[str, int] = {}
    markers = {f"{TOKEN_ENV}={token}".encode(): token for token in tokens}
    if not markers:
        return ended
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) in killed:
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for marker, token in markers.items():
            if marker in environ:
                ended[token] = ended.get(token, 0) + kill_all([int(entry.name)])
    return ended


async def reap_leftovers() -> tuple[list[tuple[str, int]], int]:
    """End what killed proxies left of their commands, whatever the commands were, and
    remove their cgroups. Returns (command, processes ended) per run reaped, and how
    many cgroups went.

    PR_SET_PDEATHSIG ends a command's leader with the proxy, but processes it spawned
    (``sh -c 'server & wait'``) survive it, frozen if it was paused, holding the
    backend's port. Each start records its run's random token with the proxy's pid and
    start time, then makes the command's cgroup ``wakeproxy-TOKEN``; a record whose
    proxy is no longer alive names a run to end. A live proxy's commands, and a reused
    pid, never match.

    * By cgroup (v1): every process in a dead run's cgroup is thawed and killed, and
      the cgroup removed, whatever its environment says (``env -i``, sudo) or its
      session (``setsid``). A cgroup with no record (one from an older version, or a
      record lost) is a dead run's when none of its processes has a parent outside it
      but init (``_abandoned``); an empty one once ``_STALE_AFTER`` old.
    * By environment, for runs without a cgroup: every process whose environment holds
      a dead run's token.
    """
    records = _records()
    commands = {token: command for token, (_, alive, command) in records.items() if not alive}
    ended: dict[str, int] = {}
    killed: set[int] = set()
    removed = 0
    now = time.time()
    for cgroup in command_cgroups():
        token = cgroup.path.name.removeprefix("wakeproxy-")
        record = records.get(token)
        members = cgroup.pids()
        if record is not None:
            if record[1]:
                continue  # its proxy runs (this one included)
        elif members:
            if not _abandoned(members):
                continue
            commands[token] = "(not recorded)"
        else:
            with contextlib.suppress(OSError):
                if now - cgroup.path.stat().st_mtime <= _STALE_AFTER:
                    continue
        killed.update(members)
        ended[token] = ended.get(token, 0) + await empty_then_remove(cgroup)
        if not cgroup.exists():
            removed += 1
    for token, count in _reap_by_environ(set(commands), killed).items():
        ended[token] = ended.get(token, 0) + count
    for token in commands:
        if token in records:
            with contextlib.suppress(OSError):
                records[token][0].unlink()
    runs = [(commands[token], count) for token, count in ended.items() if count]
    return runs, removed


async def reap_and_log() -> None:
    """``reap_leftovers``, its findings logged: before any command of this proxy starts."""
    runs, swept = await reap_leftovers()
    for command, ended in runs:
        log.warning("ended %d process(es) a killed proxy left of its command %r", ended, command)
    if swept:
        log.info("removed %d memory cgroup(s) a killed proxy left", swept)
