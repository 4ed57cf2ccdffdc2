"""Response framing on one connection: how many requests still await the end of their
response, so a backend is not paused under one (``idle_connections: allow-sleep``: every
request; otherwise a connection's probes, so one that carried only probes lets go)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11

from ..core.sessions import SSE_SCAN_LIMIT, session_in_stream
from ..forward import UpstreamSide

if TYPE_CHECKING:
    from .client import HttpClientSide


class ResponseTracker:
    """Follows response framing on one connection: how many requests still await the
    end of their response. An event stream stops counting once its head
    arrived: it may stay open for ever. A response whose framing h11 cannot follow
    (``Transfer-Encoding: gzip, chunked`` is valid HTTP) counts as in flight until the
    connection closes: its end cannot be seen, and a backend paused under it would stall
    the download."""

    __slots__ = ("_parser", "_scan", "broken", "methods", "on_202", "on_idle", "on_session")

    def __init__(self) -> None:
        self.methods: collections.deque[bytes] = collections.deque()
        self._parser: h11.Connection | None = None
        self.broken = False
        self.on_202: Callable[[], None] | None = None
        # Called when the last awaited response ended.
        self.on_idle: Callable[[], None] | None = None
        # Replicas (mode http): called with the MCP session a response starts, and
        # whether it came in an event stream's endpoint event (SSE) or a header.
        self.on_session: Callable[[bytes, bool], None] | None = None
        # The start of an event stream, searched for its endpoint event.
        self._scan: bytearray | None = None

    @property
    def scanning(self) -> bool:
        return self._scan is not None

    @property
    def inflight(self) -> int:
        return 1 if self.broken else len(self.methods)

    def feed(self, data: bytes) -> None:
        if self._scan is not None:
            self._scan_stream(data)
            return
        chunk = data
        while (data or self._parser is not None) and self.methods and not self.broken:
            if self._parser is None:
                self._parser = h11.Connection(h11.CLIENT)
                method = self.methods[0]
                self._parser.send(h11.Request(method=method, target="/", headers=[("Host", "x")]))
                self._parser.send(h11.EndOfMessage())
            parser = self._parser
            parser.receive_data(data)
            data = b""
            try:
                while True:
                    event = parser.next_event()
                    if event is h11.NEED_DATA or event is h11.PAUSED:
                        return
                    if isinstance(event, h11.Response):
                        accepted = event.status_code == 202 and self.methods[0] == b"POST"
                        if accepted and self.on_202 is not None:
                            self.on_202()
                        content_type = b"".join(v for k, v in event.headers if k == b"content-type")
                        if self.on_session is not None:
                            session = b"".join(
                                v for k, v in event.headers if k == b"mcp-session-id"
                            )
                            # A DELETE's answer names the session it just ended.
                            if session and event.status_code < 300 and self.methods[0] != b"DELETE":
                                self.on_session(session, False)
                        if b"text/event-stream" in content_type:
                            # Open for as long as the client keeps it: nothing after it
                            # but, for replicas, the endpoint event naming its session.
                            opened_by = self.methods[0]
                            self.methods.clear()
                            self._parser = None
                            if self.on_session is not None and opened_by == b"GET":
                                self._scan = bytearray()
                                self._scan_stream(chunk)
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        self.methods.popleft()
                        data, _ = parser.trailing_data
                        self._parser = None
                        if not self.methods and self.on_idle is not None:
                            self.on_idle()
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        self.methods.clear()
                        self._parser = None
                        return
            except h11.ProtocolError:
                # Not HTTP we can follow: in flight until the connection closes.
                self.broken = True
                return

    def _scan_stream(self, data: bytes) -> None:
        scan = self._scan
        assert scan is not None
        scan += data[: SSE_SCAN_LIMIT - len(scan)]
        session = session_in_stream(bytes(scan))
        if session is not None or len(scan) >= SSE_SCAN_LIMIT:
            self._scan = None
            if session is not None and self.on_session is not None:
                self.on_session(session, True)

    def closed(self) -> None:
        """The backend closed: a close-delimited body ends here."""
        if self._parser is not None and not self.broken:
            self.feed(b"")


class HttpUpstreamSide(UpstreamSide):
    """The backend side, also feeding the response tracker (allow-sleep)."""

    __slots__ = ("tracker",)

    def __init__(self, client: HttpClientSide, tracker: ResponseTracker) -> None:
        super().__init__(client)
        self.tracker = tracker

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.tracker.methods or self.tracker.scanning:
            self.tracker.feed(data)

    def eof_received(self) -> bool:
        self.tracker.closed()
        return super().eof_received()
