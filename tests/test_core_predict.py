"""Waking before the request in the decision core: learned arrivals, chains, schedules
through the predictor, the accounting, bounds and the saved state. Plain calls on a fake
clock: no sleeping, no event loop."""

from __future__ import annotations

import copy
import json
import math
import random
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

import pytest

from wakeproxy.core.predict import ARRIVALS_FLOOR, Outcome, Prediction, Predictor, PredictSettings
from wakeproxy.core.schedule import parse_window

BERLIN = ZoneInfo("Europe/Berlin")
DAY = 86400.0
ARRIVALS = PredictSettings(arrivals=True)
CHAINS = PredictSettings(chains=True)
T0 = 1_750_000_000.0  # a Sunday in June 2025, for the chains (UTC)


def berlin(year: int, month: int, day: int, hour: int = 0, minute: int = 0, sec: int = 0) -> float:
    return datetime(year, month, day, hour, minute, sec, tzinfo=BERLIN).timestamp()


def monday(week: int, hour: int = 0, minute: int = 0, second: int = 0, day: int = 0) -> float:
    """Monday ``week`` weeks after 2025-01-06 (plus ``day`` days), at that Berlin wall
    time."""
    date = datetime(2025, 1, 6) + timedelta(weeks=week, days=day)
    return berlin(date.year, date.month, date.day, hour, minute, second)


def learned(weeks: int, wake: float = 2.0, **settings) -> Predictor:
    """A service requested every Monday at 09:05 for ``weeks`` weeks; its wakes take
    ``wake`` seconds (lead time 1.5 x + 1 s)."""
    predictor = Predictor("Europe/Berlin")
    predictor.configure("web", PredictSettings(arrivals=True, **settings))
    predictor.woke("web", monday(0), wake)
    for week in range(weeks):
        predictor.arrived("web", monday(week, 9, 5))
    return predictor


# -- learned arrivals ----------------------------------------------------------------


def test_after_three_mondays_the_fourth_is_predicted_ahead_by_the_lead_time():
    predictor = learned(3)
    assert predictor.lead_time("web") == 4.0  # median 2 s: 1.5 x 2 + 1
    assert predictor.next_wake("web", monday(3, 8)) == Prediction(
        "web",
        at=monday(3, 9) - 4.0,
        until=monday(3, 9, 15),
        kind="arrivals",
        reason="arrivals Mon 09:00 Europe/Berlin p=0.66",
    )


def test_a_pattern_predicts_from_its_fourth_week_not_its_third():
    # Two weeks read 0.51, past the default threshold 0.5 but not the arrivals floor 0.6:
    # replayed, two weeks of a slot were as often chance as habit (core/predict.py).
    assert learned(1).next_wake("web", monday(1, 8)) is None  # p 0.3
    assert learned(2).next_wake("web", monday(2, 8)) is None  # p 0.51
    wake = learned(3).next_wake("web", monday(3, 8))  # p 0.66
    assert wake is not None and wake.reason.endswith("p=0.66")


def test_a_threshold_below_the_arrivals_floor_does_not_lower_it():
    assert ARRIVALS_FLOOR == 0.6
    assert learned(2, threshold=0.3).next_wake("web", monday(2, 8)) is None  # p 0.51


def test_a_slot_at_exactly_the_threshold_is_woken_for():
    # The threshold is the probability needed: p == threshold acts (the boundary).
    for weeks, p in ((3, 0.657), (4, 0.7599)):
        wake = learned(weeks, threshold=p).next_wake("web", monday(weeks, 8))
        assert wake is not None and wake.reason.endswith(f"p={p:.2f}"), (weeks, wake)
        assert learned(weeks, threshold=p + 0.001).next_wake("web", monday(weeks, 8)) is None


def test_a_fast_wake_or_none_measured_is_not_woken_ahead():
    assert learned(5, wake=0.1).next_wake("web", monday(5, 8)) is None  # < 0.2 s
    cheap = learned(5, wake=0.1, min_wake_time=0.05)
    assert cheap.next_wake("web", monday(5, 8)) is not None
    unmeasured = Predictor("Europe/Berlin")
    unmeasured.configure("web", ARRIVALS)
    for week in range(5):
        unmeasured.arrived("web", monday(week, 9, 5))
    assert unmeasured.next_wake("web", monday(5, 8)) is None


@pytest.mark.parametrize(("weeks", "fades_after"), [(3, 1), (8, 2), (40, 2)])
def test_a_pattern_that_stops_fades_within_two_missed_weeks(weeks, fades_after):
    # The module's figure: below 0.5 after two missed weeks whatever the history
    # (0.7 ** 2 < 0.5), after one for a pattern only three weeks old (0.66 x 0.7).
    predictor = learned(weeks)
    for missed in range(fades_after):
        assert predictor.next_wake("web", monday(weeks + missed, 8)) is not None, missed
    assert predictor.next_wake("web", monday(weeks + fades_after, 8)) is None


def test_a_faded_slot_is_dropped_after_13_missed_weeks_so_an_idle_service_costs_nothing():
    predictor = learned(20)
    predictor.table("web", monday(20 + 12, 8))
    assert predictor.tracked()[2] == 1  # p 0.0138
    predictor.table("web", monday(20 + 13, 8))
    assert predictor.tracked()[2] == 0  # p 0.0097 < 0.01


def test_several_requests_in_one_slot_in_one_week_count_once():
    predictor = learned(0)
    for minute in (1, 5, 14):
        predictor.arrived("web", monday(0, 9, minute))
    predictor.arrived("web", monday(0, 9, 15))  # the next slot
    slots = predictor.table("web", monday(0, 10))["slots"]
    assert slots == [
        {"slot": 36, "when": "Mon 09:00", "p": 0.3},
        {"slot": 37, "when": "Mon 09:15", "p": 0.3},
    ]


def test_the_learned_slot_stays_at_09_00_local_across_the_spring_change():
    predictor = Predictor("Europe/Berlin")
    predictor.configure("web", ARRIVALS)
    predictor.woke("web", berlin(2025, 3, 1), 2.0)
    for day in (10, 17, 24):  # CET, +1
        predictor.arrived("web", berlin(2025, 3, day, 9, 5))
    wake = predictor.next_wake("web", berlin(2025, 3, 31, 8))  # CEST, +2, since Sunday
    assert wake is not None
    assert wake.at == berlin(2025, 3, 31, 9) - 4.0
    assert wake.at == datetime(2025, 3, 31, 7, tzinfo=ZoneInfo("UTC")).timestamp() - 4.0


def test_the_learned_slot_stays_at_09_00_local_across_the_fall_change():
    predictor = Predictor("Europe/Berlin")
    predictor.configure("web", ARRIVALS)
    predictor.woke("web", berlin(2025, 10, 1), 2.0)
    for day in (6, 13, 20):  # CEST
        predictor.arrived("web", berlin(2025, 10, day, 9, 5))
    wake = predictor.next_wake("web", berlin(2025, 10, 27, 8))  # CET
    assert wake is not None and wake.at == berlin(2025, 10, 27, 9) - 4.0


def test_a_slot_that_had_its_request_this_week_is_next_predicted_a_week_later():
    predictor = learned(4)  # week 3's request came at 09:05
    wake = predictor.next_wake("web", monday(3, 9, 7))  # it slept again at 09:07
    assert wake is not None and wake.at == monday(4, 9) - 4.0


def test_inside_a_likely_slot_not_yet_requested_or_past_the_lead_the_wake_is_now():
    predictor = learned(3)
    inside = monday(3, 9, 2)
    assert predictor.next_wake("web", inside) == Prediction(
        "web", inside, monday(3, 9, 15), "arrivals", "arrivals Mon 09:00 Europe/Berlin p=0.66"
    )
    late = monday(3, 8, 59, 58)  # 2 s to the slot, lead 4 s
    wake = predictor.next_wake("web", late)
    assert wake is not None and wake.at == late


# -- chains --------------------------------------------------------------------------


def chained(episodes: int, gap: float = 5.0, **follower) -> tuple[Predictor, float]:
    """``a`` then ``b`` ``gap`` seconds later, ``episodes`` times ten minutes apart; b has
    chains on (a needs only be configured: the follower decides)."""
    predictor = Predictor("UTC")
    predictor.configure("a", PredictSettings())
    predictor.configure("b", PredictSettings(chains=True, **follower))
    now = T0
    for _ in range(episodes):
        predictor.arrived("a", now)
        predictor.arrived("b", now + gap)
        now += 600.0
    return predictor, now


def test_a_then_b_five_times_predicts_b_when_a_comes():
    predictor, now = chained(5)
    [follower] = predictor.table("a", now)["followers"]
    assert follower == {
        "service": "b", "window": 30.0, "p": 1.0, "n": follower["n"], "trusted": True
    }  # fmt: skip
    assert follower["n"] == pytest.approx(5.0, abs=0.02)  # 5, decayed over 50 minutes
    assert predictor.arrived("a", now) == [
        Prediction("b", now, now + 30.0, "chain", "chain a -> b p=1.00")
    ]


def test_a_follower_at_exactly_its_threshold_is_woken():
    # The threshold is the probability needed: p == threshold acts. With threshold 1.0
    # (allowed: "a probability in (0, 1]") a follower seen after every episode, p = 1.00,
    # is woken; a strict comparison would never wake it.
    predictor, now = chained(5, threshold=1.0)
    [follower] = predictor.table("a", now)["followers"]
    assert follower["p"] == 1.0
    assert predictor.arrived("a", now) == [
        Prediction("b", now, now + 30.0, "chain", "chain a -> b p=1.00")
    ]


def test_b_outside_the_window_is_not_a_follower():
    predictor, now = chained(5, gap=31.0)
    assert predictor.arrived("a", now) == []
    assert predictor.table("a", now)["followers"] == []


def test_below_min_samples_there_is_no_chain_wake():
    predictor, now = chained(2)
    assert predictor.arrived("a", now) == []  # P = 1, but from 2 episodes
    predictor.arrived("b", now + 5.0)
    assert predictor.arrived("a", now + 600.0) != []  # 3 now


def test_a_burst_of_a_is_one_episode_and_b_counts_once_in_it():
    predictor = Predictor("UTC")
    predictor.configure("a", PredictSettings())
    predictor.configure("b", CHAINS)
    for k in range(10):  # ten requests a second apart: one episode
        predictor.arrived("a", T0 + k)
    for k in range(3):
        predictor.arrived("b", T0 + 10 + k)
    table = predictor.table("a", T0 + 20)
    [episodes] = table["episodes"]
    assert episodes["window"] == 30.0 and math.isclose(episodes["n"], 1.0, abs_tol=1e-3)
    assert table["followers"][0]["n"] == pytest.approx(1.0, abs=1e-3)


def test_a_chain_wake_comes_once_an_episode_at_its_start():
    predictor, now = chained(5)
    assert predictor.arrived("a", now) != []
    assert predictor.arrived("a", now + 20.0) == []  # the same burst
    assert predictor.arrived("a", now + 100.0) != []  # 80 s later: a new episode


def test_the_followers_threshold_and_chains_setting_decide():
    predictor = Predictor("UTC")
    predictor.configure("a", PredictSettings())
    predictor.configure("b", PredictSettings(chains=True, threshold=0.9))
    predictor.configure("c", PredictSettings(chains=True))
    predictor.configure("d", PredictSettings())  # chains off: not learned
    for k in range(10):
        now = T0 + 600.0 * k
        predictor.arrived("a", now)
        if k % 5:  # 8 of 10
            predictor.arrived("b", now + 2)
            predictor.arrived("c", now + 3)
        predictor.arrived("d", now + 4)
    wakes = predictor.arrived("a", T0 + 6000.0)
    assert [(w.service, w.reason) for w in wakes] == [("c", "chain a -> c p=0.80")]
    assert [f["service"] for f in predictor.table("a", T0 + 6000.0)["followers"]] == ["b", "c"]


def test_a_steady_leader_no_longer_followed_stops_predicting_within_a_half_life():
    predictor = Predictor("UTC")
    predictor.configure("a", PredictSettings())
    predictor.configure("b", CHAINS)
    now = T0
    for _ in range(14 * 24):  # hourly, b following, two weeks
        predictor.arrived("a", now)
        predictor.arrived("b", now + 5)
        now += 3600.0
    stop, last = now, now
    while now < stop + 10 * DAY:  # then a alone
        if predictor.arrived("a", now):
            last = now
        now += 3600.0
    # The figure: about 5.6 days here (P falls as n(a, b) halves in 7 days while n(a)
    # holds): within the 7-day half-life.
    assert 5 * DAY < last - stop < 7 * DAY


def test_a_leader_gone_quiet_keeps_its_p_but_loses_trust_after_a_half_life():
    predictor, _ = chained(5)  # n(a) = 5: below 2.5 after 7 * log2(5 / 2.5) = 7 days
    first = T0  # the five episodes span 40 minutes from here
    trusted = predictor.table("a", first + 6.9 * DAY)["followers"][0]
    assert trusted["trusted"] and trusted["p"] == 1.0
    assert not predictor.table("a", first + 7.1 * DAY)["followers"][0]["trusted"]
    assert predictor.arrived("a", first + 7.1 * DAY) == []


def rounds(predictor: Predictor, count: int, gap: float = 11.0, lag: float = 2.0) -> list[int]:
    """``count`` rounds ``gap`` seconds apart: a, then b ``lag`` seconds later. The rounds
    (from 0) whose request to a woke b."""
    woken = []
    for k in range(count):
        now = T0 + gap * k
        wakes = predictor.arrived("a", now)
        if wakes:
            assert wakes == [Prediction("b", now, now + 5.0, "chain", "chain a -> b p=1.00")]
            woken.append(k)
        predictor.arrived("b", now + lag)
    return woken


def test_an_episode_is_counted_in_the_followers_window_not_the_leaders():
    # The bug users hit: b's chain_window 5, rounds 11 s apart, a at its default (30 s).
    # Counted in a's own window, a's requests (never 30 s apart) made one episode ever,
    # so n(a) stayed 1 and b was never woken. In b's window each round is an episode.
    predictor = Predictor("UTC")
    predictor.configure("a", PredictSettings())
    predictor.configure("b", PredictSettings(chains=True, chain_window=5.0))
    # Rounds 0, 1 and 2 are the min_samples (3) it learns from; from then on, each wakes b.
    assert rounds(predictor, 8) == [3, 4, 5, 6, 7]
    table = predictor.table("a", T0 + 88.0)
    [episodes] = table["episodes"]
    assert episodes["window"] == 5.0 and episodes["n"] == pytest.approx(8.0, abs=1e-3)
    assert [(f["service"], f["window"], f["p"]) for f in table["followers"]] == [("b", 5.0, 1.0)]


def test_a_leader_is_counted_in_each_followers_window_apart():
    predictor = Predictor("UTC")
    predictor.configure("a", PredictSettings())
    predictor.configure("b", PredictSettings(chains=True, chain_window=5.0))
    predictor.configure("c", PredictSettings(chains=True, chain_window=60.0))
    for k in range(6):  # a every 11 s; b and c 2 s after it
        predictor.arrived("a", T0 + 11.0 * k)
        predictor.arrived("b", T0 + 11.0 * k + 2.0)
        predictor.arrived("c", T0 + 11.0 * k + 2.0)
    table = predictor.table("a", T0 + 70.0)
    # In 60 s, a has been busy all along: one episode, c followed it once.
    counts = [(e["window"], round(e["n"])) for e in table["episodes"]]
    assert counts == [(5.0, 6), (60.0, 1)]
    followers = {f["service"]: (f["window"], f["p"], f["trusted"]) for f in table["followers"]}
    assert followers == {"b": (5.0, 1.0, True), "c": (60.0, 1.0, False)}
    wakes = predictor.arrived("a", T0 + 77.0)  # 11 s on: an episode in 5 s, not in 60 s
    assert [w.service for w in wakes] == ["b"]


def test_a_follower_whose_window_changes_starts_its_pairs_afresh():
    predictor = Predictor("UTC")
    predictor.configure("a", PredictSettings())
    predictor.configure("b", PredictSettings(chains=True, chain_window=5.0))
    assert rounds(predictor, 4) == [3]
    # Its pairs were counted against a's episodes in 5 s: no estimate in 10 s.
    predictor.configure("b", PredictSettings(chains=True, chain_window=10.0))
    assert predictor.table("a", T0 + 50.0)["followers"] == []
    assert predictor.table("b", T0 + 50.0)["leaders"] == []
    # The 5 s window is no one's now: counted no more after the next tidy.
    predictor.tidy()
    assert [e["window"] for e in predictor.table("a", T0 + 50.0)["episodes"]] == []
    # Learned again in 10 s (rounds 11 s apart: each an episode there too).
    later = Predictor.from_state(predictor.to_state())
    for predictor_ in (predictor, later):
        predictor_.configure("a", PredictSettings())
        predictor_.configure("b", PredictSettings(chains=True, chain_window=10.0))
    woken = []
    for k in range(5, 10):
        now = T0 + 11.0 * k
        woken.append(bool(predictor.arrived("a", now)))
        predictor.arrived("b", now + 2.0)
    assert woken == [False, False, False, True, True]


def test_episode_counts_are_bounded_with_the_pairs_counted_against_them():
    predictor = Predictor("UTC", max_episodes=20)
    for w in (5.0, 50.0):
        predictor.configure(f"b{w:g}", PredictSettings(chains=True, chain_window=w))
    names = [f"a{i}" for i in range(30)]
    for name in names:
        predictor.configure(name, PredictSettings())
    now = T0
    for k in range(300):
        now += 61.0
        predictor.arrived(names[k % 30], now)
        predictor.arrived("b5", now + 1.0)
    assert predictor.chains.counts_held <= 20
    episodes, pairs = predictor.chains.counts()
    assert len(episodes) == predictor.chains.counts_held
    counted = {(a, w) for a, w, _, _ in episodes}
    assert pairs and all((a, w) in counted for a, _, w, _, _ in pairs)
    Predictor.from_state(predictor.to_state())  # and what it writes reads back


def test_a_follower_inside_its_asleep_window_is_not_chain_woken():
    predictor, now = chained(5)
    night = datetime.fromtimestamp(now, ZoneInfo("UTC"))
    window = f"{night.hour:02d}:00-{(night.hour + 1) % 24:02d}:00"
    predictor.configure("b", CHAINS, asleep=[parse_window(window)])
    assert predictor.arrived("a", now) == []


# -- schedules through the predictor ---------------------------------------------------

OFFICE = [parse_window("mon-fri 08:00-18:00 Europe/Berlin")]
LUNCH = [parse_window("mon-fri 12:00-13:00 Europe/Berlin")]


def scheduled(**windows) -> Predictor:
    predictor = Predictor("Europe/Berlin")
    predictor.configure("web", PredictSettings(), **windows)
    return predictor


def test_inside_keep_awake_the_wake_is_now_and_held_to_the_window_end():
    predictor = scheduled(keep_awake=OFFICE)
    now = monday(0, 10)
    assert predictor.next_wake("web", now) == Prediction(
        "web", now, monday(0, 18), "schedule", "schedule mon-fri 08:00-18:00 Europe/Berlin"
    )
    assert predictor.hold_until("web", now) == monday(0, 18)
    evening = monday(0, 19)
    wake = predictor.next_wake("web", evening)
    assert wake is not None and (wake.at, wake.until) == (monday(0, 8, day=1), monday(0, 18, day=1))
    assert predictor.hold_until("web", evening) == 0.0
    friday = predictor.next_wake("web", monday(0, 19, day=4))  # Friday evening
    assert friday is not None and friday.at == monday(1, 8)


def test_an_asleep_window_wins_over_keep_awake_where_they_overlap():
    predictor = scheduled(keep_awake=OFFICE, asleep=LUNCH)
    assert predictor.hold_until("web", monday(0, 10)) == monday(0, 12)  # not 18:00
    assert predictor.asleep_start("web", monday(0, 10)) == monday(0, 12)
    lunch = monday(0, 12, 30)
    assert predictor.sleep_now("web", lunch) and not predictor.sleep_now("web", monday(0, 13))
    assert predictor.hold_until("web", lunch) == 0.0
    wake = predictor.next_wake("web", lunch)  # not now: at the lunch's end
    assert wake is not None and (wake.at, wake.until) == (monday(0, 13), monday(0, 18))
    # Asleep all of keep-awake: no timed wake at all.
    never = scheduled(keep_awake=LUNCH, asleep=OFFICE)
    assert never.next_wake("web", monday(0, 10)) is None


def test_an_asleep_window_suppresses_or_delays_an_arrivals_wake():
    predictor = learned(3)
    early = [parse_window("mon 07:00-10:00 Europe/Berlin")]
    predictor.configure("web", ARRIVALS, asleep=early)
    assert predictor.next_wake("web", monday(3, 8)) is None  # the slot is inside it
    # The lead time would start inside one ending at the slot: woken at its end.
    predictor.configure("web", ARRIVALS, asleep=[parse_window("mon 07:00-09:00 Europe/Berlin")])
    wake = predictor.next_wake("web", monday(3, 8))
    assert wake is not None and (wake.at, wake.until) == (monday(3, 9), monday(3, 9, 15))


def test_the_earlier_of_the_schedule_and_the_arrivals_wins():
    predictor = learned(3)
    predictor.configure("web", ARRIVALS, keep_awake=[parse_window("mon 10:00-11:00 Europe/Berlin")])
    wake = predictor.next_wake("web", monday(3, 8))
    assert wake is not None and wake.kind == "arrivals"
    wake = predictor.next_wake("web", monday(3, 9, 30))
    assert wake is not None and (wake.kind, wake.at) == ("schedule", monday(3, 10))


# -- accounting ----------------------------------------------------------------------


def test_a_predicted_wake_followed_by_a_request_is_used_and_one_that_sleeps_is_wasted():
    predictor = learned(3)
    wake = predictor.next_wake("web", monday(3, 8))
    assert wake is not None and predictor.predicted("web", wake.at, wake)
    assert not predictor.predicted("web", wake.at + 1, wake), "one open at a time"
    predictor.arrived("web", wake.at + 304.0)
    predictor.arrived("web", wake.at + 310.0)  # settled already
    assert predictor.drain_outcomes() == [Outcome("web", "arrivals", "used", 304.0)]
    assert predictor.drain_outcomes() == []
    predictor.slept("web", wake.at + 900.0)  # nothing open
    assert predictor.drain_outcomes() == []
    chain = Prediction("web", monday(4, 20), monday(4, 20) + 30, "chain", "chain x -> web")
    predictor.predicted("web", monday(4, 20), chain)
    predictor.slept("web", monday(4, 20, 15))
    assert predictor.drain_outcomes() == [Outcome("web", "chain", "wasted", 900.0)]
    stats = predictor.stats("web")
    assert (stats["predicted"], stats["used"], stats["wasted"]) == (2, 1, 1)
    assert stats["awake_seconds"] == 1204.0 and stats["open"] is None
    assert stats["kinds"]["arrivals"] == {
        "predicted": 1,
        "used": 1,
        "wasted": 0,
        "awake_seconds": 304.0,
    }
    assert predictor.table("web", monday(5))["accounting"] == stats


def test_unknown_services_are_ignored():
    predictor = Predictor()
    assert predictor.arrived("nope", T0) == []
    predictor.woke("nope", T0, 1.0)
    assert predictor.next_wake("nope", T0) is None and predictor.table("nope", T0) == {}
    assert predictor.tracked() == (0, 0, 0)


def test_settings_are_checked():
    for bad in (
        {"threshold": 0.0},
        {"threshold": float("nan")},
        {"chain_window": -1.0},
        {"min_wake_time": math.inf},
        {"min_samples": 0},
    ):
        with pytest.raises(ValueError, match=next(iter(bad))):
            PredictSettings(**bad)


# -- bounds --------------------------------------------------------------------------


def traffic(predictor: Predictor, names: list[str], requests: int, seed: int) -> None:
    rnd = random.Random(seed)
    partners = {name: rnd.sample(names, 3) for name in names}
    now = T0
    for _ in range(requests):
        now += rnd.expovariate(1 / 5)
        leader = rnd.choice(names)
        predictor.arrived(leader, now)
        if rnd.random() < 0.5:
            predictor.arrived(rnd.choice(partners[leader]), now + rnd.uniform(0, 20))
        if rnd.random() < 0.2:
            predictor.woke(leader, now, rnd.uniform(0.0, 3.0))


def test_ten_thousand_random_services_stay_within_the_bounds():
    predictor = Predictor("Europe/Berlin")
    names = [f"service-{i:05d}" for i in range(10_000)]
    for name in names:
        predictor.configure(name, PredictSettings(arrivals=True, chains=True))
    traffic(predictor, names, 30_000, seed=17)
    services, pairs, slots = predictor.tracked()
    assert services <= 4096 and pairs <= 10_000 and slots <= 65_536
    assert pairs > 9_000, "the pair bound was reached (and enforced)"
    state = json.dumps(predictor.to_state())
    assert len(state) < 4_000_000
    restored = Predictor.from_state(json.loads(state))
    assert restored.tracked() == predictor.tracked()


def test_small_bounds_keep_the_recent_services():
    predictor = Predictor(max_services=50, max_pairs=100, max_slots=200)
    names = [f"s{i}" for i in range(2_000)]
    for name in names:
        predictor.configure(name, PredictSettings(arrivals=True, chains=True))
    traffic(predictor, names, 5_000, seed=3)
    services, pairs, slots = predictor.tracked()
    assert services <= 50 and pairs <= 100 and slots <= 200
    predictor.arrived("s7", T0 + 10 * DAY)
    assert "s7" in predictor.to_state()["services"][-1:]


def test_a_full_state_stays_under_a_few_megabytes():
    rnd = random.Random(5)
    names = [f"service-{i:05d}" for i in range(4096)]
    week = 105_600
    arrivals = {}
    for name in names:  # 65,536 slots: 16 a service
        slots = rnd.sample(range(672), 16)
        arrivals[name] = [[s, rnd.uniform(0.01, 1.0), week - rnd.randrange(13)] for s in slots]
    # 8,192 episode counts: every service a leader in two windows.
    episodes = [
        [n, w, rnd.uniform(0.01, 500.0), T0 + rnd.uniform(0, 1e6)] for n in names for w in (5, 30)
    ]
    pairs: list[list[object]] = []
    while len(pairs) < 10_000:
        a, b = rnd.sample(names, 2)
        pairs.append([a, b, 30.0, rnd.uniform(0.01, 50.0), T0 + rnd.uniform(0, 1e6)])
    pairs = [list(p) for p in {(p[0], p[1]): p for p in pairs}.values()]
    state = {
        "version": 2,
        "zone": "Europe/Berlin",
        "services": names,
        "arrivals": arrivals,
        "chains": {"episodes": episodes, "pairs": pairs},
        "wake_times": {n: [rnd.uniform(0.0, 10.0) for _ in range(16)] for n in names},
    }
    full = Predictor.from_state(state)
    assert full.tracked()[0] == 4096 and full.tracked()[2] == 65_536
    assert full.chains.counts_held == 8192
    assert len(json.dumps(full.to_state())) < 4_000_000
    state["chains"]["episodes"].append(["service-00000", 60.0, 1.0, T0])  # past the bound
    with pytest.raises(ValueError, match=r"chains.episodes: 8193 entries \(expected at most 8192"):
        Predictor.from_state(state)


# -- state ---------------------------------------------------------------------------


def rich() -> tuple[Predictor, float]:
    predictor = learned(4)
    predictor.configure("a", PredictSettings())
    predictor.configure("b", CHAINS)
    now = monday(4)
    for _ in range(6):
        predictor.arrived("a", now)
        predictor.arrived("b", now + 3)
        now += 600.0
    predictor.woke("b", now, 1.5)
    return predictor, now


def configure_like(predictor: Predictor) -> Predictor:
    predictor.configure("web", ARRIVALS)
    predictor.configure("a", PredictSettings())
    predictor.configure("b", CHAINS)
    return predictor


def test_a_state_round_trip_gives_the_same_predictions():
    predictor, now = rich()
    data = json.loads(json.dumps(predictor.to_state()))
    assert data["version"] == 2 and data["zone"] == "Europe/Berlin"
    restored = configure_like(Predictor.from_state(data))
    assert restored.to_state() == predictor.to_state()
    for name in ("web", "a", "b"):
        assert restored.table(name, now + DAY) == predictor.table(name, now + DAY)
        assert restored.next_wake(name, monday(4, 8)) == predictor.next_wake(name, monday(4, 8))
    assert predictor.next_wake("web", monday(4, 8)) is not None
    assert restored.arrived("a", now + DAY) == predictor.arrived("a", now + DAY) != []


def test_a_state_read_in_another_zone_keeps_the_chains_not_the_slots():
    predictor, now = rich()
    restored = configure_like(Predictor.from_state(predictor.to_state(), zone="UTC"))
    assert restored.zone == "UTC"
    assert restored.table("web", now)["slots"] == []
    assert restored.table("a", now)["followers"] == predictor.table("a", now)["followers"]


def test_a_future_dated_state_is_read_as_of_now_so_it_decays():
    # A state written by a clock ahead of ours (or by hand) dated its counts and slots
    # later than now: counts decay only from their time and a slot takes no request
    # before its week, so they stayed at full weight until the clock got there.
    predictor, _ = rich()  # a and b: chains learned on monday(4); web: Mondays 09:05
    state = json.loads(json.dumps(predictor.to_state()))
    now = monday(-20)  # twenty weeks before the state's dates
    restored = configure_like(Predictor.from_state(state, now=now))
    counts = restored.to_state()["chains"]
    assert all(row[3] <= now for row in counts["episodes"])
    assert all(row[4] <= now for row in counts["pairs"])
    # Three weeks on, the habit has missed two Mondays: no longer likely.
    assert restored.next_wake("web", monday(-17, 8)) is None
    assert predictor.next_wake("web", monday(4, 8)) is not None  # the state's own: likely
    # A request in that slot is learned (a slot dated later took none).
    assert restored.arrivals.record("web", monday(-17, 9, 5))
    # Six episodes of a: below the 3 samples b asks for 10 days after now, as six
    # learned now would be (as of its own date the state trusts the chain).
    assert not restored.table("a", now + 10 * DAY)["followers"][0]["trusted"]
    assert restored.arrived("a", now + 10 * DAY) == []


def test_forget_drops_what_was_learned():
    predictor, now = rich()
    predictor.forget("b")
    assert predictor.table("a", now)["followers"] == []
    assert predictor.table("b", now) == {}
    assert "b" not in predictor.to_state()["services"]


def _valid() -> dict[str, object]:
    return rich()[0].to_state()


def _set(path: str, value):
    def mutate(state):
        *keys, last = path.split(".")
        target = state
        for key in keys:
            target = target[int(key)] if isinstance(target, list) else target[key]
        if isinstance(target, list):
            target[int(last)] = value
        elif value is _DELETE:
            del target[last]
        else:
            target[last] = value
        return state

    return mutate


_DELETE = object()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda s: [s], "state: top: expected an object, got list"),
        (lambda s: {}, "state: top: no 'version'"),
        (_set("version", 3), "state: version: 3 (expected 1 or 2)"),
        (_set("version", "1"), "state: version: '1' (expected 1 or 2)"),
        (_set("version", True), "state: version: True (expected 1 or 2)"),
        (_set("chains", _DELETE), "state: top: no 'chains'"),
        (_set("zone", 5), "state: zone: expected str, got int"),
        (_set("zone", "Mars/Olympus"), "state: zone: unknown time zone 'Mars/Olympus'"),
        (_set("services", "web"), "state: services: expected list, got str"),
        (_set("services.0", 7), "state: services[0]: expected a name"),
        (lambda s: {**s, "services": [*s["services"], "web"]}, "state: services: a name twice"),
        (_set("arrivals", []), "state: arrivals: expected dict, got list"),
        (_set("arrivals.web.0.0", 700), "arrivals['web'][0] slot: 700 (expected 0 .. 671)"),
        (_set("arrivals.web.0.0", "36"), "arrivals['web'][0] slot: expected an integer, got str"),
        (_set("arrivals.web.0.1", float("nan")), "arrivals['web'][0] p: nan (expected"),
        (_set("arrivals.web.0.1", "0.5"), "arrivals['web'][0] p: expected a number, got str"),
        (_set("arrivals.web.0.1", 0), "arrivals['web'][0] p: 0 (expected"),
        (_set("arrivals.web.0.1", 1.5), "arrivals['web'][0] p: 1.5 (expected"),
        (_set("arrivals.web.0.2", -1), "arrivals['web'][0] week: -1 (expected 0 .. 600000)"),
        (_set("arrivals.web.0", [36, 0.5]), "arrivals['web'][0]: expected a list of 3"),
        (_set("arrivals.ghost", []), "arrivals['ghost']: service 'ghost' is not in services"),
        (_set("arrivals.web", [[s, 0.5, 1] for s in range(673)]), "673 entries (expected at"),
        (
            lambda s: _set("arrivals.web", s["arrivals"]["web"] * 2)(s),
            "arrivals['web'][1]: slot 36 twice",
        ),
        (_set("chains.pairs", [["a", "b", 30.0, 1.0, T0]] * 10_001), "chains.pairs: 10001 entries"),
        (_set("chains.pairs.0.0", "b"), "chains.pairs[0]: expected two different service"),
        (_set("chains.pairs.0", ["a", "b", 1.0, T0]), "chains.pairs[0]: expected a list of 5"),
        (_set("chains.pairs.0.2", "30"), "chains.pairs[0] window: expected a number, got str"),
        (
            _set("chains.pairs.0.2", 5.0),
            "chains.pairs[0]: leader 'a' has no chains.episodes count in window 5",
        ),
        (_set("chains.pairs.0.3", math.inf), "chains.pairs[0] n: inf (expected"),
        (_set("chains.pairs.0.4", None), "chains.pairs[0] when: expected a number, got None"),
        (_set("chains.episodes", {}), "chains.episodes: expected list, got dict"),
        (_set("chains.episodes.0", [1.0]), "chains.episodes[0]: expected a list of 4"),
        (_set("chains.episodes.0.0", 7), "chains.episodes[0]: expected a service name first"),
        (_set("chains.episodes.0.0", "ghost"), "service 'ghost' is not in services"),
        (_set("chains.episodes.0.1", 0), "chains.episodes[0] window: 0 (expected seconds above 0)"),
        (_set("chains.episodes.0.1", math.nan), "chains.episodes[0] window: nan (expected"),
        (_set("chains.episodes", []), "chains.pairs[0]: leader 'a' has no chains.episodes"),
        (_set("chains.episodes.0.2", True), "chains.episodes[0] n: expected a number, got bool"),
        (
            lambda s: _set("chains.episodes", s["chains"]["episodes"] * 2)(s),
            "chains.episodes[2]: 'a' in window 30 twice",
        ),
        (_set("wake_times.b", [1.0] * 17), "wake_times['b']: 17 entries (expected at most 16)"),
        (_set("wake_times.b.0", -1.0), "wake_times['b'][0]: -1.0 (expected 0 .. 86400)"),
        (_set("wake_times.b", "1.5"), "wake_times['b']: expected a list, got str"),
    ],
)
def test_a_corrupt_state_is_refused_saying_what_is_wrong(mutate, message):
    state = mutate(copy.deepcopy(_valid()))
    with pytest.raises(ValueError) as caught:
        Predictor.from_state(state)
    assert message in str(caught.value)


def test_more_services_than_the_bound_is_refused():
    state = _valid()
    with pytest.raises(ValueError, match=r"services: 3 entries \(expected at most 2\)"):
        Predictor.from_state(state, max_services=2)


def test_a_state_with_a_probability_that_would_round_to_zero_is_refused():
    state = Predictor("UTC").to_state()
    state["services"] = ["a"]
    state["arrivals"] = {"a": [[3, 1e-9, 2900]]}
    with pytest.raises(ValueError, match=r"arrivals.* p: 1e-09 \(expected 1e-06 \.\. 1\)"):
        Predictor.from_state(state)


def v1_state() -> dict[str, object]:
    """A version-1 state: no windows (a's episodes were counted in a's own window)."""
    return {
        "version": 1,
        "zone": "UTC",
        "services": ["a", "b"],
        "arrivals": {},
        "chains": {"episodes": {"a": [5.0, T0]}, "pairs": [["a", "b", 4.0, T0]]},
        "wake_times": {},
    }


def test_a_version_1_state_is_read_as_counted_in_the_default_window():
    predictor = Predictor.from_state(v1_state())
    predictor.configure("a", PredictSettings())
    predictor.configure("b", CHAINS)  # its window: the default 30 s
    table = predictor.table("a", T0)
    assert table["episodes"] == [{"window": 30.0, "n": 5.0}]
    assert table["followers"] == [
        {"service": "b", "window": 30.0, "p": 0.8, "n": 4.0, "trusted": True}
    ]
    assert [w.reason for w in predictor.arrived("a", T0 + 100.0)] == ["chain a -> b p=0.80"]
    assert predictor.to_state()["version"] == 2
    # A follower with another window: its version-1 pairs were not of its episodes.
    other = Predictor.from_state(v1_state())
    other.configure("b", PredictSettings(chains=True, chain_window=5.0))
    assert other.table("b", T0)["leaders"] == []


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (_set("chains.episodes", []), "state: chains.episodes: expected dict, got list"),
        (_set("chains.episodes.a", [1.0]), "chains.episodes['a']: expected a list of 2"),
        (_set("chains.episodes.a.0", True), "chains.episodes['a'] n: expected a number, got bool"),
        (_set("chains.episodes", {}), "chains.pairs[0]: leader 'a' has no chains.episodes"),
        (
            _set("chains.pairs.0", ["a", "b", 30.0, 4.0, T0]),
            "chains.pairs[0]: expected a list of 4",
        ),
        (_set("chains.pairs.0.2", math.inf), "chains.pairs[0] n: inf (expected"),
        (_set("chains.pairs.0.1", "ghost"), "chains.pairs[0]: service 'ghost' is not in services"),
    ],
)
def test_a_corrupt_version_1_state_is_refused_saying_what_is_wrong(mutate, message):
    with pytest.raises(ValueError) as caught:
        Predictor.from_state(mutate(v1_state()))
    assert message in str(caught.value)
