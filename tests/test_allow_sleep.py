"""``idle_connections: allow-sleep``: a quiet open connection no longer keeps the backend
awake, but a response under way and a POST answered 202 (its result may still come on an
event stream) do: the promise that a tool call is never frozen halfway. Real processes."""

from __future__ import annotations

import asyncio

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


async def until_paused(service, within: float = 30) -> float:
    """The proxy's loop time at which the service became paused (its own record of the
    state change, not when a poll noticed it)."""
    await wait_until(lambda: service.state is State.PAUSED, within=within)
    return service.node.unit.since


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
        loop = asyncio.get_running_loop()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        head = f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n"
        sent = loop.time()
        writer.write(head.encode() + b"\r\n{}")
        head = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        assert head.startswith(f"HTTP/1.1 {status} ".encode()), head
        # The proxy's own books, on its own clock: a 202 sets a hold of inflight_grace
        # from its answer (after the request was sent); a 200 sets none.
        busy_until = service.node.busy_until
        if status == 202:
            assert busy_until >= sent + 1.5, (busy_until, sent)
        else:
            assert busy_until < sent, "a 200 holds nothing"
        paused_at = await until_paused(service)
        if status == 202:
            # idle_timeout is 0.2 s: the pause (the proxy's record of when) came only
            # once the 202's grace was over.
            assert paused_at >= busy_until, (paused_at, busy_until)


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
        # The proxy counts it as needing the backend (no idle deadline is due), and seven
        # idle timeouts later it still runs.
        assert service.attached == 1 and service.sleeps_in() is None
        await asyncio.sleep(1.5)
        assert service.state is State.RUNNING
        assert service.attached == 1 and service.sleeps_in() is None
        writer.close()
        await wait_until(lambda: service.state is State.PAUSED, within=10)
