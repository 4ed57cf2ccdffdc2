"""mode http: health probes never wake a backend or keep it awake, on any connection and
in any state; bytes after a probe are a real request. Real processes on loopback."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests.helpers import backend_command, config_from, free_port, running, wait_until
from tests.test_http import GATEWAY_PROBE, head_of, http_config, http_service, status
from wakeproxy.core.states import State

pytestmark = pytest.mark.asyncio
BODY = b"hello from the backend\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: web\r\n\r\n"
PROBES = 'http: {probes: [{path: /healthz, body: "ok\\n"}]}'


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """One response with a Content-Length body from a kept-alive connection."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    assert b"connection: close" not in head.lower(), head
    return status(head), await reader.readexactly(length)


async def test_probes_during_a_slow_stop_are_answered_not_forwarded() -> None:
    # The backend takes 1.5 s to exit after SIGTERM: probes every 100 ms meet the stop in
    # flight. Before the fix each one was forwarded and restarted the backend.
    port, backend = free_port(), free_port()
    command = " ".join(backend_command(backend, "http", "--term-delay", "1.5"))
    config = http_config(
        http_service(
            "web", port, backend, PROBES,
            "sleep_policy: {idle_timeout: 0.3, action: stop}", "stop_timeout: 5",
            command=command,
        )
    )  # fmt: skip
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        assert (await reader.read(-1)).endswith(BODY)
        writer.close()
        saw_stopping = False
        deadline = time.monotonic() + 60  # for a slow machine: the loop ends once stopped
        while time.monotonic() < deadline:
            saw_stopping |= service.state is State.STOPPING
            assert status(await head_of(port, GATEWAY_PROBE)) == 200
            await asyncio.sleep(0.1)
            if saw_stopping and service.state is State.STOPPED:
                break
        assert saw_stopping, "the stop was never seen in flight"
        assert service.state is State.STOPPED
        assert service.stats.wakes["ok"] == 1, "a probe restarted the backend"


async def test_a_kept_alive_connection_of_probes_does_not_keep_the_backend_awake() -> None:
    port, backend = free_port(), free_port()
    config = http_config(
        http_service("web", port, backend, PROBES, "sleep_policy: {idle_timeout: 0.3}")
    )
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        await service.wake()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            by_backend = by_proxy = 0
            deadline = time.monotonic() + 60  # for a slow machine: it pauses at 0.3 s
            while service.state is not State.PAUSED:
                assert time.monotonic() < deadline, "probes on one connection kept it awake"
                writer.write(HEALTHZ)
                code, body = await read_response(reader)
                assert code == 200
                by_backend += body == BODY
                await asyncio.sleep(0.1)
            assert by_backend >= 1, "while awake, the probes reached the backend"
            # Asleep now: the same connection's probes are answered by the proxy.
            for _ in range(5):
                writer.write(HEALTHZ)
                code, body = await read_response(reader)
                by_proxy += code == 200 and body == b"ok\n"
            assert by_proxy == 5
            assert service.state is State.PAUSED and service.stats.wakes["ok"] == 1
            # A real request on that connection still wakes the backend and is answered.
            writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            assert await read_response(reader) == (200, BODY)
            assert service.stats.wakes["ok"] == 2
        finally:
            writer.close()


async def test_allow_sleep_a_probe_on_a_quiet_connection_does_not_wake_it() -> None:
    port, backend = free_port(), free_port()
    config = http_config(
        http_service(
            "web", port, backend, 'http: {idle_connections: allow-sleep, probes: '
            '[{path: /healthz, body: "ok\\n"}]}', "sleep_policy: {idle_timeout: 0.3}",
        )
    )  # fmt: skip
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            assert await read_response(reader) == (200, BODY)
            await wait_until(lambda: service.state is State.PAUSED, within=10)
            writer.write(HEALTHZ)
            assert await read_response(reader) == (200, b"ok\n")
            await asyncio.sleep(0.2)
            assert service.state is State.PAUSED and service.stats.wakes["ok"] == 1
            writer.write(b"GET / HTTP/1.1\r\nHost: web\r\n\r\n")
            assert await read_response(reader) == (200, BODY)
            assert service.stats.wakes["ok"] == 2
        finally:
            writer.close()


async def test_a_request_pipelined_after_a_probe_is_woken_for_and_answered() -> None:
    # Before the fix the probe was answered, the connection closed, the POST lost.
    port, backend = free_port(), free_port()
    config = http_config(http_service("web", port, backend, PROBES, "sleep_policy: {action: stop}"))
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        assert service.state is State.STOPPED
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(
                HEALTHZ + b"POST /echo HTTP/1.1\r\nHost: web\r\nContent-Length: 5\r\n\r\nhello"
            )
            async with asyncio.timeout(15):
                assert await read_response(reader) == (200, b"ok\n")
                assert await read_response(reader) == (200, b"hello")
            assert service.stats.wakes["ok"] == 1 and service.state is State.RUNNING
        finally:
            writer.close()


async def test_probe_options_method_any_header_conditions_streams_and_no_default():
    port, backend = free_port(), free_port()
    probes = (
        'http: {default_probe: false, probes: [{path: /live, method: "*", '
        'headers: {user-agent: "!curl"}, body: "alive\\n"}, {path: /events, stream: true}]}'
    )
    config = http_config(
        http_service(
            "web", port, backend, probes, "sleep_policy: {action: stop}",
            "idle_connection_timeout: 1",
        )
    )  # fmt: skip
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            # method "*": HEAD matches too, answered with the length and no body, so the
            # connection's next answer is read right.
            writer.write(b"HEAD /live HTTP/1.1\r\nHost: web\r\nUser-Agent: kube-probe\r\n\r\n")
            head = await reader.readuntil(b"\r\n\r\n")
            assert status(head) == 200 and b"Content-Length: 6" in head
            # Probes answered on a kept-open connection count as traffic: it outlives
            # idle_connection_timeout (1 s) while they come (every 0.1 s: a tenth of it,
            # so a busy machine's late wake-up does not stand for a quiet connection).
            for _ in range(24):
                writer.write(b"GET /live HTTP/1.1\r\nHost: web\r\n\r\n")
                assert await read_response(reader) == (200, b"alive\n")
                await asyncio.sleep(0.1)
        finally:
            writer.close()
        events = await head_of(port, b"GET /events HTTP/1.1\r\nHost: web\r\n\r\n")
        assert status(events) == 200 and b"Content-Length" not in events, "an open stream"
        assert service.stats.wakes["ok"] == 0 and service.state is State.STOPPED
        # "!curl": a request from curl is no probe; with default_probe off the gateway's
        # SSE check is a request too. Each wakes the backend.
        curl = b"GET /live HTTP/1.1\r\nHost: web\r\nUser-Agent: curl/8\r\nConnection: close\r\n\r\n"
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(curl)
        assert (await asyncio.wait_for(reader.read(-1), 15)).endswith(BODY)
        writer.close()
        assert service.stats.wakes["ok"] == 1
        await wait_until(lambda: not service.connections, within=5)
        await service.sleep("stop")
        reply = await head_of(port, GATEWAY_PROBE, within=15)
        assert b"text/event-stream" not in reply, "forwarded: the default probe is off"
        assert service.stats.wakes["ok"] == 2


async def test_a_stream_probe_stays_open_until_the_client_goes():
    port, backend = free_port(), free_port()
    config = http_config(http_service("web", port, backend, "sleep_policy: {action: stop}"))
    async with running(config_from(config)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(GATEWAY_PROBE)
        head = await reader.readuntil(b"\r\n\r\n")
        assert status(head) == 200 and b"Content-Length" not in head
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(1), 0.5)  # open, and nothing more comes
        writer.close()
        await wait_until(lambda: not proxy.services["web"].connections, within=5)
        assert proxy.services["web"].stats.wakes["ok"] == 0
