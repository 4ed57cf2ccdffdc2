"""A model-based test of the decision core (hypothesis stateful).

Random service graphs (groups, depends_on), random sequences of connections opening
and closing, API sleeps and wakes, timers firing, runtime results and changes seen from
outside, against the pure core (strict: an event with no transition fails the test).
After every step: no service is put to sleep while a connection is attached or a
service that depends on it is awake (unless the API forced it); a group sleeps only
when every member may; exactly one wake in flight per service; every held connection
is released or refused; a reclaim runs only on a paused backend and is cancelled the
moment it leaves paused; the core's counts match the connections the model knows. The
kernel's fast path reports connections the proxy never sees: none is put to sleep while
its last read listed some, and one handed over as it went to sleep wakes it after.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from tests.helpers import FakeGlue
from wakeproxy.core.actions import (
    CancelReclaim,
    CancelWake,
    Connect,
    Hold,
    Reclaim,
    Refresh,
    Reject,
    Release,
    RunSleep,
    RunWake,
    Transition,
)
from wakeproxy.core.events import (
    Arrive,
    KernelConnections,
    Leave,
    Observed,
    Reclaimed,
    ReclaimFailed,
    SleepDone,
    SleepFailed,
    SleepRequested,
    WakeDone,
    WakeFailed,
    WakeRequested,
)
from wakeproxy.core.orchestrator import Command
from wakeproxy.core.states import AWAKE, IN_FLIGHT, SleepAction, State

NAMES = "abcdef"
SETTLED = (State.RUNNING, State.PAUSED, State.STOPPED, State.FAILED)


@dataclass
class Conn:
    service: str
    status: str  # held | forwarding | refused


@dataclass
class Model:
    conns: dict[int, Conn] = field(default_factory=dict)
    waking: set[str] = field(default_factory=set)  # a RunWake not yet answered
    sleeping: set[str] = field(default_factory=set)  # a RunSleep not yet answered
    refreshing: set[str] = field(default_factory=set)
    reclaiming: set[str] = field(default_factory=set)  # a Reclaim not yet answered
    kernel: dict[str, int] = field(default_factory=dict)  # the last read while running
    wake_after: set[str] = field(default_factory=set)  # handed a connection while sleeping


services = st.integers(min_value=2, max_value=6)


class CoreModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.glue = FakeGlue()
        self.glue.observer = self._check
        self.model = Model()
        self.ids = itertools.count()
        self.names: list[str] = []
        # The batch being checked comes from an API sleep (of one service, not its
        # group), forced or not.
        self.api = False
        self.forced = False

    @initialize(
        data=st.data(),
        count=services,
    )
    def build(self, data: st.DataObject, count: int) -> None:
        self.names = list(NAMES[:count])
        links: dict[str, tuple[list[str], str | None]] = {}
        for index, name in enumerate(self.names):
            state = data.draw(st.sampled_from(SETTLED), label=f"{name} state")
            self.glue.add(
                name,
                state,
                sleeps=data.draw(st.booleans() | st.just(True), label="sleeps"),
                idle_delay=data.draw(st.sampled_from([1.0, 3.0, 10.0]), label="idle"),
                action=data.draw(st.sampled_from(list(SleepAction)), label="action"),
                stop_after=data.draw(st.sampled_from([None, 5.0, 20.0]), label="stop_after"),
                hibernate_after=data.draw(
                    st.sampled_from([None, 0.0, 4.0]), label="hibernate_after"
                ),
                max_held=data.draw(st.integers(1, 4), label="max_held"),
                wake_timeout=data.draw(st.sampled_from([2.0, 30.0]), label="wake_timeout"),
            )
            # Dependencies on earlier services only: no cycles, as the config demands.
            earlier = self.names[:index]
            deps = (
                data.draw(st.lists(st.sampled_from(earlier), unique=True, max_size=2), label="deps")
                if earlier
                else []
            )
            group = data.draw(st.sampled_from([None, None, "g1", "g2"]), label="group")
            links[name] = (deps, group)
        self.glue.link(links)

    # ---- what the glue would do with each batch

    def _check(self, commands: list[Command]) -> None:
        core = self.glue.core
        # Services this batch puts to sleep from running (not a paused one escalated to
        # a stop: it is asleep already).
        put_to_sleep = {
            name
            for name, action in commands
            if isinstance(action, Transition)
            and action.before is State.RUNNING
            and action.after in (State.PAUSING, State.STOPPING)
        }
        for name, action in commands:
            node = core.nodes[name]
            if isinstance(action, RunWake):
                assert name not in self.model.waking, f"{name}: a second wake in flight"
                assert name not in self.model.sleeping, f"{name}: a wake over a sleep in flight"
                self.model.waking.add(name)
            elif isinstance(action, CancelWake):
                self.model.waking.discard(name)
            elif isinstance(action, RunSleep):
                assert name not in self.model.sleeping and name not in self.model.waking
                self.model.sleeping.add(name)
                if name in put_to_sleep and not self.forced:
                    assert node.attached == 0, f"{name} put to sleep with connections attached"
                    assert not self.model.kernel.get(name), f"{name} slept on kernel connections"
                    for dependent in node.dependents:
                        same_group = dependent in node.group
                        assert dependent.state not in AWAKE or (
                            same_group and dependent.state in (State.PAUSING, State.STOPPING)
                        ), f"{name} put to sleep while {dependent.name} needs it"
                    for member in () if self.api else node.group:
                        assert member.state not in (State.RUNNING, State.WAKING), (
                            f"{name} slept without its group member {member.name}"
                        )
            elif isinstance(action, Refresh):
                self.model.refreshing.add(name)
            elif isinstance(action, Reclaim):
                assert name not in self.model.reclaiming, f"{name}: a second reclaim in flight"
                assert node.state is State.PAUSED, f"{name}: reclaim while {node.state}"
                self.model.reclaiming.add(name)
            elif isinstance(action, CancelReclaim):
                assert name in self.model.reclaiming, f"{name}: cancelled a reclaim not running"
                self.model.reclaiming.discard(name)
            elif isinstance(action, Release):
                for conn in self.model.conns.values():
                    if conn.service == name and conn.status == "held":
                        conn.status = "forwarding"
            elif isinstance(action, Reject) and action.held:
                for conn in self.model.conns.values():
                    if conn.service == name and conn.status == "held":
                        conn.status = "refused"
        for name, action in commands:
            if isinstance(action, Transition) and action.before is State.RUNNING:
                self.model.kernel.pop(name, None)  # read again once it runs

    # ---- rules

    @rule(data=st.data(), activity=st.booleans())
    def connection_arrives(self, data: st.DataObject, activity: bool) -> None:
        name = data.draw(st.sampled_from(self.names))
        conn_id = next(self.ids)
        out = self.glue.feed(name, Arrive(activity=activity))
        status = None
        for action in out:
            if isinstance(action, Connect):
                status = "forwarding"
            elif isinstance(action, Hold):
                status = "held"
            elif isinstance(action, Reject) and not action.held:
                status = "refused"
        assert status is not None, f"an arriving connection got no decision: {out}"
        if status == "held" and self.glue.core.nodes[name].state is State.RUNNING:
            status = "forwarding"  # released in the same batch? never: held implies a wake
        self.model.conns[conn_id] = Conn(name, status)

    @precondition(lambda self: bool(self.model.conns))
    @rule(data=st.data(), activity=st.booleans())
    def connection_leaves(self, data: st.DataObject, activity: bool) -> None:
        conn_id = data.draw(st.sampled_from(sorted(self.model.conns)))
        conn = self.model.conns.pop(conn_id)
        self.glue.feed(conn.service, Leave(held=conn.status == "held", activity=activity))

    @rule(seconds=st.sampled_from([0.5, 1.0, 2.5, 6.0, 25.0]))
    def time_passes(self, seconds: float) -> None:
        self.glue.advance(self.glue.now + seconds)

    @precondition(lambda self: bool(self.model.waking))
    @rule(data=st.data(), ok=st.booleans())
    def a_wake_ends(self, data: st.DataObject, ok: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.model.waking)))
        self.model.waking.discard(name)
        self.glue.feed(name, WakeDone() if ok else WakeFailed("runtime said no"))

    @precondition(lambda self: bool(self.model.sleeping))
    @rule(data=st.data(), ok=st.booleans())
    def a_sleep_ends(self, data: st.DataObject, ok: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.model.sleeping)))
        self.model.sleeping.discard(name)
        self.glue.feed(name, SleepDone() if ok else SleepFailed("runtime said no"))
        if name in self.model.wake_after:
            self.model.wake_after.discard(name)
            node = self.glue.core.nodes[name]
            assert node.state is State.WAKING, f"{name}: handed a connection, left {node.state}"

    @rule(data=st.data(), attached=st.integers(0, 3), arrived=st.integers(0, 2))
    def the_kernel_is_read(self, data: st.DataObject, attached: int, arrived: int) -> None:
        name = data.draw(st.sampled_from(self.names))
        node = self.glue.core.nodes[name]
        state = node.state
        self.glue.feed(name, KernelConnections(attached, self.glue.now - 0.5, arrived))
        if state is State.RUNNING:
            self.model.kernel[name] = attached
        elif state in (State.PAUSING, State.STOPPING) and arrived:
            self.model.wake_after.add(name)

    @precondition(lambda self: bool(self.model.reclaiming))
    @rule(data=st.data(), ok=st.booleans())
    def a_reclaim_ends(self, data: st.DataObject, ok: bool) -> None:
        name = data.draw(st.sampled_from(sorted(self.model.reclaiming)))
        self.model.reclaiming.discard(name)
        self.glue.feed(name, Reclaimed(1 << 20) if ok else ReclaimFailed("no cgroup"))

    @precondition(lambda self: bool(self.model.refreshing))
    @rule(data=st.data(), state=st.sampled_from(SETTLED))
    def a_refresh_reports(self, data: st.DataObject, state: State) -> None:
        name = data.draw(st.sampled_from(sorted(self.model.refreshing)))
        self.model.refreshing.discard(name)
        self.glue.feed(name, Observed(state, "re-read"))

    @rule(data=st.data(), state=st.sampled_from(SETTLED))
    def changed_from_outside(self, data: st.DataObject, state: State) -> None:
        name = data.draw(st.sampled_from(self.names))
        self.glue.feed(name, Observed(state, "seen"))

    @rule(data=st.data())
    def api_wake(self, data: st.DataObject) -> None:
        self.glue.feed(data.draw(st.sampled_from(self.names)), WakeRequested("api"))

    @rule(data=st.data(), action=st.sampled_from(list(SleepAction)), force=st.booleans())
    def api_sleep(self, data: st.DataObject, action: SleepAction, force: bool) -> None:
        name = data.draw(st.sampled_from(self.names))
        self.api, self.forced = True, force
        try:
            self.glue.feed(name, SleepRequested(action, force=force))
        finally:
            self.api = self.forced = False

    # ---- invariants

    @invariant()
    def counts_match_the_connections(self) -> None:
        for name, node in self.glue.core.nodes.items():
            mine = [c for c in self.model.conns.values() if c.service == name]
            assert node.attached == len(mine), f"{name}: attached {node.attached} != {len(mine)}"
            held = sum(c.status == "held" for c in mine)
            assert node.held == held, f"{name}: held {node.held} != {held}"
            if held:
                # Held connections wait only on an operation that will end them.
                assert node.state in IN_FLIGHT, f"{name}: {held} held while {node.state}"
            # A reclaim runs only on a paused backend: leaving paused cancelled it.
            assert node.reclaiming == (name in self.model.reclaiming), name
            assert not (node.reclaiming or node.hibernated) or node.state is State.PAUSED

    def teardown(self) -> None:
        # Let every operation finish: then no connection may still be held.
        for _ in range(50):
            if not (self.model.waking or self.model.sleeping):
                break
            for name in sorted(self.model.waking):
                self.model.waking.discard(name)
                self.glue.feed(name, WakeDone())
            for name in sorted(self.model.sleeping):
                self.model.sleeping.discard(name)
                self.glue.feed(name, SleepDone())
        held = [c for c in self.model.conns.values() if c.status == "held"]
        assert not held, f"connections left held with nothing in flight: {held}"


CoreModel.TestCase.settings = settings(
    max_examples=int(os.environ.get("WAKEPROXY_MODEL_EXAMPLES", "400")),
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCoreModel = CoreModel.TestCase
