"""An in-memory runtime for unit tests of the lifecycle glue (the tests' own: the
package ships none)."""

from __future__ import annotations

import asyncio
from collections import Counter

from wakeproxy.core.states import State
from wakeproxy.errors import OperationFailed
from wakeproxy.runtimes.base import Runtime


class FakeRuntime(Runtime):
    """Counts every call; ``delay`` slows operations, ``fail`` makes the named ones raise."""

    kind = "fake"

    def __init__(self, state: State = State.PAUSED, *, delay: float = 0.0) -> None:
        super().__init__()
        self.state = state
        self.delay = delay
        self.calls: Counter[str] = Counter()
        self.fail: set[str] = set()

    async def _op(self, name: str, result: State) -> None:
        self.calls[name] += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if name in self.fail:
            raise OperationFailed(f"fake {name} failed")
        self.state = result

    def initial_state(self) -> tuple[State, str]:
        return self.state, "test"

    async def inspect(self) -> State:
        self.calls["inspect"] += 1
        if "inspect" in self.fail:
            raise OperationFailed("fake inspect failed")
        return self.state

    async def pause(self) -> None:
        await self._op("pause", State.PAUSED)

    async def unpause(self) -> None:
        await self._op("unpause", State.RUNNING)

    async def start(self) -> None:
        await self._op("start", State.RUNNING)

    async def stop(self) -> None:
        await self._op("stop", State.STOPPED)

    def external(self, state: State, reason: str = "changed by hand") -> None:
        """Simulate a change made outside the proxy."""
        self.state = state
        self.on_change(state, reason)
