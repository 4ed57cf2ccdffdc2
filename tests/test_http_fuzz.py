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
    extension=st.sampled_from([b"", b";a=b", b';name="quoted" ; b']),
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


@pytest.mark.parametrize("line", [b"5 \r\n", b"5\t\r\n", b"5 ;a=b\r\n", b" 5\r\n"])
def test_whitespace_around_a_chunk_size_is_refused(line: bytes) -> None:
    # node's llhttp refuses it; a parser that read " " as the size's end and one that
    # did not would disagree on where the body ends.
    with pytest.raises(BadChunk, match="illegal chunk size"):
        ChunkedBody().feed(line + b"hello\r\n0\r\n\r\n")


def _damaged(chunks: list[bytes], tail: bytes, at: int, byte: int) -> bytes:
    """A valid chunked body, then ``tail``, with one byte replaced (``at`` past the end:
    none): mostly near-valid bodies, so that all three outcomes come up."""
    data = bytearray(b"".join(b"%x\r\n%s\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n")
    data += tail
    if at < len(data):
        data[at] = byte
    return bytes(data)


_body_like = st.builds(
    _damaged,
    st.lists(st.binary(min_size=1, max_size=40), max_size=3),
    st.binary(max_size=20),
    st.integers(0, 300),
    st.integers(0, 255),
)


@settings(max_examples=300, deadline=None)
@given(
    st.one_of(st.binary(max_size=400), _body_like),
    st.lists(st.integers(min_value=0, max_value=400), max_size=4),
)
def test_random_bytes_as_a_chunked_body_end_or_fail_cleanly(data: bytes, cuts: list[int]) -> None:
    # Cleanly: BadChunk is the only error (any other would fail the test), the outcome
    # does not depend on how the bytes were split, and an end is a real one: within the
    # bytes, and the bytes up to it parse alone as a whole body ending there.
    outcome = _parse(data, cuts)
    assert outcome == _parse(data, []), (outcome, _parse(data, []))
    kind, end = outcome
    assert kind in ("end", "bad", "more")
    if kind == "end":
        assert 0 < end <= len(data)
        assert _parse(data[:end], []) == ("end", end)


def _parse(data: bytes, cuts: list[int]) -> tuple[str, int]:
    """("end", where the body ends), ("bad", -1) for BadChunk, ("more", -1) when it
    wants more bytes."""
    parser, offset = ChunkedBody(), 0
    try:
        for piece in _split(data, cuts):
            end = parser.feed(piece)
            if end >= 0:
                return "end", offset + end
            offset += len(piece)
    except BadChunk:
        return "bad", -1
    return "more", -1


def _split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a] or [data]
