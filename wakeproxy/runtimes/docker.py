"""The docker runtime: one container, named by name or id, on a Docker engine.

Its operations are Engine API calls through the shared ``DockerEngine``
(runtimes/engine.py), which also tells it what the engine saw happen to the container;
a pause or unpause refused for the engine's paused flag is checked against the kernel's
freezer (``set_paused``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import AsyncIterator, Callable

import aiodocker

from ..core.states import State
from ..errors import BackendMissing, OperationFailed, RuntimeFailure
from ..host.memory import Cgroup, cgroup_of, frozen, runs_in
from .base import Runtime
from .engine import DockerEngine, address_of, container_state, map_docker_errors

log = logging.getLogger("wakeproxy.runtime.docker")

# The engine event each of our own operations causes: its echo, not someone else's change.
_ECHO = {"pause": "pause", "unpause": "unpause", "start": "start", "stop": "die"}
# dockerd sets a container's paused flag twice: when its pause (unpause) call returns,
# and again when containerd's paused (resumed) event reaches it. A pause and an unpause a
# few ms apart let the late event flip the flag back: it says running while the cgroup
# is frozen (an unpause is refused "not paused"), or paused while it runs (a pause is
# refused "already paused"), until the other late event puts it right. Measured here
# (Docker 20.10, 200 rounds of pause, unpause, pause, unpause back to back): 4 of 400
# pauses came with a second pause and unpause event. Waits before each new try, ~0.8 s
# in all; the kernel's freezer decides who is right.
_FLAG_LAG_DELAYS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)


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
        return container_state(status)

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
