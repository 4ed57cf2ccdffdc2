"""What a backend waits on: the API's asks (a wake, a sleep, a settled state), each
answered when the operation it started ends, and the core's timers."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from ..core.actions import Action, Refused, RunSleep
from ..core.events import Event, SleepRequested, Timer, WakeRequested
from ..core.states import IN_FLIGHT, State
from ..errors import OperationFailed, RuntimeFailure, ServiceBusy


class Waiters:
    """Futures settled together, all with the same result, when the operation ends."""

    __slots__ = ("_loop", "_pending")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[asyncio.Future[None]] = []

    def add(self) -> asyncio.Future[None]:
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._pending.append(waiter)
        return waiter

    def discard(self, waiter: asyncio.Future[None]) -> None:
        if waiter in self._pending:
            self._pending.remove(waiter)

    def settle(self, error: Exception | None = None) -> None:
        """Every waiter so far returns, or raises ``error``; later ones wait for the next."""
        pending, self._pending = self._pending, []
        for waiter in pending:
            if waiter.done():
                continue  # its caller gave up (cancelled)
            if error is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(error)


class Timers:
    """One handle per kind, armed when the core asks; arming again replaces the last."""

    __slots__ = ("_fire", "_handles", "_loop")

    def __init__(self, loop: asyncio.AbstractEventLoop, fire: Callable[[Timer], None]) -> None:
        self._loop = loop
        self._fire = fire
        self._handles: dict[Timer, asyncio.TimerHandle] = {}

    def arm(self, timer: Timer, at: float) -> None:
        old = self._handles.get(timer)
        if old is not None:
            old.cancel()
        self._handles[timer] = self._loop.call_at(at, self._fired, timer)

    def _fired(self, timer: Timer) -> None:
        self._handles.pop(timer, None)
        self._fire(timer)

    def cancel(self) -> None:
        for handle in self._handles.values():
            handle.cancel()
        self._handles.clear()


class Asks:
    """The API's asks of one backend, with no connection: each feeds the core and waits
    for the end of the operation that follows."""

    __slots__ = ("_feed", "_loop", "_settlers", "_sleepers", "_state", "_wakers")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        feed: Callable[[Event], list[tuple[str, Action]]],
        state: Callable[[], State],
    ) -> None:
        self._loop = loop
        self._feed = feed
        self._state = state
        self._wakers = Waiters(loop)
        self._sleepers = Waiters(loop)
        self._settlers = Waiters(loop)  # API answers waiting for a final state

    async def wake(self, reason: str) -> None:
        if self._state() is State.RUNNING:
            return
        waiter = self._wakers.add()
        self._feed(WakeRequested(reason))
        await waiter

    async def sleep(self, request: SleepRequested) -> None:
        waiter = self._sleepers.add()
        commands = self._feed(request)
        refused = next((a for _, a in commands if isinstance(a, Refused)), None)
        if refused is not None or not any(isinstance(a, RunSleep) for _, a in commands):
            self._sleepers.discard(waiter)
            if refused is not None:
                raise ServiceBusy(refused.why, forceable=refused.forceable)
            return  # already asleep
        await waiter

    async def settled(self, within: float) -> State:
        deadline = self._loop.time() + within
        while self._state() in IN_FLIGHT and (left := deadline - self._loop.time()) > 0:
            waiter = self._settlers.add()
            try:
                await asyncio.wait_for(waiter, left)
            except (TimeoutError, RuntimeFailure):  # slow, or the proxy shuts down
                break
        return self._state()

    def woke(self, error: Exception | None = None) -> None:
        self._wakers.settle(error)

    def slept(self, error: str | None) -> None:
        self._sleepers.settle(None if error is None else OperationFailed(error))

    def moved(self) -> None:
        """The state changed: answers waiting for a settled one look again."""
        self._settlers.settle()

    def close(self) -> None:
        for waiters in (self._wakers, self._sleepers, self._settlers):
            waiters.settle(OperationFailed("the proxy is shutting down"))
