"""The response tracker (httpmode.tracker) without a socket: one tracker per connection
follows every framing RFC 9112 gives a response, however the bytes are split, and
counts what it cannot follow as in flight until the connection closes; a response's
headers read on demand (ResponseHead) as a header-by-header reading would, and what an
MCP note learns from the answer it was waiting for."""

from __future__ import annotations

import itertools
import re
import time

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.test_mcp_protocol import _front, message
from wakeproxy.httpmode.heads import parse_head
from wakeproxy.httpmode.mcp import classify, credentials
from wakeproxy.httpmode.mcpfront import McpFront
from wakeproxy.httpmode.mcpnote import Expected
from wakeproxy.httpmode.tracker import ResponseTracker, Unframed, read_response_head

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nX-Trailer: 1\r\n\r\n"
)
EMPTY = b"HTTP/1.1 204 No Content\r\n\r\n"
HEAD_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
BARE_LF = b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok"

# (method, response bytes) exchanges, each whole.
EXCHANGES = [
    (b"GET", OK),
    (b"POST", CHUNKED),
    (b"DELETE", EMPTY),
    (b"HEAD", HEAD_ANSWER),
    (b"POST", CONTINUE + OK),
    (b"GET", BARE_LF),
    (b"GET", b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n"),
    (b"GET", b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
    (b"GET", b"HTTP/1.0 200 OK\r\nContent-Length: 3, 3\r\n\r\nabc"),
]


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({min(c, len(data)) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points) if b > a]


class Seen:
    def __init__(self, tracker: ResponseTracker) -> None:
        self.idle = 0
        self.accepted = 0
        self.sessions: list[tuple[bytes, bool]] = []
        self.upgrades: list[bool] = []
        tracker.on_idle = self.idle_now
        tracker.on_202 = self.accepted_now
        tracker.on_session = lambda session, stream: self.sessions.append((session, stream))
        tracker.on_upgrade = self.upgrades.append

    def idle_now(self) -> None:
        self.idle += 1

    def accepted_now(self) -> None:
        self.accepted += 1


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from(EXCHANGES), min_size=1, max_size=6),
    st.lists(st.integers(0, 2000), max_size=8),
)
def test_pipelined_responses_end_where_they_end_however_they_are_split(exchanges, cuts):
    tracker = ResponseTracker()
    seen = Seen(tracker)
    for method, _ in exchanges:
        tracker.expect(method)
    stream = b"".join(response for _, response in exchanges)
    for piece in split(stream, cuts):
        assert tracker.inflight > 0, "every response ends only once its last byte came"
        tracker.feed(piece)
    assert (tracker.inflight, tracker.broken, seen.idle) == (0, False, 1)


def test_one_tracker_follows_every_response_of_a_connection():
    tracker = ResponseTracker()
    seen = Seen(tracker)
    for _ in range(1000):
        tracker.expect(b"GET")
        tracker.feed(OK)
        assert tracker.inflight == 0
    assert seen.idle == 1000


def test_a_body_to_the_connections_end_ends_with_it():
    tracker = ResponseTracker()
    seen = Seen(tracker)
    tracker.expect(b"GET")
    tracker.feed(b"HTTP/1.1 200 OK\r\n\r\nall of this")
    tracker.feed(b" and more")
    assert tracker.inflight == 1
    tracker.closed()
    assert (tracker.inflight, seen.idle) == (0, 1)


def test_a_response_cut_short_stays_in_flight():
    tracker = ResponseTracker()
    tracker.expect(b"GET")
    tracker.feed(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nhalf")
    tracker.closed()
    assert tracker.inflight == 1


@pytest.mark.parametrize(
    "response",
    [
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5, 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"SSH-2.0-OpenSSH\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nBad Header\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\n\r\n",  # no upgrade was asked
        # A bare CR ending Transfer-Encoding's value (before its CRLF): not "chunked"
        # (h11 refused the line; the value is never read without its CR).
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\r\n\r\n0\r\n\r\n",
    ],
)
def test_framing_it_cannot_follow_is_in_flight_until_the_connection_closes(response):
    tracker = ResponseTracker()
    tracker.expect(b"GET")
    tracker.feed(response)
    tracker.feed(OK)
    assert tracker.broken and tracker.inflight == 1


def test_a_get_event_stream_stops_counting_at_its_head_a_post_one_at_its_end():
    tracker = ResponseTracker()
    seen = Seen(tracker)
    tracker.expect(b"POST")
    stream = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 9\r\n\r\n"
    tracker.feed(stream + b"data: 1\n\n")
    assert (tracker.inflight, seen.idle) == (0, 1)
    tracker.expect(b"GET")
    tracker.feed(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n: ping\n\n")
    assert tracker.inflight == 0 and not tracker.broken


def test_a_202_to_a_post_says_a_result_may_come_and_sessions_are_named():
    tracker = ResponseTracker()
    seen = Seen(tracker)
    tracker.expect(b"POST")
    tracker.feed(b"HTTP/1.1 202 Accepted\r\nMcp-Session-Id: s-1\r\nContent-Length: 0\r\n\r\n")
    assert (seen.accepted, seen.sessions) == (1, [(b"s-1", False)])
    tracker.expect(b"DELETE")  # a DELETE's answer names the session it ended
    tracker.feed(b"HTTP/1.1 200 OK\r\nMcp-Session-Id: s-1\r\nContent-Length: 0\r\n\r\n")
    assert seen.sessions == [(b"s-1", False)]


@pytest.mark.parametrize("encoded", [False, True])
def test_an_event_streams_endpoint_event_is_read_through_its_framing(encoded):
    tracker = ResponseTracker()
    seen = Seen(tracker)
    tracker.expect(b"GET")
    event = b": ping\r\n\r\nevent: endpoint\r\ndata: /messages/?session_id=abc123\r\n\r\n"
    if encoded:
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked"
        body = b"".join(b"%x\r\n%s\r\n" % (len(part), part) for part in (event[:30], event[30:]))
    else:
        head, body = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream", event
    stream = head + b"\r\n\r\n" + body
    for piece in split(stream, list(range(0, len(stream), 7))):
        tracker.feed(piece)
    assert seen.sessions == [(b"abc123", True)] and not tracker.scanning


@pytest.mark.parametrize(
    ("answer", "switched"),
    [
        (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nraw bytes", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nno", False),
    ],
)
def test_an_upgrade_is_decided_by_the_servers_answer(answer, switched):
    tracker = ResponseTracker()
    seen = Seen(tracker)
    tracker.expect(b"GET")
    tracker.upgrading()
    tracker.feed(answer)
    assert seen.upgrades == [switched] and tracker.inflight == 0 and not tracker.broken


def test_a_connect_is_switched_by_a_2xx():
    tracker = ResponseTracker()
    seen = Seen(tracker)
    tracker.expect(b"CONNECT")
    tracker.upgrading()
    tracker.feed(b"HTTP/1.1 200 Connection Established\r\n\r\n\x16\x03\x01 tls bytes")
    assert seen.upgrades == [True] and tracker.inflight == 0 and not tracker.broken


# ---- a response head's headers, read on demand


def _reference(raw: bytes) -> tuple[int, list[tuple[bytes, bytes]]] | None:
    """A response head read line by line, every header copied out (the tracker's reading
    before ResponseHead read on demand): None where it refused the head."""
    lines = re.split(rb"\r?\n", raw)
    status = re.fullmatch(rb"HTTP/1\.[0-9] ([0-9]{3})(?:[ \t][^\r\n]*)?", lines[0])
    if status is None:
        return None
    headers = []
    for line in lines[1:]:
        if not line:
            break
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            return None
        headers.append((name.lower(), value.strip(b" \t")))
    return int(status.group(1)), headers


RESPONSE_NAMES = [
    b"Content-Type", b"content-type", b"CONTENT-TYPE", b"Content-Type-X", b"X-Content-Type",
    b"Content-Length", b"Transfer-Encoding", b"Mcp-Session-Id", b"Vary", b"A", b"a b",
    b" Vary", b"Vary ", b"", b"content-type:",
]  # fmt: skip
RESPONSE_VALUES = [
    b"", b"x", b"  text/plain ", b"\tchunked\t", b"5", b"a, b", b"content-type: evil",
    b"x\rcontent-type: evil", b"\r", b"5\r", b"\rx", b"caf\xc3\xa9", b":",
]  # fmt: skip
_response_line = st.tuples(
    st.sampled_from(RESPONSE_NAMES),
    st.sampled_from([b":", b": ", b" :", b""]),
    st.sampled_from(RESPONSE_VALUES),
    st.sampled_from([b"\r\n", b"\r\n", b"\n"]),
).map(lambda p: p[0] + p[1] + p[2] + p[3])


@settings(max_examples=500, deadline=None)
@given(
    st.sampled_from([b"HTTP/1.1 200 OK", b"HTTP/1.0 404", b"HTTP/1.1 202 content-type: x"]),
    st.sampled_from([b"\r\n", b"\n"]),
    st.lists(_response_line, max_size=6),
    st.sampled_from([b"\r\n", b"\n"]),
)
def test_a_response_heads_headers_read_as_a_line_by_line_reading_reads_them(
    status, status_end, lines, end
):
    raw = status + status_end + b"".join(lines) + end
    cut = re.search(rb"\n\r?\n", raw)
    assert cut is not None
    raw = raw[: cut.end()]  # through its first blank line, as the tracker finds it
    reference = _reference(raw)
    if reference is None:
        with pytest.raises(Unframed):
            read_response_head(raw)
        return
    head = read_response_head(raw)
    assert head.status == reference[0]
    asked = {name.strip().lower() for name in RESPONSE_NAMES if b":" not in name}
    asked |= {name for name, _ in reference[1]}
    for name in asked:
        expected = b", ".join(value for key, value in reference[1] if key == name)
        assert head.get(name) == expected, name


@pytest.mark.parametrize("crlf", [b"\r\n", b"\n"])
def test_a_header_is_found_by_its_whole_name_whatever_its_case(crlf):
    lines = [
        b"HTTP/1.1 200 content-type: not a header",
        b"Content-Type-X: no",
        b"X-Content-Type: no",
        b"X-Note: content-type: no",
        b"CONTENT-TYPE:  text/plain ",
        b"Vary: a",
        b"vary:b",
        b"VARY:\tc\t",
    ]
    head = read_response_head(crlf.join(lines) + crlf + crlf)
    assert head.status == 200
    assert head.get(b"content-type") == b"text/plain"
    assert head.get(b"content-type-x") == b"no"
    assert head.get(b"vary") == b"a, b, c", "lines of one header: one list, in order"
    assert head.get(b"content-length") == b"" and head.get(b"content") == b""


def test_a_bare_lf_head_frames_its_body():
    tracker = ResponseTracker()
    seen = Seen(tracker)
    tracker.expect(b"GET")
    tracker.expect(b"GET")
    tracker.feed(b"HTTP/1.1 200 OK\nContent-Length: 2\n\nok")
    tracker.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\n\r\n2\r\nok\r\n0\r\n\r\n")
    assert (tracker.inflight, tracker.broken, seen.idle) == (0, False, 1)


# ---- what an MCP note learns from its answer


class _Replica:
    name, incarnation = "svc", 3


def _noted(front: McpFront, body: bytes, *headers: bytes) -> tuple[ResponseTracker, Expected]:
    """A tracker waiting for the answer to one POST to /mcp, noted as the proxy notes it."""
    lines = [b"POST /mcp HTTP/1.1", b"Host: x", b"Content-Type: application/json", *headers]
    raw = b"\r\n".join(lines) + b"\r\n\r\n"
    note = front.expect(parse_head(raw), classify(body), raw + body, "10.0.0.1", 7)
    note.backend = _Replica()  # type: ignore[assignment]
    tracker = ResponseTracker()
    tracker.expect(b"POST", note)
    return tracker, note


def _answered(status: bytes, body: bytes, *headers: bytes) -> bytes:
    lines = [b"HTTP/1.1 " + status, *headers, b"Content-Length: %d" % len(body)]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _result(id_: int) -> bytes:
    result = {"protocolVersion": "2025-06-18", "serverInfo": {"name": "srv", "version": "1"}}
    return orjson.dumps({"jsonrpc": "2.0", "id": id_, "result": result})


def test_a_refusal_of_work_forgets_the_credentials_it_came_with():
    front = _front()
    good = b"Authorization: Bearer good"
    init = message("initialize", 1, protocolVersion="2025-06-18")
    tracker, note = _noted(front, init, good)
    cred = note.credentials
    sent = {b"authorization": b"Bearer good"}
    assert cred == credentials(lambda name: sent.get(name, b""), b"")
    tracker.feed(_answered(b"200 OK", _result(1), b"Content-Type: application/json"))
    assert front.learned.admits("/mcp", cred), "an initialize's result: its credentials do"
    # Another token refused: what the good one taught stays.
    tracker, _ = _noted(front, message("tools/call", 2, name="x"), b"Authorization: Bearer bad")
    tracker.feed(_answered(b"401 Unauthorized", b""))
    assert front.learned.admits("/mcp", cred)
    # Work with the good one refused (a token revoked): no set-up is answered for it now.
    tracker, _ = _noted(front, message("tools/call", 3, name="x"), good)
    tracker.feed(_answered(b"401 Unauthorized", b"", b"Content-Type: application/json"))
    assert not front.learned.admits("/mcp", cred) and tracker.inflight == 0
    # No credentials refused: the server is no longer open.
    assert front.learned.open
    tracker, _ = _noted(front, message("tools/call", 4, name="x"))
    tracker.feed(_answered(b"403 Forbidden", b""))
    assert not front.learned.open


@pytest.mark.parametrize("stream", [False, True])
def test_an_initializes_answer_opens_the_session_the_server_named(stream):
    front = _front()
    init = message("initialize", 5, protocolVersion="2025-11-25")
    tracker, note = _noted(front, init, b"Authorization: Bearer t")
    if stream:
        # Read at its first event, while the stream stays open (chunked: no end yet).
        event = b"event: message\r\ndata: " + _result(5) + b"\r\n\r\n"
        tracker.feed(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nMcp-Session-Id: srv-1\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n" % (len(event), event)
        )
        assert tracker.inflight == 1
    else:
        headers = (b"Content-Type: application/json", b"Mcp-Session-Id: srv-1")
        tracker.feed(_answered(b"200 OK", _result(5), *headers))
        assert tracker.inflight == 0
    found = front.sessions.get(b"srv-1", time.monotonic())
    assert found is not None
    session = found[1]
    assert (session.peer, session.opener, session.endpoint) == ("10.0.0.1", 7, "/mcp")
    assert session.init == note.request and session.credentials == note.credentials
    assert front.learned.admits("/mcp", note.credentials)
    assert front.learned.initialize["2025-11-25"].stateful, "learned: the server keeps sessions"


def test_an_initialize_refused_or_failed_opens_nothing():
    front = _front()
    init = message("initialize", 1, protocolVersion="2025-06-18")
    for status in (b"401 Unauthorized", b"500 Internal Server Error"):
        tracker, _ = _noted(front, init)
        tracker.feed(_answered(status, _result(1), b"Mcp-Session-Id: srv-2"))
        assert front.sessions.get(b"srv-2", time.monotonic()) is None
    assert not front.learned.open, "the 401 said no credentials are not enough"
