"""The runtime's own ceiling: a bare uvloop Protocol-pair forwarder, nothing else.

``python -m bench.bare LISTEN_PORT BACKEND_PORT`` on 127.0.0.1. No waking, no counters,
no timers, no flow control beyond what the transports do: what asyncio on uvloop costs
per connection, the contender wakeproxy's churn is measured against (row 2).
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import uvloop


class Client(asyncio.Protocol):
    def __init__(self, backend: int) -> None:
        self.backend = backend
        self.transport: Any = None
        self.upstream: Any = None
        self.pending: list[bytes] = []

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        loop = asyncio.get_running_loop()
        loop.create_task(self.connect(loop))  # noqa: RUF006 (a bench: the loop keeps it)

    async def connect(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await loop.create_connection(lambda: Upstream(self), "127.0.0.1", self.backend)
        except OSError:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        if self.upstream is None:
            self.pending.append(data)
        else:
            self.upstream.write(data)

    def eof_received(self) -> bool:
        if self.upstream is not None:
            self.upstream.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client

    def connection_made(self, transport: Any) -> None:
        self.client.upstream = transport
        for data in self.client.pending:
            transport.write(data)
        self.client.pending.clear()

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        self.client.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()


async def serve(listen: int, backend: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: Client(backend), "127.0.0.1", listen, backlog=4096)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
