"""The proxy process: builds every service from the config, runs them, ends them.

Start-up reads each backend's real state before a listener opens (docker: one
bulk listing for all containers, never one inspect each): paused stays paused until
needed, running gets a fresh idle timer, a missing container or an unreachable
engine marks that service failed (retried with back-off) while the others work.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path

from .config import Address, Config, ServiceConfig, load_config
from .config.live import Applied, plan
from .config.model import LOCAL_ENGINE
from .config.replicas import expand_all, replica_sets
from .core.states import State
from .errors import ConfigError, EngineUnavailable, ListenError, RuntimeFailure, WakeproxyError
from .host.limits import raise_open_file_limit
from .httpmode.mcpfront import McpFront
from .httpmode.mcpstore import McpStore
from .runtimes.engine import DockerEngine
from .runtimes.factory import make_runtime
from .runtimes.leftovers import reap_and_log
from .serve.backend import Backend
from .serve.coordinator import Coordinator
from .serve.discovery import LabelDiscovery
from .serve.engines import Engines
from .serve.fastpath import Kernel
from .serve.frontend import Frontend
from .serve.predictions import Predictions

log = logging.getLogger("wakeproxy")


def _listener_of(cfg: ServiceConfig) -> tuple[object, ...]:
    """What a pool's listener is made of: a change means a new listener."""
    return (cfg.listen, cfg.mode, cfg.backlog)


@contextlib.contextmanager
def listening(what: str, address: Address) -> Iterator[None]:
    """Turn a failed bind into a ListenError naming what and where."""
    try:
        yield
    except OSError as exc:
        # uvloop's message repeats the address; the errno text says it all.
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ListenError(f"{what}: cannot listen on {address}: {why}") from None


# The sources of services: the config file (its compose replicas included) and label
# discovery on each engine ("labels:ENGINE").
FILE = "file"


class Proxy:
    def __init__(self, config: Config) -> None:
        self.config = config
        # What runs: every service's backend, a replicated one's replicas (SERVICE@N)...
        self.services: dict[str, Backend] = {}
        # ... behind its listener, by the service's name: one backend, or the replicas.
        self.frontends: dict[str, Frontend] = {}
        # Created in start(): it needs the running loop.
        self.coordinator: Coordinator | None = None
        # Every Docker engine in use, by name, with its last listing.
        self._compose_cue = asyncio.Event()
        self.docker = Engines(config.engines, self._compose_cue.set)
        # Label discovery, one per engine (discovery.docker_labels), by engine name.
        self.discoveries: dict[str, LabelDiscovery] = {}
        # Schedules and learned wakes (created in start(): it needs the running loop).
        self.predictions: Predictions | None = None
        # What each service's MCP server answered to session set-up (read in start()).
        self.mcp_store = McpStore(config.mcp)
        # The kernel's fast path: loaded when the first service with it starts.
        self.kernel = Kernel()
        # The wall clock schedules read (a test moves it next to a window's edge).
        self.wall_clock: Callable[[], float] = time.time
        # Named policies as changed through the API (the file's until a reload).
        self.policies = dict(config.policies)
        self._reloading = asyncio.Lock()
        self._compose_task: asyncio.Task[None] | None = None
        # What each source asked for when last applied: name -> config (see apply).
        self._applied: dict[str, dict[str, ServiceConfig]] = {}

    def replicated(self, name: str) -> Frontend | None:
        """The listener of service ``name`` when it has replicas."""
        front = self.frontends.get(name)
        return front if front is not None and front.replicated else None

    @property
    def rejected(self) -> dict[str, str]:
        """What label discovery could not serve, on every engine: service name -> why."""
        return {n: why for d in self.discoveries.values() for n, why in d.rejected.items()}

    @property
    def engines(self) -> Mapping[str, DockerEngine]:
        """Every Docker engine in use, by name."""
        return self.docker.by_name

    @property
    def engine(self) -> DockerEngine | None:
        """The local engine (label discovery's), when one is in use."""
        return self.docker.by_name.get(LOCAL_ENGINE)

    def _has_compose(self, services: Mapping[str, ServiceConfig]) -> bool:
        return any(c.replicas is not None and c.replicas.discovered for c in services.values())

    async def start(self) -> None:
        limit = raise_open_file_limit()
        log.debug("open-file limit: %d", limit)
        self.coordinator = Coordinator()
        self.predictions = Predictions(self.config.prediction, self.wall_clock)
        configs = list(self.config.services.values())  # expanded once the engine answered
        # Read before any service attaches, in a thread: the loop is not held by it.
        await self.predictions.preload(configs)
        # Before any command starts: what a killed proxy left of its commands, and
        # their cgroups.
        if any(cfg.runtime == "process" for cfg in configs):
            await reap_and_log()
        labelled = self.config.discovery.engine_names(self.config.engines)
        if any(cfg.mode == "http" and cfg.http.mcp != "off" for cfg in configs):
            await self.mcp_store.loaded()  # before a listener opens (later: when one asks)
        await self.docker.list(configs, labels=labelled)
        configs = list(expand_all(self.config.services.values(), self.docker.members).values())
        try:
            for cfg in configs:
                self.services[cfg.name] = self._backend(cfg)
            # Wired before any starts: an auto_start wake must see its dependencies.
            fronts = self._sync_frontends(self.config.services)
            self._wire()
            for cfg in configs:
                await self.services[cfg.name].start()
            self._applied[FILE] = {cfg.name: cfg for cfg in configs}
            for front in fronts:
                with listening(f"service {front.name}", front.cfg.listen):
                    await front.start()
            for name in labelled:
                discovery = LabelDiscovery(self, self.config.discovery, self.docker.by_name[name])
                self.discoveries[name] = discovery
                listing = self.docker.listings.get(name)
                if listing is not None:
                    # The same listing: labelled containers are served from the start.
                    await discovery.apply(listing)
        except BaseException:
            await self.close()
            raise
        self.docker.start_events()
        if self.docker.by_name:
            self._compose_task = asyncio.create_task(self._follow_compose(), name="compose")
        for discovery in self.discoveries.values():
            discovery.start()
        self.predictions.start()

    async def _follow_compose(self) -> None:
        """Compose replicas follow their containers: a container of a compose service
        created or removed (``docker compose up --scale``) adds or removes a replica;
        the others keep their connections."""
        while True:
            await self._compose_cue.wait()
            await asyncio.sleep(0.2)  # one re-read for a burst of events (a scale of 10)
            self._compose_cue.clear()
            if not self._has_compose(self.config.services):
                continue
            try:
                async with self._reloading:
                    compose = [c for c in self.config.services.values() if c.replicas]
                    await self.docker.list(compose)
                    await self._resync_compose()
            except EngineUnavailable as exc:
                log.warning("compose replicas: %s", exc)
            except Exception:
                log.exception("compose replicas: re-read failed; retrying at the next event")

    async def _resync_compose(self) -> None:
        """The file's services again, against the containers now: compose replicas are
        added and removed, the rest is unchanged."""
        wanted = expand_all(self.config.services.values(), self.docker.members)
        result = await self.apply(FILE, wanted, listed=True)
        for name in result.removed:
            log.info("%s: its container is gone; replica removed", name)
        for name in result.added:
            cfg = self.services[name].cfg
            log.info("%s: container %s found; replica added", name, cfg.container)
        for name, why in result.failed.items():
            log.warning("%s: %s", name, why)

    async def apply(
        self,
        source: str,
        wanted: Mapping[str, ServiceConfig],
        *,
        services: Mapping[str, ServiceConfig] | None = None,
        listed: bool = False,
    ) -> Applied:
        """Make ``source``'s running services what it asks for now (``wanted``, by name),
        against what it asked for when last applied (config.live.plan): the ones it no
        longer asks for are removed, a change a running service can take is made in
        place, any other change replaces it, new ones are added (a name another source
        serves is taken over). The one way services change while the proxy runs: a
        reload, compose replicas following their containers, label discovery.
        ``services``: the configured services the listeners follow (default: the running
        config's); ``listed``: the engines were just listed (else they are, for the
        docker services to add)."""
        before = self._applied.get(source, {})
        steps = plan(before, wanted, self.services)
        result = Applied(unchanged=list(steps.unchanged))
        for name in steps.remove:
            await self._remove(name)
            result.removed.append(name)
        for cfg in steps.update:
            self.services[cfg.name].reconfigure(cfg)
            result.updated.append(cfg.name)
        for cfg in steps.replace:
            await self._remove(cfg.name)
            result.replaced.append(cfg.name)
        for cfg in steps.add:
            if cfg.name in self.services:
                await self._remove(cfg.name)  # another source's: this one wins
            result.added.append(cfg.name)
        to_add = [*steps.replace, *steps.add]
        unreachable = self._unreachable(to_add)
        to_add = [cfg for cfg in to_add if cfg.name not in unreachable]
        if to_add and not listed:
            await self._fresh_listing(to_add)
        failed = await self._add(to_add, self.config.services if services is None else services)
        result.failed = {**unreachable, **failed}
        self._applied[source] = {n: c for n, c in wanted.items() if n not in result.failed}
        for name in self._applied[source]:
            for other, applied in self._applied.items():
                if other != source:
                    applied.pop(name, None)
        for cfg in to_add:
            if cfg.name not in failed:
                # Events between the listing and the registration went nowhere: re-read.
                self.services[cfg.name].recheck()
        return result

    def _unreachable(self, configs: Iterable[ServiceConfig]) -> dict[str, str]:
        """Docker services on an engine the proxy did not start with (a restart needs)."""
        known = {LOCAL_ENGINE, *self.config.engines}
        return {
            cfg.name: f"its engine {cfg.engine!r} is new in the file: restart the proxy"
            for cfg in configs
            if cfg.runtime in ("docker", "swarm") and cfg.engine not in known
        }

    async def _add(
        self, configs: list[ServiceConfig], services: Mapping[str, ServiceConfig]
    ) -> dict[str, str]:
        """Start services while the proxy runs; returns name -> why for those that cannot
        listen. ``services``: the configured services the replicated listeners follow.
        Their state comes from the engine's latest listing, which the caller just made."""
        added: list[Backend] = []
        for cfg in configs:
            added.append(self._backend(cfg))
            self.services[cfg.name] = added[-1]
        self._sync_frontends(services)
        self._wire()
        for backend in added:
            await backend.start()
        failed = await self._open_frontends(services)
        self._wire()
        return failed

    async def _remove(self, name: str) -> None:
        """Stop serving one backend: no new connection is placed on it, its own close;
        a service's only backend takes its listener with it."""
        backend = self.services.pop(name)
        for front in list(self.frontends.values()):
            if backend in front.backends:
                front.backends.remove(backend)
                if not front.replicated:
                    front.close()
                    del self.frontends[front.name]
        await self._end(backend)
        self._wire()

    async def reload(self) -> Applied:
        """Re-read the config file and apply what changed in it.

        An invalid file raises ConfigError and changes nothing. A service whose entry is
        unchanged is not touched (live API changes stay); one changed only in keys a
        running service can take is updated in place; any other change replaces it.
        """
        if self.config.source is None:
            raise ConfigError(["the proxy was not started from a file: nothing to reload"])
        async with self._reloading:
            # In a thread: parsing a large file must not stall every service's traffic.
            try:
                new = await asyncio.to_thread(load_config, self.config.source)
            except ConfigError as exc:
                # Logged here whoever asked (SIGHUP, the API, `wakeproxy reload`).
                log.error("reload refused, the running config is kept:")
                for problem in exc.problems:
                    log.error("%s", problem)
                raise
            old = self.config
            self.policies = dict(new.policies)
            # Replicas one by one: a replica set that changed adds and removes replicas,
            # the others keep their connections.
            if self._has_compose(new.services):
                await self._fresh_listing(c for c in new.services.values() if c.replicas)
            # Against the current listing (compose replicas: the containers now).
            new_run = expand_all(new.services.values(), self.docker.members)
            # Departing replicas leave their listeners first: nothing new is placed on
            # them while the others are removed. Listeners going away (or moving) free
            # their addresses before anything else wants them.
            for front in self.frontends.values():
                front.backends = [b for b in front.backends if b.name in new_run]
            self._close_frontends(new.services)
            result = await self.apply(FILE, new_run, services=new.services)
            result.needs_restart = [
                k for k in ("admin", "discovery", "engines") if getattr(new, k) != getattr(old, k)
            ]
            # Admin and discovery keep running as they started: they need a restart.
            self.config = dataclasses.replace(
                new, admin=old.admin, discovery=old.discovery, engines=old.engines
            )
            for discovery in self.discoveries.values():
                discovery.poke()
        log.info("reloaded %s: %s", new.source, result.summary())
        return result

    async def _fresh_listing(self, configs: Iterable[ServiceConfig]) -> None:
        """Container states again before Docker services are added; an engine new to
        the proxy follows compose changes too."""
        new = await self.docker.fresh(configs)
        if new and self._compose_task is None:
            self._compose_task = asyncio.create_task(self._follow_compose(), name="compose")

    def _sync_frontends(self, services: Mapping[str, ServiceConfig]) -> list[Frontend]:
        """A listener for each service: one backend's, or a replicated service's in
        front of its replicas (oldest first; compose replicas: even while it has no
        container). Returns the new ones (not listening yet); one no longer wanted
        closes."""
        wanted: dict[str, tuple[ServiceConfig, list[Backend]]] = {
            name: (backend.cfg, [backend])
            for name, backend in self.services.items()
            if backend.cfg.replica_of is None
        }
        sets = replica_sets({name: b.cfg for name, b in self.services.items()})
        for name, cfg in services.items():
            if cfg.replicas is not None:
                wanted[name] = (cfg, [self.services[m] for m in sets.get(name, [])])
        for name in list(self.frontends):
            want = wanted.get(name)
            front = self.frontends[name]
            if want is None or _listener_of(want[0]) != _listener_of(front.cfg):
                front.close()
                del self.frontends[name]
        new: list[Frontend] = []
        for name, (cfg, backends) in wanted.items():
            existing = self.frontends.get(name)
            if existing is None:
                mcp = None  # MCP sessions: in front of a mode-http listener
                if cfg.mode == "http":
                    mcp = McpFront(cfg.name, cfg.http, self.mcp_store, self.config.mcp)
                existing = self.frontends[name] = Frontend(cfg, mcp)
                new.append(existing)
            existing.update(cfg, backends)
        return new

    def _close_frontends(self, services: Mapping[str, ServiceConfig]) -> None:
        """Reload, first: the listeners of replicated services that lost their replicas
        or are gone close, and one whose listener settings changed (it listens anew
        later)."""
        for name, front in list(self.frontends.items()):
            if not front.replicated:
                continue  # goes with its backend (_remove)
            cfg = services.get(name)
            if cfg is None or cfg.replicas is None or _listener_of(cfg) != _listener_of(front.cfg):
                front.close()
                del self.frontends[name]

    async def _open_frontends(self, services: Mapping[str, ServiceConfig]) -> dict[str, str]:
        """Listeners not listening yet (new ones) open; returns name -> why for those
        that cannot (their backends are removed with them)."""
        self._sync_frontends(services)
        failed: dict[str, str] = {}
        for front in [f for f in self.frontends.values() if not f.listening]:
            try:
                with listening(f"service {front.name}", front.cfg.listen):
                    await front.start()
            except ListenError as exc:
                failed[front.name] = str(exc)
                self.frontends.pop(front.name, None)
                front.close()
                for backend in list(front.backends):
                    self.services.pop(backend.name, None)
                    await self._end(backend)
        if failed:
            self._wire()
        return failed

    async def drain(self, grace: float, hurry: asyncio.Event | None = None) -> None:
        """Stop accepting, then give open connections up to ``grace`` seconds to end."""
        if self.predictions is not None:
            self.predictions.stop()  # a proxy shutting down wakes nothing ahead
        for front in self.frontends.values():
            front.stop_accepting()
        open_now = self._open_connections()
        if open_now:
            log.info("waiting up to %gs for %d open connection(s)", grace, open_now)
        deadline = asyncio.get_running_loop().time() + grace
        while self._open_connections():
            if asyncio.get_running_loop().time() >= deadline or (hurry and hurry.is_set()):
                left = self._open_connections()
                log.warning("closing %d connection(s) still open", left)
                return
            await asyncio.sleep(0.05)  # shutdown only: no event per connection needed

    def _open_connections(self) -> int:
        listening = {c for front in self.frontends.values() for c in front.connections}
        placed = {c for backend in self.services.values() for c in backend.connections}
        return len(listening | placed)

    async def wake_all(self, reason: str) -> None:
        """Wake every sleeping container (shutdown.backends: wake)."""

        async def one(service: Backend) -> None:
            try:
                await asyncio.wait_for(service.wake(reason), service.cfg.wake_timeout)
            except (RuntimeFailure, TimeoutError) as exc:
                log.warning("%s: not woken on the way out: %s", service.name, exc)

        asleep = (State.PAUSED, State.STOPPED)
        await asyncio.gather(
            *(
                one(s)
                for s in self.services.values()
                if s.runtime.kind in ("docker", "swarm") and s.state in asleep
            )
        )

    async def _end(self, service: Backend) -> None:
        await service.close()
        if self.coordinator is not None:
            self.coordinator.remove(service)
        try:
            await service.runtime.close()
        except WakeproxyError as exc:
            log.warning("%s: %s", service.name, exc)

    def _wire(self) -> None:
        """Link dependencies, group members and replicas in the core (again after any
        change)."""
        if self.coordinator is not None:
            self.coordinator.relink()
            for front in self.frontends.values():
                if front.replicated:
                    self.coordinator.order_replicas([b.name for b in front.backends])

    def _backend(self, cfg: ServiceConfig) -> Backend:
        assert self.coordinator is not None
        folder = None if self.config.source is None else Path(self.config.source).parent
        runtime = make_runtime(cfg, self.docker.get, folder)
        initial, reason = runtime.initial_state()
        return Backend(
            cfg,
            runtime,
            self.coordinator,
            initial=initial,
            reason=reason,
            predictions=self.predictions,
            kernel=self.kernel,
        )

    async def close(self) -> None:
        """Close listeners and connections, end commands; containers stay as they are."""
        if self.predictions is not None:
            # First: no predicted wake while services close; the tables are saved.
            await self.predictions.close()
        if self._compose_task is not None:
            self._compose_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._compose_task
            self._compose_task = None
        for discovery in self.discoveries.values():
            await discovery.close()
        self.discoveries.clear()
        for front in self.frontends.values():
            front.close()
        for service in self.services.values():
            await service.close()
        await self.mcp_store.close()
        for service in self.services.values():
            try:
                await service.runtime.close()
            except WakeproxyError as exc:
                log.warning("%s: %s", service.name, exc)
        await self.docker.close()
        self.kernel.close()
