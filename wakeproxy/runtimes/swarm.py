"""Docker Swarm: a service scaled to zero while it sleeps, and back up on a wake.

The engine wakeproxy talks to must be a manager of the swarm. A wake sets the service's
replica count to its awake count (``swarm_replicas``, 1) and returns: readiness then
probes the backend address until a task answers (a task reports "running" before its
server listens, so the probe is the proof). A sleep (``action: stop``) scales it to 0
and waits until none of its tasks is left running (a task told to shut down runs on for
its grace period). ``action: pause`` instead pauses the service's running task
containers, which must run on the node of the engine wakeproxy talks to (a task on
another node fails the pause, saying so); a wake unpauses them. The state is the
service's spec: scaled up reads running (paused while we froze its tasks), at 0
stopped, gone failed. A spec changed outside the proxy (scaled by hand, removed) comes
through the engine's service events and is read again; Docker has no event for a task,
so a task that dies and is replaced is Swarm's business, not the proxy's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..core.states import State
from ..errors import OperationFailed, RuntimeFailure
from .base import Runtime
from .docker import set_paused
from .engine import map_docker_errors

if TYPE_CHECKING:
    from .engine import DockerEngine

log = logging.getLogger("wakeproxy.runtime.swarm")
_POLL = 0.05
# Task states after which nothing of the task runs any more.
_ENDED = frozenset({"complete", "shutdown", "failed", "rejected", "orphaned", "remove"})
# Tries of a scale whose service version moved meanwhile (another update won the race).
_SCALE_TRIES = 3


def state_of(spec_replicas: int | None) -> tuple[State, str]:
    """The state a service's desired replica count stands for."""
    if spec_replicas is None:
        return State.FAILED, "not a replicated Swarm service (global mode?)"
    if spec_replicas == 0:
        return State.STOPPED, "scaled to 0"
    return State.RUNNING, f"scaled to {spec_replicas}"


class SwarmRuntime(Runtime):
    """One Swarm service, by name, on a manager engine."""

    kind = "swarm"

    def __init__(
        self, engine: DockerEngine, service: str, *, replicas: int = 1, stop_timeout: float = 10.0
    ) -> None:
        super().__init__()
        self.engine = engine
        self.service = service
        self.replicas = replicas
        self.stop_timeout = stop_timeout
        self._inspecting: asyncio.Task[None] | None = None
        # The task containers our pause froze (unpaused by a wake or before a stop).
        self._paused: tuple[str, ...] = ()
        engine.register_swarm(self)

    def initial_state(self) -> tuple[State, str]:
        """From the engine's listing of services, read with its containers at start-up."""
        error = self.engine.swarm_error
        if error is not None:
            return State.FAILED, error
        entry = self.engine.swarm_snapshot.get(self.service)
        if entry is None:
            return State.FAILED, f"no Swarm service {self.service!r}"
        desired, _, containers = entry
        frozen = [self.engine.snapshot_state(cid) is State.PAUSED for cid in containers]
        if desired and frozen and all(frozen):
            self._paused = containers
            return State.PAUSED, "its task containers are paused"
        return state_of(desired)

    async def _service(self) -> dict[str, Any]:
        with map_docker_errors(f"reading Swarm service {self.service}"):
            return dict(await self.engine.client.services.inspect(self.service))

    async def _live_tasks(self) -> list[str]:
        """The states of the service's tasks not yet ended (running, or shutting down)."""
        with map_docker_errors(f"reading the tasks of Swarm service {self.service}"):
            tasks = await self.engine.client.tasks.list(filters={"service": self.service})
        states = [str((t.get("Status") or {}).get("State")) for t in tasks]
        return [state for state in states if state not in _ENDED]

    async def inspect(self) -> State:
        """running while the service is scaled up (its tasks may still be starting:
        readiness tells when one serves), paused while we froze its tasks, stopped at 0."""
        state = state_of(_replicas(await self._service()))[0]
        return State.PAUSED if state is State.RUNNING and self._paused else state

    async def _scale(self, count: int) -> None:
        for attempt in range(_SCALE_TRIES):
            info = await self._service()
            if _replicas(info) is None:
                raise OperationFailed(f"Swarm service {self.service} is not replicated")
            spec = info["Spec"]
            spec["Mode"]["Replicated"]["Replicas"] = count
            try:
                with map_docker_errors(f"scaling Swarm service {self.service} to {count}"):
                    await self.engine.client._query_json(
                        f"services/{info['ID']}/update",
                        method="POST",
                        params={"version": info["Version"]["Index"]},
                        data=spec,
                    )
                return
            except OperationFailed as exc:
                # "update out of sequence": someone updated it between our read and write.
                if "out of sequence" not in str(exc) or attempt == _SCALE_TRIES - 1:
                    raise

    async def start(self) -> None:
        await self._scale(self.replicas)

    async def stop(self) -> None:
        if self._paused:
            await self.unpause()  # a frozen task cannot be shut down
        await self._scale(0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.stop_timeout + 10.0
        while live := await self._live_tasks():
            if loop.time() > deadline:
                raise OperationFailed(
                    f"Swarm service {self.service}: scaled to 0, but after "
                    f"{self.stop_timeout + 10.0:g} s tasks are still {', '.join(live)}"
                )
            await asyncio.sleep(_POLL)

    async def pause(self) -> None:
        """Freeze the service's running task containers (all on this engine's node)."""
        with map_docker_errors(f"reading the tasks of Swarm service {self.service}"):
            info = await self.engine.client.system.info()
            tasks = await self.engine.client.tasks.list(
                filters={"service": self.service, "desired-state": "running"}
            )
        node = str((info.get("Swarm") or {}).get("NodeID", ""))
        containers = []
        for task in tasks:
            status = task.get("Status") or {}
            if status.get("State") != "running":
                continue
            if str(task.get("NodeID")) != node:
                raise OperationFailed(
                    f"a task of Swarm service {self.service} runs on another node: "
                    "action: pause needs its tasks on this engine's node (or use action: stop)"
                )
            containers.append(str((status.get("ContainerStatus") or {}).get("ContainerID")))
        for cid in containers:
            container = self.engine.client.containers.container(cid)
            what = f"task container {cid[:12]} of {self.service}"
            await set_paused(container, True, what, local=not self.engine.remote)
        self._paused = tuple(containers)

    async def unpause(self) -> None:
        """Thaw what our pause froze; a service slept by a stop is scaled up instead."""
        if not self._paused:
            await self.start()
            return
        for cid in self._paused:
            container = self.engine.client.containers.container(cid)
            what = f"task container {cid[:12]} of {self.service}"
            await set_paused(container, False, what, local=not self.engine.remote)
        self._paused = ()

    def outside_change(self) -> None:
        """Read the service again: its spec changed (ours or someone else's: an update
        of our own, seen while our operation runs, is ignored by the core), or the
        engine came back."""
        if self._inspecting is None or self._inspecting.done():
            self._inspecting = asyncio.get_running_loop().create_task(self._read_again())

    async def _read_again(self) -> None:
        try:
            state, why = state_of(_replicas(await self._service()))
        except RuntimeFailure as exc:  # removed (BackendMissing), or the engine is away
            self.on_change(State.FAILED, str(exc))
            return
        if state is State.RUNNING and self._paused:
            state, why = State.PAUSED, "its task containers are paused"
        self.on_change(state, f"changed outside the proxy: {why}")

    async def close(self) -> None:
        self.engine.unregister_swarm(self)
        if self._inspecting is not None:
            self._inspecting.cancel()

    def describe(self) -> str:
        return f"swarm service {self.service}"


def _replicas(info: dict[str, Any]) -> int | None:
    replicated = ((info.get("Spec") or {}).get("Mode") or {}).get("Replicated")
    if replicated is None:
        return None
    return int(replicated.get("Replicas", 0))
