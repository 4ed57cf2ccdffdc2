"""The proxy's request-head parser (httpmode.heads) against the h11-based one it replaced
(tests/reference_heads.py): every head the reference refuses is refused, every head both
accept is read the same way, and the heads the reference let through that a server
behind could read differently (bare CR, control characters, an unknown version,
Content-Length given twice) are refused with a reason a client can read. No socket."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests import reference_heads
from wakeproxy.httpmode.heads import HEAD_END, MAX_LENGTH, BadRequest, Head, parse_head

# Header names whose values the proxy reads, and a few it never does.
NAMES = [
    b"Host", b"host", b"HOST", b"Content-Length", b"content-length", b"Transfer-Encoding",
    b"Connection", b"Upgrade", b"Accept", b"Content-Type", b"Mcp-Session-Id", b"Expect",
    b"X-Forwarded-For", b"X-Odd", b"A", b"a\x00b", b"Host ", b" Host", b"Ho(st", b"",
]  # fmt: skip
VALUES = [
    b"x", b"", b"  spaced  ", b"\tx\t", b"5", b"0", b"05", b"-1", b"+5", b"5, 5", b"5 5",
    b"18446744073709551617", b"9223372036854775807", b"9223372036854775808", b"chunked",
    b"Chunked", b"gzip, chunked", b"chunked, chunked", b"close", b"keep-alive",
    b"Upgrade", b"upgrade, close", b"websocket", b"text/event-stream", b"a\x01b", b"\x7f",
    b"\xff\xfe", b"a\rb", b"a\nb", b"caf\xc3\xa9", b"a\x00b", b"a\x0bb",
]  # fmt: skip
METHODS = [b"GET", b"POST", b"DELETE", b"CONNECT", b"HEAD", b"G\x00T", b"GE T", b"", b"M-SEARCH"]
TARGETS = [b"/", b"/?n=1", b"/sse", b"/mcp?session_id=a", b"*", b"/a b", b"/\x7f", b"/\xff", b""]
VERSIONS = [b"HTTP/1.1", b"HTTP/1.0", b"HTTP/2.0", b"HTTP/1.10", b"HTTP/xyz", b"HTTP/1.1\rX",
            b"http/1.1", b"HTTP/1.1 ", b"HTTP/9.9", b"HTTP/1.2", b"HTTP/0.9"]  # fmt: skip
ENDS = [b"\r\n"] * 8 + [b"\n", b"\r", b"\r\r\n", b" \r\n"]

_line = st.tuples(
    st.sampled_from(NAMES) | st.binary(max_size=8),
    st.sampled_from([b":", b": ", b" :", b":\t", b""]),
    st.sampled_from(VALUES) | st.binary(max_size=12),
    st.sampled_from(ENDS),
).map(lambda p: p[0] + p[1] + p[2] + p[3])
_folded = st.sampled_from([b" folded\r\n", b"\tfolded\r\n"])
_heads = st.builds(
    lambda method, target, version, end, lines: (
        method + b" " + target + b" " + version + end + b"".join(lines) + b"\r\n"
    ),
    st.sampled_from(METHODS),
    st.sampled_from(TARGETS) | st.binary(max_size=10),
    st.sampled_from(VERSIONS),
    st.sampled_from(ENDS),
    st.lists(_line | _folded, max_size=6),
)


def _mutated(head: bytes, at: int, byte: int) -> bytes:
    data = bytearray(head)
    data[at % len(data)] = byte
    return bytes(data)


_damaged = st.builds(_mutated, _heads, st.integers(0, 500), st.integers(0, 255))


def found(data: bytes) -> bytes | None:
    """The head as the connection hands it to the parser: through the first blank line."""
    end = HEAD_END.search(data)
    return data[: end.end()] if end else None


def outcome(parse, raw: bytes) -> tuple[int, object]:
    try:
        return 0, parse(raw)
    except BadRequest as exc:
        return exc.status, None


def same_reading(head: Head, reference: reference_heads.Head) -> None:
    assert (head.method, head.path, head.query) == (
        reference.method,
        reference.path,
        reference.query,
    )
    assert (head.length, head.chunked) == (reference.length, reference.chunked)
    assert (head.keep_alive, head.upgrade) == (reference.keep_alive, reference.upgrade)
    for name, value in reference.headers.items():
        # h11 rewrote these two values (lowercased, de-duplicated); both are read as
        # the framing above, never as text.
        if name not in (b"transfer-encoding", b"content-length"):
            assert head.get(name) == value, name
    assert head.get(b"x-not-sent") == b""
    assert head.session == head.get(b"mcp-session-id"), "read once, as get reads it"


@settings(max_examples=3000, deadline=None)
@given(st.one_of(_heads, _damaged))
def test_every_head_the_reference_refuses_is_refused_and_the_rest_read_the_same(data):
    raw = found(data)
    if raw is None:
        return
    _, head = outcome(parse_head, raw)
    reference_status, reference = outcome(reference_heads.parse_head, raw)
    if reference is None:
        assert head is None, f"the reference refused {raw!r} ({reference_status}), we did not"
    if head is not None:
        assert reference is not None
        same_reading(head, reference)  # type: ignore[arg-type]
        assert head.raw == raw


VALID = [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /?n=1 HTTP/1.0\r\n\r\n",
    b"POST /mcp?session_id=a HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n"
    b"Content-Type: application/json\r\nMcp-Session-Id: s-1\r\n\r\n",
    b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: Chunked\r\nConnection: close\r\n\r\n",
    b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"CONNECT db:5432 HTTP/1.1\r\nHost: db:5432\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nX-Odd:  spaced \r\nX-Odd:\tmore\r\nEmpty:\r\n\r\n",
    b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nAccept: caf\xc3\xa9\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % MAX_LENGTH,
]


@pytest.mark.parametrize("raw", VALID)
def test_valid_heads_are_read_as_the_reference_reads_them(raw):
    same_reading(parse_head(raw), reference_heads.parse_head(raw))


# Heads the reference let through (and the proxy forwarded) that a server behind may
# read differently, or refuse where the proxy did not: each is refused now.
STRICTER = [
    (b"GET / HTTP/xyz\r\nHost: x\r\n\r\n", b"HTTP version"),
    (b"GET / HTTP/9.9\r\n\r\n", b"HTTP version"),
    (b"GET / HTTP/2.0\r\nHost: x\r\n\r\n", b"HTTP version"),
    (b"GET / HTTP/1.1\rX\r\nHost: x\r\n\r\n", b"bare CR"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x01b\r\n\r\n", b"control character"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: \x7f\r\n\r\n", b"control character"),
    (b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n", b"bad Content-Length"),
    (
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
        b"more than one Content-Length",
    ),
]


@pytest.mark.parametrize(("raw", "why"), STRICTER)
def test_heads_a_server_may_read_differently_are_refused_with_a_reason(raw, why):
    reference_heads.parse_head(raw)  # what the reference let through
    with pytest.raises(BadRequest) as refused:
        parse_head(raw)
    assert refused.value.status == 400 and why.decode() in str(refused.value)


REFUSED = [
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
     400, "both Content-Length and Transfer-Encoding"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 18446744073709551617\r\n\r\n", 400, "2**63"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 9223372036854775808\r\n\r\n", 400, "2**63"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400, "bad Content-Length"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n", 400, "bad Content-Length"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 501, "chunked"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
     b"Transfer-Encoding: chunked\r\n\r\n", 501, "multiple Transfer-Encoding"),
    (b"GET / HTTP/1.1\r\nHost: x\r\n folded\r\n\r\n", 400, "obs-fold"),
    (b"GET / HTTP/1.1\r\nHost : x\r\n\r\n", 400, "Illegal header name"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nno colon\r\n\r\n", 400, "without ':'"),
    (b"GET / HTTP/1.1\r\n\r\n", 400, "Missing mandatory Host"),
    (b"GET / HTTP/1.1\r\nHost: a\r\nhost: b\r\n\r\n", 400, "multiple Host"),
    (b"GET / HTTP/1.1\r\nHost: x\r\nX: a\x0bb\r\n\r\n", 400, "control character"),
    (b"GET / HTTP/1.1\nHost: x\n\n", 400, "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: x\nX: y\r\n\r\n", 400, "bare LF"),
    (b"GET / HTTP/1.1\r\nHost: a\rb\r\n\r\n", 400, "bare CR"),
    (b"GET  / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "illegal request line"),
    (b"G\x00T / HTTP/1.1\r\nHost: x\r\n\r\n", 400, "illegal request line"),
    (b"GET /\xff HTTP/1.1\r\nHost: x\r\n\r\n", 400, "illegal request line"),
    (b"GARBAGE\r\n\r\n", 400, "illegal request line"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "status", "why"), REFUSED)
def test_refused_heads_get_their_status_and_reason(raw, status, why):
    with pytest.raises(BadRequest) as refused:
        parse_head(raw)
    assert (refused.value.status, why in str(refused.value)) == (status, True), refused.value
    with pytest.raises(BadRequest):
        reference_heads.parse_head(raw)


def test_a_header_given_twice_reads_as_one_list_in_order():
    head = parse_head(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: a\r\nX: 1\r\naccept:  b \r\n\r\n")
    assert head.get(b"accept") == b"a, b" and head.get(b"x") == b"1" and head.get(b"ac") == b""
    assert head.count(b"accept") == 2


def test_a_heads_session_is_its_mcp_session_id_header_only():
    raw = b"POST / HTTP/1.1\r\nHost: x\r\nMcp-Session-Id-X: no\r\nX: mcp-session-id: no\r\n\r\n"
    assert parse_head(raw).session == b""
    raw = b"GET / HTTP/1.1\r\nHost: x\r\nMCP-SESSION-ID:  s-1 \r\nmcp-session-id:s-2\r\n\r\n"
    head = parse_head(raw)
    assert head.session == b"s-1, s-2" and head.raw == raw
