"""The Docker engine: one connection shared by every docker service, through aiodocker.

``DockerEngine`` holds one client, makes one bulk listing at start-up (never one inspect
per container) and follows one event stream, so a container paused, stopped, started or
removed by someone else is noticed and the service's state follows. The stream reconnects
with back-off; after a reconnect every container's state is re-read in one listing, since
events may have been missed. The runtimes it serves (runtimes/docker.py's containers,
runtimes/swarm.py's services) register as watchers.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, cast

import aiodocker
import aiohttp
import orjson

from ..config import LABEL_PREFIX
from ..config.model import LOCAL_ENGINE, EngineConfig
from ..core.states import State
from ..errors import BackendMissing, EngineUnavailable, OperationFailed


class ContainerWatcher(Protocol):
    """What the engine needs of a container's runtime (runtimes.docker): its name or id,
    and to be told what the engine saw happen to it."""

    @property
    def ref(self) -> str: ...

    def engine_event(self, action: str, state: State, reason: str) -> None:
        """An event for this container (``action``: pause, die, ...)."""

    def superseded(self) -> None:
        """A fresh reading of its state replaces whatever was pending."""

    def on_change(self, state: State, reason: str) -> None: ...


class SwarmWatcher(Protocol):
    """What the engine needs of a Swarm service's runtime (runtimes.swarm): its name,
    and to be told the service changed outside the proxy."""

    @property
    def service(self) -> str: ...

    def outside_change(self) -> None: ...


log = logging.getLogger("wakeproxy.runtime.docker")

# Docker's container states and what they mean for a service. ``restarting`` is the
# engine bringing it up by itself: treated as running (connections wait on the
# connect, not on us).
_STATUS: dict[str, State] = {
    "running": State.RUNNING,
    "paused": State.PAUSED,
    "restarting": State.RUNNING,
    "created": State.STOPPED,
    "exited": State.STOPPED,
    "dead": State.STOPPED,
    "removing": State.STOPPED,
}
# Engine events that change a container's state.
_EVENTS: dict[str, State] = {
    "pause": State.PAUSED,
    "unpause": State.RUNNING,
    "start": State.RUNNING,
    "die": State.STOPPED,
    "create": State.STOPPED,
    "destroy": State.FAILED,
}
_LABEL_ENABLE = LABEL_PREFIX + "enable"
_LISTED_FIELDS = ("Id", "Names", "State", "Labels", "HostConfig", "NetworkSettings")


def container_state(status: str) -> State:
    """What a container's status (running, paused, exited, ...) means for a service."""
    return _STATUS.get(status, State.STOPPED)


_ENGINE_DOWN_STATUS = 900  # aiodocker's status for "cannot connect"
# A named engine that drops packets (not refuses) must not hold the proxy for minutes:
# connecting is bounded; reads are not (the event stream stays open for ever).
_API_TIMEOUT = aiohttp.ClientTimeout(total=None, connect=5.0, sock_connect=5.0)
_RECONNECT_FIRST = 0.5
_RECONNECT_MAX = 10.0


def _tls_context(cfg: EngineConfig) -> ssl.SSLContext:
    """TLS with client certificates, as the docker CLI reads DOCKER_CERT_PATH."""
    assert cfg.cert_path is not None
    base = Path(cfg.cert_path)
    try:
        context = ssl.create_default_context(cafile=str(base / "ca.pem"))
        context.load_cert_chain(str(base / "cert.pem"), str(base / "key.pem"))
    except (OSError, ssl.SSLError) as exc:
        raise EngineUnavailable(f"engine {cfg.name}: its certificates in {base}: {exc}") from exc
    if not cfg.tls_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _clock_offset(system_time: str, now: float) -> float:
    """Seconds the engine's clock (its ``SystemTime``, RFC 3339) is ahead of ours; 0 if
    it cannot be read. Good to the API round trip, well inside the replay's margin."""
    try:
        return datetime.fromisoformat(system_time).timestamp() - now
    except ValueError:
        return 0.0


def address_of(info: dict[str, Any]) -> str | None:
    """A container's address from an inspect or a listing entry (both carry the same fields)."""
    if (info.get("HostConfig") or {}).get("NetworkMode") == "host":
        return "127.0.0.1"
    settings = info.get("NetworkSettings") or {}
    if settings.get("IPAddress"):
        return str(settings["IPAddress"])
    for network in (settings.get("Networks") or {}).values():
        if (network or {}).get("IPAddress"):
            return str(network["IPAddress"])
    return None


@contextlib.contextmanager
def map_docker_errors(what: str) -> Iterator[None]:
    """Turn aiodocker/aiohttp errors into wakeproxy's, with what was being done."""
    try:
        yield
    except aiodocker.DockerError as exc:
        if exc.status == 404:
            raise BackendMissing(f"{what}: {exc.message}") from exc
        if exc.status == _ENGINE_DOWN_STATUS:
            raise EngineUnavailable(f"{what}: the Docker engine does not answer") from exc
        raise OperationFailed(f"{what}: {exc.message}") from exc
    except (aiohttp.ClientError, OSError) as exc:
        raise EngineUnavailable(f"{what}: the Docker engine does not answer ({exc})") from exc


class _Subscriber(Protocol):
    async def get(self) -> dict[str, Any] | None: ...


class _EventStream(Protocol):
    def subscribe(self, **params: Any) -> _Subscriber: ...

    async def stop(self) -> None: ...


class DockerEngine:
    """One connection to the engine, shared by all docker runtimes."""

    def __init__(self, cfg: EngineConfig | None = None) -> None:
        # None: the local engine as DOCKER_HOST (or the default socket) names it.
        self.cfg = cfg
        self.name = cfg.name if cfg is not None else LOCAL_ENGINE
        self._client: aiodocker.Docker | None = None
        self._runtimes: dict[str, ContainerWatcher] = {}
        # Swarm services (a manager engine), by name; their replica counts and running
        # tasks from the last listing, and why it failed (not a manager, say).
        self._swarm: dict[str, SwarmWatcher] = {}
        # Service name -> (desired replicas, running tasks, their container ids).
        self.swarm_snapshot: dict[str, tuple[int | None, int, tuple[str, ...]]] = {}
        # Service name -> its labels (label discovery); empty where not a manager.
        self.swarm_labels: dict[str, dict[str, str]] = {}
        self.swarm_error: str | None = None
        # Monotonic time before which a non-manager is not asked for Swarm services again.
        self._not_manager_until = 0.0
        # Name or id -> (state, address) from the last listing.
        self._snapshot: dict[str, tuple[State, str | None]] = {}
        # Wall-clock time just before the last listing: the event stream replays from
        # here, so nothing that happens between the listing and the subscription is lost.
        self._snapshot_at = 0.0
        self._events_task: asyncio.Task[None] | None = None
        self.up = False
        # Why the last listing failed (None once one succeeded).
        self.error: str | None = None
        # Called when a container labelled wakeproxy.enable is created, removed or
        # renamed, a Swarm service is created, updated or removed, and after a reconnect
        # (events may have been missed): discovery's cue.
        self.on_labelled_change: Callable[[], None] | None = None
        # Likewise for a container of a docker compose service (compose replicas).
        self.on_compose_change: Callable[[], None] | None = None

    @property
    def remote(self) -> bool:
        """On another host (``tcp://``): its clock is not ours."""
        return self.cfg is not None and self.cfg.host.startswith("tcp://")

    @property
    def client(self) -> aiodocker.Docker:
        if self._client is None:
            cfg = self.cfg
            if cfg is None:
                # DOCKER_HOST (DOCKER_CERT_PATH, DOCKER_TLS_VERIFY) honoured by aiodocker.
                self._client = aiodocker.Docker()
            elif cfg.host.startswith("tcp://") and cfg.cert_path is not None:
                self._client = aiodocker.Docker(
                    url="https://" + cfg.host.removeprefix("tcp://"),
                    ssl_context=_tls_context(cfg),
                    timeout=_API_TIMEOUT,
                )
            elif cfg.host.startswith("tcp://"):
                # Plain HTTP, said so: not the local engine's DOCKER_TLS_VERIFY settings.
                self._client = aiodocker.Docker(
                    url="http://" + cfg.host.removeprefix("tcp://"),
                    connector=aiohttp.TCPConnector(ssl=False),
                    timeout=_API_TIMEOUT,
                )
            else:
                self._client = aiodocker.Docker(url=cfg.host, timeout=_API_TIMEOUT)
        return self._client

    def register(self, runtime: ContainerWatcher) -> None:
        self._runtimes[runtime.ref] = runtime

    def unregister(self, runtime: ContainerWatcher) -> None:
        if self._runtimes.get(runtime.ref) is runtime:
            del self._runtimes[runtime.ref]

    def register_swarm(self, runtime: SwarmWatcher) -> None:
        self._swarm[runtime.service] = runtime

    def unregister_swarm(self, runtime: SwarmWatcher) -> None:
        if self._swarm.get(runtime.service) is runtime:
            del self._swarm[runtime.service]

    async def refresh_all(self, *, swarm: bool, often: bool = False) -> list[dict[str, Any]]:
        """The containers' listing (returned) and, with ``swarm``, the Swarm services', at
        once: an engine that does not answer costs one timeout. ``often``: label
        discovery's re-read, which asks a non-manager for Swarm services once a minute."""
        if not swarm or (often and time.monotonic() < self._not_manager_until):
            return await self.refresh_snapshot()
        # Both finish before either's error is raised: the Swarm services read their
        # state (or the engine's error) from what both found.
        services, listing = await asyncio.gather(
            self.refresh_swarm(), self.refresh_snapshot(), return_exceptions=True
        )
        for outcome in (listing, services):
            if isinstance(outcome, BaseException):
                raise outcome
        assert isinstance(listing, list)
        return listing

    async def refresh_swarm(self) -> None:
        """Every Swarm service's replica count and running tasks, in two calls (start-up,
        reconnects). A failure is kept for the swarm services (this engine may not be a
        manager); the containers' listing does not depend on it."""
        try:
            with map_docker_errors("listing Swarm services"):
                services = await self.client.services.list()
                tasks = await self.client.tasks.list(filters={"desired-state": "running"})
        except (EngineUnavailable, OperationFailed) as exc:
            self.swarm_error = str(exc)
            if "not a swarm manager" in str(exc):
                self.swarm_labels = {}
                self._not_manager_until = time.monotonic() + 60.0
            # Else (no leader for a moment, a timeout): the last labels stand, so label
            # discovery does not take a failed listing for services that went away.
            return
        running: collections.defaultdict[str, list[str]] = collections.defaultdict(list)
        for t in tasks:
            status = t.get("Status") or {}
            if status.get("State") == "running":
                cid = str((status.get("ContainerStatus") or {}).get("ContainerID", ""))
                running[str(t.get("ServiceID"))].append(cid)
        snapshot: dict[str, tuple[int | None, int, tuple[str, ...]]] = {}
        labels: dict[str, dict[str, str]] = {}
        for service in services:
            spec = service.get("Spec") or {}
            labels[str(spec.get("Name"))] = dict(spec.get("Labels") or {})
            replicated = (spec.get("Mode") or {}).get("Replicated")
            count = None if replicated is None else int(replicated.get("Replicas", 0))
            ids = tuple(running[str(service.get("ID"))])
            snapshot[str(spec.get("Name"))] = (count, len(ids), ids)
        self.swarm_snapshot = snapshot
        self.swarm_labels = labels
        self.swarm_error = None

    async def refresh_snapshot(self) -> list[dict[str, Any]]:
        """Read every container's state in one call (start-up, reconnects, discovery).

        Returns the listing itself: it also carries each container's labels.
        """
        listed_at = time.time() - 1.0  # the engine's clock granularity, with margin
        try:
            with map_docker_errors("listing containers"):
                if self.remote:
                    # The replay starts at the engine's time, not ours: a host whose clock
                    # is behind would otherwise lose the events between listing and
                    # subscription.
                    listed, info = await asyncio.gather(
                        self.client.containers.list(all=True), self.client.system.info()
                    )
                    listed_at += _clock_offset(str(info.get("SystemTime", "")), time.time())
                else:
                    listed = await self.client.containers.list(all=True)
            # The fields a listing entry carries that the proxy reads (state, names,
            # labels, network addresses), through the container's public mapping.
            containers = [{k: c[k] for k in _LISTED_FIELDS if k in c} for c in listed]
        except EngineUnavailable as exc:
            self.error = str(exc)
            raise
        self.error = None
        snapshot: dict[str, tuple[State, str | None]] = {}
        for container in containers:
            entry = (container_state(str(container["State"])), address_of(container))
            snapshot[str(container["Id"])] = entry
            for name in container.get("Names") or ():
                snapshot[str(name).lstrip("/")] = entry
        self._snapshot = snapshot
        self._snapshot_at = listed_at
        self.up = True
        return list(containers)

    def _snapshot_entry(self, ref: str) -> tuple[State, str | None] | None:
        entry = self._snapshot.get(ref)
        if entry is not None:
            return entry
        matches = [e for key, e in self._snapshot.items() if len(ref) >= 12 and key.startswith(ref)]
        return matches[0] if len(matches) == 1 else None

    def snapshot_state(self, ref: str) -> State | None:
        entry = self._snapshot_entry(ref)
        return entry[0] if entry is not None else None

    def snapshot_address(self, ref: str) -> str | None:
        entry = self._snapshot_entry(ref)
        return entry[1] if entry is not None else None

    def start_events(self) -> None:
        if self._events_task is None:
            self._events_task = asyncio.create_task(self._follow_events(), name="docker-events")

    async def _follow_events(self) -> None:
        delay = _RECONNECT_FIRST
        first = True
        while True:
            try:
                if not first:
                    self._not_manager_until = 0.0  # it may have joined a swarm meanwhile
                    await self.refresh_snapshot()
                    self._reconcile("re-read after the engine came back")
                    for swarm in list(self._swarm.values()):
                        swarm.outside_change()
                    if self.on_labelled_change is not None:
                        self.on_labelled_change()
                    if self.on_compose_change is not None:
                        self.on_compose_change()
                first = False
                await self._read_events()
                log.warning("the Docker event stream ended; reconnecting")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self.up:
                    log.warning("lost the Docker engine: %s; retrying with back-off", exc)
                self.up = False
                await asyncio.sleep(delay)
                delay = min(delay * 2, _RECONNECT_MAX)
                continue
            delay = _RECONNECT_FIRST

    async def _read_events(self) -> None:
        # aiodocker's events API is untyped: this names the part we use.
        events = cast(_EventStream, self.client.events)
        subscriber = events.subscribe(
            since=f"{self._snapshot_at:.6f}",
            filters=orjson.dumps({"type": ["container", "service"]}).decode(),
        )
        try:
            # None: the stream ended (the engine went away, or closed it).
            while (event := await subscriber.get()) is not None:
                self._dispatch(event)
        finally:
            # The stream's own task ends with the engine's error, if any: the reconnect
            # (a fresh listing first) says what the engine's state is.
            with contextlib.suppress(Exception):
                await events.stop()

    def _dispatch(self, event: dict[str, Any]) -> None:
        action = str(event.get("Action") or event.get("status") or "")
        actor = event.get("Actor") or {}
        attributes = actor.get("Attributes") or {}
        if event.get("Type") == "service":
            swarm = self._swarm.get(str(attributes.get("name", "")))
            if swarm is not None and action in ("update", "remove"):
                swarm.outside_change()
            # A service event names the service, not its labels: any may be labelled.
            if action in ("create", "update", "remove") and self.on_labelled_change is not None:
                self.on_labelled_change()
            return
        if (
            action in ("create", "destroy", "rename")
            and _LABEL_ENABLE in attributes
            and self.on_labelled_change is not None
        ):
            self.on_labelled_change()
        if (
            action in ("create", "destroy", "rename")
            and "com.docker.compose.service" in attributes
            and self.on_compose_change is not None
        ):
            self.on_compose_change()
        state = _EVENTS.get(action)
        if state is None:
            return
        name = str(attributes.get("name", ""))
        cid = str(actor.get("ID") or event.get("id") or "")
        runtime = self._runtimes.get(name) or self._runtimes.get(cid)
        if runtime is None:
            runtime = next((r for ref, r in self._runtimes.items() if cid.startswith(ref)), None)
        if runtime is None:
            return
        reason = "container removed" if action == "destroy" else f"docker {action} seen"
        runtime.engine_event(action, state, reason)

    def _reconcile(self, reason: str) -> None:
        for ref, runtime in self._runtimes.items():
            state = self.snapshot_state(ref)
            runtime.superseded()
            runtime.on_change(state or State.FAILED, reason if state else "container not found")

    async def close(self) -> None:
        if self._events_task is not None:
            self._events_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._events_task
            self._events_task = None
        if self._client is not None:
            await self._client.close()
            self._client = None
