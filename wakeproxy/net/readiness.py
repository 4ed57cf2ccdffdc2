"""Readiness after a start: probe until the backend serves.

After an unpause the backend is ready at once (its sockets never closed). After a
start a successful connect is the least proof needed (a paused or starting container's
kernel completes handshakes: seen with docker pause here), and an HTTP GET the better
one when the backend has a health path. Probes run every ``interval`` (10 ms by default) so a
wake costs little more than the backend's own boot.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from ..config import Address, Readiness
from ..errors import OperationFailed

# How often, in probes, to ask the runtime whether the backend is still starting:
# a command that crashed at boot fails the wake now, not at wake_timeout.
_ALIVE_EVERY = 10


async def probe(address: Address, readiness: Readiness, connect_timeout: float) -> bool:
    try:
        async with asyncio.timeout(connect_timeout):
            reader, writer = await asyncio.open_connection(address.host, address.port)
            try:
                if readiness.http is None:
                    return True
                request = (
                    f"GET {readiness.http} HTTP/1.1\r\nHost: {address}\r\n"
                    "User-Agent: wakeproxy-readiness\r\nConnection: close\r\n\r\n"
                )
                writer.write(request.encode("latin-1"))
                status_line = await reader.readline()
                parts = status_line.split()
                return len(parts) >= 2 and parts[1].isdigit() and 200 <= int(parts[1]) < 400
            finally:
                writer.close()
    except (OSError, TimeoutError, ValueError):
        return False


async def wait_ready(
    address: Address,
    readiness: Readiness,
    *,
    connect_timeout: float,
    still_starting: Callable[[], Awaitable[str | None]],
    foreign: Callable[[int], Awaitable[str | None]] | None = None,
) -> None:
    """Return once a probe passes against the backend's own listener (``foreign``
    says why a listener that answered is someone else's); the caller bounds the wait
    (wake_timeout)."""
    attempts = 0
    problem: str | None = None
    while True:
        if await probe(address, readiness, connect_timeout):
            problem = await foreign(address.port) if foreign is not None else None
            if problem is None:
                return
        attempts += 1
        if attempts % _ALIVE_EVERY == 0 and (stopped := await still_starting()) is not None:
            raise OperationFailed(problem or stopped)
        await asyncio.sleep(readiness.interval)
