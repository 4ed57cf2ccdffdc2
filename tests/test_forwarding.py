"""The byte path on real loopback sockets, on uvloop and on the stock asyncio loop.

The backend stays running (fake runtime): these tests are about bytes, order,
half-close, resets and flow control, not about waking.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import struct

import pytest

from tests.fakes import FakeRuntime
from tests.helpers import Lone, config_from, free_port, lone_service, wait_until
from wakeproxy.core.states import State
from wakeproxy.net.forward import HIGH_WATER

pytestmark = pytest.mark.asyncio
CHUNK = 64 * 1024


async def start_proxy(backend_port: int) -> Lone:
    port = free_port()
    cfg = config_from(
        f"services:\n  web:\n    listen: 127.0.0.1:{port}\n"
        f"    backend: 127.0.0.1:{backend_port}\n    container: fake\n"
    ).services["web"]
    service = lone_service(cfg, FakeRuntime(State.RUNNING))
    await service.start()
    return service


async def serve(handler) -> tuple[asyncio.Server, int]:
    port = free_port()

    async def guarded(reader, writer):
        try:
            await handler(reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    return await asyncio.start_server(guarded, "127.0.0.1", port, backlog=1024), port


async def echo(reader, writer):
    while data := await reader.read(CHUNK):
        writer.write(data)
        await writer.drain()
    writer.write_eof()


async def test_concurrent_echo_is_byte_identical():
    server, port = await serve(echo)
    service = await start_proxy(port)
    try:

        async def client(i: int) -> None:
            data = os.urandom(512 * 1024 + i)
            reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)

            async def send() -> None:
                for start in range(0, len(data), 10_000):
                    writer.write(data[start : start + 10_000])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            received = await reader.read(-1)
            await sender
            writer.close()
            assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()

        async with asyncio.timeout(30):
            await asyncio.gather(*(client(i) for i in range(20)))
        await wait_until(lambda: service.attached == 0, within=10)
        assert service.stats.bytes_up == service.stats.bytes_down
        assert service.stats.bytes_up == sum(512 * 1024 + i for i in range(20))
    finally:
        await service.close()
        server.close()


async def test_half_close_passes_through_both_ways():
    seen_eof = asyncio.Event()

    async def reply_after_eof(reader, writer):
        request = await reader.read(-1)  # the client's EOF reached the backend
        seen_eof.set()
        writer.write(b"got:" + request)
        await writer.drain()

    server, port = await serve(reply_after_eof)
    service = await start_proxy(port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)
        writer.write(b"question")
        writer.write_eof()
        async with asyncio.timeout(5):
            await seen_eof.wait()
            assert await reader.read(-1) == b"got:question"
        writer.close()
        await wait_until(lambda: service.attached == 0 and not service.connections, within=10)
    finally:
        await service.close()
        server.close()


async def test_backend_speaking_first_and_closing():
    async def banner(reader, writer):
        writer.write(b"220 ready\r\n")
        await writer.drain()

    server, port = await serve(banner)
    service = await start_proxy(port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)
        async with asyncio.timeout(5):
            assert await reader.read(-1) == b"220 ready\r\n"
        writer.close()
    finally:
        await service.close()
        server.close()


async def test_backend_half_close_passes_through_and_the_client_can_still_send():
    after_eof = asyncio.Queue()

    async def speak_then_half_close(reader, writer):
        writer.write(b"early")
        writer.write_eof()  # done sending; still reading
        await writer.drain()
        await after_eof.put(await reader.read(-1))

    server, port = await serve(speak_then_half_close)
    service = await start_proxy(port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)
        async with asyncio.timeout(5):
            assert await reader.read(-1) == b"early", "the backend's EOF reached the client"
            writer.write(b"late")  # the other direction is still open
            writer.write_eof()
            assert await after_eof.get() == b"late"
        writer.close()
        await wait_until(lambda: service.attached == 0 and not service.connections, within=10)
    finally:
        await service.close()
        server.close()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer reads a reset (RST), not an end of stream (FIN)."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def test_a_reset_passes_through_as_a_reset_and_a_close_as_a_close():
    ended: asyncio.Queue[str] = asyncio.Queue()

    async def watch(reader, writer):
        try:
            ended.put_nowait("fin" if await reader.read(-1) == b"x" else "data?")
        except ConnectionResetError:
            ended.put_nowait("rst")

    server, port = await serve(watch)
    service = await start_proxy(port)
    try:
        for how, expected in (("reset", "rst"), ("close", "fin")):
            _reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)
            writer.write(b"x")
            await wait_until(lambda: service.forwarding == 1, within=10)
            # The x went upstream (the proxy's own count), before the reset or the close.
            await wait_until(lambda: service.bytes_moved()[0] >= 1, within=10)
            if how == "reset":
                _reset(writer)
            else:
                writer.close()
            async with asyncio.timeout(5):
                assert await ended.get() == expected, how
            await wait_until(lambda: service.attached == 0, within=10)
    finally:
        await service.close()
        server.close()


async def test_a_backend_reset_reaches_the_client_as_a_reset():
    async def reset_at_once(reader, writer):
        await reader.readexactly(1)
        _reset(writer)

    server, port = await serve(reset_at_once)
    service = await start_proxy(port)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)
        writer.write(b"x")
        async with asyncio.timeout(5):
            with pytest.raises(ConnectionResetError):
                await reader.read(-1)
        writer.close()
    finally:
        await service.close()
        server.close()


async def _watch_buffers(service: Lone, peaks: dict[str, int], stop: asyncio.Event) -> None:
    while not stop.is_set():
        for conn in service.connections:
            if conn.transport is not None:
                size = conn.transport.get_write_buffer_size()
                peaks["client"] = max(peaks["client"], size)
            if conn.upstream is not None:
                size = conn.upstream.get_write_buffer_size()
                peaks["upstream"] = max(peaks["upstream"], size)
        await asyncio.sleep(0.002)


async def test_slow_reader_download_stays_bounded():
    size = 24 * 1024 * 1024
    block = os.urandom(CHUNK)

    async def source(reader, writer):
        for _ in range(size // CHUNK):
            writer.write(block)
            await writer.drain()

    server, port = await serve(source)
    service = await start_proxy(port)
    peaks = {"client": 0, "upstream": 0}
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_buffers(service, peaks, stop))
    try:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", service.cfg.listen.port, limit=CHUNK
        )
        digest, total = hashlib.sha256(), 0
        async with asyncio.timeout(60):
            while data := await reader.read(CHUNK):
                digest.update(data)
                total += len(data)
                if total < 4 * 1024 * 1024:
                    await asyncio.sleep(0.002)  # slow for the first MiBs: the backend must wait
        writer.close()
        assert total == size
        assert digest.digest() == hashlib.sha256(block * (size // CHUNK)).digest()
        # Flow control: the proxy's buffer toward the slow client never grows past
        # the high-water mark plus one read.
        assert 0 < peaks["client"] <= HIGH_WATER + 4 * CHUNK, peaks
    finally:
        stop.set()
        await watcher
        await service.close()
        server.close()


async def test_slow_backend_upload_stays_bounded():
    size = 16 * 1024 * 1024
    block = os.urandom(CHUNK)

    async def slow_sink(reader, writer):
        digest, total = hashlib.sha256(), 0
        while data := await reader.read(CHUNK):
            digest.update(data)
            total += len(data)
            if total < 4 * 1024 * 1024:
                await asyncio.sleep(0.002)
        writer.write(digest.hexdigest().encode())
        await writer.drain()

    server, port = await serve(slow_sink)
    service = await start_proxy(port)
    peaks = {"client": 0, "upstream": 0}
    stop = asyncio.Event()
    watcher = asyncio.create_task(_watch_buffers(service, peaks, stop))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)
        async with asyncio.timeout(60):
            for _ in range(size // CHUNK):
                writer.write(block)
                await writer.drain()
            writer.write_eof()
            answer = await reader.read(-1)
        writer.close()
        assert answer.decode() == hashlib.sha256(block * (size // CHUNK)).hexdigest()
        assert 0 < peaks["upstream"] <= HIGH_WATER + 4 * CHUNK, peaks
    finally:
        stop.set()
        await watcher
        await service.close()
        server.close()


async def test_keepalive_on_the_client_side_and_on_upstreams_across_a_network():
    import socket

    from wakeproxy.config import is_loopback

    def keepalive(transport) -> tuple[int, int, int]:
        sock = transport.get_extra_info("socket")
        return (
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
            sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT),
        )

    assert is_loopback("127.0.0.2") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("172.17.0.2") and not is_loopback("db")
    server, port = await serve(echo)
    service = await start_proxy(port)
    try:
        # A loopback backend: no probes upstream (a vanished peer is a reset at once).
        assert service.upstream_keepalive is False
        reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)
        writer.write(b"k")
        assert await reader.readexactly(1) == b"k"
        (conn,) = service.connections
        assert conn.transport is not None and conn.upstream is not None
        # The accepted socket inherits these from the listener (Linux).
        assert keepalive(conn.transport) == (1, 60, 6)
        assert keepalive(conn.upstream)[0] == 0
        writer.close()
        await wait_until(lambda: not service.connections, within=5)
        # As for a backend across a network (only loopback traffic here: the flag is set).
        service.driver.upstream_keepalive = True
        reader, writer = await asyncio.open_connection("127.0.0.1", service.cfg.listen.port)
        writer.write(b"k")
        assert await reader.readexactly(1) == b"k"
        (conn,) = service.connections
        assert keepalive(conn.upstream) == (1, 60, 6)
        writer.close()
    finally:
        await service.close()
        server.close()
