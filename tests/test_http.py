"""mode http with the process runtime: probes, activity, framing and the errors a client reads."""

from __future__ import annotations

import asyncio
import socket
import struct
import time

import pytest

from tests.helpers import (
    PYTHON,
    backend_command,
    config_from,
    exchange,
    free_port,
    running,
    wait_until,
)
from wakeproxy.core.states import State

pytestmark = pytest.mark.asyncio
BODY = b"hello from the backend\n"
GATEWAY_PROBE = b"GET /sse HTTP/1.1\r\nHost: web\r\nAccept: */*\r\n\r\n"


def http_service(name: str, port: int, backend: int, *lines: str, command: str = "") -> list[str]:
    return [
        f"  {name}:",
        f"    listen: 127.0.0.1:{port}",
        f"    backend: 127.0.0.1:{backend}",
        f"    command: {command or backend_command(backend)}",
        "    mode: http",
        *(f"    {line}" for line in lines),
    ]


def http_config(*services: list[str]) -> str:
    return "\n".join(
        [
            "admin:",
            f"  listen: 127.0.0.1:{free_port()}",
            "services:",
            *(line for service in services for line in service),
        ]
    )


async def head_of(port: int, data: bytes, *, within: float = 10.0) -> bytes:
    """Send ``data``, read one response head, then drop the connection (as the gateway does)."""
    async with asyncio.timeout(within):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            return await reader.readuntil(b"\r\n\r\n")
        finally:
            writer.transport.abort()


def status(response: bytes) -> int:
    return int(response.split(b" ", 2)[1])


async def test_probes_are_answered_while_asleep_and_never_count_as_activity():
    port, backend = free_port(), free_port()
    config = http_config(
        http_service(
            "web", port, backend,
            "http: {probes: [{path: /healthz, body: \"ok\\n\"}]}",
            "sleep_policy: {idle_timeout: 0.5, action: stop}",
        )
    )  # fmt: skip
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        assert service.state is State.STOPPED

        probe = await head_of(port, GATEWAY_PROBE)
        assert status(probe) == 200 and b"Content-Type: text/event-stream" in probe
        healthz = await exchange(
            port, b"GET /healthz HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n"
        )
        assert status(healthz) == 200 and healthz.endswith(b"\r\n\r\nok\n")
        assert service.state is State.STOPPED and service.stats.wakes["ok"] == 0
        assert service.stats.http_answers[200] == 2

        # A real request wakes it; the backend answers.
        reply = await exchange(port, b"GET / HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n")
        assert reply.endswith(BODY) and service.stats.wakes["ok"] == 1

        # Probes every 100 ms (forwarded while awake) do not keep it awake: none moves
        # the idle clock (the proxy's own record), so it stops 0.5 s after the request.
        # The deadline is for a slow machine; the fact is the unmoved clock.
        await wait_until(lambda: not service.connections, within=10)  # the request's own
        woken_activity = service.last_activity
        deadline = time.monotonic() + 60
        answered_by_backend = 0
        while service.state is not State.STOPPED:
            assert time.monotonic() < deadline, "probes kept the backend awake"
            head = await head_of(port, GATEWAY_PROBE)
            assert status(head) == 200
            answered_by_backend += b"Content-Length" in head
            assert service.last_activity == woken_activity, "a probe counted as activity"
            await asyncio.sleep(0.1)
        assert answered_by_backend >= 1, "while awake, probes reach the backend"
        # ...and once it sleeps they are answered without waking it.
        for _ in range(10):
            assert status(await head_of(port, GATEWAY_PROBE)) == 200
            await asyncio.sleep(0.1)
        assert service.stats.wakes["ok"] == 1 and service.state is State.STOPPED


async def test_bytes_pass_unchanged_pipelined_and_with_bodies():
    port, backend, fwd_port, fwd_backend = free_port(), free_port(), free_port(), free_port()
    config = http_config(
        http_service("web", port, backend),
        http_service("fwd", fwd_port, fwd_backend, "http: {forwarded_headers: true}"),
    )
    async with running(config_from(config)):
        sent = b"GET /echo-head HTTP/1.1\r\nHost: example.test:8080\r\nX-Odd:  spaced \r\n\r\n"
        reply = await exchange(
            port, sent + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        first, second = reply.split(b"HTTP/1.1 200 OK", 2)[1:]
        assert first.endswith(sent), "the head reaches the backend byte for byte (Host kept)"
        assert second.endswith(BODY)

        # Bodies by length and chunked, pipelined in one write: each next head is found.
        body = b'{"jsonrpc":"2.0","id":1,"method":"tools/call"}'
        requests = (
            b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body
            + b"POST /b HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"5\r\nhello\r\n0\r\n\r\n"
            + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )  # fmt: skip
        replies = await exchange(port, requests)
        assert replies.count(b"HTTP/1.1 200 OK") == 3, replies

        # Many pipelined heads in one read are handled one after another (no recursion).
        many = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 2000
        replies = await exchange(
            port, many + b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        assert replies.count(b"HTTP/1.1 200 OK") == 2001

        forwarded = await exchange(
            fwd_port, b"GET /echo-head HTTP/1.1\r\nHost: h.test\r\nConnection: close\r\n\r\n"
        )
        assert b"X-Forwarded-For: 127.0.0.1\r\n" in forwarded
        assert b"X-Forwarded-Host: h.test\r\n" in forwarded
        assert b"\r\nHost: h.test\r\n" in forwarded


async def test_hostile_and_malformed_requests_get_their_status_and_harm_nobody():
    port, backend = free_port(), free_port()
    slow, slow_backend = free_port(), free_port()
    full, full_backend = free_port(), free_port()
    late, late_backend = free_port(), free_port()
    gone, gone_backend = free_port(), free_port()
    never = f'["{PYTHON}", "-c", "import time; time.sleep(60)"]'
    config = http_config(
        http_service("web", port, backend),
        http_service("slow", slow, slow_backend, "http: {header_timeout: 0.3}"),
        http_service("full", full, full_backend, "max_held_connections: 0"),
        http_service("late", late, late_backend, "wake_timeout: 0.5", command=never),
        http_service("gone", gone, gone_backend, "readiness: {tcp: false}", command=never),
    )
    async with running(config_from(config)) as proxy:
        # A kept-alive connection that must be undisturbed by everything below.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(BODY), 15)

        bad = await exchange(port, b"GARBAGE\r\n\r\n")
        assert status(bad) == 400 and b"Connection: close" in bad
        huge = b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 17000 + b"\r\n\r\n"
        assert status(await exchange(port, huge)) == 431
        flood = b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(3000))
        assert status(await exchange(port, flood)) == 431, "a header flood is a big head"
        bad_chunk = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
        assert status(await exchange(port, bad_chunk)) == 400
        assert await exchange(port, b"GET / HT", half_close=True) == b"", "closed, no answer"

        # Slowloris: a head that never completes.
        slow_reader, slow_writer = await asyncio.open_connection("127.0.0.1", slow)
        slow_writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
        assert status(await asyncio.wait_for(slow_reader.read(-1), 5)) == 408
        slow_writer.close()
        assert proxy.services["slow"].stats.wakes["ok"] == 0, "an incomplete head wakes nothing"

        full_reply = await exchange(full, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(full_reply) == 503 and b"Retry-After: 1" in full_reply
        assert status(await exchange(late, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", within=15)) == 504
        assert status(await exchange(gone, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", within=15)) == 502

        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(BODY), 5)
        writer.close()
        stats = proxy.services["web"].stats
        assert (stats.http_answers[400], stats.http_answers[431]) == (2, 2)
        assert proxy.services["slow"].stats.connections["header_timeout"] == 1
        # Each refusal counted once as its outcome and once as the status answered
        # (the outcome was counted twice before: once by the service, once by the answer).
        expected = {
            "full": ("rejected_overflow", 503),
            "late": ("wake_timeout", 504),
            "gone": ("backend_error", 502),
            "slow": ("header_timeout", 408),
        }
        for name, (outcome, code) in expected.items():
            counts = proxy.services[name].stats
            assert counts.connections[outcome] == 1, (name, dict(counts.connections))
            assert dict(counts.http_answers) == {code: 1}, (name, dict(counts.http_answers))
        assert (stats.connections["bad_request"], stats.connections["header_too_large"]) == (2, 2)


async def test_request_framing_that_could_smuggle_is_refused_and_bodies_pass_intact():
    port, backend = free_port(), free_port()
    async with running(config_from(http_config(http_service("web", port, backend)))) as proxy:
        post = b"POST /echo HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
        # RFC 9112 section 6.1: both framings in one request must not be forwarded.
        both = post + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        reply = await exchange(port, both)
        assert status(reply) == 400 and b"both Content-Length and Transfer-Encoding" in reply
        chunked = post + b"Transfer-Encoding: chunked\r\n\r\n"
        # A 17-digit chunk size overflows a 64-bit parser behind the proxy.
        reply = await exchange(port, chunked + b"10000000000000005\r\nhello\r\n0\r\n\r\n")
        assert status(reply) == 400 and b"1 to 16 hex digits" in reply
        reply = await exchange(port, chunked + b"8000000000000000\r\n")
        assert status(reply) == 400 and b"over 2**63 - 1" in reply
        reply = await exchange(port, chunked + b"5\r\nhello world\r\n0\r\n\r\n")
        assert status(reply) == 400 and b"longer than its size" in reply
        reply = await exchange(port, post + b"Transfer-Encoding: gzip\r\n\r\n")
        assert reply.startswith(b"HTTP/1.1 501 Not Implemented\r\n"), reply
        assert proxy.services["web"].stats.wakes["ok"] == 0, "a refused request wakes nothing"
        # Valid bodies reach the backend byte for byte: 16 digits with leading zeros, an
        # extension, split chunks, a trailer.
        body = b"0000000000000005;name=value\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: yes\r\n\r\n"
        reply = await exchange(port, chunked + body)
        assert status(reply) == 200 and reply.endswith(b"\r\n\r\nhello world"), reply
        reply = await exchange(port, post + b"Content-Length: 11\r\n\r\nhello world")
        assert reply.endswith(b"\r\n\r\nhello world"), reply


@pytest.mark.parametrize(
    "request_head",
    [
        b"GET /chat HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        b"CONNECT db.internal:5432 HTTP/1.1\r\nHost: db.internal:5432\r\n\r\n",
    ],
)
async def test_after_an_upgrade_or_connect_the_connection_is_plain_bytes(request_head):
    port, backend = free_port(), free_port()
    async with running(config_from(http_config(http_service("web", port, backend)))) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request_head)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        assert status(head) in (101, 200), head
        # Not HTTP: parsed as a request head it would be a 400 and a close.
        raw = b"\x00\xff GARBAGE\r\n\r\nGET nothing\n" * 100
        writer.write(raw)
        assert await asyncio.wait_for(reader.readexactly(len(raw)), 10) == raw
        writer.close()
        assert proxy.services["web"].stats.http_answers[400] == 0


async def test_connections_holding_part_of_a_head_are_capped():
    port, backend = free_port(), free_port()
    settings = "http: {max_partial_heads: 2, header_timeout: 5}"
    config = config_from(http_config(http_service("web", port, backend, settings)))
    async with running(config) as proxy:
        listener = proxy.frontends["web"]
        partial = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")
            partial.append((reader, writer))
        # Both partial heads are in the proxy's buffers: its own count says so.
        await wait_until(lambda: listener.partial_heads == 2, within=10)
        # An idle connection holds no head: it is not counted and is served.
        reply = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.endswith(BODY)
        third = await exchange(port, b"GET / HTTP/1.1\r\n")
        assert status(third) == 503 and b"Retry-After: 1" in third
        for reader, writer in partial:
            writer.write(b"Connection: close\r\n\r\n")
            assert (await asyncio.wait_for(reader.read(-1), 10)).endswith(BODY)
            writer.close()
        # Completed heads free their places.
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\n")
        await asyncio.sleep(0.1)
        writer.write(b"Host: x\r\nConnection: close\r\n\r\n")
        assert (await asyncio.wait_for(reader.read(-1), 10)).endswith(BODY)
        writer.close()


async def test_max_connections_refusal_is_counted_once_as_outcome_and_status():
    port, backend = free_port(), free_port()
    config = http_config(http_service("web", port, backend, "max_connections: 1"))
    async with running(config_from(config)) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(BODY), 15)
        refused = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert status(refused) == 503
        writer.close()
        stats = proxy.services["web"].stats
        assert stats.connections["rejected_limit"] == 1, dict(stats.connections)
        assert stats.http_answers[503] == 1, dict(stats.http_answers)


async def test_probe_connections_reset_by_the_client_are_harmless():
    """The gateway resets its probe connection without reading the body."""
    port, backend = free_port(), free_port()
    async with running(config_from(http_config(http_service("web", port, backend)))) as proxy:
        for _ in range(20):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GATEWAY_PROBE)
            await reader.readuntil(b"\r\n\r\n")
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            writer.close()  # linger 0: a reset, as the gateway's client does
        await wait_until(lambda: not proxy.services["web"].connections, within=5)
        reply = await exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert reply.endswith(BODY)
        assert proxy.services["web"].stats.wakes["ok"] == 1


async def test_waiting_page_for_browsers_while_a_stopped_backend_starts():
    port, backend = free_port(), free_port()
    config = http_config(
        http_service(
            "web", port, backend,
            "http: {waiting_page: true}",
            "sleep_policy: {action: stop}",
        )
    )  # fmt: skip
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        browser = b"GET / HTTP/1.1\r\nHost: web\r\nAccept: text/html,*/*\r\n\r\n"
        page = await exchange(port, browser)
        assert status(page) == 503 and b'http-equiv="refresh"' in page
        assert b"Content-Type: text/html" in page
        # The page started the backend; the reload a moment later reaches it.
        await wait_until(lambda: service.state is State.RUNNING, within=15)
        assert (
            await exchange(port, browser.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
        ).endswith(BODY)
        assert service.stats.connections["waiting_page"] == 1


async def test_session_set_up_and_tear_down_are_not_activity():
    port, backend = free_port(), free_port()
    config = http_config(http_service("web", port, backend, "sleep_policy: {idle_timeout: 600}"))
    async with running(config_from(config)) as proxy:
        service = proxy.services["web"]
        await service.wake("test")
        body = b'[{"jsonrpc":"2.0","id":1,"method":"initialize"},{"jsonrpc":"2.0","method":"ping"}]'
        close = b"Connection: close\r\n"
        setup = {
            "initialize+ping": b"POST /mcp HTTP/1.1\r\nHost: x\r\n"
            + b"Content-Type: application/json\r\n" + close
            + f"Content-Length: {len(body)}\r\n\r\n".encode() + body,
            "DELETE": b"DELETE /mcp HTTP/1.1\r\nHost: x\r\n" + close + b"\r\n",
            "event stream": b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n"
            + close + b"\r\n",
        }  # fmt: skip
        for what, request in setup.items():
            # Each alone on its own connection: neither the request nor its connection's
            # open and close move the idle clock.
            before = service.last_activity
            await asyncio.sleep(0.01)
            reply = await exchange(port, request)
            assert reply.startswith(b"HTTP/1.1 200 OK"), (what, reply[:60])
            await wait_until(lambda: not service.connections, within=5)
            assert service.last_activity == before, f"{what} counted as activity"
        call = b'{"jsonrpc":"2.0","id":2,"method":"tools/call"}'
        marks = []
        for payload in (body, call):
            request = (
                b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                + f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode() + payload
            )  # fmt: skip
            before = service.last_activity
            await asyncio.sleep(0.01)
            await exchange(port, request)
            await wait_until(lambda: not service.connections, within=5)
            marks.append(service.last_activity > before)
        assert marks == [False, True], "session set-up is no activity; a tool call is"
