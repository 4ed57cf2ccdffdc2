"""The process runtime: a local command the proxy starts, freezes and ends.

Sleep by pause is SIGSTOP to the command's process group and a wake is SIGCONT, so
a wake costs a signal, not a start. The command runs in its own session so the
signals reach every process it spawned (``sh -c`` wrappers included). Commands
belong to the proxy: ``close()`` ends them when the proxy exits.

Where the command has a memory cgroup of its own (v1), the cgroup is who it is: a
process that left the group (``setsid``) or its environment (``env -i``, sudo) is
still in it, so signals, the stop and the reaping after a killed proxy go to every
process in it. Without one (a v2-only host, no permission) the process group and the
run's token in the environment are all there is.

The command's stdout and stderr are pipes the proxy reads on its loop: each line is
logged as the proxy's own (``wakeproxy.backend``, with the service and the stream), so
``--log-format json`` stays one JSON object a line (``logs.OutputLines``).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fcntl
import functools
import logging
import os
import secrets
import signal
import subprocess
from collections.abc import Callable, Mapping

from ..core.states import State
from ..errors import BackendMissing, OperationFailed
from ..host.listeners import describe_pid, holders, listening_inodes, socket_inodes
from ..host.memory import (
    Cgroup,
    child_cgroup,
    group_pids,
    remove_cgroup,
)
from ..logs import PIPE_SIZE, OutputLines
from .base import Runtime
from .leftovers import (
    TOKEN_ENV,
    empty_then_remove,
    kill_all,
    record_path,
    start_time,
    stat_fields,
)

log = logging.getLogger("wakeproxy.runtime.process")

# prctl(PR_SET_PDEATHSIG, SIGKILL): the kernel kills the command when the proxy dies,
# even by SIGKILL, so no paused (SIGSTOPped) orphan outlives it. Loaded before any fork.
_PR_SET_PDEATHSIG = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _die_with_parent() -> None:
    _libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


# prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL): capabilities given to the proxy (the
# fast path's CAP_BPF and CAP_NET_ADMIN, a low port's CAP_NET_BIND_SERVICE) stay with
# it. The ambient set is what a command that is not root would keep across its exec.
_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 47, 4


def _drop_ambient_capabilities() -> None:
    _libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)


def _child_setup(procs: str | None) -> Callable[[], None]:
    """What the child does between fork and exec: die with the proxy, leave the
    proxy's capabilities behind, and enter its memory cgroup first (v1 charges stay
    where they were made: it must be in before it allocates anything)."""

    def setup() -> None:
        _die_with_parent()
        _drop_ambient_capabilities()
        if procs is not None:
            # The parent checks afterwards; raising here would only hide why.
            with contextlib.suppress(OSError), open(procs, "w") as file:
                file.write(str(os.getpid()))

    return setup


def _same(protocol: OutputLines) -> OutputLines:
    return protocol


_STOP_POLLS = 500  # of 1 ms each


def _kernel_state(pid: int) -> str | None:
    """The kernel's one-letter state of a process; procfs reads never block on disk."""
    fields = stat_fields(pid)
    return fields[0] if fields else None


def _close_transport(proc: asyncio.subprocess.Process) -> None:
    """Close an ended command's transport now: the loop closes it a turn after the
    exit was seen, and a proxy shutting down may close the loop before that turn."""
    transport = getattr(proc, "_transport", None)
    if transport is not None and proc.returncode is not None:
        transport.close()


class ProcessRuntime(Runtime):
    kind = "process"

    def __init__(
        self,
        command: tuple[str, ...],
        *,
        name: str | None = None,
        cwd: str | None = None,
        env: Mapping[str, str] | None = None,
        stop_timeout: float = 10.0,
        own_cgroup: bool = False,
    ) -> None:
        super().__init__()
        # A memory cgroup of its own per start (hibernation reclaims it, usage is read
        # from it); where none can be made, the reason is kept and said once.
        self.own_cgroup = own_cgroup
        self.cgroup: Cgroup | None = None
        self.command = command
        # Whose output it is, in the log: the service (else the program).
        self.name = name or os.path.basename(command[0])
        self.cwd = cwd
        self.env = dict(env or {})
        self.stop_timeout = stop_timeout
        self._proc: asyncio.subprocess.Process | None = None
        self._paused = False
        self._stopping = False
        self._watchers: set[asyncio.Task[None]] = set()
        self._token = ""
        self._foreign: tuple[frozenset[int], str] | None = None
        self._before_start: set[int] = set()
        # The output pipes of every run not yet at their end (a child the command left
        # behind may hold one open after it exited): closed with the runtime.
        self._outputs: dict[asyncio.ReadTransport, OutputLines] = {}

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _alive(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def inspect(self) -> State:
        if not self._alive():
            return State.STOPPED
        return State.PAUSED if self._paused else State.RUNNING

    async def start(self) -> None:
        if self._alive():
            if self._paused:
                await self.unpause()
            return
        token = secrets.token_hex(8)
        env = {**os.environ, **self.env, TOKEN_ENV: token}
        # The record first: a cgroup never exists without the run that owns it (another
        # proxy starting now would otherwise have to guess whether it is abandoned).
        self._record(token)
        cgroup = self._new_cgroup(token)
        # Pipes of our own, not asyncio's: its subprocess waits for them to close before
        # wait() returns, and a child the command left behind can hold them for ever.
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *self.command,
                cwd=self.cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=out_write,
                stderr=err_write,
                # Its own process group: SIGSTOP/SIGCONT/SIGTERM reach its children too.
                start_new_session=True,
                preexec_fn=_child_setup(str(cgroup.path / "cgroup.procs") if cgroup else None),
            )
        except OSError as exc:
            for fd in (out_read, err_read):
                os.close(fd)
            if cgroup is not None:
                remove_cgroup(cgroup)
            self._forget()
            raise BackendMissing(f"cannot run {self.command[0]!r}: {exc.strerror or exc}") from None
        finally:
            # The command holds the write ends now; ours would keep the pipes from ending.
            for fd in (out_write, err_write):
                with contextlib.suppress(OSError):
                    os.close(fd)
        await self._read_output(out_read, err_read)
        if cgroup is not None and proc.pid not in cgroup.pids():
            self.cgroup_problem = f"the command could not enter {cgroup.path}"
            remove_cgroup(cgroup)
            cgroup = None
        self.cgroup = cgroup
        self._proc = proc
        self._paused = False
        self.exit_reason = ""
        log.debug("started %s as pid %d", self.command[0], proc.pid)
        task = asyncio.create_task(self._watch_exit(proc))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _read_output(self, out_read: int, err_read: int) -> None:
        """Log the command's stdout and stderr line by line until they end."""
        loop = asyncio.get_running_loop()
        for fd, stream in ((out_read, "stdout"), (err_read, "stderr")):
            with contextlib.suppress(OSError):
                # Room for what a flooding command writes while its reading waits.
                fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
            pipe = os.fdopen(fd, "rb", buffering=0)
            lines = OutputLines(self.name, stream)
            try:
                transport, _ = await loop.connect_read_pipe(functools.partial(_same, lines), pipe)
            except OSError:
                pipe.close()
                continue
            self._outputs[transport] = lines
            lines.done.add_done_callback(functools.partial(self._output_ended, transport))

    def _output_ended(self, transport: asyncio.ReadTransport, _: object) -> None:
        self._outputs.pop(transport, None)

    async def _close_outputs(self, within: float = 0.5) -> None:
        """Close the output pipes still open once the command ended: first a moment
        for what is still in them to be read and logged."""
        if not self._outputs:
            return
        pending = [lines.done for lines in self._outputs.values()]
        await asyncio.wait(pending, timeout=within)
        for transport in list(self._outputs):
            transport.close()
        self._outputs.clear()

    def _new_cgroup(self, token: str) -> Cgroup | None:
        if not self.own_cgroup:
            return None
        cgroup, problem = child_cgroup(f"wakeproxy-{token}")
        if cgroup is None:
            if problem != self.cgroup_problem:  # said once, not at every start
                log.info(
                    "%s runs without a memory cgroup of its own (%s): only its process "
                    "group is paused and stopped with it (a child that calls setsid is not)",
                    self.command[0],
                    problem,
                )
            self.cgroup_problem = problem
        return cgroup

    async def _drop_cgroup(self) -> None:
        """Kill what is left in the command's cgroup and remove it. Awaited (at most
        2 s): a retry left to a timer never ran once the proxy exited."""
        cgroup, self.cgroup = self.cgroup, None
        if cgroup is not None:
            await empty_then_remove(cgroup)

    async def memory_cgroup(self) -> Cgroup | None:
        return self.cgroup if self._alive() else None

    async def pids(self) -> list[int]:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            return []
        if self.cgroup is not None and (members := self.cgroup.pids()):
            return members
        return group_pids(proc.pid) or [proc.pid]

    def _record(self, token: str) -> None:
        """Note this run's token and its proxy, for reap_leftovers after a SIGKILL."""
        self._token = token
        path = record_path(token)
        me = os.getpid()
        started = start_time(me)
        if started is None:
            return  # no /proc: a record could not tell this proxy from a reused pid
        try:
            path.parent.mkdir(mode=0o700, exist_ok=True)
            path.write_text(f"{me} {started} {self.command[0]}\n")
        except OSError as exc:
            log.debug("cannot record run %s in %s: %s", token, path, exc)

    def _forget(self, token: str | None = None) -> None:
        """Drop a run's record (``token``: that run's; a newer run may have begun)."""
        token = self._token if token is None else token
        if token:
            with contextlib.suppress(OSError):
                record_path(token).unlink()
            if token == self._token:
                self._token = ""

    def note_listeners(self, port: int) -> None:
        self._before_start = listening_inodes(port)

    async def foreign_listener(self, port: int) -> str | None:
        """A listener that was there before the start and is not the command's own.
        One that appeared since is taken as the command's: a command may publish its
        port through a helper it does not own (``docker run -p`` and docker-proxy)."""
        inodes = listening_inodes(port)
        if not inodes:
            return None  # not seen from here (another network namespace): trust the connect
        if inodes - self._before_start:
            return None  # a listener that appeared with this start
        if self._alive():
            pids = self.cgroup.pids() if self.cgroup is not None else await self.pids()
            if (socket_inodes(pids) or set()) & inodes:
                return None
        # Only listeners from before the start, none of them the command's (unreadable
        # descriptors too: a command that just exited, its pids already gone).
        key = frozenset(inodes)
        if self._foreign is None or self._foreign[0] != key:
            # Who holds it: a full /proc scan, once per listener seen.
            who = ", ".join(describe_pid(pid) for pid in holders(inodes)[:3])
            text = f"port {port} is held by {who or 'another process'}, not by this command"
            self._foreign = (key, text)
        return self._foreign[1]

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if proc is self._proc and not self._stopping:
            self.exit_reason = (
                f"killed by signal {-code}" if code < 0 else f"exited with status {code}"
            )
            # Ended without being asked to: the state follows, the next connection starts it.
            self._kill_stragglers(proc.pid)
            token = self._token  # a start the state change allows records another
            self._proc = None
            self._paused = False
            self.on_change(State.STOPPED, f"command exited with status {code}")
            await self._drop_cgroup()
            self._forget(token)  # after the cgroup: a record never names a cgroup still there

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            raise OperationFailed(f"cannot send {sig.name}: the command is not running")
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            raise OperationFailed(f"cannot send {sig.name}: the command has exited") from None
        self._signal_cgroup(sig)

    def _signal_cgroup(self, sig: signal.Signals) -> None:
        """``sig`` to every process in the command's cgroup: those that left its
        process group (setsid) too; the group's own get it once more, to no effect."""
        if self.cgroup is not None:
            for pid in self.cgroup.pids():
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, sig)

    async def _until_everyone_gone(self, proc: asyncio.subprocess.Process) -> None:
        """The leader has exited and its cgroup (if any) holds no process."""
        await proc.wait()
        # A v1 cgroup gives no event when it empties (short of a release agent): polled.
        while self.cgroup is not None and self.cgroup.pids():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    async def pause(self) -> None:
        self._signal_group(signal.SIGSTOP)
        self._paused = True
        assert self._proc is not None
        members = self.cgroup.pids() if self.cgroup is not None else []
        await self._until_stopped({self._proc.pid, *members})

    @staticmethod
    async def _until_stopped(pids: set[int]) -> None:
        # kill() returns before a process running on another core has stopped; report
        # paused only once the leader and every process of its cgroup are frozen
        # (Linux /proc; elsewhere, trust the signal).
        for _ in range(_STOP_POLLS):
            pids = {pid for pid in pids if _kernel_state(pid) not in (None, "T", "t")}
            if not pids:
                return
            await asyncio.sleep(0.001)
        log.warning(
            "pids %s did not show as stopped %d ms after SIGSTOP", sorted(pids), _STOP_POLLS
        )

    async def unpause(self) -> None:
        self._signal_group(signal.SIGCONT)
        self._paused = False

    async def stop(self) -> None:
        proc = self._proc
        if proc is None or proc.returncode is not None:
            self._proc = None
            return
        self._stopping = True
        try:
            for sig in (signal.SIGCONT, signal.SIGTERM):
                # A stopped process keeps SIGTERM pending for ever: continue it first.
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                self._signal_cgroup(sig)
            try:
                # Every process of its cgroup gets stop_timeout to end, not the leader only.
                await asyncio.wait_for(self._until_everyone_gone(proc), self.stop_timeout)
            except TimeoutError:
                log.warning(
                    "%s did not end within %.1fs of SIGTERM; sending SIGKILL",
                    self.command[0],
                    self.stop_timeout,
                )
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
            self._kill_stragglers(proc.pid)
            await self._drop_cgroup()
            self._forget()
        finally:
            if proc.returncode is not None:
                self._proc = None
                _close_transport(proc)
            # else cancelled before it ended (the proxy shutting down): close() stops it
            self._paused = False
            self._stopping = False

    def _kill_stragglers(self, pgid: int) -> None:
        # Children that ignored SIGTERM would outlive their leader; the group ends
        # together, and so does every process of its cgroup (thawed first).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        if self.cgroup is not None:
            kill_all(self.cgroup.pids())

    async def close(self) -> None:
        await self.stop()
        await self._close_outputs()

    def describe(self) -> str:
        return f"process {self.command[0]}"
