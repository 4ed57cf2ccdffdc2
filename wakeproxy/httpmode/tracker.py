"""Response framing on one connection: how many requests still await the end of their
response, so a backend is not paused under one (``idle_connections: allow-sleep``: every
request; otherwise a connection's probes, so one that carried only probes lets go), and
what the answers to MCP set-up say (``Expected`` notes: learned, sessions kept)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11

from ..core.sessions import EndpointScan
from ..net.forward import UpstreamSide
from .mcp import MAX_MESSAGE, Kind

if TYPE_CHECKING:
    from ..net.forward import ClientSide
    from .mcpfront import Expected


class ResponseTracker:
    """Follows response framing on one connection: how many requests still await the
    end of their response. An event stream answering a GET stops counting once its head
    arrived: it may stay open for ever; one answering a POST (a streamable-HTTP result)
    is followed to its end. A response whose framing h11 cannot follow
    (``Transfer-Encoding: gzip, chunked`` is valid HTTP) counts as in flight until the
    connection closes: its end cannot be seen, and a backend paused under it would stall
    the download."""

    __slots__ = (
        "_body",
        "_event_stream",
        "_head",
        "_notes",
        "_parser",
        "_scan",
        "_scan_parser",
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
        self._parser: h11.Connection | None = None
        self.broken = False
        self.on_202: Callable[[], None] | None = None
        # Called when the last awaited response ended.
        self.on_idle: Callable[[], None] | None = None
        # Replicas (mode http): called with the MCP session an event stream's endpoint
        # event names (SSE), or a response's Mcp-Session-Id header.
        self.on_session: Callable[[bytes, bool], None] | None = None
        # The start of an event stream, searched for its endpoint event.
        self._scan: EndpointScan | None = None
        self._scan_parser: h11.Connection | None = None
        # Notes on requests whose answers matter (by their number on this connection),
        # and the one being answered: its head and body so far.
        self._notes: dict[int, Expected] = {}
        self._sent = 0  # requests expected so far on this connection
        self._head: h11.Response | None = None
        self._body: bytearray | None = None
        self._event_stream = False
        # The request (its number) that asked for another protocol; its answer decides.
        self._upgrade = -1
        self.on_upgrade: Callable[[bool], None] | None = None

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

    def _switch(self, switched: bool) -> bool:
        """The answer to the upgrade request came: True when the server switched (nothing
        after it on this connection is HTTP)."""
        self._upgrade = -1
        if switched:
            self._forget()
        if self.on_upgrade is not None:
            self.on_upgrade(switched)
        return switched

    def _note(self) -> Expected | None:
        """The note of the request being answered (methods[0])."""
        if not self._notes:
            return None
        return self._notes.get(self._sent - len(self.methods))

    def feed(self, data: bytes) -> None:
        if self._scan is not None:
            self._scan_stream(data)
            return
        while (data or self._parser is not None) and self.methods and not self.broken:
            if self._parser is None:
                self._parser = h11.Connection(h11.CLIENT)
                method = self.methods[0]
                headers = [("Host", "x")]
                if self._answering_upgrade():  # h11 then takes a 101 (or CONNECT's 2xx)
                    headers += [("Connection", "upgrade"), ("Upgrade", "x")]
                request = h11.Request(method=method, target="/", headers=headers)
                self._parser.send(request)
                self._parser.send(h11.EndOfMessage())
            parser = self._parser
            parser.receive_data(data)
            data = b""
            try:
                while True:
                    event = parser.next_event()
                    if event is h11.NEED_DATA or event is h11.PAUSED:
                        return
                    if isinstance(event, h11.InformationalResponse):
                        if event.status_code == 101 and self._answering_upgrade():
                            self._switch(True)
                            return
                    elif isinstance(event, h11.Response):
                        if self._answering_upgrade():
                            connect = self.methods[0] == b"CONNECT"
                            if self._switch(connect and 200 <= event.status_code < 300):
                                return
                        if self._response(event):
                            return
                    elif isinstance(event, h11.Data):
                        body = self._body
                        if body is not None and len(body) < MAX_MESSAGE:
                            body += event.data[: MAX_MESSAGE - len(body)]
                            if self._event_stream:
                                self._early()
                    elif isinstance(event, h11.EndOfMessage):
                        self._ended()
                        self.methods.popleft()
                        data, _ = parser.trailing_data
                        self._parser = None
                        if not self.methods and self.on_idle is not None:
                            self.on_idle()
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        self._forget()
                        return
            except h11.ProtocolError:
                # Not HTTP we can follow: in flight until the connection closes.
                self.broken = True
                return

    def _response(self, event: h11.Response) -> bool:
        """A response head; True when nothing after it on this connection is followed
        (an event stream answering a GET)."""
        method = self.methods[0]
        note = self._note()
        # HTTP+SSE answers a request 202 and sends its result on the stream later; a
        # notification's 202 (MCP's initialized) promises nothing.
        accepted = event.status_code == 202 and method == b"POST"
        if accepted and self.on_202 is not None and (note is None or note.expects_result):
            self.on_202()
        headers = event.headers
        content_type = b"".join(v for k, v in headers if k == b"content-type")
        if self.on_session is not None:
            session = b"".join(v for k, v in headers if k == b"mcp-session-id")
            # A DELETE's answer names the session it just ended.
            if session and event.status_code < 300 and method != b"DELETE":
                self.on_session(session, False)
        if note is not None:
            self._head = event
            self._body = bytearray() if note.reads_body else None
            self._event_stream = b"text/event-stream" in content_type
        listening = note is not None and note.message.kind is Kind.LISTEN
        if b"text/event-stream" in content_type and (method == b"GET" or listening):
            # Open for as long as the client keeps it (a GET's stream; 2026-07-28's
            # subscriptions/listen): nothing after it but, for replicas, the endpoint
            # event naming its session (in its body, decoded by the same parser:
            # chunk-size lines never split an id).
            parser = self._parser
            self._forget()
            if self.on_session is not None:
                self._scan = EndpointScan()
                self._scan_parser = parser
                self._scan_stream(b"")
            return True
        return False

    def _early(self) -> None:
        """An event stream answering a noted request: its JSON-RPC answer is read as
        soon as an event ends, not at the stream's end (the client goes on at once)."""
        body, head, note = self._body, self._head, self._note()
        if body is None or head is None or note is None or b"\n\n" not in body.replace(b"\r", b""):
            return
        headers = list(head.headers)
        if note.answered(head.status_code, headers, b"text/event-stream", bytes(body), final=False):
            del self._notes[self._sent - len(self.methods)]
            self._head = self._body = None

    def _ended(self) -> None:
        """The response to methods[0] ended: its note learns what it said."""
        note = self._note()
        head, body = self._head, self._body
        self._head = self._body = None
        if note is None:
            return
        del self._notes[self._sent - len(self.methods)]
        if head is not None:
            content_type = b"".join(v for k, v in head.headers if k == b"content-type")
            note.answered(head.status_code, list(head.headers), content_type, bytes(body or b""))

    def _forget(self) -> None:
        self.methods.clear()
        self._notes.clear()
        self._head = self._body = None
        self._parser = None

    def _scan_stream(self, data: bytes) -> None:
        scan, parser = self._scan, self._scan_parser
        assert scan is not None and parser is not None
        session = None
        try:
            if data:  # b"" would tell h11 the connection ended
                parser.receive_data(data)
            while session is None and not scan.exhausted:
                event = parser.next_event()
                if event is h11.NEED_DATA or event is h11.PAUSED:
                    return
                if not isinstance(event, h11.Data):
                    break  # the stream ended before its endpoint event
                session = scan.feed(event.data)
        except h11.ProtocolError:
            pass  # not a stream we can read: nothing is pinned
        self._scan = self._scan_parser = None
        if session is not None and self.on_session is not None:
            self.on_session(session, True)

    def closed(self) -> None:
        """The backend closed: a close-delimited body ends here."""
        if self._parser is not None and not self.broken:
            self.feed(b"")


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
