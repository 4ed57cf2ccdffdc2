"""The client connection in mode http: heads parsed, bodies framed, bytes unchanged."""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import itertools
import time
from typing import TYPE_CHECKING, Protocol, cast

from ..core.states import NOT_SERVING, Outcome, State
from ..net.forward import HOLD_LIMIT, HOLDING, NEXT_TURN, WAITING, ClientSide, Owner, UpstreamSide
from .answers import REFUSALS, WAITING_PAGE, ProbeRule, answer
from .chunks import BadChunk, ChunkedBody
from .heads import HEAD_END, MAX_HEAD, BadRequest, Head, parse_head, with_header
from .mcp import MAX_MESSAGE, Message, classify
from .mcpfront import Backend
from .replay import ReplayFailed
from .tracker import HttpUpstreamSide, ResponseTracker

if TYPE_CHECKING:
    from ..config import HttpSettings, Probe
    from ..core.sessions import Session
    from .mcpfront import Expected, McpFront

# A JSON-RPC body read to classify a request; larger ones are real work by definition.
MAX_CLASSIFIED_BODY = MAX_MESSAGE

_CONNECTIONS = itertools.count(1)


# What the proxy writes itself (from a trusted proxy in front: taken over, extended).
_REWRITTEN = frozenset({b"x-forwarded-for", b"x-forwarded-proto", b"x-forwarded-host"})


def _forwarding(name: bytes) -> bool:
    """A header that says where a request came from: the proxy's to give."""
    return name.startswith(b"x-forwarded-") or name in (b"forwarded", b"x-real-ip")


@functools.lru_cache(maxsize=64)
def _networks(spec: tuple[str, ...]) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    return tuple(ipaddress.ip_network(net) for net in spec)


def _trusted(peer: str, spec: tuple[str, ...]) -> bool:
    if not spec or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in _networks(spec))


# Requests read from one connection per turn of the loop: past it, the rest of the read
# waits for the next turn, so one client pipelining heads delays others by a few ms at
# most (bench: the fairness row).
REQUESTS_PER_TURN = 32

# Phases of the client's byte stream: a head; a body counted or chunked; an MCP
# message read whole before anything is decided; another protocol (after an upgrade).
_HEAD, _LENGTH, _CHUNKED, _OPAQUE, _MESSAGE = range(5)


class HttpOwner(Owner, Protocol):
    """What a mode-http connection may also ask of its service."""

    @property
    def state(self) -> State: ...

    @property
    def http(self) -> HttpSettings: ...

    @property
    def probe_rules(self) -> tuple[ProbeRule, ...]: ...

    @property
    def idle_delay(self) -> float: ...

    @property
    def mcp(self) -> McpFront | None:
        """MCP sessions in front of this service (mode http): replicas' pins, and with
        ``http.mcp`` on, the set-up the proxy answers itself."""

    @property
    def replicated(self) -> bool:
        """The listener's service has replicas (a connection is placed on one)."""

    def request_seen(self, conn: HttpClientSide) -> None:
        """A request that is activity, on an attached connection: its backend's idle
        clock moves."""

    def result_due(self, conn: HttpClientSide) -> None:
        """A request was answered 202: its result may still come on an event stream."""

    def wake_in_background(self, reason: str) -> None: ...

    def head_started(self) -> bool:
        """A connection began buffering a partial head; False: too many do (refuse it)."""

    def head_ended(self) -> None:
        """That connection's partial head is complete, refused or gone."""

    def stream_started(self) -> bool:
        """A probe's event stream is held open; False: too many are (close this one)."""

    def stream_ended(self) -> None:
        """That stream's connection closed."""


class HttpClientSide(ClientSide):
    __slots__ = (
        "_allow_sleep",
        "_body",
        "_buf",
        "_chunks",
        "_follow",
        "_gated",
        "_header_handle",
        "_id",
        "_last_head",
        "_last_raw",
        "_message",
        "_partial",
        "_phase",
        "_probe_only",
        "_quiet_handle",
        "_remaining",
        "_request_activity",
        "_stash",
        "_streaming",
        "_suspended",
        "_upgrade_after_body",
        "_wanted_backend",
        "answered",
        "http_owner",
        "last_request",
        "mcp",
        "sse_session",
        "tracker",
    )

    def __init__(self, owner: HttpOwner) -> None:
        super().__init__(owner)
        self.http_owner = owner
        self._buf = bytearray()
        self._phase = _HEAD
        self._remaining = 0
        self._chunks: ChunkedBody | None = None
        # Counted by the owner as holding part of a head (see head_started).
        self._partial = False
        self._body: bytearray | None = None  # a JSON body being read to classify it
        self._request_activity = False
        # Bytes wait in _pending (not the upstream) while the backend wakes under us.
        self._gated = False
        self._header_handle: asyncio.TimerHandle | None = None
        self._last_raw = b""
        self._last_head: Head | None = None
        self._quiet_handle: asyncio.TimerHandle | None = None
        self._wanted_backend = False
        self.answered = False  # the proxy answered (probe or error): input is ignored
        self.active = False  # until a request that is activity
        self.last_request = 0.0
        # Only probes so far: such a connection keeps the backend awake only while a
        # probe's response is under way.
        self._probe_only = True
        self._allow_sleep = owner.http.idle_connections == "allow-sleep"
        # Whether the responses are followed (decided at the first request that goes
        # to the backend, see upstream_protocol): then every request is expected.
        self._follow: bool | None = None
        # Follows the responses of every request with allow-sleep, else of probes only.
        self.tracker = ResponseTracker()
        if self._allow_sleep:
            self.tracker.on_202 = lambda: owner.result_due(self)
        self.tracker.on_idle = self._responses_done
        self.tracker.on_upgrade = self._upgraded
        # MCP: the listener's sessions and learned answers; the message being read
        # whole (head, raw head); sessions this connection opened; a request held
        # while its session is opened on the server, and what came after it.
        self.mcp = owner.mcp
        self._message: tuple[Head, bytes] | None = None
        self._id = next(_CONNECTIONS)  # the sessions a connection opened are its own
        self._upgrade_after_body = False
        self._suspended = False
        self._stash = bytearray()
        self._streaming = False  # holds a probe's event stream open (see stream_started)
        # Replicas: the MCP session this connection's event stream carries (SSE).
        self.sse_session: bytes | None = None
        if owner.replicated:
            self.tracker.on_session = self._session_seen

    @property
    def head(self) -> Head | None:
        """The request head being handled (the last one read)."""
        return self._last_head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timeout()

    def upstream_protocol(self) -> UpstreamSide:
        # Responses are followed only where something waits on their end or reads
        # them: allow-sleep, a connection of probes so far, replicas' sessions, MCP
        # messages; elsewhere the plain side costs less per read.
        if self._follow:
            return HttpUpstreamSide(self, self.tracker)
        return UpstreamSide(self)

    # ---- client bytes

    def data_received(self, data: bytes) -> None:
        # A loop over offsets, not recursion or slices: a thousand pipelined requests in
        # one read stay flat, and each costs its own bytes only.
        pos, end, requests = 0, len(data), 0
        while pos < end and not self.answered:
            if self._suspended:
                # A request waits (its session opening on the server, an upgrade's
                # answer): what follows it waits too (bounded: reading pauses).
                self._stash += data[pos:] if pos else data
                if len(self._stash) >= HOLD_LIMIT:
                    self.pause_for(WAITING)
                return
            phase = self._phase
            if phase == _OPAQUE:
                self._send_up(data[pos:] if pos else data)
                return
            if phase == _LENGTH:
                pos = self._length_body(data, pos)
            elif phase == _CHUNKED:
                pos = self._chunked_body(data, pos)
            elif phase == _MESSAGE:
                pos = self._message_body(data, pos)
            elif requests == REQUESTS_PER_TURN:
                # Fair to every other connection: the rest of this read waits for the
                # loop's next turn (a client pipelining megabytes of heads would hold
                # the loop for all of them).
                self._defer(data[pos:])
                return
            else:
                requests += 1
                pos = self._head(data, pos)

    def _defer(self, rest: bytes) -> None:
        self._suspended = True
        self._stash += rest
        self.pause_for(NEXT_TURN)
        asyncio.get_running_loop().call_soon(self._go_on)

    def _go_on(self) -> None:
        """Carry on with what waited (the next turn's share, or what followed a held
        request). Reading resumes unless another reason holds it (a backend that
        reads slower, bytes held for a wake), or what follows waits again."""
        self._suspended = False
        self.resume_for(NEXT_TURN | WAITING)
        stash = bytes(self._stash)
        self._stash.clear()
        if stash and not self.closed:
            self.data_received(stash)

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

    def _end_partial(self) -> None:
        if self._partial:
            self._partial = False
            self.http_owner.head_ended()

    def _head_complete(self, raw: bytes) -> None:
        if len(raw) > MAX_HEAD:
            self._refuse(431, "the request head is over 16 KiB", Outcome.HEADER_TOO_LARGE)
            return
        if raw == self._last_raw and self._last_head is not None:
            # The same bytes as this connection's previous head: the same decisions.
            head = self._last_head
        else:
            try:
                head = parse_head(raw)
            except BadRequest as exc:
                outcome = Outcome.HEADER_TOO_LARGE if exc.status == 431 else Outcome.BAD_REQUEST
                self._refuse(exc.status, f"bad request: {exc}", outcome)
                return
            self._last_raw, self._last_head = raw, head
        if self._header_handle is not None:
            self._cancel_header_timeout()
        self._request(head, raw)

    def _request(self, head: Head, raw: bytes) -> None:
        owner = self.http_owner
        http = owner.http
        probe = next((rule.probe for rule in owner.probe_rules if rule.matches(head)), None)
        # The proxy may answer only when nothing of this connection is with the backend:
        # behind a request that went there, its answer would overtake that response.
        if probe is not None and self._quiet and owner.state in NOT_SERVING and not head.has_body:
            self._answer_probe(probe, head)
            return
        if probe is None:
            self._probe_only = False
        first = not self._wanted_backend
        if (
            http.waiting_page
            and first
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

    @property
    def _quiet(self) -> bool:
        """Nothing of this connection is with the backend: the proxy may answer."""
        return not self.attached and not self.tracker.methods and not self._pending

    def _forward(
        self,
        head: Head,
        raw: bytes,
        activity: bool,
        *,
        counted: bool = True,
        body: bytes = b"",
        note: Expected | None = None,
        outgoing: bool = False,
    ) -> None:
        """The request goes to the backend (``counted``: whether it is activity is known
        now; else at the end of its body; ``outgoing``: ``raw`` has the proxy's
        forwarded headers already)."""
        self._request_activity = activity
        self._need_backend(activity and counted)
        if self.answered:
            return  # refused on the way (a limit, no replica)
        if not outgoing:
            raw = self._outgoing(raw, head)
        if self._follow:
            if note is not None:
                note.backend = self._placed()
            self.tracker.expect(head.method, note)
            if head.upgrade:
                self.tracker.upgrading()
        session = head.get(b"mcp-session-id")
        if session and self.mcp is not None and not head.upgrade:
            opening, write_as = self.mcp.route_to(session, self._placed())
            if opening is not None:
                self._open_session(session, opening, raw, body)
                return
            if write_as:
                raw = with_header(raw, b"Mcp-Session-Id", write_as)
            if head.method == b"DELETE":
                self.mcp.sessions.end(session)
        self._send_up(raw + body if body else raw)
        if counted and activity:
            self._count_request()
        if head.upgrade:
            # Another protocol only once the server agrees (101; a 2xx to CONNECT): the
            # client sends nothing but the request's body before that answer, so what
            # comes after it waits for the answer.
            if head.has_body:
                self._upgrade_after_body = True
            else:
                self._suspended = True

    def _outgoing(self, raw: bytes, head: Head) -> bytes:
        """The head as it goes to the backend."""
        if self.http_owner.http.forwarded_headers:
            return self._with_forwarded(raw, head)
        return raw

    def _frame_body(self, head: Head, activity: bool) -> None:
        self._body = None
        classify_it = head.method == b"POST" and activity and b"json" in head.get(b"content-type")
        if head.chunked:
            self._phase, self._chunks = _CHUNKED, ChunkedBody()
            self._body = bytearray() if classify_it else None
        elif head.length > 0:
            self._phase, self._remaining = _LENGTH, head.length
            if classify_it and head.length <= MAX_CLASSIFIED_BODY:
                self._body = bytearray()
        else:
            self._phase = _HEAD

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
        self._phase = _HEAD
        body, self._body = self._body, None
        if body is not None:
            self._request_activity = classify(bytes(body)).activity
            self._count_request()
        if self._upgrade_after_body:
            # The upgrade request is whole: what follows waits for the server's answer.
            self._upgrade_after_body = False
            self._suspended = True

    def _count_request(self) -> None:
        if self._request_activity:
            self.last_request = time.monotonic()
            self.active = True
            self.http_owner.request_seen(self)

    # ---- MCP over streamable HTTP (see httpmode.mcpfront)

    def _mcp_head(self, head: Head, raw: bytes) -> bool:
        """An MCP request: a JSON POST is read whole before anything is decided; a GET
        or DELETE naming a session is decided now. False: not MCP's (a body to frame,
        an upgrade, a client waiting for 100 Continue)."""
        if head.upgrade or head.get(b"expect"):
            return False
        method = head.method
        if method == b"POST":
            if (
                head.chunked
                or not 0 < head.length <= MAX_MESSAGE
                or b"json" not in head.get(b"content-type")
            ):
                return False
            self._message = (head, raw)
            self._body = bytearray()
            self._phase, self._remaining = _MESSAGE, head.length
            # The body comes within header_timeout too: a slow one holds 64 KiB at most.
            self._arm_header_timeout()
            return True
        if method in (b"GET", b"DELETE") and head.get(b"mcp-session-id") and not head.has_body:
            self._mcp_request(head, raw, b"", None)
            return True
        return False

    def _message_body(self, data: bytes, pos: int) -> int:
        body = self._body
        assert body is not None and self._message is not None
        stop = min(len(data), pos + self._remaining)
        body += data[pos:stop]
        self._remaining -= stop - pos
        if self._remaining:
            return stop
        (head, raw), self._message, self._body = self._message, None, None
        self._phase = _HEAD
        self._cancel_header_timeout()
        message = classify(bytes(body), head.get(b"mcp-method"))
        self._mcp_request(head, raw, bytes(body), message)
        return stop

    def _mcp_request(self, head: Head, raw: bytes, body: bytes, message: Message | None) -> None:
        front = self.mcp
        assert front is not None
        raw = self._outgoing(raw, head)
        request, peer = raw + body, self._client_address()
        # Only when nothing of this connection is with the backend: an answer of the
        # proxy's own would overtake that response.
        if self._quiet:
            reply = front.answer(head, message, request, peer, self._id)
            if reply is not None:
                self._reply(reply, head)
                return
        # Set-up and streams are never activity: only real work keeps a server awake.
        activity = message is not None and message.activity
        note = None
        if message is not None:
            note = front.expect(head, message, request, peer, self._id)
        self._forward(head, raw, activity, body=body, note=note, outgoing=True)

    def _placed(self) -> Backend:
        """The backend this connection was placed on (it needed one already)."""
        assert self.backend is not None
        return cast(Backend, self.backend)

    def _client_address(self) -> str:
        """The client's address: the peer's, or for a trusted proxy in front the last
        hop it added to X-Forwarded-For (each client its own share of sessions)."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        address = str(peer[0]) if peer else ""
        trusted = self.http_owner.http.trust_forwarded_from
        head = self._last_head
        if trusted and head is not None and _trusted(address, trusted):
            chain = head.get(b"x-forwarded-for")
            if chain:
                return chain.rsplit(b",", 1)[-1].strip().decode("latin-1")
        return address

    def _reply(self, data: bytes, head: Head) -> None:
        """An MCP answer the proxy gives itself; the connection stays open unless the
        client asked to close it."""
        self.owner.record(self, Outcome.MCP_ANSWERED, int(data[9:12]))
        self._write_kept(data, close=not head.keep_alive)

    def _open_session(self, sid: bytes, session: Session, raw: bytes, body: bytes) -> None:
        """Hold this request (and what follows it) while its session is opened on the
        backend it goes to; then write the server's id into it and send it."""
        front = self.mcp
        assert front is not None
        self._suspended = True
        backend = self._placed()
        front.spawn(self._opening(front, sid, session, backend, raw, body))

    async def _opening(
        self,
        front: McpFront,
        sid: bytes,
        session: Session,
        backend: Backend,
        raw: bytes,
        body: bytes,
    ) -> None:
        try:
            server_id = await front.materialize(sid, session, backend)
        except ReplayFailed as exc:
            if not self.closed and not self.answered:
                self.owner.record(self, Outcome.BACKEND_ERROR, exc.status)
                if exc.answer:
                    self._write_answer(exc.answer, close=True)
                else:
                    self._error(502, f"the backend refused the session: {exc}")
            return
        except TimeoutError:
            if not self.closed and not self.answered:
                status = self._error(504, "the backend did not open the session in time")
                self.owner.record(self, Outcome.WAKE_TIMEOUT, status)
            return
        except Exception:  # the wake failed: the held connection was answered for it
            if not self.closed and not self.answered:
                self.owner.record(self, Outcome.BACKEND_ERROR, self._error(502, "the wake failed"))
            return
        if self.closed or self.answered:
            return
        if server_id and server_id != sid:
            raw = with_header(raw, b"Mcp-Session-Id", server_id)
        self._send_up(raw + body)
        self._count_request()
        self._go_on()

    def _upgraded(self, switched: bool) -> None:
        """The server answered the upgrade request: another protocol from here on both
        ways (its bytes as they come), or HTTP as before (the client's next request)."""
        self._upgrade_after_body = False
        if switched:
            self._phase = _OPAQUE
        self._go_on()

    def _session_seen(self, session: bytes, stream: bool) -> None:
        """Replicas: a response named an MCP session (its header; an SSE stream's
        endpoint event): it is pinned to the replica this connection is on."""
        front = self.mcp
        if front is None:
            return
        if stream:
            self.sse_session = session
        backend = self._placed()
        front.seen_in_answer(session, self._client_address(), backend, stream=stream)

    def _need_backend(self, activity: bool) -> None:
        """This request goes to the backend: attach, or wake it under an open connection."""
        if self._follow is None:
            head = self._last_head
            self._follow = (
                self._allow_sleep
                or self._probe_only
                or self.tracker.on_session is not None
                or (self.mcp is not None and self.mcp.on and self.mcp.seen)
                or (head is not None and head.upgrade)
            )
        if not self._wanted_backend:
            self._wanted_backend = True
            self.attach(activity=activity)
        elif not self.attached or (
            self.upstream is not None
            and not self._gated
            and not self.early  # held, connected during the unpause: already waiting
            and self._placed().state is not State.RUNNING
        ):
            # allow-sleep: a quiet connection needs the backend again, or the backend was
            # put to sleep under this connection: its bytes wait for Connect or Release.
            self._gated = self.upstream is not None
            self.attach(activity=activity)
        if self._allow_sleep:
            self._arm_quiet(self.http_owner.idle_delay)

    def _send_up(self, data: bytes) -> None:
        upstream = self.upstream
        if upstream is not None and not self._gated:
            self.bytes_up += len(data)
            upstream.write(data)
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= HOLD_LIMIT:
            self.pause_for(HOLDING)

    def resume(self) -> None:
        self._gated = False
        super().resume()

    def _with_forwarded(self, raw: bytes, head: Head) -> bytes:
        """The head with the proxy's X-Forwarded-* lines. The client's own are dropped
        (it would choose its own address, host and scheme), unless the peer is a proxy
        named in ``trust_forwarded_from``: then its lines stay and its address is
        appended to X-Forwarded-For."""
        peer = self.transport.get_extra_info("peername") if self.transport else None
        peer = str(peer[0]) if peer else ""
        trusted = _trusted(peer, self.http_owner.http.trust_forwarded_from)
        lines = raw[:-4].split(b"\r\n")  # CRLF throughout (parse_head)
        kept, given = [lines[0]], dict[bytes, bytes]()
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if not _forwarding(name):
                kept.append(line)
            elif not trusted:
                continue
            elif name in _REWRITTEN:  # a field given twice is one list (RFC 9110 5.3)
                value = value.strip()
                given[name] = given[name] + b", " + value if name in given else value
            else:
                kept.append(line)  # the proxy in front's own (Forwarded, -Port, -Prefix)
        chain = given.get(b"x-forwarded-for")
        forwarded_for = (chain + b", " if chain else b"") + peer.encode()
        kept.append(b"X-Forwarded-For: " + forwarded_for)
        kept.append(b"X-Forwarded-Proto: " + given.get(b"x-forwarded-proto", b"http"))
        host = given.get(b"x-forwarded-host") or head.get(b"host")
        if host:
            kept.append(b"X-Forwarded-Host: " + host)
        return b"\r\n".join(kept) + b"\r\n\r\n"

    # ---- answers the proxy gives itself

    def _answer_probe(self, probe: Probe, head: Head) -> None:
        self.owner.record(self, Outcome.PROBE_ANSWERED, probe.status)
        if probe.stream:
            # An event stream that stays open while the client keeps it: nothing follows.
            # Bounded per service (each holds a descriptor): past it, answered and closed
            # (a probe reads the status only).
            held = self.http_owner.stream_started()
            self._streaming = held
            self._write_answer(
                answer(probe.status, content_type=probe.content_type, stream=True),
                close=not held,
            )
            return
        if not head.keep_alive:
            self._write_answer(
                answer(probe.status, probe.body, content_type=probe.content_type), close=True
            )
            return
        data = answer(
            probe.status,
            probe.body,
            content_type=probe.content_type,
            keep_alive=True,
            head_only=head.method == b"HEAD",
        )
        self._write_kept(data, close=False)

    def _write_kept(self, data: bytes, *, close: bool) -> None:
        """An answer of the proxy's own on a connection that stays open (unless
        ``close``): what the client sends next (pipelined already, or later) is another
        request, forwarded or answered as usual."""
        if close:
            self._write_answer(data, close=True)
            return
        transport = self.transport
        if transport is None or self.closed:
            return
        if self._backend_eof:
            # The backend ended this connection's other half: nothing more can be sent.
            transport.close()
            return
        self.answered_bytes += len(data)
        transport.write(data)

    def _respond(self, status: int, body: str, content_type: str, outcome: Outcome) -> None:
        self.owner.record(self, outcome, status)
        self._write_answer(answer(status, body, content_type=content_type), close=True)

    def _error(self, status: int, why: str) -> int | None:
        """Answer ``status`` and close; returns the status, or None when a response was
        already under way (ours would corrupt it: the connection is just closed)."""
        if self.upstream is not None and self.bytes_down:
            self.abort()
            self.answered = True
            return None
        headers = (("Retry-After", "1"),) if status == 503 else ()
        self._write_answer(answer(status, why + "\n", headers=headers), close=True)
        return status

    def _refuse(self, status: int, why: str, outcome: Outcome) -> None:
        """A refusal of the connection's own making (a bad or slow request)."""
        self.owner.record(self, outcome, self._error(status, why))

    def refuse(self, outcome: Outcome) -> int | None:
        refusal = REFUSALS.get(outcome)
        if refusal is None or self.answered or self.closed:
            return super().refuse(outcome)
        return self._error(*refusal)

    def _write_answer(self, data: bytes, *, close: bool) -> None:
        self.answered = True
        self._cancel_header_timeout()
        self._buf.clear()
        self._end_partial()
        transport = self.transport
        if transport is None or self.closed:
            return
        if not self._backend_eof:  # after write_eof nothing more can be written
            transport.write(data)
        if self.upstream is not None:
            self.upstream.abort()
        if close or self._backend_eof:
            transport.close()

    # ---- timers

    def _arm_header_timeout(self) -> None:
        if self._header_handle is None and not self.answered and not self.closed:
            loop = asyncio.get_running_loop()
            timeout = self.http_owner.http.header_timeout
            self._header_handle = loop.call_later(timeout, self._header_timed_out)

    def _cancel_header_timeout(self) -> None:
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None

    def _header_timed_out(self) -> None:
        self._header_handle = None
        if self._phase in (_HEAD, _MESSAGE) and not self.answered:
            self._refuse(408, "no complete request head in time", Outcome.HEADER_TIMEOUT)

    def _cancel_timers(self) -> None:
        # Called once, from connection_lost: the partial head goes with the connection.
        super()._cancel_timers()
        self._end_partial()
        self._cancel_header_timeout()
        if self._streaming:
            self._streaming = False
            self.http_owner.stream_ended()
        if self._quiet_handle is not None:
            self._quiet_handle.cancel()
            self._quiet_handle = None

    def eof_received(self) -> bool:
        if self.answered:
            return False
        return super().eof_received()

    # ---- when this connection stops keeping the backend awake

    def _responses_done(self) -> None:
        """Every tracked response ended. A connection that carried only probes lets go
        of the backend now (allow-sleep's other connections wait for _quiet_check)."""
        if self._probe_only and self.attached and not self.closed and not self._pending:
            self.attached = False
            self.owner.no_longer_needs(self)

    def _arm_quiet(self, after: float) -> None:
        if self._quiet_handle is not None:
            self._quiet_handle.cancel()
        loop = asyncio.get_running_loop()
        self._quiet_handle = loop.call_later(after, self._quiet_check)

    def _quiet_check(self) -> None:
        """allow-sleep: stop keeping the backend awake once no request came for
        idle_timeout and nothing is in flight; check again later otherwise."""
        self._quiet_handle = None
        if self.closed or not self.attached:
            return
        left = self.last_request + self.http_owner.idle_delay - time.monotonic()
        busy = (
            self.tracker.inflight
            or self._pending
            or self._gated
            or self._phase != _HEAD
            or self._buf
        )
        if left > 0 or busy:
            self._arm_quiet(max(left, 1.0))
            return
        self.attached = False
        self.owner.no_longer_needs(self)
