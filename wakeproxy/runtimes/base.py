"""The one small interface every runtime implements (docker, process, fake).

A runtime moves one backend between running, paused and stopped, and reports
changes it did not make itself (a container paused by hand, a command that
crashed) through ``on_change``. Failures raise ``RuntimeFailure`` subclasses.
"""

from __future__ import annotations

import abc
from collections.abc import Callable

from ..core.states import State
from ..host.memory import Cgroup

ChangeCallback = Callable[[State, str], None]


def _ignore_change(state: State, reason: str) -> None:
    return None


class Runtime(abc.ABC):
    """Controls one backend. States reported are RUNNING, PAUSED, STOPPED or FAILED."""

    kind: str = "abstract"

    def __init__(self) -> None:
        # Set by the service that owns this runtime; called for changes seen from outside.
        self.on_change: ChangeCallback = _ignore_change
        # Why memory_cgroup() finds none, where the runtime knows (said when hibernating).
        self.cgroup_problem = ""
        # How the backend last ended on its own, where the runtime knows ("exited with
        # status 3"): said when it stops while starting.
        self.exit_reason = ""

    @abc.abstractmethod
    async def inspect(self) -> State:
        """The backend's current state, read from the source of truth."""

    @abc.abstractmethod
    async def pause(self) -> None: ...

    @abc.abstractmethod
    async def unpause(self) -> None: ...

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def stop(self) -> None: ...

    def initial_state(self) -> tuple[State, str]:
        """The state to start from, and why: the proxy reads it before it listens."""
        # Commands belong to the proxy: none runs before it starts them.
        return State.STOPPED, "not started yet"

    def known_backend_host(self) -> str | None:
        """The backend's address if already known without asking (start-up), else None."""
        return None

    async def backend_host(self) -> str | None:
        """The backend's address when the config leaves it to the runtime (seed form)."""
        return None

    async def memory_cgroup(self) -> Cgroup | None:
        """The backend's own memory cgroup, where one can be found (hibernation)."""
        return None

    def note_listeners(self, port: int) -> None:
        """Before a start: remember who already listens on ``port`` (not the backend)."""
        return None

    async def foreign_listener(self, port: int) -> str | None:
        """Why the listener on ``port`` is not this backend's, or None: it is, or the
        runtime cannot tell (readiness then trusts the connect)."""
        return None

    async def pids(self) -> list[int]:
        """The backend's processes (prefetch after a wake, and RSS when no cgroup)."""
        return []

    async def close(self) -> None:
        """Release what the runtime holds; the process runtime ends its command here."""
        return None

    def describe(self) -> str:
        return self.kind
