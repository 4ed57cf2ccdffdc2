"""The docker runtime: containers on the local engine, through aiodocker.

``DockerEngine`` is shared by every docker service: one client, one bulk listing at
start-up (never one inspect per container) and one event stream, so a container
paused, stopped, started or removed by someone else is noticed and the service's
state follows. The stream reconnects with back-off; after a reconnect every
container's state is re-read in one listing, since events may have been missed.

``DockerRuntime`` controls one container, named by name or id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import ssl
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol, cast

import aiodocker
import aiohttp
import orjson

from ..config import LABEL_PREFIX
from ..config.model import LOCAL_ENGINE, EngineConfig
from ..core.states import State
from ..errors import BackendMissing, EngineUnavailable, OperationFailed, RuntimeFailure
from ..host.memory import Cgroup, cgroup_of, frozen, runs_in
from .base import Runtime


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
# The engine event each of our own operations causes: its echo, not someone else's change.
_ECHO = {"pause": "pause", "unpause": "unpause", "start": "start", "stop": "die"}
_ENGINE_DOWN_STATUS = 900  # aiodocker's status for "cannot connect"
# dockerd sets a container's paused flag twice: when its pause (unpause) call returns,
# and again when containerd's paused (resumed) event reaches it. A pause and an unpause a
# few ms apart let the late event flip the flag back: it says running while the cgroup
# is frozen (an unpause is refused "not paused"), or paused while it runs (a pause is
# refused "already paused"), until the other late event puts it right. Measured here
# (Docker 20.10, 200 rounds of pause, unpause, pause, unpause back to back): 4 of 400
# pauses came with a second pause and unpause event. Waits before each new try, ~0.8 s
# in all; the kernel's freezer decides who is right.
_FLAG_LAG_DELAYS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
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


# Refusals for the paused flag, not the container's state (restarting, not running):
# dockerd's own (409 "already paused"; "is not paused", a 500 in Docker 20.10), and
# containerd's when dockerd's flag let the call through to a task already so.
_FLAG_REFUSALS = (
    "is already paused",
    "is not paused",
    "cannot pause a paused container",
    "cannot resume a running process",
)


def _flag_refusal(exc: OperationFailed) -> bool:
    cause = exc.__cause__
    return isinstance(cause, aiodocker.DockerError) and any(
        text in str(cause.message) for text in _FLAG_REFUSALS
    )


async def set_paused(
    container: aiodocker.docker.DockerContainer,
    freeze: bool,
    what: str,
    *,
    local: bool,
    own: Callable[[str], contextlib.AbstractAsyncContextManager[None]] | None = None,
) -> None:
    """Pause (``freeze``) or unpause a container; ``what`` names it in errors, ``local``:
    the engine runs on this host (its cgroups can be read here), ``own`` wraps each
    call (the runtime's echo bookkeeping). A refusal for the paused flag ("already
    paused", "not paused") is checked against the kernel's freezer: frozen (or
    thawed) as wanted, someone else did it, which is what we wanted; not, the flag
    lags (see _FLAG_LAG_DELAYS) and the call is made again. Where the freezer cannot
    be read, the engine's flag is taken."""
    operation, verb = ("pause", "pausing") if freeze else ("unpause", "unpausing")
    wanted = "paused" if freeze else "running"
    for delay in (*_FLAG_LAG_DELAYS, None):
        try:
            async with own(operation) if own is not None else contextlib.nullcontext():
                with map_docker_errors(f"{verb} {what}"):
                    await (container.pause() if freeze else container.unpause())
            return
        except OperationFailed as exc:
            if not _flag_refusal(exc):
                raise
            status, kernel_frozen = await flag_and_freezer(container, what, local=local)
            if status not in ("running", "paused"):
                raise  # exited, restarting, being removed: the refusal stands
            if kernel_frozen is freeze or (kernel_frozen is None and status == wanted):
                return
            if delay is None:
                kernel = {True: "frozen", False: "thawed", None: "unknown"}[kernel_frozen]
                raise OperationFailed(
                    f"{exc}; the engine's paused flag did not settle within "
                    f"{sum(_FLAG_LAG_DELAYS):.1f} s (it says {status}, the kernel {kernel})"
                ) from exc
            log.debug("%s %s: the engine's paused flag lags the kernel", verb, what)
        await asyncio.sleep(delay)


async def flag_and_freezer(
    container: aiodocker.docker.DockerContainer, what: str, *, local: bool
) -> tuple[str, bool | None]:
    """A container's status as the engine says ("running", "paused", "exited", ...)
    and, where this process can see its cgroup, whether the kernel holds it frozen."""
    with map_docker_errors(f"inspecting {what}"):
        info = await container.show()
    status = str(info["State"]["Status"])
    pid = int(info["State"].get("Pid") or 0)
    return status, frozen(pid, str(info["Id"])) if pid and local else None


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
        self._runtimes: dict[str, DockerRuntime] = {}
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

    def register(self, runtime: DockerRuntime) -> None:
        self._runtimes[runtime.ref] = runtime

    def unregister(self, runtime: DockerRuntime) -> None:
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
            entry = (_STATUS.get(str(container["State"]), State.STOPPED), address_of(container))
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


class DockerRuntime(Runtime):
    """One container, by name or id. Operations are Engine API calls (~10 ms each here)."""

    kind = "docker"

    def __init__(self, engine: DockerEngine, ref: str, *, stop_timeout: float = 10.0) -> None:
        super().__init__()
        self.engine = engine
        self.ref = ref
        self.stop_timeout = stop_timeout
        # Engine events our own operations will cause, not yet seen: echoes to ignore.
        # Counted, not timed: the engine's clock may not be ours (a remote engine).
        self._echoes: collections.Counter[str] = collections.Counter()
        self._confirming: set[asyncio.Task[None]] = set()
        # Counts what supersedes a pending _confirm: every engine event for it (echoes
        # too), our own operations, fresh readings of its state.
        self._news = 0
        engine.register(self)

    def _container(self) -> aiodocker.docker.DockerContainer:
        return self.engine.client.containers.container(self.ref)

    @contextlib.asynccontextmanager
    async def _own(self, operation: str) -> AsyncIterator[None]:
        """Run one of our operations; its engine event is then an echo, not news."""
        echo = _ECHO[operation]
        self._echoes[echo] += 1
        self._news += 1
        try:
            yield
        except BaseException:
            self._forget_echo(echo)  # it failed: the engine reports nothing
            raise
        finally:
            self._news += 1

    def _forget_echo(self, echo: str) -> None:
        if self._echoes[echo] > 0:
            self._echoes[echo] -= 1

    def superseded(self) -> None:
        """A newer word on its state than any event still being confirmed."""
        self._news += 1

    def engine_event(self, action: str, state: State, reason: str) -> None:
        self._news += 1
        if self._echoes[action] > 0:
            self._echoes[action] -= 1
            return
        if action == "unpause":
            # Believed once the kernel agrees: a late flip of the engine's flag (see
            # _FLAG_LAG_DELAYS) reads the same, and taken for news it would have the
            # proxy forward connections to a frozen backend. A "pause" is believed at
            # once: wrongly believed, it costs one unpause that set_paused finds done,
            # and deferred, it would come after the events behind it (a replay after
            # start-up: create, start, pause).
            confirm = self._confirm(state, reason, self._news)
            task = asyncio.get_running_loop().create_task(confirm)
            self._confirming.add(task)
            task.add_done_callback(self._confirming.discard)
            return
        self.on_change(state, reason)

    async def _confirm(self, state: State, reason: str, seen: int) -> None:
        """Report an event's state if the kernel agrees and no newer event came
        (``seen``: the count at this one)."""
        try:
            _, kernel_frozen = await flag_and_freezer(
                self._container(), f"container {self.ref}", local=not self.engine.remote
            )
        except BackendMissing:
            return  # removed: its destroy event tells
        except RuntimeFailure:
            kernel_frozen = None  # cannot check: as the engine said
        except Exception:
            log.exception("%s: reading its state after a %s event", self.ref, state.value)
            kernel_frozen = None
        if self._news != seen:
            return  # a newer event came meanwhile: it decides
        if kernel_frozen is None or kernel_frozen is (state is State.PAUSED):
            self.on_change(state, reason)
        else:
            log.debug("%s: %s event, but the kernel says otherwise: ignored", self.ref, reason)

    def initial_state(self) -> tuple[State, str]:
        """From the engine's bulk listing (never one inspect per container)."""
        if self.engine.error is not None:
            return State.FAILED, self.engine.error
        state = self.engine.snapshot_state(self.ref)
        if state is None:
            return State.FAILED, f"container {self.ref} not found"
        return state, "found at start-up"

    async def inspect(self) -> State:
        """The engine's state, its paused flag checked against the kernel's freezer
        where that can be read (see _FLAG_LAG_DELAYS)."""
        self._news += 1
        status, kernel_frozen = await flag_and_freezer(
            self._container(), f"container {self.ref}", local=not self.engine.remote
        )
        if status in ("running", "paused") and kernel_frozen is not None:
            return State.PAUSED if kernel_frozen else State.RUNNING
        return _STATUS.get(status, State.STOPPED)

    async def pause(self) -> None:
        await self._set_paused(True)

    async def unpause(self) -> None:
        await self._set_paused(False)

    async def _set_paused(self, freeze: bool) -> None:
        what, local = f"container {self.ref}", not self.engine.remote
        await set_paused(self._container(), freeze, what, local=local, own=self._own)

    async def start(self) -> None:
        async with self._own("start"):
            with map_docker_errors(f"starting container {self.ref}"):
                await self._container().start()

    async def stop(self) -> None:
        async with self._own("stop"):
            with map_docker_errors(f"stopping container {self.ref}"):
                await self._container().stop(t=int(self.stop_timeout))

    async def _main_pid(self) -> int:
        """The container's main process as this host numbers it, or 0: the engine's pid
        of a remote engine, or of one in another pid namespace, names another process
        here (if any), never to be paged out or read as the container's."""
        with map_docker_errors(f"inspecting container {self.ref}"):
            info = await self._container().show()
        pid = int(info["State"].get("Pid") or 0)
        if not pid or self.engine.remote or not runs_in(pid, str(info["Id"])):
            return 0
        return pid

    async def memory_cgroup(self) -> Cgroup | None:
        # Found through its main process, as the kernel places it (cgroupfs or systemd
        # driver alike); needs the host's pid namespace and cgroup mount when the proxy
        # itself runs in a container.
        pid = await self._main_pid()
        return cgroup_of(pid) if pid else None

    async def pids(self) -> list[int]:
        cgroup = await self.memory_cgroup()
        if cgroup is not None and (found := cgroup.pids()):
            return found
        pid = await self._main_pid()
        return [pid] if pid else []

    async def backend_host(self) -> str:
        """The container's address on its network (seed form: proxy and backend apart)."""
        with map_docker_errors(f"reading the address of container {self.ref}"):
            info = await self._container().show()
        address = address_of(info)
        if address is None:
            raise OperationFailed(f"container {self.ref} has no network address")
        return address

    def known_backend_host(self) -> str | None:
        # From the start-up listing: no inspect per container at start-up.
        return self.engine.snapshot_address(self.ref)

    async def close(self) -> None:
        # The container stays as it is; only its events stop coming here.
        self.engine.unregister(self)
        for task in self._confirming:
            task.cancel()
        await asyncio.gather(*self._confirming, return_exceptions=True)

    def describe(self) -> str:
        return f"docker {self.ref}"
