"""Docker Swarm: a service scaled to zero while it sleeps, and back up on a wake.

The engine wakeproxy talks to must be a manager of the swarm. A wake sets the service's
replica count to its awake count (``swarm_replicas``, 1) and returns: readiness then
probes the backend address until a task answers (a task reports "running" before its
server listens, so the probe is the proof). A sleep (``action: stop``) scales it to 0 and
waits until no task runs. The state is the service's spec and its running tasks; a
change made outside the proxy (someone scales by hand, a task dies) comes through the
engine's service events.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from ..core.states import State
from ..errors import OperationFailed
from .base import Runtime
from .docker import map_docker_errors

if TYPE_CHECKING:
    from .docker import DockerEngine

log = logging.getLogger("wakeproxy.runtime.swarm")
_POLL = 0.05
# Following a scale-up made outside the proxy: how long, how often.
_FOLLOW_FOR, _FOLLOW_EVERY = 60.0, 0.2


def state_of(spec_replicas: int | None, running: int) -> tuple[State, str]:
    """The state a service's desired replica count and running tasks add up to."""
    if spec_replicas is None:
        return State.FAILED, "not a replicated Swarm service (global mode?)"
    if running > 0:
        return State.RUNNING, f"{running} task(s) running"
    if spec_replicas == 0:
        return State.STOPPED, "scaled to 0"
    return State.STOPPED, f"scaled to {spec_replicas}, no task running yet"


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
        # Service updates our own scaling causes, not yet seen: echoes, not news.
        self._echoes = 0
        self._inspecting: asyncio.Task[None] | None = None
        engine.register_swarm(self)

    def initial_state(self) -> tuple[State, str]:
        """From the engine's listing of services, read with its containers at start-up."""
        error = self.engine.swarm_error
        if error is not None:
            return State.FAILED, error
        entry = self.engine.swarm_snapshot.get(self.service)
        if entry is None:
            return State.FAILED, f"no Swarm service {self.service!r}"
        return state_of(*entry)

    async def _service(self) -> dict[str, Any]:
        with map_docker_errors(f"reading Swarm service {self.service}"):
            return dict(await self.engine.client.services.inspect(self.service))

    async def _running_tasks(self) -> int:
        with map_docker_errors(f"reading the tasks of Swarm service {self.service}"):
            tasks = await self.engine.client.tasks.list(
                filters={"service": self.service, "desired-state": "running"}
            )
        return sum(
            1
            for t in tasks
            if (t.get("Status") or {}).get("State") == "running"
            and t.get("DesiredState") == "running"
        )

    async def inspect(self) -> State:
        """running while the service is scaled up (its tasks may still be starting:
        readiness tells when one serves), stopped at 0."""
        desired = _replicas(await self._service())
        if desired is None:
            return State.FAILED
        return State.RUNNING if desired > 0 else State.STOPPED

    async def _scale(self, count: int) -> None:
        info = await self._service()
        spec = info["Spec"]
        if _replicas(info) is None:
            raise OperationFailed(f"Swarm service {self.service} is not replicated: cannot scale")
        spec["Mode"]["Replicated"]["Replicas"] = count
        version = info["Version"]["Index"]
        self._echoes += 1
        try:
            with map_docker_errors(f"scaling Swarm service {self.service} to {count}"):
                await self.engine.client._query_json(
                    f"services/{info['ID']}/update",
                    method="POST",
                    params={"version": version},
                    data=spec,
                )
        except BaseException:
            self._echoes -= 1
            raise

    async def start(self) -> None:
        await self._scale(self.replicas)

    async def stop(self) -> None:
        await self._scale(0)
        deadline = asyncio.get_running_loop().time() + self.stop_timeout + 10.0
        while await self._running_tasks():
            if asyncio.get_running_loop().time() > deadline:
                raise OperationFailed(f"Swarm service {self.service}: tasks still running")
            await asyncio.sleep(_POLL)

    async def pause(self) -> None:
        raise OperationFailed("a Swarm service sleeps by scaling to 0 (action: stop)")

    async def unpause(self) -> None:
        await self.start()

    def service_event(self) -> None:
        """The engine saw this service updated: ours (an echo) or someone else's."""
        if self._echoes > 0:
            self._echoes -= 1
            return
        self.outside_change()

    def outside_change(self) -> None:
        """Re-read the service (updated outside the proxy, or after a reconnect)."""
        if self._inspecting is None or self._inspecting.done():
            self._inspecting = asyncio.get_running_loop().create_task(self._follow_outside())

    async def _follow_outside(self) -> None:
        """Scaled up outside: the update comes before any task runs, so follow it until
        one does (or ``_FOLLOW_FOR``); then report the state it came to."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + _FOLLOW_FOR
        try:
            while True:
                desired = _replicas(await self._service())
                state, why = state_of(desired, await self._running_tasks())
                if not desired or state is State.RUNNING or loop.time() > deadline:
                    break
                await asyncio.sleep(_FOLLOW_EVERY)
        except Exception as exc:  # the engine went away: its reconnect re-reads
            log.warning("%s: %s", self.service, exc)
            return
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
