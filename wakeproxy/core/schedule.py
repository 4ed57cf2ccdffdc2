"""Time windows: when a service is kept awake (``keep_awake``) or left asleep (``asleep``).

Pure calendar arithmetic over ``zoneinfo``: every function takes ``now`` (epoch seconds)
and answers from the windows alone. The rules:

* **Grammar.** ``[DAYS] HH:MM-HH:MM [ZONE]``, e.g. ``mon-fri 08:00-18:00 Europe/Berlin``.
  DAYS is a day ``mon`` .. ``sun``, a range ``mon-fri`` (it may wrap: ``fri-mon`` is Friday
  to Monday), a comma list of both (``mon,wed,fri-sat``) or ``daily``; absent, every day.
  Days are case-insensitive. ZONE is an IANA name (``Europe/Berlin``, ``UTC``); absent,
  the ``default_zone`` given to ``parse_window``.
* **Times.** 00:00 .. 24:00, 24:00 only as an end. An end at or before the start crosses
  midnight: the window ends on the next day, and DAYS name the day it starts (``fri
  22:00-02:00`` is Friday 22:00 to Saturday 02:00; ``sun 22:00-06:00`` runs into Monday).
  ``00:00-24:00`` is a whole day. A start equal to its end is refused: it reads as an
  empty window as well as a 24-hour one, and a whole day is written ``00:00-24:00``.
* **Wall time.** Start and end are wall-clock times in the window's zone, DST-correct:
  08:00-18:00 Europe/Berlin is 06:00-16:00 UTC in summer and 07:00-17:00 UTC in winter. A
  wall time is the first instant at which the zone's clock reads that time or later: in a
  fold (clocks set back: 02:30 happens twice) the first occurrence; in a gap (clocks set
  forward: 02:30 never happens) the instant the clocks jump (03:00 CEST on the day Berlin
  skips from 02:00 to 03:00). So on a change day a window keeps its wall times and its
  length in seconds changes; a window lying wholly inside a gap does not happen that day.
* **Intervals.** A window's occurrence includes its start and excludes its end. Several
  windows are a union: ``active_until`` follows overlapping and adjacent ones to the end
  of the whole stretch.
* **Cheap.** ``next_start`` and friends compute each window's occurrences on at most ten
  calendar days around ``now``; nothing steps through minutes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAY_NAMES = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_DAYS = {name.lower(): i for i, name in enumerate(DAY_NAMES)}
# Every window recurs weekly, so its next start is at most 7 days (plus a DST hour) away.
_AHEAD_DAYS = 8
_GRAMMAR = "[DAYS] HH:MM-HH:MM [ZONE], e.g. mon-fri 08:00-18:00 Europe/Berlin"
_DAYS_EXPECTED = "mon, tue, ... sun, a range like mon-fri, or daily"
_TIME = re.compile(r"(\d{1,2}):(\d{2})")


@dataclass(frozen=True, slots=True)
class Window:
    """One weekly window, as ``parse_window`` read it from ``text``."""

    text: str
    days: frozenset[int]  # the weekdays it starts on, Monday 0
    start: int  # minutes after local midnight, 0 .. 1439
    end: int  # 1 .. 1440; at or before start: on the next day
    zone: str
    tz: ZoneInfo = field(repr=False, compare=False)

    def __str__(self) -> str:
        return self.text

    def on(self, day: date) -> tuple[float, float] | None:
        """The occurrence starting on local ``day`` (epoch start, end), if there is one."""
        if day.weekday() not in self.days:
            return None
        start = wall_time(self.tz, day, self.start)
        end = wall_time(self.tz, day, self.end if self.end > self.start else self.end + 1440)
        # Both ends inside one DST gap: the window does not happen that day.
        return (start, end) if end > start else None


def load_zone(name: str) -> ZoneInfo:
    """The zone called ``name``; ValueError naming it when there is none."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        # ZoneInfoNotFoundError for an unknown name, ValueError for a malformed one
        # ("../x"), IsADirectoryError for an area ("Europe").
        raise ValueError(
            f"unknown time zone {name!r} (expected an IANA name like Europe/Berlin or UTC)"
        ) from None


class _Problem(Exception):
    """What ``parse_window`` found wrong, and what it expected there."""

    def __init__(self, problem: str, expected: str = _GRAMMAR) -> None:
        super().__init__(problem)
        self.problem = problem
        self.expected = expected


def parse_window(text: str, default_zone: str = "UTC") -> Window:
    """Read ``[DAYS] HH:MM-HH:MM [ZONE]`` (see the module's rules); ValueError saying what
    is wrong and what is expected, e.g. ``"mon-fry 08:00-18:00": unknown day 'fry'
    (expected mon, tue, ... sun, a range like mon-fri, or daily)``."""
    try:
        return _parse(text, default_zone)
    except _Problem as problem:
        raise ValueError(f'"{text}": {problem.problem} (expected {problem.expected})') from None


def _parse(text: str, default_zone: str) -> Window:
    words = text.split()
    # The time range is the one word with a colon: days and zones have none.
    timed = [i for i, word in enumerate(words) if ":" in word]
    if not timed:
        raise _Problem("no time range")
    if len(timed) > 1:
        raise _Problem("more than one time range")
    i = timed[0]
    # At most one word (the days) before it, one (the zone) after it.
    extra = words[: max(i - 1, 0)] + words[i + 2 :]
    if extra:
        raise _Problem(f"unexpected {' '.join(extra)!r}")
    days = _parse_days(words[0]) if i == 1 else frozenset(range(7))
    start, end = _parse_times(words[i])
    zone = words[i + 1] if len(words) > i + 1 else default_zone
    try:
        tz = load_zone(zone)
    except ValueError:
        expected = "an IANA name like Europe/Berlin or UTC"
        raise _Problem(f"unknown time zone {zone!r}", expected) from None
    return Window(text, days, start, end, zone, tz)


def _parse_days(word: str) -> frozenset[int]:
    days: set[int] = set()
    for item in word.lower().split(","):
        if item == "daily":
            days.update(range(7))
            continue
        if not item:
            raise _Problem(f"an empty day in {word!r}", _DAYS_EXPECTED)
        ends = item.split("-")
        if len(ends) > 2:
            raise _Problem(f"bad days {item!r}", _DAYS_EXPECTED)
        for end in ends:
            if end not in _DAYS:
                raise _Problem(f"unknown day {end!r}", _DAYS_EXPECTED)
        first, last = _DAYS[ends[0]], _DAYS[ends[-1]]
        # A range may wrap round the week's end: fri-mon is Fri, Sat, Sun, Mon.
        days.update((first + k) % 7 for k in range((last - first) % 7 + 1))
    return frozenset(days)


def _parse_times(word: str) -> tuple[int, int]:
    ends = word.split("-")
    if len(ends) != 2:
        raise _Problem(f"bad time range {word!r}", "HH:MM-HH:MM, e.g. 08:00-18:00")
    minutes = []
    for clock in ends:
        found = _TIME.fullmatch(clock)
        value = int(found[1]) * 60 + int(found[2]) if found else -1
        if found is None or int(found[2]) > 59 or value > 1440:
            raise _Problem(f"bad time {clock!r}", "HH:MM from 00:00 to 24:00")
        minutes.append(value)
    start, end = minutes
    if start == 1440:
        raise _Problem("24:00 as a start", "24:00 only as an end; a day's start is 00:00")
    if start == end:
        raise _Problem(
            "start equals end",
            "a later end, an earlier one to cross midnight, or 00:00-24:00 for a whole day",
        )
    return start, end


def wall_time(tz: ZoneInfo, day: date, minute: int) -> float:
    """The epoch instant of local ``day`` plus ``minute`` (0 .. 2880: past 1440 is the
    next day) by the module's rule: the first instant at which the zone's clock reads that
    time or later."""
    day += timedelta(days=minute // 1440)
    minute %= 1440
    naive = datetime(day.year, day.month, day.day, minute // 60, minute % 60)
    # fold=0: in a fold, the first occurrence; in a gap, the offset from before the jump.
    first = naive.replace(tzinfo=tz).timestamp()
    if _local(first, tz) == naive:
        return first
    # In a gap: fold=0 lands past the jump, fold=1 (the offset after it) before it. Find
    # the jump between them to the second (zoneinfo's transitions fall on whole seconds).
    lo = math.floor(naive.replace(tzinfo=tz, fold=1).timestamp())
    hi = math.ceil(first)
    while lo < hi:
        mid = (lo + hi) // 2
        if _local(mid, tz) >= naive:
            hi = mid
        else:
            lo = mid + 1
    return float(lo)


def _local(now: float, tz: ZoneInfo) -> datetime:
    return datetime.fromtimestamp(now, tz).replace(tzinfo=None)


def local_day(now: float, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(now, tz).date()


def _spans(window: Window, now: float, first: int, last: int) -> Iterator[tuple[float, float]]:
    """The window's occurrences starting on local days ``first`` .. ``last`` from now's."""
    today = local_day(now, window.tz)
    for k in range(first, last + 1):
        span = window.on(today + timedelta(days=k))
        if span is not None:
            yield span


def active(windows: Sequence[Window], now: float) -> Window | None:
    """The first of ``windows`` with an occurrence containing ``now``, or None."""
    for window in windows:
        # An occurrence ends at most a day after the day it starts on.
        for start, end in _spans(window, now, -1, 0):
            if start <= now < end:
                return window
    return None


def active_until(windows: Sequence[Window], now: float) -> float | None:
    """When being inside ``windows`` ends, following overlapping and adjacent occurrences
    (``08:00-12:00`` and ``12:00-18:00``: 18:00); None when ``now`` is in none. A union
    that does not end within a week (``daily 00:00-24:00``) answers a time at least a week
    ahead: ask again then."""
    spans = sorted(span for w in windows for span in _spans(w, now, -1, _AHEAD_DAYS))
    ends = [end for start, end in spans if start <= now < end]
    if not ends:
        return None
    until = max(ends)
    for start, end in spans:
        if start > until:
            break
        until = max(until, end)
    return until


def next_start(windows: Sequence[Window], now: float) -> float | None:
    """The earliest instant after ``now`` at which one of ``windows`` starts (None for
    none), from each window's next few calendar days."""
    best: float | None = None
    for window in windows:
        for start, _ in _spans(window, now, 0, _AHEAD_DAYS):
            if start > now:
                # Starts grow with the day: this window's first one after now is its next.
                if best is None or start < best:
                    best = start
                break
    return best


# ---- keep-awake and asleep together: asleep wins where both hold

# Every window recurs weekly: one with no start within 8 days has none.
_HORIZON = 8 * 86400.0


def keep_end(keep_awake: Sequence[Window], asleep: Sequence[Window], now: float) -> float:
    """Inside ``keep_awake``: when being kept awake ends (its end, or the next asleep
    start if sooner)."""
    end = active_until(keep_awake, now) or now
    start = next_start(asleep, now)
    return end if start is None else min(end, start)


def next_awake(
    keep_awake: Sequence[Window], asleep: Sequence[Window], now: float
) -> tuple[float, Window] | None:
    """The first instant at or after ``now`` inside ``keep_awake`` and outside ``asleep``,
    with the keep-awake window that holds then; None within 8 days."""
    at = now
    # Alternate: out of an asleep window, to the next keep-awake start; a few turns.
    for _ in range(64):
        if at > now + _HORIZON:
            return None
        if active(asleep, at) is not None:
            at = active_until(asleep, at) or at
            continue
        window = active(keep_awake, at)
        if window is not None:
            return at, window
        start = next_start(keep_awake, at)
        if start is None:
            return None
        at = start
    return None
