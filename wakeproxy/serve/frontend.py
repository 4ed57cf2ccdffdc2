"""A listener: the one owner of every connection it accepts.

A ``Frontend`` accepts, bounds what its connections may hold (open connections, partial
heads, probe streams), answers probes and MCP set-up (mode http, through its
``McpFront``), and when a connection first needs a backend places it on one of its
``Backend``s, which then holds, forwards or refuses it as the core decides. A service
without replicas is a frontend with one backend; with replicas, the frontend also
balances (``core.replicas.place``), wakes one more backend when the load asks, keeps
each replica's circuit breaker, moves a connection whose connect failed, pins MCP
sessions, and runs the active health checks.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

from ..config import ServiceConfig
from ..config.replicas import scaling_of
from ..core.replicas import Breaker, Placement, Scaling, place
from ..core.sessions import GONE, Gone, Sessions, session_in_query
from ..core.states import IN_FLIGHT, Outcome, State
from ..httpmode.answers import ProbeRule, compile_probes
from ..httpmode.client import HttpClientSide
from ..net.forward import ClientSide, open_listener
from ..net.readiness import probe
from .stats import ServiceStats

if TYPE_CHECKING:
    from ..config.model import HttpSettings
    from ..httpmode.mcpfront import McpFront
    from .backend import Backend

log = logging.getLogger("wakeproxy.pool")


def _session_of(conn: ClientSide) -> bytes | None:
    """The MCP session a connection's first request names (streamable HTTP's header,
    SSE's query), or None."""
    if not isinstance(conn, HttpClientSide) or conn.head is None:
        return None
    head = conn.head
    return head.get(b"mcp-session-id") or session_in_query(head.query) or None


class Frontend:
    """One service's listener in front of its backend (or its replicas)."""

    def __init__(self, cfg: ServiceConfig, front: McpFront | None) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.backends: list[Backend] = []
        # Outcomes decided here; with one backend, that backend's own counters (a
        # service without replicas counts in one place), else the listener's own.
        self.stats = ServiceStats()
        self.connections: set[ClientSide] = set()  # every one open on this listener
        self.partial_heads = 0  # mode http: connections holding part of a head
        self.probe_streams = 0  # mode http: probes' event streams held open
        self.probe_rules: tuple[ProbeRule, ...] = compile_probes(cfg.http.matchers)
        # Replicas: balancing, scale-ups, moves after a failed connect, circuits.
        self.scaling: Scaling | None = scaling_of(cfg) if cfg.replicas is not None else None
        self.scale_ups = 0
        self.moved = 0
        self.breakers: dict[str, Breaker] = {}
        self.placed: collections.Counter[str] = collections.Counter()  # per replica
        # MCP sessions (mode http): pinned to the backend holding each, or virtual
        # (answered by the proxy) until their first real request places them.
        self.mcp = front
        if front is not None:
            front.asleep = self._sleeps
            front.incarnation_of = self._incarnation_of
        self._server: asyncio.Server | None = None
        self._health: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return (
            f"<Frontend {self.name} :{self.cfg.listen.port} backends={len(self.backends)} "
            f"open={len(self.connections)}>"
        )

    @property
    def replicated(self) -> bool:
        return self.scaling is not None

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def sessions(self) -> Sessions | None:
        return self.mcp.sessions if self.mcp is not None else None

    def update(self, cfg: ServiceConfig, backends: list[Backend]) -> None:
        """Its backends (replicas oldest first) and the settings they share (at start,
        and after a reload or a compose change)."""
        self.cfg = cfg
        if self.mcp is not None:
            self.mcp.settings = cfg.http
        self.probe_rules = compile_probes(cfg.http.matchers)
        self.scaling = scaling_of(cfg, len(backends)) if cfg.replicas is not None else None
        self.backends = backends
        for backend in backends:
            self._serve(backend)
        if not self.replicated and backends:
            self.stats = backends[0].stats
        for name in set(self.breakers) - {b.name for b in backends}:
            del self.breakers[name]
        if self._server is not None:
            self._start_checks()  # health_interval set by a reload

    def _serve(self, backend: Backend) -> None:
        backend.mcp = self.mcp
        if self.replicated:
            self.breakers.setdefault(backend.name, Breaker())
            backend.admission.retry = lambda conn: self.connect_failed(backend, conn)
            backend.admission.on_connected = lambda: self.connected(backend)
        else:
            backend.admission.retry = backend.admission.on_connected = None

    # ---- start and close

    async def start(self) -> None:
        self._server = await open_listener(
            self.cfg,
            (lambda: HttpClientSide(self))
            if self.cfg.mode == "http"
            else (lambda: ClientSide(self)),
        )
        if self.scaling is not None:
            log.info(
                "%s: listening on %s for %d replica(s) (%d to %d awake, next one past %d "
                "attached connection(s) each)",
                self.name,
                self.cfg.listen,
                len(self.backends),
                self.scaling.minimum,
                self.scaling.maximum,
                self.scaling.target,
                extra={"service": self.name},
            )
        self._start_checks()

    def stop_accepting(self) -> None:
        """Close the listener; open connections carry on (a graceful shutdown)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    def close(self) -> None:
        """Stop accepting; connections not placed on a backend end (the placed ones end
        with their backend)."""
        self.stop_accepting()
        if self.mcp is not None:
            self.mcp.close()
        if self._health is not None:
            self._health.cancel()
            self._health = None
        for conn in list(self.connections):
            if conn.backend is None:
                conn.abort()

    # ---- what the API, metrics and connections read

    @property
    def state(self) -> State:
        """The backend's; with replicas, running while any runs, else the state of the
        replica a connection arriving now would go to (what it would find)."""
        if not self.backends:
            return State.FAILED
        if not self.replicated:
            return self.backends[0].state
        if any(b.state is State.RUNNING for b in self.backends):
            return State.RUNNING
        return self.backends[self._place().serve].state

    def awake(self) -> int:
        return sum(b.state is State.RUNNING or b.state in IN_FLIGHT for b in self.backends)

    @property
    def idle_connection_timeout(self) -> float:
        return self.cfg.idle_connection_timeout

    @property
    def wake_on_connect(self) -> bool:
        # mode http waits for a request head: a probe must not wake anything.
        return self.cfg.mode == "tcp" and self.cfg.wake_on == "connect"

    @property
    def http(self) -> HttpSettings:
        return self.cfg.http

    @property
    def idle_delay(self) -> float:
        return self.cfg.sleep_policy.idle_delay

    # ---- the connections' owner interface (net.forward.Owner, httpmode.client.HttpOwner)

    def connection_made(self, conn: ClientSide) -> bool:
        self.connections.add(conn)
        self.stats.accepted += 1
        limit = self.cfg.max_connections
        if limit and len(self.connections) > limit:
            # Refused at once (mode http: 503): past the limit nothing is held or woken.
            self.stats.record(Outcome.REJECTED_LIMIT, conn.refuse(Outcome.REJECTED_LIMIT))
            return False
        return True

    def needs_backend(self, conn: ClientSide, *, activity: bool, attached: bool) -> None:
        backend = conn.backend
        if backend is None:
            backend = self._choose(conn, activity)
            if backend is None:
                return  # refused
        self._backend_of(conn).arrive(conn, activity=activity, attached=attached)

    def _backend_of(self, conn: ClientSide) -> Backend:
        return conn.backend  # type: ignore[return-value]  # always one of ours

    def _choose(self, conn: ClientSide, activity: bool) -> Backend | None:
        """Place a connection on a backend (its first need of one); None: refused."""
        if not self.backends:
            self.stats.record(Outcome.BACKEND_ERROR, conn.refuse(Outcome.BACKEND_ERROR))
            return None
        if not self.replicated:
            self.backends[0].take(conn)
            return self.backends[0]
        session = _session_of(conn)  # a pinned session goes home, whatever its circuit
        if session is not None:
            pinned = self._pinned(session)
            if isinstance(pinned, Gone):
                # Its replica is gone or was restarted: the session died with it. Never
                # another replica silently: the client is told, and starts a new one.
                self.stats.record(Outcome.SESSION_GONE, conn.refuse(Outcome.SESSION_GONE))
                return None
            if pinned is not None:
                self._place_on(pinned, conn)
                return pinned
        placement = self._place()
        replica = self.backends[placement.serve]
        self._chosen(replica, conn)
        self._place_on(replica, conn)
        if placement.wake is not None and activity:
            # Only real work scales up (never a probe's or a session set-up's connection).
            self.scale_ups += 1
            woken = self.backends[placement.wake]
            woken.wake_in_background(
                f"scaling up: {sum(b.attached for b in self.backends)} attached over "
                f"{self.awake()} awake replica(s), target {self.scaling.target} each"  # type: ignore[union-attr]
            )
        return replica

    def _place_on(self, replica: Backend, conn: ClientSide) -> None:
        self.placed[replica.name] += 1
        replica.stats.accepted += 1
        replica.take(conn)

    def _place(self) -> Placement:
        assert self.scaling is not None
        now = asyncio.get_running_loop().time()
        usable = [self.breakers[b.name].usable(now) for b in self.backends]
        sessions = self.sessions
        held = sessions.by_replica() if sessions is not None and len(sessions) else {}
        counts = [held.get(b.name, 0) for b in self.backends]
        return place([b.node for b in self.backends], self.scaling, usable, counts)

    def no_longer_needs(self, conn: ClientSide) -> None:
        if conn.backend is not None:
            self._backend_of(conn).leave(conn)

    def connection_lost(self, conn: ClientSide) -> None:
        self.connections.discard(conn)
        if isinstance(conn, HttpClientSide) and conn.sse_session and self.mcp is not None:
            self.mcp.sessions.end(conn.sse_session)  # an SSE session ends with its stream
        backend = conn.backend
        if backend is None:
            self.stats.bytes_up += conn.bytes_up
            self.stats.bytes_down += conn.bytes_down
            return
        placed = self._backend_of(conn)
        if self.replicated and conn.upstream is not None:
            self._ended(placed, conn)  # passive health: did the backend answer?
        placed.lost(conn)

    def record(self, conn: ClientSide, outcome: Outcome, status: int | None = None) -> None:
        stats = self._backend_of(conn).stats if conn.backend is not None else self.stats
        stats.record(outcome, status)

    # mode http

    def request_seen(self, conn: ClientSide) -> None:
        if conn.backend is not None:
            self._backend_of(conn).request_seen()

    def result_due(self, conn: ClientSide) -> None:
        if conn.backend is not None:
            self._backend_of(conn).result_due()

    def wake_in_background(self, reason: str) -> None:
        """A browser asked while the backend sleeps: wake it (replicas: the one a
        request would go to)."""
        if not self.backends:
            return
        index = self._place().serve if self.replicated else 0
        self.backends[index].wake_in_background(reason)

    def head_started(self) -> bool:
        """mode http: one more connection holds part of a request head (bounded: up to
        16 KiB each, for header_timeout, however many connections are open)."""
        if self.partial_heads >= self.cfg.http.max_partial_heads:
            return False
        self.partial_heads += 1
        return True

    def head_ended(self) -> None:
        self.partial_heads -= 1

    def stream_started(self) -> bool:
        """mode http: a probe's event stream held open (bounded: each is a descriptor)."""
        if self.probe_streams >= self.cfg.http.max_probe_streams:
            return False
        self.probe_streams += 1
        return True

    def stream_ended(self) -> None:
        self.probe_streams -= 1

    # ---- MCP sessions (mode http)

    def _pinned(self, session: bytes) -> Backend | Gone | None:
        sessions = self.sessions
        if sessions is None:
            return None
        assert self.mcp is not None
        now = time.monotonic()  # the sessions' clock (httpmode.mcpfront's too)
        incarnations = {b.name: b.incarnation for b in self.backends}
        where = sessions.where(session, incarnations, now, resume=self.mcp.resume)
        if isinstance(where, str):
            return next(b for b in self.backends if b.name == where)
        if where is GONE:
            log.info(
                "%s: a request of session %s, whose replica is gone: 404",
                self.name,
                session[:16].decode("ascii", "replace"),
                extra={"service": self.name},
            )
        return where

    def _incarnation_of(self, replica: str) -> int | None:
        held = next((b for b in self.backends if b.name == replica), None)
        return None if held is None else held.incarnation

    def _sleeps(self, replica: str | None) -> bool:
        """Whether MCP set-up is answered by the proxy: while the backend sleeps; with
        replicas for a new session always (it is placed with its first real request:
        set-up wakes no replica and counts toward no scale-up, whichever are awake),
        for one placed while its replica sleeps."""
        if not self.replicated:
            return bool(self.backends) and self.backends[0].mcp_sleeps
        if replica is None:
            return True
        held = next((b for b in self.backends if b.name == replica), None)
        return held is None or held.mcp_sleeps

    # ---- replicas: circuits, moves, health checks

    def connected(self, replica: Backend) -> None:
        breaker = self.breakers.get(replica.name)
        if breaker is not None and breaker.connected():
            log.info("%s: circuit closed again", replica.name, extra={"service": replica.name})

    def _chosen(self, replica: Backend, conn: ClientSide) -> None:
        breaker = self.breakers[replica.name]
        breaker.chosen(asyncio.get_running_loop().time())
        if breaker.state != "closed":  # a trial: its first response byte is reported
            conn.on_answer = lambda: self._answered(replica)

    def _answered(self, replica: Backend) -> None:
        breaker = self.breakers.get(replica.name)
        if breaker is not None and breaker.answered():
            log.info("%s: it answered: circuit closed again", replica.name)

    def _ended(self, replica: Backend, conn: ClientSide) -> None:
        """A connection forwarded to ``replica`` ended: its breaker decides what that says."""
        breaker = self.breakers.get(replica.name)
        if breaker is None:
            return
        now = asyncio.get_running_loop().time()
        up, down = conn.bytes_up, conn.bytes_down
        change = breaker.ended(now, sent=up, received=down, by_backend=conn.backend_closed)
        if change == "closed":
            log.info("%s: it answered: circuit closed again", replica.name)
        elif change == "opened":
            log.warning(
                "%s: circuit open for %.0f s: it closed a connection without answering "
                "(%d bytes sent, none back)",
                replica.name,
                breaker.until - now,
                up,
                extra={"service": replica.name},
            )

    def connect_failed(self, replica: Backend, conn: ClientSide) -> bool:
        """``replica`` could not connect ``conn`` (nothing went upstream): open its
        circuit and move the connection to another replica; False when none is left to
        try (the replica refuses it)."""
        breaker = self.breakers.get(replica.name)
        if breaker is not None:
            was = breaker.state
            breaker.failed(asyncio.get_running_loop().time())
            if was != "open":
                log.warning(
                    "%s: circuit open for %.0f s after a failed connect",
                    replica.name,
                    breaker.until - asyncio.get_running_loop().time(),
                    extra={"service": replica.name},
                )
        others = [b for b in self.backends if b is not replica]
        if conn.moves >= len(others) or not others or conn.closed:
            return False
        placement = self._place()
        target = self.backends[placement.serve]
        if target is replica:
            return False  # every circuit is open: no better choice than this one
        conn.moves += 1
        self.moved += 1
        replica.give_up(conn)
        self._chosen(target, conn)
        self._place_on(target, conn)
        target.arrive(conn, activity=True, attached=False)
        return True

    def _start_checks(self) -> None:
        spec = self.cfg.replicas
        if spec is not None and spec.health_interval > 0 and self._health is None:
            self._health = asyncio.create_task(self._check_health(), name=f"{self.name}-health")

    async def _check_health(self) -> None:
        """Active health checks: the readiness probe against every running replica each
        health_interval; a failure opens its circuit, a pass closes it. Not activity: the
        probes go to the backends directly, not through the proxy."""
        while True:
            try:
                if not await self._check_once():
                    return
            except Exception:  # a bug must not end the checks silently
                log.exception("%s: health check failed to run", self.name)
                await asyncio.sleep(1.0)

    async def _check_once(self) -> bool:
        """One round of checks, after health_interval; False once checks are off."""
        spec = self.cfg.replicas
        interval = spec.health_interval if spec is not None else 0.0
        if interval <= 0:
            self._health = None
            return False
        await asyncio.sleep(interval)
        running = [(b, b.backend) for b in self.backends if b.state is State.RUNNING and b.backend]
        timeout = min(self.cfg.connect_timeout, interval)
        results = await asyncio.gather(
            *(probe(address, b.cfg.readiness, timeout) for b, address in running if address)
        )
        now = asyncio.get_running_loop().time()
        for (replica, _), healthy in zip(running, results, strict=True):
            breaker = self.breakers.get(replica.name)
            if breaker is None:
                continue
            if healthy:
                if breaker.passed(response=replica.cfg.readiness.http is not None):
                    log.info("%s: health check passed: circuit closed", replica.name)
            elif breaker.state == "open":
                # Still failing: no trial connection while the checks say so (until past
                # the next round, which takes a probe's time on top).
                breaker.until = max(breaker.until, now + 2 * interval + timeout)
            else:
                breaker.failed(now)
                log.warning(
                    "%s: health check failed: circuit open",
                    replica.name,
                    extra={"service": replica.name},
                )
        return True
