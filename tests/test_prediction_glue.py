"""The prediction glue's rules (wakeproxy/serve/predictions.py) on a simulated clock: a fake
loop and fake services (logic only: the real processes are tests/test_prediction.py)."""

from __future__ import annotations

import heapq
import itertools
import os
from datetime import UTC, datetime

import pytest

from tests.helpers import config_from, config_text, service
from wakeproxy.core.events import HoldAwake
from wakeproxy.core.predict import WAKE_SAMPLES
from wakeproxy.core.states import SleepReason, State
from wakeproxy.serve.predictions import MAX_STATE_BYTES, Predictions, Refused, read_state

# Monday 2026-06-01 08:59:00 UTC.
MONDAY = datetime(2026, 6, 1, 8, 59, tzinfo=UTC).timestamp()
WEEK = 7 * 86400.0


class Handle:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """Wall clock and loop clock in one: ``time`` is epoch seconds. ``early``: timers
    fire that much before their time (uvloop's count whole milliseconds); ``tick``:
    every reading of the clock advances it that much (time passes while code runs)."""

    def __init__(self, now: float) -> None:
        self.now = now
        self.early = 0.0
        self.tick = 0.0
        self._queue: list[tuple[float, int, Handle, object, tuple]] = []
        self._order = itertools.count()

    def time(self) -> float:
        self.now += self.tick
        return self.now

    def call_at(self, when, callback, *args) -> Handle:
        handle = Handle()
        heapq.heappush(self._queue, (when, next(self._order), handle, callback, args))
        return handle

    def run_until(self, end: float) -> None:
        while self._queue and self._queue[0][0] <= end:
            when, _, handle, callback, args = heapq.heappop(self._queue)
            if not handle.cancelled:
                self.now = max(self.now, when - self.early)
                callback(*args)
        self.now = end


class Backend:
    """What the glue sees of a service; the test moves its state."""

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.state = State.STOPPED
        self.attached = 0
        self.holds: list[float] = []
        self.wakes: list[str] = []
        self.sleeps: list[SleepReason] = []

    def feed(self, event) -> None:
        assert isinstance(event, HoldAwake)
        self.holds.append(event.until)

    def wake_in_background(self, reason: str) -> None:
        self.wakes.append(reason)

    def sleep_in_background(self, reason: SleepReason) -> None:
        self.sleeps.append(reason)


def setup(**policies):
    config = config_from(
        config_text(
            *(
                service(name, 9000 + i, 9100 + i, command=["srv"], sleep_policy=policy)
                for i, (name, policy) in enumerate(policies.items())
            ),
            prediction={"state_file": None},
        )
    )
    loop = Loop(MONDAY)
    glue = Predictions(config.prediction, loop.time, loop)
    backends = {name: Backend(cfg) for name, cfg in config.services.items()}
    for backend in backends.values():
        glue.attach(backend)
    return loop, glue, backends


def move(glue, backend, state) -> None:
    before, backend.state = backend.state, state
    glue.state_changed(backend, before, state)


def test_a_chain_holds_an_asleep_follower_until_its_first_request_then_lets_go():
    chain = {"idle_timeout": 60, "predict": {"chains": True, "chain_window": 20, "min_samples": 2}}
    loop, glue, b = setup(git={"idle_timeout": 60}, files=chain)
    for _ in range(2):  # two episodes of git, each followed by files
        glue.arrived(b["git"])
        loop.run_until(loop.now + 1)
        glue.arrived(b["files"])
        loop.run_until(loop.now + 60)
    assert b["files"].wakes == []
    glue.arrived(b["git"])
    assert len(b["files"].wakes) == 1 and b["files"].wakes[0].startswith("predicted: chain")
    assert b["files"].holds[-1] == loop.now + 20
    move(glue, b["files"], State.WAKING)
    move(glue, b["files"], State.RUNNING)
    loop.run_until(loop.now + 2)
    glue.arrived(b["files"])  # used: its own idle clock from here
    assert b["files"].holds[-1] == 0.0
    assert glue.core.stats("files")["kinds"]["chain"]["used"] == 1


def test_an_awake_follower_is_held_for_the_chain_window_without_a_wake():
    chain = {"idle_timeout": 60, "predict": {"chains": True, "chain_window": 20, "min_samples": 1}}
    loop, glue, b = setup(git={"idle_timeout": 60}, files=chain)
    glue.arrived(b["git"])
    loop.run_until(loop.now + 1)
    glue.arrived(b["files"])
    loop.run_until(loop.now + 60)
    b["files"].state = State.RUNNING
    glue.arrived(b["git"])
    assert b["files"].wakes == [] and b["files"].holds[-1] == loop.now + 20
    assert glue.core.stats("files")["predicted"] == 0  # no wake: nothing to count


def test_a_failed_window_wake_is_tried_again_in_30_seconds_not_at_once():
    loop, glue, b = setup(web={"keep_awake": ["08:00-18:00 UTC"]})
    web = b["web"]
    loop.run_until(loop.now)  # inside the window from the start: woken at once
    assert len(web.wakes) == 1
    move(glue, web, State.WAKING)
    move(glue, web, State.FAILED)
    loop.run_until(loop.now + 29)
    assert len(web.wakes) == 1
    loop.run_until(loop.now + 2)
    assert len(web.wakes) == 2
    assert glue.core.stats("web")["kinds"]["schedule"]["wasted"] == 1  # the failed one


def test_a_sleep_inside_a_window_lasts_until_its_next_start():
    loop, glue, b = setup(web={"keep_awake": ["08:00-18:00 UTC"]})
    web = b["web"]
    loop.run_until(loop.now)
    move(glue, web, State.WAKING)
    move(glue, web, State.RUNNING)
    assert web.holds[-1] == datetime(2026, 6, 1, 18, tzinfo=UTC).timestamp()
    move(glue, web, State.PAUSING)  # the API, say
    move(glue, web, State.PAUSED)
    loop.run_until(loop.now + 5 * 3600)  # hourly checks included
    assert len(web.wakes) == 1
    loop.run_until(datetime(2026, 6, 2, 8, 0, 1, tzinfo=UTC).timestamp())
    assert len(web.wakes) == 2  # Tuesday's start


def running_before_its_asleep_window():
    """web, running, its asleep window starting a minute later (Monday 09:00)."""
    loop, glue, b = setup(web={"idle_timeout": 3600, "asleep_windows": ["09:00-12:00 UTC"]})
    web = b["web"]
    web.state = State.RUNNING
    glue.rearm(web)
    return loop, glue, web


def test_an_asleep_window_sleeps_at_its_start_only():
    loop, _, web = running_before_its_asleep_window()
    loop.run_until(MONDAY + 61)  # 09:00:01
    assert web.sleeps == [SleepReason.SCHEDULE]
    # Woken by a request inside it: its idle timer decides, not the hourly check.
    loop.run_until(MONDAY + 2 * 3600 + 30)
    assert web.sleeps == [SleepReason.SCHEDULE]


def test_an_asleep_windows_timer_fired_a_moment_early_still_sleeps_it_once():
    # Read twice, the clock said "not yet" in the timer and "already begun" in its
    # rearm, which then armed the next day's start: the backend stayed awake (CI).
    loop, _, web = running_before_its_asleep_window()
    # Fired 0.5 ms early: the timer reads 0.1 ms before the start, its rearm 0.3 ms after.
    loop.early, loop.tick = 0.0005, 0.0004
    loop.run_until(MONDAY + 61)
    assert web.sleeps == [SleepReason.SCHEDULE]


def test_a_rearm_after_an_asleep_start_before_its_late_timer_ran_keeps_the_start():
    loop, glue, web = running_before_its_asleep_window()
    loop.now = MONDAY + 60.005  # 5 ms past the start; the loop has not run the timer yet
    glue.rearm(web)  # as a state change or a reconfigure does
    loop.run_until(MONDAY + 61)
    assert web.sleeps == [SleepReason.SCHEDULE]


def test_a_service_in_flight_when_its_asleep_window_begins_is_decided_once_settled():
    loop, glue, b = setup(
        web={"idle_timeout": 3600, "asleep_windows": ["09:00-12:00 UTC"]},
        api={"idle_timeout": 3600, "asleep_windows": ["09:00-12:00 UTC"]},
    )
    web, api = b["web"], b["api"]
    move(glue, web, State.WAKING)
    move(glue, api, State.WAKING)
    loop.run_until(MONDAY + 61)
    assert web.sleeps == api.sleeps == []
    move(glue, web, State.RUNNING)
    assert web.sleeps == [SleepReason.SCHEDULE]
    api.attached = 1  # woken for a request: its idle timer decides
    move(glue, api, State.RUNNING)
    assert api.sleeps == []
    # Once per window: woken again inside it, it is not slept again.
    for state in (State.STOPPING, State.STOPPED, State.WAKING, State.RUNNING):
        move(glue, web, state)
    loop.run_until(MONDAY + 2 * 3600)
    assert web.sleeps == [SleepReason.SCHEDULE] and api.sleeps == []


def test_an_awake_service_is_not_woken_again_within_its_predicted_slot():
    loop, glue, b = setup(web={"predict": {"arrivals": True}})
    web = b["web"]
    for week in (3, 2, 1):  # Mondays 09:05 of three weeks: p 0.66 for this one
        glue.core.arrived("web", MONDAY + 360 - week * WEEK)
    for _ in range(WAKE_SAMPLES):
        glue.core.woke("web", MONDAY - WEEK, 2.0)
    web.state = State.RUNNING
    glue.rearm(web)
    loop.run_until(MONDAY + 70)  # 09:00:10: the wake ahead came due while it was awake
    move(glue, web, State.PAUSING)  # its idle timer
    move(glue, web, State.PAUSED)
    loop.run_until(MONDAY + 900)
    assert web.wakes == []
    glue.arrived(web)  # this week's request (the proxy wakes it for that one itself)
    # Next Monday's slot: asleep then, so woken ahead.
    loop.run_until(MONDAY + WEEK + 120)
    assert len(web.wakes) == 1 and "arrivals Mon 09:00" in web.wakes[0]


def test_after_stop_nothing_fires_and_no_hook_acts():
    loop, glue, b = setup(web={"keep_awake": ["09:00-18:00 UTC"]})
    glue.stop()
    loop.run_until(MONDAY + 3600)
    glue.arrived(b["web"])
    glue.state_changed(b["web"], State.STOPPED, State.RUNNING)
    assert b["web"].wakes == [] and b["web"].holds == []


def test_a_wake_due_while_the_backend_goes_to_sleep_happens_once_it_is_asleep():
    loop, glue, b = setup(web={"predict": {"arrivals": True}})
    web = b["web"]
    for week in (3, 2, 1):
        glue.core.arrived("web", MONDAY + 360 - week * WEEK)
    for _ in range(WAKE_SAMPLES):
        glue.core.woke("web", MONDAY - WEEK, 2.0)
    web.state = State.RUNNING
    glue.rearm(web)
    web.state = State.PAUSING  # its idle timer, just before the wake ahead comes due
    loop.run_until(MONDAY + 58)  # 08:59:58: due at 08:59:56
    assert web.wakes == []
    move(glue, web, State.PAUSED)
    loop.run_until(loop.now)
    assert len(web.wakes) == 1


def test_the_state_file_is_read_only_as_a_regular_file_within_its_bound(tmp_path):
    # Read whole and unchecked, a symlink to /dev/zero read until memory ran out (not
    # run against that code: it would exhaust the machine).
    (tmp_path / "zero").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    for name, why in [
        ("zero", "a symbolic link"),
        ("fifo", "a FIFO"),
        ("dir", "a device, socket or directory"),
    ]:
        with pytest.raises(Refused, match=why):
            read_state(str(tmp_path / name))
    with pytest.raises(Refused, match="a device, socket or directory"):
        read_state("/dev/zero")
    big = tmp_path / "big"
    with open(big, "wb") as file:
        file.truncate(MAX_STATE_BYTES + 1)  # sparse
    with pytest.raises(Refused, match=f"{MAX_STATE_BYTES + 1} bytes"):
        read_state(str(big))
    # A symlinked state directory is followed like any directory; the file at its bound
    # is read.
    real = tmp_path / "real"
    real.mkdir()
    with open(real / "state.json", "wb") as file:
        file.truncate(MAX_STATE_BYTES)
    (tmp_path / "linked").symlink_to(real)
    assert len(read_state(str(tmp_path / "linked" / "state.json"))) == MAX_STATE_BYTES
