"""Callers waiting for the end of an operation they asked for (the API's wake and sleep)."""

from __future__ import annotations

import asyncio


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
