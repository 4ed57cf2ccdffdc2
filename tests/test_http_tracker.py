"""The response tracker (httpmode.tracker) without a socket: one tracker per connection
follows every framing RFC 9112 gives a response, however the bytes are split, and
counts what it cannot follow as in flight until the connection closes."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wakeproxy.httpmode.tracker import ResponseTracker

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
