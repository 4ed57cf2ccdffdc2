"""Where a service with replicas sends a new connection, and when it wakes another.

Pure: it reads each replica's ``Node`` (state, attached connections) and returns a
decision; the glue (``wakeproxy.serve.pool``) carries it out. The rules:

* **Balance.** A connection goes to the running replica with the fewest attached
  connections (the oldest on a tie, so load gathers on the old ones and the newest go
  idle first). With none running, to a waking one (it is held there), else to the
  oldest sleeping one (its arrival wakes it), else to the oldest failed one (its
  back-off decides).
* **Scale up.** When the attached connections per awake (running or waking) replica,
  this one counted, pass ``target``, the oldest sleeping replica is woken beside it, up
  to ``maximum`` awake. The connection is not held for it: it goes to an awake one.
* **Scale down** is the idle timers' (each replica sleeps on its own), in order: a
  replica does not sleep while a newer one is awake (``Orchestrator.order_replicas``),
  so the newest sleeps first. The first ``minimum`` never sleep.
* **Circuit breaker.** A replica whose connect failed (refused, reset, timed out) is
  skipped for a back-off (``Breaker``: open), 1 s doubling to 30 s; then one trial
  connection may go to it (half-open): it closes the circuit when its connect completes,
  reopens it when it fails. A replica skipped this way is neither served nor woken, unless
  every replica is.
* **Passive health.** A connection the backend ended (FIN or reset) without one byte of
  response, though the client had sent it some, counts as a failed connect: a replica
  that accepts and closes at once ends its connections fastest, so least-attached
  balancing fed it the most (43% of the requests over 3 replicas) while its connects all
  completed. A circuit opened that way is closed by a response byte (a connection that
  ended with one), not by a connect, which proves nothing for such a backend; nor by a
  TCP-only health check.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .node import Node
from .states import ASLEEP, State

_AWAKE_OR_WAKING = frozenset({State.RUNNING, State.WAKING})


@dataclass(frozen=True, slots=True)
class Scaling:
    """``replicas: {min, max, target_inflight}``."""

    minimum: int
    maximum: int
    target: int


@dataclass(frozen=True, slots=True)
class Placement:
    """The replica (an index, oldest first) that takes the connection, and the one to
    wake beside it (None: no scaling now)."""

    serve: int
    wake: int | None = None


BREAKER_FIRST = 1.0
BREAKER_MAX = 30.0


class Breaker:
    """One replica's circuit: closed (used), open (skipped until ``until``), half-open
    (one trial connection in flight)."""

    __slots__ = ("failures", "opened", "silent", "state", "until")
    # A trial that never reports (its client left while the replica woke, the wake
    # failed) would keep the circuit half-open for good: after this long, another.
    TRIAL_WITHIN = 10.0

    def __init__(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.until = 0.0
        self.opened = 0  # times it opened, for the metrics
        # Opened (also) by a connection that ended silent: only a response closes it.
        self.silent = False

    def usable(self, now: float) -> bool:
        """Whether a connection may go to this replica now (read-only): closed, or past
        the back-off (open), or past a trial's time (half-open)."""
        return self.state == "closed" or now >= self.until

    def chosen(self, now: float) -> None:
        """A connection was placed on it: past the back-off, that one is the trial."""
        if self.state != "closed":
            self.state = "half_open"
            self.until = now + self.TRIAL_WITHIN

    def failed(self, now: float, *, silent: bool = False) -> None:
        """A connect to it failed (``silent``: a connection ended with no response).
        While open already (connects sent before it opened failing one after another)
        the back-off is not doubled again."""
        self.silent = self.silent or silent
        if self.state == "open":
            return
        self.failures += 1
        self.state = "open"
        self.opened += 1
        self.until = now + min(BREAKER_FIRST * 2 ** (self.failures - 1), BREAKER_MAX)

    def succeeded(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.silent = False

    def connected(self) -> bool:
        """A connect to it completed; True when that closed the circuit (not one opened
        by silent connections: such a backend completes every connect)."""
        if self.state == "closed" or self.silent:
            return False
        self.succeeded()
        return True

    def passed(self, *, response: bool) -> bool:
        """An active health check passed (``response``: it read an answer, an HTTP
        probe; a TCP one only connects); True when that closed the circuit."""
        if self.state == "closed" or (self.silent and not response):
            return False
        self.succeeded()
        return True

    def answered(self) -> bool:
        """A response byte came from it; True when that closed the circuit."""
        if self.state == "closed":
            return False
        self.succeeded()
        return True

    def ended(self, now: float, *, sent: int, received: int, by_backend: bool) -> str | None:
        """A connection to it ended: ``sent`` bytes to it, ``received`` from it,
        ``by_backend``: it was the backend that closed (FIN or reset). Returns what
        changed: "closed" (a response came), "opened" (none, for bytes sent, and the
        backend closed) or None."""
        if received:
            return "closed" if self.answered() else None
        if sent and by_backend:
            was = self.state
            self.failed(now, silent=True)
            return "opened" if was != "open" else None
        return None  # the client left first, or sent nothing: says nothing of the backend


def place(
    replicas: Sequence[Node],
    scaling: Scaling,
    usable: Sequence[bool] | None = None,
    sessions: Sequence[int] | None = None,
) -> Placement:
    """Where a new connection goes, and whether the load asks for one more replica.

    ``usable``: per replica, whether its circuit lets a connection go there (all True
    when None, or when none is). ``sessions``: per replica, the MCP sessions it holds:
    among replicas with as few attached connections, the one holding fewest (a session
    outlives its connections: sessions opened one after another spread).
    """
    if usable is not None and any(usable) and not all(usable):
        kept = [i for i, ok in enumerate(usable) if ok]
        held = None if sessions is None else [sessions[i] for i in kept]
        inner = place([replicas[i] for i in kept], scaling, sessions=held)
        wake = None if inner.wake is None else kept[inner.wake]
        # The skipped ones still count against max while awake.
        awake_now = sum(n.unit.state in _AWAKE_OR_WAKING for n in replicas)
        if wake is not None and awake_now >= scaling.maximum:
            wake = None
        return Placement(kept[inner.serve], wake)
    states = [node.unit.state for node in replicas]
    serve = _least_attached(replicas, State.RUNNING, sessions)
    if serve is None:
        serve = _least_attached(replicas, State.WAKING, sessions)
    if serve is None:
        serve = _first(states, ASLEEP)
        if serve is None:
            serve = _first(states, frozenset({State.FAILED}))
        # Nothing awake: this connection's own arrival wakes ``serve``; more follow
        # from the load once it runs.
        return Placement(0 if serve is None else serve)
    awake = [i for i, state in enumerate(states) if state in _AWAKE_OR_WAKING]
    load = sum(replicas[i].attached for i in awake) + 1
    if load > len(awake) * scaling.target and len(awake) < scaling.maximum:
        return Placement(serve, _first(states, ASLEEP))
    return Placement(serve)


def _least_attached(
    replicas: Sequence[Node], state: State, sessions: Sequence[int] | None
) -> int | None:
    """The replica in ``state`` with the fewest attached connections, then sessions;
    the oldest on a tie."""
    candidates = [i for i, node in enumerate(replicas) if node.unit.state is state]
    if not candidates:
        return None
    held = sessions or [0] * len(replicas)
    return min(candidates, key=lambda i: (replicas[i].attached, held[i]))


def _first(states: Sequence[State], among: frozenset[State]) -> int | None:
    return next((i for i, state in enumerate(states) if state in among), None)
