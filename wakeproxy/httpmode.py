"""``mode: http``: read request heads so a health probe never wakes a backend.

Bytes are forwarded unchanged; the proxy only reads what its decisions need:

* each request head (h11 parses it: request line, headers, body framing). A probe
  (``http.probes`` plus the gateway's SSE check) is answered by the proxy while the
  backend sleeps and forwarded while it is awake; it never counts as activity.
* request bodies are only counted (Content-Length) or followed chunk by chunk
  (chunked, through h11) to find where the next head starts. Small JSON POST bodies are
  read to tell MCP session set-up (``initialize``, ``ping``...) from real work.
* responses are followed only with ``idle_connections: allow-sleep``: a request whose
  response has not ended blocks sleep, as does a POST answered 202 (its result may still
  be due on an event stream) for ``inflight_grace`` seconds.

Errors a client can read: 400 bad request, 408 no head within ``header_timeout``, 431
head over 16 KiB, 502 backend refused, 503 hold queue full, 504 wake timeout.
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import h11
import orjson

from .config import Probe
from .errors import RuntimeFailure, WakeTimeout
from .forward import HOLD_LIMIT, ClientSide, UpstreamSide
from .lifecycle import State

if TYPE_CHECKING:
    from .service import Service

MAX_HEAD = 16 * 1024
# A JSON-RPC body read to classify a request; larger ones are real work by definition.
MAX_CLASSIFIED_BODY = 64 * 1024
# h11's own end-of-head rule: a blank line, with or without CR.
_HEAD_END = re.compile(rb"\n\r?\n")
_LINE_END = re.compile(rb"\r?\n")
# JSON-RPC methods that only set up, keep or tear down an MCP session.
SESSION_METHODS = frozenset({"initialize", "notifications/initialized", "ping"})

_REASONS = {
    200: "OK",
    400: "Bad Request",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    503: "Service Unavailable",
    504: "Gateway Timeout",
}
# Why the proxy refused a connection -> the status a client reads.
_OUTCOME_STATUS = {
    "rejected_overflow": 503,
    "rejected_limit": 503,
    "wake_timeout": 504,
    "backend_error": 502,
}
_WAITING_PAGE = (
    '<!doctype html><meta http-equiv="refresh" content="2"><title>Starting</title>'
    "<p>The service is starting; this page reloads by itself.</p>\n"
)

# Phases of the client's byte stream.
_HEAD, _LENGTH, _CHUNKED, _OPAQUE = range(4)


class BadRequest(Exception):
    def __init__(self, status: int, why: str) -> None:
        super().__init__(why)
        self.status = status


@dataclass(frozen=True, slots=True)
class Head:
    """What the proxy's decisions need from one request head (validated by h11)."""

    method: bytes
    path: bytes
    # Lowercased names; a header given twice has its values joined with ", ".
    headers: dict[bytes, bytes]
    chunked: bool
    length: int

    def get(self, name: bytes) -> bytes:
        return self.headers.get(name, b"")


def parse_head(raw: bytes) -> Head:
    """One request head, through its blank line. The lines are split here; h11's public
    ``Request`` validates every part (method, target, version, header names and values,
    Content-Length and Transfer-Encoding rules), as it does for its own parser."""
    lines = _LINE_END.split(raw)
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/"):
        raise BadRequest(400, f"illegal request line {lines[0][:80]!r}")
    pairs = []
    for line in lines[1:]:
        if not line:
            break
        name, colon, value = line.partition(b":")
        if not colon:
            raise BadRequest(400, f"a header line without ':' {line[:80]!r}")
        pairs.append((name, value.strip(b" \t")))
    try:
        request = h11.Request(
            method=parts[0], target=parts[1], headers=pairs, http_version=parts[2][5:]
        )
    except h11.ProtocolError as exc:
        raise BadRequest(exc.error_status_hint, str(exc)) from None
    headers: dict[bytes, bytes] = {}
    for name, value in request.headers:
        headers[name] = headers[name] + b", " + value if name in headers else value
    length = headers.get(b"content-length")
    return Head(
        method=request.method,
        path=request.target.partition(b"?")[0],
        headers=headers,
        chunked=b"transfer-encoding" in headers,  # h11 allows only "chunked"
        length=int(length) if length else 0,
    )


def chunk_parser(raw: bytes) -> h11.Connection:
    """An h11 parser past ``raw`` (a chunked request's head), ready for the body."""
    parser = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
    parser.receive_data(raw)
    parser.next_event()  # the Request, already validated by parse_head
    return parser


@dataclass(frozen=True, slots=True)
class ProbeRule:
    """A Probe compiled for matching against heads."""

    probe: Probe
    method: bytes | None
    path: bytes
    # (header, lowercased text, whether it must be present)
    conditions: tuple[tuple[bytes, bytes, bool], ...]

    def matches(self, head: Head) -> bool:
        if head.path != self.path or (self.method is not None and head.method != self.method):
            return False
        for name, text, present in self.conditions:
            if (text in head.get(name).lower()) is not present:
                return False
        return True


def compile_probes(probes: tuple[Probe, ...]) -> tuple[ProbeRule, ...]:
    return tuple(
        ProbeRule(
            probe=probe,
            method=probe.method.encode() if probe.method is not None else None,
            path=probe.path.encode("latin-1"),
            conditions=tuple(
                (
                    name.encode("latin-1"),
                    want.lstrip("!").encode("latin-1"),
                    not want.startswith("!"),
                )
                for name, want in probe.headers.items()
            ),
        )
        for probe in probes
    )


def session_only(body: bytes) -> bool:
    """Whether a JSON-RPC body only sets up or keeps an MCP session (not activity)."""
    try:
        message = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    messages = message if isinstance(message, list) else [message]
    return bool(messages) and all(
        isinstance(m, dict) and m.get("method") in SESSION_METHODS for m in messages
    )


def answer(
    status: int,
    body: str = "",
    *,
    content_type: str = "text/plain; charset=utf-8",
    headers: tuple[tuple[str, str], ...] = (),
    stream: bool = False,
) -> bytes:
    """A complete response the proxy gives itself (closes the connection after)."""
    lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}", f"Content-Type: {content_type}"]
    lines += [f"{name}: {value}" for name, value in headers]
    if stream:
        lines.append("Cache-Control: no-store")
    else:
        lines.append(f"Content-Length: {len(body.encode())}")
    lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n" + ("" if stream else body)).encode()


class ResponseTracker:
    """Follows response framing on one connection (allow-sleep only): how many requests
    still await the end of their response. An event stream stops counting once its head
    arrived: it may stay open for ever."""

    __slots__ = ("_parser", "broken", "methods", "on_202")

    def __init__(self) -> None:
        self.methods: collections.deque[bytes] = collections.deque()
        self._parser: h11.Connection | None = None
        self.broken = False
        self.on_202: Callable[[], None] | None = None

    @property
    def inflight(self) -> int:
        return 0 if self.broken else len(self.methods)

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
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        self.methods.clear()
                        self._parser = None
                        return
            except h11.ProtocolError:
                # Not HTTP we can follow: stop counting rather than block sleep for ever.
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


class HttpClientSide(ClientSide):
    """A client connection in mode http: heads parsed, bodies framed, bytes unchanged."""

    __slots__ = (
        "_body",
        "_buf",
        "_gated",
        "_header_handle",
        "_last_head",
        "_last_raw",
        "_parser",
        "_phase",
        "_quiet_handle",
        "_remaining",
        "_request_activity",
        "_wanted_backend",
        "answered",
        "last_request",
        "tracker",
    )

    def __init__(self, service: Service) -> None:
        super().__init__(service)
        self._buf = bytearray()
        self._phase = _HEAD
        self._remaining = 0
        self._parser: h11.Connection | None = None
        self._body: bytearray | None = None  # a JSON body being read to classify it
        self._request_activity = False
        # Bytes wait in _pending (not the upstream) while a sleeping backend wakes.
        self._gated = False
        self._header_handle: asyncio.TimerHandle | None = None
        self._last_raw = b""
        self._last_head: Head | None = None
        self._quiet_handle: asyncio.TimerHandle | None = None
        self._wanted_backend = False
        self.answered = False  # the proxy answered (probe or error): input is ignored
        self.active = False  # until a request that is activity (request_seen)
        self.last_request = 0.0
        http = service.cfg.http
        self.tracker = ResponseTracker() if http.idle_connections == "allow-sleep" else None
        if self.tracker is not None:
            self.tracker.on_202 = service.note_accepted

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timeout()

    def upstream_protocol(self) -> UpstreamSide:
        if self.tracker is not None:
            return HttpUpstreamSide(self, self.tracker)
        return UpstreamSide(self)

    # ---- client bytes

    def data_received(self, data: bytes) -> None:
        # A loop, not recursion: a thousand pipelined requests in one read stay flat.
        while data and not self.answered:
            phase = self._phase
            if phase == _OPAQUE:
                self._send_up(data)
                return
            if phase == _LENGTH:
                data = self._length_body(data)
            elif phase == _CHUNKED:
                data = self._chunked_body(data)
            else:
                data = self._head(data)

    def _head(self, data: bytes) -> bytes:
        """Buffer until a head is complete and act on it; returns the bytes after it."""
        buf = self._buf
        if not buf and data[:1] not in (b"\r", b"\n"):
            # The common case, a whole head at the start of a read: no copy into the buffer.
            end = _HEAD_END.search(data, 0, MAX_HEAD + 4)
            if end is not None:
                cut = end.end()
                if cut == len(data):
                    return self._head_complete(data, b"")
                return self._head_complete(data[:cut], data[cut:])
        buf += data
        # Blank lines before a request line are allowed (RFC 9112 2.2).
        while buf[:2] == b"\r\n" or buf[:1] == b"\n":
            del buf[: 2 if buf[:1] == b"\r" else 1]
        if not buf:
            return b""
        end = _HEAD_END.search(buf, 0, MAX_HEAD + 4)
        if end is None:
            if len(buf) > MAX_HEAD:
                self._refuse(431, "the request head is over 16 KiB", "header_too_large")
            else:
                self._arm_header_timeout()
            return b""
        raw = bytes(buf[: end.end()])
        rest = bytes(buf[end.end() :])
        buf.clear()
        return self._head_complete(raw, rest)

    def _head_complete(self, raw: bytes, rest: bytes) -> bytes:
        if len(raw) > MAX_HEAD:
            self._refuse(431, "the request head is over 16 KiB", "header_too_large")
            return b""
        if raw == self._last_raw and self._last_head is not None:
            # The same bytes as this connection's previous head: the same decisions.
            head = self._last_head
        else:
            try:
                head = parse_head(raw)
            except BadRequest as exc:
                outcome = "header_too_large" if exc.status == 431 else "bad_request"
                self._refuse(exc.status, f"bad request: {exc}", outcome)
                return b""
            self._last_raw, self._last_head = raw, head
        if self._header_handle is not None:
            self._cancel_header_timeout()
        self._request(head, raw)
        return rest

    def _request(self, head: Head, raw: bytes) -> None:
        service = self.service
        http = service.cfg.http
        probe = next((rule.probe for rule in service.probe_rules if rule.matches(head)), None)
        # Only a connection's first request can be answered here: behind an earlier one
        # that went to the backend, our answer would overtake its response.
        first = not self._wanted_backend
        if probe is not None and first and service.state in _ASLEEP:
            self._answer_probe(probe)
            return
        if (
            http.waiting_page
            and first
            and service.state is State.STOPPED
            and b"text/html" in head.get(b"accept")
        ):
            service.wake_in_background("a browser asked")
            self._respond(503, _WAITING_PAGE, "text/html; charset=utf-8", "waiting_page")
            return
        method = head.method
        # A probe is never activity; neither is opening an event stream or ending a
        # session (DELETE): the gateway's streamable-HTTP probe is made of those.
        self._request_activity = (
            probe is None
            and method != b"DELETE"
            and not (method == b"GET" and b"text/event-stream" in head.get(b"accept"))
        )
        self._frame_body(head, raw)
        # With a JSON body still to read, whether this is activity is known at its end.
        known = self._body is None
        self._need_backend(self._request_activity and known)
        if http.forwarded_headers:
            raw = self._with_forwarded(raw, head)
        if self.tracker is not None:
            self.tracker.methods.append(method)
        self._send_up(raw)
        if known and self._request_activity:
            self._count_request()
        if method == b"CONNECT" or b"upgrade" in head.get(b"connection").lower():
            # Whatever follows is another protocol: forward it as it comes.
            self._phase = _OPAQUE

    def _frame_body(self, head: Head, raw: bytes) -> None:
        self._body = None
        classify = (
            head.method == b"POST"
            and self._request_activity
            and b"json" in head.get(b"content-type")
        )
        if head.chunked:
            self._phase, self._parser = _CHUNKED, chunk_parser(raw)
            self._body = bytearray() if classify else None
        elif head.length > 0:
            self._phase, self._remaining = _LENGTH, head.length
            if classify and head.length <= MAX_CLASSIFIED_BODY:
                self._body = bytearray()
        else:
            self._phase = _HEAD

    def _length_body(self, data: bytes) -> bytes:
        take = data[: self._remaining] if len(data) > self._remaining else data
        self._remaining -= len(take)
        self._send_up(take)
        if self._body is not None:
            self._body += take
        if self._remaining == 0:
            self._body_done()
        return data[len(take) :]

    def _chunked_body(self, data: bytes) -> bytes:
        parser = self._parser
        assert parser is not None
        parser.receive_data(data)
        try:
            while True:
                event = parser.next_event()
                if event is h11.NEED_DATA:
                    self._send_up(data)
                    return b""
                if isinstance(event, h11.Data) and self._body is not None:
                    self._body += event.data
                    if len(self._body) > MAX_CLASSIFIED_BODY:
                        self._body = None
                elif isinstance(event, h11.EndOfMessage):
                    rest = parser.trailing_data[0]
                    self._send_up(data[: len(data) - len(rest)])
                    self._parser = None
                    self._body_done()
                    return rest
        except h11.RemoteProtocolError as exc:
            self._refuse(400, f"bad chunked body: {exc}", "bad_request")
            return b""

    def _body_done(self) -> None:
        self._phase = _HEAD
        body, self._body = self._body, None
        if body is not None:
            self._request_activity = not session_only(bytes(body))
            self._count_request()

    def _count_request(self) -> None:
        if self._request_activity:
            self.last_request = time.monotonic()
            self.service.request_seen(self)

    def _need_backend(self, activity: bool) -> None:
        """This request goes to the backend: connect, or wake it under an open connection."""
        service = self.service
        if not self._wanted_backend:
            self._wanted_backend = True
            service.attach(self, activity=activity)
        elif not self.attached:
            # allow-sleep: a quiet connection needs the backend again.
            service.block(self)
        if self.upstream is not None and service.state is not State.RUNNING and not self._gated:
            # The backend went to sleep under this connection: wake it before sending.
            self._gated = True
            service.wake_for(self)
        if self.tracker is not None:
            self._arm_quiet(service.cfg.sleep_policy.idle_delay)

    def _send_up(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and not self._gated:
            self.bytes_up += len(data)
            upstream.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= HOLD_LIMIT and not self.closed and self.transport is not None:
            self.transport.pause_reading()

    def woken(self) -> None:
        """The backend woke for this connection's request: send what waited."""
        self._gated = False
        if self.upstream is not None and not self.closed:
            self.connected(self.upstream)

    def _with_forwarded(self, raw: bytes, head: Head) -> bytes:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        lines = [b"X-Forwarded-Proto: http"]
        if peer:
            lines.append(b"X-Forwarded-For: " + str(peer[0]).encode())
        host = head.get(b"host")
        if host:
            lines.append(b"X-Forwarded-Host: " + host)
        first_end = raw.index(b"\n") + 1
        return raw[:first_end] + b"".join(line + b"\r\n" for line in lines) + raw[first_end:]

    # ---- answers the proxy gives itself

    def _answer_probe(self, probe: Probe) -> None:
        self.service.stats.http_answers[probe.status] += 1
        self.service.stats.connections["probe_answered"] += 1
        self._write_answer(
            answer(probe.status, probe.body, content_type=probe.content_type, stream=probe.stream),
            close=not probe.stream,
        )

    def _respond(self, status: int, body: str, content_type: str, outcome: str) -> None:
        self.service.stats.http_answers[status] += 1
        self.service.stats.connections[outcome] += 1
        headers = (("Retry-After", "1"),) if status == 503 else ()
        self._write_answer(
            answer(status, body, content_type=content_type, headers=headers), close=True
        )

    def _refuse(self, status: int, why: str, outcome: str) -> None:
        if self.upstream is not None and self.bytes_down:
            # A response may be under way: our own would corrupt it. Just close.
            self.service.stats.connections[outcome] += 1
            self.abort()
            self.answered = True
            return
        self._respond(status, why + "\n", "text/plain; charset=utf-8", outcome)

    def _write_answer(self, data: bytes, *, close: bool) -> None:
        self.answered = True
        self._cancel_header_timeout()
        self._buf.clear()
        transport = self.transport
        if transport is None or self.closed:
            return
        transport.write(data)
        if self.upstream is not None:
            self.upstream.abort()
        if close:
            transport.close()

    def reject(self, outcome: str = "") -> None:
        status = _OUTCOME_STATUS.get(outcome)
        if status is None or self.answered or self.closed:
            super().reject(outcome)
            return
        why = {
            503: "too many connections for this service; retry shortly",
            504: "the backend did not wake in time",
            502: "the backend could not be reached",
        }[status]
        self._refuse(status, why, outcome)

    # ---- timers

    def _arm_header_timeout(self) -> None:
        if self._header_handle is None and not self.answered and not self.closed:
            loop = asyncio.get_running_loop()
            timeout = self.service.cfg.http.header_timeout
            self._header_handle = loop.call_later(timeout, self._header_timed_out)

    def _cancel_header_timeout(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _header_timed_out(self) -> None:
        self._header_handle = None
        if self._phase == _HEAD and not self.answered:
            self._refuse(408, "no complete request head in time", "header_timeout")

    def _cancel_timers(self) -> None:
        super()._cancel_timers()
        self._cancel_header_timeout()
        if self._quiet_handle is not None:
            self._quiet_handle.cancel()
            self._quiet_handle = None

    def eof_received(self) -> bool:
        if self.answered:
            return False
        return super().eof_received()

    # ---- allow-sleep

    def _arm_quiet(self, after: float) -> None:
        if self._quiet_handle is not None:
            self._quiet_handle.cancel()
        loop = asyncio.get_running_loop()
        self._quiet_handle = loop.call_later(after, self._quiet_check)

    def _quiet_check(self) -> None:
        """allow-sleep: stop blocking sleep once no request came for idle_timeout and
        nothing is in flight; check again later otherwise."""
        self._quiet_handle = None
        if self.closed or not self.attached:
            return
        idle = self.service.cfg.sleep_policy.idle_delay
        left = self.last_request + idle - time.monotonic()
        tracker = self.tracker
        busy = (
            (tracker is not None and tracker.inflight)
            or self._pending
            or self._gated
            or self._phase != _HEAD
            or self._buf
        )
        if left > 0 or busy:
            self._arm_quiet(max(left, 1.0))
            return
        self.service.unblock(self)


_ASLEEP = (State.PAUSED, State.STOPPED)


async def wake_then_send(service: Service, conn: HttpClientSide) -> None:
    """Wake the backend for a request on an open connection, then let its bytes go."""
    try:
        await service.wake("request on an open connection")
    except WakeTimeout:
        conn.reject("wake_timeout")
        return
    except RuntimeFailure:
        conn.reject("backend_error")
        return
    conn.woken()
