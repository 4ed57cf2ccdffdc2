"""The proxy process: builds every service from the config, runs them, ends them.

Start-up reads each backend's real state before a listener opens (docker: one
bulk listing for all containers, never one inspect each): paused stays paused until
needed, running gets a fresh idle timer, a missing container or an unreachable
engine marks that service failed (retried with back-off) while the others work.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .admin import AdminServer
from .config import Address, Config, ServiceConfig
from .discovery import LabelDiscovery
from .errors import EngineUnavailable, WakeproxyError
from .lifecycle import State
from .runtimes.base import Runtime
from .runtimes.docker import DockerEngine, DockerRuntime
from .runtimes.process import ProcessRuntime
from .service import Service

log = logging.getLogger("wakeproxy")


class ListenError(WakeproxyError):
    """A service's listen address cannot be bound."""


@contextlib.contextmanager
def _listening(what: str, address: Address) -> Iterator[None]:
    """Turn a failed bind into a ListenError naming what and where."""
    try:
        yield
    except OSError as exc:
        # uvloop's message repeats the address; the errno text says it all.
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"{what}: cannot listen on {address}: {why}") from None


def raise_open_file_limit() -> int:
    """Raise the soft open-file limit to the hard one: two descriptors per connection."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit above %d: %s", soft, exc)
    return soft


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.services: dict[str, Service] = {}
        self.engine: DockerEngine | None = None
        self.admin: AdminServer | None = None
        self.discovery: LabelDiscovery | None = None
        # Named policies as changed through the API (the file's until a reload).
        self.policies = dict(config.policies)

    async def start(self) -> None:
        limit = raise_open_file_limit()
        log.debug("open-file limit: %d", limit)
        # Checked before anything listens: a public admin address needs a token.
        admin = AdminServer(self, self.config.admin)
        configs = list(self.config.services.values())
        engine_error: str | None = None
        listing: list[dict[str, Any]] | None = None
        labels_on = self.config.discovery.docker_labels
        if labels_on or any(cfg.runtime == "docker" for cfg in configs):
            self.engine = DockerEngine()
            try:
                listing = await self.engine.refresh_snapshot()
            except EngineUnavailable as exc:
                engine_error = str(exc)
                log.error(
                    "the Docker engine does not answer: %s; docker services are failed "
                    "until it does",
                    exc,
                )
        try:
            for cfg in configs:
                runtime = self._runtime(cfg)
                initial, reason = self._initial_state(runtime, engine_error)
                self.services[cfg.name] = Service(cfg, runtime, initial=initial, reason=reason)
            # Wired before any starts: an auto_start wake must see its dependencies.
            self._wire()
            for cfg in configs:
                with _listening(f"service {cfg.name}", cfg.listen):
                    await self.services[cfg.name].start()
            if labels_on:
                assert self.engine is not None
                self.discovery = LabelDiscovery(self, self.config.discovery, self.engine)
                if listing is not None:
                    # The same listing: labelled containers are served from the start.
                    await self.discovery.apply(listing)
            with _listening("admin API", self.config.admin.listen):
                await admin.start()
            self.admin = admin
        except BaseException:
            await self.close()
            raise
        if self.engine is not None:
            self.engine.start_events()
        if self.discovery is not None:
            self.discovery.start()

    async def add_services(self, configs: list[ServiceConfig]) -> dict[str, str]:
        """Start services while the proxy runs; returns name -> why for those that cannot listen.

        Their state comes from the engine's latest listing, which the caller just made.
        """
        added: list[Service] = []
        for cfg in configs:
            runtime = self._runtime(cfg)
            initial, reason = self._initial_state(runtime, None)
            added.append(Service(cfg, runtime, initial=initial, reason=reason))
            self.services[cfg.name] = added[-1]
        self._wire()
        failed: dict[str, str] = {}
        for service in added:
            try:
                with _listening(f"service {service.name}", service.cfg.listen):
                    await service.start()
            except ListenError as exc:
                failed[service.name] = str(exc)
                del self.services[service.name]
                await self._end(service)
        if failed:
            self._wire()
        return failed

    async def remove_service(self, name: str) -> None:
        """Stop serving one service: its listener closes and its connections end."""
        service = self.services.pop(name)
        self._wire()
        await self._end(service)

    @staticmethod
    async def _end(service: Service) -> None:
        await service.close()
        try:
            await service.runtime.close()
        except WakeproxyError as exc:
            log.warning("%s: %s", service.name, exc)

    def _wire(self) -> None:
        """Link dependencies, dependents and group members (again after any change)."""
        groups: dict[str, list[Service]] = {}
        for service in self.services.values():
            service.dependents = []
            service.group = []
        for service in self.services.values():
            service.depends_on = [
                self.services[name] for name in service.cfg.depends_on if name in self.services
            ]
            for dependency in service.depends_on:
                dependency.dependents.append(service)
            if service.cfg.group is not None:
                groups.setdefault(service.cfg.group, []).append(service)
        for members in groups.values():
            for service in members:
                service.group = [m for m in members if m is not service]

    def _runtime(self, cfg: ServiceConfig) -> Runtime:
        if cfg.runtime == "process":
            assert cfg.command is not None
            cwd = cfg.cwd
            if cwd is not None and self.config.source is not None:
                # A relative cwd is relative to the config file, not to wherever we run.
                cwd = str(Path(self.config.source).parent / cwd)
            return ProcessRuntime(cfg.command, cwd=cwd, env=cfg.env, stop_timeout=cfg.stop_timeout)
        assert self.engine is not None and cfg.container is not None
        return DockerRuntime(self.engine, cfg.container, stop_timeout=cfg.stop_timeout)

    @staticmethod
    def _initial_state(runtime: Runtime, engine_error: str | None) -> tuple[State, str]:
        if isinstance(runtime, DockerRuntime):
            if engine_error is not None:
                return State.FAILED, engine_error
            state = runtime.initial_state()
            if state is None:
                return State.FAILED, f"container {runtime.ref} not found"
            return state, "found at start-up"
        # Commands belong to the proxy: none runs before it starts them.
        return State.STOPPED, "not started yet"

    async def close(self) -> None:
        """Close listeners and connections, end commands; containers stay as they are."""
        if self.discovery is not None:
            await self.discovery.close()
            self.discovery = None
        if self.admin is not None:
            await self.admin.close()
            self.admin = None
        for service in self.services.values():
            await service.close()
        for service in self.services.values():
            try:
                await service.runtime.close()
            except WakeproxyError as exc:
                log.warning("%s: %s", service.name, exc)
        if self.engine is not None:
            await self.engine.close()
            self.engine = None
