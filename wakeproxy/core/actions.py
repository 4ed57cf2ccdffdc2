"""What to do: the actions the core returns, each addressed to one service.

The glue carries them out in order. ``Connect``, ``Hold`` and ``Reject(held=False)``
concern the connection whose ``Arrive`` produced them.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .events import Event, Timer
from .states import Outcome, SleepAction, SleepReason, State, WakeResult


class WakeOp(enum.Enum):
    UNPAUSE = "unpause"
    START = "start"  # then probe readiness
    RECOVER = "recover"  # state unknown: inspect, then unpause or start as needed


@dataclass(frozen=True, slots=True)
class Connect:
    """Forward the arriving connection now."""


@dataclass(frozen=True, slots=True)
class Hold:
    """Keep the arriving connection until Release (or a Reject of the held ones)."""


@dataclass(frozen=True, slots=True)
class Reject:
    """Close a connection the backend will not serve: the arriving one, or (``held``)
    every held one."""

    outcome: Outcome
    reason: str
    held: bool


@dataclass(frozen=True, slots=True)
class Release:
    """The backend is ready: forward every held connection (at a pace it accepts)."""


@dataclass(frozen=True, slots=True)
class RunWake:
    op: WakeOp


@dataclass(frozen=True, slots=True)
class CancelWake:
    """The wake in flight passed wake_timeout: stop it; its result will not be fed."""


@dataclass(frozen=True, slots=True)
class RunSleep:
    action: SleepAction


@dataclass(frozen=True, slots=True)
class Reclaim:
    """Give the paused backend's memory back; report Reclaimed or ReclaimFailed."""


@dataclass(frozen=True, slots=True)
class CancelReclaim:
    """The backend is leaving paused (a wake): stop the reclaim now; it reports nothing."""


@dataclass(frozen=True, slots=True)
class Refresh:
    """Re-read the backend's state and report it back with Observed. ``verify``: a
    backend found running must also pass one readiness probe (after a failure, such as
    a start that outlasted wake_timeout, running is not yet ready)."""

    verify: bool = False


@dataclass(frozen=True, slots=True)
class ArmTimer:
    """Fire ``TimerFired(timer)`` at loop time ``at``, replacing that timer's earlier arm."""

    timer: Timer
    at: float


@dataclass(frozen=True, slots=True)
class Refused:
    """The sleep request is refused (the API answers 409 with ``why``); ``forceable``:
    forcing it would go ahead (open connections, awake dependents)."""

    why: str
    forceable: bool


# ---- notifications: nothing to operate, something to log and count


@dataclass(frozen=True, slots=True)
class Transition:
    before: State
    after: State
    reason: str


@dataclass(frozen=True, slots=True)
class WakeEnded:
    result: WakeResult
    reason: str


@dataclass(frozen=True, slots=True)
class Slept:
    action: SleepAction
    reason: SleepReason


@dataclass(frozen=True, slots=True)
class Unexpected:
    """An event the state machine has no transition for (a bug somewhere): counted and
    logged, never silently dropped. A strict core raises IllegalTransition instead."""

    event: Event
    state: State


Action = (
    Connect
    | Hold
    | Reject
    | Release
    | RunWake
    | CancelWake
    | RunSleep
    | Reclaim
    | CancelReclaim
    | Refresh
    | ArmTimer
    | Refused
    | Transition
    | WakeEnded
    | Slept
    | Unexpected
)
