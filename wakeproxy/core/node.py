"""One service as the decision core sees it: its backend's machine, the connections that
need it, its idle clock, its links to other services."""

from __future__ import annotations

from .actions import WakeOp
from .lifecycle import Lifecycle
from .policy import Policy
from .states import State


class Node:
    """One service as the core sees it."""

    __slots__ = (
        "attached",
        "busy_until",
        "dependents",
        "depends_on",
        "group",
        "held",
        "hibernate_now",
        "hibernated",
        "hold_until",
        "kernel_attached",
        "kernel_busy",
        "last_activity",
        "name",
        "newer",
        "older",
        "pending",
        "policy",
        "reclaiming",
        "unit",
        "wake_deadline",
    )

    def __init__(self, name: str, policy: Policy, state: State, reason: str, now: float) -> None:
        self.name = name
        self.policy = policy
        self.unit = Lifecycle(state, now=now, reason=reason)
        # Connections that need the backend: held for a wake, or forwarding. Each one
        # keeps the service awake (the gate).
        self.attached = 0
        self.held = 0
        # Connections the kernel handed to the backend without the proxy (fast_path:
        # kernel), as last read while it ran: they keep it awake too. Busy: the last
        # read saw some (open, new or ended): the next comes sooner (gate.kernel_recheck).
        self.kernel_attached = 0
        self.kernel_busy = False
        self.last_activity = now
        # mode http: no idle sleep before this (a result may still be due, inflight_grace).
        self.busy_until = 0.0
        # Prediction's hold (a keep-awake window, a predicted wake): replaced, not raised.
        self.hold_until = 0.0
        self.depends_on: tuple[Node, ...] = ()
        self.dependents: list[Node] = []
        # Every member of its group, itself included; (self,) without a group.
        self.group: tuple[Node, ...] = (self,)
        # A replica's neighbours in its service's order: it does not sleep while the
        # newer one is awake (the newest sleeps first).
        self.newer: Node | None = None
        self.older: Node | None = None
        # The wake operation waiting for dependencies to run first.
        self.pending: WakeOp | None = None
        self.wake_deadline = 0.0
        # Hibernation of a paused backend: asked for by the API (at once, whatever
        # hibernate_after says), in flight, done (memory given back until it wakes).
        self.hibernate_now = False
        self.reclaiming = False
        self.hibernated = False

    def __repr__(self) -> str:
        return (
            f"<Node {self.name} state={self.unit.state.value} attached={self.attached} "
            f"held={self.held} kernel={self.kernel_attached}>"
        )

    @property
    def state(self) -> State:
        return self.unit.state

    @property
    def deadline(self) -> float:
        """Loop time from which the idle policy may put the backend to sleep."""
        return max(self.last_activity + self.policy.idle_delay, self.busy_until, self.hold_until)

    def touch(self, now: float) -> None:
        """Activity on an attached connection (a request): only the idle clock moves.

        The hot path's one shortcut past ``handle``: nothing can follow from it at once,
        the idle timer reads the stamp when it fires.
        """
        self.last_activity = now

    @property
    def connections(self) -> int:
        """Every connection that keeps it awake: the proxy's and the kernel's."""
        return self.attached + self.kernel_attached

    def hibernate_delay(self) -> float | None:
        """Seconds paused before its memory is given back (None: never)."""
        if self.hibernate_now:
            return 0.0
        return self.policy.hibernate_after if self.policy.sleeps else None

    def sleeps_in(self, now: float) -> float | None:
        """Seconds to the idle deadline, or None while nothing would put it to sleep."""
        if self.unit.state is not State.RUNNING or self.connections or not self.policy.sleeps:
            return None
        return max(0.0, self.deadline - now)
