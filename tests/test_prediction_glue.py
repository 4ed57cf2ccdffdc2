"""The prediction glue (wakeproxy/serve/predictions.py) carrying out the plan's answers on a
simulated clock: a fake loop and fake services. The rules themselves are the core's
(tests/test_core_predict_plan.py); the real processes are tests/test_prediction.py."""

from __future__ import annotations

import heapq
import itertools
import os
from datetime import UTC, datetime

import pytest

from tests.helpers import config_from, config_text, service
from wakeproxy.core.events import HoldAwake
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


def setup(wall_offset: float = 0.0, **policies):
    """The glue over ``policies``' services; its wall clock reads ``wall_offset`` seconds
    ahead of the loop's (0: the same clock)."""
    config = config_from(
        config_text(
            *(
                service(name, 9000 + i, 9100 + i, command=["srv"], sleep_policy=policy)
                for i, (name, policy) in enumerate(policies.items())
            ),
            prediction={"state_file": None},
        )
    )
    loop = Loop(MONDAY - wall_offset)
    glue = Predictions(config.prediction, lambda: loop.time() + wall_offset, loop)
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


def running_before_its_asleep_window():
    """web, running, its asleep window starting a minute later (Monday 09:00)."""
    loop, glue, b = setup(web={"idle_timeout": 3600, "asleep_windows": ["09:00-12:00 UTC"]})
    web = b["web"]
    move(glue, web, State.WAKING)
    move(glue, web, State.RUNNING)
    return loop, glue, web


def test_an_asleep_windows_timer_fired_a_moment_early_still_sleeps_it_once():
    # Read twice, the clock said "not yet" in the timer and "already begun" in its
    # rearm, which then armed the next day's start: the backend stayed awake (CI). The
    # glue reads it once per event now.
    loop, _, web = running_before_its_asleep_window()
    # Fired 0.5 ms early: the timer reads 0.1 ms before the start, a second read would
    # be 0.3 ms after.
    loop.early, loop.tick = 0.0005, 0.0004
    loop.run_until(MONDAY + 61)
    assert web.sleeps == [SleepReason.SCHEDULE]


def test_timers_and_holds_are_on_the_loops_clock_at_the_plans_wall_clock_times():
    # The loop's clock and the wall clock differ (monotonic against epoch): the plan
    # answers wall-clock times; the glue arms and holds at the seconds left, on the loop.
    offset = 1_000_000.0
    loop, _, b = setup(offset, web={"keep_awake": ["09:00-18:00 UTC"]})
    web = b["web"]
    [(when, *_)] = [e for e in loop._queue if not e[2].cancelled]
    assert when == MONDAY + 60 - offset  # 09:00 wall, a minute on
    loop.run_until(MONDAY + 61 - offset)
    assert len(web.wakes) == 1 and web.wakes[0].startswith("predicted: schedule")
    # Held to the window's end (18:00), in the loop's time.
    assert web.holds[-1] == datetime(2026, 6, 1, 18, tzinfo=UTC).timestamp() - offset


def test_one_timer_per_service_whatever_happens():
    loop, glue, b = setup(
        web={"keep_awake": ["09:00-18:00 UTC"], "asleep_windows": ["12:00-13:00 UTC"]},
        api={"predict": {"chains": True}},
    )
    for state in (State.WAKING, State.RUNNING, State.PAUSING, State.PAUSED) * 3:
        move(glue, b["web"], state)
        glue.arrived(b["api"])
        loop.run_until(loop.now + 1800)
    live = [e[4][0].name for e in loop._queue if not e[2].cancelled]
    assert sorted(live) == ["api", "web"]
    glue.detach(b["web"])
    assert [e[4][0].name for e in loop._queue if not e[2].cancelled] == ["api"]


def test_after_stop_nothing_fires_and_no_hook_acts():
    loop, glue, b = setup(web={"keep_awake": ["09:00-18:00 UTC"]})
    glue.stop()
    loop.run_until(MONDAY + 3600)
    glue.arrived(b["web"])
    glue.state_changed(b["web"], State.STOPPED, State.RUNNING)
    assert b["web"].wakes == [] and b["web"].holds == []


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
