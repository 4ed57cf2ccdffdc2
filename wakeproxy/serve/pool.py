"""A service with replicas: one listener in front of several backends.

Each replica is a ``Service`` of its own (named ``SERVICE@N``, no listener): its
runtime, its state in the core, its held connections, its idle timer. The pool owns
the listener and, when a connection first needs a backend, asks the core where it goes
(``core.replicas.place``) and hands it over (``Service.adopt``): from then on the
connection reports to that replica as it would to a one-backend service. A wake the
load asks for runs beside it, in the background.

Before that hand-over a connection is the pool's: the limit on open connections, mode
http's probes answered while every replica sleeps, a request head still arriving.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import TYPE_CHECKING

from ..config import ServiceConfig
from ..core.replicas import Breaker, Placement, Scaling, place
from ..core.sessions import GONE, Gone, Sessions, session_in_query
from ..core.states import IN_FLIGHT, Outcome, State
from ..httpmode.answers import ProbeRule, compile_probes
from ..httpmode.client import HttpClientSide
from ..net.forward import ClientSide
from ..net.readiness import probe
from .service import open_listener
from .stats import ServiceStats

if TYPE_CHECKING:
    from ..config.model import HttpSettings
    from ..httpmode.mcpfront import McpFront
    from .service import Service

log = logging.getLogger("wakeproxy.pool")


def _session_of(conn: ClientSide) -> bytes | None:
    """The MCP session a connection's first request names (streamable HTTP's header,
    SSE's query), or None."""
    if not isinstance(conn, HttpClientSide) or conn.head is None:
        return None
    head = conn.head
    return head.get(b"mcp-session-id") or session_in_query(head.query) or None


def scaling_of(cfg: ServiceConfig, replicas: int = 0) -> Scaling:
    """The config's scaling; ``max`` unset for compose replicas: as many as there are."""
    spec = cfg.replicas
    assert spec is not None
    most = spec.maximum or (replicas if spec.discovered else spec.count)
    return Scaling(spec.minimum, most, spec.target_inflight)


class Pool:
    """The listener and the balancer of one service's replicas."""

    def __init__(self, cfg: ServiceConfig, front: McpFront) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.scaling = scaling_of(cfg)
        self.replicas: list[Service] = []
        self.stats = ServiceStats()  # outcomes decided before a replica took over
        self.connections: set[ClientSide] = set()  # not yet handed to a replica
        self.partial_heads = 0
        self.probe_streams = 0  # mode http: probes' event streams held open
        self.probe_rules: tuple[ProbeRule, ...] = compile_probes(cfg.http.matchers)
        self.scale_ups = 0
        self.moved = 0  # connections moved to another replica after a failed connect
        self.breakers: dict[str, Breaker] = {}
        # MCP sessions (mode http): pinned to the replica holding each, or virtual
        # (answered by the proxy) until their first real request places them.
        self.mcp = front
        front.asleep = self._sleeps
        front.incarnation_of = self._incarnation_of
        self.placed: collections.Counter[str] = collections.Counter()  # per replica
        self._server: asyncio.Server | None = None
        self._health: asyncio.Task[None] | None = None

    def __repr__(self) -> str:
        return f"<Pool {self.name} :{self.cfg.listen.port} replicas={len(self.replicas)}>"

    @property
    def sessions(self) -> Sessions:
        return self.mcp.sessions

    def update(self, cfg: ServiceConfig, replicas: list[Service]) -> None:
        """The replicas, oldest first, and the settings they share (after a reload)."""
        self.cfg = cfg
        self.mcp.settings = cfg.http
        self.scaling = scaling_of(cfg, len(replicas))
        self.probe_rules = compile_probes(cfg.http.matchers)
        self.replicas = replicas
        for replica in replicas:
            replica.pool = self
            self.breakers.setdefault(replica.name, Breaker())
        for name in set(self.breakers) - {r.name for r in replicas}:
            del self.breakers[name]
        if self._server is not None:
            self._start_checks()  # health_interval set by a reload

    def _place(self) -> Placement:
        now = asyncio.get_running_loop().time()
        usable = [self.breakers[r.name].usable(now) for r in self.replicas]
        held = self.sessions.by_replica() if len(self.sessions) else {}
        sessions = [held.get(r.name, 0) for r in self.replicas]
        return place([r.node for r in self.replicas], self.scaling, usable, sessions)

    # ---- start and close

    async def start(self) -> None:
        self._server = await open_listener(
            self.cfg,
            (lambda: HttpClientSide(self))
            if self.cfg.mode == "http"
            else (lambda: ClientSide(self)),
        )
        log.info(
            "%s: listening on %s for %d replica(s) (%d to %d awake, next one past %d "
            "attached connection(s) each)",
            self.name,
            self.cfg.listen,
            len(self.replicas),
            self.scaling.minimum,
            self.scaling.maximum,
            self.scaling.target,
            extra={"service": self.name},
        )
        self._start_checks()

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
        running = [(r, r.backend) for r in self.replicas if r.state is State.RUNNING and r.backend]
        timeout = min(self.cfg.connect_timeout, interval)
        results = await asyncio.gather(
            *(probe(backend, r.cfg.readiness, timeout) for r, backend in running if backend)
        )
        now = asyncio.get_running_loop().time()
        for (replica, _), healthy in zip(running, results, strict=True):
            breaker = self.breakers.get(replica.name)
            if breaker is None:
                continue
            if healthy:
                if breaker.passed(response=replica.cfg.readiness.http is not None):
                    log.info("%s: health check passed: circuit closed", replica.name)
            elif not healthy and breaker.state == "open":
                # Still failing: no trial connection while the checks say so (until past
                # the next round, which takes a probe's time on top).
                breaker.until = max(breaker.until, now + 2 * interval + timeout)
            elif not healthy:
                breaker.failed(now)
                log.warning(
                    "%s: health check failed: circuit open",
                    replica.name,
                    extra={"service": replica.name},
                )
        return True

    def stop_accepting(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    def close(self) -> None:
        self.stop_accepting()
        self.mcp.close()
        if self._health is not None:
            self._health.cancel()
            self._health = None
        for conn in list(self.connections):
            conn.abort()

    # ---- what the API and metrics read

    @property
    def state(self) -> State:
        """running while any replica runs; else the state of the replica a connection
        arriving now would go to (what it would find)."""
        if not self.replicas:
            return State.FAILED
        if any(r.state is State.RUNNING for r in self.replicas):
            return State.RUNNING
        return self.replicas[self._place().serve].state

    def awake(self) -> int:
        return sum(r.state is State.RUNNING or r.state in IN_FLIGHT for r in self.replicas)

    # ---- the connections' owner interface, until a replica takes one over

    @property
    def idle_connection_timeout(self) -> float:
        return self.cfg.idle_connection_timeout

    @property
    def wake_on_connect(self) -> bool:
        return self.cfg.mode == "tcp" and self.cfg.wake_on == "connect"

    @property
    def upstream_keepalive(self) -> bool:
        return False  # read only once a replica took the connection over

    @property
    def http(self) -> HttpSettings:
        return self.cfg.http

    @property
    def idle_delay(self) -> float:
        return self.cfg.sleep_policy.idle_delay

    def _incarnation_of(self, replica: str) -> int | None:
        held = next((r for r in self.replicas if r.name == replica), None)
        return None if held is None else held.incarnation

    def _sleeps(self, replica: str | None) -> bool:
        """Whether MCP set-up is answered by the proxy: for a new session always (it is
        placed with its first real request: set-up wakes no replica and counts toward
        no scale-up, whichever are awake), for one placed while its replica sleeps."""
        if replica is None:
            return True
        held = next((r for r in self.replicas if r.name == replica), None)
        return held is None or held.mcp_sleeps

    @property
    def replicated(self) -> bool:
        return True

    def connection_made(self, conn: ClientSide) -> bool:
        self.connections.add(conn)
        self.stats.accepted += 1
        limit = self.cfg.max_connections
        if limit and len(self.connections) + sum(len(r.connections) for r in self.replicas) > limit:
            self.stats.record(Outcome.REJECTED_LIMIT, conn.refuse(Outcome.REJECTED_LIMIT))
            return False
        return True

    def needs_backend(self, conn: ClientSide, *, activity: bool, attached: bool) -> None:
        if not self.replicas:
            self.stats.record(Outcome.BACKEND_ERROR, conn.refuse(Outcome.BACKEND_ERROR))
            return
        session = _session_of(conn)  # a pinned session goes home, whatever its circuit
        if session is not None:
            pinned = self._pinned(session)
            if isinstance(pinned, Gone):
                # Its replica is gone or was restarted: the session died with it. Never
                # another replica silently: the client is told, and starts a new one.
                self.connections.discard(conn)
                self.stats.record(Outcome.SESSION_GONE, conn.refuse(Outcome.SESSION_GONE))
                return
            if pinned is not None:
                self.connections.discard(conn)
                self.placed[pinned.name] += 1
                pinned.adopt(conn)
                pinned.needs_backend(conn, activity=activity, attached=attached)
                return
        placement = self._place()
        replica = self.replicas[placement.serve]
        self._chosen(replica, conn)
        self.connections.discard(conn)
        self.placed[replica.name] += 1
        replica.adopt(conn)
        replica.needs_backend(conn, activity=activity, attached=attached)
        if placement.wake is not None and activity:
            # Only real work scales up (never a probe's or a session set-up's connection).
            self.scale_ups += 1
            woken = self.replicas[placement.wake]
            awake = self.awake()
            woken.wake_in_background(
                f"scaling up: {sum(r.attached for r in self.replicas)} attached over "
                f"{awake} awake replica(s), target {self.scaling.target} each"
            )

    # ---- MCP sessions (mode http)

    def _pinned(self, session: bytes) -> Service | Gone | None:
        now = time.monotonic()  # the sessions' clock (httpmode.mcpfront's too)
        incarnations = {r.name: r.incarnation for r in self.replicas}
        where = self.sessions.where(session, incarnations, now, resume=self.mcp.resume)
        if isinstance(where, str):
            return next(r for r in self.replicas if r.name == where)
        if where is GONE:
            log.info(
                "%s: a request of session %s, whose replica is gone: 404",
                self.name,
                session[:16].decode("ascii", "replace"),
                extra={"service": self.name},
            )
        return where

    # ---- the replicas' reports

    def connected(self, replica: Service) -> None:
        breaker = self.breakers.get(replica.name)
        if breaker is not None and breaker.connected():
            log.info("%s: circuit closed again", replica.name, extra={"service": replica.name})

    def _chosen(self, replica: Service, conn: ClientSide) -> None:
        breaker = self.breakers[replica.name]
        breaker.chosen(asyncio.get_running_loop().time())
        if breaker.state != "closed":  # a trial: its first response byte is reported
            conn.on_answer = lambda: self._answered(replica)

    def _answered(self, replica: Service) -> None:
        breaker = self.breakers.get(replica.name)
        if breaker is not None and breaker.answered():
            log.info("%s: it answered: circuit closed again", replica.name)

    def ended(self, replica: Service, conn: ClientSide) -> None:
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

    def connect_failed(self, replica: Service, conn: ClientSide) -> bool:
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
        others = [r for r in self.replicas if r is not replica]
        if conn.moves >= len(others) or not others or conn.closed:
            return False
        placement = self._place()
        target = self.replicas[placement.serve]
        if target is replica:
            return False  # every circuit is open: no better choice than this one
        conn.moves += 1
        self.moved += 1
        replica.give_up(conn)
        self._chosen(target, conn)
        self.placed[target.name] += 1
        target.adopt(conn)
        target.needs_backend(conn, activity=True, attached=False)
        return True

    def no_longer_needs(self, conn: ClientSide) -> None:
        pass  # only a replica's connections need a backend

    def connection_lost(self, conn: ClientSide) -> None:
        self.connections.discard(conn)
        self.stats.bytes_up += conn.bytes_up
        self.stats.bytes_down += conn.bytes_down

    def record(self, outcome: Outcome, status: int | None = None) -> None:
        self.stats.record(outcome, status)

    # mode http, before a request goes to a replica

    def request_seen(self) -> None:
        pass  # a replica's connections only

    def result_due(self) -> None:
        pass  # a replica's connections only

    def wake_in_background(self, reason: str) -> None:
        """A browser asked while every replica sleeps: wake the one a request would."""
        if self.replicas:
            self.replicas[self._place().serve].wake_in_background(reason)

    def head_started(self) -> bool:
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
