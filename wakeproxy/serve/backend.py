"""One backend's asyncio glue: its runtime, its held connections, its timers.

A backend is one runtime (a container, a command, a Swarm service) with its driver
(runtime operations, readiness), its admission (held connections, paced release,
upstream connects), its hibernator and its node in the decision core. A listener is a
``Frontend`` (``serve.frontend``): it places each connection on one of its backends, and
the backend feeds that connection's events to the core (``core.orchestrator``, through
the ``Coordinator``) and carries out the actions that come back.

Timers: one handle per backend and kind, armed when the core asks; the idle one only
when no connection is attached, re-armed when it fires early (aiohttp's keep-alive
pattern), so idle CPU is nothing however many services there are.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from ..config import Address, ServiceConfig
from ..core.actions import (
    Action,
    ArmTimer,
    CancelReclaim,
    CancelWake,
    Connect,
    Hold,
    Reclaim,
    Refresh,
    Refused,
    Reject,
    Release,
    RunSleep,
    RunWake,
    Slept,
    Transition,
    Unexpected,
    WakeEnded,
    WakeOp,
)
from ..core.events import (
    Arrive,
    Event,
    Leave,
    Observed,
    Reconfigured,
    ResultDue,
    SleepRequested,
    Timer,
    TimerFired,
)
from ..core.node import Node
from ..core.states import (
    ASLEEP,
    SleepAction,
    SleepReason,
    State,
    WakeResult,
)
from ..errors import OperationFailed, RuntimeFailure, ServiceBusy, WakeTimeout
from ..host.hibernate import Hibernator
from ..net.admission import Admission
from ..net.forward import ClientSide
from ..runtimes.base import Runtime
from .coordinator import policy_of
from .driver import RuntimeDriver
from .fastpath import FastPath, Kernel
from .stats import ServiceStats
from .waiters import Asks, Timers

if TYPE_CHECKING:
    from ..httpmode.mcpfront import McpFront
    from .coordinator import Coordinator
    from .predictions import Predictions

log = logging.getLogger("wakeproxy.service")
_INCARNATIONS = itertools.count(1)


class Backend:
    """One runtime behind a listener: the connections placed on it, its wakes and sleeps."""

    def __init__(
        self,
        cfg: ServiceConfig,
        runtime: Runtime,
        coordinator: Coordinator,
        *,
        initial: State,
        reason: str,
        predictions: Predictions | None = None,
        kernel: Kernel | None = None,
    ) -> None:
        self.loop = asyncio.get_running_loop()
        self.cfg = cfg
        self.name = cfg.name
        self.runtime = runtime
        self.coordinator = coordinator
        self.stats = ServiceStats()
        # The connections placed on it (its frontend holds every one of its listener's).
        self.connections: set[ClientSide] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._timers = Timers(self.loop, self._fire)
        self.asks = Asks(self.loop, self.feed, lambda: self.state)
        self._wake_started = time.perf_counter()
        self._closing = False
        self.driver = RuntimeDriver(
            cfg,
            runtime,
            report=self.feed,
            sleep_finished=self.asks.slept,
            spawn=self._spawn,
        )
        self.admission = Admission(
            self.name,
            self.stats,
            backend=lambda: self.driver.backend,
            spawn=self._spawn,
            on_connect_error=self._connect_failed,
            connect_timeout=cfg.connect_timeout,
            concurrency=cfg.connect_concurrency,
        )
        # The MCP sessions of the listener in front of it (mode http; set by it).
        self.mcp: McpFront | None = None
        self.predictions = predictions
        # New when the backend stops or fails (its MCP sessions died with it), and for a
        # new Service: unique in the process, so a replaced replica's old pins never match.
        self.incarnation = next(_INCARNATIONS)
        self.hibernator = Hibernator(
            self.name,
            runtime,
            self.stats,
            cfg=lambda: self.cfg,
            present=lambda: self.state in (State.RUNNING, State.PAUSED),
            report=self.feed,
            spawn=self._spawn,
        )
        # fast_path: kernel -- new connections go straight to it while it runs.
        self.fast_path = FastPath(cfg, runtime, kernel, self, spawn=self._spawn)
        runtime.on_change = self._runtime_changed
        if initial in ASLEEP:
            self.stats.asleep_since = self.loop.time()
        self.node: Node = coordinator.add(self, policy_of(cfg), initial, reason)

    def __repr__(self) -> str:
        idle = self.loop.time() - self.node.last_activity
        return (
            f"<Backend {self.name} :{self.cfg.listen.port} state={self.state.value} "
            f"held={self.held} attached={self.node.attached} idle_for={idle:.1f}s>"
        )

    # ---- what the API, metrics and connections read

    @property
    def state(self) -> State:
        return self.node.unit.state

    @property
    def reason(self) -> str:
        return self.node.unit.reason

    @property
    def backend(self) -> Address | None:
        return self.driver.backend

    @property
    def held(self) -> int:
        return self.admission.held

    @property
    def attached(self) -> int:
        """Connections that need the backend (held or forwarding): they keep it awake."""
        return self.node.attached

    @property
    def forwarding(self) -> int:
        """Attached connections that are not waiting for a wake."""
        return self.node.attached - self.admission.held

    @property
    def last_activity(self) -> float:
        return self.node.last_activity

    def sleeps_in(self) -> float | None:
        """Seconds until the idle deadline, or None when no sleep is due."""
        return self.node.sleeps_in(self.loop.time())

    def bytes_moved(self) -> tuple[int, int]:
        """Bytes client-to-backend and backend-to-client, open connections included."""
        up = self.stats.bytes_up + sum(c.bytes_up for c in self.connections)
        down = self.stats.bytes_down + sum(c.bytes_down for c in self.connections)
        return up, down

    def asleep_seconds(self, state: State | None = None) -> float:
        """Seconds the backend spent paused or stopped (or in ``state``) since the start."""
        return self.stats.asleep_seconds(state, self.state, self.loop.time())

    # ---- start and close

    async def start(self) -> None:
        """Find its address, say what it is (the timers were armed when the core took
        it), and wake it if it starts with the proxy."""
        if self.backend is None and self.state in (State.RUNNING, State.PAUSED):
            try:
                await self.driver.find_backend()
            except RuntimeFailure as exc:
                self.feed(Observed(State.FAILED, str(exc)))
        log.info(
            "%s: %s %s for %s (%s: %s)",
            self.name,
            "listening on" if self.cfg.replica_of is None else "a replica behind",
            self.cfg.listen,
            self.runtime.describe(),
            self.state.value,
            self.reason,
            extra={"service": self.name, "state": self.state.value},
        )
        self.hibernator.check_setup()
        self.fast_path.open()
        if self.state is State.RUNNING:
            self.fast_path.steer()
        if self.predictions is not None:
            self.predictions.attach(self)
        if self.cfg.auto_start:
            self.wake_in_background("auto_start")

    async def close(self) -> None:
        """Close every connection placed on it, cancel every timer and task."""
        # From here on no timer is armed and no runtime call starts: connections closed
        # below report back later, and the runtime itself is being closed.
        self._closing = True
        if self.predictions is not None:
            self.predictions.detach(self)
        self._timers.cancel()
        self.fast_path.close()
        for conn in list(self.connections):
            conn.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        self.asks.close()

    # ---- what its frontend asks (for the connections it places here)

    @property
    def upstream_keepalive(self) -> bool:
        return self.driver.upstream_keepalive

    @property
    def mcp_sleeps(self) -> bool:
        """MCP set-up is answered by the proxy: the backend is asleep, going there or on
        its way back. A failed one is not covered for: health checks see it as it is."""
        return self.state is not State.RUNNING and self.state is not State.FAILED

    def take(self, conn: ClientSide) -> None:
        """A connection its frontend placed here: it counts here from now on."""
        conn.backend = self
        self.connections.add(conn)

    def arrive(self, conn: ClientSide, *, activity: bool, attached: bool) -> None:
        """The connection needs the backend (from now on, or again): forwarded, held or
        refused as the core decides."""
        if not attached:
            self.stats.record_connection()
            predictions = self.predictions
            if predictions is not None and predictions.active:
                predictions.arrived(self)
        self.feed(Arrive(activity, attached), conn)

    def leave(self, conn: ClientSide) -> None:
        """An attached connection no longer keeps the backend up (mode http)."""
        self.feed(Leave())

    def give_up(self, conn: ClientSide) -> None:
        """The connection moves to another backend: it no longer needs this one."""
        self.connections.discard(conn)
        self.feed(Leave(held=self.admission.forget(conn), activity=False))

    def lost(self, conn: ClientSide) -> None:
        """A connection placed here closed."""
        self.connections.discard(conn)
        self.stats.bytes_up += conn.bytes_up
        self.stats.bytes_down += conn.bytes_down
        if conn.attached:
            self.feed(Leave(held=self.admission.forget(conn), activity=conn.active))

    def request_seen(self) -> None:
        """mode http: a request that is activity, on an attached connection."""
        self.node.touch(self.loop.time())

    def result_due(self) -> None:
        """mode http: a request answered 202; its result may still come on a stream."""
        self.feed(ResultDue(self.loop.time() + self.cfg.http.inflight_grace))

    def wake_in_background(self, reason: str) -> None:
        self._spawn(self._quietly("wake", lambda: self.wake(reason)))

    def sleep_in_background(self, reason: SleepReason) -> None:
        """Sleep by the policy's action if nothing needs the backend (a refusal is no
        fault: the idle timer sleeps it later)."""
        action = self.cfg.sleep_policy.action
        self._spawn(self._quietly("sleep", lambda: self.sleep(action, reason)))

    async def _quietly(self, what: str, operation: Callable[[], Awaitable[None]]) -> None:
        try:
            await operation()
        except ServiceBusy:
            pass
        except RuntimeFailure as exc:
            log.warning("%s: %s failed: %s", self.name, what, exc, extra={"service": self.name})

    # ---- the API: the backend without a connection

    async def wake(self, reason: str = "wake requested") -> None:
        """Return once the backend is running; raise RuntimeFailure if the wake fails."""
        await self.asks.wake(reason)

    async def sleep(
        self, action: SleepAction, reason: SleepReason = SleepReason.API, *, force: bool = False
    ) -> None:
        """Apply ``action`` now; refused (ServiceBusy) while connections are open or an
        awake service needs this one, unless ``force``. Returns once it finished."""
        self._look()  # connections the proxy never saw count too
        # Plain strings too ("pause"): the core compares enum members by identity.
        await self.asks.sleep(SleepRequested(SleepAction(action), SleepReason(reason), force))

    async def settled(self, within: float) -> State:
        """The state once no operation is in flight (at most ``within`` seconds): what an
        API answer reports, never a passing pausing or waking."""
        return await self.asks.settled(within)

    def reconfigure(self, cfg: ServiceConfig) -> None:
        """Apply changed live settings now; open connections are not touched. A new
        idle_connection_timeout applies to connections accepted from now on."""
        self.cfg = cfg
        self.driver.cfg = cfg
        self.admission.connect_timeout = cfg.connect_timeout
        self.admission.pacing.concurrency = cfg.connect_concurrency
        self.feed(Reconfigured(policy_of(cfg)))
        if self.predictions is not None:
            self.predictions.attach(self)  # new windows or predict settings

    def recheck(self) -> None:
        """Re-read the backend's state (a runtime registered after the listing it came from)."""
        self.driver.refresh()

    # ---- the core

    def feed(self, event: Event, conn: ClientSide | None = None) -> list[tuple[str, Action]]:
        if self._closing:
            return []
        return self.coordinator.feed(self, event, conn)

    def carry_out(self, action: Action, conn: ClientSide | None) -> None:
        """Perform one action the core decided for this service."""
        match action:
            case Connect():
                assert conn is not None
                self.admission.forward(conn)
            case Hold():
                assert conn is not None
                self.stats.found_asleep += 1
                self.admission.hold(conn)
            case Reject(outcome, reason, held):
                if held:
                    self.admission.refuse_held(outcome, reason)
                elif conn is not None:
                    self.admission.refuse(conn, outcome)
            case Release():
                self.admission.release()
            case RunWake(op):
                self.driver.wake(op)
                if op is WakeOp.UNPAUSE:
                    # The listener exists, frozen: held connections can connect now.
                    self.admission.thaw()
                elif op is WakeOp.START:
                    self.admission.starting()
            case CancelWake():
                self.driver.cancel_wake()
            case Reclaim():
                self.hibernator.reclaim()
            case CancelReclaim():
                self.hibernator.cancel()
            case RunSleep(sleep_action):
                self.driver.sleep(sleep_action)
            case Refresh(verify):
                self.driver.refresh(verify=verify)
            case ArmTimer(timer, at):
                if not self._closing:
                    self._timers.arm(timer, at)
            case Transition(before, after, reason):
                self._transitioned(before, after, reason)
            case WakeEnded(result, reason):
                self._wake_ended(result, reason)
            case Slept(sleep_action, sleep_reason):
                self.stats.sleeps[(sleep_action, sleep_reason)] += 1
            case Unexpected(event, state):
                self.stats.unexpected[type(event).__name__] += 1
                log.warning(
                    "%s: %s has no transition from %s (counted; please report it)",
                    self.name,
                    event,
                    state.value,
                    extra={"service": self.name},
                )
            case Refused():
                pass  # read by sleep(), which asked

    def _fire(self, timer: Timer) -> None:
        if timer is Timer.IDLE:
            self._look()
        self.feed(TimerFired(timer))

    def _look(self) -> None:
        """Tell the core what the kernel's fast path handed to the backend."""
        if (seen := self.fast_path.look(self.loop.time())) is not None:
            self.feed(seen)

    def _transitioned(self, before: State, after: State, reason: str) -> None:
        self.stats.record_transition(before, after, self.loop.time())
        self.fast_path.transitioned(before, after, self._look)
        if after in (State.STOPPED, State.FAILED):
            self.incarnation = next(_INCARNATIONS)
        if after is State.FAILED:
            self.stats.record_error(reason)
        self.asks.moved()
        if after is State.STOPPED:
            self.hibernator.forget()
        elif after is State.WAKING:
            # perf_counter: uvloop's loop.time() counts whole milliseconds.
            self._wake_started = time.perf_counter()
        predictions = self.predictions
        if predictions is not None and predictions.active:
            predictions.state_changed(self, before, after)
        log.info(
            "%s: %s -> %s (%s)",
            self.name,
            before.value,
            after.value,
            reason,
            extra={
                "service": self.name,
                "from": before.value,
                "state": after.value,
                "reason": reason,
            },
        )

    def _wake_ended(self, result: WakeResult, reason: str) -> None:
        elapsed = time.perf_counter() - self._wake_started
        self.stats.record_wake(result, elapsed)
        if result is WakeResult.OK:
            self.hibernator.woke()
            if self.predictions is not None and self.predictions.active:
                self.predictions.woke(self, elapsed)
            log.info(
                "%s: awake after %.1f ms (%d held)",
                self.name,
                elapsed * 1000,
                self.held,
                extra={"service": self.name, "wake_ms": round(elapsed * 1000, 3)},
            )
        else:
            log.warning(
                "%s: wake failed after %.1f ms: %s",
                self.name,
                elapsed * 1000,
                reason,
                extra={"service": self.name},
            )
        if result is WakeResult.OK:
            self.asks.woke()
        else:
            error = WakeTimeout if result is WakeResult.TIMEOUT else OperationFailed
            self.asks.woke(error(reason))

    def _connect_failed(self) -> None:
        if self.state is State.RUNNING:
            # The backend may have gone away behind our back: re-read its state so the
            # next connection starts it instead of failing the same way.
            self.driver.refresh()

    def _runtime_changed(self, state: State, reason: str) -> None:
        self.feed(Observed(state, reason))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
        if self._closing:
            coro.close()
            return None
        # Keep a reference: an unreferenced pending task can be collected mid-flight.
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task
