"""The kernel's fast path for one backend (``fast_path: kernel``): out of the byte path
while it is awake.

While the backend runs, its own listening socket sits in the proxy's steering map
(``host.steering``) and the kernel hands every new connection for the service's listen
address straight to it. Before the backend leaves running (a pause, a stop, a failure)
the socket leaves the map first, so new connections come to the proxy's listener
again and are held as always; after a wake the held ones are released as always, then
the socket goes back into the map. The backend's socket is found by its listening inode
in its processes' descriptor tables (``host.listeners``) and copied with pidfd_getfd;
the proxy keeps no copy (a listener nobody serves must never take connections), so a
re-steer after a sleep takes it again, and a backend restarted with a new socket is
found anew.

The proxy never sees these connections, so the core is told what the kernel lists
(``KernelConnections``): the ones open on the listen address (sock_diag), when one last
received data (``tcp_info``), and how many were handed over since the last read (the
map's counter). The read happens when the idle timer fires, before an API sleep and
right after the map entry is taken out: the decisions stay the core's.

Where the fast path cannot run (mode http, replicas, the Swarm runtime, no
CAP_BPF/CAP_NET_ADMIN, a kernel without sk_lookup, a backend in another network
namespace) the service runs as it always did, with one log line and the reason in the
metrics and the API.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import ipaddress
import logging
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from ..config import Address, ServiceConfig
from ..core.events import KernelConnections
from ..core.states import State
from ..errors import RuntimeFailure
from ..host.bpf import BpfError
from ..host.listeners import listener_fd
from ..host.steering import SLOTS, Steering, take_socket
from ..net.forward import ClientSide
from ..net.sockdiag import connections
from ..runtimes.base import Runtime

log = logging.getLogger("wakeproxy.service")


class FastPathState(enum.StrEnum):
    OFF = "off"  # not asked for
    UNAVAILABLE = "unavailable"  # asked for, cannot run here (``why`` says why)
    STANDBY = "standby"  # ready; the backend is not running, or its listener not found
    STEERING = "steering"  # the kernel hands new connections to the backend


class Why(enum.StrEnum):
    """Why the fast path is unavailable: the metric's ``reason`` label."""

    MODE_HTTP = "mode_http"
    REPLICAS = "replicas"
    RUNTIME = "runtime"
    ADDRESS = "address"
    PERMISSION = "permission"
    KERNEL = "kernel"
    NAMESPACE = "namespace"
    SLOTS = "slots"


@dataclass(frozen=True, slots=True)
class FastPathStatus:
    """One backend's fast path at one moment (``serve.status`` carries it)."""

    state: FastPathState
    why: Why | None
    reason: str
    steered: int  # connections the kernel handed to the backend
    open: int  # connections the kernel listed at the last read

    def describe(self) -> dict[str, Any] | None:
        """What the API shows (None: not asked for)."""
        if self.state is FastPathState.OFF:
            return None
        return {
            "state": self.state.value,
            "why": self.why.value if self.why is not None else None,
            "reason": self.reason or None,
            "steered": self.steered,
            "open": self.open,
        }


class Unavailable(Exception):
    def __init__(self, why: Why, text: str) -> None:
        super().__init__(text)
        self.why = why


class Kernel:
    """The proxy's one steering program, loaded when the first service asks for it, and
    the slots services take in it."""

    def __init__(self) -> None:
        self._steering: Steering | None = None
        self._failure: Unavailable | None = None
        self._free = list(range(SLOTS - 1, -1, -1))

    def slot(self) -> tuple[Steering, int]:
        if self._steering is None:
            if self._failure is None:
                self._failure = self._load()
            if self._failure is not None:
                raise self._failure
        assert self._steering is not None
        if not self._free:
            raise Unavailable(Why.SLOTS, f"all {SLOTS} slots of the steering map are taken")
        slot = self._free.pop()
        self._steering.reset_count(slot)
        return self._steering, slot

    def _load(self) -> Unavailable | None:
        try:
            self._steering = Steering()
        except BpfError as exc:
            why = Why.PERMISSION if exc.errno == 1 else Why.KERNEL  # EPERM
            if why is Why.PERMISSION:
                return Unavailable(why, f"{exc} (it needs CAP_BPF and CAP_NET_ADMIN, or root)")
            return Unavailable(why, f"{exc} ({kernel_hint(os.uname().release)})")
        except OSError as exc:
            return Unavailable(Why.KERNEL, f"the network namespace cannot be opened: {exc}")
        log.info("the kernel's fast path is loaded (link %d)", self._steering.link_id)
        return None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    def close(self) -> None:
        if self._steering is not None:
            self._steering.close()
            self._steering = None


def kernel_hint(release: str) -> str:
    """What a refused load most likely means on a kernel of this ``release`` ("6.1.0-13")."""
    parts = release.split(".")
    try:
        minor = parts[1][: len(parts[1]) - len(parts[1].lstrip("0123456789"))]  # "8-rc1": 8
        version = (int(parts[0]), int(minor or 0))
    except (IndexError, ValueError):
        return f"kernel {release}: sk_lookup needs Linux 5.9 or later"
    if version < (5, 9):
        return f"kernel {release}: sk_lookup needs Linux 5.9 or later"
    return f"kernel {release} has sk_lookup: the program or its map was refused"


def static_reason(cfg: ServiceConfig) -> Unavailable | None:
    """Why the fast path cannot run for this service whatever the kernel can do."""
    if cfg.mode == "http":
        return Unavailable(Why.MODE_HTTP, "mode http: the proxy reads every request")
    if cfg.replicas is not None or cfg.replica_of is not None:
        return Unavailable(Why.REPLICAS, "replicas: the proxy places each connection")
    if cfg.runtime == "swarm":
        return Unavailable(Why.RUNTIME, "a Swarm service's tasks are not the proxy's to reach")
    try:
        ipaddress.ip_address("127.0.0.1" if cfg.listen.host == "localhost" else cfg.listen.host)
    except ValueError:
        return Unavailable(Why.ADDRESS, f"the listen address {cfg.listen.host!r} is not an IP")
    return None


def _inodes(conns: Iterable[ClientSide]) -> set[int]:
    """The socket inodes of the proxy's own connections on the listen address."""
    found: set[int] = set()
    for conn in conns:
        sock = conn.transport.get_extra_info("socket") if conn.transport else None
        if sock is not None:
            with contextlib.suppress(OSError):
                found.add(os.fstat(sock.fileno()).st_ino)
    return found


_NETNS = "/proc/self/ns/net"
# Seconds between looks for a just-started backend's listener (about 3 s in all).
_RETRIES = (0.02, 0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 0.0)


class Owner(Protocol):
    """What the fast path reads of its backend (``serve.backend.Backend``)."""

    @property
    def state(self) -> State: ...

    @property
    def backend(self) -> Address | None: ...

    @property
    def connections(self) -> set[ClientSide]: ...


class FastPath:
    """One backend's use of the kernel's fast path."""

    def __init__(
        self,
        cfg: ServiceConfig,
        runtime: Runtime,
        kernel: Kernel | None,
        owner: Owner,
        *,
        spawn: Callable[[Any], asyncio.Task[None] | None],
    ) -> None:
        self.name = cfg.name
        self.listen = cfg.listen
        self._host = "127.0.0.1" if cfg.listen.host == "localhost" else cfg.listen.host
        self.state = FastPathState.OFF if cfg.fast_path == "off" else FastPathState.STANDBY
        self.why: Why | None = None
        self.reason = ""
        self._cfg = cfg
        self._kernel = kernel
        self._runtime = runtime
        self._owner = owner
        self._spawn = spawn
        self._steering: Steering | None = None
        self._slot = -1
        self._counted = 0  # the map's counter at the last read
        self._steered_before = 0  # counted in a slot given back (close)
        # Where the backend's listener was last found: (pid, descriptor, inode).
        self._found: tuple[int, int, int] | None = None
        self._generation = 0  # a steer in flight that sees it moved on gives up
        self._missing_said = False
        self.seen = 0  # connections the kernel listed at the last read

    def __repr__(self) -> str:
        return f"<FastPath {self.name} {self.state.value} steered={self.steered}>"

    def status(self) -> FastPathStatus:
        return FastPathStatus(self.state, self.why, self.reason, self.steered, self.seen)

    @property
    def active(self) -> bool:
        return self._steering is not None

    @property
    def steered(self) -> int:
        """Connections the kernel handed to the backend (the map's counter of listener
        lookups: a stray segment of a connection whose socket is gone counts too)."""
        if self._steering is None:
            return self._steered_before
        return self._steered_before + self._steering.steered(self._slot)

    def open(self) -> None:
        """Take a slot and route the listen address to it (the backend's start)."""
        if self.state is FastPathState.OFF or self._kernel is None:
            return
        try:
            failure = static_reason(self._cfg)
            if failure is not None:
                raise failure
            self._steering, self._slot = self._kernel.slot()
        except Unavailable as exc:
            self._unavailable(exc)
            return
        self._steering.route(self._slot, self._host, self.listen.port)

    def _unavailable(self, exc: Unavailable) -> None:
        self.state, self.why, self.reason = FastPathState.UNAVAILABLE, exc.why, str(exc)
        log.warning(
            "%s: fast path unavailable (%s), the proxy forwards every connection: %s",
            self.name,
            exc.why.value,
            exc,
            extra={"service": self.name, "fast_path": exc.why.value},
        )

    def close(self) -> None:
        steering = self._steering
        if steering is None:
            return
        self._generation += 1
        self._steered_before = self.steered
        steering.unsteer(self._slot)
        steering.unroute(self._host, self.listen.port)
        assert self._kernel is not None
        self._kernel.release(self._slot)
        self._steering = None
        if self.state is FastPathState.STEERING:
            self.state = FastPathState.STANDBY

    # ---- what the kernel lists

    def look(self, now: float) -> KernelConnections | None:
        """What the kernel handed to the backend, for the core (None: no fast path)."""
        steering = self._steering
        if steering is None:
            return None
        count = steering.steered(self._slot)
        arrived, self._counted = count - self._counted, count
        own = _inodes(self._owner.connections)
        found = connections(self._host, self.listen.port, own)
        self.seen = found.attached
        last = None if found.idle_ms is None else now - found.idle_ms / 1000
        if self._owner.state is State.RUNNING and not steering.steering(self._slot):
            # Running, not steered: its listener was not found after the wake, or the
            # backend closed it (a restart; the kernel took it out of the map).
            self.state = FastPathState.STANDBY
            self.steer()
        return KernelConnections(found.attached, last, arrived)

    # ---- steering on and off

    def transitioned(self, before: State, after: State, look: Callable[[], None]) -> None:
        """The backend's state changed: out of the map before it leaves running, back in
        once it runs again."""
        if self._steering is None:
            return
        loop = asyncio.get_running_loop()
        if before is State.RUNNING:
            # First out of the map (new connections come to the proxy and are held),
            # then what came since the last read: the core wakes it again after the sleep.
            self.unsteer()
            loop.call_soon(look)
        elif after is State.RUNNING:
            # After this batch's Release: the held connections go first.
            loop.call_soon(self.steer)

    def unsteer(self) -> None:
        """New connections come to the proxy's listener again (before a sleep)."""
        self._generation += 1
        if self._steering is not None:
            self._steering.unsteer(self._slot)
            self.state = FastPathState.STANDBY

    def steer(self) -> None:
        """Hand new connections to the running backend's listener (after a wake)."""
        if self._steering is not None:
            self._generation += 1
            self._spawn(self._steer(self._generation))

    def _current(self, generation: int) -> bool:
        """Still running, and no newer steer or unsteer since ``generation``."""
        return (
            generation == self._generation
            and self._owner.state is State.RUNNING
            and self._steering is not None
        )

    async def _steer(self, generation: int) -> None:
        fd, why = self._retake(), ""
        # Running is not always listening: a backend without a readiness check may still
        # be on its way to its listen() (a few tries, then the next idle check tries).
        for delay in _RETRIES:
            if fd is not None or not self._current(generation):
                break
            try:
                fd, why = await self._take()
            except Unavailable as exc:
                self._unavailable(exc)
                self.close()
                return
            if fd is None:
                await asyncio.sleep(delay)
        if fd is None:
            if why and self._current(generation):
                self._missing(why)
            return
        try:
            if not self._current(generation):
                return  # it left running (or was steered anew) meanwhile
            assert self._steering is not None
            self._steering.steer(self._slot, fd)
            self.state = FastPathState.STEERING
            self._missing_said = False
            log.debug("%s: the kernel hands new connections to the backend", self.name)
        except BpfError as exc:
            log.warning("%s: fast path: %s", self.name, exc, extra={"service": self.name})
        finally:
            os.close(fd)  # the map holds the socket now (or nobody needs it)

    def _retake(self) -> int | None:
        """The listener where it was found last time, if it is still that socket."""
        if self._found is None:
            return None
        pid, number, inode = self._found
        try:
            fd = take_socket(pid, number)
        except OSError:
            return None
        if os.fstat(fd).st_ino != inode:
            os.close(fd)
            return None
        return fd

    async def _take(self) -> tuple[int | None, str]:
        """Find the backend's own listener in its processes and copy it: (the copy,
        or None and why not)."""
        backend = self._owner.backend
        try:
            pids = await self._runtime.pids()
        except RuntimeFailure:
            pids = []
        if backend is None or not pids:
            return None, "its processes are not known"
        own_netns = os.stat(_NETNS).st_ino
        try:
            theirs = os.stat(f"/proc/{pids[0]}/ns/net").st_ino
        except OSError:
            return None, f"pid {pids[0]} is gone"
        if theirs != own_netns:
            raise Unavailable(Why.NAMESPACE, "the backend runs in another network namespace")
        found = listener_fd(pids, backend.port)
        if found is None:
            return None, f"no listener of its own on port {backend.port}"
        try:
            fd = take_socket(*found)
        except OSError as exc:
            return None, str(exc)
        self._found = (*found, os.fstat(fd).st_ino)
        return fd, ""

    def _missing(self, why: str) -> None:
        """Said once until it steers again: a backend without a listener of its own on
        the port (it listens elsewhere, or not yet) is served as always."""
        if not self._missing_said:
            self._missing_said = True
            log.info(
                "%s: fast path on standby, the proxy forwards: %s",
                self.name,
                why,
                extra={"service": self.name},
            )
