"""Response framing on one connection: how many requests still await the end of their
response, so a backend is not paused under one (``idle_connections: allow-sleep``: every
request; otherwise a connection's probes, so one that carried only probes lets go)."""

from __future__ import annotations

import collections
from collections.abc import Callable
from typing import TYPE_CHECKING

import h11

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

    __slots__ = ("_parser", "broken", "methods", "on_202", "on_idle")

    def __init__(self) -> None:
        self.methods: collections.deque[bytes] = collections.deque()
        self._parser: h11.Connection | None = None
        self.broken = False
        self.on_202: Callable[[], None] | None = None
        # Called when the last awaited response ended.
        self.on_idle: Callable[[], None] | None = None

    @property
    def inflight(self) -> int:
        return 1 if self.broken else len(self.methods)

    def feed(self, data: bytes) -> None:
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
                        if b"text/event-stream" in content_type:
                            # Open for as long as the client keeps it: nothing after it.
                            self.methods.clear()
                            self._parser = None
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
        if self.tracker.methods:
            self.tracker.feed(data)

    def eof_received(self) -> bool:
        self.tracker.closed()
        return super().eof_received()
