"""What happened: the events the glue feeds the core, each with the time it happened.

Frozen dataclasses, like h11's events: cheap to build, compared by value in tests.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .policy import Policy
from .states import SleepAction, SleepReason, State


class Timer(enum.Enum):
    """The timers the core asks for; the glue keeps one handle per service and kind."""

    IDLE = "idle"  # the idle deadline (re-armed when it fires early)
    WAKE = "wake"  # wake_timeout of the wake in flight
    RETRY = "retry"  # the back-off after a failure
    STOP_AFTER = "stop_after"  # paused this long -> stopped
    HIBERNATE = "hibernate"  # paused this long -> memory given back


# ---- connections


@dataclass(frozen=True, slots=True)
class Arrive:
    """A connection needs the backend (tcp: accepted; http: a request to forward).

    ``activity`` stamps the idle clock (probes and MCP session set-up do not);
    ``attached`` says the connection is already counted as needing the backend (a
    request on a kept-alive connection whose backend was put to sleep under it).
    """

    activity: bool = True
    attached: bool = False


@dataclass(frozen=True, slots=True)
class Leave:
    """An attached connection no longer needs the backend: it closed, it has been quiet
    for idle_timeout (allow-sleep), or the probes it carried were all answered.
    ``held``: it was waiting for a wake."""

    held: bool = False
    activity: bool = False


@dataclass(frozen=True, slots=True)
class ResultDue:
    """mode http: a POST answered 202; its result may still come (no sleep before ``until``)."""

    until: float


@dataclass(frozen=True, slots=True)
class HoldAwake:
    """Prediction: no idle sleep before ``until`` (a keep-awake window's end, a likely
    slot's, a chain's window); replaces the last hold, so a shortened window or a used
    prediction lets go (0: no hold)."""

    until: float


@dataclass(frozen=True, slots=True)
class KernelConnections:
    """The kernel's fast path (``fast_path: kernel``): the connections it handed to the
    backend without the proxy, as read from the kernel now. ``attached``: open ones;
    ``last_activity``: when one of them last received data (None: unknown); ``arrived``:
    connections handed over since the last read (activity now, even if already gone)."""

    attached: int
    last_activity: float | None
    arrived: int


# ---- requests without a connection


@dataclass(frozen=True, slots=True)
class WakeRequested:
    """Someone (auto_start, the API, a browser's waiting page) wants the backend up."""

    reason: str = "wake requested"


@dataclass(frozen=True, slots=True)
class SleepRequested:
    """Sleep now (the API). Refused while connections are open or an awake service
    needs this one, unless ``force``."""

    action: SleepAction
    reason: SleepReason = SleepReason.API
    force: bool = False


# ---- results of the operations the core asked for


@dataclass(frozen=True, slots=True)
class WakeDone:
    """The unpause/start finished and the backend is ready."""


@dataclass(frozen=True, slots=True)
class WakeFailed:
    reason: str
    # Set by the core itself when wake_timeout passed (the glue never needs to).
    timed_out: bool = False


@dataclass(frozen=True, slots=True)
class SleepDone:
    """The pause/stop finished."""


@dataclass(frozen=True, slots=True)
class SleepFailed:
    reason: str


@dataclass(frozen=True, slots=True)
class Reclaimed:
    """The paused backend's memory was given back (``freed`` bytes, as measured)."""

    freed: int


@dataclass(frozen=True, slots=True)
class ReclaimFailed:
    """Nothing could be given back (no cgroup, no capability): it stays plainly paused."""

    reason: str


@dataclass(frozen=True, slots=True)
class Observed:
    """The runtime reports the backend's real state (an engine event, a re-read).
    ``starting``: with FAILED, it runs but is not ready yet (a re-read's readiness
    check failed): still coming up, not dead."""

    state: State
    reason: str
    starting: bool = False


@dataclass(frozen=True, slots=True)
class TimerFired:
    timer: Timer


@dataclass(frozen=True, slots=True)
class Reconfigured:
    """The service's settings changed (the API, a reload): deadlines follow at once."""

    policy: Policy


Event = (
    Arrive
    | Leave
    | ResultDue
    | HoldAwake
    | KernelConnections
    | WakeRequested
    | SleepRequested
    | WakeDone
    | WakeFailed
    | SleepDone
    | SleepFailed
    | Reclaimed
    | ReclaimFailed
    | Observed
    | TimerFired
    | Reconfigured
)
