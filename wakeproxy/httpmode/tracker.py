"""Response framing on one connection: how many requests still await the end of their
response, so a backend is not paused under one (``idle_connections: allow-sleep``: every
request; otherwise a connection's probes, so one that carried only probes lets go), and
what the answers to MCP set-up say (``Expected`` notes: learned, sessions kept).

One tracker per connection, reused for every response (sans-IO, fed the backend's bytes
as they pass): a response head is found and read here, its body counted by length,
followed chunk by chunk (``chunks.ChunkedBody``) or read to the connection's end, as
RFC 9112 section 6.3 frames it. No timer, no object per response but the head's fields.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..core.sessions import EndpointScan
from ..net.forward import UpstreamSide
from .chunks import BadChunk, ChunkedBody
from .heads import HEAD_END
from .mcp import MAX_MESSAGE, Kind

if TYPE_CHECKING:
    from ..net.forward import ClientSide
    from .mcpnote import Expected

# A response head longer than this is not followed (in flight until the connection
# closes): h11, which followed responses before, refused heads over 16 KiB.
MAX_RESPONSE_HEAD = 64 * 1024
# A response head as h11 read them: a status line, then header lines (a name without
# whitespace at its ends, a colon, a value), lines ending in CRLF or a bare LF. One
# match checks a whole head (the tracker reads every response of a followed connection).
_RESPONSE_HEAD = re.compile(
    rb"HTTP/1\.[0-9] ([0-9]{3})(?:[ \t][^\r\n]*)?\r?\n"
    rb"(?:[^\s:](?:[^:\n]*[^\s:])?:[^\n]*\n)*\r?\n"
)

# What the tracker reads next: a response head; a body by its length; a chunked body;
# a body that ends with the connection; an event stream it no longer follows.
_HEAD, _LENGTH, _CHUNKED, _TO_CLOSE, _STREAM = range(5)


class Unframed(Exception):
    """The backend's bytes are not HTTP the tracker can follow."""


class ResponseHead:
    """A response head: its status, and its headers read when asked for (a response is
    framed by two or three of them; nothing is copied out of the others)."""

    __slots__ = ("_low", "_raw", "status")

    def __init__(self, status: int, raw: bytes) -> None:
        self.status = status
        self._raw = raw
        self._low = raw.lower()

    def get(self, name: bytes) -> bytes:
        """Header ``name`` (lowercase), its lines' values joined with ", "; b"" when absent."""
        low, raw = self._low, self._raw
        key = b"\n" + name + b":"
        at = low.find(key)
        if at < 0:
            return b""
        values = []
        while at >= 0:
            start = at + len(key)
            end = low.index(b"\n", start)
            # The line's CR (CRLF) only: another CR is the value's, as in a line-by-line
            # reading (a Transfer-Encoding "chunked\r" is not chunked: not followed).
            stop = end - 1 if raw[end - 1] == 13 else end
            values.append(raw[start:stop].strip(b" \t"))
            at = low.find(key, end)
        return values[0] if len(values) == 1 else b", ".join(values)


def read_response_head(raw: bytes) -> ResponseHead:
    """A response head through its blank line (CRLF or bare LF, as h11 read them)."""
    match = _RESPONSE_HEAD.fullmatch(raw)
    if match is None:
        line = raw.split(b"\n", 1)[0]
        if not re.fullmatch(rb"HTTP/1\.[0-9] ([0-9]{3})(?:[ \t][^\r\n]*)?\r?", line):
            raise Unframed(f"not a status line: {line[:80]!r}")
        raise Unframed(f"not a response head: {raw[:80]!r}")
    return ResponseHead(int(match.group(1)), raw)


class ResponseTracker:
    """Follows response framing on one connection: how many requests still await the
    end of their response. An event stream answering a GET stops counting once its head
    arrived: it may stay open for ever; one answering a POST (a streamable-HTTP result)
    is followed to its end. A response whose framing cannot be followed (a coding other
    than chunked alone: ``Transfer-Encoding: gzip, chunked`` is valid HTTP; a malformed
    head) counts as in flight until the connection closes: its end cannot be seen, and
    a backend paused under it would stall the download."""

    __slots__ = (
        "_body",
        "_buf",
        "_chunks",
        "_event_stream",
        "_head",
        "_notes",
        "_phase",
        "_remaining",
        "_scan",
        "_sent",
        "_upgrade",
        "broken",
        "methods",
        "on_202",
        "on_idle",
        "on_session",
        "on_upgrade",
    )

    def __init__(self) -> None:
        self.methods: collections.deque[bytes] = collections.deque()
        self.broken = False
        self.on_202: Callable[[], None] | None = None
        # Called when the last awaited response ended.
        self.on_idle: Callable[[], None] | None = None
        # Replicas (mode http): called with the MCP session an event stream's endpoint
        # event names (SSE), or a response's Mcp-Session-Id header.
        self.on_session: Callable[[bytes, bool], None] | None = None
        self.on_upgrade: Callable[[bool], None] | None = None
        self._phase = _HEAD
        self._buf = bytearray()  # a response head not complete yet
        self._remaining = 0
        self._chunks: ChunkedBody | None = None
        # The start of an event stream, searched for its endpoint event.
        self._scan: EndpointScan | None = None
        # Notes on requests whose answers matter (by their number on this connection),
        # and the one being answered: its head and body so far.
        self._notes: dict[int, Expected] = {}
        self._sent = 0  # requests expected so far on this connection
        self._head: ResponseHead | None = None
        self._body: bytearray | None = None
        self._event_stream = False
        # The request (its number) that asked for another protocol; its answer decides.
        self._upgrade = -1

    @property
    def scanning(self) -> bool:
        return self._scan is not None

    @property
    def inflight(self) -> int:
        return 1 if self.broken else len(self.methods)

    def expect(self, method: bytes, note: Expected | None = None) -> None:
        """A request went to the backend; its response is followed."""
        if note is not None:
            self._notes[self._sent] = note
        self._sent += 1
        self.methods.append(method)

    def upgrading(self) -> None:
        """The request just expected asks for another protocol (see ``on_upgrade``)."""
        self._upgrade = self._sent - 1

    def _answering_upgrade(self) -> bool:
        return self._upgrade >= 0 and self._sent - len(self.methods) == self._upgrade

    def _note(self) -> Expected | None:
        """The note of the request being answered (methods[0])."""
        if not self._notes:
            return None
        return self._notes.get(self._sent - len(self.methods))

    # ---- the backend's bytes

    def feed(self, data: bytes) -> None:
        if self.broken:
            return
        try:
            self._feed(data)
        except (Unframed, BadChunk):
            # Not HTTP we can follow: in flight until the connection closes.
            self.broken = True
            self._scan = None

    def _feed(self, data: bytes) -> None:
        pos, end = 0, len(data)
        while pos < end:
            phase = self._phase
            if phase == _STREAM:
                self._stream_bytes(data, pos)
                return
            if not self.methods:
                return  # nothing asked: bytes the server sent unasked are not followed
            if phase == _HEAD:
                pos = self._head_bytes(data, pos)
            elif phase == _LENGTH:
                take = min(self._remaining, end - pos)
                self._body_data(data, pos, pos + take)
                pos += take
                self._remaining -= take
                if not self._remaining:
                    self._ended()
            elif phase == _CHUNKED:
                pos = self._chunked_bytes(data, pos)
            else:  # _TO_CLOSE: everything up to the connection's end
                self._body_data(data, pos, end)
                return

    def _head_bytes(self, data: bytes, pos: int) -> int:
        buf = self._buf
        if not buf:
            # The common case, a whole head at the start of a read: no copy of the read.
            found = HEAD_END.search(data, pos)
            if found is not None:
                self._response(read_response_head(data[pos : found.end()]))
                return found.end()
        buf += data[pos:] if pos else data
        found = HEAD_END.search(buf)
        if found is None:
            if len(buf) > MAX_RESPONSE_HEAD:
                raise Unframed("a response head over 64 KiB")
            return len(data)
        cut = found.end()
        after = len(data) - (len(buf) - cut)
        raw = bytes(buf[:cut])
        buf.clear()
        self._response(read_response_head(raw))
        return after

    def _response(self, head: ResponseHead) -> None:
        """A response head: frame its body, or act on what it says."""
        status, method = head.status, self.methods[0]
        if status < 200:
            if status == 101 and self._answering_upgrade():
                self._switch(True)
            elif status == 101:
                raise Unframed("101 to a request that asked no upgrade")
            return  # 100 Continue and the like: the response is still to come
        if self._answering_upgrade():
            connect = method == b"CONNECT"
            if self._switch(connect and status < 300):
                return
        self._final(head, method)
        if self._phase == _STREAM:
            return
        if method == b"HEAD" or status in (204, 304):
            self._ended()
            return
        coding = head.get(b"transfer-encoding")
        if coding:
            if coding.lower() != b"chunked":
                raise Unframed(f"Transfer-Encoding {coding[:40]!r}")
            self._phase, self._chunks = _CHUNKED, ChunkedBody()
            return
        length = head.get(b"content-length")
        if length:
            text = length
            if not text.isdigit():  # a list of equal values is one length (RFC 9110 8.6)
                values = {value.strip() for value in length.split(b",")}
                text = values.pop()
                if values or not text.isdigit():
                    raise Unframed(f"Content-Length {length[:40]!r}")
            self._remaining = int(text)
            if self._remaining:
                self._phase = _LENGTH
            else:
                self._ended()
            return
        self._phase = _TO_CLOSE

    def _final(self, head: ResponseHead, method: bytes) -> None:
        """The final response's head: callbacks, notes, and an event stream answering
        a GET (or a listen) no longer followed."""
        note = self._note()
        status = head.status
        # HTTP+SSE answers a request 202 and sends its result on the stream later; a
        # notification's 202 (MCP's initialized) promises nothing.
        accepted = status == 202 and method == b"POST"
        if accepted and self.on_202 is not None and (note is None or note.expects_result):
            self.on_202()
        if self.on_session is not None:
            session = head.get(b"mcp-session-id")
            # A DELETE's answer names the session it just ended.
            if session and status < 300 and method != b"DELETE":
                self.on_session(session, False)
        reads = listening = False
        if note is not None:
            self._head = head
            reads = note.reads_body
            self._body = bytearray() if reads else None
            listening = note.message.kind is Kind.LISTEN
        if not (reads or listening or method == b"GET"):
            return  # nothing reads this answer's body or type, only its framing
        content_type = head.get(b"content-type")
        self._event_stream = reads and b"text/event-stream" in content_type
        if b"text/event-stream" in content_type and (method == b"GET" or listening):
            # Open for as long as the client keeps it (a GET's stream; 2026-07-28's
            # subscriptions/listen): nothing after it is followed but, for replicas, the
            # endpoint event naming its session (in its body, decoded: chunk-size lines
            # never split an id).
            self._forget()
            self._phase = _STREAM
            if self.on_session is not None:
                self._scan = EndpointScan()
                if head.get(b"transfer-encoding").lower() == b"chunked":
                    self._chunks = ChunkedBody()

    def _chunked_bytes(self, data: bytes, pos: int) -> int:
        chunks = self._chunks
        assert chunks is not None
        keep = bytearray() if self._body is not None else None
        end = chunks.feed(data, keep, pos)
        if keep:
            self._body_data(keep, 0, len(keep))
        if end < 0:
            return len(data)
        self._ended()
        return end

    def _body_data(self, data: bytes | bytearray, start: int, stop: int) -> None:
        body = self._body
        if body is not None and len(body) < MAX_MESSAGE and stop > start:
            body += data[start : min(stop, start + MAX_MESSAGE - len(body))]
            if self._event_stream:
                self._early()

    def _ended(self) -> None:
        """The response to methods[0] ended: its note learns what it said."""
        self._phase, self._chunks = _HEAD, None
        note = self._note()
        head, body = self._head, self._body
        self._head = self._body = None
        if note is not None:
            del self._notes[self._sent - len(self.methods)]
            if head is not None:
                note.answered(head, bytes(body or b""))
        self.methods.popleft()
        if not self.methods and self.on_idle is not None:
            self.on_idle()

    def _early(self) -> None:
        """An event stream answering a noted request: its JSON-RPC answer is read as
        soon as an event ends, not at the stream's end (the client goes on at once)."""
        body, head, note = self._body, self._head, self._note()
        if body is None or head is None or note is None or b"\n\n" not in body.replace(b"\r", b""):
            return
        stream = b"text/event-stream"
        if note.answered(head, bytes(body), content_type=stream, final=False):
            del self._notes[self._sent - len(self.methods)]
            self._head = self._body = None

    def _switch(self, switched: bool) -> bool:
        """The answer to the upgrade request came: True when the server switched (nothing
        after it on this connection is HTTP)."""
        self._upgrade = -1
        if switched:
            self._forget()
            self._phase = _STREAM
        if self.on_upgrade is not None:
            self.on_upgrade(switched)
        return switched

    def _forget(self) -> None:
        self.methods.clear()
        self._notes.clear()
        self._head = self._body = None
        self._chunks = None

    # ---- an event stream no longer followed: its endpoint event, for replicas

    def _stream_bytes(self, data: bytes, pos: int) -> None:
        if self.methods:
            # A request after a stream whose end the tracker does not look for: its
            # answer cannot be found (the stream's bytes come first).
            raise Unframed("a request after an event stream")
        scan = self._scan
        if scan is None:
            return
        chunks = self._chunks
        if chunks is not None:
            decoded = bytearray()
            ended = chunks.feed(data, decoded, pos) >= 0
            session = scan.feed(bytes(decoded))
        else:
            ended = False
            session = scan.feed(data[pos:] if pos else data)
        if session is None and not scan.exhausted and not ended:
            return  # more of the stream's start to read
        self._scan = None
        if session is not None and self.on_session is not None:
            self.on_session(session, True)

    def closed(self) -> None:
        """The backend closed: a body that ends with the connection ends here."""
        if self._phase == _TO_CLOSE and self.methods and not self.broken:
            self._ended()
        elif self.methods and not self.broken and (self._buf or self._phase != _HEAD):
            self.broken = True  # cut short: never seen to end
        self._scan = None


class HttpUpstreamSide(UpstreamSide):
    """The backend side, also feeding the response tracker."""

    __slots__ = ("tracker",)

    def __init__(self, client: ClientSide, tracker: ResponseTracker) -> None:
        super().__init__(client)
        self.tracker = tracker

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.tracker.methods or self.tracker.scanning:
            self.tracker.feed(data)

    def eof_received(self) -> bool:
        self.tracker.closed()
        return super().eof_received()
