"""The runtime's own ceiling: a bare uvloop TCP forwarder, one Protocol per side.

No wake, no hold queue, no pacing, no counters: accept, connect upstream, write what
arrived before the connect, then each side's data straight into the other's transport,
with the same flow control and half-close as wakeproxy's forwarding. What wakeproxy
costs over this is wakeproxy's own.

    python -m bench.bare LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import cast

import uvloop

HIGH, LOW = 256 * 1024, 64 * 1024


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client) -> None:
        self.client = client
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(HIGH, LOW)
        self.client.connected(transport)

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)

    def eof_received(self) -> bool:
        client = self.client
        client.upstream_eof = True
        if client.eof:  # both ways done: nothing more can move
            client.transport.close()
            return False
        if client.transport.can_write_eof():
            client.transport.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self.client.transport.close()

    def pause_writing(self) -> None:
        self.client.transport.pause_reading()

    def resume_writing(self) -> None:
        self.client.transport.resume_reading()


class Client(asyncio.Protocol):
    def __init__(self, backend_port: int) -> None:
        self.backend_port = backend_port
        self.upstream: asyncio.Transport | None = None
        self.pending: list[bytes] = []
        self.eof = False
        self.upstream_eof = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        transport.set_write_buffer_limits(HIGH, LOW)
        loop = asyncio.get_running_loop()
        self.task = loop.create_task(self._connect(loop))

    async def _connect(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            await loop.create_connection(lambda: Upstream(self), "127.0.0.1", self.backend_port)
        except OSError:
            self.transport.close()

    def connected(self, upstream: asyncio.Transport) -> None:
        if self.transport.is_closing():
            upstream.close()
            return
        self.upstream = upstream
        for chunk in self.pending:
            upstream.write(chunk)
        self.pending.clear()
        if self.eof and upstream.can_write_eof():
            upstream.write_eof()

    def data_received(self, data: bytes) -> None:
        if self.upstream is not None:
            self.upstream.write(data)
        else:
            self.pending.append(data)

    def eof_received(self) -> bool:
        self.eof = True
        if self.upstream_eof:  # both ways done
            return False  # the transport closes; connection_lost closes the upstream
        if self.upstream is not None and self.upstream.can_write_eof():
            self.upstream.write_eof()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self.upstream is not None:
            self.upstream.close()

    def pause_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume_writing(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()


async def serve(listen_port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(backend_port), "127.0.0.1", listen_port, backlog=4096, reuse_address=True
    )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    async with server:
        await stop.wait()


if __name__ == "__main__":
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))
