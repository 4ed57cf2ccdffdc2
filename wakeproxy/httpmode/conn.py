"""A mode-http client connection's state and its plain parts: what it holds, the
answers the proxy gives itself, its timers, how its bytes reach the backend. The reading
of requests is ``client.HttpClientSide`` (with ``mcpconn``'s MCP part) on top of it."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import TYPE_CHECKING, Protocol, cast

from ..core.states import Outcome, State
from ..net.forward import HOLD_LIMIT, HOLDING, WAITING, ClientSide, Owner
from .answers import REFUSALS, ProbeRule, answer
from .chunks import ChunkedBody
from .forwarded import trusted, with_forwarded
from .heads import Head
from .mcpnote import Backend
from .tracker import ResponseTracker

if TYPE_CHECKING:
    from ..config import HttpSettings, Probe
    from .mcpfront import McpFront

_CONNECTIONS = itertools.count(1)
# How often one connection's requests move its backend's idle clock (see _count_request).
TOUCH_EVERY = 0.1

# Phases of the client's byte stream: a head; a body counted or chunked; an MCP
# message read whole before anything is decided; another protocol (after an upgrade).
READ_HEAD, READ_LENGTH, READ_CHUNKED, OPAQUE, READ_MESSAGE = range(5)


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

    def request_seen(self, conn: ClientSide) -> None:
        """A request that is activity, on an attached connection: its backend's idle
        clock moves."""

    def result_due(self, conn: ClientSide) -> None:
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


class HttpConnection(ClientSide):
    """The state of one mode-http client connection, and what needs no request read."""

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
        "_message",
        "_partial",
        "_peer",
        "_phase",
        "_probe_only",
        "_quiet_handle",
        "_remaining",
        "_request_activity",
        "_rest",
        "_rest_at",
        "_stash",
        "_streaming",
        "_suspended",
        "_touched",
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
        self._phase = READ_HEAD
        self._remaining = 0
        self._chunks: ChunkedBody | None = None
        # Counted by the owner as holding part of a head (see head_started).
        self._partial = False
        self._body: bytearray | None = None  # a JSON body being read to classify it
        self._request_activity = False
        # Bytes wait in _pending (not the upstream) while the backend wakes under us.
        self._gated = False
        self._header_handle: asyncio.TimerHandle | None = None
        self._last_head: Head | None = None
        self._quiet_handle: asyncio.TimerHandle | None = None
        self._wanted_backend = False
        self.answered = False  # the proxy answered (probe or error): input is ignored
        self.active = False  # until a request that is activity
        self.last_request = 0.0
        self._touched = 0.0  # when this connection last moved its backend's idle clock
        self._peer: str | None = None  # the client's address, once asked
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
        # MCP: the listener's sessions and learned answers; the message being read
        # whole (head, raw head); sessions this connection opened; a request held
        # while its session is opened on the server, and what came after it.
        self.mcp = owner.mcp
        self._message: tuple[Head, bytes] | None = None
        self._id = next(_CONNECTIONS)  # the sessions a connection opened are its own
        self._upgrade_after_body = False
        self._suspended = False
        self._stash = bytearray()
        # The rest of a read left for the loop's next turn (see REQUESTS_PER_TURN).
        self._rest = b""
        self._rest_at = 0
        self._streaming = False  # holds a probe's event stream open (see stream_started)
        # Replicas: the MCP session this connection's event stream carries (SSE).
        self.sse_session: bytes | None = None

    @property
    def head(self) -> Head | None:
        """The request head being handled (the last one read)."""
        return self._last_head

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timeout()

    @property
    def _quiet(self) -> bool:
        """Nothing of this connection is with the backend: the proxy may answer."""
        return not self.attached and not self.tracker.methods and not self._pending

    def _placed(self) -> Backend:
        """The backend this connection was placed on (it needed one already)."""
        assert self.backend is not None
        return cast(Backend, self.backend)

    def _peer_address(self) -> str:
        """The peer's address, asked of the transport once (uvloop asks the kernel,
        getpeername(2), each time)."""
        if self._peer is None:
            if self.transport is None:
                return ""
            peer = self.transport.get_extra_info("peername")
            self._peer = str(peer[0]) if peer else ""
        return self._peer

    def _client_address(self) -> str:
        """The client's address: the peer's, or for a trusted proxy in front the last
        hop it added to X-Forwarded-For (each client its own share of sessions)."""
        address = self._peer_address()
        spec = self.http_owner.http.trust_forwarded_from
        head = self._last_head
        if spec and head is not None and trusted(address, spec):
            chain = head.get(b"x-forwarded-for")
            if chain:
                return chain.rsplit(b",", 1)[-1].strip().decode("latin-1")
        return address

    def _count_request(self) -> None:
        if self._request_activity:
            self.last_request = now = time.monotonic()
            self.active = True
            if now - self._touched >= TOUCH_EVERY:
                # The backend's idle clock moves at most every TOUCH_EVERY for one
                # connection: it cannot sleep while the connection is attached, and the
                # connection's end (or allow-sleep's letting go, idle_timeout after its
                # own last request) comes later than any stamp skipped here.
                self._touched = now
                self.http_owner.request_seen(self)

    def _end_partial(self) -> None:
        if self._partial:
            self._partial = False
            self.http_owner.head_ended()

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
        if self._allow_sleep and self._quiet_handle is None:
            # One timer while requests come: they only stamp last_request, and the
            # check re-arms itself for what is left (no timer per request).
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

    def _outgoing(self, raw: bytes, head: Head) -> bytes:
        """The head as it goes to the backend."""
        http = self.http_owner.http
        if not http.forwarded_headers:
            return raw
        return with_forwarded(raw, head, self._peer_address(), http.trust_forwarded_from)

    def _go_on(self) -> None:
        """Carry on with what waited behind a held request (its session opened, an
        upgrade answered). Reading resumes unless another reason holds it."""
        self._suspended = False
        self.resume_for(WAITING)
        stash = bytes(self._stash)
        self._stash.clear()
        if stash and not self.closed:
            self.data_received(stash)

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

    def _reply(self, data: bytes, head: Head) -> None:
        """An MCP answer the proxy gives itself; the connection stays open unless the
        client asked to close it."""
        self.owner.record(self, Outcome.MCP_ANSWERED, int(data[9:12]))
        self._write_kept(data, close=not head.keep_alive)

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
        if self._phase in (READ_HEAD, READ_MESSAGE) and not self.answered:
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
            or self._phase != READ_HEAD
            or self._buf
        )
        if left > 0 or busy:
            self._arm_quiet(max(left, 1.0))
            return
        self.attached = False
        self.owner.no_longer_needs(self)
