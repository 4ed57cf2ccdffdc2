"""The lifecycle state machine, with plain calls: no loop, no sockets."""

from __future__ import annotations

import pytest

from wakeproxy.lifecycle import (
    BACKOFF_FIRST,
    BACKOFF_MAX,
    Action,
    Arrive,
    HeldLeft,
    IdleDeadline,
    Lifecycle,
    Observed,
    Reject,
    RetryDue,
    SleepFailed,
    SleepSucceeded,
    State,
    StopDeadline,
    WakeFailed,
    WakeRequested,
    WakeSucceeded,
)


def machine(state: State, **kw) -> Lifecycle:
    return Lifecycle(state, now=0.0, **kw)


def test_running_connects_at_once():
    lc = machine(State.RUNNING)
    assert lc.handle(Arrive(), 1.0) == (Action.CONNECT,)
    assert lc.state is State.RUNNING and lc.held == 0


@pytest.mark.parametrize(
    ("asleep", "wake"), [(State.PAUSED, Action.UNPAUSE), (State.STOPPED, Action.START)]
)
def test_single_flight_many_arrivals_one_wake(asleep, wake):
    lc = machine(asleep)
    steps = [lc.handle(Arrive(), 1.0) for _ in range(500)]
    assert steps[0] == (Action.HOLD, wake)
    assert all(step == (Action.HOLD,) for step in steps[1:])
    assert lc.state is State.WAKING and lc.held == 500
    assert lc.handle(WakeSucceeded(), 1.01) == (Action.RELEASE,)
    assert lc.state is State.RUNNING and lc.held == 0


def test_hold_queue_cap_rejects_the_overflow_only():
    lc = machine(State.PAUSED, max_held=2)
    lc.handle(Arrive(), 0)
    lc.handle(Arrive(), 0)
    assert lc.handle(Arrive(), 0) == (Reject("rejected_overflow", "hold queue full", held=False),)
    assert lc.held == 2
    lc.handle(HeldLeft(), 0)
    assert lc.handle(Arrive(), 0) == (Action.HOLD,)


@pytest.mark.parametrize(
    ("timed_out", "outcome"), [(True, "wake_timeout"), (False, "backend_error")]
)
def test_failed_wake_rejects_held_and_backs_off(timed_out, outcome):
    lc = machine(State.PAUSED)
    lc.handle(Arrive(), 0)
    lc.handle(Arrive(), 0)
    step = lc.handle(WakeFailed("boom", timed_out=timed_out), 5.0)
    assert step == (Reject(outcome, "boom", held=True), Action.SCHEDULE_RETRY)
    assert lc.state is State.FAILED and lc.held == 0
    assert lc.retry_at == 5.0 + BACKOFF_FIRST
    # Inside the back-off a new connection is refused at once, not held.
    assert lc.handle(Arrive(), 5.1) == (Reject("backend_error", "boom", held=False),)
    # After it, the next connection tries again: state unknown, so recover.
    assert lc.handle(Arrive(), 5.0 + BACKOFF_FIRST) == (Action.HOLD, Action.RECOVER)


def test_backoff_doubles_and_is_capped():
    lc = machine(State.FAILED)
    delays = []
    for _ in range(10):
        lc.handle(Observed(State.FAILED, "engine down"), 100.0)
        delays.append(lc.retry_at - 100.0)
    assert delays[:3] == [BACKOFF_FIRST, BACKOFF_FIRST * 2, BACKOFF_FIRST * 4]
    assert delays[-1] == BACKOFF_MAX
    # A refresh that finds it running clears the failure count.
    lc.handle(Observed(State.RUNNING, "found"), 101.0)
    assert lc.state is State.RUNNING and lc.failures == 0


def test_retry_due_refreshes_only_when_still_failed():
    lc = machine(State.FAILED)
    assert lc.handle(RetryDue(), 1.0) == (Action.REFRESH,)
    lc.handle(Observed(State.PAUSED, "found"), 1.0)
    assert lc.handle(RetryDue(), 2.0) == ()


@pytest.mark.parametrize(
    ("action", "busy", "done", "wake"),
    [
        ("pause", State.PAUSING, State.PAUSED, Action.UNPAUSE),
        ("stop", State.STOPPING, State.STOPPED, Action.START),
    ],
)
def test_arrival_during_sleep_wakes_right_after(action, busy, done, wake):
    lc = machine(State.RUNNING, sleep_action=action)
    assert lc.handle(IdleDeadline(), 10.0) == (Action.PAUSE if action == "pause" else Action.STOP,)
    assert lc.state is busy
    # No race can leave the backend asleep under a live connection.
    assert lc.handle(Arrive(), 10.001) == (Action.HOLD,)
    assert lc.handle(SleepSucceeded(), 10.01) == (wake,)
    assert lc.state is State.WAKING
    assert lc.handle(WakeSucceeded(), 10.02) == (Action.RELEASE,)


def test_idle_sleep_with_nobody_waiting_stays_asleep():
    lc = machine(State.RUNNING)
    lc.handle(IdleDeadline(), 1.0)
    assert lc.handle(SleepSucceeded(), 1.01) == ()
    assert lc.state is State.PAUSED and lc.reason == "idle"


def test_sleep_failure_with_held_connections_recovers():
    lc = machine(State.RUNNING)
    lc.handle(IdleDeadline(), 1.0)
    lc.handle(Arrive(), 1.0)
    assert lc.handle(SleepFailed("engine hiccup"), 1.1) == (Action.RECOVER,)
    assert lc.state is State.WAKING


def test_sleep_failure_with_nobody_waiting_fails_and_retries():
    lc = machine(State.RUNNING)
    lc.handle(IdleDeadline(), 1.0)
    assert lc.handle(SleepFailed("no such container"), 1.1) == (Action.SCHEDULE_RETRY,)
    assert lc.state is State.FAILED and "no such container" in lc.reason


def test_wake_request_during_pause_is_honoured():
    lc = machine(State.RUNNING)
    lc.handle(IdleDeadline(), 1.0)
    assert lc.handle(WakeRequested(), 1.0) == ()
    assert lc.handle(SleepSucceeded(), 1.1) == (Action.UNPAUSE,)


def test_stop_after_only_stops_a_still_paused_backend():
    lc = machine(State.PAUSED)
    assert lc.handle(StopDeadline(), 100.0) == (Action.STOP,)
    assert lc.state is State.STOPPING
    lc2 = machine(State.PAUSED)
    lc2.handle(Arrive(), 1.0)
    assert lc2.handle(StopDeadline(), 2.0) == ()


def test_external_changes_follow_in_stable_states_only():
    lc = machine(State.RUNNING)
    lc.handle(Observed(State.PAUSED, "docker pause seen"), 1.0)
    assert lc.state is State.PAUSED and lc.reason == "docker pause seen"
    lc.handle(Arrive(), 2.0)  # waking now
    # An engine event about our own unpause must not override the result we await.
    assert lc.handle(Observed(State.PAUSED, "late event"), 2.001) == ()
    assert lc.state is State.WAKING


def test_removed_container_fails_then_recreated_one_is_found():
    lc = machine(State.RUNNING)
    assert lc.handle(Observed(State.FAILED, "container removed"), 1.0) == (Action.SCHEDULE_RETRY,)
    lc.handle(Observed(State.STOPPED, "docker create seen"), 2.0)
    assert lc.state is State.STOPPED
    assert lc.handle(Arrive(), 3.0) == (Action.HOLD, Action.START)


def test_results_that_arrive_late_are_ignored():
    lc = machine(State.RUNNING)
    assert lc.handle(WakeSucceeded(), 1.0) == ()
    assert lc.handle(WakeFailed("x"), 1.0) == ()
    assert lc.handle(SleepSucceeded(), 1.0) == ()
    assert lc.state is State.RUNNING


def test_repr_names_state_and_held():
    lc = machine(State.PAUSED)
    lc.handle(Arrive(), 0)
    assert repr(lc) == "<Lifecycle state=waking held=1 reason='connection while paused'>"


def test_wake_requests_carry_their_reason_into_the_transition():
    lc = machine(State.PAUSED)
    assert lc.handle(WakeRequested("api"), 1.0) == (Action.UNPAUSE,)
    assert lc.reason == "api while paused"
    lc2 = machine(State.STOPPED)
    lc2.handle(WakeRequested("auto_start"), 1.0)
    assert lc2.reason == "auto_start while stopped"
