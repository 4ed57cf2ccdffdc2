"""Time windows in the decision core: the grammar, zones, DST change days, midnight,
and the union of several windows. Plain calls on epoch seconds."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wakeproxy.core.schedule import active, active_until, next_start, parse_window

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")
HOUR = 3600.0
DAY = 86400.0


def utc(year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=UTC).timestamp()


def local(tz: ZoneInfo, year: int, month: int, day: int, hour: int = 0, minute: int = 0) -> float:
    return datetime(year, month, day, hour, minute, tzinfo=tz).timestamp()


def windows(*texts: str, zone: str = "UTC"):
    return [parse_window(text, zone) for text in texts]


def span(text: str, year: int, month: int, day: int) -> tuple[float, float]:
    """The occurrence of ``text`` starting on that day, as epoch (start, end)."""
    found = parse_window(text).on(datetime(year, month, day).date())
    assert found is not None
    return found


# -- parsing -----------------------------------------------------------------------


def test_a_window_keeps_its_days_times_zone_and_text():
    window = parse_window("mon-fri 08:00-18:00 Europe/Berlin")
    assert window.days == frozenset(range(5))
    assert (window.start, window.end, window.zone) == (480, 1080, "Europe/Berlin")
    assert str(window) == window.text == "mon-fri 08:00-18:00 Europe/Berlin"


@pytest.mark.parametrize(
    ("text", "days"),
    [
        ("08:00-18:00", {0, 1, 2, 3, 4, 5, 6}),  # no days: every day
        ("daily 08:00-18:00", {0, 1, 2, 3, 4, 5, 6}),
        ("sun 08:00-18:00", {6}),
        ("Mon,WED,fri-sat 8:00-9:30", {0, 2, 4, 5}),  # any case, a one-digit hour
        ("fri-mon 22:00-02:00", {4, 5, 6, 0}),  # a range wraps round the week's end
        ("tue-tue 08:00-09:00", {1}),
        ("mon,mon-tue,daily 08:00-09:00", {0, 1, 2, 3, 4, 5, 6}),
    ],
)
def test_days_forms(text, days):
    assert parse_window(text).days == frozenset(days)


def test_the_zone_defaults_to_the_one_given_then_utc():
    assert parse_window("08:00-09:00").zone == "UTC"
    assert parse_window("mon 08:00-09:00", "America/New_York").zone == "America/New_York"
    assert parse_window("08:00-09:00 Asia/Tokyo", "America/New_York").zone == "Asia/Tokyo"


def test_end_times():
    whole = parse_window("00:00-24:00")
    assert (whole.start, whole.end) == (0, 1440)
    assert (parse_window("22:00-24:00").end, parse_window("22:00-00:00").end) == (1440, 0)
    assert parse_window("00:00-23:59").end == 1439


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "mon-fry 08:00-18:00",
            "\"mon-fry 08:00-18:00\": unknown day 'fry' "
            "(expected mon, tue, ... sun, a range like mon-fri, or daily)",
        ),
        (
            "mon 25:00-26:00",
            "\"mon 25:00-26:00\": bad time '25:00' (expected HH:MM from 00:00 to 24:00)",
        ),
        ("08:60-09:00", "bad time '08:60' (expected HH:MM from 00:00 to 24:00)"),
        ("24:30-09:00", "bad time '24:30'"),
        ("8h:00-9:00", "bad time '8h:00'"),
        ("8h-9h", "no time range"),
        ("24:00-02:00", "24:00 as a start (expected 24:00 only as an end"),
        ("08:00-08:00", "start equals end (expected a later end, an earlier one to cross"),
        ("00:00-00:00", "or 00:00-24:00 for a whole day)"),
        (
            "mon 08:00-18:00 Mars/Olympus",
            "unknown time zone 'Mars/Olympus' (expected an IANA name like Europe/Berlin",
        ),
        ("08:00-18:00 Europe", "unknown time zone 'Europe'"),
        ("mon-fri", "no time range (expected [DAYS] HH:MM-HH:MM [ZONE], e.g. mon-fri"),
        ("", "no time range"),
        ("mon 08:00-09:00 10:00-11:00", "more than one time range"),
        ("mon tue 08:00-09:00", "unexpected 'mon'"),
        ("08:00-09:00 UTC extra", "unexpected 'extra'"),
        ("08:00", "bad time range '08:00' (expected HH:MM-HH:MM, e.g. 08:00-18:00)"),
        ("mon,,tue 08:00-09:00", "an empty day in 'mon,,tue'"),
        ("mon-tue-wed 08:00-09:00", "bad days 'mon-tue-wed'"),
    ],
)
def test_a_bad_window_says_what_is_wrong_and_what_is_expected(text, message):
    with pytest.raises(ValueError) as caught:
        parse_window(text)
    assert message in str(caught.value)
    assert str(caught.value).startswith(f'"{text}": ')


def test_an_unknown_default_zone_is_named():
    with pytest.raises(ValueError, match="unknown time zone 'Nowhere'"):
        parse_window("08:00-09:00", "Nowhere")


# -- zones and DST -----------------------------------------------------------------


def test_the_same_window_in_two_zones_differs_by_their_offset():
    berlin = span("mon 08:00-18:00 Europe/Berlin", 2025, 1, 6)
    new_york = span("mon 08:00-18:00 America/New_York", 2025, 1, 6)
    assert berlin == (utc(2025, 1, 6, 7), utc(2025, 1, 6, 17))  # CET, +1
    assert new_york[0] - berlin[0] == new_york[1] - berlin[1] == 6 * HOUR  # EST, -5


def test_wall_times_hold_in_summer_and_winter():
    assert span("mon 08:00-18:00 Europe/Berlin", 2025, 7, 7) == (
        utc(2025, 7, 7, 6),  # CEST, +2
        utc(2025, 7, 7, 16),
    )
    assert span("mon 08:00-18:00 Europe/Berlin", 2025, 12, 1) == (
        utc(2025, 12, 1, 7),
        utc(2025, 12, 1, 17),
    )


def test_berlin_spring_forward_the_window_keeps_its_wall_times_and_is_an_hour_shorter():
    # 2025-03-30: 02:00 CET -> 03:00 CEST, at 01:00 UTC.
    start, end = span("sun 01:00-04:00 Europe/Berlin", 2025, 3, 30)
    assert (start, end) == (utc(2025, 3, 30, 0), utc(2025, 3, 30, 2))
    assert end - start == 2 * HOUR


def test_berlin_a_start_in_the_gap_starts_when_the_clocks_jump():
    # 02:30 does not exist that day: the first instant after the gap, 03:00 CEST.
    assert span("sun 02:30-05:00 Europe/Berlin", 2025, 3, 30) == (
        utc(2025, 3, 30, 1),
        utc(2025, 3, 30, 3),
    )
    # An end in the gap likewise; a window wholly inside it does not happen that day.
    assert span("sun 01:00-02:30 Europe/Berlin", 2025, 3, 30) == (
        utc(2025, 3, 30, 0),
        utc(2025, 3, 30, 1),
    )
    assert parse_window("sun 02:10-02:40 Europe/Berlin").on(datetime(2025, 3, 30).date()) is None
    sunday_before = utc(2025, 3, 29, 12)
    assert next_start(windows("sun 02:10-02:40 Europe/Berlin"), sunday_before) == local(
        BERLIN, 2025, 4, 6, 2, 10
    )


def test_berlin_fall_back_the_window_is_an_hour_longer_and_a_repeated_time_is_its_first():
    # 2025-10-26: 03:00 CEST -> 02:00 CET, at 01:00 UTC.
    start, end = span("sun 01:00-04:00 Europe/Berlin", 2025, 10, 26)
    assert (start, end) == (utc(2025, 10, 25, 23), utc(2025, 10, 26, 3))
    assert end - start == 4 * HOUR
    assert span("sun 02:30-05:00 Europe/Berlin", 2025, 10, 26) == (
        utc(2025, 10, 26, 0, 30),  # 02:30 CEST, the first of the two
        utc(2025, 10, 26, 4),
    )
    ends_in_fold = span("sun 00:00-02:30 Europe/Berlin", 2025, 10, 26)
    assert ends_in_fold == (utc(2025, 10, 25, 22), utc(2025, 10, 26, 0, 30))


def test_new_york_spring_forward_and_fall_back():
    # 2025-03-09: 02:00 EST -> 03:00 EDT, at 07:00 UTC.
    assert span("sun 01:30-03:30 America/New_York", 2025, 3, 9) == (
        utc(2025, 3, 9, 6, 30),
        utc(2025, 3, 9, 7, 30),
    )
    assert span("sun 02:15-04:00 America/New_York", 2025, 3, 9) == (
        utc(2025, 3, 9, 7),  # 02:15 never happens: 03:00 EDT
        utc(2025, 3, 9, 8),
    )
    # 2025-11-02: 02:00 EDT -> 01:00 EST, at 06:00 UTC. 01:30 happens twice: the first.
    assert span("sun 01:30-03:00 America/New_York", 2025, 11, 2) == (
        utc(2025, 11, 2, 5, 30),
        utc(2025, 11, 2, 8),
    )


def test_a_night_window_across_the_change_keeps_both_wall_times():
    start, end = span("sat 22:00-08:00 Europe/Berlin", 2025, 3, 29)
    assert (start, end) == (utc(2025, 3, 29, 21), utc(2025, 3, 30, 6))
    assert end - start == 9 * HOUR
    night = windows("sat 22:00-08:00 Europe/Berlin")
    assert active_until(night, local(BERLIN, 2025, 3, 30, 4)) == utc(2025, 3, 30, 6)


# -- midnight, 24:00 and unions ------------------------------------------------------


def test_friday_night_into_saturday():
    night = windows("fri 22:00-02:00")
    assert active(night, utc(2025, 6, 6, 21, 59)) is None  # Fri 2025-06-06
    assert active(night, utc(2025, 6, 6, 22)) is night[0]  # start inclusive
    assert active(night, utc(2025, 6, 7, 1, 59)) is night[0]
    assert active(night, utc(2025, 6, 7, 2)) is None  # end exclusive
    assert active(night, utc(2025, 6, 5, 23)) is None  # Thursday: it starts on Fridays
    assert active(night, utc(2025, 6, 7, 23)) is None
    assert active_until(night, utc(2025, 6, 6, 23)) == utc(2025, 6, 7, 2)
    assert next_start(night, utc(2025, 6, 7, 1)) == utc(2025, 6, 13, 22)


def test_sunday_night_into_monday_across_the_week_boundary():
    night = windows("sun 22:00-06:00 Europe/Berlin")
    monday = local(BERLIN, 2025, 6, 9, 5)  # Monday, in the window that began on Sunday
    assert active(night, monday) is night[0]
    assert active_until(night, monday) == local(BERLIN, 2025, 6, 9, 6)
    assert next_start(night, monday) == local(BERLIN, 2025, 6, 15, 22)
    assert active(night, local(BERLIN, 2025, 6, 9, 23)) is None


def test_24_00_ends_at_the_next_midnight():
    evening = windows("mon 18:00-24:00")
    assert active_until(evening, utc(2025, 6, 9, 20)) == utc(2025, 6, 10)
    assert active(evening, utc(2025, 6, 10)) is None
    days = windows("mon 00:00-24:00", "tue 00:00-24:00")
    assert active_until(days, utc(2025, 6, 9, 10)) == utc(2025, 6, 11)
    # Whole days every day: no end in sight; the answer is at least a week ahead.
    always = windows("daily 00:00-24:00")
    until = active_until(always, utc(2025, 6, 9, 10))
    assert until is not None and until >= utc(2025, 6, 9, 10) + 7 * DAY


def test_overlapping_and_adjacent_windows_are_followed_to_their_end():
    adjacent = windows("mon-fri 08:00-12:00", "mon-fri 12:00-18:00")
    assert active_until(adjacent, utc(2025, 6, 9, 9)) == utc(2025, 6, 9, 18)
    overlapping = windows("mon 12:00-17:00", "mon 09:00-13:00", "mon 16:00-16:30")
    assert active_until(overlapping, utc(2025, 6, 9, 10)) == utc(2025, 6, 9, 17)
    apart = windows("mon 08:00-12:00", "mon 12:30-18:00")
    assert active_until(apart, utc(2025, 6, 9, 9)) == utc(2025, 6, 9, 12)
    assert active_until(apart, utc(2025, 6, 9, 12, 10)) is None
    # Across days: a night window meeting the next morning's.
    chained = windows("sun 20:00-24:00", "mon 00:00-09:00")
    assert active_until(chained, utc(2025, 6, 8, 21)) == utc(2025, 6, 9, 9)


def test_active_names_the_first_window_containing_now():
    both = windows("mon 08:00-18:00", "mon 12:00-13:00")
    assert active(both, utc(2025, 6, 9, 12, 30)) is both[0]
    assert active(both[1:], utc(2025, 6, 9, 12, 30)) is both[1]
    assert active([], utc(2025, 6, 9, 12)) is None


def test_next_start_is_strictly_after_now():
    day = windows("mon-fri 08:00-18:00", "sat 10:00-11:00")
    assert next_start(day, utc(2025, 6, 9, 8)) == utc(2025, 6, 10, 8)  # Mon at start
    assert next_start(day, utc(2025, 6, 9, 7, 59)) == utc(2025, 6, 9, 8)
    assert next_start(day, utc(2025, 6, 13, 19)) == utc(2025, 6, 14, 10)  # Fri -> Sat
    assert next_start(day, utc(2025, 6, 14, 10, 30)) == utc(2025, 6, 16, 8)
    assert next_start([], utc(2025, 6, 9)) is None


# -- properties ---------------------------------------------------------------------

ZONES = (
    "UTC",
    "Europe/Berlin",
    "America/New_York",
    "Australia/Lord_Howe",  # a DST change of half an hour
    "Asia/Kathmandu",  # +05:45
    "America/Santiago",  # changes at midnight
)
# DST changes to draw times near: the day lengths that change are the interesting ones.
CHANGES = (
    utc(2025, 3, 30, 1),
    utc(2025, 10, 26, 1),
    utc(2025, 3, 9, 7),
    utc(2025, 11, 2, 6),
    utc(2025, 4, 5, 15),  # Lord Howe, 02:00 -> 01:30
    utc(2025, 4, 6, 3),  # Santiago, 00:00 -> 23:00
    utc(2025, 9, 7, 4),  # Santiago, 24:00 -> 01:00
)


@st.composite
def window_texts(draw):
    days = draw(st.lists(st.sampled_from(["mon", "tue", "wed", "thu", "fri", "sat", "sun"])))
    start = draw(st.integers(0, 1439))
    end = draw(st.integers(1, 1440).filter(lambda e: e != start))
    if (start, end) == (0, 1440):  # a whole day meets its own next one: tested apart
        end = 1439
    zone = draw(st.sampled_from(ZONES))
    text = f"{start // 60:02d}:{start % 60:02d}-{end // 60:02d}:{end % 60:02d} {zone}"
    return f"{','.join(days)} {text}" if days else text


instants = st.one_of(
    st.floats(utc(2024, 1, 1), utc(2027, 1, 1)),
    st.sampled_from(CHANGES).flatmap(lambda t: st.floats(t - 2 * DAY, t + 2 * DAY)),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(window_texts(), min_size=1, max_size=3), instants, st.randoms())
def test_next_start_is_a_window_start_and_none_starts_before_it(texts, now, rnd):
    ws = [parse_window(text) for text in texts]
    found = next_start(ws, now)
    assert found is not None and now < found <= now + 8 * DAY
    # A start: some window is inside at it and was not just before.
    assert any(active([w], found) is w and active([w], found - 0.5) is None for w in ws), (
        "not a window start"
    )
    # None starts strictly between: sampled, nothing goes from outside to inside.
    points = sorted([now, *(rnd.uniform(now, found - 0.5) for _ in range(48)), found - 0.5])
    for w in ws:
        inside = [active([w], t) is not None for t in points]
        assert not any(not a and b for a, b in itertools.pairwise(inside)), (
            f"{w.text} starts between {datetime.fromtimestamp(now, UTC)} and the answer"
        )
    assert all(next_start(ws, t) == found for t in points[1:])


@settings(max_examples=100, deadline=None)
@given(st.lists(window_texts(), min_size=1, max_size=3), instants)
def test_active_until_is_where_being_inside_ends(texts, now):
    ws = [parse_window(text) for text in texts]
    until = active_until(ws, now)
    if active(ws, now) is None:
        assert until is None
        return
    assert until is not None and until > now
    assert active(ws, until - 0.5) is not None
    # A union that never ends (00:00-00:02 with 00:02-00:01 daily) answers a week or more.
    assert active(ws, until) is None or until >= now + 7 * DAY
    # Inside all the way: sampled.
    step = (until - now) / 64
    assert all(active(ws, now + k * step) is not None for k in range(64))


def test_the_next_start_of_a_weekly_window_is_at_most_a_week_away_at_any_minute():
    week = windows("sun 23:45-00:15 Europe/Berlin")
    for k in range(0, 7 * 24 * 60, 37):
        now = utc(2025, 3, 24) + k * 60.0
        found = next_start(week, now)
        assert found is not None and 0 < found - now <= 7 * DAY
        got = datetime.fromtimestamp(found, BERLIN)
        assert (got.weekday(), got.hour, got.minute) == (6, 23, 45)


def test_it_is_cheap():
    # Calendar arithmetic: a few thousand calls well under a second.
    many = windows(*(f"mon-fri {h:02d}:00-{h:02d}:30 Europe/Berlin" for h in range(8, 18)))
    start = datetime.now(UTC)
    for k in range(200):
        next_start(many, utc(2025, 1, 1) + k * 3001.0)
    assert datetime.now(UTC) - start < timedelta(seconds=2)
