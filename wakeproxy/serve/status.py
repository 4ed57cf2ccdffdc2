"""What the outside reads of a running service: frozen records, made on demand.

The admin API, the metrics, the JSON views and the status page read these and nothing
else of a service (not its hibernator, admission, breakers or counters), so a change
inside a backend or a frontend never reaches them, and a record read at one moment is
one consistent picture: its counts are copies, its state the state of that moment.
Reading memory (a cgroup's or /proc's files) is the only I/O in making one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..config import Address, ServiceConfig
from ..core.states import State
from ..host.memory import MemoryUse
from .fastpath import FastPathStatus
from .stats import Counts

if TYPE_CHECKING:
    from ..httpmode.mcpfront import McpFront
    from .backend import Backend
    from .frontend import Frontend


@dataclass(frozen=True, slots=True)
class BackendStatus:
    """One backend (a service, or one replica of one) at one moment."""

    name: str
    cfg: ServiceConfig
    runtime: str  # its kind: docker, process, swarm
    state: State
    reason: str
    backend: Address | None  # where it listens, once known
    forwarding: int  # connections being forwarded
    held: int  # connections held for a wake
    last_activity: float  # wall-clock time of the last byte either way
    sleeps_in: float | None  # seconds to the idle deadline; None: no sleep due
    bytes_up: int  # client to backend, open connections included
    bytes_down: int
    paused_s: float  # time asleep since the start, by state
    stopped_s: float
    memory: Mapping[str, Any]  # the hibernator's view: measured memory, notes, problems
    memory_use: MemoryUse | None  # the same measure, for the metrics
    release: Mapping[str, Any]  # the last release's window and where it came from
    mcp: Mapping[str, Any] | None  # a listener's MCP front (not a replica's)
    counts: Counts
    fast_path: FastPathStatus

    @property
    def asleep_s(self) -> float:
        return self.paused_s + self.stopped_s


@dataclass(frozen=True, slots=True)
class ReplicaStatus:
    """A backend as one replica of its service: its circuit and its share of the load."""

    backend: BackendStatus
    circuit: str  # closed, open, half-open
    circuit_opened: int  # times it opened
    placed: int  # connections placed on it
    sessions: int  # MCP sessions pinned to it


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """A service with replicas: its listener's view of them."""

    name: str
    cfg: ServiceConfig
    state: State
    minimum: int
    maximum: int
    target_inflight: int
    awake: int
    scale_ups: int
    moved: int
    sessions_lost: int
    mcp: Mapping[str, Any] | None
    replicas: tuple[ReplicaStatus, ...]
    counts: Counts  # outcomes decided before a replica took the connection


@dataclass(frozen=True, slots=True)
class McpStatus:
    """One listener's MCP sessions and what it answered itself."""

    name: str
    answered: Mapping[str, int]  # by method
    materialized: int
    resumed: int
    replays_failed: int
    sessions: int
    virtual: int  # sessions no server knows yet
    evicted: int
    refused: int


def backend_status(backend: Backend) -> BackendStatus:
    loop_now = backend.loop.time()
    up, down = backend.bytes_moved()
    sleeps_in = backend.sleeps_in()
    front = backend.mcp if backend.cfg.replica_of is None else None
    return BackendStatus(
        name=backend.name,
        cfg=backend.cfg,
        runtime=backend.runtime.kind,
        state=backend.state,
        reason=backend.reason,
        backend=backend.backend,
        forwarding=backend.forwarding,
        held=backend.held,
        last_activity=time.time() - (loop_now - backend.last_activity),
        sleeps_in=sleeps_in,
        bytes_up=up,
        bytes_down=down,
        paused_s=backend.asleep_seconds(State.PAUSED),
        stopped_s=backend.asleep_seconds(State.STOPPED),
        memory=backend.hibernator.describe(),
        memory_use=backend.hibernator.memory(),
        release=backend.admission.describe(),
        mcp=mcp_view(front) if front is not None else None,
        counts=backend.stats.counts(),
        fast_path=backend.fast_path.status(),
    )


def pool_status(pool: Frontend) -> PoolStatus:
    """``pool``: a frontend with replicas."""
    assert pool.scaling is not None
    sessions = pool.sessions
    pinned = sessions.by_replica() if sessions is not None else {}
    replicas = tuple(
        ReplicaStatus(
            backend=backend_status(r),
            circuit=pool.breakers[r.name].state,
            circuit_opened=pool.breakers[r.name].opened,
            placed=pool.placed[r.name],
            sessions=pinned.get(r.name, 0),
        )
        for r in pool.backends
    )
    return PoolStatus(
        name=pool.name,
        cfg=pool.cfg,
        state=pool.state,
        minimum=pool.scaling.minimum,
        maximum=pool.scaling.maximum,
        target_inflight=pool.scaling.target,
        awake=pool.awake(),
        scale_ups=pool.scale_ups,
        moved=pool.moved,
        sessions_lost=sessions.lost if sessions is not None else 0,
        mcp=mcp_view(pool.mcp) if pool.mcp is not None else None,
        replicas=replicas,
        counts=pool.stats.counts(),
    )


def mcp_status(front: McpFront) -> McpStatus:
    sessions = front.sessions
    virtual = sessions.virtual()
    return McpStatus(
        name=front.name,
        answered=dict(front.answered),
        materialized=front.materialized,
        resumed=front.resumed,
        replays_failed=front.replays_failed,
        sessions=len(sessions),
        virtual=virtual,
        evicted=sessions.evicted,
        refused=sessions.refused,
    )


def mcp_view(front: McpFront) -> dict[str, Any]:
    """What the API shows of a listener's MCP front: what was learned, what was
    answered there, the sessions."""
    sessions = front.sessions
    return {
        "mode": front.settings.mcp,
        "resume": front.resume,
        "endpoint": front.learned.endpoint or None,
        "server": front.learned.server_name() or None,
        "versions": front.learned.versions(),
        "discover": sorted(front.learned.discover),
        "answered": dict(sorted(front.answered.items())),
        "sessions": len(sessions),
        "sessions_virtual": sessions.virtual(),
        "materialized": front.materialized,
        "resumed": front.resumed,
        "replays_failed": front.replays_failed,
        "sessions_evicted": sessions.evicted,
        "sessions_refused": sessions.refused,
        "sessions_lost": sessions.lost,
    }
