"""A service's counters: plain integers bumped per connection or per wake, read at scrape
time (``metrics.py``, ``views.py``), so they add nothing to the per-chunk path."""

from __future__ import annotations

import bisect
import collections
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..core.states import ASLEEP, Outcome, SleepAction, SleepReason, State, WakeResult

# Upper bounds of the wake-latency histogram, fine enough to see 5-200 ms.
WAKE_BUCKETS = (
    0.005, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
)  # fmt: skip
_WAKES, _CONNECTIONS = 0, 1  # the two counts kept per hour


@dataclass(frozen=True, slots=True)
class Counts:
    """A service's counters at one moment: a copy of ``ServiceStats``'s, for readers."""

    wakes: Mapping[WakeResult, int]
    wake_seconds: tuple[float, ...]  # the most recent wakes' durations, oldest first
    wake_buckets: tuple[int, ...]  # per WAKE_BUCKETS slot, the last one +Inf
    wake_sum: float
    sleeps: Mapping[tuple[SleepAction, SleepReason], int]
    connections: Mapping[Outcome, int]
    http_answers: Mapping[int, int]
    accepted: int
    found_asleep: int
    hourly: Mapping[int, tuple[int, int]]  # UTC hour -> (wakes, connections)
    hibernations: Mapping[str, int]
    reclaimed_bytes: int
    hibernate_fallbacks: Mapping[str, int]
    unexpected: Mapping[str, int]
    last_error: tuple[float, str] | None

    @property
    def last_wake_s(self) -> float | None:
        return self.wake_seconds[-1] if self.wake_seconds else None


@dataclass(slots=True)
class ServiceStats:
    wakes: collections.Counter[WakeResult] = field(default_factory=collections.Counter)
    # The most recent wake durations (bounded: a proxy runs for months).
    wake_seconds: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=1024)
    )
    # Wake latency: counts per WAKE_BUCKETS slot (the last one is +Inf) and their sum.
    wake_buckets: list[int] = field(default_factory=lambda: [0] * (len(WAKE_BUCKETS) + 1))
    wake_sum: float = 0.0
    sleeps: collections.Counter[tuple[SleepAction, SleepReason]] = field(
        default_factory=collections.Counter
    )
    connections: collections.Counter[Outcome] = field(default_factory=collections.Counter)
    # mode http: responses the proxy gave itself (probes, errors), by status.
    http_answers: collections.Counter[int] = field(default_factory=collections.Counter)
    accepted: int = 0
    # Connections held for a wake: they found the backend asleep (or waking).
    found_asleep: int = 0
    # Bytes of connections that ended; open ones are added when read (Service.bytes_moved).
    bytes_up: int = 0
    bytes_down: int = 0
    # Seconds spent paused and stopped, up to the last wake: a pause saves CPU only, a
    # stop memory too.
    asleep_by_state: dict[State, float] = field(
        default_factory=lambda: {State.PAUSED: 0.0, State.STOPPED: 0.0}
    )
    # Loop time the backend fell asleep, while it is.
    asleep_since: float | None = None
    # Per UTC hour (unix seconds // 3600): [wakes, connections]; the last 24 hours kept.
    hourly: dict[int, list[int]] = field(default_factory=dict)
    # Hibernation: by method (cgroup); bytes given back as measured; the times
    # it fell back to a plain pause, by reason.
    hibernations: collections.Counter[str] = field(default_factory=collections.Counter)
    reclaimed_bytes: int = 0
    hibernate_fallbacks: collections.Counter[str] = field(default_factory=collections.Counter)
    # Events the core had no transition for: a bug somewhere, never silently dropped.
    unexpected: collections.Counter[str] = field(default_factory=collections.Counter)
    # (wall-clock time, why) of the last failure, until a wake succeeds.
    last_error: tuple[float, str] | None = None

    @property
    def last_wake_s(self) -> float | None:
        return self.wake_seconds[-1] if self.wake_seconds else None

    def counts(self) -> Counts:
        """A copy of the counters (missing keys read 0, as in a Counter)."""
        return Counts(
            wakes=collections.Counter(self.wakes),
            wake_seconds=tuple(self.wake_seconds),
            wake_buckets=tuple(self.wake_buckets),
            wake_sum=self.wake_sum,
            sleeps=collections.Counter(self.sleeps),
            connections=collections.Counter(self.connections),
            http_answers=collections.Counter(self.http_answers),
            accepted=self.accepted,
            found_asleep=self.found_asleep,
            hourly={hour: (slot[0], slot[1]) for hour, slot in self.hourly.items()},
            hibernations=collections.Counter(self.hibernations),
            reclaimed_bytes=self.reclaimed_bytes,
            hibernate_fallbacks=collections.Counter(self.hibernate_fallbacks),
            unexpected=collections.Counter(self.unexpected),
            last_error=self.last_error,
        )

    def record(self, outcome: Outcome, status: int | None = None) -> None:
        """What became of one connection (and, mode http, the status the proxy answered).

        The one place outcomes are counted: every path that ends or forwards a
        connection calls this exactly once for it.
        """
        self.connections[outcome] += 1
        if status is not None:
            self.http_answers[status] += 1

    def record_error(self, reason: str) -> None:
        """The service failed: kept until a wake succeeds, so the status still says why
        once a retry re-read the state ("stopped: state re-read")."""
        self.last_error = (time.time(), reason)

    def record_wake(self, result: WakeResult, seconds: float) -> None:
        self.wakes[result] += 1
        if result is WakeResult.OK:
            self.last_error = None
            self.wake_seconds.append(seconds)
            self.wake_buckets[bisect.bisect_left(WAKE_BUCKETS, seconds)] += 1
            self.wake_sum += seconds
            self.count_hourly(_WAKES)

    def record_connection(self) -> None:
        self.count_hourly(_CONNECTIONS)

    def count_hourly(self, index: int) -> None:
        hour = int(time.time() // 3600)
        slot = self.hourly.get(hour)
        if slot is None:
            # A new hour: drop the ones that fell out of the window.
            for old in [h for h in self.hourly if h <= hour - 24]:
                del self.hourly[old]
            slot = self.hourly[hour] = [0, 0]
        slot[index] += 1

    def record_transition(self, before: State, after: State, now: float) -> None:
        """Time asleep, by state: closed on leaving paused or stopped, opened on entering."""
        if before in ASLEEP and self.asleep_since is not None:
            self.asleep_by_state[before] += now - self.asleep_since
            self.asleep_since = None
        if after in ASLEEP:
            self.asleep_since = now

    def asleep_seconds(self, state: State | None, current: State, now: float) -> float:
        """Seconds spent paused or stopped (or in ``state``), the current stretch included."""
        states = (State.PAUSED, State.STOPPED) if state is None else (state,)
        total = sum(self.asleep_by_state[s] for s in states)
        if self.asleep_since is not None and current in states:
            total += now - self.asleep_since
        return total
