"""``idle_connections: allow-sleep``: a quiet open connection no longer keeps the backend
awake, but a response under way and a POST answered 202 (its result may still come on an
event stream) do: the promise that a tool call is never frozen halfway. Real processes."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers import backend_command, config_from, free_port, running, wait_until
from tests.test_http import http_config, http_service
from wakeproxy.core.states import State

pytestmark = pytest.mark.asyncio


def allow_sleep(port: int, backend: int, *extra: str, delay: float = 0.0) -> str:
    command = " ".join(backend_command(backend, "http", "--delay", str(delay)))
    return http_config(
        http_service(
            "web", port, backend, "sleep_policy: {idle_timeout: 0.2}", *extra, command=command
        )
    )


async def until_paused(service, within: float = 10) -> float:
    """Seconds until the service reads paused (polled: the test's own clock)."""
    started = time.monotonic()
    await wait_until(lambda: service.state is State.PAUSED, within=within)
    return time.monotonic() - started


async def test_a_response_under_way_blocks_sleep_then_the_quiet_connection_does_not():
    port, backend = free_port(), free_port()
    settings = "http: {idle_connections: allow-sleep}"
    async with running(config_from(allow_sleep(port, backend, settings, delay=0.2))) as proxy:
        service = proxy.services["web"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")  # 10 bytes over 2 s
            await reader.readuntil(b"\r\n\r\n")
            body = b""
            while len(body) < 10:
                body += await asyncio.wait_for(reader.read(10), 5)
                assert service.state is State.RUNNING, "paused under a response"
            assert body == b"x" * 10
            # The response ended; the connection stays open and quiet: it no longer counts.
            await until_paused(service)
            assert not reader.at_eof(), "the connection itself stays open"
        finally:
            writer.close()


@pytest.mark.parametrize(("path", "status"), [("/accept", 202), ("/", 200)])
async def test_a_post_answered_202_blocks_sleep_for_inflight_grace(path, status):
    port, backend = free_port(), free_port()
    settings = "http: {idle_connections: allow-sleep, inflight_grace: 1.5}"
    async with running(config_from(allow_sleep(port, backend, settings))) as proxy:
        service = proxy.services["web"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
        writer.write(head.encode() + b"\r\n{}")
        head = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        asleep_after = await until_paused(service)
        if status == 202:
            # idle_timeout is 0.2 s: only the 202's grace kept it up this long.
            assert asleep_after > 1.0, f"slept {asleep_after:.2f} s after a 202"
        else:
            assert asleep_after < 1.0, f"a 200 kept it up {asleep_after:.2f} s"


async def test_allow_sleep_never_pauses_under_a_response_it_cannot_frame():
    # "Transfer-Encoding: gzip, chunked" is valid HTTP that h11 cannot follow. Before the
    # fix the tracker gave up, the backend was paused mid-download and the client stalled.
    port, backend = free_port(), free_port()
    size = 2 << 20
    command = " ".join(backend_command(backend, "http", "--size", str(size), "--delay", "0.05"))
    config = http_config(
        http_service(
            "web", port, backend, "http: {idle_connections: allow-sleep}",
            "sleep_policy: {idle_timeout: 0.2}", command=command,
        )
    )  # fmt: skip
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /gzip-chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        received = b""
        async with asyncio.timeout(20):
            while not received.endswith(b"\r\n0\r\n\r\n"):
                data = await reader.read(65536)
                assert data, "the backend closed mid-response"
                received += data
                assert service.state is State.RUNNING, "paused under a live response"
        assert len(received) > size
        # Its end could not be seen: the connection keeps the backend up until it closes.
        await asyncio.sleep(1.5)
        assert service.state is State.RUNNING
        writer.close()
        await wait_until(lambda: service.state is State.PAUSED, within=10)
