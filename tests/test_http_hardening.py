"""Mode http against a hostile client: headers a client may not choose, an upgrade the
server never agreed to, pipelining that would hold the loop, bounds on what one client
can hold (probe streams, MCP sessions), framing a server behind may read differently.
Each test reproduces a fault an adversarial pass found (and failed before its fix); the
last ones hold a connection's per-request shortcuts (issue 29) to what they skip."""

from __future__ import annotations

import asyncio
import itertools
import types

import pytest

from tests.helpers import (
    MCP_SERVER,
    PYTHON,
    config_from,
    consecutive_ports,
    exchange,
    free_port,
    mcp_client,
    running,
    shout,
    wait_until,
    whoami,
)
from tests.test_http import BODY, GATEWAY_PROBE, http_config, http_service, status
from tests.test_mcp_protocol import _front
from wakeproxy.config.model import HttpSettings
from wakeproxy.core.states import Outcome, State
from wakeproxy.httpmode import client, conn
from wakeproxy.httpmode.client import REQUESTS_PER_TURN, HttpClientSide
from wakeproxy.httpmode.heads import Head, parse_head
from wakeproxy.net import forward

pytestmark = pytest.mark.asyncio


def echo_head(host: bytes, *extra: bytes) -> bytes:
    lines = [b"GET /echo-head HTTP/1.1", b"Host: " + host, *extra, b"Connection: close"]
    return b"\r\n".join(lines) + b"\r\n\r\n"


async def test_a_client_cannot_choose_its_forwarded_address_host_or_scheme():
    port, backend = free_port(), free_port()
    trusted_port, trusted_backend = free_port(), free_port()
    config = config_from(
        http_config(
            http_service("web", port, backend, "http: {forwarded_headers: true}"),
            http_service(
                "behind",
                trusted_port,
                trusted_backend,
                "http: {forwarded_headers: true, trust_forwarded_from: [127.0.0.0/8]}",
            ),
        )
    )
    spoofed = (
        b"X-Forwarded-For: 6.6.6.6",
        b"x-forwarded-host: evil.example",
        b"X-Forwarded-Proto: https",
        b"Forwarded: for=6.6.6.6;proto=https",
        b"X-Forwarded-Prefix: /evil",
        b"X-Real-IP: 6.6.6.6",
    )
    async with running(config):
        seen = await exchange(port, echo_head(b"h.test", *spoofed))
        assert b"6.6.6.6" not in seen and b"evil.example" not in seen and b"https" not in seen
        assert b"/evil" not in seen
        assert b"X-Forwarded-For: 127.0.0.1\r\n" in seen
        assert b"X-Forwarded-Host: h.test\r\n" in seen
        assert b"X-Forwarded-Proto: http\r\n" in seen
        # A proxy in front, trusted by its address: its lines are kept, its own
        # address appended (the usual ProxyFix(x_for=1) then reads the last hop).
        seen = await exchange(trusted_port, echo_head(b"h.test", *spoofed))
        assert b"X-Forwarded-For: 6.6.6.6, 127.0.0.1\r\n" in seen
        assert b"X-Forwarded-Host: evil.example\r\n" in seen
        assert b"X-Forwarded-Proto: https\r\n" in seen
        assert b"Forwarded: for=6.6.6.6;proto=https\r\n" in seen
        assert b"X-Forwarded-Prefix: /evil\r\n" in seen and b"X-Real-IP: 6.6.6.6\r\n" in seen


SMUGGLE = (
    b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\n"
)


@pytest.mark.parametrize(
    "upgrade",
    [
        # A made-up token containing "upgrade": no upgrade at all.
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: x-upgrade-foo\r\n\r\n",
        # A real upgrade request the server answers 200: HTTP goes on.
        b"GET /no-upgrade HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    ],
)
async def test_only_a_server_agreeing_to_an_upgrade_makes_the_connection_plain_bytes(upgrade):
    port, backend = free_port(), free_port()
    async with running(config_from(http_config(http_service("web", port, backend)))) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(upgrade)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        assert status(head) == 200
        await asyncio.wait_for(reader.readexactly(len(BODY)), 10)
        # Still HTTP: a request with both framings is refused, never forwarded (the
        # server would answer it with BODY). The proxy does not follow this connection's
        # answers, so it cannot tell whether one is under way: it closes, unanswered.
        writer.write(SMUGGLE)
        refused = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        assert refused == b"" or status(refused) == 400, refused
        assert BODY not in refused
        assert proxy.services["web"].stats.connections[Outcome.BAD_REQUEST] == 1


async def test_an_upgrade_after_other_requests_on_an_unfollowed_connection_is_refused():
    # Only where the proxy follows the answers can it see the 101; a kept-alive
    # connection of plain requests asking for an upgrade later is told so.
    port, backend = free_port(), free_port()
    async with running(config_from(http_config(http_service("web", port, backend)))) as proxy:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(BODY), 15)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: ws\r\n\r\n")
        refused = await asyncio.wait_for(reader.read(-1), 10)
        writer.close()
        # Refused (closed: an answer of the proxy's own might cut into the server's).
        assert BODY not in refused
        assert proxy.services["web"].stats.connections[Outcome.BAD_REQUEST] == 1


async def test_probe_streams_held_open_are_bounded_per_service():
    port, backend = free_port(), free_port()
    settings = "http: {max_probe_streams: 2}"
    async with running(
        config_from(http_config(http_service("web", port, backend, settings)))
    ) as proxy:
        service, listener = proxy.services["web"], proxy.frontends["web"]
        assert service.state is State.STOPPED  # probes are answered by the proxy
        held = []
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(GATEWAY_PROBE)
            assert status(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)) == 200
            held.append(writer)
        await wait_until(lambda: listener.probe_streams == 2, within=10)
        # The third is answered (a probe reads the status) and closed at once.
        third = await exchange(port, GATEWAY_PROBE)
        assert status(third) == 200 and listener.probe_streams == 2
        for writer in held:
            writer.close()
        await wait_until(lambda: listener.probe_streams == 0, within=10)
        assert service.stats.wakes["ok"] == 0


@pytest.mark.parametrize(
    ("head", "why"),
    [
        (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551617\r\n\r\n", b"2**63"),
        (b"GET / HTTP/1.1\nHost: x\n\n", b"bare LF"),
        (b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", b"bare LF"),
    ],
)
async def test_framing_a_server_may_read_differently_is_refused(head, why):
    port, backend = free_port(), free_port()
    async with running(config_from(http_config(http_service("web", port, backend)))) as proxy:
        reply = await exchange(port, head)
        assert status(reply) == 400 and why in reply, reply
        service = proxy.services["web"]
        assert service.state is State.STOPPED, "a refused request wakes nothing"
        assert service.stats.connections[Outcome.BAD_REQUEST] == 1


class _Owner:
    """The least a connection needs of its service, for the turn-by-turn count below
    (a unit test of the byte path: no backend is reached)."""

    idle_connection_timeout = 0.0
    wake_on_connect = False
    state = State.STOPPED
    http = HttpSettings()
    probe_rules = ()
    idle_delay = 60.0
    mcp = None
    replicated = False

    def connection_made(self, conn):
        return True

    def needs_backend(self, conn, *, activity, attached):
        pass

    def no_longer_needs(self, conn):
        pass

    def connection_lost(self, conn):
        pass

    def record(self, conn, outcome, status=None):
        pass

    def request_seen(self, conn):
        pass

    def result_due(self, conn):
        pass

    def wake_in_background(self, reason):
        pass

    def head_started(self):
        return True

    def head_ended(self):
        pass

    def stream_started(self):
        return True

    def stream_ended(self):
        pass


class _Transport:
    def __init__(self) -> None:
        self.reading = True
        self.paused = 0

    def set_write_buffer_limits(self, high, low):
        pass

    def pause_reading(self):
        assert self.reading, "paused twice (a reason would be lost)"
        self.reading = False
        self.paused += 1

    def resume_reading(self):
        assert not self.reading, "resumed while reading"
        self.reading = True

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def is_closing(self):
        return False


async def test_a_read_full_of_pipelined_heads_is_handled_a_share_per_turn():
    # One client pipelining megabytes of different heads held the loop for seconds
    # (every request in one read parsed before anything else ran, the rest of the read
    # copied for each). Now a read is handled REQUESTS_PER_TURN requests at a time,
    # its reading paused until the loop came back to it.
    conn = HttpClientSide(_Owner())  # type: ignore[arg-type]
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    heads = [b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(1000)]
    conn.data_received(b"".join(heads))
    assert len(conn._pending) == REQUESTS_PER_TURN and not transport.reading
    turns = 1
    while len(conn._pending) < len(heads):
        await asyncio.sleep(0)
        turns += 1
        assert turns < 100
    assert b"".join(conn._pending) == b"".join(heads), "every byte, in order"
    assert turns == -(-len(heads) // REQUESTS_PER_TURN)
    await asyncio.sleep(0)
    assert transport.reading, "reading again once all of it was handled"
    conn.connection_lost(None)


async def test_a_turn_ending_never_resumes_reading_a_backend_too_slow_for():
    # The backend's write buffer is full (UpstreamSide.pause_writing): reading the client
    # stays paused however many turns its pipelined requests take, or one client that
    # never reads its answers grows the proxy's memory without bound.
    conn = HttpClientSide(_Owner())  # type: ignore[arg-type]
    transport = _Transport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.pause_for(forward.BACKEND_FULL)
    heads = [b"GET /%d HTTP/1.1\r\nHost: x\r\n\r\n" % i for i in range(200)]
    conn.data_received(b"".join(heads))
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(conn._pending) == len(heads) and not transport.reading
    conn.resume_for(forward.BACKEND_FULL)
    assert transport.reading
    conn.connection_lost(None)


async def test_one_connection_cannot_flush_other_sessions_pins():
    # 10,001 pipelined initialize requests on one connection used to evict every pin of
    # the 10,000-entry table: other clients' sessions then went to the wrong replica.
    port, first = free_port(), consecutive_ports(2)
    command = [PYTHON, MCP_SERVER, "--port", "{port}", "--transport", "streamable-http"]
    config = config_from(
        "\n".join(
            [
                "services:",
                "  tools:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{first}",
                "    command: [" + ", ".join(f'"{a}"' for a in command) + "]",
                "    mode: http",
                "    wake_timeout: 30",
                "    replicas: {count: 2, min: 2, target_inflight: 100}",
            ]
        )
    )
    async with running(config) as proxy:
        pool = proxy.frontends["tools"]
        await wait_until(lambda: all(r.state is State.RUNNING for r in pool.backends), within=60)
        async with mcp_client(port) as mine:
            home = await whoami(mine.session)
            body = (
                b'{"jsonrpc":"2.0","id":1,"method":"initialize","params":{"protocolVersion":'
                b'"2025-11-25","capabilities":{}}}'
            )
            init = (
                b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Accept: application/json, text/event-stream\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            flood = await exchange(port, init * 150 + b"GET /x HTTP/1.1\r\nHost: x\r\n"
                                   b"Connection: close\r\n\r\n", within=60)  # fmt: skip
            assert flood.count(b"HTTP/1.1 200 OK") >= 100
            assert flood.count(b"HTTP/1.1 429 Too Many Requests") == 50
            assert pool.mcp.sessions.refused == 50
            # The earlier session is where it was.
            assert await whoami(mine.session) == home
            assert await shout(mine.session, "still") == "STILL!"


async def test_a_get_or_delete_body_is_a_body_never_a_request():
    # A DELETE naming an MCP session went to the MCP path without its body framed: the
    # proxy read the body as the next request (and wrote forwarded headers into it).
    port, backend = free_port(), free_port()
    settings = "http: {forwarded_headers: true}"
    async with running(config_from(http_config(http_service("web", port, backend, settings)))):
        inner = b"GET /admin HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 6.6.6.6\r\n\r\n"
        head = b"DELETE /echo HTTP/1.1\r\nHost: x\r\nMcp-Session-Id: abc\r\nConnection: close\r\n"
        reply = await exchange(port, head + b"Content-Length: %d\r\n\r\n" % len(inner) + inner)
        assert reply.count(b"HTTP/1.1 ") == 1, reply
        assert reply.endswith(b"\r\n\r\n" + inner), "the body reached the server unchanged"


async def test_an_upgrade_with_a_body_is_answered():
    # The proxy waited for the server's answer before sending the request's own body;
    # the server waited for the body.
    port, backend = free_port(), free_port()
    async with running(config_from(http_config(http_service("web", port, backend)))):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(
            b"POST /up HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 5\r\n\r\nhello"
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 15)
        assert status(head) == 101
        writer.write(b"raw bytes both ways\n")
        assert await asyncio.wait_for(reader.readline(), 10) == b"raw bytes both ways\n"
        writer.close()


async def test_the_proxys_own_answer_never_overtakes_a_response_due_before_it():
    # A request of a session the proxy minted and no longer holds is answered 404 by the
    # proxy, but not ahead of the response to the request pipelined before it.
    port, backend = free_port(), free_port()
    async with running(config_from(http_config(http_service("web", port, backend)))):

        def post(session: bytes, request_id: int) -> bytes:
            body = b'{"jsonrpc":"2.0","id":%d,"method":"tools/call","params":{}}' % request_id
            return (
                b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Mcp-Session-Id: " + session + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body
            )

        unknown = b"wp-" + b"0" * 32
        reply = await exchange(
            port,
            post(b"theirs", 1) + post(unknown, 2) + b"GET / HTTP/1.1\r\nHost: x\r\n"
            b"Connection: close\r\n\r\n",
        )
        first = reply.index(b'"id":1')
        assert reply.count(b"HTTP/1.1 ") == 3 and first < reply.index(b'"id":2'), reply


# ---- a connection's per-request shortcuts (issue 29), without a socket


class _Counting(_Owner):
    """An owner that counts how often a connection moves its backend's idle clock."""

    def __init__(self, **http: object) -> None:
        self.http = HttpSettings(**http)  # type: ignore[arg-type]
        self.seen = 0

    def request_seen(self, conn):
        self.seen += 1


class _Peer(_Transport):
    """A transport that counts the asks for its peer's address, and takes an answer."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0
        self.written = b""
        self.closed = False

    def get_extra_info(self, name, default=None):
        if name == "peername":
            self.asked += 1
        return super().get_extra_info(name, default)

    def write(self, data):
        self.written += data

    def close(self):
        self.closed = True


def _connected(owner: _Owner) -> tuple[HttpClientSide, _Peer]:
    side = HttpClientSide(owner)  # type: ignore[arg-type]
    transport = _Peer()
    side.connection_made(transport)  # type: ignore[arg-type]
    return side, transport


async def _all_handled(side: HttpClientSide, requests: int) -> None:
    """Until ``requests`` requests went up (a read is handled a share per turn)."""
    for _ in range(requests // REQUESTS_PER_TURN + 2):
        if len(side._pending) >= requests:
            return
        await asyncio.sleep(0)
    raise AssertionError(f"{len(side._pending)} of {requests} requests went up")


POLL = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


def _parses(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The heads a connection parses from now on, in order."""
    parsed: list[bytes] = []

    def parse(raw: bytes) -> Head:
        parsed.append(raw)
        return parse_head(raw)

    monkeypatch.setattr(client, "parse_head", parse)
    return parsed


async def test_a_head_repeated_byte_for_byte_reuses_its_parse(monkeypatch):
    parsed = _parses(monkeypatch)
    side, _ = _connected(_Owner())
    side.data_received(POLL)
    first = side.head
    side.data_received(POLL)
    assert side.head is first
    # In pieces (a partial head, its timer armed): the same bytes, the same parse, and
    # the timer stopped as after any head.
    side.data_received(POLL[:9])
    assert side._header_handle is not None
    side.data_received(POLL[9:])
    assert side.head is first and side._header_handle is None
    other = POLL.replace(b"Host: x", b"Host: y")
    side.data_received(other)
    assert side.head is not first and side.head.raw == other
    side.data_received(POLL)
    assert side.head is not first and side.head.raw == POLL, "only the previous one is kept"
    assert parsed == [POLL, other, POLL]
    assert b"".join(side._pending) == POLL * 3 + other + POLL, "every request went up"
    side.connection_lost(None)


async def test_a_refused_head_is_never_kept_for_the_next_one(monkeypatch):
    parsed = _parses(monkeypatch)
    bad = POLL.replace(b"\r\nHost", b"\nHost")  # a bare LF
    side, transport = _connected(_Owner())
    side.data_received(bad)
    assert side.head is None and side.answered and transport.written.startswith(b"HTTP/1.1 400")
    side.connection_lost(None)
    # After a valid head: the refused one does not take its place.
    side, transport = _connected(_Owner())
    side.data_received(POLL)
    first = side.head
    side.data_received(bad)
    assert side.head is first and transport.written.startswith(b"HTTP/1.1 400")
    assert parsed == [bad, POLL, bad] and b"".join(side._pending) == POLL
    side.connection_lost(None)


async def test_a_connections_requests_move_the_idle_clock_once_per_touch_every(monkeypatch):
    # Only the connection module's clock is stopped (not the loop's).
    now = [1000.0]
    monkeypatch.setattr(conn, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    owner = _Counting()
    side, _ = _connected(owner)
    side.data_received(POLL * 100)
    await _all_handled(side, 100)
    assert owner.seen == 1 and side.last_request == 1000.0 and side.active
    now[0] = 1000.0 + conn.TOUCH_EVERY / 2
    side.data_received(POLL * 100)
    await _all_handled(side, 200)
    assert owner.seen == 1, "within TOUCH_EVERY of the last: the clock is not moved"
    assert side.last_request == now[0], "the connection's own stamp is every request's"
    now[0] = 1000.0 + conn.TOUCH_EVERY
    side.data_received(POLL)
    await _all_handled(side, 201)
    assert owner.seen == 2 and side.last_request == now[0]
    # A probe or a stream's opening is no activity: never counted, however late.
    now[0] += 10 * conn.TOUCH_EVERY
    side.data_received(b"GET /events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    await _all_handled(side, 202)
    assert owner.seen == 2 and side.last_request == 1000.0 + conn.TOUCH_EVERY
    side.connection_lost(None)


async def test_the_peer_address_is_asked_of_the_transport_once():
    # uvloop asks the kernel (getpeername) at every get_extra_info("peername").
    owner = _Counting(forwarded_headers=True)
    side, transport = _connected(owner)
    side.data_received(POLL * 100)
    await _all_handled(side, 100)
    side.data_received(POLL.replace(b"/health", b"/other"))
    await _all_handled(side, 101)
    assert transport.asked == 1
    sent = b"".join(side._pending)
    assert sent.count(b"\r\nX-Forwarded-For: 127.0.0.1\r\n") == 101, sent[:300]
    side.connection_lost(None)


class _Mcp(_Counting):
    """An owner with an MCP front (http.mcp on), whose connections are placed at once."""

    def __init__(self) -> None:
        super().__init__()
        self.mcp = _front()

    def needs_backend(self, conn, *, activity, attached):
        conn.backend = types.SimpleNamespace(name="svc", incarnation=1, state=State.RUNNING)


@pytest.mark.parametrize("cuts", [(), (60,), (90, 91, 120), tuple(range(1, 200))])
async def test_an_mcp_message_goes_up_whole_however_its_reads_cut_it(cuts):
    body = b'{"jsonrpc":"2.0","id":7,"method":"tools/call","params":{"name":"x"}}'
    post = (
        b"POST /mcp HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    # The next request right behind the message (a stream's opening: no activity).
    stream = post + b"GET /mcp HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n"
    owner = _Mcp()
    side, _ = _connected(owner)
    points = [0, *(c for c in cuts if c < len(stream)), len(stream)]
    for start, stop in itertools.pairwise(points):
        side.data_received(stream[start:stop])
    await _all_handled(side, 2)
    assert b"".join(side._pending) == stream and list(side.tracker.methods) == [b"POST", b"GET"]
    assert owner.seen == 1 and side.active, "the message is work: the idle clock moved"
    side.connection_lost(None)
