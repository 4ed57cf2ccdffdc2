"""Prediction's decisions over time (wakeproxy/core/predict_plan.py) with plain calls and a
fake clock: the timer each service gets, the holds, timed and chain wakes, asleep-window
starts. No loop, no sockets; the glue that carries these out is tests/test_prediction_glue.py."""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime

from wakeproxy.core.predict import WAKE_SAMPLES, Predictor, PredictSettings
from wakeproxy.core.predict_plan import (
    EARLY,
    FORGET_AFTER,
    LONGEST,
    RETRY,
    Arm,
    Attached,
    Changed,
    Command,
    Detached,
    Fired,
    HoldUntil,
    KeptAwake,
    Measured,
    Plan,
    Requested,
    SleepScheduled,
    WakeAhead,
)
from wakeproxy.core.schedule import parse_window
from wakeproxy.core.states import State

# Monday 2026-06-01 08:59:00 UTC.
MONDAY = datetime(2026, 6, 1, 8, 59, tzinfo=UTC).timestamp()
WEEK = 7 * 86400.0


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> float:
    return datetime(2026, 6, day, hour, minute, second, tzinfo=UTC).timestamp()


class Services:
    """The plan on a fake clock, and what a glue does with its answers: each service's
    state and open connections (set by the test, reported as the glue would), its one
    timer (fired by ``run_until``), and what it was told."""

    def __init__(self, **policies: dict) -> None:
        self.now = MONDAY
        self.plan = Plan(Predictor("UTC"))
        self.states: dict[str, State] = {}
        self.attached: dict[str, int] = defaultdict(int)
        self.timers: dict[str, float] = {}
        self.holds: dict[str, list[float]] = defaultdict(list)
        self.wakes: dict[str, list[str]] = defaultdict(list)
        self.counted: dict[str, int] = defaultdict(int)
        self.sleeps: dict[str, int] = defaultdict(int)
        self.kept: dict[str, list[int]] = defaultdict(list)
        self.log: list[Command] = []
        for name, policy in policies.items():
            self.states[name] = policy.pop("state", State.STOPPED)
            self.attach(name, **policy)

    def attach(self, name: str, keep_awake=(), asleep=(), **predict) -> list[Command]:
        settings = PredictSettings(**predict)
        event = Attached(
            settings,
            tuple(parse_window(w) for w in keep_awake),
            tuple(parse_window(w) for w in asleep),
            bool(keep_awake or asleep or settings.arrivals or settings.chains),
            self.states[name],
        )
        return self.feed(name, event)

    def feed(self, name: str, event) -> list[Command]:
        out = self.plan.handle(name, event, self.now)
        arms = [target for target, action in out if isinstance(action, Arm)]
        assert len(arms) == len(set(arms)), f"two timers armed for one service: {out}"
        self.log += out
        for target, action in out:
            match action:
                case Arm(when):
                    if when is None:
                        self.timers.pop(target, None)
                    else:
                        assert when >= self.now, "armed in the past"
                        self.timers[target] = when
                case HoldUntil(until):
                    self.holds[target].append(until)
                case WakeAhead(reason, counted):
                    self.wakes[target].append(reason)
                    self.counted[target] += counted
                case SleepScheduled():
                    self.sleeps[target] += 1
                case KeptAwake(attached):
                    self.kept[target].append(attached)
        return out

    def move(self, name: str, *states: State) -> None:
        for state in states:
            before, self.states[name] = self.states[name], state
            self.feed(name, Changed(before, state, self.attached[name]))

    def request(self, name: str) -> list[Command]:
        return self.feed(name, Requested())

    def run_until(self, end: float, early: float = 0.0) -> None:
        """Fire every timer due by ``end`` in order (``early``: that much before its
        time, as a loop's timer may)."""
        while self.timers and min(self.timers.values()) <= end:
            name = min(self.timers, key=lambda n: self.timers[n])
            when = self.timers.pop(name)
            self.now = max(self.now, when - early)
            self.feed(name, Fired(self.attached[name]))
        self.now = max(self.now, end)


def learned_slot(services: Services, name: str) -> None:
    """``name`` requested Mondays 09:05 for three weeks (p 0.66 now), its wakes 2 s."""
    predictor = services.plan.predictor
    for week in (3, 2, 1):
        predictor.arrived(name, MONDAY + 360 - week * WEEK)
    for _ in range(WAKE_SAMPLES):
        predictor.woke(name, MONDAY - WEEK, 2.0)


# ---- one timer per service


def test_each_service_using_prediction_has_one_timer_and_a_check_at_least_hourly():
    s = Services(
        web={"keep_awake": ["09:30-11:00 UTC"]},
        files={"chains": True},  # nothing timed: the hourly check only
        plain={},  # no prediction: no timer
    )
    assert s.timers == {"web": at(1, 9, 30), "files": MONDAY + LONGEST}
    assert s.plan.using == {"web", "files"}
    assert s.plan.armed("web") == at(1, 9, 30) and s.plan.armed("plain") is None
    s.run_until(MONDAY + LONGEST)
    assert s.timers["files"] == MONDAY + 2 * LONGEST


def test_a_service_detached_has_no_timer_and_its_late_reports_change_nothing():
    s = Services(web={"keep_awake": ["10:00-11:00 UTC"]})
    assert s.feed("web", Detached()) == [("web", Arm(None))]
    assert s.plan.using == frozenset()
    assert s.feed("web", Fired(0)) == []
    assert s.feed("web", Changed(State.STOPPED, State.RUNNING, 0)) == []


def test_prediction_turned_off_lets_the_hold_go_and_disarms():
    s = Services(web={"keep_awake": ["08:00-18:00 UTC"]})
    s.run_until(s.now)
    s.move("web", State.WAKING, State.RUNNING)
    assert s.holds["web"][-1] == at(1, 18)
    out = s.attach("web")  # the window removed through the API
    assert ("web", HoldUntil(0.0)) in out and ("web", Arm(None)) in out
    assert "web" not in s.timers and s.plan.using == frozenset()


# ---- timed wakes


def test_a_failed_window_wake_is_tried_again_in_30_seconds_not_at_once():
    s = Services(web={"keep_awake": ["08:00-18:00 UTC"]})
    s.run_until(s.now)  # inside the window from the start: woken at once
    assert len(s.wakes["web"]) == 1
    s.move("web", State.WAKING, State.FAILED)
    s.run_until(s.now + RETRY - 1)
    assert len(s.wakes["web"]) == 1
    s.run_until(s.now + 2)
    assert len(s.wakes["web"]) == 2
    assert s.plan.predictor.stats("web")["kinds"]["schedule"]["wasted"] == 1  # the failed one


def test_a_sleep_inside_a_window_lasts_until_its_next_start():
    s = Services(web={"keep_awake": ["08:00-18:00 UTC"]})
    s.run_until(s.now)
    s.move("web", State.WAKING, State.RUNNING)
    assert s.holds["web"][-1] == at(1, 18)
    s.move("web", State.PAUSING, State.PAUSED)  # the API, say
    s.run_until(s.now + 5 * 3600)  # hourly checks included
    assert len(s.wakes["web"]) == 1
    s.run_until(at(2, 8, 0, 1))
    assert len(s.wakes["web"]) == 2  # Tuesday's start


def test_an_awake_service_is_not_woken_again_within_its_predicted_slot():
    s = Services(web={"arrivals": True})
    learned_slot(s, "web")
    s.move("web", State.WAKING, State.RUNNING)
    s.run_until(MONDAY + 70)  # 09:00:10: the wake ahead came due while it was awake
    s.move("web", State.PAUSING, State.PAUSED)  # its idle timer
    s.run_until(MONDAY + 900)
    assert s.wakes["web"] == []
    s.request("web")  # this week's request (the proxy wakes it for that one itself)
    # Next Monday's slot: asleep then, so woken ahead.
    s.run_until(MONDAY + WEEK + 120)
    assert len(s.wakes["web"]) == 1 and "arrivals Mon 09:00" in s.wakes["web"][0]


def test_one_woken_inside_its_slot_otherwise_and_idle_again_is_not_woken_for_it():
    s = Services(web={"arrivals": True})
    learned_slot(s, "web")  # after its timer was armed: the hourly check, 09:59
    s.now = MONDAY + 180  # 09:02, inside the likely slot: woken with no request (the API)
    s.move("web", State.WAKING, State.RUNNING)
    s.now = MONDAY + 660  # 09:10: idle, asleep again inside the slot: final for it
    s.move("web", State.PAUSING, State.PAUSED)
    s.run_until(MONDAY + 960)
    assert s.wakes["web"] == []


def test_a_wake_due_while_the_backend_goes_to_sleep_happens_once_it_is_asleep():
    s = Services(web={"arrivals": True})
    learned_slot(s, "web")
    s.move("web", State.WAKING, State.RUNNING)
    s.move("web", State.PAUSING)  # its idle timer, just before the wake ahead comes due
    s.run_until(MONDAY + 58)  # 08:59:58: due at 08:59:56
    assert s.wakes["web"] == []
    s.move("web", State.PAUSED)
    s.run_until(s.now)
    assert len(s.wakes["web"]) == 1 and s.counted["web"] == 1


# ---- asleep windows


def running_before_its_asleep_window() -> Services:
    """web, running, its asleep window starting a minute later (Monday 09:00)."""
    s = Services(web={"asleep": ["09:00-12:00 UTC"]})
    s.move("web", State.WAKING, State.RUNNING)
    return s


def test_an_asleep_window_sleeps_at_its_start_only():
    s = running_before_its_asleep_window()
    assert s.timers["web"] == at(1, 9)
    s.run_until(MONDAY + 61)  # 09:00:01
    assert s.sleeps["web"] == 1
    # Woken by a request inside it: its idle timer decides, not the hourly check.
    s.move("web", State.PAUSING, State.PAUSED, State.WAKING, State.RUNNING)
    s.run_until(MONDAY + 2 * 3600 + 30)
    assert s.sleeps["web"] == 1


def test_an_asleep_windows_timer_fired_a_moment_early_still_sleeps_it_once():
    # Fired 5 ms early (within EARLY), it is the start: slept, and tomorrow's armed.
    s = running_before_its_asleep_window()
    s.run_until(MONDAY + 61, early=EARLY / 2)
    assert s.sleeps["web"] == 1
    assert s.timers["web"] == MONDAY + 60 - EARLY / 2 + LONGEST  # the hourly check


def test_a_rearm_after_an_asleep_start_before_its_late_timer_ran_keeps_the_start():
    s = running_before_its_asleep_window()
    s.now = MONDAY + 60.005  # 5 ms past the start; the loop has not run the timer yet
    s.attach("web", asleep=["09:00-12:00 UTC"])  # a reconfigure (a state change does the same)
    assert s.timers["web"] == s.now  # still the start, not tomorrow's
    s.run_until(MONDAY + 61)
    assert s.sleeps["web"] == 1


def test_an_asleep_window_with_connections_open_is_said_not_slept():
    s = running_before_its_asleep_window()
    s.attached["web"] = 2
    s.run_until(MONDAY + 61)
    assert s.sleeps["web"] == 0 and s.kept["web"] == [2]


def test_a_service_in_flight_when_its_asleep_window_begins_is_decided_once_settled():
    window = ["09:00-12:00 UTC"]
    s = Services(web={"asleep": window}, api={"asleep": window})
    s.move("web", State.WAKING)
    s.move("api", State.WAKING)
    s.run_until(MONDAY + 61)
    assert s.sleeps["web"] == s.sleeps["api"] == 0
    s.move("web", State.RUNNING)
    assert s.sleeps["web"] == 1
    s.attached["api"] = 1  # woken for a request: its idle timer decides
    s.move("api", State.RUNNING)
    assert s.sleeps["api"] == 0 and s.kept["api"] == [1]
    # Once per window: woken again inside it, it is not slept again.
    s.move("web", State.STOPPING, State.STOPPED, State.WAKING, State.RUNNING)
    s.run_until(MONDAY + 2 * 3600)
    assert s.sleeps["web"] == 1 and s.sleeps["api"] == 0


# ---- chains and holds


def chained(**follower) -> Services:
    """git then files a second later, twice, a minute apart: files follows git (p 1)."""
    s = Services(git={}, files={"chains": True, "chain_window": 20, "min_samples": 2, **follower})
    for _ in range(2):
        s.request("git")
        s.now += 1
        s.request("files")
        s.run_until(s.now + 60)
    return s


def test_a_chain_holds_an_asleep_follower_until_its_first_request_then_lets_go():
    s = chained()
    assert s.wakes["files"] == []
    s.request("git")
    assert s.wakes["files"] == ["chain git -> files p=1.00"] and s.counted["files"] == 1
    assert s.holds["files"][-1] == s.now + 20
    s.move("files", State.WAKING, State.RUNNING)
    s.now += 2
    s.request("files")  # used: its own idle clock from here
    assert s.holds["files"][-1] == 0.0
    assert s.plan.predictor.stats("files")["kinds"]["chain"]["used"] == 1


def test_an_awake_follower_is_held_for_the_chain_window_without_a_wake():
    s = chained()
    s.move("files", State.WAKING, State.RUNNING)
    s.request("git")
    assert s.wakes["files"] == [] and s.holds["files"][-1] == s.now + 20
    assert s.plan.predictor.stats("files")["predicted"] == 0  # no wake: nothing to count


def test_a_chain_leaves_a_follower_going_to_sleep_or_failed_alone():
    s = chained()
    s.move("files", State.WAKING, State.FAILED)
    assert s.request("git") == []  # retried by its timed wakes only
    s.move("files", State.WAKING, State.RUNNING, State.PAUSING)
    s.now += 100
    assert s.request("git") == []


def test_a_predicted_wake_that_sleeps_unused_is_wasted_and_its_hold_ends():
    s = chained()
    s.request("git")
    s.move("files", State.WAKING, State.RUNNING)
    s.now += 25
    s.move("files", State.PAUSING, State.PAUSED)
    assert s.holds["files"][-1] == 0.0
    books = s.plan.predictor.stats("files")["kinds"]["chain"]
    assert (books["predicted"], books["wasted"], books["awake_seconds"]) == (1, 1, 25.0)


# ---- the state read, forgetting, closing


def test_tables_read_later_replace_the_ones_begun_and_every_service_is_rearmed():
    s = Services(web={"arrivals": True})
    assert s.timers["web"] == MONDAY + LONGEST  # nothing learned yet
    other = Services(web={"arrivals": True})
    learned_slot(other, "web")
    out = s.plan.replace(other.plan.predictor, s.now)
    assert s.plan.predictor is other.plan.predictor
    [(name, arm)] = [c for c in out if isinstance(c[1], Arm)]
    assert name == "web" and arm == Arm(MONDAY + 60 - 4.0)  # the slot, less its lead


def test_a_service_gone_for_an_hour_is_forgotten_one_back_in_time_is_not():
    s = Services(web={"arrivals": True}, api={"arrivals": True})
    s.request("web")
    s.request("api")
    s.feed("web", Detached())
    s.feed("api", Detached())
    assert not s.plan.tidy(s.now)
    s.now += FORGET_AFTER / 2
    s.attach("api", arrivals=True)  # a reload brought it back
    s.now += FORGET_AFTER / 2
    assert s.plan.tidy(s.now)
    assert s.plan.predictor.learned() == ["api"]


def test_closed_nothing_is_decided_but_wake_times_are_learned():
    s = Services(web={"keep_awake": ["08:00-18:00 UTC"]})
    s.plan.close()
    assert s.feed("web", Fired(0)) == []
    assert s.request("web") == []
    assert s.feed("web", Changed(State.STOPPED, State.RUNNING, 0)) == []
    assert s.feed("web", Measured(1.5)) == []
    assert s.plan.predictor.wake_estimate("web") == 1.5
