"""A service's sleep/wake lifecycle as a pure state machine (no I/O, no event loop).

Like h11's connection state, every decision lives here: the glue in ``service.py``
feeds an event with the current time and performs the actions it gets back. Time is
an argument, so every transition is testable with plain function calls.

States (the names the API and metrics use):

    running   backend up; connections are forwarded at once
    paused    frozen (docker pause / SIGSTOP); a wake is an unpause, ~10 ms
    stopped   not running; a wake is a start plus a readiness probe
    waking    one unpause/start is in flight; arriving connections are held
    pausing   a pause is in flight; arrivals are held and wake it right after
    stopping  a stop is in flight; likewise
    failed    the last operation failed or the backend is missing; retried with back-off
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class State(enum.Enum):
    RUNNING = "running"
    PAUSED = "paused"
    STOPPED = "stopped"
    WAKING = "waking"
    PAUSING = "pausing"
    STOPPING = "stopping"
    FAILED = "failed"


# ---- events: what happened


@dataclass(frozen=True, slots=True)
class Arrive:
    """A client connection needs the backend."""


@dataclass(frozen=True, slots=True)
class HeldLeft:
    """A held connection went away before it was released."""


@dataclass(frozen=True, slots=True)
class WakeRequested:
    """Someone (auto_start, the API) asks for the backend without a connection."""

    reason: str = "wake requested"


@dataclass(frozen=True, slots=True)
class WakeSucceeded:
    pass


@dataclass(frozen=True, slots=True)
class WakeFailed:
    reason: str
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class IdleDeadline:
    """The sleep policy's deadline passed with no open connection."""


@dataclass(frozen=True, slots=True)
class StopDeadline:
    """The backend has been paused for ``stop_after``."""


@dataclass(frozen=True, slots=True)
class SleepRequested:
    """Sleep now for a reason other than idleness (the API, shutdown)."""

    action: str
    reason: str


@dataclass(frozen=True, slots=True)
class SleepSucceeded:
    pass


@dataclass(frozen=True, slots=True)
class SleepFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Observed:
    """The runtime reports the backend's real state (start-up, engine event, refresh)."""

    state: State
    reason: str


@dataclass(frozen=True, slots=True)
class RetryDue:
    """The back-off after a failure ran out."""


Event = (
    Arrive
    | HeldLeft
    | WakeRequested
    | WakeSucceeded
    | WakeFailed
    | IdleDeadline
    | StopDeadline
    | SleepRequested
    | SleepSucceeded
    | SleepFailed
    | Observed
    | RetryDue
)


# ---- actions: what the glue must do


class Action(enum.Enum):
    CONNECT = "connect"  # connect this connection upstream now
    HOLD = "hold"  # keep this connection until RELEASE or REJECT_HELD
    UNPAUSE = "unpause"
    START = "start"  # start, then probe readiness
    RECOVER = "recover"  # state unknown: inspect, then unpause or start as needed
    PAUSE = "pause"
    STOP = "stop"
    RELEASE = "release"  # connect every held connection (bounded concurrency)
    REFRESH = "refresh"  # inspect and report back with Observed
    SCHEDULE_RETRY = "schedule_retry"  # arm the back-off timer for ``retry_at``


@dataclass(frozen=True, slots=True)
class Reject:
    """Close a connection (``held=False``: the arriving one; True: all held ones)."""

    outcome: str
    reason: str
    held: bool


Step = tuple[Action | Reject, ...]

_ASLEEP = (State.PAUSED, State.STOPPED)
_BUSY = (State.WAKING, State.PAUSING, State.STOPPING)
BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0


class Lifecycle:
    """One service's lifecycle. ``handle(event, now)`` returns the actions to perform."""

    __slots__ = (
        "failures",
        "held",
        "max_held",
        "reason",
        "retry_at",
        "since",
        "sleep_action",
        "state",
        "wake_pending",
    )

    def __init__(
        self,
        state: State,
        *,
        now: float,
        reason: str = "initial state",
        sleep_action: str = "pause",
        max_held: int = 1024,
    ) -> None:
        self.state = state
        self.reason = reason
        self.since = now
        self.sleep_action = sleep_action
        self.max_held = max_held
        self.held = 0
        # A connection or request arrived while a pause/stop was in flight.
        self.wake_pending = False
        self.failures = 0
        self.retry_at = 0.0

    def __repr__(self) -> str:
        return f"<Lifecycle state={self.state.value} held={self.held} reason={self.reason!r}>"

    def _go(self, state: State, reason: str, now: float) -> None:
        self.state = state
        self.reason = reason
        self.since = now

    def handle(self, event: Event, now: float) -> Step:
        match event:
            case Arrive():
                return self._arrive(now)
            case HeldLeft():
                self.held = max(0, self.held - 1)
                return ()
            case WakeRequested(reason):
                return self._wake_requested(reason, now)
            case WakeSucceeded():
                return self._wake_succeeded(now)
            case WakeFailed(reason, timed_out):
                return self._wake_failed(reason, timed_out, now)
            case IdleDeadline():
                return self._sleep("idle", self.sleep_action, now)
            case StopDeadline():
                # Only a backend still paused is stopped: a wake since then cancels it.
                if self.state is State.PAUSED:
                    return self._sleep("paused for stop_after", "stop", now)
                return ()
            case SleepRequested(action, reason):
                return self._sleep(reason, action, now)
            case SleepSucceeded():
                return self._sleep_succeeded(now)
            case SleepFailed(reason):
                return self._sleep_failed(reason, now)
            case Observed(state, reason):
                return self._observed(state, reason, now)
            case RetryDue():
                # Only a service still failed is re-inspected; anything else already moved on.
                return (Action.REFRESH,) if self.state is State.FAILED else ()
        raise TypeError(f"not a lifecycle event: {event!r}")

    # ---- transitions

    def _arrive(self, now: float) -> Step:
        if self.state is State.RUNNING:
            return (Action.CONNECT,)
        if self.state is State.FAILED and now < self.retry_at:
            # Back-off: a broken backend is not hammered by every new connection.
            return (Reject("backend_error", self.reason, held=False),)
        if self.held >= self.max_held:
            # Past the cap the connection is closed at once; nothing else waits on it.
            return (Reject("rejected_overflow", "hold queue full", held=False),)
        self.held += 1
        if self.state in _BUSY:
            # A wake in flight serves it; a pause/stop in flight is followed by a wake,
            # so no race can leave the backend asleep under a live connection.
            if self.state is not State.WAKING:
                self.wake_pending = True
            return (Action.HOLD,)
        return (Action.HOLD, *self._begin_wake("connection", now))

    def _wake_requested(self, reason: str, now: float) -> Step:
        if self.state in (State.PAUSING, State.STOPPING):
            self.wake_pending = True
            return ()
        if self.state in _ASLEEP or self.state is State.FAILED:
            return self._begin_wake(reason, now)
        return ()

    def _begin_wake(self, why: str, now: float) -> Step:
        """From paused, stopped or failed: exactly one wake starts here (single flight)."""
        previous = self.state
        self._go(State.WAKING, f"{why} while {previous.value}", now)
        if previous is State.PAUSED:
            return (Action.UNPAUSE,)
        if previous is State.STOPPED:
            return (Action.START,)
        return (Action.RECOVER,)

    def _wake_succeeded(self, now: float) -> Step:
        if self.state is not State.WAKING:
            return ()
        self._go(State.RUNNING, "woken", now)
        self.failures = 0
        self.held = 0
        return (Action.RELEASE,)

    def _wake_failed(self, reason: str, timed_out: bool, now: float) -> Step:
        if self.state is not State.WAKING:
            return ()
        outcome = "wake_timeout" if timed_out else "backend_error"
        self.held = 0
        return (Reject(outcome, reason, held=True), *self._fail(reason, now))

    def _fail(self, reason: str, now: float) -> Step:
        self._go(State.FAILED, reason, now)
        self.failures += 1
        delay = min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)
        self.retry_at = now + delay
        return (Action.SCHEDULE_RETRY,)

    def _sleep(self, reason: str, action: str, now: float) -> Step:
        if action == "pause" and self.state is State.RUNNING:
            self._go(State.PAUSING, reason, now)
            return (Action.PAUSE,)
        if action == "stop" and self.state in (State.RUNNING, State.PAUSED):
            self._go(State.STOPPING, reason, now)
            return (Action.STOP,)
        return ()

    def _sleep_succeeded(self, now: float) -> Step:
        if self.state not in (State.PAUSING, State.STOPPING):
            return ()
        self._go(State.PAUSED if self.state is State.PAUSING else State.STOPPED, self.reason, now)
        if self.wake_pending or self.held:
            # Someone arrived while the pause/stop ran: wake straight away.
            self.wake_pending = False
            return self._begin_wake("connection held", now)
        return ()

    def _sleep_failed(self, reason: str, now: float) -> Step:
        if self.state not in (State.PAUSING, State.STOPPING):
            return ()
        waiting = self.held or self.wake_pending
        self.wake_pending = False
        if waiting:
            # The backend's real state is unknown and someone waits: find out and
            # bring it up rather than reject them.
            self._go(State.WAKING, f"sleep failed ({reason}); recovering", now)
            return (Action.RECOVER,)
        return self._fail(f"sleep failed: {reason}", now)

    def _observed(self, state: State, reason: str, now: float) -> Step:
        if self.state in _BUSY:
            # Our own operation is in flight; its result, not an engine event about
            # it, decides the next state.
            return ()
        if state is State.FAILED:
            # Also when already failed: a refresh that fails again backs off further.
            return self._fail(reason, now)
        if state is self.state:
            return ()
        self._go(state, reason, now)
        self.failures = 0
        return ()
