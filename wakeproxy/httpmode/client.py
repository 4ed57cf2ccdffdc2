"""The client connection in mode http: heads parsed, bodies framed, bytes unchanged."""

from __future__ import annotations

import asyncio

from ..core.states import NOT_SERVING, Outcome, State
from ..net.forward import HOLD_LIMIT, NEXT_TURN, WAITING, UpstreamSide
from .answers import WAITING_PAGE
from .chunks import BadChunk, ChunkedBody
from .conn import OPAQUE, READ_CHUNKED, READ_HEAD, READ_LENGTH, READ_MESSAGE, HttpOwner
from .heads import HEAD_END, MAX_HEAD, BadRequest, Head, parse_head
from .mcp import MAX_MESSAGE, classify
from .mcpconn import McpConnection
from .tracker import HttpUpstreamSide

__all__ = ["REQUESTS_PER_TURN", "HttpClientSide", "HttpOwner"]

# A JSON-RPC body read to classify a request; larger ones are real work by definition.
MAX_CLASSIFIED_BODY = MAX_MESSAGE

# Requests read from one connection per turn of the loop: past it, the rest of the read
# waits for the next turn, so one client pipelining heads delays others by a few ms at
# most (bench: the fairness row).
REQUESTS_PER_TURN = 32


class HttpClientSide(McpConnection):
    """The mode-http client connection's Protocol: it reads requests as they come."""

    __slots__ = ()

    def __init__(self, owner: HttpOwner) -> None:
        super().__init__(owner)
        self.tracker.on_upgrade = self._upgraded

    def upstream_protocol(self) -> UpstreamSide:
        # Responses are followed only where something waits on their end or reads
        # them: allow-sleep, a connection of probes so far, replicas' sessions, MCP
        # messages; elsewhere the plain side costs less per read.
        if self._follow:
            return HttpUpstreamSide(self, self.tracker)
        return UpstreamSide(self)

    # ---- client bytes

    def data_received(self, data: bytes) -> None:
        self._read(data, 0)

    def _read(self, data: bytes, pos: int) -> None:
        # A loop over offsets, not recursion or slices: a thousand pipelined requests in
        # one read stay flat, and each costs its own bytes only.
        end, requests = len(data), 0
        while pos < end and not self.answered:
            if self._suspended:
                # A request waits (its session opening on the server, an upgrade's
                # answer): what follows it waits too (bounded: reading pauses).
                self._stash += data[pos:] if pos else data
                if len(self._stash) >= HOLD_LIMIT:
                    self.pause_for(WAITING)
                return
            phase = self._phase
            if phase == OPAQUE:
                self._send_up(data[pos:] if pos else data)
                return
            if phase == READ_LENGTH:
                pos = self._length_body(data, pos)
            elif phase == READ_CHUNKED:
                pos = self._chunked_body(data, pos)
            elif phase == READ_MESSAGE:
                pos = self._message_body(data, pos)
            elif requests == REQUESTS_PER_TURN:
                # Fair to every other connection: the rest of this read waits for the
                # loop's next turn, as it is (a client pipelining megabytes of heads
                # would hold the loop for all of them; copying the rest each turn made
                # a read cost its size squared).
                self._rest, self._rest_at = data, pos
                self.pause_for(NEXT_TURN)
                asyncio.get_running_loop().call_soon(self._next_turn)
                return
            else:
                requests += 1
                pos = self._head(data, pos)
        if self._phase == READ_MESSAGE and self._header_handle is None and not self.answered:
            # An MCP message's body comes within header_timeout too (a slow one holds
            # 64 KiB at most); one whole in the read of its head arms no timer.
            self._arm_header_timeout()

    def _next_turn(self) -> None:
        """The next share of a read left for this turn of the loop. Reading resumes
        unless another reason holds it (a backend that reads slower, bytes held for a
        wake), or the rest waits again."""
        data, pos = self._rest, self._rest_at
        self._rest = b""
        self.resume_for(NEXT_TURN)
        if data and not self.closed:
            self._read(data, pos)

    def _head(self, data: bytes, pos: int) -> int:
        """Buffer until a head is complete and act on it; returns the offset after it."""
        buf = self._buf
        end = len(data)
        if not buf and data[pos : pos + 1] not in (b"\r", b"\n"):
            # The common case, a whole head at the start of a read: no copy into the buffer.
            found = HEAD_END.search(data, pos, pos + MAX_HEAD + 4)
            if found is not None:
                cut = found.end()
                self._head_complete(data if pos == 0 and cut == end else data[pos:cut])
                return cut
        buf += data[pos:] if pos else data
        # Blank lines before a request line are allowed (RFC 9112 2.2).
        while buf[:2] == b"\r\n" or buf[:1] == b"\n":
            del buf[: 2 if buf[:1] == b"\r" else 1]
        if not buf:
            return end
        found = HEAD_END.search(buf, 0, MAX_HEAD + 4)
        if found is None:
            if len(buf) > MAX_HEAD:
                self._refuse(431, "the request head is over 16 KiB", Outcome.HEADER_TOO_LARGE)
            elif not self._partial and not self._start_partial():
                pass  # refused: too many connections hold part of a head
            else:
                self._arm_header_timeout()
            return end
        cut = found.end()
        raw = bytes(buf[:cut])
        # What follows the head in the buffer came from this read: its tail.
        after = end - (len(buf) - cut)
        buf.clear()
        self._end_partial()
        self._head_complete(raw)
        return after

    def _start_partial(self) -> bool:
        """Count this connection as holding part of a head; refuse it past the cap."""
        if not self.http_owner.head_started():
            self._refuse(
                503, "too many connections for this service; retry shortly", Outcome.REJECTED_LIMIT
            )
            return False
        self._partial = True
        return True

    def _head_complete(self, raw: bytes) -> None:
        if len(raw) > MAX_HEAD:
            self._refuse(431, "the request head is over 16 KiB", Outcome.HEADER_TOO_LARGE)
            return
        head = self._last_head
        if head is None or raw != head.raw:
            # A head byte for byte the connection's previous one (a poller, a health
            # check) is that one again: parsing is a pure function of the bytes, and
            # the comparison costs next to nothing when they differ (lengths first).
            try:
                head = parse_head(raw)
            except BadRequest as exc:
                outcome = Outcome.HEADER_TOO_LARGE if exc.status == 431 else Outcome.BAD_REQUEST
                self._refuse(exc.status, f"bad request: {exc}", outcome)
                return
            self._last_head = head
        if self._header_handle is not None:
            self._cancel_header_timeout()
        self._request(head, raw)

    def _request(self, head: Head, raw: bytes) -> None:
        owner = self.http_owner
        probe = None
        for rule in owner.probe_rules:
            if rule.path == head.path and rule.matches(head):
                probe = rule.probe
                break
        # The proxy may answer only when nothing of this connection is with the backend:
        # behind a request that went there, its answer would overtake that response.
        if probe is not None and self._quiet and owner.state in NOT_SERVING and not head.has_body:
            self._answer_probe(probe, head)
            return
        if probe is None:
            self._probe_only = False
        first = not self._wanted_backend
        if (
            first
            and owner.http.waiting_page
            and owner.state is State.STOPPED
            and b"text/html" in head.get(b"accept")
        ):
            owner.wake_in_background("a browser asked")
            self._respond(503, WAITING_PAGE, "text/html; charset=utf-8", Outcome.WAITING_PAGE)
            return
        if head.upgrade and self._follow is False:
            # Only a followed connection sees whether the server agreed (a 101); on
            # another, the proxy would have to trust the client: bytes past the head
            # would go unchecked. Browsers open a new connection for a WebSocket.
            self._refuse(
                400,
                "bad request: an upgrade must be the first request on its connection",
                Outcome.BAD_REQUEST,
            )
            return
        if probe is None and self.mcp is not None and self.mcp.on and self._mcp_head(head, raw):
            return
        method = head.method
        # A probe is never activity; neither is opening an event stream or ending a
        # session (DELETE): the gateway's streamable-HTTP probe is made of those.
        activity = (
            probe is None
            and method != b"DELETE"
            and not (method == b"GET" and b"text/event-stream" in head.get(b"accept"))
        )
        self._frame_body(head, activity)
        # With a JSON body still to read, whether this is activity is known at its end.
        self._forward(head, raw, activity, counted=self._body is None)

    def _frame_body(self, head: Head, activity: bool) -> None:
        self._body = None
        classify_it = head.method == b"POST" and activity and b"json" in head.get(b"content-type")
        if head.chunked:
            self._phase, self._chunks = READ_CHUNKED, ChunkedBody()
            self._body = bytearray() if classify_it else None
        elif head.length > 0:
            self._phase, self._remaining = READ_LENGTH, head.length
            if classify_it and head.length <= MAX_CLASSIFIED_BODY:
                self._body = bytearray()
        else:
            self._phase = READ_HEAD

    def _length_body(self, data: bytes, pos: int) -> int:
        stop = min(len(data), pos + self._remaining)
        take = data if pos == 0 and stop == len(data) else data[pos:stop]
        self._remaining -= len(take)
        self._send_up(take)
        if self._body is not None:
            self._body += take
        if self._remaining == 0:
            self._body_done()
        return stop

    def _chunked_body(self, data: bytes, pos: int) -> int:
        chunks = self._chunks
        assert chunks is not None
        try:
            end = chunks.feed(data, self._body, pos)
        except BadChunk as exc:
            self._refuse(400, f"bad chunked body: {exc}", Outcome.BAD_REQUEST)
            return len(data)
        if self._body is not None and len(self._body) > MAX_CLASSIFIED_BODY:
            self._body = None
        if end < 0:
            self._send_up(data[pos:] if pos else data)
            return len(data)
        self._send_up(data[pos:end])
        self._chunks = None
        self._body_done()
        return end

    def _body_done(self) -> None:
        self._phase = READ_HEAD
        body, self._body = self._body, None
        if body is not None:
            self._request_activity = classify(bytes(body)).activity
            self._count_request()
        if self._upgrade_after_body:
            # The upgrade request is whole: what follows waits for the server's answer.
            self._upgrade_after_body = False
            self._suspended = True

    def _upgraded(self, switched: bool) -> None:
        """The server answered the upgrade request: another protocol from here on both
        ways (its bytes as they come), or HTTP as before (the client's next request)."""
        self._upgrade_after_body = False
        if switched:
            self._phase = OPAQUE
        self._go_on()
