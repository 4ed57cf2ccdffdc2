"""The one decision core for all services, and the hand that passes its actions out.

The core (``core.orchestrator``) decides for every service at once: an event for one
service may call for actions on others (a group wakes together; a dependency sleeps
once its dependents did). The ``Coordinator`` feeds it with the loop's time and hands
each action to the ``Backend`` it names.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Protocol

from ..config import ServiceConfig
from ..core.events import Event
from ..core.node import Node
from ..core.orchestrator import Command, Orchestrator
from ..core.policy import Policy
from ..core.states import State

if TYPE_CHECKING:
    from ..core.actions import Action
    from ..net.forward import ClientSide


class Backend(Protocol):
    """What the coordinator needs of a backend (serve.backend): its name and config,
    and to carry out an action decided for it."""

    @property
    def name(self) -> str: ...

    @property
    def cfg(self) -> ServiceConfig: ...

    def carry_out(self, action: Action, conn: ClientSide | None) -> None: ...


def policy_of(cfg: ServiceConfig) -> Policy:
    """What the core needs of a service's config."""
    sleep = cfg.sleep_policy
    return Policy(
        sleeps=sleep.sleeps,
        idle_delay=sleep.idle_delay,
        action=sleep.action,
        stop_after=sleep.stop_after,
        hibernate_after=sleep.hibernates_after,
        max_held=cfg.max_held_connections,
        wake_timeout=cfg.wake_timeout,
    )


class Coordinator:
    def __init__(self, *, strict: bool = False) -> None:
        self.core = Orchestrator(strict=strict)
        self.services: dict[str, Backend] = {}
        self._loop = asyncio.get_running_loop()

    def add(self, service: Backend, policy: Policy, state: State, reason: str) -> Node:
        """Register a service with the core; the timers its state calls for are armed."""
        self.services[service.name] = service
        commands = self.core.add(service.name, policy, state, reason, self._loop.time())
        self._dispatch(commands, service.name, None)
        return self.core.nodes[service.name]

    def remove(self, service: Backend) -> None:
        if self.services.get(service.name) is service:
            del self.services[service.name]
            self.core.remove(service.name)

    def relink(self) -> None:
        """Dependencies and groups from every service's config (again after any change)."""
        links = {
            name: (service.cfg.depends_on, service.cfg.group)
            for name, service in self.services.items()
        }
        self._dispatch(self.core.relink(links, self._loop.time()), "", None)

    def order_replicas(self, names: list[str]) -> None:
        """One service's replicas, oldest first (the newest sleeps first)."""
        self._dispatch(self.core.order_replicas(names, self._loop.time()), "", None)

    def feed(self, service: Backend, event: Event, conn: ClientSide | None = None) -> list[Command]:
        """Decide on ``event`` and carry the actions out; returns them for the caller to read."""
        if self.services.get(service.name) is not service:
            return []  # a replaced service's late report
        commands = self.core.handle(service.name, event, self._loop.time())
        if commands:  # most connections' Leave decides nothing
            self._dispatch(commands, service.name, conn)
        return commands

    def _dispatch(self, commands: list[Command], source: str, conn: ClientSide | None) -> None:
        for name, action in commands:
            target = self.services.get(name)
            if target is not None:
                # Connect/Hold/Reject(held=False) concern the connection that arrived.
                target.carry_out(action, conn if name == source else None)
