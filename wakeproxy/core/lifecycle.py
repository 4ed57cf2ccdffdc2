"""One backend's state machine: which operation runs, what failed, when to retry.

Like h11's ``_state.py``: the transitions are all here, fed an event and the time,
returning the actions they call for. Connections, timers of the idle policy and the
links between services are the orchestrator's; this machine knows only its backend.

An event with no transition from the current state raises ``IllegalTransition``: the
orchestrator counts it (or, strict, re-raises it in tests) instead of dropping it.
"""

from __future__ import annotations

from .actions import Action, ArmTimer, Refresh, RunSleep, RunWake, Slept, WakeOp
from .events import (
    Event,
    Observed,
    SleepDone,
    SleepFailed,
    SleepRequested,
    Timer,
    TimerFired,
    WakeDone,
    WakeFailed,
    WakeRequested,
)
from .states import ASLEEP, IN_FLIGHT, SleepAction, SleepReason, State

BACKOFF_FIRST = 0.5
BACKOFF_MAX = 30.0

# The reason a state change shows in logs and in the API, per sleep reason.
_SLEEP_TEXT = {SleepReason.STOP_AFTER: "paused for stop_after"}
_REPORTED = (State.RUNNING, State.PAUSED, State.STOPPED, State.FAILED)


class IllegalTransition(Exception):
    """An event the machine has no transition for in its current state."""

    def __init__(self, event: Event, state: State) -> None:
        super().__init__(f"{event!r} has no transition from {state.value}")
        self.event = event
        self.state = state


class Lifecycle:
    """One backend. ``handle(event, now)`` returns the actions to perform."""

    __slots__ = (
        "failures",
        "reason",
        "retry_at",
        "since",
        "sleeping_for",
        "starting",
        "state",
        "wake_pending",
    )

    def __init__(self, state: State, *, now: float, reason: str = "initial state") -> None:
        self.state = state
        self.reason = reason
        self.since = now
        # A wake was asked for while a pause or stop ran: it follows at once.
        self.wake_pending = False
        self.failures = 0
        self.retry_at = now
        # Failed, but not known dead: its wake ran out of wake_timeout, or a re-read
        # found it running and not ready yet. A slow start goes on meanwhile, so a
        # connection inside the back-off is held for it (a fresh wake, its own
        # wake_timeout) instead of refused; the back-off refuses only for a backend
        # known broken (it exited while starting, the container is gone, an engine error).
        self.starting = False
        # Why the sleep in flight was asked for (counted when it succeeds).
        self.sleeping_for = SleepReason.IDLE

    def __repr__(self) -> str:
        return f"<Lifecycle state={self.state.value} reason={self.reason!r}>"

    def _go(self, state: State, reason: str, now: float) -> None:
        self.state = state
        self.reason = reason
        self.since = now

    def handle(self, event: Event, now: float) -> tuple[Action, ...]:
        match event:
            case WakeRequested(reason):
                return self._wake_requested(reason, now)
            case SleepRequested(action, reason):
                return self._sleep(action, reason, now)
            case WakeDone() if self.state is State.WAKING:
                self._go(State.RUNNING, "woken", now)
                self.failures = 0
                return ()
            case WakeFailed(reason, timed_out) if self.state is State.WAKING:
                return self._fail(reason, now, starting=timed_out)
            case SleepDone() if self.state in (State.PAUSING, State.STOPPING):
                return self._slept(now)
            case SleepFailed(reason) if self.state in (State.PAUSING, State.STOPPING):
                return self._sleep_failed(reason, now)
            case Observed(state, reason, starting) if state in _REPORTED:
                return self._observed(state, reason, starting, now)
            case TimerFired(Timer.RETRY):
                # Only a service still failed is re-read; anything else already moved on.
                return (Refresh(verify=True),) if self.state is State.FAILED else ()
        raise IllegalTransition(event, self.state)

    # ---- transitions

    def _wake_requested(self, reason: str, now: float) -> tuple[Action, ...]:
        if self.state in (State.PAUSING, State.STOPPING):
            # Waking in the middle of a pause or stop would race it: wake right after.
            self.wake_pending = True
            return ()
        if self.state in ASLEEP or self.state is State.FAILED:
            return self._begin_wake(reason, now)
        return ()  # running, or already waking: single flight

    def _begin_wake(self, why: str, now: float) -> tuple[Action, ...]:
        """From paused, stopped or failed: exactly one wake starts here."""
        previous = self.state
        self._go(State.WAKING, f"{why} while {previous.value}", now)
        if previous is State.PAUSED:
            return (RunWake(WakeOp.UNPAUSE),)
        if previous is State.STOPPED:
            return (RunWake(WakeOp.START),)
        return (RunWake(WakeOp.RECOVER),)

    def _fail(self, reason: str, now: float, *, starting: bool = False) -> tuple[Action, ...]:
        self._go(State.FAILED, reason, now)
        self.starting = starting
        self.failures += 1
        delay = min(BACKOFF_FIRST * 2 ** (self.failures - 1), BACKOFF_MAX)
        self.retry_at = now + delay
        return (ArmTimer(Timer.RETRY, self.retry_at),)

    def _sleep(self, action: SleepAction, reason: SleepReason, now: float) -> tuple[Action, ...]:
        # The orchestrator asks only from these states; anything else is a bug there.
        if action is SleepAction.PAUSE and self.state is State.RUNNING:
            self.sleeping_for = reason
            self._go(State.PAUSING, _SLEEP_TEXT.get(reason, reason.value), now)
            return (RunSleep(action),)
        if action is SleepAction.STOP and self.state in (State.RUNNING, State.PAUSED):
            self.sleeping_for = reason
            self._go(State.STOPPING, _SLEEP_TEXT.get(reason, reason.value), now)
            return (RunSleep(action),)
        raise IllegalTransition(SleepRequested(action, reason), self.state)

    def _slept(self, now: float) -> tuple[Action, ...]:
        action = SleepAction.PAUSE if self.state is State.PAUSING else SleepAction.STOP
        done = Slept(action, self.sleeping_for)
        self._go(State.PAUSED if action is SleepAction.PAUSE else State.STOPPED, self.reason, now)
        if self.wake_pending:
            # Someone arrived while it ran: wake straight away.
            self.wake_pending = False
            return (done, *self._begin_wake("wake pending", now))
        return (done,)

    def _sleep_failed(self, reason: str, now: float) -> tuple[Action, ...]:
        if self.wake_pending:
            # The backend's real state is unknown and someone waits: find out and
            # bring it up rather than refuse them.
            self.wake_pending = False
            self._go(State.WAKING, f"sleep failed ({reason}); recovering", now)
            return (RunWake(WakeOp.RECOVER),)
        return self._fail(f"sleep failed: {reason}", now)

    def _observed(
        self, state: State, reason: str, starting: bool, now: float
    ) -> tuple[Action, ...]:
        if self.state in IN_FLIGHT:
            # Our own operation is in flight; its result, not a report about it, decides.
            return ()
        if state is State.FAILED:
            # Also when already failed: a re-read that fails again backs off further.
            return self._fail(reason, now, starting=starting)
        if state is self.state:
            return ()
        if self.state is State.FAILED and self.starting and state in ASLEEP:
            # It ended while still starting (after its wake ran out of time): known
            # dead now, as a start that ends inside its wake. The back-off refuses; its
            # re-read then finds it stopped and a connection starts it again.
            return self._fail(f"the backend stopped while starting ({reason})", now)
        before = self.state
        self._go(state, reason, now)
        self.starting = False
        self.failures = 0
        if before is State.RUNNING and state in ASLEEP:
            # Put to sleep by someone else (docker pause by hand, a crashed command).
            action = SleepAction.PAUSE if state is State.PAUSED else SleepAction.STOP
            return (Slept(action, SleepReason.EXTERNAL),)
        return ()
