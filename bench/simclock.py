"""Simulated time for replays (bench/predict.py): what the proxy's glue uses of an event
loop, ``time`` and ``call_at``, run one timer after another, as fast as they run."""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Callable
from typing import Any


class Handle:
    """A timer of the simulated loop (what ``loop.call_at`` returns: ``cancel``)."""

    __slots__ = ("args", "callback", "cancelled")

    def __init__(self, callback: Callable[..., object], args: tuple[Any, ...]) -> None:
        self.callback = callback
        self.args = args
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Loop:
    """Simulated time: the two things the glue uses of an event loop (``time`` and
    ``call_at``), run one timer after another; equal times run in the order armed."""

    def __init__(self, now: float) -> None:
        self.now = now
        self._queue: list[tuple[float, int, Handle]] = []
        self._order = itertools.count()

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, callback: Callable[..., object], *args: Any) -> Handle:
        handle = Handle(callback, args)
        heapq.heappush(self._queue, (max(when, self.now), next(self._order), handle))
        return handle

    def soon(self, callback: Callable[..., object], *args: Any) -> Handle:
        """After what runs now (where the proxy spawns a task)."""
        return self.call_at(self.now, callback, *args)

    def run_until(self, end: float) -> None:
        while self._queue and self._queue[0][0] <= end:
            when, _, handle = heapq.heappop(self._queue)
            if not handle.cancelled:
                self.now = when
                handle.callback(*handle.args)
        self.now = end
