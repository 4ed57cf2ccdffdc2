"""The decision core and the kernel's fast path (KernelConnections), with plain calls and
a fake clock: connections the proxy never sees keep a backend awake as long as the
kernel lists them, their data moves the idle clock, their arrival during a sleep wakes
it right after."""

from __future__ import annotations

import pytest

from tests.helpers import FakeGlue
from wakeproxy.core.actions import ArmTimer, Refused, RunSleep, RunWake, WakeOp
from wakeproxy.core.events import (
    KernelConnections,
    SleepDone,
    SleepRequested,
    Timer,
    WakeDone,
)
from wakeproxy.core.states import SleepAction, State
from wakeproxy.serve.fastpath import kernel_hint

PAUSE = SleepAction.PAUSE


def seen(attached: int, last: float | None = None, arrived: int = 0) -> KernelConnections:
    return KernelConnections(attached, last, arrived)


def test_kernel_connections_keep_it_awake_and_are_read_again_on_the_timer() -> None:
    glue = FakeGlue()
    node = glue.add("web", idle_delay=10.0)
    assert glue.timers[("web", Timer.IDLE)] == 10.0
    glue.now = 1.0
    glue.feed("web", seen(2, arrived=2))  # handed over since the last read: activity now
    assert node.kernel_attached == 2 and node.last_activity == 1.0
    glue.advance(10.5)
    # The deadline (11) came with them still open: no sleep, read again a tenth of the
    # idle delay later (at least a second), never before the deadline.
    assert glue.actions("web", RunSleep) == []
    assert glue.timers[("web", Timer.IDLE)] == 11.0
    glue.advance(11.0)
    assert glue.actions("web", RunSleep) == []
    assert glue.timers[("web", Timer.IDLE)] == 12.0
    assert node.sleeps_in(glue.now) is None, "no sleep is due while they are open"
    # They ended between two reads: that is activity now, as a close is in tcp mode.
    glue.now = 11.8
    glue.feed("web", seen(0))
    assert node.kernel_attached == 0 and node.last_activity == 11.8
    glue.advance(21.7)
    assert glue.actions("web", RunSleep) == []
    glue.advance(21.8)
    assert glue.actions("web", RunSleep) == [RunSleep(PAUSE)]


def test_their_last_received_data_moves_the_idle_clock() -> None:
    glue = FakeGlue()
    node = glue.add("web", idle_delay=10.0)
    glue.now = 9.0
    glue.feed("web", seen(1, last=8.0))
    assert node.last_activity == 8.0 and node.deadline == 18.0
    glue.feed("web", seen(1, last=2.0))  # an older time never moves it back
    assert node.last_activity == 8.0
    glue.advance(10.0)
    assert glue.timers[("web", Timer.IDLE)] == 11.0, "open: read again a second later"


def test_while_it_hands_connections_over_the_kernel_is_read_sooner() -> None:
    glue = FakeGlue()
    node = glue.add("web", idle_delay=20.0)  # a read every 2 s while busy
    glue.advance(19.5)
    glue.feed("web", seen(0, arrived=1))  # came and went since the last read
    assert node.last_activity == 19.5
    glue.advance(20.0)
    # Not at the deadline (39.5): an arrival after this read would only be stamped then.
    assert glue.timers[("web", Timer.IDLE)] == 22.0
    glue.now = 21.0
    glue.feed("web", seen(0))  # a quiet read: nothing came, nothing is open
    assert node.last_activity == 19.5
    glue.advance(22.0)
    assert glue.timers[("web", Timer.IDLE)] == 39.5, "quiet: straight to the deadline"
    glue.advance(39.4)
    assert glue.actions("web", RunSleep) == []
    glue.advance(39.5)
    assert glue.actions("web", RunSleep) == [RunSleep(PAUSE)]


def test_the_api_sleep_is_refused_while_the_kernel_lists_connections() -> None:
    glue = FakeGlue()
    glue.add("web")
    glue.feed("web", seen(3, arrived=3))
    out = glue.feed("web", SleepRequested(PAUSE))
    assert out == [Refused("3 connection(s) open", forceable=True)]
    assert RunSleep(PAUSE) in glue.feed("web", SleepRequested(PAUSE, force=True))


def test_connections_handed_over_as_it_went_to_sleep_wake_it_right_after() -> None:
    glue = FakeGlue()
    node = glue.add("web", idle_delay=1.0)
    glue.advance(1.0)
    assert node.state is State.PAUSING
    # Read again once the map entry was out: one came between the two reads.
    assert glue.feed("web", seen(1, arrived=1)) == []
    out = glue.feed("web", SleepDone())
    assert RunWake(WakeOp.UNPAUSE) in out and node.state is State.WAKING
    glue.feed("web", WakeDone())
    assert node.state is State.RUNNING


def test_a_read_with_nothing_new_lets_the_sleep_finish() -> None:
    glue = FakeGlue()
    node = glue.add("web", idle_delay=1.0)
    glue.feed("web", seen(1))
    glue.feed("web", seen(0))  # gone by the next read
    glue.advance(2.5)
    assert node.state is State.PAUSING
    glue.feed("web", seen(0))
    assert RunWake(WakeOp.UNPAUSE) not in glue.feed("web", SleepDone())
    assert node.state is State.PAUSED


def test_a_count_read_while_running_is_forgotten_once_it_sleeps() -> None:
    glue = FakeGlue()
    node = glue.add("web")
    glue.feed("web", seen(4, arrived=4))
    glue.feed("web", SleepRequested(PAUSE, force=True))
    glue.feed("web", SleepDone())
    assert node.state is State.PAUSED and node.kernel_attached == 0
    # Asleep, a read has nothing to say (the glue reads only while it runs or goes to sleep).
    assert glue.feed("web", seen(2, arrived=2)) == []
    assert node.kernel_attached == 0


def test_a_group_member_with_kernel_connections_holds_the_group() -> None:
    glue = FakeGlue()
    glue.add("app", idle_delay=1.0)
    glue.add("db", idle_delay=1.0)
    glue.link({"app": ((), "g"), "db": ((), "g")})
    glue.feed("db", seen(1, arrived=1))
    glue.advance(5.0)
    assert glue.actions("app", RunSleep) == [] and glue.actions("db", RunSleep) == []
    glue.feed("db", seen(0))
    glue.advance(7.0)
    assert glue.actions("app", RunSleep) == [RunSleep(PAUSE)]
    assert glue.actions("db", RunSleep) == [RunSleep(PAUSE)]
    assert ArmTimer(Timer.IDLE, 6.0) in glue.actions("db", ArmTimer)


@pytest.mark.parametrize(
    ("release", "says"),
    [
        ("5.4.0-150-generic", "kernel 5.4.0-150-generic: sk_lookup needs Linux 5.9 or later"),
        (
            "5.10.0-28-amd64",
            "kernel 5.10.0-28-amd64 has sk_lookup: the program or its map was refused",
        ),
        ("6.1.0-13-amd64", "kernel 6.1.0-13-amd64 has sk_lookup"),
        ("weird", "kernel weird: sk_lookup needs Linux 5.9 or later"),
        ("5.8-rc1", "kernel 5.8-rc1: sk_lookup needs Linux 5.9 or later"),
    ],
)
def test_a_refused_load_names_the_kernel_and_blames_its_age_only_when_it_is_old(
    release: str, says: str
) -> None:
    # The fallback's reason said "needs Linux 5.9" whatever the kernel: on 6.1 that
    # pointed users at an upgrade they had done.
    assert says in kernel_hint(release)
