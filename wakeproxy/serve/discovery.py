"""Label discovery: containers and Swarm services labelled ``wakeproxy.enable=true``
become services, on every engine the proxy talks to (one discovery per engine).

Off unless ``discovery.docker_labels`` is set: whoever can create containers could
otherwise open listeners on the proxy, and ``discovery.allowed_listen`` bounds what a
label may ask for. Labels take the YAML's keys and pass the same checks; a bad label
fails that one service (listed by the API with the reason) and the others run.

The engine's event stream is the fast path: a labelled container created, renamed or
removed, or any Swarm service created, updated or removed (a service event does not
carry its labels), cues a re-read. Every re-read is one container listing (and, on a
Swarm manager, one service listing) compared with what runs: new services start,
services whose labels changed are replaced, services whose container is gone stop
listening. A periodic re-read is the safety net for missed events. YAML wins where both
name the same service (or the same container); a name or address another engine's
discovery already serves is refused here.

A Swarm service's labels are its own (``deploy.labels`` in a stack file), not its task
containers': a task container labelled ``wakeproxy.enable`` is skipped, saying where
the labels belong (each task would otherwise become a service of its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from ..config import (
    COMPOSE_DEPENDS_ON_LABEL,
    LABEL_PREFIX,
    SWARM_SERVICE_LABEL,
    Address,
    DiscoveryConfig,
    ServiceConfig,
    dependency_faults,
    label_enabled,
    label_service_name,
    service_from_labels,
)
from ..config.model import LOCAL_ENGINE
from ..errors import ConfigError, EngineUnavailable

if TYPE_CHECKING:
    from ..config import Config, SleepPolicy
    from ..runtimes.engine import DockerEngine
    from .backend import Backend

log = logging.getLogger("wakeproxy.discovery")

# What a discovered service was built from: its container (or Swarm service), its labels
# and the dependencies they resolved to. A change in any of these replaces the service; a
# live change through the API (policy, timeouts) does not count as one.
_Origin = tuple[str, tuple[tuple[str, str], ...], tuple[str, ...]]
# A labelled container or Swarm service: its name, whether a Swarm service, its labels.
_Labelled = tuple[str, bool, Mapping[str, str]]


def _subject(cfg: ServiceConfig) -> str:
    """What a discovered service stands for, as messages name it."""
    if cfg.swarm_service is not None:
        return f"Swarm service {cfg.swarm_service}"
    return f"container {cfg.container}"


def _origin(labels: Mapping[str, str], cfg: ServiceConfig) -> _Origin:
    own = sorted(
        (k, v)
        for k, v in labels.items()
        if k.startswith(LABEL_PREFIX) or k == COMPOSE_DEPENDS_ON_LABEL
    )
    return _subject(cfg), tuple(own), cfg.depends_on


class Served(Protocol):
    """What discovery changes in the running proxy: it adds and removes services the way a
    reload does, and reads the rest (the proxy assembles discovery, not the reverse)."""

    @property
    def config(self) -> Config: ...

    @property
    def services(self) -> Mapping[str, Backend]: ...

    @property
    def policies(self) -> Mapping[str, SleepPolicy]: ...

    async def add_services(
        self, configs: list[ServiceConfig], services: Mapping[str, ServiceConfig] | None = None
    ) -> dict[str, str]: ...

    async def remove_service(self, name: str) -> None: ...


class LabelDiscovery:
    def __init__(self, proxy: Served, cfg: DiscoveryConfig, engine: DockerEngine) -> None:
        self.proxy = proxy
        self.cfg = cfg
        self.engine = engine
        # Labelled containers that could not become services: service name -> why.
        self.rejected: dict[str, str] = {}
        self._origins: dict[str, _Origin] = {}
        self._skipped: set[str] = set()  # named by the YAML too, or a task: logged once
        self._cue = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        engine.on_labelled_change = self._cue.set

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._follow(), name="label-discovery")

    async def close(self) -> None:
        self.engine.on_labelled_change = None
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def poke(self) -> None:
        """Re-read the labelled containers soon (after a reload: the file may now win)."""
        self._cue.set()

    async def _follow(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.cfg.interval):
                    await self._cue.wait()
            self._cue.clear()
            try:
                await self.reconcile()
            except EngineUnavailable as exc:
                # What runs keeps running; the engine's reconnect cues the next re-read.
                log.warning("label discovery: %s", exc)
            except Exception:
                log.exception("label discovery failed; retrying at the next re-read")

    def _mine(self, cfg: ServiceConfig) -> bool:
        return cfg.source == "labels" and cfg.engine == self.engine.name

    async def reconcile(self) -> None:
        """Re-read the labelled containers and services and make the running ones match."""
        await self.apply(await self.engine.refresh_all(swarm=True, often=True))

    async def apply(self, containers: list[dict[str, Any]]) -> None:
        """Make the discovered services match ``containers`` (one engine listing) and the
        engine's last listing of Swarm services."""
        wanted, labels_of, rejected = self._wanted(containers)
        proxy = self.proxy
        for gone in [n for n in self._origins if n not in proxy.services]:
            del self._origins[gone]  # replaced by the file's service of that name
        for name in [n for n, s in proxy.services.items() if self._mine(s.cfg)]:
            cfg = wanted.get(name)
            origin = _origin(labels_of[name], cfg) if cfg else None
            if origin == self._origins.get(name):
                continue
            why = (
                f"{_subject(proxy.services[name].cfg)} is gone"
                if cfg is None
                else "its labels changed"
            )
            log.info("%s: %s; closing its listener", name, why, extra={"service": name})
            self._origins.pop(name, None)
            await proxy.remove_service(name)
        new = [cfg for name, cfg in wanted.items() if name not in proxy.services]
        failed = await proxy.add_services(new)
        for cfg in new:
            if cfg.name in failed:
                rejected[cfg.name] = failed[cfg.name]
                continue
            self._origins[cfg.name] = _origin(labels_of[cfg.name], cfg)
            log.info(
                "%s: discovered from %s, listening on %s",
                cfg.name,
                _subject(cfg),
                cfg.listen,
                extra={"service": cfg.name},
            )
            # Events between the listing and the registration went nowhere: re-read.
            proxy.services[cfg.name].recheck()
        for name, why in rejected.items():
            if self.rejected.get(name) != why:
                log.error("%s: not served: %s", name, why, extra={"service": name})
        self.rejected = rejected

    def _labelled(self, containers: list[dict[str, Any]]) -> list[_Labelled]:
        """(container or Swarm service name, is a Swarm service, labels) of each one
        labelled wakeproxy.enable."""
        labelled: list[_Labelled] = []
        present = {str(n).lstrip("/") for e in containers for n in e.get("Names") or ()}
        self._skipped &= present | self.engine.swarm_labels.keys()  # task names come and go
        for entry in containers:
            labels = entry.get("Labels") or {}
            if not label_enabled(labels):
                continue
            names = entry.get("Names") or ()
            container = str(names[0]).lstrip("/") if names else str(entry["Id"])[:12]
            task_of = labels.get(SWARM_SERVICE_LABEL)
            if task_of is not None:
                if container not in self._skipped:
                    log.warning(
                        "container %s: a task of Swarm service %s; wakeproxy.* labels belong "
                        "on the service (deploy.labels in a stack file), not its containers",
                        container,
                        task_of,
                    )
                    self._skipped.add(container)
                continue
            labelled.append((container, False, labels))
        for service, labels in sorted(self.engine.swarm_labels.items()):
            if label_enabled(labels):
                labelled.append((service, True, labels))
        return labelled

    def _wanted(
        self, containers: list[dict[str, Any]]
    ) -> tuple[dict[str, ServiceConfig], dict[str, Mapping[str, str]], dict[str, str]]:
        """The services the labels ask for, their labels, and the refused ones with why."""
        proxy = self.proxy
        configured = {n: s.cfg for n, s in proxy.services.items() if s.cfg.source == "config"}
        # Another engine's discoveries: theirs as long as they run.
        others = {
            n: s.cfg
            for n, s in proxy.services.items()
            if s.cfg.source == "labels" and not self._mine(s.cfg)
        }
        controlled = {
            (cfg.swarm_service is not None, cfg.swarm_service or cfg.container): name
            for name, cfg in configured.items()
            if cfg.engine == self.engine.name and (cfg.container or cfg.swarm_service)
        }
        labelled = self._labelled(containers)
        managed = (
            set(configured) | set(others) | {label_service_name(c, lb) for c, _, lb in labelled}
        )
        engine = None if self.engine.name == LOCAL_ENGINE else self.engine.name

        wanted: dict[str, ServiceConfig] = {}
        labels_of: dict[str, Mapping[str, str]] = {}
        rejected: dict[str, str] = {}
        for container, swarm, labels in labelled:
            name = label_service_name(container, labels)
            subject = f"Swarm service {container}" if swarm else f"container {container}"
            owner = name if name in configured else controlled.get((swarm, container))
            if owner is not None:
                if container not in self._skipped:
                    log.info("%s: labelled, but the config file's service %s wins", subject, owner)
                    self._skipped.add(container)
                continue
            if name in others:
                rejected[name] = (
                    f"{subject} asks for the name {name!r}, already served from "
                    f"{_subject(others[name])} on engine {others[name].engine}"
                )
                continue
            if name in wanted or name in rejected:
                other = _subject(wanted.pop(name)) if name in wanted else "another one"
                rejected[name] = f"{other} and {subject} both ask for the name {name!r}"
                continue
            try:
                wanted[name] = service_from_labels(
                    container,
                    labels,
                    policies=proxy.policies,
                    allowed_listen=self.cfg.allowed_listen,
                    managed=managed,
                    swarm=swarm,
                    engine=engine,
                )
                labels_of[name] = labels
            except ConfigError as exc:
                rejected[name] = "; ".join(exc.problems)

        taken: dict[Address, str] = {proxy.config.admin.listen: "the admin API"}
        taken.update({cfg.listen: f"service {name}" for name, cfg in configured.items()})
        taken.update({cfg.listen: f"service {name}" for name, cfg in others.items()})
        for name, cfg in sorted(wanted.items()):
            owner = taken.get(cfg.listen)
            if owner is not None:
                rejected[name] = f"{_subject(cfg)}: {cfg.listen} is already used by {owner}"
                del wanted[name]
            else:
                taken[cfg.listen] = f"service {name}"

        # Drop services whose dependencies are missing or circular until none are left.
        while faults := [
            (name, why)
            for name, why in dependency_faults({**configured, **others, **wanted})
            if name in wanted
        ]:
            for name, why in faults:
                if name in wanted:
                    rejected[name] = f"{_subject(wanted.pop(name))}: {why}"
        return wanted, labels_of, rejected
