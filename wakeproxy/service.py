"""One service's asyncio glue: its listener, its connections, its timers.

Decisions live in ``lifecycle.Lifecycle``; this module feeds it events (connections,
timer expiries, runtime results, changes the runtime saw) and performs the actions
it returns: runtime calls, holding, releasing and rejecting connections.

Timers: one idle handle per service, armed only when no connection is open (a
service never sleeps under an open connection, so bytes flowing need no timestamp);
when it fires early it re-arms for the remaining time (aiohttp's keep-alive pattern).
Idle CPU is nothing however many services there are.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from .config import Address, ServiceConfig, is_loopback
from .errors import OperationFailed, RuntimeFailure, ServiceBusy, WakeTimeout
from .forward import ClientSide, set_keepalive
from .httpmode import HttpClientSide, compile_probes, wake_then_send
from .lifecycle import (
    Action,
    Arrive,
    Event,
    HeldLeft,
    IdleDeadline,
    Lifecycle,
    Observed,
    Reject,
    RetryDue,
    SleepFailed,
    SleepRequested,
    SleepSucceeded,
    State,
    Step,
    StopDeadline,
    WakeFailed,
    WakeRequested,
    WakeSucceeded,
)
from .readiness import wait_ready
from .runtimes.base import Runtime

log = logging.getLogger("wakeproxy.service")

# Bound on a pause call; a stop gets stop_timeout on top.
SLEEP_OP_TIMEOUT = 30.0
_BACKEND_ERROR_LOG_EVERY = 5.0
# Upper bounds of the wake-latency histogram, fine enough to see 5-200 ms.
WAKE_BUCKETS = (
    0.005,
    0.01,
    0.015,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
)
_ASLEEP = (State.PAUSED, State.STOPPED)


@dataclass(slots=True)
class ServiceStats:
    """Plain counters, bumped per connection or per wake; read at scrape time."""

    wakes: collections.Counter[str] = field(default_factory=collections.Counter)
    # The most recent wake durations (bounded: a proxy runs for months).
    wake_seconds: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=1024)
    )
    sleeps: collections.Counter[tuple[str, str]] = field(default_factory=collections.Counter)
    connections: collections.Counter[str] = field(default_factory=collections.Counter)
    bytes_up: int = 0
    bytes_down: int = 0
    accepted: int = 0
    # Wake latency: counts per WAKE_BUCKETS slot (the last one is +Inf) and their sum.
    wake_buckets: list[int] = field(default_factory=lambda: [0] * (len(WAKE_BUCKETS) + 1))
    wake_sum: float = 0.0
    # Seconds spent paused and stopped, up to the last wake: a pause saves CPU only, a
    # stop memory too.
    asleep_by_state: dict[str, float] = field(
        default_factory=lambda: {"paused": 0.0, "stopped": 0.0}
    )
    # Per UTC hour (unix seconds // 3600): [wakes, connections]; the last 24 hours kept.
    hourly: dict[int, list[int]] = field(default_factory=dict)
    # mode http: responses the proxy gave itself (probes, errors), by status.
    http_answers: collections.Counter[int] = field(default_factory=collections.Counter)

    @property
    def last_wake_s(self) -> float | None:
        return self.wake_seconds[-1] if self.wake_seconds else None

    def count_hourly(self, index: int) -> None:
        hour = int(time.time() // 3600)
        slot = self.hourly.get(hour)
        if slot is None:
            # A new hour: drop the ones that fell out of the window.
            for old in [h for h in self.hourly if h <= hour - 24]:
                del self.hourly[old]
            slot = self.hourly[hour] = [0, 0]
        slot[index] += 1


def _internal_error(name: str, what: str, exc: Exception) -> str:
    log.error("%s: unexpected error during %s", name, what, exc_info=exc)
    return f"internal error during {what}: {exc!r}"


class Service:
    """A configured service: listener, lifecycle, runtime and the connections it owns."""

    def __init__(
        self,
        cfg: ServiceConfig,
        runtime: Runtime,
        *,
        initial: State,
        reason: str,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.cfg = cfg
        self.name = cfg.name
        self.runtime = runtime
        runtime.on_change = self._runtime_changed
        self.lifecycle = Lifecycle(
            initial,
            now=self.loop.time(),
            reason=reason,
            sleep_action=cfg.sleep_policy.action,
            max_held=cfg.max_held_connections,
        )
        # Keepalive probes on upstream sockets only for a backend across a network: on
        # loopback a vanished peer is a reset at once, and setting the options costs a
        # Python socket object per connection (about 10% of the CPU under churn).
        self.upstream_keepalive = False
        self.backend = cfg.backend
        self.probe_rules = compile_probes(cfg.http.matchers)
        self.stats = ServiceStats()
        self.connections: set[ClientSide] = set()
        self.open = 0  # attached connections: held or forwarding; they block sleep
        self.last_activity = self.loop.time()
        # mode http: no sleep before this (a POST answered 202 within inflight_grace).
        self.busy_until = 0.0
        self._held: dict[ClientSide, None] = {}
        self._release_queue: collections.deque[ClientSide] = collections.deque()
        self._releasing = 0
        self._waiters: list[asyncio.Future[None]] = []
        self._sleep_waiters: list[asyncio.Future[None]] = []
        self._asleep_since: float | None = None
        self._wake_started: float | None = None
        self._idle_handle: asyncio.TimerHandle | None = None
        self._stop_handle: asyncio.TimerHandle | None = None
        self._retry_handle: asyncio.TimerHandle | None = None
        self._refreshing = False
        # Wired by the Proxy: services woken first, those that need this one, and the
        # other members of its group.
        self.depends_on: list[Service] = []
        self.dependents: list[Service] = []
        self.group: list[Service] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._server: asyncio.Server | None = None
        self._closing = False
        self._last_error_log = 0.0
        self._errors_unlogged = 0

    def __repr__(self) -> str:
        idle = self.loop.time() - self.last_activity
        return (
            f"<Service {self.name} :{self.cfg.listen.port} state={self.state.value} "
            f"held={len(self._held)} conns={self.open} idle_for={idle:.1f}s>"
        )

    @property
    def backend(self) -> Address | None:
        return self._backend

    @backend.setter
    def backend(self, address: Address | None) -> None:
        self._backend = address
        self.upstream_keepalive = address is not None and not is_loopback(address.host)

    @property
    def state(self) -> State:
        return self.lifecycle.state

    @property
    def held(self) -> int:
        return len(self._held)

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes client-to-backend and backend-to-client, open connections included."""
        up = self.stats.bytes_up + sum(c.bytes_up for c in self.connections)
        down = self.stats.bytes_down + sum(c.bytes_down for c in self.connections)
        return up, down

    def asleep_seconds(self, state: State | None = None) -> float:
        """Seconds the backend spent paused or stopped (or in ``state``) since the start."""
        states = _ASLEEP if state is None else (state,)
        total = sum(self.stats.asleep_by_state[s.value] for s in states)
        if self._asleep_since is not None and self.state in states:
            total += self.loop.time() - self._asleep_since
        return total

    def sleeps_in(self) -> float | None:
        """Seconds until the idle deadline, or None when no sleep is due."""
        policy = self.cfg.sleep_policy
        if self.state is not State.RUNNING or self.open or not policy.sleeps:
            return None
        return max(0.0, self.sleep_deadline() - self.loop.time())

    def sleep_deadline(self) -> float:
        """Loop time from which the idle policy may put the backend to sleep."""
        return max(self.last_activity + self.cfg.sleep_policy.idle_delay, self.busy_until)

    # ---- start and close

    async def start(self) -> None:
        """Open the listener and arm the timers the initial state calls for."""
        if self.backend is None and self.state in (State.RUNNING, State.PAUSED):
            try:
                host = self.runtime.known_backend_host() or await self.runtime.backend_host()
                self.backend = Address(host or "", self.cfg.backend_port)
            except RuntimeFailure as exc:
                self._feed(Observed(State.FAILED, str(exc)))
        listen = self.cfg.listen
        self._server = await self.loop.create_server(
            (lambda: HttpClientSide(self))
            if self.cfg.mode == "http"
            else (lambda: ClientSide(self)),
            listen.host,
            listen.port,
            backlog=self.cfg.backlog,
            reuse_address=True,
        )
        for sock in self._server.sockets:
            set_keepalive(sock)
        self._enter(self.state)
        if self.state is State.FAILED:
            self._arm_retry()
        log.info(
            "%s: listening on %s for %s (%s: %s)",
            self.name,
            listen,
            self.runtime.describe(),
            self.state.value,
            self.lifecycle.reason,
            extra={"service": self.name, "state": self.state.value},
        )
        if self.cfg.auto_start:
            self.wake_in_background("auto_start")

    def stop_accepting(self) -> None:
        """Close the listener; open connections carry on (a graceful shutdown)."""
        if self._server is not None:
            self._server.close()
            self._server = None

    async def close(self) -> None:
        """Stop accepting, close every connection, cancel every timer and task."""
        # From here on no timer is armed and no runtime call starts: connections closed
        # below report back later, and the runtime itself is being closed.
        self._closing = True
        if self._server is not None:
            self._server.close()
            self._server = None
        for handle in (self._idle_handle, self._stop_handle, self._retry_handle):
            if handle is not None:
                handle.cancel()
        self._idle_handle = self._stop_handle = self._retry_handle = None
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for waiter in (*self._waiters, *self._sleep_waiters):
            if not waiter.done():
                waiter.set_exception(OperationFailed("the proxy is shutting down"))
        self._waiters.clear()
        self._sleep_waiters.clear()

    # ---- connections (called by ClientSide)

    def accepted(self, conn: ClientSide) -> None:
        self.connections.add(conn)
        self.stats.accepted += 1
        limit = self.cfg.max_connections
        if limit and len(self.connections) > limit:
            # Refused at once (mode http: 503): past the limit nothing is held or woken.
            self.stats.connections["rejected_limit"] += 1
            conn.reject("rejected_limit")
            return
        conn.arm_idle_timeout(self.cfg.idle_connection_timeout)
        # mode http waits for a request head: a probe must not wake anything.
        if self.cfg.wake_on == "connect" and self.cfg.mode == "tcp":
            self.attach(conn)

    def attach(self, conn: ClientSide, *, activity: bool = True) -> None:
        """The connection needs the backend: forward, hold or reject it."""
        conn.attached = True
        self.open += 1
        if activity:
            self.last_activity = self.loop.time()
        self.stats.count_hourly(1)
        self._feed(Arrive(), conn)

    # ---- mode http: requests on open connections

    def request_seen(self, conn: ClientSide) -> None:
        """A client request that is activity (not a probe, not session set-up)."""
        conn.active = True
        self.last_activity = self.loop.time()

    def block(self, conn: ClientSide) -> None:
        """allow-sleep: a quiet connection sent a request; it holds the backend awake again."""
        if not conn.attached and not conn.closed:
            conn.attached = True
            self.open += 1

    def unblock(self, conn: ClientSide) -> None:
        """allow-sleep: a connection with no request for idle_timeout and nothing in
        flight no longer keeps the backend awake."""
        if conn.attached:
            conn.attached = False
            self.open -= 1
            if self.open == 0:
                self._arm_idle()

    def note_accepted(self) -> None:
        """A POST answered 202: its result may still come on a stream (inflight_grace)."""
        self.busy_until = max(self.busy_until, self.loop.time() + self.cfg.http.inflight_grace)

    def wake_for(self, conn: HttpClientSide) -> None:
        self._spawn(wake_then_send(self, conn))

    def wake_in_background(self, reason: str) -> None:
        self._spawn(self._wake_quietly(reason))

    async def _wake_quietly(self, reason: str) -> None:
        try:
            await self.wake(reason)
        except RuntimeFailure as exc:
            log.warning("%s: wake failed: %s", self.name, exc, extra={"service": self.name})

    def detached(self, conn: ClientSide) -> None:
        self.connections.discard(conn)
        self.stats.bytes_up += conn.bytes_up
        self.stats.bytes_down += conn.bytes_down
        if not conn.attached:
            return
        self.open -= 1
        if conn.active:
            self.last_activity = self.loop.time()
        if conn in self._held:
            del self._held[conn]
            self._feed(HeldLeft())
        if self.open == 0:
            self._arm_idle()

    def idle_connection_closed(self, conn: ClientSide) -> None:
        self.stats.connections["idle_timeout"] += 1
        log.debug(
            "%s: closed a connection idle for %.0fs", self.name, self.cfg.idle_connection_timeout
        )

    # ---- API for callers that want the backend without a connection

    async def wake(self, reason: str = "wake requested") -> None:
        """Return once the backend is running; raise RuntimeFailure if the wake fails."""
        if self.state is State.RUNNING:
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._waiters.append(waiter)
        # Resolved by the release after the wake, or failed with its reason.
        self._feed(WakeRequested(reason))
        await waiter

    async def sleep(self, action: str, reason: str, *, force: bool = False) -> None:
        """Apply ``action`` (pause or stop) now; refuse while connections are open
        unless ``force``. Returns once the operation finished (the state says how)."""
        if self.open and not force:
            raise ServiceBusy(f"{self.open} connection(s) open; add ?force=true to {action} anyway")
        awake = self._awake_dependents()
        if awake and not force:
            names = ", ".join(s.name for s in awake)
            raise ServiceBusy(f"needed by {names} (awake); add ?force=true to {action} anyway")
        state = self.state
        if state in (State.WAKING, State.PAUSING, State.STOPPING):
            raise ServiceBusy(f"the service is {state.value}; try again when it settles")
        if state is State.FAILED:
            raise ServiceBusy(f"the service is failed: {self.lifecycle.reason}")
        if state is State.STOPPED or (state is State.PAUSED and action == "pause"):
            return
        waiter: asyncio.Future[None] = self.loop.create_future()
        self._sleep_waiters.append(waiter)
        self._feed(SleepRequested(action, reason))
        await waiter

    def reconfigure(self, cfg: ServiceConfig) -> None:
        """Apply changed live settings now; open connections are not touched. A new
        idle_connection_timeout applies to connections accepted from now on."""
        self.cfg = cfg
        self.probe_rules = compile_probes(cfg.http.matchers)
        self.lifecycle.sleep_action = cfg.sleep_policy.action
        self.lifecycle.max_held = cfg.max_held_connections
        # The new schedule takes effect at once: drop the old deadlines, arm the new ones.
        for handle in (self._idle_handle, self._stop_handle):
            if handle is not None:
                handle.cancel()
        self._idle_handle = self._stop_handle = None
        self._arm_idle()
        if self.state is State.PAUSED:
            self._arm_stop_after()

    # ---- the machine

    def _feed(self, event: Event, conn: ClientSide | None = None) -> None:
        before = self.lifecycle.state
        step = self.lifecycle.handle(event, self.loop.time())
        if self.lifecycle.state is not before:
            self._leave(before)
            self._enter(self.lifecycle.state)
            log.info(
                "%s: %s -> %s (%s)",
                self.name,
                before.value,
                self.lifecycle.state.value,
                self.lifecycle.reason,
                extra={
                    "service": self.name,
                    "from": before.value,
                    "state": self.lifecycle.state.value,
                    "reason": self.lifecycle.reason,
                },
            )
        self._apply(step, conn)

    def _apply(self, step: Step, conn: ClientSide | None) -> None:
        for action in step:
            if isinstance(action, Reject):
                self._reject(action, conn)
            elif action is Action.CONNECT:
                assert conn is not None
                if self._release_queue:
                    # Still feeding a just-woken backend: queue behind the released ones.
                    self._release_queue.append(conn)
                else:
                    self._connect(conn)
            elif action is Action.HOLD:
                assert conn is not None
                self._held[conn] = None
            elif action in (Action.UNPAUSE, Action.START, Action.RECOVER):
                # perf_counter: uvloop's loop.time() counts whole milliseconds.
                self._wake_started = time.perf_counter()
                self._spawn(self._wake(action))
            elif action in (Action.PAUSE, Action.STOP):
                self._spawn(self._sleep(action, self.lifecycle.reason))
            elif action is Action.RELEASE:
                self._release()
            elif action is Action.REFRESH:
                self._spawn(self._refresh())
            elif action is Action.SCHEDULE_RETRY:
                self._arm_retry()

    def _arm_retry(self) -> None:
        if self._retry_handle is not None:
            self._retry_handle.cancel()
        self._retry_handle = self.loop.call_at(self.lifecycle.retry_at, self._retry_due)

    def _retry_due(self) -> None:
        self._retry_handle = None
        self._feed(RetryDue())

    def _leave(self, state: State) -> None:
        if state in _ASLEEP and self._asleep_since is not None:
            slept = self.loop.time() - self._asleep_since
            self.stats.asleep_by_state[state.value] += slept
            self._asleep_since = None
        if state is State.RUNNING and self._idle_handle is not None:
            self._idle_handle.cancel()
            self._idle_handle = None
        elif state is State.PAUSED and self._stop_handle is not None:
            self._stop_handle.cancel()
            self._stop_handle = None

    def _enter(self, state: State) -> None:
        if state in _ASLEEP:
            self._asleep_since = self.loop.time()
        if state in _ASLEEP or state is State.FAILED:
            for dependency in self.depends_on:
                # One fewer service needs it awake: let its idle timer decide again.
                dependency._arm_idle()
        elif state is State.WAKING:
            for member in self.group:
                if member.state in (State.PAUSED, State.STOPPED, State.FAILED):
                    self._spawn(member._wake_with_group(f"group with {self.name}"))
        if state is State.RUNNING:
            self.last_activity = self.loop.time()
            self._arm_idle()
        elif state is State.PAUSED:
            self._arm_stop_after()

    def _arm_stop_after(self) -> None:
        policy = self.cfg.sleep_policy
        if policy.stop_after is not None and policy.sleeps and not self._closing:
            deadline = self.lifecycle.since + policy.stop_after
            self._stop_handle = self.loop.call_at(deadline, self._feed, StopDeadline())

    def _reject(self, action: Reject, conn: ClientSide | None) -> None:
        if action.held:
            held = list(self._held)
            self._held.clear()
            for item in held:
                self.stats.connections[action.outcome] += 1
                item.reject(action.outcome)
            failure = WakeTimeout if action.outcome == "wake_timeout" else OperationFailed
            for waiter in self._waiters:
                if not waiter.done():
                    waiter.set_exception(failure(action.reason))
            self._waiters.clear()
            if held:
                log.warning(
                    "%s: closed %d held connection(s): %s",
                    self.name,
                    len(held),
                    action.reason,
                    extra={"service": self.name, "outcome": action.outcome},
                )
        elif conn is not None:
            self.stats.connections[action.outcome] += 1
            conn.reject(action.outcome)

    # ---- idle timer

    def _arm_idle(self) -> None:
        policy = self.cfg.sleep_policy
        if self._idle_handle is not None or self.open or self.state is not State.RUNNING:
            return
        if self._closing:
            return
        if not policy.sleeps:
            return
        self._idle_handle = self.loop.call_at(self.sleep_deadline(), self._idle_fired)

    def _idle_fired(self) -> None:
        self._idle_handle = None
        policy = self.cfg.sleep_policy
        if self.open or self.state is not State.RUNNING or not policy.sleeps:
            return
        deadline = self.sleep_deadline()
        now = self.loop.time()
        if now < deadline:
            # Activity since the timer was armed: re-arm for the time that is left.
            self._idle_handle = self.loop.call_at(deadline, self._idle_fired)
            return
        if self._awake_dependents():
            # Needed by a service that is awake: checked again when that one sleeps.
            return
        if not all(member._idle_ready(now) for member in self.group):
            # The group sleeps together: the last member to become idle puts it to sleep.
            return
        self._feed(IdleDeadline())
        for member in self.group:
            if member.state is State.RUNNING:
                member._feed(IdleDeadline())

    # ---- runtime operations

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        if self._closing:
            coro.close()
            return
        # Keep a reference: an unreferenced pending task can be collected mid-flight.
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _wake(self, action: Action) -> None:
        wake_timeout = self.cfg.wake_timeout
        event: Event
        try:
            async with asyncio.timeout(wake_timeout):
                if self.depends_on:
                    await self._wake_dependencies()
                if action is Action.RECOVER:
                    found = await self.runtime.inspect()
                    action = {State.PAUSED: Action.UNPAUSE, State.STOPPED: Action.START}.get(
                        found, Action.RECOVER
                    )
                if action is Action.UNPAUSE:
                    await self.runtime.unpause()
                    if self.backend is None:
                        await self._resolve_backend()
                elif action is Action.START:
                    await self.runtime.start()
                    await self._after_start()
                elif self.backend is None:
                    await self._resolve_backend()
        except TimeoutError:
            event = WakeFailed(f"not ready within wake_timeout ({wake_timeout:g}s)", timed_out=True)
        except RuntimeFailure as exc:
            event = WakeFailed(str(exc))
        except Exception as exc:
            # A bug, not a backend fault: the wake still ends (held connections are
            # released, the retry back-off applies) instead of leaving it waking for ever.
            event = WakeFailed(_internal_error(self.name, "wake", exc))
        else:
            event = WakeSucceeded()
        self._record_wake(event)
        self._feed(event)

    async def _wake_dependencies(self) -> None:
        """Wake every dependency first, concurrently; each answers once it is ready."""
        results = await asyncio.gather(
            *(dep.wake(f"needed by {self.name}") for dep in self.depends_on),
            return_exceptions=True,
        )
        for dep, result in zip(self.depends_on, results, strict=True):
            if isinstance(result, RuntimeFailure):
                raise OperationFailed(f"dependency {dep.name} did not wake: {result}")
            if isinstance(result, BaseException):
                raise result

    async def _wake_with_group(self, reason: str) -> None:
        try:
            await self.wake(reason)
        except RuntimeFailure as exc:
            log.warning(
                "%s: %s: wake failed: %s", self.name, reason, exc, extra={"service": self.name}
            )

    def _awake_dependents(self) -> list[Service]:
        awake = (State.RUNNING, State.WAKING, State.PAUSING, State.STOPPING)
        return [s for s in self.dependents if s.state in awake]

    def _idle_ready(self, now: float) -> bool:
        """Whether this group member lets the group sleep now."""
        if self.state in (State.PAUSED, State.STOPPED, State.FAILED):
            return True
        policy = self.cfg.sleep_policy
        return (
            self.state is State.RUNNING
            and not self.open
            and policy.sleeps
            and now >= self.sleep_deadline()
        )

    def _record_wake(self, event: Event) -> None:
        started = self._wake_started
        elapsed = time.perf_counter() - started if started is not None else 0.0
        if isinstance(event, WakeSucceeded):
            self.stats.wakes["ok"] += 1
            self.stats.wake_seconds.append(elapsed)
            self.stats.wake_buckets[bisect.bisect_left(WAKE_BUCKETS, elapsed)] += 1
            self.stats.count_hourly(0)
            self.stats.wake_sum += elapsed
            log.info(
                "%s: awake after %.1f ms (%d held)",
                self.name,
                elapsed * 1000,
                len(self._held),
                extra={"service": self.name, "wake_ms": round(elapsed * 1000, 3)},
            )
        elif isinstance(event, WakeFailed):
            self.stats.wakes["timeout" if event.timed_out else "failed"] += 1
            log.warning(
                "%s: wake failed after %.1f ms: %s",
                self.name,
                elapsed * 1000,
                event.reason,
                extra={"service": self.name},
            )

    async def _resolve_backend(self) -> None:
        host = await self.runtime.backend_host()
        if not host:
            raise OperationFailed("the runtime reports no backend address")
        self.backend = Address(host, self.cfg.backend_port)

    async def _after_start(self) -> None:
        if self.cfg.backend is None:
            # Seed form: a started container may have a new address.
            await self._resolve_backend()
        readiness = self.cfg.readiness
        if not readiness.tcp and readiness.http is None:
            return
        assert self.backend is not None
        await wait_ready(
            self.backend,
            readiness,
            connect_timeout=self.cfg.connect_timeout,
            still_starting=self._still_starting,
        )

    async def _still_starting(self) -> bool:
        return await self.runtime.inspect() is State.RUNNING

    async def _sleep(self, action: Action, reason: str) -> None:
        limit = SLEEP_OP_TIMEOUT + (self.cfg.stop_timeout if action is Action.STOP else 0.0)
        event: Event
        try:
            async with asyncio.timeout(limit):
                if action is Action.PAUSE:
                    await self.runtime.pause()
                else:
                    await self.runtime.stop()
        except TimeoutError:
            event = SleepFailed(f"{action.value} did not finish within {limit:g}s")
        except RuntimeFailure as exc:
            event = SleepFailed(str(exc))
        except Exception as exc:
            event = SleepFailed(_internal_error(self.name, action.value, exc))
        else:
            event = SleepSucceeded()
            self.stats.sleeps[(action.value, reason)] += 1
        waiters, self._sleep_waiters = self._sleep_waiters, []
        for waiter in waiters:
            if waiter.done():
                continue
            if isinstance(event, SleepFailed):
                waiter.set_exception(OperationFailed(event.reason))
            else:
                waiter.set_result(None)
        if isinstance(event, SleepFailed):
            log.warning(
                "%s: %s failed: %s",
                self.name,
                action.value,
                event.reason,
                extra={"service": self.name},
            )
        self._feed(event)

    def recheck(self) -> None:
        """Re-read the backend's state (a runtime registered after the listing it came from)."""
        self._spawn(self._refresh())

    async def _refresh(self) -> None:
        if self._refreshing:
            return
        self._refreshing = True
        try:
            state = await self.runtime.inspect()
            reason = "state re-read"
            if state is not State.FAILED and self.cfg.backend is None:
                await self._resolve_backend()
        except RuntimeFailure as exc:
            state, reason = State.FAILED, str(exc)
        except Exception as exc:
            state, reason = State.FAILED, _internal_error(self.name, "state re-read", exc)
        finally:
            self._refreshing = False
        self._feed(Observed(state, reason))

    def _runtime_changed(self, state: State, reason: str) -> None:
        before = self.state
        self._feed(Observed(state, reason))
        if before is State.RUNNING and self.state in _ASLEEP:
            # Put to sleep by someone else (docker pause by hand, a crashed command).
            action = "pause" if self.state is State.PAUSED else "stop"
            self.stats.sleeps[(action, "external")] += 1

    # ---- connecting upstream

    def _release(self) -> None:
        """Connect every held connection, at most connect_concurrency at a time."""
        held = list(self._held)
        self._held.clear()
        self._release_queue.extend(held)
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._waiters.clear()
        self._pump()

    def _pump(self) -> None:
        limit = self.cfg.connect_concurrency
        queue = self._release_queue
        while queue and self._releasing < limit:
            conn = queue.popleft()
            if conn.closed:
                continue
            self._releasing += 1
            # The slot is given back when the backend answers (forward.SETTLE_AFTER):
            # a just-woken backend with a shallow listen backlog is fed at the pace it
            # accepts, not flooded into SYN retries.
            conn.arm_settle(self._settled)
            self._connect(conn)

    def _settled(self) -> None:
        self._releasing -= 1
        self._pump()

    def _connect(self, conn: ClientSide) -> None:
        self._spawn(self._open_upstream(conn))

    async def _open_upstream(self, conn: ClientSide) -> None:
        backend = self.backend
        try:
            if backend is None:
                raise OperationFailed("the backend address is not known yet")
            async with asyncio.timeout(self.cfg.connect_timeout):
                await self.loop.create_connection(
                    conn.upstream_protocol, backend.host, backend.port
                )
        except (OSError, TimeoutError, RuntimeFailure) as exc:
            conn.settle()
            if conn.closed:
                return
            self.stats.connections["backend_error"] += 1
            conn.reject("backend_error")
            self._backend_error(exc)
            return
        self.stats.connections["forwarded"] += 1

    def _backend_error(self, exc: BaseException) -> None:
        reason = "timed out" if isinstance(exc, TimeoutError) else str(exc) or type(exc).__name__
        now = time.monotonic()
        if now - self._last_error_log >= _BACKEND_ERROR_LOG_EVERY:
            more = f" (+{self._errors_unlogged} more)" if self._errors_unlogged else ""
            log.warning(
                "%s: cannot connect to backend %s: %s%s",
                self.name,
                self.backend,
                reason,
                more,
                extra={"service": self.name, "outcome": "backend_error"},
            )
            self._last_error_log = now
            self._errors_unlogged = 0
        else:
            self._errors_unlogged += 1
        if self.state is State.RUNNING:
            # The backend may have gone away behind our back: re-read its state so the
            # next connection starts it instead of failing the same way.
            self._spawn(self._refresh())
