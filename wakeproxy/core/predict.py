"""Waking a backend before its request: schedules, learned arrivals, chains, accounting.

Pure: the glue feeds what happened (a request, a finished wake, a predicted wake carried
out, a sleep) with the time; the predictor answers when to wake what, and keeps the
books. The rules:

* **Schedules.** ``keep_awake`` windows: woken at a window's start, never slept inside it
  (``next_wake``, ``hold_until``); ``asleep`` windows: never woken ahead inside one, slept
  at its start if no connection is open (``sleep_now``, ``asleep_start``). Asleep wins
  where both hold, a lunch hour carved out of office hours (``schedule.next_awake``,
  ``keep_end``). A request still wakes a service at any time.
* **Arrivals** (``core.arrivals``): when the next likely slot comes (p >= ``threshold``,
  and never below ``ARRIVALS_FLOOR``: a habit of three weeks, not two), wake ahead of it by
  the lead time, if the service's measured wake is slow enough to be
  worth it (its median >= ``min_wake_time``; none measured yet: not woken ahead). Lead
  time: 1.5 x the median of the last 16 wakes plus 1 s: a wake slower than the median
  comes half the time, and the 1 s covers the glue's timer and the readiness check; a
  few seconds awake early cost little against a 15-minute slot.
* **Chains** (``core.chains``: an episode is defined by the follower's window). A request
  to A that starts an episode of A in B's ``chain_window`` returns, for each B with
  ``chains`` on, P(B | A) >= B's threshold, n_w(A) >= B's ``min_samples`` (rounded: three
  episodes minutes old are three, not 2.998) and not inside one of B's asleep windows, a
  prediction to wake B now until B's ``chain_window`` later. A needs only be configured.
* **Accounting.** ``predicted`` opens a predicted wake; the service's next request makes
  it used (awake seconds: from the wake to the request; after the prediction's ``until``
  too: it found its backend awake thanks to it), its sleep before any request wasted.
  Outcomes are queued for the plan, which ends their holds (``drain_outcomes``), and
  summed for the metrics (``stats``).
* **Bounded.** At most ``max_services`` services have learned state (slots, wake times,
  counts): past it the least recently requested (or woken) one loses all of it. Pairs,
  slots and open episodes have their own bounds; the settings (the config) are not bounded
  here. A name never configured (or forgotten) is ignored.
* **State.** ``to_state`` / ``from_state``: versioned, JSON-able, validated on the way
  in (``ValueError`` naming what is wrong). Open episodes and predictions, and the
  accounting, are not kept: they are about the running process.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any, Literal
from zoneinfo import ZoneInfo

from . import predict_state
from .arrivals import MAX_SLOTS, Arrivals, slot_label
from .chains import HALF_LIFE, MAX_EPISODES, MAX_PAIRS, WINDOW, Chains
from .predict_state import Snapshot
from .schedule import Window, active, keep_end, load_zone, next_awake, next_start

Kind = Literal["schedule", "arrivals", "chain"]
KINDS: tuple[Kind, ...] = ("schedule", "arrivals", "chain")
MAX_SERVICES = 4096
WAKE_SAMPLES = predict_state.WAKE_SAMPLES
LEAD_FACTOR = 1.5
LEAD_EXTRA = 1.0
MAX_OUTCOMES = 1024
# Replayed (bench row 11, docs/prediction.md), arrivals acted on at 0.5 were wasted more
# often than used (two weeks of a random session read as a habit); at 0.6, used twice as
# often as wasted. Chains keep the threshold as set: right at 0.5.
ARRIVALS_FLOOR = 0.6


@dataclass(frozen=True, slots=True)
class PredictSettings:
    """A service's ``predict`` block."""

    arrivals: bool = False
    chains: bool = False
    threshold: float = 0.5  # the probability needed to act
    # Seconds from a leader's request to this follower's, and of the leader's quiet that
    # starts its next episode (counted in this window).
    chain_window: float = WINDOW
    min_wake_time: float = 0.2  # arrivals: a wake faster than this is not worth one ahead
    min_samples: int = 3  # chains: n(A) needed before P(B | A) is trusted

    def __post_init__(self) -> None:
        # Written to fail on NaN too.
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold {self.threshold} (expected a probability in (0, 1])")
        if not 0.0 < self.chain_window < math.inf:
            raise ValueError(f"chain_window {self.chain_window} (expected seconds above 0)")
        if not 0.0 <= self.min_wake_time < math.inf:
            raise ValueError(f"min_wake_time {self.min_wake_time} (expected seconds, 0 or more)")
        if isinstance(self.min_samples, bool) or not 1 <= self.min_samples < 2**31:
            raise ValueError(f"min_samples {self.min_samples} (expected a count, 1 or more)")


def _trusted(episodes: float, min_samples: int) -> bool:
    # Rounded: a count decays from the moment it is made.
    return episodes >= min_samples - 0.5


@dataclass(frozen=True, slots=True)
class Prediction:
    """Wake ``service`` at ``at``; the prediction holds until ``until``."""

    service: str
    at: float
    until: float
    kind: Kind
    reason: str  # "chain git -> filesystem p=0.83", for logs and the API


@dataclass(frozen=True, slots=True)
class Outcome:
    """A predicted wake's end: ``used`` (a request came) or ``wasted`` (it slept first),
    after ``seconds`` awake on it."""

    service: str
    kind: Kind
    result: Literal["used", "wasted"]
    seconds: float


@dataclass(slots=True)
class _Service:
    settings: PredictSettings
    keep_awake: tuple[Window, ...]
    asleep: tuple[Window, ...]
    counts: dict[Kind, list[float]] = field(  # predicted, used, wasted, awake seconds
        default_factory=lambda: {kind: [0, 0, 0, 0.0] for kind in KINDS}
    )
    open: tuple[Kind, float] | None = None  # the predicted wake in progress: kind, since


class Predictor:
    """Every service's schedules, learned tables and accounting (the module's rules);
    ``zone``: the zone of the arrival slots' wall clock (windows carry their own)."""

    def __init__(
        self,
        zone: str | ZoneInfo = "UTC",
        *,
        max_services: int = MAX_SERVICES,
        max_pairs: int = MAX_PAIRS,
        max_slots: int = MAX_SLOTS,
        half_life: float = HALF_LIFE,
        max_episodes: int = MAX_EPISODES,
    ) -> None:
        self.tz = zone if isinstance(zone, ZoneInfo) else load_zone(zone)
        self.zone = self.tz.key
        self.max_services = max_services
        self.arrivals = Arrivals(self.tz, max_slots=max_slots)
        self.chains = Chains(half_life, max_pairs, max_episodes=max_episodes)
        self._services: dict[str, _Service] = {}
        self._windows: Counter[float] = Counter()  # chain_window -> followers with it
        self._chains_on = 0  # services with chains on: none, no chain bookkeeping at all
        self._wakes: dict[str, deque[float]] = {}
        self._seen: OrderedDict[str, None] = OrderedDict()  # learned state, LRU first
        self._outcomes: deque[Outcome] = deque(maxlen=MAX_OUTCOMES)

    # -- configuration --------------------------------------------------------------

    def configure(
        self,
        name: str,
        settings: PredictSettings,
        keep_awake: Sequence[Window] = (),
        asleep: Sequence[Window] = (),
    ) -> None:
        """Add a service or change its settings (live): what was learned is kept."""
        service = self._services.get(name)
        if service is None:
            self._services[name] = _Service(settings, tuple(keep_awake), tuple(asleep))
        else:
            self._unset(service.settings)
            service.settings = settings
            service.keep_awake, service.asleep = tuple(keep_awake), tuple(asleep)
        if settings.chains:
            self._windows[settings.chain_window] += 1
        self._chains_on += settings.chains
        self.chains.want(self._windows)
        # Its pairs were counted against its leaders' episodes in its window: in another
        # window they are no estimate of P, so they start afresh.
        self.chains.refollow(name, settings.chain_window)

    def forget(self, name: str) -> None:
        """A service removed: its settings, accounting and everything learned go."""
        service = self._services.pop(name, None)
        if service is not None:
            self._unset(service.settings)
            self.chains.want(self._windows)
        self._drop_learned(name)

    def _unset(self, settings: PredictSettings) -> None:
        if settings.chains:
            self._windows[settings.chain_window] -= 1
            if not self._windows[settings.chain_window]:
                del self._windows[settings.chain_window]
        self._chains_on -= settings.chains

    def configured(self) -> list[str]:
        return list(self._services)

    def learned(self) -> list[str]:
        """Names with learned state (slots, counts, wake times), least recently used first."""
        return list(self._seen)

    def tidy(self) -> None:
        """Now and then: windows no follower counts in any more stop being counted."""
        self.chains.tidy()

    # -- events ---------------------------------------------------------------------

    def arrived(self, name: str, now: float) -> list[Prediction]:
        """A request to ``name`` (once per new connection): learn from it, settle an open
        predicted wake (used), and answer the chain wakes due now."""
        service = self._services.get(name)
        if service is None:
            return []
        self._settle(name, service, now, "used")
        settings = service.settings
        learned = settings.arrivals and self.arrivals.record(name, now)
        out: list[Prediction] = []
        if self._chains_on:
            learned = True
            if settings.chains:
                self.chains.follow(name, now, settings.chain_window)
            started = self.chains.starts(name, now)
            if started:
                # From the episodes before this one: it has had no time to be followed.
                out = self._chain_wakes(name, now, started)
            self.chains.request(name, now)
        if learned:
            self._touch(name)
        return out

    def _chain_wakes(self, leader: str, now: float, started: list[float]) -> list[Prediction]:
        out = []
        for follower, p, _, window in self.chains.followers(leader, now):
            service = self._services.get(follower)
            if service is None or not service.settings.chains or window not in started:
                continue  # not a chain follower, or the leader's episode in its window goes on
            settings = service.settings
            n = self.chains.episodes(leader, now, window)
            # P as the API shows it (3 places): counts are stored to 1e-6, so a follower of
            # every episode reads 0.9999997, and threshold 1.0 would never wake it.
            if not _trusted(n, settings.min_samples) or round(p, 3) < settings.threshold:
                continue
            if active(service.asleep, now) is not None:
                continue
            reason = f"chain {leader} -> {follower} p={p:.2f}"
            out.append(Prediction(follower, now, now + settings.chain_window, "chain", reason))
        return out

    def woke(self, name: str, now: float, wake_seconds: float) -> None:
        """A wake of ``name`` from sleep finished after ``wake_seconds`` (from the request
        or prediction to running): one sample of its lead time."""
        if name not in self._services or not 0.0 <= wake_seconds < math.inf:
            return
        # Rounded, like every stored number, to keep the saved state small.
        self._wakes.setdefault(name, deque(maxlen=WAKE_SAMPLES)).append(round(wake_seconds, 3))
        self._touch(name)

    def predicted(self, name: str, now: float, prediction: Prediction) -> bool:
        """The glue woke ``name`` on ``prediction``: open it. False (not counted) when one
        is open already (the service was awake: no wake, no outcome) or not configured."""
        service = self._services.get(name)
        if service is None or service.open is not None:
            return False
        service.open = (prediction.kind, now)
        service.counts[prediction.kind][0] += 1
        return True

    def slept(self, name: str, now: float) -> None:
        """``name`` went to sleep: a predicted wake still open was wasted."""
        service = self._services.get(name)
        if service is not None:
            self._settle(name, service, now, "wasted")

    def _settle(
        self, name: str, service: _Service, now: float, result: Literal["used", "wasted"]
    ) -> None:
        if service.open is None:
            return
        kind, since = service.open
        service.open = None
        seconds = max(0.0, now - since)
        counts = service.counts[kind]
        counts[1 if result == "used" else 2] += 1
        counts[3] += seconds
        self._outcomes.append(Outcome(name, kind, result, seconds))

    def drain_outcomes(self) -> list[Outcome]:
        """Outcomes since the last call (the glue ends the holds of these predictions)."""
        out = list(self._outcomes)
        self._outcomes.clear()
        return out

    # -- decisions ------------------------------------------------------------------

    def next_wake(self, name: str, now: float) -> Prediction | None:
        """The next timed wake of ``name``: its keep-awake schedule's or learned arrivals',
        whichever is first, never inside an asleep window; ``at`` is ``now`` when it is due
        (inside a keep-awake window, a lead longer than the time left). None: not in a week."""
        service = self._services.get(name)
        if service is None:
            return None
        found = [self._schedule_wake(name, service, now), self._arrivals_wake(name, service, now)]
        wakes = [p for p in found if p is not None]
        return min(wakes, key=lambda p: p.at) if wakes else None

    def _schedule_wake(self, name: str, service: _Service, now: float) -> Prediction | None:
        found = next_awake(service.keep_awake, service.asleep, now) if service.keep_awake else None
        if found is None:
            return None
        at, window = found
        until = keep_end(service.keep_awake, service.asleep, at)
        return Prediction(name, at, until, "schedule", f"schedule {window.text}")

    def _arrivals_wake(self, name: str, service: _Service, now: float) -> Prediction | None:
        settings = service.settings
        lead = self.lead_time(name)
        if not settings.arrivals or lead is None:
            return None
        if (self.wake_estimate(name) or 0.0) < settings.min_wake_time:
            return None
        threshold = max(settings.threshold, ARRIVALS_FLOOR)
        found = self.arrivals.wake_at(name, now, threshold, lead, service.asleep)
        if found is None:
            return None
        at, likely = found
        reason = f"arrivals {slot_label(likely.slot)} {self.zone} p={likely.p:.2f}"
        return Prediction(name, at, likely.end, "arrivals", reason)

    def hold_until(self, name: str, now: float) -> float:
        """Inside a keep-awake window: when it ends (or the next asleep window starts, if
        sooner): the idle timer does not sleep the service before. Else 0.0."""
        service = self._services.get(name)
        if service is None or self.sleep_now(name, now):
            return 0.0
        if active(service.keep_awake, now) is None:
            return 0.0
        return keep_end(service.keep_awake, service.asleep, now)

    def sleep_now(self, name: str, now: float) -> bool:
        """Inside an asleep window: the glue sleeps the service if no connection is open."""
        service = self._services.get(name)
        return service is not None and active(service.asleep, now) is not None

    def asleep_start(self, name: str, now: float) -> float | None:
        """When the next asleep window of ``name`` starts."""
        service = self._services.get(name)
        return None if service is None else next_start(service.asleep, now)

    def wake_estimate(self, name: str) -> float | None:
        """The median of the last wakes' seconds (None before the first)."""
        wakes = self._wakes.get(name)
        return statistics.median(wakes) if wakes else None

    def lead_time(self, name: str) -> float | None:
        estimate = self.wake_estimate(name)
        return None if estimate is None else estimate * LEAD_FACTOR + LEAD_EXTRA

    # -- views ----------------------------------------------------------------------

    def stats(self, name: str) -> dict[str, Any]:
        """The accounting of ``name``: per kind and in all."""
        service = self._services.get(name)
        if service is None:
            return {}
        kinds = {
            kind: {"predicted": c[0], "used": c[1], "wasted": c[2], "awake_seconds": c[3]}
            for kind, c in service.counts.items()
        }
        total = {key: sum(k[key] for k in kinds.values()) for key in kinds["schedule"]}
        open_ = (
            None if service.open is None else {"kind": service.open[0], "since": service.open[1]}
        )
        return {**total, "kinds": kinds, "open": open_}

    def table(self, name: str, now: float, top: int = 20) -> dict[str, Any]:
        """What ``GET /services/NAME/prediction`` shows (JSON-able); {} when unknown."""
        service = self._services.get(name)
        if service is None:
            return {}
        wake = self.next_wake(name, now)
        return {
            "service": name,
            "zone": self.zone,
            "settings": asdict(service.settings),
            "keep_awake": [w.text for w in service.keep_awake],
            "asleep": [w.text for w in service.asleep],
            "slots": [
                {"slot": slot, "when": slot_label(slot), "p": round(p, 3)}
                for slot, p in self.arrivals.top(name, now, top)
            ],
            **self.chains.view(name, now, self._trusted),
            "wake": {
                "samples": len(self._wakes.get(name, ())),
                "estimate": self.wake_estimate(name),
                "lead": self.lead_time(name),
            },
            "accounting": self.stats(name),
            "next_wake": None
            if wake is None
            else {
                "at": wake.at,
                "iso": datetime.fromtimestamp(wake.at, self.tz).isoformat(timespec="seconds"),
                "until": wake.until,
                "kind": wake.kind,
                "reason": wake.reason,
            },
        }

    def _trusted(self, n: float, follower: str) -> bool:
        service = self._services.get(follower)
        return service is not None and _trusted(n, service.settings.min_samples)

    def tracked(self) -> tuple[int, int, int]:
        """(services with learned state, pairs, slots): the bounded sizes."""
        return len(self._seen), self.chains.pairs, len(self.arrivals)

    # -- bounds ---------------------------------------------------------------------

    def _touch(self, name: str) -> None:
        self._seen[name] = None
        self._seen.move_to_end(name)
        while len(self._seen) > self.max_services:
            oldest = next(iter(self._seen))
            if oldest == name:
                break
            self._drop_learned(oldest)

    def _drop_learned(self, name: str) -> None:
        self._seen.pop(name, None)
        self.arrivals.drop(name)
        self.chains.drop(name)
        self._wakes.pop(name, None)

    # -- state ----------------------------------------------------------------------

    def to_state(self) -> dict[str, Any]:
        """Everything learned, JSON-able (see ``from_state``)."""
        return self.snapshot().state()

    def snapshot(self) -> Snapshot:
        """A copy of what was learned, cheaper than its JSON form (the slot tables are
        copied whole, their entries being tuples), for the event loop; ``Snapshot.state``
        turns it into ``to_state``'s form anywhere, a thread included (costs: prediction.md)."""
        return Snapshot(
            zone=self.zone,
            services=list(self._seen),
            arrivals={name: dict(table) for name, table in self.arrivals.tables.items()},
            chains=self.chains.counts(),
            wake_times={name: list(wakes) for name, wakes in self._wakes.items()},
        )

    @classmethod
    def from_state(
        cls,
        data: object,
        zone: str | ZoneInfo | None = None,
        *,
        max_services: int = MAX_SERVICES,
        max_pairs: int = MAX_PAIRS,
        max_slots: int = MAX_SLOTS,
        half_life: float = HALF_LIFE,
        now: float | None = None,
    ) -> Predictor:
        """A predictor with what ``to_state`` wrote; ValueError naming what is wrong on
        anything malformed or past the bounds. ``zone``: the slots' zone now (None: the
        state's); another zone's slots are dropped, the rest kept. ``now``: the time it is
        read at; a count or slot dated later (a clock that was ahead, a hand-made file) is
        taken as of ``now``, else it would stay at full weight until the clock got there."""
        state = predict_state.check(data, max_services, max_pairs, max_slots)
        if now is not None:
            week = Arrivals(load_zone(state.zone)).where(now)[1]
            state = predict_state.clamped(state, now, week)
        predictor = cls(
            state.zone if zone is None else zone,
            max_services=max_services,
            max_pairs=max_pairs,
            max_slots=max_slots,
            half_life=half_life,
        )
        for name in state.services:
            predictor._seen[name] = None
        if predictor.zone == state.zone:
            for name, rows in state.arrivals.items():
                predictor.arrivals.load(name, rows)
        predictor.chains.load(state.episodes, state.pairs)
        for name, wakes in state.wake_times.items():
            predictor._wakes[name] = deque((round(w, 3) for w in wakes), maxlen=WAKE_SAMPLES)
        return predictor
