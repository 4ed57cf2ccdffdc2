"""Whether a service may sleep now: the gate, the dependents' veto, a group's readiness,
the API's refusals. Pure reads of the nodes; the orchestrator acts on the answers."""

from __future__ import annotations

from .actions import Refused
from .node import Node
from .states import ASLEEP, AWAKE, IN_FLIGHT, State

# Asleep, or failed: nothing to put to sleep, and nothing that holds a group awake.
SETTLED_ASLEEP = ASLEEP | {State.FAILED}


def along(node: Node, link: str) -> list[Node]:
    """``node`` and the replicas beyond it through ``link`` (newer or older)."""
    chain: list[Node] = []
    step: Node | None = node
    while step is not None:
        chain.append(step)
        step = getattr(step, link)
    return chain


def awake_dependents(node: Node, outside: tuple[Node, ...] = ()) -> list[Node]:
    """The awake services that need this one: its dependents, and for a replica
    every newer one (one may be awake behind a failed or sleeping one)."""
    needing = node.dependents
    if node.newer is not None:
        needing = [*needing, *along(node.newer, "newer")]
    return [d for d in needing if d.unit.state in AWAKE and d not in outside]


def ready(node: Node, now: float) -> bool:
    """Whether this service lets its group sleep now. A dependent in the same group
    does not hold it: the group sleeps together, that dependent with it."""
    if node.unit.state in SETTLED_ASLEEP:
        return True
    return (
        node.unit.state is State.RUNNING
        and not node.connections
        and node.policy.sleeps
        and now >= node.deadline
        and not awake_dependents(node, outside=node.group)
    )


def refusal(node: Node, force: bool) -> Refused | None:
    """Why a sleep asked for now is refused, or None."""
    if node.connections and not force:
        return Refused(f"{node.connections} connection(s) open", forceable=True)
    awake = awake_dependents(node)
    if awake and not force:
        names = ", ".join(n.name for n in awake)
        return Refused(f"needed by {names} (awake)", forceable=True)
    state = node.unit.state
    if state in IN_FLIGHT:
        why = f"the service is {state.value}; try again when it settles"
        return Refused(why, forceable=False)
    if state is State.FAILED:
        return Refused(f"the service is failed: {node.unit.reason}", forceable=False)
    return None


def kernel_recheck(node: Node) -> float:
    """Seconds to the next read of the kernel's fast-path connections while it hands some
    over: a tenth of the idle delay, at least a second (never more than the delay)."""
    delay = node.policy.idle_delay
    return min(delay, max(1.0, delay / 10))
