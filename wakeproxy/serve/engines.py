"""The Docker engines the proxy uses, by name (``local`` is DOCKER_HOST's, the others are
``engines:``), each with its last listing: start-up reads every container's state from
one listing per engine (never one inspect each), and compose replicas are the containers
a listing shows."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from ..config import ServiceConfig
from ..config.model import LOCAL_ENGINE, EngineConfig
from ..config.replicas import Members, compose_members
from ..errors import EngineUnavailable
from ..runtimes.engine import DockerEngine

log = logging.getLogger("wakeproxy")


def engine_names(configs: Iterable[ServiceConfig]) -> set[str]:
    """The engines the Docker and Swarm services among ``configs`` use."""
    return {cfg.engine for cfg in configs if cfg.runtime in ("docker", "swarm")}


class Engines:
    def __init__(
        self, configured: Mapping[str, EngineConfig], on_compose_change: Callable[[], None]
    ) -> None:
        self.configured = configured
        self.by_name: dict[str, DockerEngine] = {}
        # Each engine's last listing (its containers, and its Swarm services when asked).
        self.listings: dict[str, list[dict[str, Any]]] = {}
        self._on_compose_change = on_compose_change

    def get(self, name: str) -> DockerEngine:
        """The engine named ``name`` (made on first use; its events follow once started):
        ``local`` or one of the ``engines:`` the proxy started with."""
        engine = self.by_name.get(name)
        if engine is None:
            cfg = self.configured.get(name)
            if cfg is None and name != LOCAL_ENGINE:
                raise EngineUnavailable(f"engine {name!r} is not one the proxy started with")
            engine = self.by_name[name] = DockerEngine(cfg)
            engine.on_compose_change = self._on_compose_change
        return engine

    def members(self, cfg: ServiceConfig) -> Members:
        """A compose service's replicas: its containers in the engine's last listing."""
        assert cfg.replicas is not None
        return compose_members(self.listings.get(cfg.engine, []), cfg.replicas)

    async def list(self, configs: Iterable[ServiceConfig], *, labels: Iterable[str] = ()) -> None:
        """One listing per engine ``configs`` use (and of the ``labels`` engines, with
        their Swarm services: label discovery's first read), all at once; an engine
        that does not answer fails only its own services (their state reads failed,
        retried with back-off)."""
        configs = list(configs)
        names = engine_names(configs) | set(labels)
        swarm = {c.engine for c in configs if c.runtime == "swarm"} | set(labels)
        await asyncio.gather(*(self._list_one(name, name in swarm) for name in sorted(names)))

    async def _list_one(self, name: str, swarm: bool) -> None:
        engine = self.get(name)
        try:
            self.listings[name] = await engine.refresh_all(swarm=swarm)
        except EngineUnavailable as exc:
            log.error(
                "the Docker engine %s does not answer: %s; its services are failed until it does",
                name,
                exc,
            )

    async def fresh(self, configs: Iterable[ServiceConfig]) -> set[str]:
        """Container states again before Docker services are added (one listing per
        engine they use); an engine new to the proxy starts its events. Returns the
        names of the new ones."""
        configs = list(configs)
        new = engine_names(configs) - set(self.by_name)
        await self.list(configs)
        for name in new:
            self.by_name[name].start_events()
        return new

    def start_events(self) -> None:
        for engine in self.by_name.values():
            engine.start_events()

    async def close(self) -> None:
        for engine in self.by_name.values():
            await engine.close()
        self.by_name.clear()
