"""Label discovery: containers and Swarm services labelled ``wakeproxy.enable=true``
become services, on every engine the proxy talks to (one discovery per engine).

Off unless ``discovery.docker_labels`` is set: whoever can create containers could
otherwise open listeners on the proxy, and ``discovery.allowed_listen`` bounds what a
label may ask for. Labels take the YAML's keys and pass the same checks; a bad label
fails that one service (listed by the API with the reason) and the others run.

The engine's event stream is the fast path: a labelled container created, renamed or
removed, or any Swarm service created, updated or removed (a service event does not
carry its labels), cues a re-read. Every re-read is one container listing (and, on a
Swarm manager, one service listing) applied through the proxy's one reconciler (the
same as a reload's): new services start, services whose labels changed are updated in
place where a running one can take the change and replaced otherwise, services whose
container is gone stop listening. A periodic re-read is the safety net for missed
events. YAML wins where both name the same service (or the same container); a name or
address another engine's discovery already serves is refused here.

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
    from ..config.live import Applied
    from ..runtimes.engine import DockerEngine
    from .backend import Backend

log = logging.getLogger("wakeproxy.discovery")

# A labelled container or Swarm service: its name, whether a Swarm service, its labels.
_Labelled = tuple[str, bool, Mapping[str, str]]


def _subject(cfg: ServiceConfig) -> str:
    """What a discovered service stands for, as messages name it."""
    if cfg.swarm_service is not None:
        return f"Swarm service {cfg.swarm_service}"
    return f"container {cfg.container}"


class Served(Protocol):
    """What discovery changes in the running proxy: it applies the services its labels ask
    for through the proxy's reconciler, as a reload applies the file's, and reads the rest
    (the proxy assembles discovery, not the reverse)."""

    @property
    def config(self) -> Config: ...

    @property
    def services(self) -> Mapping[str, Backend]: ...

    @property
    def policies(self) -> Mapping[str, SleepPolicy]: ...

    async def apply(
        self,
        source: str,
        wanted: Mapping[str, ServiceConfig],
        *,
        services: Mapping[str, ServiceConfig] | None = None,
        listed: bool = False,
    ) -> Applied: ...


class LabelDiscovery:
    def __init__(self, proxy: Served, cfg: DiscoveryConfig, engine: DockerEngine) -> None:
        self.proxy = proxy
        self.cfg = cfg
        self.engine = engine
        # Labelled containers that could not become services: service name -> why.
        self.rejected: dict[str, str] = {}
        # What it serves (as last applied), to name what went.
        self._served: dict[str, ServiceConfig] = {}
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
        engine's last listing of Swarm services, through the proxy's one reconciler: a
        service whose labels changed only in keys a running one takes is updated in
        place, any other change replaces it."""
        wanted, rejected = self._wanted(containers)
        result = await self.proxy.apply(f"labels:{self.engine.name}", wanted, listed=True)
        for name in result.removed:
            gone = self._served.get(name)
            what = _subject(gone) if gone is not None else "its container"
            log.info("%s: %s is gone; closing its listener", name, what, extra={"service": name})
        for name in result.replaced:
            log.info("%s: its labels changed; listening anew", name, extra={"service": name})
        for name in result.updated:
            log.info(
                "%s: its labels (or a policy they name) changed; updated in place",
                name,
                extra={"service": name},
            )
        for name in result.added:
            if name in result.failed:
                continue
            cfg = wanted[name]
            log.info(
                "%s: discovered from %s, listening on %s",
                name,
                _subject(cfg),
                cfg.listen,
                extra={"service": name},
            )
        rejected.update(result.failed)
        self._served = {n: c for n, c in wanted.items() if n not in result.failed}
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
    ) -> tuple[dict[str, ServiceConfig], dict[str, str]]:
        """The services the labels ask for, and the refused ones with why."""
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
        return wanted, rejected
