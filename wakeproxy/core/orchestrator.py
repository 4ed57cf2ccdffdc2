"""Every sleep and wake decision, for all services at once.

The orchestrator holds one ``Node`` per service (its backend's ``Lifecycle``, the
connections that need it, its idle clock) and the links between services. Fed an
event for one service with the time, it returns the actions for every service the
event concerns: a connection that arrives at a group member wakes the whole group;
a service that falls asleep lets what it depends on reconsider its own sleep.

The rules, each decided here and nowhere else (``core.gate`` reads whether one
service may sleep now):

* **Gate.** A service never sleeps while a connection is attached (held or
  forwarding, or handed to it by the kernel's fast path, as last read). Its idle
  deadline is ``max(last activity + idle delay, busy_until, hold_until)`` (a 202's
  grace; prediction's hold, replaced rather than raised); one timer per service,
  armed when the last connection leaves and re-armed when it fires early (activity
  only stamps the time). That timer is also when the glue reads the kernel's fast-path
  connections (their ends are never reported): while it hands some over, at least every
  tenth of the idle delay.
* **Dependents' veto.** A service does not sleep while a service that depends on it
  is awake; it reconsiders when that one sleeps or fails.
* **Group consensus.** A group sleeps together, once every member may sleep: the last
  member to become ready puts the others to sleep with it.
* **Wake fan-out.** A wake first wakes what the service depends on (its own operation
  starts once they run) and every sleeping member of its group; all within its
  ``wake_timeout``, enforced here by a timer.
* **Escalation.** A backend paused for ``stop_after`` is stopped; one paused for
  ``hibernate_after`` (0 with ``action: hibernate``) has its memory given back. A wake
  during that reclaim cancels it first: the wake never waits for it.
* **Replica order.** A replica does not sleep while the next newer replica of its
  service is awake, so the newest sleeps first (``core.replicas`` decides the rest).
* **The API's refusals.** A sleep asked for while connections are open or an awake
  service needs this one is refused unless forced; so is one while an operation runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

from .actions import (
    Action,
    ArmTimer,
    CancelReclaim,
    CancelWake,
    Connect,
    Hold,
    Reclaim,
    Reject,
    Release,
    RunWake,
    Transition,
    Unexpected,
    WakeEnded,
    WakeOp,
)
from .events import (
    Arrive,
    Event,
    HoldAwake,
    KernelConnections,
    Leave,
    Observed,
    Reclaimed,
    ReclaimFailed,
    Reconfigured,
    ResultDue,
    SleepDone,
    SleepFailed,
    SleepRequested,
    Timer,
    TimerFired,
    WakeDone,
    WakeFailed,
    WakeRequested,
)
from .gate import SETTLED_ASLEEP, along, awake_dependents, kernel_recheck, ready, refusal
from .lifecycle import IllegalTransition
from .node import Node
from .policy import Policy
from .states import ASLEEP, AWAKE, Outcome, SleepAction, SleepReason, State, WakeResult

Command = tuple[str, Action]


class Orchestrator:
    """All services' decisions. ``handle(name, event, now)`` returns (service, action) pairs.

    ``strict`` (tests) raises ``IllegalTransition`` where production counts an
    ``Unexpected`` action and carries on.
    """

    def __init__(self, *, strict: bool = False) -> None:
        self.nodes: dict[str, Node] = {}
        self.strict = strict
        self._out: list[Command] = []

    # ---- services come and go

    def add(
        self, name: str, policy: Policy, state: State, reason: str, now: float
    ) -> list[Command]:
        """A new service in its initial state; returns the timers that state calls for."""
        node = self.nodes[name] = Node(name, policy, state, reason, now)
        if state is State.RUNNING:
            self._arm_idle(node, now)
        elif state is State.PAUSED:
            self._arm_escalation(node)
        elif state is State.FAILED:
            # Known broken from the start (engine down, container missing): re-read now.
            self._emit(node, ArmTimer(Timer.RETRY, now))
        return self._take()

    def remove(self, name: str) -> None:
        """Forget a service; ``relink`` then drops the links to it (a replica's
        neighbours close ranks at once)."""
        node = self.nodes.pop(name, None)
        if node is not None:
            if node.older is not None:
                node.older.newer = node.newer
            if node.newer is not None:
                node.newer.older = node.older

    def order_replicas(self, names: Sequence[str], now: float) -> list[Command]:
        """One service's replicas, oldest first: each waits for the newer to sleep."""
        nodes = [self.nodes[name] for name in names if name in self.nodes]
        for node in nodes:
            node.newer = node.older = None
        for older, newer in itertools.pairwise(nodes):
            older.newer, newer.older = newer, older
        for node in nodes:
            self._arm_idle(node, now)
        return self._take()

    def relink(
        self, links: Mapping[str, tuple[Sequence[str], str | None]], now: float
    ) -> list[Command]:
        """Set every service's dependencies and group: name -> (depends_on, group).

        Names not (or no longer) known are left out. Every service then reconsiders its
        sleep: a removed dependent may have been the one keeping it awake.
        """
        groups: dict[str, list[Node]] = {}
        for node in self.nodes.values():
            node.dependents = []
        for name, node in self.nodes.items():
            depends_on, group = links.get(name, ((), None))
            node.depends_on = tuple(self.nodes[d] for d in depends_on if d in self.nodes)
            for dependency in node.depends_on:
                dependency.dependents.append(node)
            node.group = (node,)
            if group is not None:
                groups.setdefault(group, []).append(node)
        for members in groups.values():
            for node in members:
                node.group = tuple(members)
        for node in self.nodes.values():
            self._arm_idle(node, now)
            if node.pending is not None and self._dependencies_run(node):
                self._emit(node, RunWake(node.pending))
                node.pending = None
        return self._take()

    # ---- events

    def handle(self, name: str, event: Event, now: float) -> list[Command]:
        node = self.nodes.get(name)
        if node is None:
            return []  # removed while an operation of it ran: nothing to decide
        try:
            self._handle(node, event, now)
        except IllegalTransition as exc:
            if self.strict:
                raise
            self._emit(node, Unexpected(exc.event, exc.state))
        return self._take()

    def _handle(self, node: Node, event: Event, now: float) -> None:
        # The two events of every connection before the match: its class patterns cost
        # about twice as much (an arrive+leave through handle(): 1.38 vs 0.71 us).
        if isinstance(event, Arrive):
            self._arrive(node, event.activity, event.attached, now)
            return
        if isinstance(event, Leave):
            self._leave(node, event, event.held, event.activity, now)
            return
        match event:
            case ResultDue(until):
                # The idle timer, when it fires early, re-arms for the later deadline.
                node.busy_until = max(node.busy_until, until)
            case HoldAwake(until):
                node.hold_until = until
                self._arm_idle(node, now)  # an earlier deadline needs the timer moved
            case KernelConnections():
                self._kernel(node, event, now)
            case SleepRequested():
                self._sleep_requested(node, event, now)
            case TimerFired(timer):
                self._timer(node, timer, now)
            case Reconfigured(policy):
                node.policy = policy
                self._arm_idle(node, now)
                self._arm_escalation(node)
            case Reclaimed() | ReclaimFailed():
                if not node.reclaiming:
                    raise IllegalTransition(event, node.unit.state)
                node.reclaiming = False
                node.hibernated = isinstance(event, Reclaimed)
            case WakeRequested() | WakeDone() | WakeFailed() | SleepDone() | SleepFailed():
                self._unit(node, event, now)
            case Observed():
                self._unit(node, event, now)

    # ---- connections

    def _arrive(self, node: Node, activity: bool, attached: bool, now: float) -> None:
        if not attached:
            node.attached += 1
        if activity:
            node.last_activity = now
        unit = node.unit
        if unit.state is State.RUNNING:
            self._emit(node, Connect())
        elif unit.state is State.FAILED and now < unit.retry_at and not unit.starting:
            # Back-off: a broken backend is not hammered by every new connection. One
            # still starting (its wake ran out of time) is not broken: the connection
            # is held below for a fresh wake of its own, bounded by wake_timeout.
            self._emit(node, Reject(Outcome.BACKEND_ERROR, unit.reason, held=False))
        elif node.held >= node.policy.max_held:
            # Past the cap the connection is closed at once; nothing else waits on it.
            self._emit(node, Reject(Outcome.REJECTED_OVERFLOW, "hold queue full", held=False))
        else:
            node.held += 1
            self._emit(node, Hold())
            self._unit(node, WakeRequested("connection"), now)

    def _leave(self, node: Node, event: Leave, held: bool, activity: bool, now: float) -> None:
        if node.attached == 0 or (held and node.held == 0):
            raise IllegalTransition(event, node.unit.state)
        node.attached -= 1
        if held:
            node.held -= 1
        if activity:
            node.last_activity = now
        if node.attached == 0:
            self._arm_idle(node, now)

    def _kernel(self, node: Node, seen: KernelConnections, now: float) -> None:
        state = node.unit.state
        if state is State.RUNNING:
            moved = seen.arrived or seen.attached < node.kernel_attached
            if moved:
                # Came, or ended, since the last read (when, it cannot tell): as in tcp
                # mode, where a connection's close is activity.
                node.last_activity = now
            elif seen.last_activity is not None:
                node.last_activity = max(node.last_activity, seen.last_activity)
            node.kernel_attached = seen.attached
            node.kernel_busy = bool(moved or seen.attached)
        elif state in (State.PAUSING, State.STOPPING) and seen.arrived:
            # Handed over after the read that decided the sleep (another member's idle
            # timer put its group to sleep): they wait in the backend's own accept
            # queue, so it wakes right after the sleep instead of freezing them.
            self._unit(node, WakeRequested("connections came as it went to sleep"), now)

    # ---- sleeping

    def _sleep_requested(self, node: Node, request: SleepRequested, now: float) -> None:
        refused = refusal(node, request.force)
        if refused is not None:
            self._emit(node, refused)
            return
        state = node.unit.state
        action = request.action
        if action is SleepAction.HIBERNATE and state is State.PAUSED:
            if not (node.hibernated or node.reclaiming):
                self._start_reclaim(node)
            return
        if state is State.STOPPED or (state is State.PAUSED and action is SleepAction.PAUSE):
            return  # already there
        if action is SleepAction.HIBERNATE:
            node.hibernate_now = True
        self._put_to_sleep(node, action, request.reason, now)

    def _put_to_sleep(
        self, node: Node, action: SleepAction, reason: SleepReason, now: float
    ) -> None:
        # Hibernate is a pause to the backend's machine; the reclaim follows once paused.
        pause_or_stop = SleepAction.PAUSE if action is SleepAction.HIBERNATE else action
        self._unit(node, SleepRequested(pause_or_stop, reason), now)

    def _idle_due(self, node: Node, now: float) -> None:
        if node.unit.state is not State.RUNNING or node.attached or not node.policy.sleeps:
            return
        if node.kernel_attached or now < node.deadline:
            # Activity since the timer was armed: re-arm for the time that is left. While
            # the kernel's fast path hands connections over, read it again sooner: the
            # proxy is not told when they end, so their ends (and arrivals it cannot time)
            # are stamped at a read, at most this late.
            at = now + kernel_recheck(node) if node.kernel_attached else node.deadline
            if node.kernel_busy:
                at = min(at, now + kernel_recheck(node))
            self._emit(node, ArmTimer(Timer.IDLE, at))
            return
        if awake_dependents(node, outside=node.group):
            return  # reconsidered when they sleep
        if not all(ready(member, now) for member in node.group):
            return  # the last member to become ready puts the group to sleep
        for member in node.group:
            if member.unit.state is State.RUNNING:
                self._put_to_sleep(member, member.policy.action, SleepReason.IDLE, now)

    def _arm_idle(self, node: Node, now: float) -> None:
        if node.unit.state is State.RUNNING and not node.attached and node.policy.sleeps:
            self._emit(node, ArmTimer(Timer.IDLE, max(node.deadline, now)))

    def _arm_escalation(self, node: Node) -> None:
        policy = node.policy
        if node.unit.state is not State.PAUSED:
            return
        if policy.sleeps and policy.stop_after is not None:
            self._emit(node, ArmTimer(Timer.STOP_AFTER, node.unit.since + policy.stop_after))
        after = node.hibernate_delay()
        if after is None or node.hibernated or node.reclaiming:
            return
        if after == 0:
            # Right after the pause, in the same batch: whoever asked for it (the API)
            # sees the reclaim running once the pause's result is in.
            self._start_reclaim(node)
        else:
            self._emit(node, ArmTimer(Timer.HIBERNATE, node.unit.since + after))

    def _start_reclaim(self, node: Node) -> None:
        node.hibernate_now = False
        node.reclaiming = True
        self._emit(node, Reclaim())

    # ---- timers

    def _timer(self, node: Node, timer: Timer, now: float) -> None:
        unit = node.unit
        if timer is Timer.IDLE:
            self._idle_due(node, now)
        elif timer is Timer.WAKE:
            if unit.state is not State.WAKING:
                return
            if now < node.wake_deadline:
                self._emit(node, ArmTimer(Timer.WAKE, node.wake_deadline))
                return
            if node.pending is None:
                self._emit(node, CancelWake())
            node.pending = None
            limit = node.policy.wake_timeout
            failed = WakeFailed(f"not ready within wake_timeout ({limit:g}s)", timed_out=True)
            self._unit(node, failed, now)
        elif timer is Timer.STOP_AFTER:
            stop_after = node.policy.stop_after
            if unit.state is not State.PAUSED or stop_after is None or not node.policy.sleeps:
                return  # woken (or the policy changed) since it was armed
            if now < unit.since + stop_after:
                self._arm_escalation(node)
                return
            self._unit(node, SleepRequested(SleepAction.STOP, SleepReason.STOP_AFTER), now)
        elif timer is Timer.HIBERNATE:
            after = node.hibernate_delay()
            if unit.state is not State.PAUSED or after is None:
                return  # woken (or the policy changed) since it was armed
            if node.hibernated or node.reclaiming:
                return
            if now < unit.since + after:
                self._arm_escalation(node)
                return
            self._start_reclaim(node)
        else:
            self._unit(node, TimerFired(timer), now)

    # ---- the backend's machine, and what its transitions mean for the others

    def _unit(self, node: Node, event: Event, now: float) -> None:
        before = node.unit.state
        actions = node.unit.handle(event, now)
        after = node.unit.state
        if after is not before:
            self._transitioned(node, before, after, event, now)
        for action in actions:
            if isinstance(action, RunWake):
                self._start_wake(node, action.op, now)
            else:
                self._emit(node, action)

    def _transitioned(
        self, node: Node, before: State, after: State, event: Event, now: float
    ) -> None:
        if before is State.PAUSED:
            if node.reclaiming:
                # Before the unpause or stop that follows: the wake wins at once.
                node.reclaiming = False
                self._emit(node, CancelReclaim())
            node.hibernated = False
        if after not in (State.PAUSING, State.PAUSED):
            node.hibernate_now = False
        if before is State.RUNNING:
            node.kernel_attached, node.kernel_busy = 0, False  # read again once it runs
        self._emit(node, Transition(before, after, node.unit.reason))
        if before is State.WAKING and after is State.RUNNING:
            self._emit(node, WakeEnded(WakeResult.OK, node.unit.reason))
            node.held = 0
            self._emit(node, Release())
            for dependent in node.dependents:
                if dependent.pending is not None and self._dependencies_run(dependent):
                    self._emit(dependent, RunWake(dependent.pending))
                    dependent.pending = None
        elif before is State.WAKING:
            timed_out = isinstance(event, WakeFailed) and event.timed_out
            reason = node.unit.reason
            result, outcome = (
                (WakeResult.TIMEOUT, Outcome.WAKE_TIMEOUT)
                if timed_out
                else (WakeResult.FAILED, Outcome.BACKEND_ERROR)
            )
            self._emit(node, WakeEnded(result, reason))
            node.held = 0
            self._emit(node, Reject(outcome, reason, held=True))
            self._fail_waiting_dependents(node, f"did not wake: {reason}", now)
        elif after is State.FAILED:
            self._fail_waiting_dependents(node, f"failed: {node.unit.reason}", now)
        if after in (State.PAUSING, State.STOPPING) or after in ASLEEP:
            # Put to sleep (forced, or from outside) while a dependent's wake waits for
            # it: wake it again (right after the sleep in flight), or that wake and its
            # held connections would wait for nothing until wake_timeout.
            waiting = next((d for d in node.dependents if d.pending is not None), None)
            if waiting is not None:
                self._unit(node, WakeRequested(f"needed by {waiting.name}"), now)
        if after is State.RUNNING:
            node.last_activity = now  # a fresh idle period from the moment it runs
            self._arm_idle(node, now)
        elif after is State.PAUSED:
            # Checks the state it is in now: the wake just above may have moved it on
            # (no reclaim started only to be cancelled in the same breath).
            self._arm_escalation(node)
        if before in AWAKE and after not in AWAKE:
            # One fewer service needs its dependencies awake: they decide again.
            for dependency in node.depends_on:
                self._arm_idle(dependency, now)
            if node.older is not None:
                for older in along(node.older, "older"):
                    self._arm_idle(older, now)

    def _fail_waiting_dependents(self, node: Node, why: str, now: float) -> None:
        """A dependency that failed fails the wakes waiting for it at once (their held
        connections get an answer now, not at wake_timeout)."""
        for dependent in node.dependents:
            if dependent.pending is not None and dependent.unit.state is State.WAKING:
                dependent.pending = None
                self._unit(dependent, WakeFailed(f"dependency {node.name} {why}"), now)

    def _start_wake(self, node: Node, op: WakeOp, now: float) -> None:
        node.wake_deadline = now + node.policy.wake_timeout
        self._emit(node, ArmTimer(Timer.WAKE, node.wake_deadline))
        for dependency in node.depends_on:
            if dependency.unit.state is not State.RUNNING:
                self._unit(dependency, WakeRequested(f"needed by {node.name}"), now)
        if self._dependencies_run(node):
            self._emit(node, RunWake(op))
        else:
            node.pending = op  # started when the last dependency runs
        for member in node.group:
            if member is not node and member.unit.state in SETTLED_ASLEEP:
                self._unit(member, WakeRequested(f"group with {node.name}"), now)

    @staticmethod
    def _dependencies_run(node: Node) -> bool:
        return all(d.unit.state is State.RUNNING for d in node.depends_on)

    # ---- output

    def _emit(self, node: Node, action: Action) -> None:
        self._out.append((node.name, action))

    def _take(self) -> list[Command]:
        out, self._out = self._out, []
        return out
