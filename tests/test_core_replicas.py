"""Replicas in the decision core: where a connection goes, when another replica wakes,
and the order they sleep in. Plain calls, a fake clock."""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from tests.helpers import FakeGlue
from wakeproxy.core.actions import RunSleep
from wakeproxy.core.events import Arrive, Leave, SleepDone, WakeDone
from wakeproxy.core.node import Node
from wakeproxy.core.policy import Policy
from wakeproxy.core.replicas import Breaker, Placement, Scaling, place
from wakeproxy.core.sessions import (
    GONE,
    SSE_SCAN_LIMIT,
    EndpointScan,
    Session,
    Sessions,
    session_in_query,
)
from wakeproxy.core.states import State

NAMES = ("web@1", "web@2", "web@3", "web@4")


def nodes(*replicas: tuple[State, int]) -> list[Node]:
    out = []
    for i, (state, attached) in enumerate(replicas):
        node = Node(f"web@{i + 1}", Policy(), state, "test", 0.0)
        node.attached = attached
        out.append(node)
    return out


def test_a_connection_goes_to_the_running_replica_with_the_fewest_attached():
    pool = nodes((State.RUNNING, 3), (State.RUNNING, 1), (State.RUNNING, 1), (State.PAUSED, 0))
    # The oldest on a tie: load gathers on the old ones, the new ones go idle first.
    assert place(pool, Scaling(0, 4, 10)) == Placement(1)


def test_with_nothing_awake_the_oldest_sleeping_replica_takes_it_and_nothing_else_wakes():
    pool = nodes((State.FAILED, 0), (State.STOPPED, 0), (State.PAUSED, 0))
    assert place(pool, Scaling(0, 3, 1)) == Placement(1)
    # Only failed ones: the oldest (its back-off decides whether it holds or refuses).
    assert place(nodes((State.FAILED, 0), (State.FAILED, 0)), Scaling(0, 2, 1)) == Placement(0)


def test_a_waking_replica_holds_the_connection_when_none_runs():
    pool = nodes((State.WAKING, 4), (State.WAKING, 2), (State.PAUSED, 0))
    assert place(pool, Scaling(0, 3, 10)).serve == 1


def test_past_the_target_the_next_replica_wakes_and_the_connection_is_not_held_for_it():
    pool = nodes((State.RUNNING, 2), (State.PAUSED, 0), (State.STOPPED, 0))
    # 2 attached + this one = 3 over 1 awake, target 2: wake the oldest sleeping one.
    assert place(pool, Scaling(0, 3, 2)) == Placement(0, wake=1)
    pool[0].attached = 1  # 2 over 1: at the target, not past it
    assert place(pool, Scaling(0, 3, 2)) == Placement(0)


def test_a_waking_replica_counts_as_awake_so_one_burst_wakes_one_more_not_all():
    pool = nodes((State.RUNNING, 2), (State.WAKING, 0), (State.PAUSED, 0))
    # 3 over 2 awake, target 2: no third yet.
    assert place(pool, Scaling(0, 3, 2)) == Placement(0)
    pool[0].attached = 4  # 5 over 2: now the third, while the running one serves
    assert place(pool, Scaling(0, 3, 2)) == Placement(0, wake=2)


def test_never_more_awake_than_max():
    pool = nodes((State.RUNNING, 50), (State.RUNNING, 50), (State.PAUSED, 0))
    assert place(pool, Scaling(0, 2, 1)) == Placement(0)


def expected_placement(states: list[State], attached: list[int], most: int, target: int):
    """The README's rules, written out independently of ``place``: serve the running
    replica with the fewest attached (the oldest on a tie), else a waking one, else the
    oldest sleeping one, else the oldest failed one; wake the oldest sleeping one beside
    it when the attached connections of the awake ones plus this one pass ``target`` per
    awake replica, fewer than ``most`` being awake (never with none awake: the arrival
    itself wakes the one it is placed on)."""
    asleep = [i for i, s in enumerate(states) if s in (State.PAUSED, State.STOPPED)]
    for kind in (State.RUNNING, State.WAKING):
        candidates = [i for i, s in enumerate(states) if s is kind]
        if candidates:
            serve = min(candidates, key=lambda i: (attached[i], i))
            break
    else:
        failed = [i for i, s in enumerate(states) if s is State.FAILED]
        return Placement(asleep[0] if asleep else failed[0])
    awake = [i for i, s in enumerate(states) if s in (State.RUNNING, State.WAKING)]
    load = sum(attached[i] for i in awake) + 1
    wake = None
    if load > len(awake) * target and len(awake) < most and asleep:
        wake = asleep[0]
    return Placement(serve, wake)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(
                [State.RUNNING, State.WAKING, State.PAUSED, State.STOPPED, State.FAILED]
            ),
            st.integers(0, 30),
        ),
        min_size=1,
        max_size=6,
    ),
    st.integers(1, 6),
    st.integers(1, 8),
)
@example([(State.RUNNING, 5), (State.PAUSED, 0)], 2, 1)  # a scale-up is due
@example([(State.WAKING, 0), (State.RUNNING, 3), (State.STOPPED, 0)], 3, 1)
@example([(State.FAILED, 0), (State.PAUSED, 0)], 2, 1)  # nothing awake: no second wake
def test_placement_rules_hold_for_any_pool(replicas, most, target):
    # Asserted whole for every pool (it used to assert only inside branches, so a
    # place() that never woke a second replica passed).
    pool = nodes(*replicas)
    states = [state for state, _ in replicas]
    attached = [count for _, count in replicas]
    assert place(pool, Scaling(0, most, target)) == expected_placement(
        states, attached, most, target
    )


def test_a_breaker_opens_lets_one_trial_through_after_its_back_off_and_closes_on_success():
    breaker = Breaker()
    assert breaker.usable(0.0)
    breaker.failed(10.0)
    assert not breaker.usable(10.5) and breaker.usable(11.0), "open for 1 s"
    breaker.failed(10.6)  # a connect sent before it opened, failing after: no doubling
    assert breaker.until == 11.0 and breaker.opened == 1
    breaker.chosen(11.0)
    assert breaker.state == "half_open" and not breaker.usable(11.0), "one trial at a time"
    breaker.failed(11.2)
    assert breaker.until == 13.2, "the trial failed: the back-off doubles"
    # A trial that never reports (its client left while the replica woke): after
    # TRIAL_WITHIN another one may go.
    breaker.chosen(13.2)
    assert not breaker.usable(20.0) and breaker.usable(13.2 + Breaker.TRIAL_WITHIN)
    breaker.succeeded()
    assert breaker.state == "closed" and breaker.failures == 0 and breaker.usable(13.3)
    now = 100.0
    for _ in range(10):
        breaker.chosen(now)
        breaker.failed(now)
    assert breaker.until == now + 30.0, "at most 30 s"
    assert breaker.opened == 12


def test_a_connection_the_backend_ended_without_answering_opens_the_circuit():
    # Passive health: a replica that accepts and closes at once completed every
    # connect, so its circuit never opened while it drew the most connections.
    breaker = Breaker()
    assert breaker.ended(5.0, sent=80, received=0, by_backend=True) == "opened"
    assert breaker.state == "open" and breaker.until == 6.0 and breaker.opened == 1
    # Others already on it, ending the same way: still open, not doubled.
    assert breaker.ended(5.5, sent=80, received=0, by_backend=True) is None
    assert breaker.until == 6.0 and breaker.opened == 1
    # The trial's connect completes: that proves nothing for such a backend.
    breaker.chosen(6.0)
    assert not breaker.connected() and breaker.state == "half_open"
    # A silent trial reopens it, doubled.
    assert breaker.ended(6.1, sent=80, received=0, by_backend=True) == "opened"
    assert breaker.until == 8.1 and breaker.failures == 2
    # A TCP health check (a connect) does not close it; an HTTP one (an answer) does.
    assert not breaker.passed(response=False) and breaker.state == "open"
    assert breaker.passed(response=True) and breaker.state == "closed"
    # Reopened; a response byte on the trial closes it at once.
    breaker.ended(9.0, sent=1, received=0, by_backend=True)
    breaker.chosen(10.0)
    assert breaker.answered() and breaker.state == "closed" and breaker.failures == 0
    # ... as does a connection that ended with one.
    breaker.ended(11.0, sent=1, received=0, by_backend=True)
    assert breaker.ended(11.2, sent=1, received=9, by_backend=True) == "closed"
    assert not breaker.silent


def test_an_ending_that_says_nothing_of_the_backend_changes_nothing():
    breaker = Breaker()
    # The client left first, or sent nothing (a server-speaks-first protocol, a port scan).
    assert breaker.ended(1.0, sent=80, received=0, by_backend=False) is None
    assert breaker.ended(1.0, sent=0, received=0, by_backend=True) is None
    assert breaker.ended(1.0, sent=80, received=5, by_backend=True) is None  # closed: stays
    assert breaker.state == "closed" and breaker.opened == 0
    # A circuit opened by a failed connect still closes on a completed one.
    breaker.failed(2.0)
    breaker.chosen(3.0)
    assert breaker.connected() and breaker.state == "closed"
    breaker.failed(4.0)
    assert breaker.passed(response=False) and breaker.state == "closed"


def test_placement_skips_an_open_circuit_for_serving_and_waking_unless_all_are_open():
    pool = nodes((State.RUNNING, 0), (State.RUNNING, 5))
    assert place(pool, Scaling(0, 2, 10), [False, True]) == Placement(1)
    assert place(pool, Scaling(0, 2, 10), [False, False]) == Placement(0), "all open"
    pool = nodes((State.RUNNING, 3), (State.PAUSED, 0), (State.PAUSED, 0))
    assert place(pool, Scaling(0, 3, 1), [True, False, True]) == Placement(0, wake=2)
    # A skipped replica that is awake still counts against max.
    pool = nodes((State.RUNNING, 3), (State.RUNNING, 0), (State.PAUSED, 0))
    assert place(pool, Scaling(0, 2, 1), [True, False, True]) == Placement(0)


def _pool(glue: FakeGlue, count: int, state: State = State.RUNNING) -> None:
    for name in NAMES[:count]:
        glue.add(name, state)
    glue.core.order_replicas(list(NAMES[:count]), glue.now)


def test_the_newest_replica_sleeps_first_and_each_older_one_after_it():
    glue = FakeGlue()
    _pool(glue, 3)
    # All idle since 0: every deadline passes at 10, but only the newest may sleep.
    glue.advance(10.0)
    assert [name for name, a in glue.log if isinstance(a, RunSleep)] == ["web@3"]
    glue.feed("web@3", SleepDone())
    glue.advance(glue.now)  # the older one's idle timer, armed again, fires at once
    assert [name for name, a in glue.log if isinstance(a, RunSleep)] == ["web@3", "web@2"]
    glue.feed("web@2", SleepDone())
    glue.advance(glue.now)
    assert [name for name, a in glue.log if isinstance(a, RunSleep)] == [
        "web@3",
        "web@2",
        "web@1",
    ]


def test_an_older_replica_with_a_later_deadline_sleeps_on_its_own_timer():
    glue = FakeGlue()
    _pool(glue, 2)
    glue.feed("web@1", Arrive())
    glue.advance(5.0)
    glue.feed("web@1", Leave(activity=True))  # web@1 idle from 5, web@2 from 0
    glue.advance(10.0)
    assert [name for name, a in glue.log if isinstance(a, RunSleep)] == ["web@2"]
    glue.feed("web@2", SleepDone())
    assert [name for name, a in glue.log if isinstance(a, RunSleep)] == ["web@2"], "not yet"
    glue.advance(15.0)
    assert [name for name, a in glue.log if isinstance(a, RunSleep)] == ["web@2", "web@1"]


def test_an_awake_newer_replica_holds_an_older_one_and_a_removed_one_closes_ranks():
    glue = FakeGlue()
    _pool(glue, 3, State.PAUSED)
    glue.feed("web@1", Arrive())
    glue.feed("web@1", WakeDone())
    glue.feed("web@3", Arrive())  # the load woke the newest (web@2 stays asleep)
    glue.feed("web@3", WakeDone())
    glue.feed("web@1", Leave(activity=True))
    glue.advance(30.0)
    assert not glue.actions("web@1", RunSleep), "web@3 is awake: web@1 waits"
    glue.core.remove("web@2")
    assert glue.core.nodes["web@1"].newer is glue.core.nodes["web@3"]
    glue.feed("web@3", Leave(activity=True))
    glue.advance(45.0)
    assert glue.actions("web@3", RunSleep)
    glue.feed("web@3", SleepDone())
    glue.advance(glue.now)
    assert glue.actions("web@1", RunSleep), "the newer one slept: web@1 follows"
    assert glue.core.nodes["web@1"].state is State.PAUSING


def _pin(sessions: Sessions, sid: bytes, replica: str, incarnation: int, now: float, **kw):
    session = Session("127.0.0.1", now, replica, incarnation, sid, **kw)
    sessions.add(sid, session)


def test_session_pins_follow_their_replica_and_expire_when_idle():
    pins = Sessions(idle=60.0)
    _pin(pins, b"a", "web@2", 1, now=0.0)
    assert pins.where(b"a", {"web@2": 1}, now=30.0, resume=True) == "web@2"
    assert pins.where(b"a", {"web@2": 1}, now=89.0, resume=True) == "web@2", "use renews it"
    assert pins.where(b"a", {"web@2": 1}, now=150.0, resume=True) is None, "idle past 60 s"
    _pin(pins, b"b", "web@1", 4, now=0.0)
    # Its replica stopped or failed since (a new incarnation), or is gone: a session
    # with no initialize held died with it, said once; the pin is dropped.
    assert pins.where(b"b", {"web@1": 5}, now=1.0, resume=True) is GONE and pins.lost == 1
    assert pins.where(b"b", {"web@1": 5}, now=1.0, resume=True) is None
    _pin(pins, b"c", "web@3", 1, now=0.0)
    assert pins.where(b"c", {}, now=1.0, resume=True) is GONE
    # One whose initialize is held is opened again wherever its request goes (resumed),
    # unless resuming is off.
    _pin(pins, b"d", "web@1", 4, now=0.0, init=b"POST /mcp ...")
    assert pins.where(b"d", {"web@1": 5}, now=1.0, resume=False) is GONE
    _pin(pins, b"d", "web@1", 4, now=0.0, init=b"POST /mcp ...")
    assert pins.where(b"d", {"web@1": 5}, now=1.0, resume=True) is None
    assert pins.by_replica() == {}, "no longer placed"
    pins.materialized(b"d", b"server-d", 7, "web@2")
    assert pins.where(b"server-d", {"web@2": 7}, now=2.0, resume=True) == "web@2", "by alias"
    assert pins.by_replica() == {"web@2": 1}
    pins.end(b"server-d")
    assert len(pins) == 0 and pins.by_replica() == {}
    # An SSE session with its stream open lives however long since its last lookup.
    _pin(pins, b"s", "web@2", 1, now=0.0, streaming=True)
    assert pins.where(b"s", {"web@2": 1}, now=10_000.0, resume=True) == "web@2"


def test_a_full_table_evicts_idle_sessions_only_and_each_client_has_a_share():
    # A client opening sessions to flush others' pins: the table never drops one in use
    # or with an open stream; past its share a client is refused; both are counted.
    pins = Sessions(limit=3, per_peer=2)
    assert pins.admit("10.0.0.1", now=0.0)
    _pin(pins, b"old", "web@1", 1, now=0.0)
    _pin(pins, b"stream", "web@1", 1, now=0.0, streaming=True)
    _pin(pins, b"busy", "web@2", 1, now=50.0)
    assert not pins.admit("10.0.0.9", now=55.0), "full, and nothing idle for 60 s"
    assert pins.refused == 1 and len(pins) == 3
    assert pins.admit("10.0.0.9", now=61.0), "'old' idle 61 s: it makes room"
    assert pins.evicted == 1 and pins.get(b"old", 61.0) is None
    assert pins.get(b"stream", 61.0) is not None and pins.get(b"busy", 61.0) is not None
    mine = Sessions(per_peer=2)
    for sid in (b"x", b"y"):
        assert mine.admit("10.0.0.2", now=0.0)
        mine.add(sid, Session("10.0.0.2", 0.0))
    assert not mine.admit("10.0.0.2", now=0.0), "its share is used"
    assert mine.admit("10.0.0.3", now=0.0), "another client is not held back"
    mine.end(b"x")
    assert mine.admit("10.0.0.2", now=0.0), "a session ended: room again"


def test_the_sse_session_is_read_from_the_endpoint_event_and_the_query():
    start = b"event: endpoint\r\ndata: /messages/?session_id=6d1f0c2e9a\r\n\r\n"
    assert EndpointScan().feed(start) == b"6d1f0c2e9a"
    assert EndpointScan().feed(b"data: /messages/?session_id=x\r\n\r\n") is None, "no event"
    # An id split across reads is taken whole, never by its first part.
    scan = EndpointScan()
    assert scan.feed(b"event: endpoint\r\ndata: /messages/?session_id=6d1f") is None
    assert scan.feed(b"0c2e9a\r\n") == b"6d1f0c2e9a"
    # A CRLF split between two reads ends one line, not two (an empty line would end
    # the event before its data).
    scan = EndpointScan()
    assert scan.feed(b"event: endpoint\r") is None
    assert scan.feed(b"\ndata: /messages/?session_id=6d1f0c2e9a\n") == b"6d1f0c2e9a"
    # Keepalive comments before the event are skipped, not counted toward the limit.
    scan = EndpointScan()
    for _ in range(2000):
        assert scan.feed(b": ping - 2026-12-06 08:00:00.000000+00:00\r\n\r\n") is None
    assert not scan.exhausted
    assert scan.feed(start) == b"6d1f0c2e9a"
    # Bounded: a stream whose start never names a session is given up on.
    scan = EndpointScan()
    scan.feed(b"data: " + b"x" * SSE_SCAN_LIMIT + b"\n")
    assert scan.exhausted
    assert session_in_query(b"session_id=ab-12_3&x=1") == b"ab-12_3"
    assert session_in_query(b"other=1") is None
