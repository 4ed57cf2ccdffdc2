"""Learned arrivals: per service, how likely a request is in each 15-minute slot of a week.

Pure: the predictor feeds each request's time; the table answers which slots are likely
and when they next come. The rules:

* **Slots.** 672 a week: Monday 00:00-00:15 is slot 0, Sunday 23:45-24:00 slot 671, by
  the wall clock of one zone (the predictor's). A slot is a wall-clock quarter hour, so
  09:00 stays 09:00 local across DST changes; on a change day a skipped slot does not
  happen, and a repeated one (the fold) is one slot (its first occurrence is predicted).
* **Estimate.** Per slot, an exponentially weighted average over weeks of "at least one
  request came in this slot that week": ``p <- (1 - alpha) p + alpha x``, alpha 0.3.
  Several requests in one slot in one week count once.
* **Lazy.** A slot stores ``(p, the last week it had a request)``. The occurrences since
  count as 0 when read: read for the occurrence in week ``w``, ``p * 0.7 ** (w - last - 1)``.
  Nothing ticks.
* **Figures** (alpha 0.3). A new pattern reads 0.3, 0.51, 0.66, 0.76 after 1, 2, 3, 4
  weeks: past the predictor's floor for arrivals (0.6) from its fourth week on. One that
  stops falls below 0.5 within two missed weeks whatever its history (even p = 1: 0.7 ** 2
  = 0.49; after three weeks of it, 0.66: one missed week). Every slot falls below the
  floor 0.01 after at most 13 missed weeks (0.7 ** 13 = 0.0097) and is dropped when next
  read.
* **Bounded.** At most 672 slots a service and ``max_slots`` in all: past it, the tenth
  with the lowest decayed p go at once (one sort for many inserts).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo

from .schedule import DAY_NAMES, Window, active, active_until, wall_time

SLOTS = 672
SLOT_MINUTES = 15
ALPHA = 0.3
FLOOR = 0.01
MAX_SLOTS = 65_536


@dataclass(frozen=True, slots=True)
class Likely:
    """A slot's next occurrence whose probability passed the threshold asked for."""

    slot: int
    start: float
    end: float
    p: float


def slot_label(slot: int) -> str:
    """``Mon 09:00``."""
    minute = slot % 96 * SLOT_MINUTES
    return f"{DAY_NAMES[slot // 96]} {minute // 60:02d}:{minute % 60:02d}"


def _monday(local: datetime) -> date:
    return local.date() - timedelta(days=local.weekday())


def _week(monday: date) -> int:
    # date(1, 1, 1) is a Monday with ordinal 1: weeks count from it.
    return (monday.toordinal() - 1) // 7


class Arrivals:
    """Slot tables of every service, in one zone."""

    def __init__(self, tz: ZoneInfo, alpha: float = ALPHA, max_slots: int = MAX_SLOTS) -> None:
        self.tz = tz
        self.alpha = alpha
        self.max_slots = max_slots
        self._tables: dict[str, dict[int, tuple[float, int]]] = {}
        self._count = 0

    def __len__(self) -> int:
        """Slots stored in all."""
        return self._count

    @property
    def tables(self) -> Mapping[str, Mapping[int, tuple[float, int]]]:
        """Every service's slots: slot -> (p, the last week it had a request). Read only."""
        return self._tables

    def where(self, now: float) -> tuple[int, int]:
        """(slot, week) of ``now`` on the zone's wall clock."""
        local = datetime.fromtimestamp(now, self.tz)
        slot = local.weekday() * 96 + (local.hour * 60 + local.minute) // SLOT_MINUTES
        return slot, _week(_monday(local))

    def read(self, entry: tuple[float, int], week: int) -> float:
        """The slot's p for its occurrence in ``week``."""
        p, last = entry
        return p * (1.0 - self.alpha) ** max(0, week - last - 1)

    def record(self, name: str, now: float) -> bool:
        """A request to ``name`` at ``now``; True when the table changed."""
        slot, week = self.where(now)
        table = self._tables.setdefault(name, {})
        entry = table.get(slot)
        if entry is None:
            table[slot] = (self.alpha, week)
            self._count += 1
            if self._count > self.max_slots:
                self._evict()
            return True
        # Once a week per slot; a clock set back to an earlier week changes nothing.
        if entry[1] >= week:
            return False
        # Rounded to keep the saved state small: p is at least alpha when written.
        table[slot] = (round((1.0 - self.alpha) * self.read(entry, week) + self.alpha, 6), week)
        return True

    @staticmethod
    def _target(slot: int, entry: tuple[float, int], where: tuple[int, int]) -> int:
        """The week of the slot's next occurrence not yet requested: this week's while it
        is ahead (or now and without a request yet), else next week's. ``where``: now's
        (slot, week), computed once by the caller."""
        current, week = where
        if slot > current or (slot == current and entry[1] < week):
            return week
        return week + 1

    def top(self, name: str, now: float, n: int = 20) -> list[tuple[int, float]]:
        """The ``n`` likeliest slots (slot, p for its next occurrence), likeliest first."""
        self.prune(name, now)
        table = self._tables.get(name, {})
        where = self.where(now)
        read = ((s, self.read(e, self._target(s, e, where))) for s, e in table.items())
        return heapq.nlargest(n, read, key=lambda item: (item[1], -item[0]))

    def upcoming(self, name: str, now: float, threshold: float) -> Iterator[Likely]:
        """Slot occurrences within the next week (at most one a slot, the first not yet
        requested and existing that day, not ended) whose p passes ``threshold``,
        soonest first (but for a slot inside a DST gap this week, whose next week's
        occurrence comes in this week's place: the caller compares starts anyway). Lazy:
        slots are taken in their order from now, so the caller's first hit costs one
        wall-clock computation, not one per likely slot."""
        self.prune(name, now)
        table = self._tables.get(name)
        if not table:
            return
        current, week = self.where(now)
        monday = _monday(datetime.fromtimestamp(now, self.tz))
        done = current in table and table[current][1] == week  # had its request already

        def order(slot: int) -> int:
            # This week's slots from the current one on, then next week's up to it (the
            # current one's next week last when this week's had its request).
            return SLOTS if slot == current and done else (slot - current) % SLOTS

        for slot in sorted(table, key=order):
            entry = table[slot]
            first = 0 if slot > current or (slot == current and not done) else 1
            for k in range(first, 2):
                p = self.read(entry, week + k)
                if p < threshold:
                    break  # next week's is no likelier
                start, end = self._span(monday + timedelta(days=7 * k), slot)
                if end <= start or end <= now:
                    continue  # skipped by a DST gap that day, or over
                yield Likely(slot, start, end, p)
                break

    def wake_at(
        self, name: str, now: float, threshold: float, lead: float, asleep: Sequence[Window]
    ) -> tuple[float, Likely] | None:
        """When to wake ``name`` for its next slot at or above ``threshold``: ``lead``
        seconds ahead of it (``now`` if that has passed), or when an asleep window ends if
        the slot is still on then; the earliest such wake, with its slot."""
        best: tuple[float, Likely] | None = None
        for likely in self.upcoming(name, now, threshold):
            if best is not None and likely.start - lead > best[0]:
                break  # soonest first: none later can be earlier
            at = max(now, likely.start - lead)
            if active(asleep, at) is not None:
                at = active_until(asleep, at) or at
                if at >= likely.end or active(asleep, at) is not None:
                    continue
            if best is None or at < best[0]:
                best = (at, likely)
        return best

    def _span(self, monday: date, slot: int) -> tuple[float, float]:
        day = monday + timedelta(days=slot // 96)
        minute = slot % 96 * SLOT_MINUTES
        return wall_time(self.tz, day, minute), wall_time(self.tz, day, minute + SLOT_MINUTES)

    def prune(self, name: str, now: float) -> None:
        """Drop ``name``'s slots decayed below the floor (and its table when empty)."""
        table = self._tables.get(name)
        if table is None:
            return
        where = self.where(now)
        gone = [s for s, e in table.items() if self.read(e, self._target(s, e, where)) < FLOOR]
        for slot in gone:
            del table[slot]
        self._count -= len(gone)
        if not table:
            del self._tables[name]

    def drop(self, name: str) -> None:
        self._count -= len(self._tables.pop(name, {}))

    def _evict(self) -> None:
        # Decayed to any one later week, p ranks as log p + last * -log(1 - alpha): the
        # same order whatever that week, so no clock is needed to compare.
        fade = -math.log(1.0 - self.alpha)

        def rank(item: tuple[str, int, tuple[float, int]]) -> float:
            return math.log(max(item[2][0], 1e-300)) + item[2][1] * fade

        everything = ((n, s, e) for n, t in self._tables.items() for s, e in t.items())
        for name, slot, _ in heapq.nsmallest(self.max_slots // 10 + 1, everything, key=rank):
            del self._tables[name][slot]
            self._count -= 1
            if not self._tables[name]:
                del self._tables[name]

    def load(self, name: str, rows: Iterable[tuple[int, float, int]]) -> None:
        """Slots read from a state (validated by the caller; rounded as when recorded);
        replaces ``name``'s."""
        self.drop(name)
        table = {slot: (round(p, 6), last) for slot, p, last in rows}
        if table:
            self._tables[name] = table
            self._count += len(table)
