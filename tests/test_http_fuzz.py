"""Random bytes at a mode-http listener: the proxy stays up and serves the next good request.

The proxy runs on its own uvloop thread for the whole test, so hypothesis can drive it
with plain blocking sockets on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import itertools
import socket
import threading
from collections.abc import Iterator

import pytest
import uvloop
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.helpers import backend_command, config_from, free_port, running
from wakeproxy.httpmode.chunks import BadChunk, ChunkedBody

BODY = b"hello from the backend\n"
GOOD = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


@pytest.fixture(scope="module")
def proxy_port() -> Iterator[int]:
    port, backend = free_port(), free_port()
    config = config_from(
        "\n".join(
            [
                "services:",
                "  web:",
                f"    listen: 127.0.0.1:{port}",
                f"    backend: 127.0.0.1:{backend}",
                f"    command: {backend_command(backend)}",
                "    mode: http",
                "    http: {header_timeout: 0.5}",
            ]
        )
    )
    loop = uvloop.new_event_loop()
    ready = threading.Event()
    stop: asyncio.Future[None] = loop.create_future()

    async def serve() -> None:
        async with running(config):
            ready.set()
            await stop

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert ready.wait(30), "the proxy did not start"
    try:
        yield port
    finally:
        loop.call_soon_threadsafe(stop.set_result, None)
        thread.join(30)
        loop.close()


def send(port: int, data: bytes, *, read: bool) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.settimeout(10)
        try:
            sock.sendall(data)
            if not read:
                return b""
            reply = b""
            while chunk := sock.recv(65536):
                reply += chunk
            return reply
        except OSError:
            return b""  # the proxy may close on us mid-send: that is allowed


_token = st.binary(min_size=0, max_size=40)
_near_http = st.builds(
    lambda method, target, headers, body: method + b" " + target + b" HTTP/1.1\r\n"
    + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body,
    st.sampled_from([b"GET", b"POST", b"DELETE", b"PUT", b"G\x00T", b""]),
    st.one_of(st.just(b"/sse"), st.just(b"/"), _token),
    st.lists(
        st.tuples(
            st.sampled_from(
                [b"Host", b"Content-Length", b"Transfer-Encoding", b"Accept", b"Connection"]
            )
            | _token,
            st.sampled_from(
                [b"chunked", b"5", b"-1", b"text/event-stream", b"close", b"gzip, chunked"]
            )
            | _token,
        ),
        max_size=6,
    ),
    st.binary(max_size=200),
)  # fmt: skip


@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(st.one_of(st.binary(max_size=3000), _near_http))
def test_random_bytes_never_take_the_proxy_down(proxy_port: int, data: bytes) -> None:
    send(proxy_port, data, read=False)
    reply = send(proxy_port, GOOD, read=True)
    assert reply.startswith(b"HTTP/1.1 200 OK") and reply.endswith(BODY), reply[:200]


_chunk = st.binary(min_size=1, max_size=300)


@settings(max_examples=300, deadline=None)
@given(
    chunks=st.lists(_chunk, max_size=5),
    extension=st.sampled_from([b"", b";a=b", b' ; name="quoted"']),
    trailers=st.lists(st.sampled_from([b"X-T: 1", b"Digest: abc"]), max_size=2),
    after=st.binary(max_size=40),
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=6),
)
def test_chunked_bodies_end_where_they_end_however_they_are_split(
    chunks: list[bytes], extension: bytes, trailers: list[bytes], after: bytes, cuts: list[int]
) -> None:
    body = b"".join(b"%x%s\r\n%s\r\n" % (len(c), extension, c) for c in chunks)
    body += b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"
    stream = body + after
    parser, kept, end, offset = ChunkedBody(), bytearray(), -1, 0
    for piece in _split(stream, cuts):
        end = parser.feed(piece, kept)
        if end >= 0:
            end += offset
            break
        offset += len(piece)
    assert end == len(body), (end, len(body))
    assert bytes(kept) == b"".join(chunks)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=400), st.lists(st.integers(min_value=0, max_value=400), max_size=4))
def test_random_bytes_as_a_chunked_body_end_or_fail_cleanly(data: bytes, cuts: list[int]) -> None:
    parser = ChunkedBody()
    try:
        for piece in _split(data, cuts):
            if parser.feed(piece) >= 0:
                break
    except BadChunk:
        pass


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [data]
